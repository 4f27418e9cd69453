"""Helpers for the data tests and benchmarks: tiny tokenizers, synthetic documents and token files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from megads.data.indexed import IndexedWriter
from megads.data.tokenizer import train_bpe_tokenizer

_WORDS = ("def", "return", "self", "import", "for", "in", "if", "else", "x", "y", "value", "None", "(", ")", ":")


def synthetic_code(rng: random.Random, *, lines: int = 6) -> str:
    """A small code-like document (ASCII, indentation, newlines)."""
    out = []
    for _ in range(rng.randint(1, lines)):
        indent = " " * (4 * rng.randint(0, 2))
        out.append(indent + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 8))))
    return "\n".join(out) + "\n"


def tiny_tokenizer(out_dir: Path, *, vocab_size: int = 400, seed: int = 0) -> Path:
    """A byte-level BPE with the megads specials, trained on synthetic code; returns its folder."""
    rng = random.Random(seed)
    texts = [synthetic_code(rng) for _ in range(300)] + ["héllo wörld ünïcode ✓ 日本語\n"] * 5
    train_bpe_tokenizer(texts, vocab_size=vocab_size, out_dir=out_dir)
    return out_dir


def write_token_file(prefix: Path, *, docs: list[np.ndarray], vocab_size: int) -> Path:
    """Write documents (token arrays, each >= 1 token) as an indexed token file."""
    w = IndexedWriter(prefix, vocab_size=vocab_size)
    if docs:
        w.add(np.concatenate(docs), lengths=np.array([d.size for d in docs], dtype=np.int64))
    w.finalize()
    return prefix


def resumed_batches(
    cfg_dict: dict, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, state: dict, n: int
) -> list[dict[str, np.ndarray]]:
    """In a fresh process: rebuild the loader from a config, load ``state``, return ``n`` batches."""
    from omegaconf import OmegaConf

    from megads.data.config import DataConfig
    from megads.data.loader import build_train_loader

    cfg: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg_dict))  # type: ignore[assignment]
    loader = build_train_loader(
        cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, progress=False
    )
    loader.load_state_dict(state)
    out = [{k: v.numpy() for k, v in next(loader).items()} for _ in range(n)]
    loader.close()
    return out


def prepare_in_process(cfg_dict: dict) -> tuple[list[str], list[bool]]:
    """In a fresh process: ``prepare`` the config; returns (prefixes, reused flags)."""
    from omegaconf import OmegaConf

    from megads.data.config import DataConfig
    from megads.data.preprocess import prepare

    cfg: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg_dict))  # type: ignore[assignment]
    p = prepare(cfg, progress=False, announce=lambda _m: None)
    return [str(x) for x in p.prefixes], [s.reused for s in p.summaries]
