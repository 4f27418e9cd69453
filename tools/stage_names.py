"""The stage names of a staged run's config, one per line (for launch/stages.sh).

    python -m tools.stage_names stages=deepseek_v3 [other overrides]

Composes the trainer's config from the same overrides (megads.train.cli.compose_config) and
validates the stage list (each stage's overrides, stages.start / stop), so a typo fails here, before any job is submitted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megads.train.cli import compose_config
from megads.train.config import ConfigError
from megads.train.stages import plan_stages


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose_config(overrides)
        stages = plan_stages(cfg, run_dir=Path(cfg.run_dir or "outputs/run"))  # type: ignore[arg-type, attr-defined]
    except ConfigError as e:
        print(f"stage_names: {e}", file=sys.stderr)
        return 2
    names = [s.spec.name for s in stages]
    if not names:
        print("stage_names: the config has no stages (choose a preset: stages=deepseek_v3, stages=tiny_extension)",
              file=sys.stderr)
        return 2
    print("\n".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
