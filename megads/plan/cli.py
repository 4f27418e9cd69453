"""`megads-plan`: predict memory, step time and GPU-hours of a layout, search layouts, emit the launch.

    megads-plan model=deepseek_v3_671b cluster=h800_2048 parallel=deepseek_v3_2048 seq_len=4096 precision=fp8
    megads-plan mode=search cluster=h100_1024 precision=fp8 search.top=8

Arguments are Hydra overrides of conf/plan.yaml (the trainer's model and parallel presets, the
cluster presets of conf/cluster/, `efficiency.*`, `search.*`). Prints the estimate (or the best
layouts of the search) with memory and time breakdowns, the trainer's override line and the
sbatch command of the best, and writes `plan.json` and the PNGs under `out_dir`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from megads.plan.config import PlanConfig, register_plan_configs
from megads.plan.emit import sbatch_command, train_overrides
from megads.plan.estimate import GB, Candidate, Estimate, balance_stage_layers, estimate, layout_plan

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_plan(overrides: list[str]) -> PlanConfig:
    """The PlanConfig of `overrides` over conf/plan.yaml (unknown keys fail), validated."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_plan_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        node = compose(config_name="plan", overrides=list(overrides))
    pc = OmegaConf.to_object(node)
    assert isinstance(pc, PlanConfig)
    pc.model = pc.model.__class__(**{k: getattr(pc.model, k) for k in pc.model.__dataclass_fields__})
    pc.validate()
    return pc


def given_candidate(pc: PlanConfig, *, balance: bool = False) -> Candidate:
    """The layout of `pc.parallel` (cp included) and `recompute`, stage layers balanced when asked and unset."""
    p = pc.parallel
    cand = Candidate(pp=p.pp, ep=p.ep, schedule=p.schedule if p.pp > 1 else "1f1b",
                     micro_batch_size=p.micro_batch_size, recompute=pc.recompute, cp=p.cp,
                     stage_layers=tuple(p.stage_layers) if p.stage_layers else None)
    if balance and cand.stage_layers is None and cand.pp > 1:
        cand = Candidate(**{**cand.__dict__, "stage_layers": balance_stage_layers(pc, cand)})
    return cand


def describe(est: Estimate) -> str:
    m, t = est.memory, est.time
    lines = [
        f"layout {est.candidate.label()}: dp {est.plan.dp} (edp {est.plan.edp}), stage layers {list(est.plan.stage_layers)}, "
        f"{t.microbatches} micro-batches per replica",
        f"  memory of the fullest rank (pp rank {m.pp_rank}): parameters {m.params / GB:.2f} GB, gradients "
        f"{m.grads / GB:.2f} GB, ZeRO-1 {m.optimizer / GB:.2f} GB, activations {m.activations / GB:.2f} GB, "
        f"all-to-all buffers {m.a2a_buffers / GB:.2f} GB, ZeRO-1 buckets in flight {m.zero1_buckets / GB:.2f} GB",
        f"  total {m.total / GB:.1f} GB of {m.usable / GB:.1f} usable ({m.hbm / GB:.0f} GB HBM): "
        f"{'fits' if m.fits else 'DOES NOT FIT'}",
        f"  step {t.step_s:.2f} s = pipeline {t.pipeline_s:.2f} s (compute {t.compute_s:.2f}, on the SMs left by "
        f"communication +{t.slowdown_s:.2f}, exposed all-to-all "
        f"{t.a2a_exposed_s:.2f} of {t.a2a_total_s:.2f}, bubble {t.bubble_s:.2f}) + ZeRO-1 exchange {t.dp_s:.2f} "
        f"+ optimizer {t.optimizer_s:.2f}",
        f"  {est.tokens_per_s_per_gpu:.0f} tokens/s/GPU, {est.model_tflops_per_gpu:.0f} model TFLOP/s/GPU, "
        f"MFU {100 * est.mfu_bf16:.1f}% of BF16 peak ({100 * est.mfu_precision:.1f}% of the run's GEMM peak), "
        f"{est.gpu_hours / 1e3:.1f}K GPU-hours and {est.days:.2f} days per {{tokens}} tokens",
    ]
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


def table(ests: list[Estimate]) -> str:
    head = (f"{'#':>3} {'layout':40s} {'dp':>5} {'mem GB':>7} {'fits':>5} {'act GB':>7} {'step s':>7} "
            f"{'bubble':>7} {'a2a exp':>7} {'tok/s/GPU':>9} {'MFU%':>5} {'kGPUh/T':>8}")
    rows = [head]
    for i, e in enumerate(ests, 1):
        rows.append(
            f"{i:>3} {e.candidate.label():40s} {e.plan.dp:>5} "
            f"{e.memory.total / GB:>7.1f} {'yes' if e.memory.fits else 'no':>5} {e.memory.activations / GB:>7.1f} "
            f"{e.time.step_s:>7.2f} {e.time.bubble_s:>7.2f} {e.time.a2a_exposed_s:>7.2f} "
            f"{e.tokens_per_s_per_gpu:>9.0f} {100 * e.mfu_bf16:>5.1f} {e.gpu_hours / 1e3:>8.1f}")
    return "\n".join(rows)


def _choice(overrides: list[str], group: str, default: str) -> str:
    for o in overrides:
        if o.startswith(f"{group}="):
            return o.split("=", 1)[1]
    return default


def run(overrides: list[str]) -> dict[str, Any]:
    """Compose, estimate or search, print, emit, plot; returns what plan.json holds."""
    pc = compose_plan(overrides)
    model_choice = _choice(overrides, "model", "deepseek_v3_671b")
    parallel_choice = _choice(overrides, "parallel", "deepseek_v3_2048")
    out = Path(pc.out_dir)
    tokens = f"{pc.tokens:.3g}"
    result: dict[str, Any] = {"overrides": overrides, "cluster": pc.cluster.name, "world": pc.cluster.world_size}
    if pc.mode == "estimate":
        cand = given_candidate(pc, balance=pc.balance_stages)
        best = estimate(pc, cand, plan=layout_plan(pc, cand))
        ests = [best]
        print(describe(best).replace("{tokens}", tokens))
    else:
        from megads.plan.search import search

        ests, n = search(pc)
        if not ests:
            raise SystemExit(f"megads-plan: none of the {n} layouts enumerated is valid on {pc.cluster.name}")
        best = next((e for e in ests if e.memory.fits), ests[0])
        fitting = sum(e.memory.fits for e in ests)
        print(f"{n} layouts enumerated on {pc.cluster.name} ({pc.cluster.world_size} GPUs), {len(ests)} valid, "
              f"{fitting} fit in {best.memory.usable / GB:.0f} GB")
        print(table(ests[: pc.search.top]))
        print()
        print(describe(best).replace("{tokens}", tokens))
        result["search"] = [e.row() for e in ests]
    line = " ".join(train_overrides(pc, best, model_choice=model_choice, parallel_choice=parallel_choice))
    print("\nmegads-train overrides:\n  " + line)
    print("sbatch:\n  " + sbatch_command(pc, best, model_choice=model_choice, parallel_choice=parallel_choice))
    result["best"] = best.row()
    result["train_overrides"] = line
    if pc.plots:
        from megads.plan.plots import breakdown_png, throughput_png

        result["png"] = [str(breakdown_png(best, out / "plan_breakdown.png"))]
        if len(ests) > 1:
            result["png"].append(str(throughput_png(ests, out / "plan_search.png")))
        print("plots: " + ", ".join(result["png"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        run(args)
    except ValueError as e:
        print(f"megads-plan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
