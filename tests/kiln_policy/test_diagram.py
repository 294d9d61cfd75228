"""`kiln diagram`: the architecture drawn from the synthesized cloud assembly."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from kiln_policy import diagram
from kiln_policy.diagram import _route, build_graph, layout, readable, render
from tests.support import Synthesis


def labels(graph, edges):  # type: ignore[no-untyped-def]
    return {
        (graph.nodes[a].label.split("\n")[0], graph.nodes[b].label.split("\n")[0]) for a, b in edges
    }


def test_graph_holds_every_stack_and_the_data_flows(synthesis: Synthesis) -> None:
    graph = build_graph(synthesis.stacks, "dev")
    assert graph.stacks == [
        "network",
        "data-lake",
        "streaming",
        "warehouse",
        "compute",
        "models",
        "serving",
        "observability",
    ]
    flows = labels(graph, graph.edges)
    assert {
        ("MSK", "Firehose"),
        ("Firehose", "S3 raw"),
        ("S3 raw", "Redshift Serverless"),
        ("S3 curated", "Redshift Serverless"),
        ("MSK", "Redshift Serverless"),
        ("S3 curated", "EKS"),
        ("EKS", "S3 artifacts"),
        ("S3 raw", "S3 accesslogs"),
    } <= flows
    # Grants decide direction: the trainer writes artifacts, so no arrow comes back.
    assert ("S3 artifacts", "EKS") not in flows
    assert not any("VPC" in a or "VPC" in b for a, b in flows)
    # The dashboard names what it watches (its widgets' dimensions): watching is no flow.
    assert not any("dashboard" in a or "dashboard" in b for a, b in flows)


def test_unknown_environment(synthesis: Synthesis) -> None:
    with pytest.raises(ValueError, match="no stacks of environment 'qa'"):
        build_graph(synthesis.stacks, "qa")


def test_render_writes_svg_and_png_deterministically(synthesis: Synthesis, tmp_path: Path) -> None:
    graph = build_graph(synthesis.stacks, "prod")
    svg, png = render(graph, tmp_path / "a")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert text.startswith("<?xml") and "kiln-prod-streaming" in text and "Firehose" in text
    # A legend says what colours and arrows mean.
    assert "colour: the stack a resource belongs to" in text and "data flows this way" in text
    again, _ = render(graph, tmp_path / "b")
    assert again.read_text() == text


def test_kiln_diagram_command_draws_from_an_assembly(
    synthesis: Synthesis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln_cli.cli import main

    assert (
        main(
            [
                "diagram",
                "--env",
                "staging",
                "--assembly",
                str(synthesis.outdir),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "staging-architecture.svg").exists()
    assert (tmp_path / "staging-architecture.png").exists()
    assert (
        main(
            [
                "diagram",
                "--env",
                "nowhere",
                "--assembly",
                str(synthesis.outdir),
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "no stacks of environment 'nowhere'" in capsys.readouterr().err


def test_arrows_run_between_boxes_never_across_one(synthesis: Synthesis) -> None:
    """Every arrow's segments stay in the gaps of the grid: none passes through a box (and its
    label), whatever the environment."""
    for environment in ("dev", "staging", "prod"):
        plan = layout(build_graph(synthesis.stacks, environment))
        occupied = set(plan.cells.values())
        half_w = diagram.BOX_W / 2 / (diagram.BOX_W + diagram.COL_GAP)
        half_h = diagram.BOX_H / 2 / (diagram.BOX_H + diagram.ROW_GAP)
        for a, b in plan.flows:
            points = _route(plan.cells[a], plan.cells[b], occupied, 0.12, 0.1, -0.1)
            for (x0, y0), (x1, y1) in itertools.pairwise(points):
                for t in (i / 50 for i in range(1, 50)):
                    x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
                    inside = [
                        cell
                        for cell in occupied
                        if abs(x - cell[0]) < half_w - 1e-6 and abs(y - cell[1]) < half_h - 1e-6
                    ]
                    assert not inside, (environment, a, b, points)


def test_a_long_flow_folds_into_two_rows_and_few_columns(synthesis: Synthesis) -> None:
    graph = build_graph(synthesis.stacks, "prod")
    plan = layout(graph)
    assert plan.columns <= diagram.ONE_ROW_LAYERS
    # Boxes outside every flow (the VPC, the alarm topic) are drawn apart, not in a column.
    apart = {graph.nodes[k].label.split("\n")[0] for k in plan.apart}
    assert {"VPC", "SNS"} <= apart


def test_an_environment_without_a_model_says_why_serving_is_empty(
    synthesis: Synthesis, tmp_path: Path
) -> None:
    graph = build_graph(synthesis.stacks, "dev")
    assert not any(n.stack == "serving" for n in graph.nodes.values())
    svg, _ = render(graph, tmp_path)
    assert "kiln-dev-serving: nothing deployed there yet" in svg.read_text()


def test_a_failed_synth_reads_as_text() -> None:
    node_output = (
        "b'!!!!!!!!!!!!!!!!!!!!!!\\n'\n"
        "b'!!  Node 20 is end-of-life  !!\\n'\n"
        "kiln: synth stopped, the configuration needs a fix.\n"
        "b'Error: caf\\xc3\\xa9 \\n'\n"
    )
    assert readable(node_output) == (
        "kiln: synth stopped, the configuration needs a fix.\nError: caf\u00e9"
    )


def test_the_picture_goes_outside_tracked_folders_by_default() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    diagram.add_arguments(parser)
    assert parser.parse_args(["--env", "dev"]).out == Path("cdk.out") / "diagram"


def test_a_bad_model_artifact_is_refused_before_synth(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln_cli.cli import main

    assert main(["diagram", "--env", "dev", "--model-artifact", "s3://x/y.tar.gz"]) == 2
    assert "the bucket name 'x' has 1 character" in capsys.readouterr().err
