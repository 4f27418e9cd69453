"""megads data pipeline: ingestion, tokenizers, FIM, indexed token files and a resumable packed loader.

The package is imported by spawned preprocessing workers, so this module stays light: the heavy
parts (torch, datasets) are imported by the submodules that need them.

Entry points:
- ``data.config.DataConfig``: the configuration dataclass (Hydra group ``data``).
- ``data.loader.build_train_loader``: prepare (or reuse) the cache and return the per-rank loader.
- ``data.tokenizer.load_tokenizer``: a tokenizer with the EOS and FIM special token ids.
- ``data.preprocess.prepare``: tokenizer + token files for a config, cached and locked.
"""

from megads.data.config import DataConfig, DataSourceConfig

__all__ = ["DataConfig", "DataSourceConfig"]
