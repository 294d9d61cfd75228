"""Draws an environment's architecture (SVG and PNG) from its synthesized cloud assembly.

Nothing here is drawn by hand: the boxes are the stacks and their main resources found in
the templates, and the arrows are the data flows the templates grant. A resource that an
IAM policy lets write to a bucket or a Kafka topic points at it; one that may only read it
is pointed at; a reference from one main resource to another (Firehose naming its MSK
cluster) is a flow from the referenced one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.contract import COMPONENTS, LAKE_ZONES, Component
from kiln_policy.assembly import SynthesizedStack

# The resource types worth a box, with the label they get.
MAIN_TYPES: dict[str, str] = {
    "AWS::EC2::VPC": "VPC",
    "AWS::S3::Bucket": "S3",
    "AWS::MSK::Cluster": "MSK",
    "AWS::KinesisFirehose::DeliveryStream": "Firehose",
    "AWS::RedshiftServerless::Workgroup": "Redshift Serverless",
    "AWS::Redshift::Cluster": "Redshift",
    "AWS::EKS::Cluster": "EKS",
    "AWS::EKS::Nodegroup": "node group",
    "AWS::SageMaker::Endpoint": "SageMaker endpoint",
    "AWS::SageMaker::Model": "SageMaker model",
    "AWS::SageMaker::ModelPackageGroup": "model registry",
    "AWS::SNS::Topic": "SNS",
    "AWS::CloudWatch::Dashboard": "dashboard",
}
_WRITE_ACTIONS = ("s3:PutObject", "kafka-cluster:WriteData")
# Resources that are no box but through which a reference joins two boxes.
_CONNECTORS = frozenset({"AWS::SageMaker::EndpointConfig"})
# Boxes that name others only to watch them (a dashboard's widgets name each resource's metrics):
# their references are no data flow.
_WATCHERS = frozenset({"AWS::CloudWatch::Dashboard"})
# Physical names worth printing under a box's label.
_NAME_KEYS = (
    "ClusterName",
    "DeliveryStreamName",
    "WorkgroupName",
    "ClusterIdentifier",
    "Name",
    "NodegroupName",
    "EndpointName",
    "DashboardName",
    "ModelPackageGroupName",
)
# Deploy order, except that observability, which watches every other stack, is drawn last.
_STACK_ORDER: tuple[str, ...] = (
    *(c.value for c in COMPONENTS if c is not Component.OBSERVABILITY),
    Component.OBSERVABILITY.value,
)


@dataclass(frozen=True)
class Node:
    stack: str
    logical_id: str
    kind: str
    label: str


@dataclass
class Graph:
    """Stacks (in deploy order), their main resources, and directed data-flow edges."""

    environment: str
    stacks: list[str] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)  # key: "<stack>/<logical id>"
    edges: set[tuple[str, str]] = field(default_factory=set)


def _component(stack: SynthesizedStack) -> str:
    return stack.stack_name.split("-", 2)[-1]


def _label(kind: str, logical_id: str, resource: dict[str, Any]) -> str:
    props = resource.get("Properties", {})
    name = next((props[k] for k in _NAME_KEYS if isinstance(props.get(k), str)), None)
    if kind == "AWS::S3::Bucket":
        zone = re.sub(r"Bucket[0-9A-F]{8}$", "", logical_id)
        return f"S3 {zone.lower()}"
    if isinstance(name, str):
        return f"{MAIN_TYPES[kind]}\n{name}"
    return MAIN_TYPES[kind]


def _bucket_zones(text: str, environment: str) -> set[str]:
    """The lake zones a policy's resources name (buckets are `<project>-<env>-<zone>-...`)."""
    zones = "|".join(LAKE_ZONES)
    return {z.replace("-", "") for z in re.findall(rf"-{re.escape(environment)}-({zones})-", text)}


def build_graph(stacks: list[SynthesizedStack], environment: str) -> Graph:
    """The graph of one environment's stacks."""
    mine = sorted(
        (s for s in stacks if s.environment == environment),
        key=lambda s: _STACK_ORDER.index(_component(s)) if _component(s) in _STACK_ORDER else 99,
    )
    if not mine:
        raise ValueError(f"no stacks of environment {environment!r} in the cloud assembly")
    graph = Graph(environment=environment, stacks=[_component(s) for s in mine])
    for stack in mine:
        for logical_id, resource in stack.resources.items():
            kind = resource.get("Type", "")
            if kind in MAIN_TYPES:
                graph.nodes[f"{_component(stack)}/{logical_id}"] = Node(
                    _component(stack), logical_id, kind, _label(kind, logical_id, resource)
                )
    buckets = {
        node.label.removeprefix("S3 "): key
        for key, node in graph.nodes.items()
        if node.kind == "AWS::S3::Bucket"
    }
    msk = [key for key, node in graph.nodes.items() if node.kind == "AWS::MSK::Cluster"]
    by_logical = {node.logical_id: key for key, node in graph.nodes.items()}
    references: set[tuple[str, str]] = set()
    for stack in mine:
        policies = _policies_by_role(stack)
        for logical_id, resource in stack.resources.items():
            key = f"{_component(stack)}/{logical_id}"
            if key not in graph.nodes:
                continue
            props = resource.get("Properties", {})
            # Flows from the main resources this one references, directly or through a
            # resource that only connects two (an endpoint names its config, which names the
            # model).
            text = json.dumps(props)
            for via_id, via in stack.resources.items():
                if via.get("Type") in _CONNECTORS and f'"{via_id}"' in text:
                    text += json.dumps(via.get("Properties", {}))
            for other_id, other_key in by_logical.items():
                other = graph.nodes[other_key]
                # The VPC holds everything; it is no flow. Nor is watching.
                kinds = {other.kind, graph.nodes[key].kind}
                if other_key == key or "AWS::EC2::VPC" in kinds or kinds & _WATCHERS:
                    continue
                if re.search(rf'"{other_id}"|{other_id}[A-Za-z0-9]*"', text):
                    # A bucket naming another sends it its access logs.
                    both_buckets = other.kind == graph.nodes[key].kind == "AWS::S3::Bucket"
                    references.add((key, other_key) if both_buckets else (other_key, key))
            # Flows the roles it acts with (named anywhere in its properties) are granted.
            for role, statements in policies.items():
                if f'"{role}"' in text:
                    _grant_edges(graph, key, statements, buckets, msk, environment)
    # Workloads that act through roles not named on a main resource (EKS pods, Redshift).
    _role_owner_edges(graph, mine, buckets, msk, environment)
    # A reference says less than a grant: keep it only where no grant links the pair.
    granted = graph.edges | {(b, a) for a, b in graph.edges}
    graph.edges |= {edge for edge in references if edge not in granted}
    return graph


def _policies_by_role(stack: SynthesizedStack) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for resource in stack.resources_of_type("AWS::IAM::ManagedPolicy", "AWS::IAM::Policy").values():
        props = resource.get("Properties", {})
        for role in props.get("Roles", []):
            if isinstance(role, dict) and "Ref" in role:
                found.setdefault(role["Ref"], []).extend(
                    props.get("PolicyDocument", {}).get("Statement", [])
                )
    return found


def _grant_edges(
    graph: Graph,
    key: str,
    statements: list[dict[str, Any]],
    buckets: dict[str, str],
    msk: list[str],
    environment: str,
) -> None:
    """One edge per bucket or cluster a role may use: towards it if any statement lets the
    role write there, from it if the role only reads."""
    writes: dict[str, bool] = {}
    for statement in statements:
        actions = statement.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        write = any(a in _WRITE_ACTIONS for a in actions)
        targets = []
        if any(a.startswith("s3:") for a in actions):
            zones = _bucket_zones(json.dumps(statement.get("Resource", [])), environment)
            targets += [buckets[z] for z in zones if z in buckets]
        if any(a.startswith("kafka-cluster:") for a in actions):
            targets += msk
        for target in targets:
            writes[target] = writes.get(target, False) or write
    for target, write in writes.items():
        graph.edges.add((key, target) if write else (target, key))


def _role_owner_edges(
    graph: Graph,
    stacks: list[SynthesizedStack],
    buckets: dict[str, str],
    msk: list[str],
    environment: str,
) -> None:
    """Roles assumed by EKS pods or Redshift act for the cluster or warehouse of their stack."""
    owners = {
        "pods.eks.amazonaws.com": "AWS::EKS::Cluster",
        "redshift.amazonaws.com": "AWS::RedshiftServerless::Workgroup",
    }
    for stack in stacks:
        policies = _policies_by_role(stack)
        for role_id, role in stack.resources_of_type("AWS::IAM::Role").items():
            trust = json.dumps(role.get("Properties", {}).get("AssumeRolePolicyDocument", {}))
            for principal, kind in owners.items():
                if principal not in trust:
                    continue
                owner = next(
                    (
                        k
                        for k, n in graph.nodes.items()
                        if n.stack == _component(stack)
                        and n.kind in (kind, "AWS::Redshift::Cluster")
                    ),
                    None,
                )
                if owner:
                    _grant_edges(graph, owner, policies.get(role_id, []), buckets, msk, environment)


# -- drawing ---------------------------------------------------------------------------------
# Sizes in inches. The PNG is drawn at PNG_DPI: labels of FONT points stay readable when a
# laptop screen shows the whole picture (about 12 px high at two-thirds scale).
BOX_W, BOX_H = 2.3, 0.72
COL_GAP, ROW_GAP = 1.0, 0.5
MARGIN = 0.95  # room for the gaps beside the outer columns, where arrows run
FONT = 11
PNG_DPI = 120
# Flows longer than this many layers fold into a second row, drawn right to left.
ONE_ROW_LAYERS = 4
STACK_COLOURS: dict[str, str] = {
    "network": "#e5e7eb",
    "data-lake": "#d1fae5",
    "streaming": "#ffedd5",
    "warehouse": "#ede9fe",
    "compute": "#dbeafe",
    "serving": "#fee2e2",
    "observability": "#fef9c3",
}
FLOW_COLOUR = "#b45309"


@dataclass
class Layout:
    """Grid cells (column, row) of the boxes in a data flow, the boxes outside every flow, and
    the flows to draw (an access-logs bucket's incoming arrows are said in its label instead)."""

    cells: dict[str, tuple[int, int]]
    apart: list[str]
    flows: list[tuple[str, str]]
    columns: int
    rows: int


def _is_access_logs(node: Node) -> bool:
    return node.kind == "AWS::S3::Bucket" and node.label == "S3 accesslogs"


def display_label(node: Node) -> str:
    if _is_access_logs(node):
        return "S3 access logs\n(every bucket's)"
    return node.label


def layout(graph: Graph) -> Layout:
    """Boxes in columns by their place in the data flow (longest path from a source), folded
    into two rows of columns when the flow is long, so that most arrows join neighbours."""
    flows = sorted(
        (a, b)
        for a, b in graph.edges
        if a != b and a in graph.nodes and b in graph.nodes and not _is_access_logs(graph.nodes[b])
    )
    in_flow = sorted({k for edge in flows for k in edge}, key=list(graph.nodes).index)
    successors: dict[str, list[str]] = {k: [] for k in in_flow}
    for a, b in flows:
        successors[a].append(b)
    # Longest-path layers over the flows, ignoring the edges that close a cycle.
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the path being explored, 2: done

    def visit(key: str) -> None:
        state[key] = 1
        for nxt in successors[key]:
            if state.get(nxt) is None:
                visit(nxt)
        state[key] = 2
        order.append(key)

    for key in in_flow:
        if key not in state:
            visit(key)
    order.reverse()
    position = {k: i for i, k in enumerate(order)}
    layer = dict.fromkeys(in_flow, 0)
    for key in order:
        for nxt in successors[key]:
            if position[nxt] > position[key]:
                layer[nxt] = max(layer[nxt], layer[key] + 1)
    layers = max(layer.values(), default=-1) + 1
    top = math.ceil(layers / 2) if layers > ONE_ROW_LAYERS else layers

    def cell_of(n: int) -> tuple[int, int]:  # (band, column)
        return (0, n) if n < top else (1, top - 1 - (n - top))

    by_cell: dict[tuple[int, int], list[str]] = {}
    for key in sorted(in_flow, key=lambda k: (layer[k], position[k])):
        by_cell.setdefault(cell_of(layer[key]), []).append(key)
    # Within a cell, boxes fed from above come first (their arrows stay short).
    predecessors: dict[str, list[str]] = {k: [] for k in in_flow}
    for a, b in flows:
        predecessors[b].append(a)
    band_rows = [
        max((len(v) for (band, _), v in by_cell.items() if band == b), default=0) for b in (0, 1)
    ]
    cells: dict[str, tuple[int, int]] = {}
    for n in range(layers):
        band, column = cell_of(n)
        members = by_cell.get((band, column), [])

        def weight(key: str) -> float:
            rows = [cells[p][1] for p in predecessors[key] if p in cells]
            return sum(rows) / len(rows) if rows else float("inf")

        members.sort(key=lambda k: (weight(k), position[k]))
        for index, key in enumerate(members):
            cells[key] = (column, index + (band_rows[0] if band else 0))
    apart = [k for k in graph.nodes if k not in cells]
    columns = max(top, 1)
    return Layout(cells, apart, flows, columns, band_rows[0] + band_rows[1])


def _straight_down(a: tuple[int, int], b: tuple[int, int], occupied: set[tuple[int, int]]) -> bool:
    (ca, ra), (cb, rb) = a, b
    return ca == cb and all((ca, r) not in occupied for r in range(min(ra, rb) + 1, max(ra, rb)))


def _sides(
    a: tuple[int, int], b: tuple[int, int], occupied: set[tuple[int, int]]
) -> tuple[str, str]:
    """The sides of a's and b's boxes an arrow leaves and enters by ("" for top or bottom)."""
    if _straight_down(a, b, occupied):
        return "", ""
    if a[0] == b[0]:
        return "right", "right"
    return ("right", "left") if b[0] > a[0] else ("left", "right")


def _route(
    a: tuple[int, int],
    b: tuple[int, int],
    occupied: set[tuple[int, int]],
    shift: float,
    exit_y: float,
    entry_y: float,
) -> list[tuple[float, float]]:
    """The path of an arrow from cell a to cell b in grid units (x: columns, y: rows, both
    box centres), along the gaps between boxes so that it never crosses a box or its label.
    `shift` moves it within the gaps (arrows sharing one stay apart); `exit_y`/`entry_y` move
    where it leaves and enters a box's side."""
    (ca, ra), (cb, rb) = a, b
    half_w = BOX_W / 2 / (BOX_W + COL_GAP)  # half a box, in columns
    half_h = BOX_H / 2 / (BOX_H + ROW_GAP)
    if ra == rb and all((c, ra) not in occupied for c in range(min(ca, cb) + 1, max(ca, cb))):
        sign = 1 if cb > ca else -1
        y = ra + exit_y
        return [(ca + sign * half_w, y), (cb - sign * half_w, y)]
    if _straight_down(a, b, occupied):
        sign = 1 if rb > ra else -1
        x = ca + shift
        return [(x, ra + sign * half_h), (x, rb - sign * half_h)]
    sign = 1 if cb >= ca else -1
    lane_a = ca + sign * 0.5 + shift  # the gap beside a, on b's side
    lane_b = lane_a if ca == cb else cb - sign * 0.5 + shift  # the gap beside b, on a's side
    start = (ca + sign * half_w, ra + exit_y)
    if ca == cb:  # leave and enter on the same side
        return [
            start,
            (lane_a, start[1]),
            (lane_a, rb + entry_y),
            (cb + sign * half_w, rb + entry_y),
        ]
    end = (cb - sign * half_w, rb + entry_y)
    if abs(cb - ca) == 1:
        return [start, (lane_a, start[1]), (lane_a, end[1]), end]
    # Along the row gap beside b, on a's side of it.
    row_lane = rb + (-0.5 if ra < rb else 0.5) + shift * 0.6
    return [
        start,
        (lane_a, start[1]),
        (lane_a, row_lane),
        (lane_b, row_lane),
        (lane_b, end[1]),
        end,
    ]


def render(graph: Graph, out_dir: Path) -> tuple[Path, Path]:
    """Writes `<env>-architecture.svg` and `.png` into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
    from matplotlib.path import Path as DrawnPath

    plan = layout(graph)
    apart_columns = max(1, len(plan.apart))
    columns = max(plan.columns, apart_columns)
    col_pitch, row_pitch = BOX_W + COL_GAP, BOX_H + ROW_GAP
    title_h, apart_h, legend_h = 1.1, (0.45 + row_pitch) if plan.apart else 0.0, 1.3
    width = 2 * MARGIN + columns * BOX_W + (columns - 1) * COL_GAP
    height = title_h + plan.rows * row_pitch + apart_h + legend_h
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")

    def x_of(column: float) -> float:
        return MARGIN + BOX_W / 2 + column * col_pitch

    def y_of(row: float) -> float:
        return height - title_h - BOX_H / 2 - ROW_GAP / 2 - row * row_pitch

    ax.text(
        width / 2,
        height - 0.45,
        f"kiln {graph.environment}: main resources and how data flows between them",
        ha="center",
        va="center",
        fontsize=FONT + 5,
        weight="bold",
    )
    empty = [s for s in graph.stacks if not any(n.stack == s for n in graph.nodes.values())]
    if empty:
        names = ", ".join(f"kiln-{graph.environment}-{s}" for s in empty)
        ax.text(
            width / 2,
            height - 0.85,
            f"{names}: nothing deployed there yet (the serving stack's endpoint appears "
            "with --model-artifact s3://...)",
            ha="center",
            va="center",
            fontsize=FONT - 1,
            style="italic",
            color="#4b5563",
        )

    def box(key: str, x: float, y: float) -> None:
        node = graph.nodes[key]
        ax.add_patch(
            FancyBboxPatch(
                (x - BOX_W / 2, y - BOX_H / 2),
                BOX_W,
                BOX_H,
                boxstyle="round,pad=0,rounding_size=0.08",
                fc=STACK_COLOURS.get(node.stack, "#f3f4f6"),
                ec="#374151",
                lw=1.0,
            )
        )
        ax.text(x, y, display_label(node), ha="center", va="center", fontsize=FONT)

    for key, (column, row) in plan.cells.items():
        box(key, x_of(column), y_of(row))
    if plan.apart:
        label_y = y_of(plan.rows) + BOX_H / 2 + 0.05
        ax.text(
            MARGIN,
            label_y,
            "also deployed, outside the data flows:",
            ha="left",
            va="bottom",
            fontsize=FONT - 1,
            style="italic",
            color="#4b5563",
        )
        for index, key in enumerate(plan.apart):
            box(key, x_of(index), y_of(plan.rows) - 0.45)

    # Where arrows leave and enter each box's sides: spread when several share one.
    occupied = set(plan.cells.values())
    sides: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for a, b in plan.flows:
        exit_side, entry_side = _sides(plan.cells[a], plan.cells[b], occupied)
        if exit_side:
            sides.setdefault((a, exit_side), []).append((a, b))
            sides.setdefault((b, entry_side), []).append((a, b))

    def spread(key: str, side: str, flow: tuple[str, str]) -> float:
        group = sides.get((key, side), [flow])
        step = min(0.22, 0.8 / len(group)) * (BOX_H / row_pitch)
        return (group.index(flow) - (len(group) - 1) / 2) * step

    for index, (a, b) in enumerate(plan.flows):
        ca, cb = plan.cells[a], plan.cells[b]
        exit_side, entry_side = _sides(ca, cb, occupied)
        points = _route(
            ca,
            cb,
            occupied,
            shift=((index % 5) - 2) * 0.06,
            exit_y=-spread(a, exit_side, (a, b)) if exit_side else 0.0,
            entry_y=-spread(b, entry_side, (a, b)) if entry_side else 0.0,
        )
        drawn = [(x_of(x), y_of(y)) for x, y in points]
        codes = [DrawnPath.MOVETO] + [DrawnPath.LINETO] * (len(drawn) - 1)
        ax.add_patch(
            FancyArrowPatch(
                path=DrawnPath(drawn, codes),
                arrowstyle="-|>",
                mutation_scale=16,
                color=FLOW_COLOUR,
                lw=1.5,
                shrinkA=0,
                shrinkB=0,
            )
        )

    handles: list[Any] = [
        Patch(
            fc=STACK_COLOURS.get(s, "#f3f4f6"), ec="#374151", label=f"kiln-{graph.environment}-{s}"
        )
        for s in graph.stacks
        if s not in empty
    ]
    handles.append(
        Line2D(
            [],
            [],
            color=FLOW_COLOUR,
            lw=1.5,
            marker=">",
            markevery=[-1],
            label="data flows this way (IAM grants: writer → store → reader)",
        )
    )
    ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.02),
        ncol=min(4, len(handles)),
        fontsize=FONT - 1,
        frameon=False,
        title="colour: the stack a resource belongs to",
        title_fontsize=FONT - 1,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    svg = out_dir / f"{graph.environment}-architecture.svg"
    png = out_dir / f"{graph.environment}-architecture.png"
    # A fixed hash salt and no dates keep the SVG identical for an identical graph.
    with matplotlib.rc_context({"svg.hashsalt": "kiln", "svg.fonttype": "none"}):
        fig.savefig(svg, format="svg", metadata={"Date": None})
    fig.savefig(png, format="png", dpi=PNG_DPI)
    plt.close(fig)
    return svg, png


def synthesize(
    environment: str,
    out_dir: Path,
    model_artifact: str | None = None,
    say: Any = None,
) -> Path:
    """Runs the CDK app (as `cdk synth` would, no credentials needed) into `out_dir`, with the
    venv's Node first on PATH (as `make synth` has it); `say(text, end)` shows progress."""
    import os
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CDK_OUTDIR": str(out_dir),
        "CDK_CONTEXT_JSON": json.dumps(
            {"env": environment, **({"modelArtifact": model_artifact} if model_artifact else {})}
        ),
    }
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, str(repo / "app.py")],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            while process.poll() is None:
                if say is not None:
                    say(f"synthesizing {environment} ... {time.monotonic() - started:.0f}s", "\r")
                time.sleep(1)
        except BaseException:
            process.kill()
            raise
        output = process.stdout.read() if process.stdout else ""
    if say is not None:
        say(f"synthesized {environment} in {time.monotonic() - started:.0f}s", "\n")
    if process.returncode != 0:
        raise RuntimeError(f"synthesis of {environment} failed:\n{readable(output)[-2000:]}")
    return out_dir


def readable(output: str) -> str:
    """The CDK app's output as text: jsii relays Node's stderr as Python byte-string reprs
    (`b'...\\n'`); those become their text, and Node's end-of-life banner (`!!` lines) goes."""
    import ast
    import contextlib

    lines = []
    for line in output.splitlines():
        if line.startswith(("b'", 'b"')):
            with contextlib.suppress(ValueError, SyntaxError):
                line = ast.literal_eval(line).decode("utf-8", "replace").rstrip("\n")
        if not line.startswith("!!"):
            lines.append(line)
    return "\n".join(lines).strip()


DEFAULT_OUT = Path("cdk.out") / "diagram"


def add_arguments(parser: Any) -> None:
    parser.add_argument("--env", required=True, help="the environment to draw")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder for <env>-architecture.svg and .png (default: %(default)s, which git "
        "ignores; the README's picture is drawn with --out docs)",
    )
    parser.add_argument(
        "--model-artifact",
        help="draw the serving stack as it is with this model.tar.gz (s3://...) deployed "
        "(default: the environment's serving.model_artifact; none: no endpoint is drawn)",
    )
    parser.add_argument(
        "--assembly",
        type=Path,
        help="draw from an existing cloud assembly (a cdk.out folder) instead of synthesizing "
        "one (default: synthesize, about half a minute)",
    )


def run_command(args: Any) -> int:
    """The `kiln diagram` command."""
    import shutil
    import sys
    import tempfile

    from kiln.settings import model_artifact_problem
    from kiln_policy.assembly import read_assembly

    if args.model_artifact and (problem := model_artifact_problem(args.model_artifact)):
        print(f"kiln diagram: --model-artifact {problem}", file=sys.stderr)
        return 2
    interactive = sys.stderr.isatty()

    def say(text: str, end: str) -> None:
        if interactive or end == "\n":
            print(f"\r{text}", end=end, file=sys.stderr, flush=True)

    scratch = None
    try:
        if args.assembly is not None:
            assembly = args.assembly
        else:
            scratch = Path(tempfile.mkdtemp(prefix="kiln-diagram-"))
            assembly = synthesize(args.env, scratch, args.model_artifact, say=say)
        graph = build_graph(read_assembly(assembly), args.env)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"kiln diagram: {err}", file=sys.stderr)
        return 1
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    svg, png = render(graph, args.out)
    print(f"{svg}\n{png}")
    return 0
