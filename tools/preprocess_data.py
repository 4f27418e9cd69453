"""Tokenize one source into memory-mapped token files (``PREFIX.bin`` / ``PREFIX.idx``).

    python -m tools.preprocess_data --input PATH --tokenizer PATH --output-prefix PREFIX
        [--text-field text] [--workers 2] [--fim-rate 0.1] [--fim-spm-rate 0.0] [--seed 1234]

The same code path as ``prepare`` (used by the trainer), without the cache: FIM is applied per
document before tokenization, every document ends with EOS, and the files are published
atomically. Prints a progress bar with rate and ETA, then the summary (documents, tokens, skips by
reason with examples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megads.data.config import DataConfig, DataSourceConfig
from megads.data.preprocess import preprocess_source
from megads.data.sources import resolve_source
from megads.data.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or its folder")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fim-rate", type=float, default=0.1)
    ap.add_argument("--fim-spm-rate", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    try:
        src_cfg = DataSourceConfig(path=args.input, text_field=args.text_field, format=args.format)
        cfg = DataConfig(
            sources=[src_cfg], tokenizer=args.tokenizer, fim_rate=args.fim_rate, fim_spm_rate=args.fim_spm_rate,
            seed=args.seed, num_preprocess_workers=args.workers,
        )
        cfg.validate()
        tok = load_tokenizer(args.tokenizer)
        prefix = Path(args.output_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        summary = preprocess_source(
            resolve_source(src_cfg, index=0), tokenizer=tok, out_prefix=prefix, fim_rate=args.fim_rate,
            fim_spm_rate=args.fim_spm_rate, seed=args.seed, num_workers=args.workers,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
