"""Train a byte-level BPE tokenizer with the EOS and FIM special tokens.

    python -m tools.train_tokenizer --out DIR [--vocab-size 8192] [--input PATH ...] [--text-field text]

Without ``--input`` it trains on the built-in corpus (Python standard library sources). Inputs use
the same readers as the data pipeline (jsonl/json/parquet/text files, folders, saved datasets).
The special tokens ``<|end_of_sentence|>``, ``<|fim_begin|>``, ``<|fim_hole|>``, ``<|fim_end|>``
are registered as single tokens; ``vocab-size`` counts them. The folder (``tokenizer.json`` plus
transformers files) is written atomically and loads with ``data.tokenizer.load_tokenizer`` or
``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megads.data.cache import publish_folder
from megads.data.config import DataSourceConfig
from megads.data.sources import builtin_source, iter_documents, resolve_source
from megads.data.tokenizer import load_tokenizer, train_bpe_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--input", action="append", default=[], help="file or folder (repeatable)")
    ap.add_argument("--text-field", default="text")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists():
            raise ValueError(f"--out {out} exists: choose a new folder or delete it")
        srcs = (
            [resolve_source(DataSourceConfig(path=p, text_field=args.text_field), index=i) for i, p in enumerate(args.input)]
            if args.input
            else [builtin_source()]
        )
        texts = (d.text for s in srcs for d in iter_documents(s) if d.text is not None)
        publish_folder(lambda tmp: train_bpe_tokenizer(texts, vocab_size=args.vocab_size, out_dir=tmp), final=out)
        tok = load_tokenizer(str(out))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}/tokenizer.json: vocab_size {tok.vocab_size}, eos {tok.eos_token_id}, "
        f"fim_begin/hole/end {tok.fim_begin_id}/{tok.fim_hole_id}/{tok.fim_end_id}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
