"""Preprocessing: documents -> FIM -> token ids -> indexed token files, with a worker pool.

The parent reads documents (``data.sources``), groups them into chunks of about 512 KiB of text,
and hands chunks to ``num_workers`` spawned processes; each worker applies the seeded FIM decision
to every document, tokenizes all pieces of the chunk (special-token parsing off, single-threaded so
N workers use N cores; through tiktoken when it reproduces the tokenizer, see ``data.tokenizer``) and returns one numpy array of tokens plus
the document lengths. The parent writes completed chunks in submission order, so the output does
not depend on the number of workers. At most ``2 * num_workers`` chunks are in flight: memory
stays bounded for inputs larger than memory. Pieces longer than 1 Mi characters are split at
points where the GPT-2 byte-level pre-tokenizer provably splits anyway (a tab/newline after a
non-blank character), so a single 50 MB document costs bounded memory and the same tokens.

``prepare(cfg)`` is the cached, locked entry point used by the loader and ``tools.prepare_data``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from megads.data import fim
from megads.data.cache import atomic_write_text, build_lock, fingerprint, publish_folder, resolve_cache_dir
from megads.data.config import DataConfig
from megads.data.indexed import IndexedTokens, IndexedWriter, token_dtype
from megads.data.sources import RawDoc, ResolvedSource, builtin_source, iter_documents, resolve_source
from megads.data.tokenizer import MegadsTokenizer, load_tokenizer

DATASET_FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 19
CHUNK_DOCS = 512
SEGMENT_CHARS = 1 << 20
_EXAMPLES_PER_REASON = 5


@dataclass
class PreprocessSummary:
    source: str
    prefix: str
    documents: int = 0
    tokens: int = 0
    fim_documents: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    reused: bool = False

    def lines(self) -> list[str]:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        out = [
            f"source {self.source}: {self.documents} documents, {self.tokens} tokens "
            f"({self.fim_documents} FIM-transformed), {self.input_bytes / 1e6:.1f} MB input"
            + (" [reused cache]" if self.reused else f" in {self.seconds:.1f} s ({rate / 1e6:.2f} M tokens/s)"),
            f"  files: {self.prefix}.bin / .idx",
        ]
        total_skipped = sum(self.skipped.values())
        out.append(f"  skipped: {total_skipped}" + ("" if total_skipped else " (none)"))
        for reason, n in sorted(self.skipped.items()):
            ex = ", ".join(self.skipped_examples.get(reason, []))
            out.append(f"    {reason}: {n}  e.g. {ex}")
        return out


def _split_safe(text: str, *, limit: int) -> list[str]:
    """Split ``text`` before tab/newline characters that follow a non-blank one, ~``limit`` apart.

    The GPT-2 byte-level regex never joins such a whitespace character with the character before
    it, so tokenizing the parts separately yields exactly the tokens of the whole.
    """
    parts = []
    start = 0
    n = len(text)
    while n - start > limit:
        j = start + limit
        cut = -1
        while True:
            cand = [k for k in (text.find("\n", j), text.find("\t", j)) if k > 0]
            if not cand:
                break
            k = min(cand)
            if not text[k - 1].isspace():
                cut = k
                break
            j = k + 1
        if cut <= start:
            break
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(path: str, fast: bool) -> tuple[MegadsTokenizer, bool]:
    tok = load_tokenizer(path, fast=fast)
    return tok, tok.uses_gpt2_byte_level


def _init_worker() -> None:
    # one thread per worker: N workers use N cores, as in the Megatron-style peer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@dataclass(frozen=True)
class _ChunkJob:
    tokenizer_path: str
    fast: bool  # tiktoken fast path allowed (the parent's tokenizer uses it)
    texts: list[str]
    indices: list[int]  # record index of each text in its source (FIM key)
    key: int
    seed: int
    fim_rate: float
    spm_rate: float


def _encode_chunk(job: _ChunkJob) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]], int]:
    """Tokens (concatenated), per-document lengths, worker-side skips, FIM count."""
    tok, segmentable = _worker_tokenizer(job.tokenizer_path, job.fast)
    modes: list[str | None] = []
    spans: list[tuple[int, int]] = []  # per kept doc: range in `flat` of its pieces
    flat: list[str] = []
    piece_parts: list[int] = []  # number of segments of each piece
    skips: list[tuple[int, str]] = []
    for pos, (text, index) in enumerate(zip(job.texts, job.indices)):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from JSON escapes
                skips.append((pos, "invalid_utf8"))
                continue
        d = fim.decide(len(text), seed=job.seed, key=job.key, index=index, fim_rate=job.fim_rate, spm_rate=job.spm_rate)
        ps = fim.pieces(text, decision=d)
        spans.append((len(piece_parts), len(piece_parts) + len(ps)))
        for p in ps:
            segs = _split_safe(p, limit=SEGMENT_CHARS) if segmentable and len(p) > SEGMENT_CHARS else [p]
            piece_parts.append(len(segs))
            flat.extend(segs)
        modes.append(d.mode)
    dtype = token_dtype(tok.vocab_size)
    encoded = tok.encode_arrays(flat, dtype=dtype)
    piece_ids: list[np.ndarray] = []
    k = 0
    for n in piece_parts:
        piece_ids.append(encoded[k] if n == 1 else np.concatenate(encoded[k : k + n]))
        k += n
    specials = dict(eos=tok.eos_token_id, fb=tok.fim_begin_id, fh=tok.fim_hole_id, fe=tok.fim_end_id)
    parts: list = []
    lengths = np.zeros(len(modes), dtype=np.int64)
    for i, (mode, (a, b)) in enumerate(zip(modes, spans)):
        doc_parts = fim.layout(mode, piece_ids=piece_ids[a:b], **specials)
        lengths[i] = sum(len(p) for p in doc_parts)
        parts.extend(doc_parts)
    tokens = np.concatenate([np.asarray(p, dtype=dtype) for p in parts]) if parts else np.zeros(0, dtype)
    return tokens, lengths, skips, sum(m is not None for m in modes)


def _chunks(docs: Iterator[RawDoc], skipped: Callable[[RawDoc], None]) -> Iterator[tuple[list, list, list, int]]:
    texts: list[str] = []
    indices: list[int] = []
    refs: list[str] = []
    size = 0
    nbytes = 0
    for index, doc in enumerate(docs):
        if doc.text is None:
            skipped(doc)
            nbytes += doc.nbytes
            continue
        texts.append(doc.text)
        indices.append(index)
        refs.append(doc.ref)
        size += len(doc.text)
        nbytes += doc.nbytes
        if size >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
            yield texts, indices, refs, nbytes
            texts, indices, refs, size, nbytes = [], [], [], 0, 0
    if texts or nbytes:
        yield texts, indices, refs, nbytes


def preprocess_source(
    src: ResolvedSource,
    *,
    tokenizer: MegadsTokenizer,
    out_prefix: Path,
    fim_rate: float,
    fim_spm_rate: float,
    seed: int,
    num_workers: int,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize one source into ``out_prefix.{bin,idx}`` (written atomically); returns the summary."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    summary = PreprocessSummary(source=src.root, prefix=str(out_prefix))
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}

    def count_skip(reason: str, ref: str) -> None:
        skipped[reason] += 1
        ex = examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES_PER_REASON:
            ex.append(ref)

    key = fim.source_key(src.root)
    writer = IndexedWriter(out_prefix, vocab_size=tokenizer.vocab_size)
    bar = tqdm(total=src.total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {src.name}", disable=not progress)

    def job(texts: list[str], indices: list[int]) -> _ChunkJob:
        return _ChunkJob(tokenizer.path, tokenizer.encoder == "tiktoken", texts, indices, key, seed, fim_rate, fim_spm_rate)

    def consume(result, refs: list[str], nbytes: int) -> None:
        tokens, lengths, wskips, n_fim = result
        for pos, reason in wskips:
            count_skip(reason, refs[pos])
        writer.add(tokens, lengths=lengths)
        summary.documents += int(lengths.size)
        summary.tokens += int(tokens.size)
        summary.fim_documents += n_fim
        summary.input_bytes += nbytes
        bar.update(nbytes)
        bar.set_postfix(docs=summary.documents, tokens=summary.tokens, refresh=False)

    chunks = _chunks(iter_documents(src), lambda d: count_skip(d.skip, d.ref))
    try:
        if num_workers == 0:
            for texts, indices, refs, nbytes in chunks:
                consume(_encode_chunk(job(texts, indices)), refs, nbytes)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker) as pool:
                pending: deque = deque()
                for texts, indices, refs, nbytes in chunks:
                    pending.append((pool.submit(_encode_chunk, job(texts, indices)), refs, nbytes))
                    while len(pending) >= 2 * num_workers:
                        fut, r, nb = pending.popleft()
                        consume(fut.result(), r, nb)
                while pending:
                    fut, r, nb = pending.popleft()
                    consume(fut.result(), r, nb)
        writer.finalize()
        summary.input_bytes = max(summary.input_bytes, src.total_bytes)  # json overhead, skipped files
        bar.update(max(0, summary.input_bytes - bar.n))
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    summary.skipped = dict(skipped)
    summary.skipped_examples = examples
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class PreparedData:
    tokenizer: MegadsTokenizer
    prefixes: list[Path]
    weights: list[float]
    summaries: list[PreprocessSummary]


def _dataset_key(src: ResolvedSource, tok: MegadsTokenizer, cfg: DataConfig) -> str:
    return fingerprint(
        {
            "v": DATASET_FORMAT_VERSION,
            "source": src.description(),
            "tokenizer": tok.sha256,
            "encoder": tok.encoder,
            "fim_rate": cfg.fim_rate,
            "fim_spm_rate": cfg.fim_spm_rate,
            "seed": cfg.seed,
        }
    )


def prepare(cfg: DataConfig, *, progress: bool = True, announce: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer and token files for ``cfg``, built once (locked) and reused from ``cfg.cache_dir``."""
    cfg.validate()
    tok = load_tokenizer(cfg.tokenizer, cfg=cfg)
    if cfg.tokenizer is not None and cfg.vocab_size != tok.vocab_size:
        warnings.warn(
            f"data.vocab_size={cfg.vocab_size} is ignored: it only sizes the built-in tokenizer, and "
            f"data.tokenizer={cfg.tokenizer} has {tok.vocab_size} tokens",
            stacklevel=2,
        )
    if cfg.sources:
        resolved = [resolve_source(s, index=i) for i, s in enumerate(cfg.sources)]
        weights = [float(s.weight) for s in cfg.sources]
    else:
        resolved, weights = [builtin_source()], [1.0]
    root = resolve_cache_dir(cfg.cache_dir) / "datasets"
    prefixes, summaries = [], []
    for src in resolved:
        final = root / f"{src.name}-{_dataset_key(src, tok, cfg)}"
        prefix = final / "tokens"
        if not (final / "summary.json").is_file():
            with build_lock(final, announce=announce):
                if not (final / "summary.json").is_file():

                    def build(tmp: Path, src: ResolvedSource = src, final: Path = final) -> None:
                        s = preprocess_source(
                            src, tokenizer=tok, out_prefix=tmp / "tokens", fim_rate=cfg.fim_rate,
                            fim_spm_rate=cfg.fim_spm_rate, seed=cfg.seed,
                            num_workers=cfg.num_preprocess_workers, progress=progress,
                        )
                        s.prefix = str(final / "tokens")
                        atomic_write_text(tmp / "summary.json", text=json.dumps(asdict(s), indent=1))

                    publish_folder(build, final=final)
                    summary = PreprocessSummary(**json.loads((final / "summary.json").read_text()))
                    summaries.append(summary)
                    prefixes.append(prefix)
                    continue
        summary = PreprocessSummary(**json.loads((final / "summary.json").read_text()))
        summary.reused = True
        summaries.append(summary)
        prefixes.append(prefix)
    for p in prefixes:
        IndexedTokens(p)  # validates both files now, with a clear error, rather than mid-training
    return PreparedData(tok, prefixes, weights, summaries)
