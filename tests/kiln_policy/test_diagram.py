"""`kiln diagram`: the architecture drawn from the synthesized cloud assembly."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln_policy.diagram import build_graph, render
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


def test_unknown_environment(synthesis: Synthesis) -> None:
    with pytest.raises(ValueError, match="no stacks of environment 'qa'"):
        build_graph(synthesis.stacks, "qa")


def test_render_writes_svg_and_png_deterministically(synthesis: Synthesis, tmp_path: Path) -> None:
    graph = build_graph(synthesis.stacks, "prod")
    svg, png = render(graph, tmp_path / "a")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert text.startswith("<?xml") and "kiln-prod-streaming" in text and "Firehose" in text
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
