"""The launch of a planned layout: the trainer's Hydra override line and the sbatch command."""

from __future__ import annotations

from megads.plan.config import PlanConfig
from megads.plan.estimate import Estimate


def train_overrides(pc: PlanConfig, est: Estimate, *, model_choice: str, parallel_choice: str) -> list[str]:
    """Overrides of conf/config.yaml (megads-train) that run `est`'s layout."""
    c = est.candidate
    out = [f"model={model_choice}", f"parallel={parallel_choice}", f"parallel.pp={c.pp}", f"parallel.ep={c.ep}",
           f"parallel.cp={c.cp}"]
    if c.pp > 1:
        out.append(f"parallel.schedule={c.schedule}")
        out.append("parallel.stage_layers=[" + ",".join(str(n) for n in est.plan.stage_layers) + "]")
    out += [
        f"parallel.micro_batch_size={c.micro_batch_size}",
        f"parallel.ranks_per_node={pc.cluster.gpus_per_node}",
        f"parallel.moments_dtype={pc.parallel.moments_dtype}",
        f"seq_len={pc.seq_len}",
        f"precision={pc.precision}",
        f"memory.recompute={c.recompute}",
        f"memory.loss_chunk_tokens={pc.loss_chunk_tokens}",
        f"schedule.batch_end={pc.global_batch}",
        f"schedule.batch_start={pc.global_batch}",  # the planned batch from the first step (no ramp)
    ]
    return out


def sbatch_command(pc: PlanConfig, est: Estimate, *, model_choice: str, parallel_choice: str) -> str:
    """`sbatch --nodes N launch/slurm.sbatch <overrides>`, or a comment saying why it cannot run."""
    args = " ".join(train_overrides(pc, est, model_choice=model_choice, parallel_choice=parallel_choice))
    cmd = f"sbatch --nodes {pc.cluster.nodes} --ntasks-per-node {pc.cluster.gpus_per_node} " \
          f"--gpus-per-node {pc.cluster.gpus_per_node} launch/slurm.sbatch {args}"
    if not est.memory.fits:
        return (f"# does not fit: {est.memory.total / 1e9:.0f} GB predicted on pipeline rank {est.memory.pp_rank}, "
                f"{est.memory.usable / 1e9:.0f} GB usable: " + cmd)
    return cmd
