"""Loss gap of FP8 training against the same run in FP32 (issue 12; DeepSeek reports < 0.25%).

    python -m tools.fp8_loss_gap [--model small] [--steps 300] [--seq-len 128] [--batch 4]
                                 [--nproc 1] [--parallel single] [--out outputs/fp8_loss_gap]
                                 [--stop-at S] [--seed-spread SEED] [--seeds S1 S2 ...]
                                 [--reference fp32|bf16]

Two `megads-train` runs with the same config, seed and data, one with `precision=fp32` and one
with `precision=fp8` (the backend `fp8.backend` picks: the emulation on CPU). Printed: the mean
LM loss of the last `--window` steps of each, their relative gap, the wall time of each run, and
a PNG of both loss curves (`<out>/fp8_loss_gap.png`). A run folder that already holds a finished
run is reused (the trainer says "nothing to do"), so an interrupted measurement resumes.

`--stop-at S` (the FP8 emulation is about 3x slower than FP32 on a CPU): both runs keep the
schedule of `--steps` (the same learning rate at every step) but are stopped after step S with
SIGUSR1 (megads' preemption: a checkpoint, exit 75), and the window is steps S-window+1..S.

`--seed-spread SEED`: a third run, FP32 again with the model initialised from `seed=SEED` (the
same data order: that is `data.seed`), in `<out>/fp32_seed<SEED>`. The same statistic between the
two FP32 runs is the seed-to-seed spread: a gap of FP8 against FP32 no larger than it is noise,
not a property of FP8.

`--seeds S1 S2 ...` (the measurement that can resolve a gap smaller than the seed spread): one
pair per seed, `fp32_seed<S>` and `fp8_seed<S>` (initialisation `seed=S`, the same data order in
every run). Printed: each pair's gap, their mean and its standard error, and the spread of the
reference runs across seeds (the standard deviation of their relative differences from their
mean). The gap is resolved when its standard error is small against 0.25%; a gap whose standard
error is larger says nothing either way. With `--reference bf16` the reference runs are BF16
(what DeepSeek compared against; on a GPU), named `bf16_seed<S>`.

The runs already in `<out>` are reused, so the runs can also be started by hand (e.g. at the same
time, each with OMP_NUM_THREADS=1, the tool's overrides printed in its log) and the tool run
afterwards with `--stop-at` at a step all of them reached, to compute the figures and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _run(out: Path, name: str, precision: str, args: argparse.Namespace, extra: list[str]) -> float:
    run_dir = out / name
    overrides = [
        f"model={args.model}", f"parallel={args.parallel}", f"precision={precision}", f"seq_len={args.seq_len}",
        "schedule=tiny", "schedule.train_tokens=0", f"schedule.train_steps={args.steps}",
        f"schedule.batch_start={args.batch}", f"schedule.batch_end={args.batch}", f"schedule.warmup_steps={args.warmup}",
        f"optim.lr={args.lr}", f"data={args.data}", "logging.wandb.mode=disabled", "logging.console_every=10",
        "checkpoint.every_steps=50", f"run_dir={run_dir}", *extra, *args.extra,
    ]
    cmd = [sys.executable, "-m", "megads.train.cli", *overrides]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "megads.train.cli", *overrides]
    if args.stop_at and len(_losses(run_dir)) >= args.stop_at:
        print(f"[fp8_loss_gap] {name}: {run_dir} already holds step {args.stop_at}", flush=True)
        return float("nan")
    print(f"[fp8_loss_gap] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "WANDB_MODE": "disabled"})
    signalled = False
    while proc.poll() is None:
        time.sleep(1)
        if args.stop_at and not signalled and len(_losses(run_dir)) >= args.stop_at:
            proc.send_signal(signal.SIGUSR1)  # stop after this step, with a checkpoint (exit 75)
            signalled = True
    if proc.returncode not in (0, 75 if signalled else 0):
        raise SystemExit(f"{name} run failed with exit code {proc.returncode}")
    return time.perf_counter() - t0


def _losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss/lm"] for r in sorted(rows, key=lambda r: r["step"])]


def paired_gap_stats(ref_means: dict[int, float], fp8_means: dict[int, float]) -> dict[str, float]:
    """Relative gaps of paired runs (same seed), their mean and its standard error, and the spread
    of the reference runs across seeds (standard deviation of ref / mean(ref) - 1). Seeds: at
    least 2 (a standard error needs two)."""
    seeds = sorted(ref_means)
    if sorted(fp8_means) != seeds or len(seeds) < 2:
        raise ValueError(f"paired runs of at least 2 seeds are needed (reference {seeds}, fp8 {sorted(fp8_means)})")
    n = len(seeds)
    gaps = [(fp8_means[s] - ref_means[s]) / ref_means[s] for s in seeds]
    mean_gap = sum(gaps) / n
    sd_gap = (sum((g - mean_gap) ** 2 for g in gaps) / (n - 1)) ** 0.5
    ref_mean = sum(ref_means.values()) / n
    rel = [ref_means[s] / ref_mean - 1 for s in seeds]
    spread = (sum(r * r for r in rel) / (n - 1)) ** 0.5  # the rel sum to 0 by construction
    return {"mean_gap": mean_gap, "stderr_gap": sd_gap / n**0.5, "sd_gap": sd_gap, "ref_seed_spread": spread,
            **{f"gap_seed{s}": g for s, g in zip(seeds, gaps)}}


def _curves(out: Path, names: list[str], end: int) -> dict[str, list[float]]:
    """Each run's LM losses of steps 1..end (every run must have reached `end`)."""
    curves = {p: _losses(out / p)[:end] for p in names}
    short = [p for p, c in curves.items() if len(c) < end]
    if short:
        raise SystemExit(f"runs {short} hold fewer than {end} steps")
    return curves


def _window_means(curves: dict[str, list[float]], window: int) -> dict[str, float]:
    return {p: sum(c[-window:]) / len(c[-window:]) for p, c in curves.items()}


def _seeds_main(args: argparse.Namespace) -> None:
    ref = args.reference
    runs = [(f"{prec}_seed{s}", prec, [f"seed={s}"]) for s in args.seeds for prec in (ref, "fp8")]
    walls = {name: _run(args.out, name, precision, args, extra) for name, precision, extra in runs}
    end = args.stop_at or args.steps
    curves = _curves(args.out, list(walls), end)
    means = _window_means(curves, args.window)
    stats = paired_gap_stats({s: means[f"{ref}_seed{s}"] for s in args.seeds},
                             {s: means[f"fp8_seed{s}"] for s in args.seeds})
    summary = {"model": args.model, "steps": args.steps, "compared_steps": end, "window": args.window,
               "reference": ref, "seeds": args.seeds, "mean_last": means, **stats, "wall_s": walls}
    (args.out / "summary_seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[fp8_loss_gap] mean LM loss of steps {end - args.window + 1}-{end}, {len(args.seeds)} seeds: "
          + ", ".join(f"seed {s}: {ref} {means[f'{ref}_seed{s}']:.4f} fp8 {means[f'fp8_seed{s}']:.4f} "
                      f"({stats[f'gap_seed{s}'] * 100:+.3f}%)" for s in args.seeds)
          + f"; gap fp8 against {ref} {stats['mean_gap'] * 100:+.3f}% +- {stats['stderr_gap'] * 100:.3f}% (standard "
          f"error; DeepSeek: < 0.25%); {ref} seed-to-seed spread {stats['ref_seed_spread'] * 100:.3f}%")
    png = _plot_seed_gaps(args, {s: (curves[f"{ref}_seed{s}"], curves[f"fp8_seed{s}"]) for s in args.seeds}, stats)
    print(f"[fp8_loss_gap] plot: {png}")


def _plot_seed_gaps(args: argparse.Namespace, curves: dict[int, tuple[list[float], list[float]]],
                    stats: dict[str, float]) -> Path:
    """fp8 / reference - 1 of each seed's pair over the steps, as a moving mean of `--window` steps."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    w = args.window
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s, (ref, fp8) in curves.items():
        xs = list(range(w, len(ref) + 1))
        gap = [100 * (sum(fp8[i - w:i]) / sum(ref[i - w:i]) - 1) for i in xs]
        ax.plot(xs, gap, lw=1, label=f"seed {s}: {stats[f'gap_seed{s}'] * 100:+.3f}%")
    for y in (0.25, -0.25):
        ax.axhline(y, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel(f"FP8 / {args.reference} - 1 (%), mean of {w} steps")
    ax.set_title(f"{args.model}: gap {stats['mean_gap'] * 100:+.3f}% +- {stats['stderr_gap'] * 100:.3f}% "
                 f"over {len(curves)} seeds (dashed: 0.25%)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = args.out / "fp8_loss_gap_seeds.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--parallel", default="single")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--stop-at", type=int, default=0, help="stop both runs after this step (0: run all --steps)")
    ap.add_argument("--seed-spread", type=int, default=None, metavar="SEED",
                    help="also run FP32 with seed=SEED and report the FP32-FP32 gap (the noise of the statistic)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                    help="one reference/fp8 pair per seed (at least 2): the gap's mean and standard error")
    ap.add_argument("--reference", choices=["fp32", "bf16"], default="fp32",
                    help="the precision FP8 is compared with in --seeds mode")
    ap.add_argument("--out", type=Path, default=Path("outputs/fp8_loss_gap"))
    ap.add_argument("extra", nargs="*", help="more megads-train overrides for both runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.seeds is not None:
        if len(set(args.seeds)) < 2:
            ap.error("--seeds needs at least 2 different seeds")
        _seeds_main(args)
        return
    runs = [("fp32", "fp32", []), ("fp8", "fp8", [])]
    if args.seed_spread is not None:
        runs.append((f"fp32_seed{args.seed_spread}", "fp32", [f"seed={args.seed_spread}"]))
    walls = {name: _run(args.out, name, precision, args, extra) for name, precision, extra in runs}
    end = args.stop_at or args.steps
    curves = _curves(args.out, list(walls), end)
    means = _window_means(curves, args.window)
    gap = (means["fp8"] - means["fp32"]) / means["fp32"]
    summary = {"model": args.model, "steps": args.steps, "compared_steps": end, "window": args.window,
               "mean_last": means, "mean_last_fp32": means["fp32"], "mean_last_fp8": means["fp8"],
               "relative_gap": gap, "wall_s": walls}
    spread_line = ""
    if args.seed_spread is not None:
        other = f"fp32_seed{args.seed_spread}"
        spread = (means[other] - means["fp32"]) / means["fp32"]
        summary["relative_gap_fp32_seeds"] = spread
        spread_line = f"; FP32 seed {args.seed_spread} against FP32: {spread * 100:+.3f}% (the seed-to-seed spread)"
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[fp8_loss_gap] mean LM loss of steps {end - args.window + 1}-{end} (schedule of {args.steps}): "
          + ", ".join(f"{p} {m:.4f}" for p, m in means.items())
          + f"; relative gap fp8 {gap * 100:+.3f}% (DeepSeek: < 0.25%){spread_line}; "
          + "wall " + ", ".join(f"{p} {w:.0f} s" for p, w in walls.items()))
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, label=f"{p} (last {args.window}: {means[p]:.4f})", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss")
    ax.set_title(f"{args.model}: FP8 (block-scaled E4M3) vs FP32, gap {gap * 100:+.3f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fp8_loss_gap.png", dpi=120)
    print(f"[fp8_loss_gap] plot: {args.out / 'fp8_loss_gap.png'}")


if __name__ == "__main__":
    main()
