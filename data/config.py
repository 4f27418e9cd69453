"""Configuration of the data pipeline (Hydra group ``data``).

``DataConfig`` is all the data pipeline receives: the sources to blend, the tokenizer, the FIM
settings, the cache folder and the loader options. ``validate()`` raises ``ValueError`` naming the
field and what to change; every entry point calls it first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCE_FORMATS = ("auto", "text", "jsonl", "json", "parquet", "saved")


@dataclass
class DataSourceConfig:
    """One input source.

    ``path``: a file or a folder. Files are read by extension (``.jsonl``/``.json`` through
    ``datasets``' json builder, ``.parquet`` through its parquet builder, anything else as one plain
    text document per file); a folder written by ``Dataset.save_to_disk`` is loaded with
    ``load_from_disk``; any other folder is walked recursively (hidden entries skipped).
    ``weight``: relative share of the packed windows drawn from this source.
    ``text_field``: the record field holding the document (json, parquet, saved datasets).
    ``format``: force a reader instead of guessing from the extension.
    ``glob``: for folders, which files to take (``pathlib`` glob, e.g. ``**/*.py``).
    """

    path: str = ""
    weight: float = 1.0
    text_field: str = "text"
    format: str = "auto"
    glob: str = "**/*"


@dataclass
class DataConfig:
    """Everything the data pipeline needs; see docs/data.md.

    ``sources`` empty means the built-in corpus (the Python standard library sources of the running
    interpreter); ``tokenizer`` None means the built-in byte-level BPE tokenizer of ``vocab_size``
    tokens (specials included) trained on that corpus. ``cache_dir`` is relative to the current
    working directory unless absolute. ``fim_spm_rate`` is the probability that a FIM-transformed
    document uses the SPM order instead of PSM. ``seed`` seeds both the FIM decisions and the
    per-epoch shuffles.
    """

    sources: list[DataSourceConfig] = field(default_factory=list)
    tokenizer: str | None = None
    vocab_size: int = 8192
    cache_dir: str = ".cache/megads"
    fim_rate: float = 0.1
    fim_spm_rate: float = 0.0
    seed: int = 1234
    prefetch: int = 2
    return_document_boundaries: bool = False
    num_preprocess_workers: int = 2

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field and what to change."""
        if not 0.0 <= self.fim_rate <= 1.0:
            raise ValueError(f"data.fim_rate={self.fim_rate}: must lie in [0, 1] (0 disables FIM)")
        if not 0.0 <= self.fim_spm_rate <= 1.0:
            raise ValueError(
                f"data.fim_spm_rate={self.fim_spm_rate}: must lie in [0, 1] "
                "(the share of FIM documents written in SPM order)"
            )
        if self.tokenizer is None and not 300 <= self.vocab_size <= 2**32 - 1:
            raise ValueError(
                f"data.vocab_size={self.vocab_size}: the built-in byte-level BPE needs at least 300 "
                "tokens (256 bytes + 4 specials + merges); set data.vocab_size to e.g. 8192"
            )
        if self.tokenizer is not None and not str(self.tokenizer).strip():
            raise ValueError("data.tokenizer is an empty string: set a path or null for the built-in one")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed}: must be >= 0")
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch={self.prefetch}: must be >= 0 (0 = no background thread)")
        if self.num_preprocess_workers < 0:
            raise ValueError(
                f"data.num_preprocess_workers={self.num_preprocess_workers}: must be >= 0 "
                "(0 = tokenize in the calling process)"
            )
        if not str(self.cache_dir).strip():
            raise ValueError("data.cache_dir is empty: set a folder for tokenizer and token files")
        for i, src in enumerate(self.sources):
            where = f"data.sources[{i}]"
            if not str(src.path).strip():
                raise ValueError(f"{where}.path is empty: set a file or folder")
            if not src.weight > 0:
                raise ValueError(f"{where}.weight={src.weight}: must be > 0 (remove the source instead)")
            if not str(src.text_field).strip():
                raise ValueError(f"{where}.text_field is empty: name the field holding the text")
            if src.format not in SOURCE_FORMATS:
                raise ValueError(f"{where}.format={src.format!r}: choose one of {', '.join(SOURCE_FORMATS)}")
