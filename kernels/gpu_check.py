"""One command that tells, on a GPU machine, whether every CUDA kernel is right and how fast it is.

    make gpu-check                                  # or: python3 -m kernels.gpu_check
    python3 -m kernels.gpu_check --log $OUT/gpu-check.log

Steps, in order, each with its share of a 10-minute budget, all output in one log:

1. device: nvidia-smi, and torch's view of the GPU;
2. python: one whose torch is a CUDA build (KILN_GPU_PYTHON, build/venv-gpu, .venv, python3),
   else a new build/venv-gpu from the repository's pins (torch==..., pytest==...; wheels in .whl/
   are used when present, for machines without a package index);
3. build: the extension for this GPU's architecture only, in place (kernels/_C*.so);
4. tests: every CUDA test (tests/kernels/test_kernels_cuda.py) and the CUDA compile tests;
   then serving's CUDA tests (tests/inference/test_graphs.py: decode CUDA graphs replay the eager
   step bitwise in bf16, a served Llama answers the same with and without them), where the
   Python has the server's packages (skipped, saying which are missing, where not);
5. sanitizer: compute-sanitizer memcheck and racecheck over kernels.gpu_sanitize;
6. bench: kernels.bench --device cuda (ours, eager, torch.compile, a same-traffic copy).

Where no GPU is found it runs what needs none (the device report and the CUDA compile check),
then stops with a one-line reason and exit code 2. Exit code 1: a step failed; 0: all passed.
This file uses the standard library only: it runs under any Python 3 before an environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 570.0  # the whole run: under the 10 minutes a lent machine runs one command
NO_GPU_EXIT = 2

PROBE = """
import json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                available=torch.cuda.is_available())
    if info["available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    devices=torch.cuda.device_count())
except Exception as err:  # no torch, or a broken one
    info["error"] = repr(err)
try:
    import pytest
    info["pytest"] = pytest.__version__
except Exception:
    pass
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""


@dataclass
class Check:
    log: IO[str]
    deadline: float
    steps: list[Step] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self,
        cmd: list[str],
        timeout: float,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> tuple[int, str]:
        """Runs cmd with its output streamed to the console and the log; (exit code, output).
        Past its timeout (or the run's deadline) the command's process group is killed: 124."""
        timeout = max(1.0, min(timeout, self.left()))
        self.say(f"$ {' '.join(cmd)}")
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        lines: list[str] = []
        start = time.monotonic()
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        timed_out = False
        while True:
            chunk = proc.stdout.readline()
            if chunk:
                lines.append(chunk)
                self.log.write(chunk)
                sys.stdout.write(chunk)
                continue
            if proc.poll() is not None:
                rest = proc.stdout.read() or ""
                if rest:
                    lines.append(rest)
                    self.log.write(rest)
                    sys.stdout.write(rest)
                break
            if time.monotonic() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timed_out = True
                break
            time.sleep(0.05)
        self.log.flush()
        sys.stdout.flush()
        if timed_out:
            self.say(f"(killed after {timeout:.0f} s)")
            return 124, "".join(lines)
        return proc.returncode, "".join(lines)

    def step(self, name: str) -> Step:
        step = Step(name)
        self.steps.append(step)
        self.say(f"\n===== {name} =====")
        return step


def probe_python(check: Check, python: str) -> dict[str, object] | None:
    try:
        done = subprocess.run(
            [python, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=REPO
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    try:
        info: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    except json.JSONDecodeError:
        return None
    check.say(f"  candidate {python}: {json.dumps(info)}")
    return info


def candidate_pythons() -> list[str]:
    found = [
        os.environ.get("KILN_GPU_PYTHON", ""),
        str(REPO / "build" / "venv-gpu" / "bin" / "python"),
        str(REPO / ".venv" / "bin" / "python"),
        shutil.which("python3") or "",
        sys.executable,
    ]
    seen: list[str] = []
    for p in found:
        if p and Path(p).exists() and p not in seen:
            seen.append(p)
    return seen


def choose_python(check: Check, need_cuda: bool) -> tuple[str, dict[str, object]] | None:
    """The first Python whose torch (a CUDA build with a visible GPU, if need_cuda) and pytest
    import."""
    for python in candidate_pythons():
        info = probe_python(check, python)
        if not info or "torch" not in info or "pytest" not in info:
            continue
        if need_cuda and not (info.get("cuda") and info.get("available")):
            continue
        return python, info
    return None


def pins() -> list[str]:
    """torch, numpy and pytest exactly as the repository pins them (pyproject.toml)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    wanted = ("torch", "numpy", "pytest")
    return [
        spec
        for spec in [*extras["ml"], *extras["dev"]]
        if spec.split("==")[0].split("[")[0] in wanted
    ]


def make_env(check: Check) -> str | None:
    """build/venv-gpu with the pinned torch (a CUDA build on Linux x86-64 from PyPI), pytest."""
    venv = REPO / "build" / "venv-gpu"
    python = venv / "bin" / "python"
    if not python.exists():
        code, _ = check.run([sys.executable, "-m", "venv", str(venv)], 120)
        if code != 0:
            return None
    wheels = REPO / ".whl"
    source = ["--no-index", "--find-links", str(wheels)] if wheels.is_dir() else []
    code, _ = check.run(
        [str(python), "-m", "pip", "install", "-q", *source, *pins()], min(300, check.left() / 2)
    )
    return str(python) if code == 0 else None


def report_device(check: Check, python: str | None, info: dict[str, object] | None) -> bool:
    """nvidia-smi and torch's view; whether a GPU is there."""
    smi = shutil.which("nvidia-smi")
    gpu = False
    if smi:
        code, _ = check.run([smi], 60)
        code_l, out_l = check.run([smi, "-L"], 30)
        gpu = code == 0 and code_l == 0 and "GPU 0" in out_l
    else:
        check.say("nvidia-smi: not found")
    if python and info:
        check.say(f"torch in {python}: {json.dumps(info)}")
    return gpu


def compile_check(check: Check, python: str, step: Step) -> None:
    """The CUDA sources compile (nvcc -c for the default architectures; the bindings with g++):
    the part of the check a machine without a GPU can do."""
    code, _ = check.run(
        [
            python,
            "-m",
            "pytest",
            "tests/kernels/test_kernels_build.py",
            "--confcutdir=tests/kernels",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "-k",
            "cuda",
        ],
        400,
    )
    step.status = "ok" if code == 0 else "FAILED"


def summary(check: Check, started: float) -> None:
    check.say("\n===== summary =====")
    for s in check.steps:
        note = f"  {s.note}" if s.note else ""
        check.say(f"{s.name:<10} {s.status:<8} {s.seconds:6.0f} s{note}")
    check.say(f"total {time.monotonic() - started:.0f} s")


def timed(step: Step, start: float) -> None:
    step.seconds = time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log",
        default=os.environ.get("GPU_CHECK_LOG", str(REPO / "build" / "gpu-check.log")),
        help="the one log file (default: build/gpu-check.log)",
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    parser.add_argument(
        "--assume-no-gpu", action="store_true", help="behave as on a machine without a GPU"
    )
    parser.add_argument(
        "--skip-compile", action="store_true", help="without a GPU, skip the nvcc compile check"
    )
    args = parser.parse_args(argv)

    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        check = Check(log=log, deadline=started + args.budget)
        check.say(f"kiln gpu-check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, log {log_path}")
        rev = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
        )
        if rev.returncode == 0:
            check.say(f"commit {rev.stdout.strip()}")
        code = run_steps(check, args)
        summary(check, started)
        if code == NO_GPU_EXIT:
            check.say(
                "gpu-check: stopped: no NVIDIA GPU on this machine; the build for a GPU, the CUDA "
                "tests, compute-sanitizer and the CUDA benchmark need one (run it on a lent GPU "
                "machine, kernels/README.md)"
            )
        elif code == 0:
            check.say("gpu-check: all steps passed")
        else:
            failed = [s.name for s in check.steps if s.status not in ("ok",)]
            check.say(f"gpu-check: FAILED: {', '.join(failed)} (see {log_path})")
        return code


def run_steps(check: Check, args: argparse.Namespace) -> int:
    # 1. device
    step = check.step("device")
    t0 = time.monotonic()
    chosen = choose_python(check, need_cuda=False)
    python, info = chosen if chosen else (None, None)
    gpu = report_device(check, python, info) and not args.assume_no_gpu
    timed(step, t0)
    step.status = "ok" if gpu else "no GPU"
    if args.assume_no_gpu:
        step.note = "--assume-no-gpu"

    if not gpu:
        step = check.step("compile")
        t0 = time.monotonic()
        if args.skip_compile:
            step.status, step.note = "skipped", "--skip-compile"
        elif python is None:
            step.status, step.note = "FAILED", "no Python with torch and pytest found"
        elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            step.status, step.note = "skipped", "no nvcc (CUDA toolkit) on PATH"
        else:
            compile_check(check, python, step)
        timed(step, t0)
        return NO_GPU_EXIT if step.status != "FAILED" else 1

    # 2. python with a CUDA torch
    step = check.step("python")
    t0 = time.monotonic()
    chosen = choose_python(check, need_cuda=True)
    if chosen is None:
        check.say("no Python with a CUDA build of torch: creating build/venv-gpu from the pins")
        made = make_env(check)
        chosen = (made, probe_python(check, made) or {}) if made else None
    timed(step, t0)
    if chosen is None or not chosen[1].get("available"):
        step.status = "FAILED"
        step.note = "no CUDA torch: install one, or set KILN_GPU_PYTHON, or carry wheels in .whl/"
        return 1
    python, info = chosen
    step.status, step.note = "ok", f"{python}: torch {info.get('torch')} CUDA {info.get('cuda')}"

    # 3. build for this GPU
    step = check.step("build")
    t0 = time.monotonic()
    arch = str(info.get("capability", ""))
    env = {
        "TORCH_CUDA_ARCH_LIST": arch,
        "KILN_BUILD_CUDA": "1",
        "MAX_JOBS": str(os.cpu_count() or 2),
    }
    for old in (REPO / "kernels").glob("_C*.so"):
        old.unlink()  # a build for another torch or machine must not be the one loaded
    code, _ = check.run(
        [python, "setup.py", "build_ext", "--inplace"], 240, env=env, cwd=REPO / "kernels"
    )
    timed(step, t0)
    step.status, step.note = ("ok", f"sm_{arch.replace('.', '')}") if code == 0 else ("FAILED", "")
    if code != 0:
        return 1

    # 4. every CUDA test
    step = check.step("tests")
    t0 = time.monotonic()
    code, out = check.run(
        [
            python,
            "-m",
            "pytest",
            "tests/kernels/test_kernels_cuda.py",
            "tests/kernels/test_kernels_build.py",
            "--confcutdir=tests/kernels",
            "-p",
            "no:cacheprovider",
            "-k",
            "cuda",  # test_kernels_cuda.py whole, and the build file's CUDA compile tests
            "-q",
            "-rfEs",
        ],
        300,
        env={"KILN_REQUIRE_KERNELS": "1"},
    )
    timed(step, t0)
    last = [line for line in out.splitlines() if line.strip()]
    step.status, step.note = ("ok" if code == 0 else "FAILED"), (last[-1] if last else "")

    # 4b. serving on CUDA: decode graphs
    step = check.step("serving")
    t0 = time.monotonic()
    serving_tests(check, python, step)
    timed(step, t0)

    # 5. compute-sanitizer over a small run of every kernel path
    step = check.step("sanitizer")
    t0 = time.monotonic()
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path("/usr/local/cuda/bin/compute-sanitizer"),) if p.exists()),
        None,
    )
    if sanitizer is None:
        step.status, step.note = "skipped", "compute-sanitizer not found"
    else:
        results = []
        for tool in ("memcheck", "racecheck"):
            results.append(sanitize(check, sanitizer, tool, python))
        step.status = "ok" if all(results) else "FAILED"
        step.note = ", ".join(
            f"{t} {'clean' if ok else 'errors'}"
            for t, ok in zip(("memcheck", "racecheck"), results, strict=True)
        )
    timed(step, t0)

    # 6. benchmark
    step = check.step("bench")
    t0 = time.monotonic()
    if check.left() < 30:
        step.status, step.note = "skipped", "out of time"
    else:
        code, _ = check.run(
            [python, "-m", "kernels.bench", "--device", "cuda", "--budget", "0.05"],
            check.left() - 5,
        )
        step.status = "ok" if code == 0 else ("TIMEOUT" if code == 124 else "FAILED")
    timed(step, t0)
    return 0 if all(s.status == "ok" for s in check.steps) else 1


SERVING_PACKAGES = (
    "transformers", "safetensors", "tokenizers", "uvicorn", "starlette", "pydantic", "jinja2",
)  # fmt: skip
SERVING_BUDGET_S = 180.0


def serving_tests(check: Check, python: str, step: Step) -> None:
    """tests/inference/test_graphs.py's CUDA tests, when `python` has the server's packages."""
    probe = (
        "import importlib.util, json; print(json.dumps([n for n in "
        f"{list(SERVING_PACKAGES)!r} if importlib.util.find_spec(n) is None]))"
    )
    code, out = check.run([python, "-c", probe], 60)
    try:
        missing = json.loads(out.strip().splitlines()[-1]) if code == 0 else None
    except (json.JSONDecodeError, IndexError):
        missing = None
    if missing is None:
        step.status, step.note = "FAILED", "could not probe the Python's packages"
        return
    if missing:
        step.status = "skipped"
        step.note = f"{python} lacks {', '.join(missing)} (`make install-dev` installs them)"
        return
    budget = min(SERVING_BUDGET_S, check.left() - 60)
    if budget < 60:
        step.status, step.note = "skipped", "out of time"
        return
    code, out = check.run(
        [
            python,
            "-m",
            "pytest",
            "tests/inference/test_graphs.py",
            "--confcutdir=tests/inference",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfEs",
        ],
        budget,
        env={"KILN_REQUIRE_KERNELS": "1"},
    )
    last = [line for line in out.splitlines() if line.strip()]
    note = last[-1] if last else ""
    if code == 0 and "skipped" in note:
        code = 1  # on a GPU machine nothing here may be skipped
    step.status = "ok" if code == 0 else ("TIMEOUT" if code == 124 else "FAILED")
    step.note = note


def sanitize(check: Check, sanitizer: str, tool: str, python: str) -> bool:
    """One compute-sanitizer tool over kernels.gpu_sanitize, checking kiln's kernels only."""
    base = [sanitizer, "--tool", tool, "--error-exitcode", "1"]
    target = [python, "-m", "kernels.gpu_sanitize"]
    code, out = check.run([*base, "--kernel-name", "kns=kiln", *target], 150)
    if code != 0 and "kiln sanitize" not in out and "option" in out.lower():
        check.say("(this compute-sanitizer takes no --kernel-name filter: every kernel checked)")
        code, out = check.run([*base, *target], 150)
    return code == 0 and "kiln sanitize: ok" in out


if __name__ == "__main__":
    raise SystemExit(main())
