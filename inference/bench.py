"""Serving benchmark: tokens/s and latency at several concurrencies vs transformers' generate().

`python -m inference.bench` trains a small model with the training code (a short run of
`training.train`, unless `--model-dir` names a trained one), starts the server on a loopback
port, drives it with a bounded load generator (a fixed number of requests per concurrency
level, each with the same max_new_tokens), then runs Hugging Face transformers'
`LlamaForCausalLM.generate()` on the same model directory (which transformers loads as is), one
prompt at a time, with the same thread count. It prints one markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kiln.contract import TrainerEnv

REPO = Path(__file__).resolve().parent.parent

# Code-like prompts (the default training corpus is the standard library's source).
PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n\n",
    "class Reader:\n    def __init__(self, path):\n        ",
    "    for line in lines:\n        if ",
    "# Copyright",
    "    return self.",
    '"""Utilities for',
    "    except ValueError:\n        ",
]


@dataclass
class Level:
    name: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def train_model(out: Path, steps: int, threads: int) -> Path:
    """A short run of the training entry point; returns its model directory."""
    cmd = [
        sys.executable, "-m", "training.train",
        "--model", "small",
        "--max-steps", str(steps),
        "--warmup-steps", str(max(1, steps // 10)),
        "--eval-every", "0",
        "--checkpoint-every", "0",
        "--threads", str(threads),
        "--output-dir", str(out),
        "--job-name", "bench",
    ]  # fmt: skip
    print(f"training: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), TrainerEnv.CHECKPOINT_DIR: str(out / "ckpt")}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return out / "model"


def post(port: int, prompt: str, max_new_tokens: int) -> tuple[float, int, str]:
    body = json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"server answered {response.status}: {data}")
    return time.perf_counter() - t0, data["usage"]["completion_tokens"], data["generated_text"]


def drive(port: int, concurrency: int, requests: int, max_new_tokens: int) -> Level:
    """`requests` requests, at most `concurrency` in flight, each client sending back to back."""
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        nonlocal tokens
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            latency, n, _ = post(port, PROMPTS[i % len(PROMPTS)], max_new_tokens)
            with lock:
                latencies.append(latency)
                tokens += n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    return Level(f"kiln, concurrency {concurrency}", concurrency, requests, tokens, wall, latencies)


def start_server(model_dir: Path, threads: int, max_batch: int, log: Path) -> tuple[Any, int]:
    cmd = [
        sys.executable, "-m", "inference.serve",
        "--model-dir", str(model_dir),
        "--host", "127.0.0.1", "--port", "0",
        "--threads", str(threads),
        "--max-batch", str(max_batch),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_EVENTS")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    handle = log.open("wb")
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=handle)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text()
        if "model loaded" in text and "running on http://127.0.0.1:" in text:
            port = int(text.split("running on http://127.0.0.1:")[1].split()[0])
            return process, port
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


class HFBaseline:
    """transformers' LlamaForCausalLM.generate() on the exported weights, one prompt at a time."""

    def __init__(self, hf_dir: Path, threads: int) -> None:
        import torch
        from transformers import LlamaForCausalLM

        from modeling.tokenizer import ByteTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = ByteTokenizer()
        self.model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
        self.generate(PROMPTS[0], 4)  # warm-up

    def generate(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = self.torch.tensor([self.tok.encode(prompt, add_bos=True)])
        with self.torch.inference_mode():
            out = self.model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_id,
                eos_token_id=self.tok.eos_id,
            )
        return [int(t) for t in out[0, ids.shape[1] :]]

    def run(self, prompts: list[str], max_new_tokens: int) -> tuple[Level, list[str]]:
        latencies, texts, tokens = [], [], 0
        t_all = time.perf_counter()
        for prompt in prompts:
            t0 = time.perf_counter()
            new = self.generate(prompt, max_new_tokens)
            latencies.append(time.perf_counter() - t0)
            tokens += len(new)
            texts.append(self.tok.decode(new))
        wall = time.perf_counter() - t_all
        name = "transformers generate(), batch 1"
        return Level(name, 1, len(prompts), tokens, wall, latencies), texts


@dataclass
class Summary:
    """One row of the table: a run's rounds, their best and median tokens/s, all latencies."""

    name: str
    concurrency: int
    rounds: list[Level]

    @property
    def best(self) -> float:
        return max(level.tokens_per_s for level in self.rounds)

    @property
    def median(self) -> float:
        return statistics.median(level.tokens_per_s for level in self.rounds)

    def percentile(self, q: float) -> float:
        latencies = sorted(x for level in self.rounds for x in level.latencies)
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.bench", description=__doc__)
    p.add_argument("--model-dir", help="a trained kiln model directory (default: train one)")
    p.add_argument("--train-steps", type=int, default=60, help="steps of the training run")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--hf-prompts", type=int, default=4, help="prompts for the baseline")
    p.add_argument("--threads", type=int, default=1, help="torch threads, ours and the baseline")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        model_dir = train_model(work / "run", args.train_steps, args.threads)
    sys.path.insert(0, str(REPO))
    from training.export_hf import export

    hf_dir = export(model_dir, work / "hf")
    load_before = os.getloadavg()

    baseline_runner = HFBaseline(hf_dir, args.threads)
    hf_prompts = PROMPTS[: args.hf_prompts]
    process, port = start_server(model_dir, args.threads, max(levels), work / "server.log")
    # Rounds interleave the baseline and every level, so a burst of other work on a shared
    # machine hits them alike; each row reports its median round.
    baseline_runs: list[Level] = []
    runs: dict[int, list[Level]] = {c: [] for c in levels}
    try:
        post(port, PROMPTS[0], 8)  # warm the HTTP path
        bar = tqdm(total=args.rounds * (1 + len(levels)), desc="rounds x (baseline + levels)")
        for _ in range(args.rounds):
            level, hf_texts = baseline_runner.run(hf_prompts, args.max_new_tokens)
            baseline_runs.append(level)
            bar.update()
            for c in levels:
                requests = max(len(hf_prompts), c * args.requests_per_client)
                runs[c].append(drive(port, c, requests, args.max_new_tokens))
                bar.update()
        bar.close()
        kiln_texts = [post(port, prompt, args.max_new_tokens)[2] for prompt in hf_prompts]
    finally:
        process.terminate()
        process.wait(60)
    load_after = os.getloadavg()
    baseline = Summary(baseline_runs[0].name, 1, baseline_runs)
    ours = {c: Summary(runs[c][0].name, c, runs[c]) for c in levels}

    one = ours[levels[0]] if levels[0] == 1 else None
    print(
        f"\nmodel: {model_dir} (small preset); max_new_tokens {args.max_new_tokens}, greedy; "
        f"{args.threads} torch thread(s); loopback HTTP for kiln, in-process for transformers"
    )
    print(f"1-minute load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs; {args.rounds} interleaved rounds, best and median round; "
          "latency percentiles over all rounds' requests")  # fmt: skip
    print(
        "\n| run | requests/round | tokens/s best | tokens/s median | p50 latency s "
        "| p99 latency s | ratio best | ratio median |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in [baseline, *ours.values()]:
        if row is baseline:
            ratios = ("1.00x (baseline)", "1.00x (baseline)")
        elif row.concurrency == 1:
            ratios = (
                f"{row.best / baseline.best:.2f}x transformers",
                f"{row.median / baseline.median:.2f}x transformers",
            )
        elif one is not None:
            ratios = (f"{row.best / one.best:.2f}x kiln c=1", f"{row.median / one.median:.2f}x")
        else:
            ratios = ("", "")
        print(
            f"| {row.name} | {row.rounds[0].requests} | {row.best:.1f} | {row.median:.1f} | "
            f"{row.percentile(0.5):.3f} | {row.percentile(0.99):.3f} | {ratios[0]} | {ratios[1]} |"
        )
    same = sum(a == b for a, b in zip(kiln_texts, hf_texts, strict=True))
    print(
        f"\ngreedy text identical to transformers' for {same} of {len(hf_texts)} prompts "
        "(both in float32)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
