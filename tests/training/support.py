"""Helpers of the trainer's tests: a small synthetic corpus, run results, saved weights."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

# A tiny model and batch: one step takes milliseconds on one thread.
TINY = [
    "--model", "tiny",
    "--seq-len", "32",
    "--micro-batch-size", "4",
    "--threads", "1",
    "--segment-bytes", "2048",
    "--window-bytes", "8192",
    "--val-fraction", "0.1",
    "--val-blocks", "8",
    "--warmup-steps", "2",
    "--log-every", "1",
    "--eval-every", "0",
    "--checkpoint-every", "0",
]  # fmt: skip

SENTENCE = (
    "the kiln fires clay into pots and the potter shapes the clay on a wheel while the "
    "fire burns hot and slow so every pot comes out hard and bright"
)
WORDS = SENTENCE.split()


def write_corpus(root: Path, files: int = 12, sentences: int = 150, seed: int = 0) -> Path:
    """Deterministic text that a tiny model learns within a few dozen steps."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = []
        for _ in range(sentences):
            start = rng.randrange(len(WORDS) - 8)
            lines.append(" ".join(WORDS[start : start + rng.randint(4, 8)]) + ".")
        (root / f"shard-{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root


@dataclass
class Run:
    returncode: int
    events: list[dict[str, object]]
    stderr: str

    def of(self, event: str) -> list[dict[str, object]]:
        return [e for e in self.events if e["event"] == event]

    def losses(self) -> dict[int, float]:
        return {int(e["step"]): float(e["train_loss"]) for e in self.of("train")}  # type: ignore[arg-type]


def parse_events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))
