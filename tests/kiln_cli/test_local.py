"""`kiln local` end to end (a short version): train, package, serve, ask, stop; and what a person
sees of it: progress, answers, mistakes, temporary files."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from kiln_cli import local
from kiln_cli.cli import main
from kiln_cli.local import LocalError, LocalRun, serve_and_ask, show_answer


def test_the_whole_loop_runs_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="kiln local trains and serves a model")
    code = main(
        [
            "local",
            # Time to spare even on a loaded machine: the 20 steps end the run, not the clock.
            "--minutes",
            "10",
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
    assert "training the tiny model on the Python standard library for 10 min" in out
    # Progress: step/total, loss, tokens/s and ETA, from the trainer's metrics.
    assert "step 5/20 (25%) | loss " in out and " tok/s | " in out and "ETA" in out
    assert "trained 20 steps in" in out
    assert "--- answer 1 of 2, to 'def add(a, b):'" in out
    assert "--- answer 2 of 2, to 'import sys\\n'" in out
    assert "validation loss:" in out and "tokens/s" in out
    assert f"server stopped (exit 0); files in {tmp_path}" in out


def test_show_answer_reads_as_text() -> None:
    assert show_answer("def f():", "\n    return 1\n") == "  def f():\n      return 1"
    assert show_answer("x", " \x07y") == "  x \\x07y"
    assert "answered only whitespace: '\\n   '" in show_answer("def f():", "\n   ")


def test_a_model_that_will_not_load_is_reported(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the server loads a model")
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    run = LocalRun(work_dir=tmp_path, model_dir=broken)
    with pytest.raises(LocalError, match=r"(?s)the server exited .* the end of its log:\n.*config"):
        serve_and_ask(run, prompts=["x"], max_new_tokens=1, say=lambda _: None, startup_timeout=60)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--minutes", "0"], "argument --minutes: must be more than 0, got 0"),
        (["--max-steps", "-3"], "argument --max-steps: must be at least 1, got -3"),
        (["--temperature", "hot"], "argument --temperature: expected a number, got 'hot'"),
        # The presets are listed, not the trainer's usage text.
        (
            ["--model", "huge"],
            "argument --model: 'huge' is neither a preset (tiny, small, base, 1b) nor a model "
            "directory or model.tar.gz",
        ),
    ],
)
def test_bad_options_say_what_is_allowed(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["local", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert words in err, err


def test_the_presets_are_the_trainers() -> None:
    config = pytest.importorskip("modeling.config")
    assert set(local.PRESETS) == set(config.PRESETS)
    assert local.DEFAULT_PRESET in local.PRESETS


def test_without_the_workload_packages_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `make synth` alone leaves: the infrastructure packages, no torch.
    monkeypatch.setattr(local, "_importable", lambda name: name not in ("torch", "uvicorn"))
    assert main(["local"]) == 2
    err = capsys.readouterr().err
    assert "lacks the training and serving packages (torch, uvicorn)" in err
    assert "make install-dev" in err and "make test" in err and "Traceback" not in err


def test_a_failed_run_leaves_no_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def fail(run: LocalRun, **_: object) -> None:
        (run.work_dir / "train.log").write_text("boom\n")
        raise LocalError("training failed (exit 2); the end of its log:\nboom")

    monkeypatch.setattr(local, "train", fail)
    assert main(["local"]) == 1
    assert "kiln local: training failed (exit 2)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_says_it_stopped_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(run: LocalRun, **_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "train", interrupted)
    assert main(["local"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; training and the server are stopped" in err and "AWS" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_progress_line_is_the_trainers() -> None:
    metrics = pytest.importorskip("training.metrics")
    event = {
        "step": 305,
        "total_steps": 742,
        "train_loss": 1.9,
        "tokens_per_s": 7361.2,
        "elapsed_s": 78.4,
        "eta_s": 102.0,
    }
    assert local._progress_line(event) == metrics.progress_line(event)


def test_a_work_dir_that_cannot_be_made_is_said_not_traced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch", reason="the check for the workload packages comes first")
    (tmp_path / "a-file").write_text("")
    assert main(["local", "--work-dir", str(tmp_path / "a-file" / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln local: Not a directory: ") and "Traceback" not in err


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
    assert "--- answer 1 of 1, to 'The kiln'" in out and "server stopped (exit 0)" in out
    assert "training the" not in out and "validation loss" not in out


def test_weight_dtype_reaches_the_server_and_the_memory_line_says_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kiln local --weight-dtype int8` serves int8 weights, and the person sees the server's
    memory line with the dtype it holds."""
    pytest.importorskip("torch", reason="the server loads a model")
    from kernels import ops
    from tests.modeling.hf_models import build

    if not ops.HAVE_CPU_DECODE_OPS:
        pytest.skip(f"int8 weights need kiln's CPU kernels: {ops.UNAVAILABLE_REASON}")
    model = build("llama-3.2-1b", tmp_path / "Llama")
    argv = ["local", "--model", str(model), "--prompt", "The kiln", "--max-new-tokens", "4"]
    for dtype, held in (("int8", "(int8)"), ("float32", "(float32)")):
        code = main([*argv, "--weight-dtype", dtype, "--work-dir", str(tmp_path / dtype)])
        out = capsys.readouterr().out
        assert code == 0, out
        line = next(x for x in out.splitlines() if x.startswith("server memory: weights "))
        assert held in line and "KV cache" in line and "peak RSS" in line, line
        assert "--- answer 1 of 1, to 'The kiln'" in out
        log = (tmp_path / dtype / "server.log").read_text()
        assert held in log


def test_weight_dtype_choices_are_the_servers(capsys: pytest.CaptureFixture[str]) -> None:
    served = pytest.importorskip("modeling.served")
    assert local.WEIGHT_DTYPES == served.WEIGHT_DTYPES
    with pytest.raises(SystemExit) as exit_:
        main(["local", "--weight-dtype", "int4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --weight-dtype: invalid choice: 'int4'" in err, err
    assert "'auto', 'float32', 'bfloat16', 'int8'" in err, err


def test_a_model_path_that_is_not_there_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["local", "--model", "./no-such-model"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model: ./no-such-model: no such model directory or model.tar.gz" in err, err


def test_progress_shows_no_total_until_the_trainer_has_planned_one() -> None:
    """Without --max-steps the trainer's cap is a placeholder: the line says the step, loss and
    the time left, then the planned total once there is one."""
    lines: list[str] = []
    progress = local._Progress(lines.append, None, interactive=False)
    train = {"event": "train", "train_loss": 2.5, "tokens_per_s": 9000.0, "elapsed_s": 2.0}
    progress.update({**train, "step": 5, "total_steps": 1_000_000, "eta_s": 178.0})
    progress.update({"event": "plan", "step": 10, "total_steps": 489})
    progress._last_line = float("-inf")  # the next line is due
    progress.update({**train, "step": 30, "total_steps": 489, "eta_s": 167.0})
    assert lines == [
        "  step 5 | loss 2.500 | 9,000 tok/s | 2s elapsed | ETA 2m58s",
        "  step 30/489 (6%) | loss 2.500 | 9,000 tok/s | 2s elapsed | ETA 2m47s",
    ]
