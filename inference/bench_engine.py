"""Engine latency scenarios: time to first token with a cached prompt prefix, and running streams'
inter-token latency while a long prompt is prefilled in chunks.

`python -m inference.bench_engine --scenario prefix|chunked|all` builds a random-weight model of a
kiln preset, or of a released model's shape (`--shape smollm2-360m`, as `inference.bench` builds
it, with `--weight-dtype int8`: a model whose decode step is bound by reading its weights), or
takes `--model-dir`, drives the engine in-process (no HTTP: these are the
engine's own latencies) and prints a markdown table. Each figure is compared within one run:

- prefix: for each trial, a fresh 1,024-token prefix; a request of prefix + question A (cold:
  nothing cached), then prefix + question B (its prefix blocks cached). Median TTFT of each, and
  the same second request with the prefix cache off, so the ratio is not a warm-up effect.
- chunked: `--streams` greedy streams decoding; once they run, a 2,048-token prompt arrives.
  The streams' median inter-token gap before it arrived (their pace) and their p99 gap from its
  arrival to its first token, for each prefill chunk of `--chunks` (one as long as the prompt
  is the prefill in one piece).

The functions `prefix_ttft` and `chunked_itl` return the figures for other benchmarks to print.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from inference.bench import DEFAULT_CACHE, SHAPES, build_shape
from inference.engine import Engine, EngineSettings
from inference.sequence import SamplingParams, Sequence, Update
from inference.threads import available_cpus
from modeling.artifact import save_model_dir
from modeling.config import PRESETS
from modeling.model import LlamaModel
from modeling.served import WEIGHT_DTYPES
from modeling.tokenizer import ByteTokenizer

WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "on", "by"]


def random_text(chars: int, seed: int) -> str:
    """Printable text of exactly `chars` bytes (one token each for the byte tokenizer)."""
    rng = random.Random(seed)
    out = ""
    while len(out) < chars:
        out += rng.choice(WORDS) + " "
    return out[:chars]


def build_model(directory: Path, preset: str, max_seq_len: int, seed: int = 0) -> Path:
    """A random-weight model of a kiln preset with the byte tokenizer (1 byte, 1 token)."""
    cfg = replace(PRESETS[preset], max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    return save_model_dir(LlamaModel(cfg, ops="reference"), ByteTokenizer(), directory)


class Recorder:
    """The engine's notify: when each sequence's tokens and end arrived."""

    def __init__(self) -> None:
        self.times: dict[Sequence, list[float]] = {}
        self.done: dict[Sequence, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, updates: list[Update]) -> None:
        now = time.monotonic()
        with self._lock:
            for u in updates:
                if u.token is not None:
                    self.times.setdefault(u.sequence, []).append(now)
                if u.finish is not None and u.sequence in self.done:
                    self.done[u.sequence].set()

    def submit(self, engine: Engine, prompt: str, params: SamplingParams) -> Sequence:
        seq = Sequence(
            prompt=engine.encode_prompt(prompt),
            params=params,
            deadline=time.monotonic() + 600,
            stream=True,
        )
        with self._lock:
            self.done[seq] = threading.Event()
        engine.submit(seq)
        return seq

    def wait(self, seq: Sequence, timeout: float = 600) -> Sequence:
        if not self.done[seq].wait(timeout):
            raise TimeoutError(f"request {seq.id} did not finish in {timeout} s")
        return seq


def _engine(model_dir: Path, settings: EngineSettings) -> tuple[Engine, Recorder]:
    engine = Engine(model_dir, settings)
    recorder = Recorder()
    engine.load()
    engine.start(recorder)
    return engine, recorder


@dataclass
class PrefixResult:
    prefix_tokens: int
    cold_ttft_s: float  # median, prefix not cached
    warm_ttft_s: float  # median, prefix cached
    uncached_ttft_s: float  # median, the warm request again with the prefix cache off
    cached_tokens: int  # prompt tokens the warm request took from the cache (last trial)

    @property
    def speedup(self) -> float:
        return self.cold_ttft_s / self.warm_ttft_s


def _ttft(recorder: Recorder, engine: Engine, prompt: str) -> tuple[float, Sequence]:
    started = time.monotonic()
    seq = recorder.wait(recorder.submit(engine, prompt, SamplingParams(max_new_tokens=2)))
    assert seq.first_token_at is not None
    return seq.first_token_at - started, seq


def prefix_ttft(
    model_dir: Path, settings: EngineSettings, prefix_tokens: int = 1024, trials: int = 5
) -> PrefixResult:
    """TTFT of prefix + question with the prefix cached vs cold (see the module docstring)."""
    cold, warm, uncached = [], [], []
    cached = 0
    prefixes = [random_text(prefix_tokens - 1, seed=100 + i) for i in range(trials)]  # + BOS
    engine, recorder = _engine(model_dir, settings)
    try:
        _ttft(recorder, engine, random_text(prefix_tokens, seed=1))  # warm-up
        for prefix in prefixes:
            cold.append(_ttft(recorder, engine, prefix + " What is A?")[0])
            took, seq = _ttft(recorder, engine, prefix + " Where is B?")
            warm.append(took)
            cached = seq.cached_tokens
    finally:
        engine.stop()
    engine, recorder = _engine(model_dir, replace(settings, prefix_cache=False))
    try:
        _ttft(recorder, engine, random_text(prefix_tokens, seed=1))
        for prefix in prefixes:
            _ttft(recorder, engine, prefix + " What is A?")
            uncached.append(_ttft(recorder, engine, prefix + " Where is B?")[0])
    finally:
        engine.stop()
    return PrefixResult(
        prefix_tokens,
        statistics.median(cold),
        statistics.median(warm),
        statistics.median(uncached),
        cached,
    )


@dataclass
class ChunkedResult:
    prefill_chunk: int
    prompt_tokens: int
    streams: int
    gaps: int  # inter-token gaps during the long prompt's prefill
    median_s: float  # the streams' median gap before it arrived
    median_during_s: float  # their median gap during its prefill
    p99_s: float  # their p99 gap during its prefill
    ttft_s: float  # the long prompt's

    @property
    def ratio(self) -> float:
        return self.p99_s / self.median_s


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def chunked_itl(
    model_dir: Path, settings: EngineSettings, prompt_tokens: int = 2048, streams: int = 4
) -> ChunkedResult:
    """The streams' inter-token gaps while a long prompt is prefilled (module docstring)."""
    engine, recorder = _engine(model_dir, settings)
    try:
        _ttft(recorder, engine, random_text(prompt_tokens, seed=2))  # warm-up, not cached again
        running = [
            recorder.submit(engine, random_text(16, seed=10 + i), SamplingParams(100_000))
            for i in range(streams)
        ]
        while min(len(recorder.times.get(s, [])) for s in running) < 40:
            time.sleep(0.01)
        arrived = time.monotonic()
        long = recorder.submit(engine, random_text(prompt_tokens - 1, seed=3), SamplingParams(1))
        recorder.wait(long)
        assert long.first_token_at is not None
        # Gaps of each stream that end after the long prompt arrived, until its first token
        # (and the one gap that straddles it: a one-piece prefill stalls exactly there).
        gaps: list[float] = []
        pace: list[float] = []
        for seq in running:
            for a, b in itertools.pairwise(recorder.times[seq]):
                if b > arrived and a < long.first_token_at:
                    gaps.append(b - a)
                elif b <= arrived:
                    pace.append(b - a)
        for seq in running:
            engine.cancel(seq)
    finally:
        engine.stop()
    return ChunkedResult(
        settings.prefill_chunk,
        prompt_tokens,
        streams,
        len(gaps),
        statistics.median(pace),
        statistics.median(gaps),
        _percentile(gaps, 0.99),
        long.first_token_at - arrived,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=["prefix", "chunked", "all"], default="all")
    p.add_argument("--model-dir", type=Path, help="a model directory (default: build one)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), help="a released model's shape, not a kiln preset"
    )
    p.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="auto")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--prefill-chunk", type=int, default=256, help="for the prefix scenario")
    p.add_argument("--chunks", default="64,256,2048", help="prefill chunks, chunked scenario")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args(argv)
    settings = EngineSettings(
        max_batch=8,
        threads=args.threads,
        prefill_chunk=args.prefill_chunk,
        max_seq_len=4096,
        kv_cache_gib=args.kv_cache_gib,
        weight_dtype=args.weight_dtype,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            model_dir, name = args.model_dir, str(args.model_dir)
        elif args.shape:
            model_dir, name = build_shape(args.shape, DEFAULT_CACHE), f"{args.shape} shape"
        else:
            model_dir, name = build_model(Path(tmp) / "model", args.preset, 4096), args.preset
        print(f"model: {name}, weights {args.weight_dtype}, threads {args.threads}")
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        if args.scenario in ("prefix", "all"):
            r = prefix_ttft(model_dir, settings, trials=args.trials)
            trials = args.trials
            print(
                f"\n### Prefix reuse: TTFT, {r.prefix_tokens}-token prefix (median of {trials})\n"
            )
            print("| request | TTFT ms | vs cold |")
            print("|---|---:|---:|")
            print(f"| cold (prefix not cached) | {r.cold_ttft_s * 1e3:.1f} | 1.00x |")
            print(
                f"| prefix cached ({r.cached_tokens} tokens reused) | {r.warm_ttft_s * 1e3:.1f} "
                f"| {r.speedup:.1f}x faster |"
            )
            print(
                f"| same, prefix cache off | {r.uncached_ttft_s * 1e3:.1f} | "
                f"{r.cold_ttft_s / r.uncached_ttft_s:.1f}x |"
            )
        if args.scenario in ("chunked", "all"):
            rows = []
            for c in args.chunks.split(","):
                r = chunked_itl(
                    model_dir, replace(settings, prefill_chunk=int(c)), streams=args.streams
                )
                print(
                    f"prefill chunk {c}: p99 gap {r.p99_s * 1e3:.1f} ms, median before "
                    f"{r.median_s * 1e3:.1f} ms (load average {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(r)
            print(
                f"\n### {args.streams} streams' inter-token latency during a "
                f"{rows[0].prompt_tokens}-token prefill\n"
            )
            print(
                "| prefill chunk | gaps during | median gap before, ms | median gap during, ms "
                "| p99 gap during, ms | p99 during / median before | long prompt TTFT ms |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                print(
                    f"| {r.prefill_chunk} | {r.gaps} | {r.median_s * 1e3:.1f} | "
                    f"{r.median_during_s * 1e3:.1f} | "
                    f"{r.p99_s * 1e3:.1f} | {r.ratio:.2f} | {r.ttft_s * 1e3:.0f} |"
                )
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
