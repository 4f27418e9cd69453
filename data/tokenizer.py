"""Tokenizers: load a Hugging Face tokenizer with its EOS/FIM ids, or train the byte-level BPE.

``load_tokenizer`` returns a ``MegadsTokenizer``: the ``tokenizers.Tokenizer`` (``backend``) plus
the ids of the four special tokens the pipeline needs. Our own tokenizers name them
``<|end_of_sentence|>``, ``<|fim_begin|>``, ``<|fim_hole|>`` and ``<|fim_end|>``; the DeepSeek-V3
spellings (``<｜end▁of▁sentence｜>``, ``<｜fim▁begin｜>`` ...) are accepted too, so the public
DeepSeek tokenizer loads as is. A tokenizer without the FIM tokens is refused with a message that
says how to add them.

Fast path: for a byte-level BPE with the GPT-2 split regex, no normaliser and merges whose
result ids grow with merge priority (what ``train_bpe_tokenizer`` writes, and GPT-2-style
tokenizers), the same vocabulary and merge ranks are handed to ``tiktoken``, a faster
implementation of the same algorithm (about 6x less CPU per token here). It is used only after it
reproduces the Hugging Face ids on a probe set, and documents are checked so that pathological
inputs (a run of 2000+ non-blank characters, where tiktoken's merge loop is quadratic) go to the
Hugging Face encoder. ``encoder`` says which one is active; it is part of the cache key.

Documents are encoded with ``encode_special_tokens=True`` so a source file that happens to contain
the text ``<|fim_begin|>`` is tokenized as text and can never forge a special token; the special ids
are inserted by the FIM/packing code only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megads.data.cache import build_lock, file_sha256, fingerprint, publish_folder, resolve_cache_dir
from megads.data.config import DataConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|end_of_sentence|>"
FIM_BEGIN = "<|fim_begin|>"
FIM_HOLE = "<|fim_hole|>"
FIM_END = "<|fim_end|>"
SPECIAL_TOKENS = (EOS, FIM_BEGIN, FIM_HOLE, FIM_END)
_ALIASES = {
    "eos": (EOS, "<｜end▁of▁sentence｜>"),
    "fim_begin": (FIM_BEGIN, "<｜fim▁begin｜>"),
    "fim_hole": (FIM_HOLE, "<｜fim▁hole｜>"),
    "fim_end": (FIM_END, "<｜fim▁end｜>"),
}
TOKENIZER_FORMAT_VERSION = 1
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LONG_RUN = re.compile(r"\S{2000}")
_PROBES = (
    "def f(x, y=2):\n    return x**2 + y  # comment\n\n\tclass A:  pass\r\n",
    "I'll say it's 12345 o'clock, they've 3.14e-10 'quotes' \"dq\"   \n\n\n   trailing   ",
    "naïve café 日本語のテキスト ✓ emoji 🚀🚀 Ünïcödé\u00a0nbsp\u2028sep {[(<|>)]} ~!@#$%^&*",
    "x" * 300 + " " + "1" * 50 + " ...... ,,,, ;;;;",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by the ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tiktoken_encoder(backend: Tokenizer) -> Callable[[str], list[int]] | None:
    """A tiktoken encoder equal to ``backend`` on byte-level BPE tokenizers, else None."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or spec.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space", False)
        or model.get("dropout") is not None
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("byte_fallback")
    ):
        return None
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    added = {t["content"] for t in spec.get("added_tokens", [])}
    vocab: dict[str, int] = model["vocab"]
    try:
        ranks = {bytes(u2b[ch] for ch in tok): i for tok, i in vocab.items() if tok not in added}
    except KeyError:
        return None
    if len(ranks) != len(vocab) - len(added & set(vocab)) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    last = -1
    for merge in model.get("merges", []):  # merge priority must equal rank order
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        rank = vocab.get(a + b)
        if rank is None or rank <= last:
            return None
        last = rank
    enc = tiktoken.Encoding("megads-bpe", pat_str=_GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
    reference = Tokenizer.from_str(backend.to_str())
    reference.encode_special_tokens = True
    for probe in _PROBES:
        if enc.encode_ordinary(probe) != reference.encode(probe, add_special_tokens=False).ids:
            return None
    return enc.encode_ordinary


@dataclass(frozen=True)
class MegadsTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids the pipeline needs.

    ``backend`` parses special tokens in its input (use it for prompts); ``encode_documents``
    never does. ``vocab_size`` counts added/special tokens. ``sha256`` fingerprints the file.
    """

    backend: Tokenizer
    path: str
    sha256: str
    vocab_size: int
    eos_token_id: int
    fim_begin_id: int
    fim_hole_id: int
    fim_end_id: int
    encoder: str  # "tiktoken" (fast path) or "hf"
    _plain: Tokenizer
    _fast: Callable[[str], list[int]] | None

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((self.eos_token_id, self.fim_begin_id, self.fim_hole_id, self.fim_end_id))

    @property
    def uses_gpt2_byte_level(self) -> bool:
        """True when the pre-tokenizer is exactly the GPT-2 regex byte-level split (safe to segment)."""
        spec = json.loads(self.backend.to_str()).get("pre_tokenizer") or {}
        return spec.get("type") == "ByteLevel" and spec.get("use_regex", True)

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special-token text encoded as plain text, no EOS added."""
        fast = self._fast
        if fast is None:
            return [enc.ids for enc in self._plain.encode_batch(list(texts), add_special_tokens=False)]
        out: list[list[int]] = []
        for text in texts:
            if len(text) >= 2000 and _LONG_RUN.search(text):
                out.append(self._plain.encode(text, add_special_tokens=False).ids)
            else:
                out.append(fast(text))
        return out

    def encode_arrays(self, texts: Sequence[str], *, dtype: np.dtype) -> list[np.ndarray]:
        """Like ``encode_documents`` but one numpy array per text, converted as it is encoded so
        that only one text's Python id list is alive at a time (bounded memory for huge inputs)."""
        fast = self._fast
        out = []
        for text in texts:
            if fast is not None and not (len(text) >= 2000 and _LONG_RUN.search(text)):
                ids = fast(text)
            else:
                ids = self._plain.encode(text, add_special_tokens=False).ids
            out.append(np.array(ids, dtype=dtype))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_transformers(self):  # -> transformers.PreTrainedTokenizerFast
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (EOS registered)."""
        from transformers import PreTrainedTokenizerFast

        eos = self.backend.id_to_token(self.eos_token_id)
        return PreTrainedTokenizerFast(tokenizer_object=self.backend, eos_token=eos)


def _tokenizer_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(
                f"tokenizer folder {path} has no tokenizer.json: point data.tokenizer at a "
                "tokenizers JSON file or a folder saved by save_pretrained (fast tokenizer)"
            )
    elif not p.is_file():
        raise ValueError(f"tokenizer {path} does not exist: fix data.tokenizer or set it to null")
    return p


def load_tokenizer(path: str | None, *, cfg: DataConfig | None = None, fast: bool = True) -> MegadsTokenizer:
    """Load ``path`` (tokenizer.json or its folder); None = the built-in tokenizer of ``cfg``.

    ``fast=False`` disables the tiktoken fast path (see the module docstring).
    """
    if path is None:
        path = str(ensure_builtin_tokenizer(cfg or DataConfig()))
    file = _tokenizer_file(path)
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust error says what is wrong in the JSON
        raise ValueError(f"tokenizer {file} could not be loaded ({err}); regenerate it") from err
    ids: dict[str, int] = {}
    missing = []
    for role, names in _ALIASES.items():
        found = [backend.token_to_id(n) for n in names if backend.token_to_id(n) is not None]
        if found:
            ids[role] = found[0]
        else:
            missing.append(names[0])
    if missing:
        raise ValueError(
            f"tokenizer {file} lacks the special tokens {', '.join(missing)} needed for FIM/EOS: "
            "train one with `python -m tools.train_tokenizer`, or add them as special tokens "
            "(tokenizer.add_special_tokens) and save it again"
        )
    plain = Tokenizer.from_str(backend.to_str())
    plain.encode_special_tokens = True
    fast_fn = _tiktoken_encoder(backend) if fast else None
    return MegadsTokenizer(
        backend=backend,
        path=str(file),
        sha256=file_sha256(file),
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        eos_token_id=ids["eos"],
        fim_begin_id=ids["fim_begin"],
        fim_hole_id=ids["fim_hole"],
        fim_end_id=ids["fim_end"],
        encoder="hf" if fast_fn is None else "tiktoken",
        _plain=plain,
        _fast=fast_fn,
    )


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int, out_dir: Path, length: int | None = None
) -> Path:
    """Train a byte-level BPE of ``vocab_size`` tokens (4 specials included) into ``out_dir``.

    Writes ``tokenizer.json`` plus the transformers files (``save_pretrained``) so the folder loads
    with ``AutoTokenizer`` as well. ``out_dir`` is written in place: callers publish it atomically.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 300 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(out_dir))
    return out_dir / "tokenizer.json"


def ensure_builtin_tokenizer(cfg: DataConfig, *, announce=print) -> Path:
    """Folder of the built-in tokenizer for ``cfg.vocab_size``; trains it once (locked, cached)."""
    from megads.data.sources import builtin_corpus_description, iter_builtin_texts

    desc = builtin_corpus_description()
    key = fingerprint({"v": TOKENIZER_FORMAT_VERSION, "corpus": desc, "vocab": cfg.vocab_size})
    final = resolve_cache_dir(cfg.cache_dir) / "tokenizers" / f"stdlib-bpe{cfg.vocab_size}-{key}"
    if (final / "tokenizer.json").is_file():
        return final
    with build_lock(final, announce=announce):
        if (final / "tokenizer.json").is_file():
            return final
        announce(
            f"training the built-in byte-level BPE tokenizer ({cfg.vocab_size} tokens) on "
            f"{desc['files']} stdlib files ..."
        )
        publish_folder(
            lambda tmp: train_bpe_tokenizer(
                iter_builtin_texts(), vocab_size=cfg.vocab_size, out_dir=tmp, length=desc["files"]
            ),
            final=final,
        )
    return final
