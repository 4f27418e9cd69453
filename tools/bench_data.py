"""Data pipeline benchmark: preprocessing vs the Megatron-LM way, loader vs nanoGPT's get_batch.

    python -m tools.bench_data [--workers 2] [--repeats 2] [--seq-len 4096] [--micro-batch-size 4]

1. Preprocessing throughput on the built-in corpus (Python stdlib sources, written once as JSON
   lines, Megatron's input format), same tokenizer (the built-in 8192-token BPE), same number of
   worker processes, measured side by side in this run:
   - peer "megatron": the loop of Megatron-LM's ``tools/preprocess_data.py``: a
     ``multiprocessing.Pool(workers)`` mapping ``json.loads`` + ``tokenizer.tokenize(text)`` over
     the lines one document at a time (``imap``, chunksize 32), ``tokenize`` being megatron-core's
     own HuggingFace tokenizer wrapper (``MegatronTokenizer``, ``include_special_tokens=True``, i.e.
     ``AutoTokenizer(text).input_ids``), EOD appended, written by megatron-core's
     ``IndexedDatasetBuilder.add_document`` / ``finalize``;
   - ours with FIM off (exactly the same job; the two token files are compared byte for byte),
     ours with FIM at 0.1 (the real job), and ours with FIM at 0.1 forced onto the Hugging Face
     encoder (``ours-hf``: what the pipeline gains without the tiktoken fast path).
   Best of ``--repeats`` runs each, interleaved; tokens/s and input MB/s and their ratios (wall
   clock), plus the CPU seconds of all processes of each run (robust on a shared machine).
2. Loader throughput on one core (``torch.set_num_threads(1)``, no prefetch thread): ours
   (per-epoch shuffle + packing from the memory map) vs nanoGPT's ``get_batch`` (random offsets
   into the memory map, ``torch.stack`` of ``int64`` windows), same seq_len and micro-batch size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np


class _MegatronEncoder:
    """Megatron-LM ``tools/preprocess_data.py`` ``Encoder``, reduced to one json key, no splitting."""

    tokenizer = None  # one per worker process, set by the pool initializer (as in Megatron)

    def __init__(self, tokenizer_dir: str) -> None:
        self.tokenizer_dir = tokenizer_dir

    def initializer(self) -> None:
        from megatron.core.tokenizers import MegatronTokenizer

        _MegatronEncoder.tokenizer = MegatronTokenizer.from_pretrained(
            tokenizer_path=self.tokenizer_dir, metadata_path={"library": "huggingface"}, include_special_tokens=True
        )

    def encode(self, json_line: str):
        data = json.loads(json_line)
        text = data["text"]
        doc_ids = list(_MegatronEncoder.tokenizer.tokenize(text))
        sentence_lens = [len(doc_ids)] if doc_ids else []
        if doc_ids:
            doc_ids.append(_MegatronEncoder.tokenizer.eod)
            sentence_lens[-1] += 1
        return doc_ids, sentence_lens, len(json_line)


def run_megatron(jsonl: Path, tokenizer_dir: str, prefix: Path, workers: int, vocab_size: int) -> tuple[float, int]:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    t0 = time.perf_counter()
    encoder = _MegatronEncoder(tokenizer_dir)
    n_tokens = 0
    with open(jsonl) as fin, multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer) as pool:
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
        for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
            if not doc:
                continue
            builder.add_document(doc, sentence_lens)
            n_tokens += len(doc)
        builder.finalize(f"{prefix}.idx")
    return time.perf_counter() - t0, n_tokens


def run_ours(jsonl: Path, tok, prefix: Path, workers: int, fim_rate: float) -> tuple[float, int]:
    from megads.data.config import DataSourceConfig
    from megads.data.preprocess import preprocess_source
    from megads.data.sources import resolve_source

    t0 = time.perf_counter()
    s = preprocess_source(
        resolve_source(DataSourceConfig(path=str(jsonl)), index=0), tokenizer=tok, out_prefix=prefix,
        fim_rate=fim_rate, fim_spm_rate=0.0, seed=1234, num_workers=workers, progress=False,
    )
    return time.perf_counter() - t0, s.tokens


def bench_preprocess(args, prepared) -> None:
    from megads.data.sources import builtin_source, iter_documents
    from megads.data.tokenizer import load_tokenizer

    tok = prepared.tokenizer
    hf_tok = load_tokenizer(tok.path, fast=False)  # our pipeline without the tiktoken fast path
    tok_dir = str(Path(tok.path).parent)
    with tempfile.TemporaryDirectory(prefix="megads-bench-") as tmp_s:
        tmp = Path(tmp_s)
        jsonl = tmp / "corpus.jsonl"
        n_docs = 0
        with open(jsonl, "w") as f:
            for d in iter_documents(builtin_source()):
                if d.text is not None:
                    f.write(json.dumps({"text": d.text}) + "\n")
                    n_docs += 1
        mb = jsonl.stat().st_size / 1e6
        print(f"corpus: {n_docs} documents, {mb:.1f} MB of JSON lines; {args.workers} workers; tokenizer {tok.path}")
        best: dict[str, tuple[float, int]] = {}
        for rep in range(args.repeats):
            for name, fn in (
                ("megatron", lambda p: run_megatron(jsonl, tok_dir, p, args.workers, tok.vocab_size)),
                ("ours fim=0", lambda p: run_ours(jsonl, tok, p, args.workers, 0.0)),
                ("ours fim=0.1", lambda p: run_ours(jsonl, tok, p, args.workers, 0.1)),
                ("ours-hf fim=0.1", lambda p: run_ours(jsonl, hf_tok, p, args.workers, 0.1)),
            ):
                prefix = tmp / name.replace(" ", "_").replace("=", "")
                c0 = os.times()
                secs, n_tok = fn(prefix)
                c1 = os.times()
                cpu = sum(getattr(c1, k) - getattr(c0, k) for k in ("user", "system", "children_user", "children_system"))
                print(
                    f"  run {rep + 1} {name:>15}: {secs:6.2f} s wall, {cpu:6.2f} s CPU (all processes), "
                    f"{n_tok} tokens, {n_tok / secs / 1e6:.3f} M tokens/s"
                )
                if name not in best or secs < best[name][0]:
                    best[name] = (secs, n_tok)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ref = IndexedDataset(str(tmp / "megatron"))
        ours = (tmp / "ours_fim0.bin").read_bytes()
        same = (tmp / "megatron.bin").read_bytes() == ours and len(ref) == n_docs
        print(f"  token files of 'megatron' and 'ours fim=0' identical: {same}")
        m_secs, m_tok = best["megatron"]
        print("preprocessing (best of runs):")
        for name, (secs, n_tok) in best.items():
            print(
                f"  {name:>15}: {n_tok / secs / 1e6:.3f} M tokens/s, {mb / secs:.2f} MB/s"
                f"  -> {(n_tok / secs) / (m_tok / m_secs):.2f}x megatron tokens/s, {m_secs / secs:.2f}x its MB/s"
            )


def bench_loader(args, prepared) -> None:
    import torch
    from megads.data.indexed import IndexedTokens
    from megads.data.loader import SourceStream, TrainLoader

    torch.set_num_threads(1)
    data = IndexedTokens(prepared.prefixes[0])
    S, B = args.seq_len + 1, args.micro_batch_size
    loader = TrainLoader(
        [SourceStream(data, seed=1234, source_index=0, window=S)], [1.0], seq_len=args.seq_len, micro_batch_size=B,
        dp_rank=0, dp_size=1, vocab_size=prepared.tokenizer.vocab_size, eos_token_id=prepared.tokenizer.eos_token_id,
        prefetch=0,
    )
    tokens = data.tokens
    rng = np.random.default_rng(0)

    def nanogpt_get_batch():
        ix = rng.integers(0, len(tokens) - S, size=B)
        x = torch.stack([torch.from_numpy(tokens[i : i + args.seq_len].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + args.seq_len].astype(np.int64)) for i in ix])
        return x, y

    def rate(fn) -> float:
        for _ in range(20):
            fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.loader_seconds:
            fn()
            n += 1
        return n * B * args.seq_len / (time.perf_counter() - t0)

    ours = rate(lambda: next(loader))
    peer = rate(nanogpt_get_batch)
    print(f"loader, one core, seq_len {args.seq_len}, micro-batch {B}, {data.n_tokens} tokens in the memory map:")
    print(f"  ours (shuffle + pack): {ours / 1e6:.1f} M tokens/s   nanoGPT get_batch: {peer / 1e6:.1f} M tokens/s"
          f"   -> {ours / peer:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--loader-seconds", type=float, default=4.0)
    ap.add_argument("--cache-dir", default=os.environ.get("MEGADS_CACHE", ".cache/megads"))
    ap.add_argument("--skip-preprocess", action="store_true")
    args = ap.parse_args(argv)
    from megads.data.config import DataConfig
    from megads.data.preprocess import prepare

    prepared = prepare(DataConfig(cache_dir=args.cache_dir), progress=False)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs")
    if not args.skip_preprocess:
        bench_preprocess(args, prepared)
    bench_loader(args, prepared)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
