"""`megads-train`: the Hydra app over `conf/config.yaml` of the repository.

    megads-train                                   # the default (tiny model, this machine's CPUs)
    torchrun --standalone --nproc-per-node 4 -m megads.train.cli schedule.train_steps=50
    megads-train model=small precision=bf16 data=fallback logging.wandb.mode=disabled

The config folder is located relative to this package (<repo>/conf), so the command works from
any working directory of a source checkout (`pip install -e .`).

Run folders are Hydra's: `hydra.run.dir` for one run (default outputs/<model>-<schedule>, or
outputs/<logging.run_name>), `hydra.sweep.dir`/`hydra.sweep.subdir` for each job of a multirun
(`-m optim.lr=1e-3,2e-3`: multirun/<date>/<time>/<job number>_<overrides>); an explicit
`run_dir=` wins over both. The trainer writes the resolved config into its run folder itself
(Hydra's .hydra/ subfolder is off).

Started as one process with a layout that needs several ranks (pp x ep > 1), megads-train
starts them itself with `torchrun --standalone` on this machine, once per job of a sweep.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str]) -> object:
    """The TrainConfig of `overrides` over conf/config.yaml, composed by Hydra as the CLI does
    (without running it): for tools and tests that need the trainer's config."""
    from hydra import compose, initialize_config_dir

    from megads.train.config import register_configs, register_resolvers, to_train_config

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose(config_name="config", overrides=list(overrides)))


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[megads %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("megads")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _needed_ranks(train_cfg: object) -> int:
    """The smallest world size every stage's layout runs on: pp x lcm(ep, cp) for each (one
    data-parallel group holding ep expert shards and cp pieces of a sequence), their lcm."""
    import math

    from megads.train.stages import stage_config

    stages = train_cfg.stages.list  # type: ignore[attr-defined]
    cfgs = [train_cfg] + [stage_config(train_cfg, s, where=f"stages.list[{i}]") for i, s in enumerate(stages)]
    need = 1
    for c in cfgs:
        p = c.parallel  # type: ignore[attr-defined]
        need = math.lcm(need, max(1, p.pp * math.lcm(p.ep, p.cp)))
    return need


def _config_args(hydra_cfg: object) -> list[str]:
    """The `--config-name` / `--config-dir` of this launch, for the ranks started by `_spawn_ranks`."""
    args: list[str] = []
    name = hydra_cfg.job.config_name  # type: ignore[attr-defined]
    if name and name != "config":
        args += ["--config-name", str(name)]
    for src in hydra_cfg.runtime.config_sources:  # type: ignore[attr-defined]
        if src.provider == "command-line" and src.schema == "file":
            args += ["--config-dir", str(src.path)]
    return args


def _quoted(value: str) -> str:
    """A Hydra override value quoted so that `,` `=` and spaces in it stay literal."""
    return "'" + value.replace("'", "\\'") + "'"


def _spawn_ranks(nproc: int, *, overrides: list[str], job_dir: str) -> None:
    """Start `nproc` local ranks of this job with torchrun (what `make train` does itself)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "megads.train.cli", *overrides, f"hydra.run.dir={_quoted(job_dir)}"]
    logging.getLogger("megads.train").info(
        f"the layout needs {nproc} ranks and no launcher started any: running them here with "
        f"`torchrun --standalone --nproc-per-node {nproc}` (start torchrun or srun yourself to choose)"
    )
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"megads-train: the {nproc}-rank job failed (exit code {proc.returncode})", file=sys.stderr)
        sys.exit(proc.returncode)


def _run(cfg: object) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from megads.parallel.mesh import read_dist_env
    from megads.train.config import ConfigError, default_run_name, to_train_config, validate_config
    from megads.train.preemption import EXIT_PREEMPTED, Preempted, hand_over
    from megads.train.run_lock import RunFolderLockedError
    from megads.train.trainer import train

    _setup_logging()  # again here: a Hydra launcher (submitit) calls this function in a job without main()
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    run_name = default_run_name(None, choices.get("model"), choices.get("schedule"))
    job_dir = hydra_cfg.runtime.output_dir  # hydra.run.dir, or the sweep job's folder
    try:
        train_cfg = to_train_config(cfg)
        need = _needed_ranks(train_cfg)
        env = read_dist_env()
        # A cluster launcher (submitit) starts each sweep job as its own multi-task job: that is fine.
        on_cluster_launcher = "submitit" in str(hydra_cfg.launcher.get("_target_", ""))
        if hydra_cfg.mode == RunMode.MULTIRUN and env.world_size > 1 and not on_cluster_launcher:
            # every job would re-create the process group inside the same torchrun workers
            raise ConfigError(
                "a Hydra sweep (-m) under torchrun/srun with several ranks is not supported: start the "
                "sweep as one process (`megads-train -m ...`), which starts torchrun once per job"
            )
        if env.source == "single" and need > 1:
            validate_config(train_cfg, world_size=need)  # one clear message here, not one per rank
            _spawn_ranks(need, overrides=[*_config_args(hydra_cfg), *hydra_cfg.overrides.task], job_dir=job_dir)
            return
        sweep = None
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep's jobs share a wandb group named after its folder
            sweep = "sweep-" + "-".join(Path(str(hydra_cfg.sweep.dir)).parts[-2:])
        train(train_cfg, run_name=run_name, resolved_yaml=OmegaConf.to_yaml(cfg, resolve=True),
              job_dir=job_dir, wandb_group=sweep)
    except (ConfigError, RunFolderLockedError) as e:
        print(f"megads-train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as e:
        if hand_over(e):  # submitit requeues the job itself (rank 0); the other ranks just end
            return
        sys.exit(EXIT_PREEMPTED)  # 75: stopped on a signal with a checkpoint; a relaunch resumes from it


def _sweep_dir_args(argv: list[str]) -> list[str]:
    """For a multirun: name each job's folder after the swept overrides only.

    Hydra names a sweep job's folder `<num>_<every override of the job>`; with the dozen fixed
    overrides of a real command line that passes the file system's 255-byte name limit. The
    fixed ones (parsed with Hydra's own override parser: not `a,b`, `range()`, `choice()`, ...)
    are added to `hydra.job.config.override_dirname.exclude_keys` (with `run_dir`, as in
    conf/config.yaml), so `-m optim.lr=1e-3,2e-3` gives `0_optim.lr=0.001`, `1_optim.lr=0.002`.
    """
    if "-m" not in argv and "--multirun" not in argv:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in argv[1:] if "=" in a and not a.startswith("-") and not a.startswith("hydra.")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # noqa: BLE001 - Hydra reports bad overrides itself, with its own message
        return []
    fixed = sorted({o.key_or_group for o in overrides if not o.is_sweep_override()} | {"run_dir"})
    if any(a.startswith("hydra.job.config.override_dirname.exclude_keys") for a in argv):
        return []  # the user chose
    return ["hydra.job.config.override_dirname.exclude_keys=[" + ",".join(fixed) + "]"]


def main() -> None:
    if not (CONF_DIR / "config.yaml").is_file():
        sys.exit(
            f"megads-train: the Hydra configs are not at {CONF_DIR}/config.yaml. megads-train runs from a source "
            "checkout installed with `pip install -e .`; run it from the repository or reinstall that way."
        )
    import hydra

    from megads.train.config import register_configs, register_resolvers

    _setup_logging()
    register_configs()
    register_resolvers()
    sys.argv += _sweep_dir_args(sys.argv)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_run)()


if __name__ == "__main__":
    main()
