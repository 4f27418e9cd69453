"""Perplexity of checkpoints on held-out long documents, at a given sequence length.

    .venv/bin/python -m tools.eval_perplexity CKPT [CKPT ...] --seq-len 2048 [--docs 24] [--files GLOB ...]

Each CKPT is a megads step folder (a trainer checkpoint of any layout, or a `megads-convert
from-hf` folder); its model config (YaRN included) comes from its meta.json. The documents are
Python sources that are not part of the built-in training corpus (the standard library): by
default the `.py` files of the installed omegaconf, hydra and torch.distributed packages, sorted
by path, the first `--docs` of at least seq_len + 1 tokens under the built-in tokenizer
(`data.vocab_size`, as `tools.prepare_data` built it). Each document contributes its first
seq_len + 1 tokens: the mean next-token cross entropy over all of them (the LM head, no MTP)
and its exp, the perplexity. Used by docs/training.md ("Staged runs") to show that the context
extension stages lower the perplexity at the extended length.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import torch

DEFAULT_PACKAGES = ("omegaconf", "hydra", "torch.distributed")


def default_files() -> list[str]:
    import importlib

    files: list[str] = []
    for name in DEFAULT_PACKAGES:
        root = Path(importlib.import_module(name).__file__ or "").parent
        files += sorted(str(p) for p in root.rglob("*.py"))
    return files


def held_out_windows(files: list[str], *, seq_len: int, docs: int, vocab_size: int) -> torch.Tensor:
    """[docs, seq_len + 1] token windows: the start of each long enough document."""
    from megads.data.config import DataConfig
    from megads.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None, cfg=DataConfig(vocab_size=vocab_size))
    rows = []
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tok.encode_documents([text])[0]
        if len(ids) > seq_len:
            rows.append(torch.tensor(ids[: seq_len + 1]))
        if len(rows) == docs:
            break
    if len(rows) < docs:
        raise SystemExit(f"eval_perplexity: only {len(rows)} of the documents have {seq_len + 1} tokens; "
                         "lower --docs or --seq-len, or give --files")
    return torch.stack(rows)


@torch.no_grad()
def perplexity(ckpt: Path, windows: torch.Tensor, *, batch: int = 4) -> float:
    from megads.convert.checkpoint import load_model
    from megads.model.loss import cross_entropy

    model = load_model(ckpt).eval()
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1], with_mtp=False).logits
        total += float(cross_entropy(logits, w[:, 1:])) * w[:, 1:].numel()
        n += w[:, 1:].numel()
    return math.exp(total / n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--vocab-size", type=int, default=8192, help="the built-in tokenizer's size (data.vocab_size)")
    ap.add_argument("--files", nargs="*", default=None, help="glob patterns of the documents (default: see above)")
    args = ap.parse_args(argv)
    files = sorted(f for g in args.files for f in glob.glob(g, recursive=True)) if args.files else default_files()
    windows = held_out_windows(files, seq_len=args.seq_len, docs=args.docs, vocab_size=args.vocab_size)
    print(f"{windows.shape[0]} held-out documents, the first {args.seq_len} predicted tokens of each")
    print(f"| checkpoint | rope_scaling | trained seq_len | perplexity at {args.seq_len} |")
    print("|---|---|---|---|")
    for ckpt in args.checkpoints:
        meta = json.loads((ckpt / "meta.json").read_text())
        rs = meta.get("model", {}).get("rope_scaling")
        yarn = f"yarn s={rs['factor']:g} over {rs['original_max_position_embeddings']}" if rs else "none"
        trained = meta.get("seq_len", "?")
        print(f"| {ckpt} | {yarn} | {trained} | {perplexity(ckpt, windows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
