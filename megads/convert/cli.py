"""`megads-convert`: Hugging Face <-> megads checkpoint conversion.

    megads-convert from-hf SRC DST [--init-missing-mtp] [--overwrite]
    megads-convert to-hf   SRC DST [--fp8] [--max-shard-gb 5] [--overwrite]

SRC of `to-hf` is a megads model folder (`from-hf` output) or a trainer checkpoint step folder
(`<run>/checkpoints/step_XXXXXXXX`, any parallel layout: per-rank files are merged, see
megads.convert.trainer_checkpoint). Bad input exits with status 2 and a message naming the path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megads.convert.hf import CheckpointError, from_hf, to_hf
from megads.convert.native import CONFIG_FILE, load_native, save_native
from megads.convert.trainer_checkpoint import is_trainer_checkpoint, load_model_from_checkpoint
from megads.model.transformer import DeepseekV3


def _load_any(src: Path) -> DeepseekV3:
    """A megads model folder (`from-hf` output) or a trainer step folder (any parallel layout)."""
    if (src / CONFIG_FILE).is_file():
        return load_native(src)
    if is_trainer_checkpoint(src) or src.name.startswith("step_"):
        return load_model_from_checkpoint(src)
    hint = ""
    found = [*src.glob("step_*"), *src.glob("checkpoints/step_*")]
    steps = sorted((p for p in found if (p / "meta.json").is_file()), key=lambda p: p.name)
    if steps:
        hint = f"; a trainer checkpoint is one step folder, e.g. {steps[-1]}"
    raise ValueError(
        f"{src}: neither a megads model folder ({CONFIG_FILE}) nor a trainer checkpoint step folder (meta.json){hint}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megads-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_from = sub.add_parser("from-hf", help="HF checkpoint folder -> megads model folder")
    p_from.add_argument("src")
    p_from.add_argument("dst")
    p_from.add_argument("--init-missing-mtp", action="store_true", help="start MTP modules fresh if absent")
    p_from.add_argument("--overwrite", action="store_true")
    p_to = sub.add_parser("to-hf", help="megads model/checkpoint folder -> HF checkpoint folder")
    p_to.add_argument("src")
    p_to.add_argument("dst")
    p_to.add_argument("--fp8", action="store_true", help="block-quantise GEMM weights to FP8 (weight_scale_inv)")
    p_to.add_argument("--max-shard-gb", type=float, default=5.0)
    p_to.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "from-hf":
            model = from_hf(args.src, init_missing_mtp=args.init_missing_mtp)
            save_native(model, args.dst, overwrite=args.overwrite)
        else:
            model = _load_any(Path(args.src))
            to_hf(model, args.dst, fp8=args.fp8, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                  overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:
        print(f"megads-convert: error: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"megads-convert: wrote {args.dst} ({n / 1e6:.2f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
