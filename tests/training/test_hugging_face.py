"""What training writes is a Hugging Face model: AutoTokenizer, AutoModelForCausalLM and
pipeline("text-generation") load the directory and generate the same greedy text as kiln's
serving engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from inference.engine import EngineSettings, running_engine
from inference.sequence import SamplingParams
from tests.training.support import TINY, Run

transformers = pytest.importorskip("transformers")

PROMPTS = ["the kiln fires", "the potter shapes the clay on", "so every pot comes"]
NEW_TOKENS = 24


def test_transformers_generates_what_kiln_serves_from_a_trained_directory(
    corpus: Path, tmp_path: Path, run_trainer: Callable[..., Run]
) -> None:
    out = tmp_path / "out"
    # Enough steps that greedy text has words in it (~5 s).
    args = [*TINY, "--data", str(corpus), "--max-steps", "150", "--lr", "1e-2"]
    run = run_trainer([*args, "--output-dir", str(out)])
    assert run.returncode == 0, run.stderr
    model_dir = out / "model"

    with running_engine(model_dir, EngineSettings(max_batch=4, warmup=False)) as client:
        greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
        ours = [client.generate(p, greedy).text for p in PROMPTS]

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    for prompt, text in zip(PROMPTS, ours, strict=True):
        inputs = tokenizer(prompt, return_tensors="pt")
        assert inputs.input_ids[0, 0].item() == tokenizer.bos_token_id  # as kiln's prompt
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        new = generated[0, inputs.input_ids.shape[1] :]
        assert tokenizer.decode(new, skip_special_tokens=True) == text
        (result,) = pipe(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
        assert result["generated_text"] == text
    # Words, not one repeated byte: the comparison says something.
    assert len(set(ours)) == len(PROMPTS) and all(len(t.split()) > 2 for t in ours), ours
