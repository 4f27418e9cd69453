"""`megads-train`: the Hydra app over `conf/config.yaml` of the repository.

    megads-train                                   # the default (tiny model, this machine's CPUs)
    torchrun --standalone --nproc-per-node 4 -m megads.train.cli schedule.train_steps=50
    megads-train model=small precision=bf16 data=fallback logging.wandb.mode=disabled

The config folder is located relative to this package (<repo>/conf), so the command works from
any working directory of a source checkout (`pip install -e .`). Hydra's own output folders
and logging setup are switched off in conf/config.yaml: the trainer writes the resolved config
into its run folder itself.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[megads %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("megads")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _run(cfg: object) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from megads.train.config import ConfigError, to_train_config
    from megads.train.trainer import train

    choices = HydraConfig.get().runtime.choices
    model, schedule = choices.get("model"), choices.get("schedule")
    run_name = model if model == schedule or not schedule else f"{model}-{schedule}"
    try:
        train_cfg = to_train_config(cfg)
        train(train_cfg, run_name=run_name or "run", resolved_yaml=OmegaConf.to_yaml(cfg, resolve=True))
    except ConfigError as e:
        print(f"megads-train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    if not (CONF_DIR / "config.yaml").is_file():
        sys.exit(
            f"megads-train: the Hydra configs are not at {CONF_DIR}/config.yaml. megads-train runs from a source "
            "checkout installed with `pip install -e .`; run it from the repository or reinstall that way."
        )
    import hydra

    from megads.train.config import register_configs

    _setup_logging()
    register_configs()
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_run)()


if __name__ == "__main__":
    main()
