"""Prepare the tokenizer and token files of a data config (default: the built-in corpus).

    python -m tools.prepare_data [key=value ...]      # e.g. vocab_size=8192 cache_dir=/tmp/c

Trains the built-in byte-level BPE tokenizer on the Python standard library sources (unless
``tokenizer=`` names one), tokenizes every source with FIM into memory-mapped token files, and
prints a summary with where the files are. Everything is cached under ``cache_dir``: a second run
checks the cache and returns at once. ``make train`` runs this before training.
"""

from __future__ import annotations

import sys
import time

from megads.data.cli import config_from_overrides
from megads.data.preprocess import prepare


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        cfg = config_from_overrides(args)
        t0 = time.perf_counter()
        prepared = prepare(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tok = prepared.tokenizer
    reused = all(s.reused for s in prepared.summaries)
    print(
        ("reused the cached tokenizer and token files" if reused else "prepared tokenizer and token files")
        + f" in {time.perf_counter() - t0:.1f} s (cache: {cfg.cache_dir})"
    )
    print(
        f"tokenizer: {tok.path} (vocab_size {tok.vocab_size} incl. specials; eos {tok.eos_token_id}, "
        f"fim_begin/hole/end {tok.fim_begin_id}/{tok.fim_hole_id}/{tok.fim_end_id})"
    )
    for s, w in zip(prepared.summaries, prepared.weights):
        print(f"weight {w:g}:")
        for line in s.lines():
            print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
