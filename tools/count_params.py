"""Print total and activated parameter counts of a model preset (analytic, nothing allocated).

    python -m tools.count_params [PRESET ...]        # default: deepseek_v3_671b

PRESET is a file name under conf/model/ (without .yaml) or a path to a YAML file. For the
671B preset the public figures are 671B total and 37B activated per token, the MTP module
adding 14B as stored on the hub (685B in all).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from megads.model.config import ModelConfig, ParamCount, count_parameters

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"
PUBLIC_671B = {"total": 671e9, "activated": 37e9, "with_mtp": 685e9}


def load_preset(name_or_path: str) -> ModelConfig:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
        raise SystemExit(f"count_params: no preset {name_or_path!r} ({path}); choose one of: {choices}")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.validate()
    return cfg


def report(name: str, counts: ParamCount) -> str:
    lines = [
        f"{name}:",
        f"  total (main model)        {counts.total / 1e9:10.3f} B",
        f"  activated per token       {counts.activated / 1e9:10.3f} B",
        f"  MTP (shared emb/head out) {counts.mtp / 1e9:10.3f} B",
        f"  MTP as stored on the hub  {counts.mtp_stored / 1e9:10.3f} B",
        f"  total + stored MTP        {(counts.total + counts.mtp_stored) / 1e9:10.3f} B",
    ]
    if name == "deepseek_v3_671b":
        for key, value in (("total", counts.total), ("activated", counts.activated),
                           ("with_mtp", counts.total + counts.mtp_stored)):
            ref = PUBLIC_671B[key]
            lines.append(f"  vs public {key:9s} {ref / 1e9:6.0f} B: {100 * (value - ref) / ref:+.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["deepseek_v3_671b"])
    args = parser.parse_args(argv)
    for preset in args.presets:
        print(report(preset, count_parameters(load_preset(preset))))


if __name__ == "__main__":
    main()
