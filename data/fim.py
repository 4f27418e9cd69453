"""Fill-in-the-middle at document level, before tokenization and packing.

A document is transformed with probability ``fim_rate``. Two cut points are drawn uniformly over
the character positions ``0..len(text)`` and sorted, giving ``prefix | middle | suffix``. Orders
(FB/FH/FE = ``<|fim_begin|>``/``<|fim_hole|>``/``<|fim_end|>``):

- PSM (default): ``FB prefix FH suffix FE middle EOS``  (DeepSeek-V3's layout)
- SPM (with probability ``fim_spm_rate`` among FIM documents, the "SPM variant" of Bavarian et al.
  2022 also used by StarCoder): ``FB FH suffix FE prefix middle EOS``

Every document ends with EOS whether transformed or not. Decisions come from a keyed hash of
``(seed, source key, document index)``: the same document of the same run always gets the same
transform, independently of worker count or chunking. Each piece is tokenized on its own, so the
special tokens sit on piece boundaries and decoding the pieces gives the original text back.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

PSM = "psm"
SPM = "spm"
_U53 = 1.0 / (1 << 53)


@dataclass(frozen=True)
class FimDecision:
    mode: str | None  # None (plain), "psm" or "spm"
    cut_a: int  # prefix = text[:cut_a]
    cut_b: int  # middle = text[cut_a:cut_b], suffix = text[cut_b:]


def source_key(name: str) -> int:
    """A 64-bit key for a source (its absolute path), part of every FIM decision's seed."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _uniforms(seed: int, key: int, index: int) -> tuple[float, float, float, float]:
    digest = hashlib.blake2b(
        struct.pack("<qQQ", seed, key & (2**64 - 1), index), digest_size=32, person=b"megads-fim"
    ).digest()
    words = struct.unpack("<4Q", digest)
    return tuple((w >> 11) * _U53 for w in words)  # type: ignore[return-value]


def decide(n_chars: int, *, seed: int, key: int, index: int, fim_rate: float, spm_rate: float) -> FimDecision:
    """The seeded FIM decision for document ``index`` of source ``key`` (``n_chars`` long)."""
    u_apply, u_spm, u_a, u_b = _uniforms(seed, key, index)
    if not u_apply < fim_rate:
        return FimDecision(None, 0, 0)
    a = min(int(u_a * (n_chars + 1)), n_chars)
    b = min(int(u_b * (n_chars + 1)), n_chars)
    a, b = min(a, b), max(a, b)
    return FimDecision(SPM if u_spm < spm_rate else PSM, a, b)


def pieces(text: str, *, decision: FimDecision) -> tuple[str, ...]:
    """Texts to tokenize, in output order (see ``assemble``)."""
    d = decision
    if d.mode is None:
        return (text,)
    pre, mid, suf = text[: d.cut_a], text[d.cut_a : d.cut_b], text[d.cut_b :]
    return (pre, suf, mid) if d.mode == PSM else (suf, pre, mid)


def layout(mode: str | None, *, piece_ids: list, eos: int, fb: int, fh: int, fe: int) -> list:
    """Parts of a document in output order: the tokenized pieces (order from ``pieces``) and the
    special ids as one-element lists. Works for lists and numpy arrays alike."""
    if mode is None:
        return [piece_ids[0], [eos]]
    if mode == PSM:
        pre, suf, mid = piece_ids
        return [[fb], pre, [fh], suf, [fe], mid, [eos]]
    suf, pre, mid = piece_ids
    return [[fb, fh], suf, [fe], pre, mid, [eos]]


def assemble(mode: str | None, *, piece_ids: list[list[int]], eos: int, fb: int, fh: int, fe: int) -> list[int]:
    """Token ids of a document from its tokenized pieces (order from ``pieces``)."""
    return [t for part in layout(mode, piece_ids=piece_ids, eos=eos, fb=fb, fh=fh, fe=fe) for t in part]


def render(text: str, *, decision: FimDecision, eos: str, fb: str, fh: str, fe: str) -> str:
    """The transformed document as text (for inspection and tests)."""
    d = decision
    if d.mode is None:
        return text + eos
    pre, mid, suf = text[: d.cut_a], text[d.cut_a : d.cut_b], text[d.cut_b :]
    if d.mode == PSM:
        return f"{fb}{pre}{fh}{suf}{fe}{mid}{eos}"
    return f"{fb}{fh}{suf}{fe}{pre}{mid}{eos}"


def undo_text(rendered: str, *, eos: str, fb: str, fh: str, fe: str) -> str:
    """Inverse of ``render`` for documents that do not themselves contain the marker texts."""
    if not rendered.endswith(eos):
        raise ValueError("not a rendered document: it does not end with EOS")
    body = rendered[: -len(eos)]
    if not body.startswith(fb):
        return body
    if body.startswith(fb + fh):  # SPM: suffix FE prefix+middle
        suf, _, pre_mid = body[len(fb + fh) :].partition(fe)
        return pre_mid + suf
    pre, _, rest = body[len(fb) :].partition(fh)
    suf, _, mid = rest.partition(fe)
    return pre + mid + suf


def undo_tokens(ids: list[int], *, decode: Callable[[list[int]], str], eos: int, fb: int, fh: int, fe: int) -> str:
    """Original text of one tokenized document (ids ending with EOS); ``decode`` maps ids to text.

    Special ids only occur where ``assemble`` put them (documents are encoded with special-token
    parsing off), so the split is unambiguous.
    """
    if not ids or ids[-1] != eos:
        raise ValueError("a tokenized document must end with EOS")
    body = ids[:-1]
    if not body or body[0] != fb:
        return decode(body)
    if len(body) > 1 and body[1] == fh:
        j = body.index(fe)
        return decode(body[j + 1 :]) + decode(body[2:j])
    i = body.index(fh)
    j = body.index(fe)
    return decode(body[1:i]) + decode(body[j + 1 :]) + decode(body[i + 1 : j])
