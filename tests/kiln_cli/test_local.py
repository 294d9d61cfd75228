"""`kiln local` end to end (a short version): train, package, serve, ask, stop."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch", reason="kiln local trains and serves a model")

from kiln_cli.cli import main
from kiln_cli.local import LocalError, LocalRun, serve_and_ask


def test_the_whole_loop_runs_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "local",
            "--minutes",
            "1",
            "--max-steps",
            "20",
            "--max-new-tokens",
            "8",
            "--work-dir",
            str(tmp_path),
            "--prompt",
            "def add(a, b):",
            "--prompt",
            "import sys\n",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "run" / "model.tar.gz").exists()
    assert "--- 'def add(a, b):'" in out and "--- 'import sys\\n'" in out
    assert "validation loss:" in out and "tokens/s" in out
    assert "server stopped (exit 0)" in out


def test_a_model_that_will_not_load_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    run = LocalRun(work_dir=tmp_path, model_dir=broken)
    with pytest.raises(LocalError, match="the server exited"):
        serve_and_ask(run, prompts=["x"], max_new_tokens=1, say=lambda _: None, startup_timeout=60)


def test_bad_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["local", "--minutes", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_a_model_directory_you_bring_is_served_and_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.modeling.hf_models import build

    model = build("qwen2.5-0.5b", tmp_path / "Qwen2.5-0.5B")
    argv = ["local", "--model", str(model), "--prompt", "The kiln", "--max-new-tokens", "4"]
    code = main([*argv, "--work-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"serving {model} (no training)" in out
    assert "--- 'The kiln'" in out and "server stopped (exit 0)" in out
    assert "training (" not in out and "validation loss" not in out


def test_a_model_path_that_is_not_there_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["local", "--model", "./no-such-model"]) == 1
    assert "--model ./no-such-model: no such model directory" in capsys.readouterr().err
