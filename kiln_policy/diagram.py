"""Draws an environment's architecture (SVG and PNG) from its synthesized cloud assembly.

Nothing here is drawn by hand: the boxes are the stacks and their main resources found in
the templates, and the arrows are the data flows the templates grant. A resource that an
IAM policy lets write to a bucket or a Kafka topic points at it; one that may only read it
is pointed at; a reference from one main resource to another (Firehose naming its MSK
cluster) is a flow from the referenced one.
"""

from __future__ import annotations

import json
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
            # Flows from the main resources this one references.
            text = json.dumps(props)
            for other_id, other_key in by_logical.items():
                other = graph.nodes[other_key]
                # The VPC holds everything; it is no flow.
                if other_key == key or "AWS::EC2::VPC" in (other.kind, graph.nodes[key].kind):
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


def render(graph: Graph, out_dir: Path) -> tuple[Path, Path]:
    """Writes `<env>-architecture.svg` and `.png` into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    columns = graph.stacks
    per_stack = {s: [k for k, n in graph.nodes.items() if n.stack == s] for s in columns}
    rows = max(len(v) for v in per_stack.values())
    col_w, row_h = 3.0, 0.9
    fig_w, fig_h = col_w * len(columns) + 0.5, row_h * rows + 1.6
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, fig_h)
    ax.axis("off")
    ax.set_title(f"kiln {graph.environment}: stacks, main resources and data flows", fontsize=12)
    centers: dict[str, tuple[float, float]] = {}
    for column, stack in enumerate(columns):
        x0 = 0.25 + column * col_w
        ax.add_patch(
            FancyBboxPatch(
                (x0, 0.2),
                col_w - 0.3,
                fig_h - 1.0,
                boxstyle="round,pad=0.02",
                fc="#f4f6f8",
                ec="#8895a7",
            )
        )
        ax.text(
            x0 + (col_w - 0.3) / 2,
            fig_h - 0.95,
            f"kiln-{graph.environment}-{stack}",
            ha="center",
            va="center",
            fontsize=8,
            weight="bold",
        )
        for row, key in enumerate(per_stack[stack]):
            y = fig_h - 1.6 - row * row_h
            ax.add_patch(
                FancyBboxPatch(
                    (x0 + 0.15, y - 0.3),
                    col_w - 0.6,
                    0.6,
                    boxstyle="round,pad=0.02",
                    fc="white",
                    ec="#3b6ea8",
                )
            )
            ax.text(
                x0 + (col_w - 0.3) / 2,
                y,
                graph.nodes[key].label,
                ha="center",
                va="center",
                fontsize=6.5,
            )
            centers[key] = (x0 + (col_w - 0.3) / 2, y)
    for source, target in sorted(graph.edges):
        if source in centers and target in centers and source != target:
            ax.add_patch(
                FancyArrowPatch(
                    centers[source],
                    centers[target],
                    arrowstyle="-|>",
                    mutation_scale=9,
                    color="#c2410c",
                    lw=0.8,
                    alpha=0.8,
                    connectionstyle="arc3,rad=0.15",
                    shrinkA=14,
                    shrinkB=14,
                )
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    svg = out_dir / f"{graph.environment}-architecture.svg"
    png = out_dir / f"{graph.environment}-architecture.png"
    # A fixed hash salt and no dates keep the SVG identical for an identical graph.
    with matplotlib.rc_context({"svg.hashsalt": "kiln", "svg.fonttype": "none"}):
        fig.savefig(svg, format="svg", metadata={"Date": None})
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return svg, png


def synthesize(environment: str, out_dir: Path, model_artifact: str | None = None) -> Path:
    """Runs the CDK app (as `cdk synth` would, no credentials needed) into `out_dir`."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "CDK_OUTDIR": str(out_dir),
        "CDK_CONTEXT_JSON": json.dumps(
            {"env": environment, **({"modelArtifact": model_artifact} if model_artifact else {})}
        ),
    }
    result = subprocess.run(
        [sys.executable, str(repo / "app.py")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"synthesis of {environment} failed:\n{result.stderr[-2000:]}")
    return out_dir


def add_arguments(parser: Any) -> None:
    parser.add_argument("--env", required=True, help="the environment to draw")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs"),
        help="folder for <env>-architecture.svg/.png (default: %(default)s)",
    )
    parser.add_argument("--model-artifact", help="draw it serving this model.tar.gz (s3://...)")
    parser.add_argument(
        "--assembly",
        type=Path,
        help="an existing cloud assembly (cdk.out) instead of synthesizing one",
    )


def run_command(args: Any) -> int:
    """The `kiln diagram` command."""
    import sys
    import tempfile

    from kiln_policy.assembly import read_assembly

    try:
        if args.assembly is not None:
            assembly = args.assembly
        else:
            assembly = synthesize(
                args.env, Path(tempfile.mkdtemp(prefix="kiln-diagram-")), args.model_artifact
            )
        graph = build_graph(read_assembly(assembly), args.env)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"kiln diagram: {err}", file=sys.stderr)
        return 1
    svg, png = render(graph, args.out)
    print(f"{svg}\n{png}")
    return 0
