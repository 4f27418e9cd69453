"""`megads-convert`: Hugging Face <-> megads checkpoint conversion, streaming (one tensor at a time).

    megads-convert from-hf HF_DIR DST [--init-missing-mtp] [--overwrite] [--no-progress]
    megads-convert to-hf   CKPT  HF_DIR [--fp8] [--max-shard-gb 5] [--overwrite] [--no-progress]

`from-hf` writes a weights-only megads checkpoint folder (torch.distributed.checkpoint, the
trainer's format; `checkpoint.init_from=DST` trains from it). CKPT of `to-hf` is such a folder or
a trainer step folder (`<run>/checkpoints/step_XXXXXXXX`, any parallel layout); it is verified
(manifest sizes and SHA-256) before anything is written. See megads.convert.checkpoint. Progress
bars go to stderr; bad input exits with status 2 and a message naming the path.
"""

from __future__ import annotations

import argparse
import sys

from megads.convert.checkpoint import convert_from_hf, convert_to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megads-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_from = sub.add_parser("from-hf", help="HF checkpoint folder -> megads checkpoint folder (weights only)")
    p_from.add_argument("src")
    p_from.add_argument("dst")
    p_from.add_argument("--init-missing-mtp", action="store_true", help="start MTP modules fresh if absent")
    p_to = sub.add_parser("to-hf", help="megads checkpoint folder (trainer step or from-hf output) -> HF folder")
    p_to.add_argument("src")
    p_to.add_argument("dst")
    p_to.add_argument("--fp8", action="store_true", help="block-quantise GEMM weights to FP8 (weight_scale_inv)")
    p_to.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB")
    for p in (p_from, p_to):
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    try:
        if args.cmd == "from-hf":
            meta = convert_from_hf(args.src, args.dst, overwrite=args.overwrite,
                                   init_missing_mtp=args.init_missing_mtp, progress=progress)
            done = f"{meta['bytes'] / 1024**3:.2f} GiB checkpoint"
        else:
            if args.max_shard_gb <= 0:
                raise ValueError(f"--max-shard-gb={args.max_shard_gb} must be > 0")
            cfg = convert_to_hf(args.src, args.dst, fp8=args.fp8, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                                overwrite=args.overwrite, progress=progress)
            done = f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts"
    except ValueError as e:  # CheckpointError, CheckpointCorrupt, config errors
        print(f"megads-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"megads-convert: wrote {args.dst} ({done})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
