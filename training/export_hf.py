"""Copies a model directory for Hugging Face tooling: kiln's model directories are Hugging Face
ones now (`modeling.artifact`), so exporting is a copy and importing is pointing `--model-dir` at
the directory.

`python -m training.export_hf MODEL_DIR OUT_DIR` copies the model's files; a directory in kiln's
first format (`config.json` with `"format": "kiln-llama"`) is rewritten in the Hugging Face layout
instead (same weights and dtype, its training metadata in kiln.json). `--from-hf` is kept for the
scripts that used it: it checks that kiln loads the directory and copies it too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from modeling.artifact import (
    DTYPES,
    LEGACY_FORMAT,
    ArtifactError,
    load_model_dir,
    model_files,
    read_config,
    save_model_dir,
)
from modeling.tokenizer import ByteTokenizer

NOTE = (
    "note: kiln model directories are Hugging Face model directories: transformers, vLLM and "
    "LMI load them as they are, and kiln serves and fine-tunes Llama, Mistral and Qwen2 "
    "directories given with --model-dir; this command only copies"
)


def export(model_dir: str | Path, out_dir: str | Path) -> Path:
    """`out_dir` holding the model of `model_dir` in the Hugging Face layout."""
    src, out = Path(model_dir), Path(out_dir)
    _, info = read_config(src)  # refuses what kiln cannot load, naming the field
    if info["format"] == LEGACY_FORMAT:
        model, tok = load_model_dir(src, ops="reference")
        assert isinstance(tok, ByteTokenizer)  # kiln's first format had no other
        dtype = str(info["dtype"]) if info["dtype"] in DTYPES else "float32"
        return save_model_dir(model, tok, out, dtype=dtype, training=info["training"])
    out.mkdir(parents=True, exist_ok=True)
    for name in model_files(src):
        shutil.copyfile(src / name, out / name)
        (out / name).chmod(0o644)
    return out


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of a Hugging Face directory that kiln loads (checked by loading it)."""
    load_model_dir(hf_dir, ops="reference")
    return export(hf_dir, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_hf", description=__doc__)
    parser.add_argument("model_dir", help="a model directory (kiln's, or any Hugging Face one)")
    parser.add_argument("out_dir", help="where to write the copy")
    parser.add_argument(
        "--from-hf", action="store_true", help="check that kiln loads it, then copy (as before)"
    )
    args = parser.parse_args(argv)
    try:
        out = (
            import_hf(args.model_dir, args.out_dir)
            if args.from_hf
            else export(args.model_dir, args.out_dir)
        )
    except (ArtifactError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"export_hf: error: {err}", file=sys.stderr)
        return 2
    print(NOTE, file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
