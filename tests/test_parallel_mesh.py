"""Layout validation from numbers alone, Slurm/torchrun bootstrap parsing, mesh coordinates."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megads.parallel.config import ParallelConfig
from megads.parallel.mesh import (
    ParallelMesh,
    expand_nodelist,
    partition_layers,
    plan_layout,
    read_dist_env,
)
from megads.testing.parallel import tiny_config, valid_layouts


def test_valid_layouts_of_four_ranks() -> None:
    got = {(s.pp, s.ep) for s in valid_layouts(4, n_experts=8, num_layers=4)}
    assert got == {(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)}


def test_plan_numbers() -> None:
    plan = plan_layout(world_size=8, pp=2, ep=2, num_layers=4, n_routed_experts=8)
    assert (plan.dp, plan.edp, plan.stage_layers) == (4, 2, (2, 2))


def test_ep_not_dividing_dp_names_numbers_before_any_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError) as e:
        plan_layout(world_size=12, pp=2, ep=4, num_layers=4, n_routed_experts=8)
    msg = str(e.value)
    assert "parallel.ep=4" in msg and "dp = world 12 / pp 2 = 6" in msg and "[1, 2, 3, 6]" in msg
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (dict(world_size=6, pp=4, ep=1), ["parallel.pp=4", "world size 6", "[1, 2, 3, 6]"]),
        (dict(world_size=8, pp=1, ep=8, n_routed_experts=12), ["n_routed_experts=12", "ep=8"]),
        (dict(world_size=4, pp=2, ep=1, stage_layers=[1, 2]), ["stage_layers=[1, 2]", "sums to 3", "[2, 2]"]),
        (dict(world_size=4, pp=2, ep=1, stage_layers=[4]), ["1 entries", "2 pipeline pieces"]),
        (dict(world_size=8, pp=8, ep=1), ["num_hidden_layers=4", "6 inner pipeline pieces"]),
        (dict(world_size=16, pp=1, ep=16, n_routed_experts=16, ranks_per_node=4, n_group=2, topk_group=1),
         ["n_group=2", "4 nodes", "multiple of 4"]),
        (dict(world_size=16, pp=1, ep=16, n_routed_experts=64, ranks_per_node=2, n_group=8, topk_group=8,
              node_limit=4), ["topk_group=8", "node_limit=4", "topk_group <= 4"]),
    ],
)
def test_invalid_layouts_say_what_clashes(kwargs: dict, needles: list[str]) -> None:
    base = dict(num_layers=4, n_routed_experts=8)
    base.update(kwargs)
    with pytest.raises(ValueError) as e:
        plan_layout(**base)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_node_limited_layout_like_deepseek() -> None:
    # 256 experts, 8 groups over the 8 nodes of an ep=64 group (8 GPUs per node), M = 4.
    plan = plan_layout(world_size=2048, pp=16, ep=64, num_layers=61, n_routed_experts=256,
                       ranks_per_node=8, n_group=8, topk_group=4, node_limit=4)
    assert (plan.dp, plan.edp, plan.nodes_per_ep_group, plan.max_nodes_per_token) == (128, 2, 8, 4)


def test_explicit_stage_layers_and_partition() -> None:

    counts = partition_layers(61, pieces=16)
    assert sum(counts) == 61 and max(counts) - min(counts) <= 1 and counts[-1] == min(counts)
    plan = plan_layout(world_size=4, pp=4, ep=1, num_layers=4, n_routed_experts=8, stage_layers=[0, 2, 2, 0])
    assert plan.stage_layers == (0, 2, 2, 0)


def test_parallel_config_validate_uses_the_plan() -> None:
    cfg = tiny_config()
    ParallelConfig(pp=2, ep=2).validate(world_size=8, model=cfg)
    with pytest.raises(ValueError, match=r"parallel.ep=4 does not divide the data-parallel size"):
        ParallelConfig(pp=2, ep=4).validate(world_size=4, model=cfg)


def test_mesh_coordinates_put_ep_innermost() -> None:
    # world 8, pp 2, dp 4, ep 2: ranks 0,1 form an ep group, 0,2 an edp group, 0,4 a pipeline.
    assert ParallelMesh.coords(0, pp=2, dp=4, ep=2) == (0, 0, 0, 0)
    assert ParallelMesh.coords(1, pp=2, dp=4, ep=2) == (0, 1, 1, 0)
    assert ParallelMesh.coords(2, pp=2, dp=4, ep=2) == (0, 2, 0, 1)
    assert ParallelMesh.coords(5, pp=2, dp=4, ep=2) == (1, 1, 1, 0)


def test_slurm_nodelist_and_env() -> None:
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("a[8-10]b") == ["a8b", "a9b", "a10b"]
    env = read_dist_env({
        "SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "1234",
    })
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.source) == (
        9, 16, 1, 8, "node3", "slurm")
    assert env.master_port == 29500 + 1234
    tr = read_dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (tr.rank, tr.world_size, tr.master_addr, tr.master_port, tr.source) == (3, 4, "h", 1, "torchrun")
    assert read_dist_env({}).source == "single"


_SLURM_CHILD = """
import torch, torch.distributed as dist
from megads.parallel.mesh import init_distributed, read_dist_env
env = init_distributed(backend="gloo")
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
print(f"{env.source} rank {env.rank}/{env.world_size} local {env.local_rank} master {env.master_addr} sum {t.item():.0f}")
dist.destroy_process_group()
"""


def test_slurm_bootstrap_starts_a_real_group() -> None:
    """Two processes started the way srun starts them (only SLURM_* variables, no torchrun)."""
    import os
    import subprocess
    import sys

    from megads.testing.parallel import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
        env.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                    "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NTASKS_PER_NODE": "2", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1"})
        procs.append(subprocess.Popen([sys.executable, "-c", _SLURM_CHILD], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "slurm rank 0/2 local 0 master 127.0.0.1 sum 3" in outs[0], outs[0]
    assert "slurm rank 1/2 local 1 master 127.0.0.1 sum 3" in outs[1], outs[1]
