"""The process mesh: one explicit object holding every parallel degree, coordinate and group.

Rank order (outermost first): pipeline stage, expert-data-parallel index, expert-parallel index.

    rank = pp_rank * dp + dp_rank,    dp_rank = edp_rank * ep + ep_rank
                                      dp_rank = data_rank * cp + cp_rank   (context parallel)

so the ranks of one expert-parallel group are consecutive (inside a node whenever ep fits in a
node, across the fewest nodes otherwise) and the pipeline is the outermost dimension, as in
Megatron-Core's default order. Context parallel (cp) splits each sequence over cp consecutive
ranks of a stage: they hold the same parameters, so they are part of the dp group (Megatron's
"dp x cp" gradient group), and `data_parallel = dp / cp` replicas read different sequences.
Experts see the cp ranks' tokens as more tokens: ep groups are formed over the dp ranks exactly
as without cp (docs/parallel.md, "Context parallel"). Groups:

    pp    the pp ranks of one data-parallel replica (same dp_rank), point-to-point exchange
    dp    the dp ranks of one stage: dense parameters are replicated (ZeRO-1 shards over it)
    ep    ep consecutive ranks of one stage: the routed experts of a layer are sharded over it
    edp   the dp/ep ranks of one stage holding the same experts (ZeRO-1 shards expert state)
    cp    cp consecutive ranks of one stage: the pieces of one sequence (MLA latent exchange)
    embed first and last stage of one dp_rank: the MTP module's copy of the embedding (pp > 1)

`plan_layout` checks the numbers alone, before any process group exists, and every error names
the clashing numbers and what would fit. `ParallelMesh.build` creates the groups (every rank
must call it, in the same order, after `init_process_group`). Nothing is stored in module
globals: the mesh object is passed to whatever needs a group.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch.distributed as dist


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class LayoutPlan:
    """The derived numbers of a valid layout (no process group involved)."""

    world_size: int
    pp: int
    dp: int  # ranks of one stage sharing the dense parameters (the cp ranks included)
    ep: int
    edp: int
    stage_layers: tuple[int, ...]  # transformer layers of each pipeline piece, in model order
    ranks_per_node: int
    nodes_per_ep_group: int
    max_nodes_per_token: int  # upper bound on nodes one token's experts can span (node-limited routing)
    cp: int = 1  # context parallel: ranks one sequence is split over (a factor of dp)

    @property
    def data_parallel(self) -> int:
        """Replicas reading different sequences: dp / cp."""
        return self.dp // self.cp


def partition_layers(num_layers: int, *, pieces: int) -> list[int]:
    """Balanced split of `num_layers` into `pieces` consecutive runs; extra layers go to early pieces.

    The last piece also carries the output head and MTP module, the first the embedding, so the
    remainder goes to the pieces right after the first (cheaper than the last).
    """
    base, rem = divmod(num_layers, pieces)
    counts = [base] * pieces
    order = list(range(1, pieces - 1)) + [0, pieces - 1] if pieces > 2 else list(range(pieces))
    for i in order[:rem]:
        counts[i] += 1
    return counts


def plan_layout(
    *,
    world_size: int,
    pp: int,
    ep: int,
    num_layers: int,
    n_routed_experts: int,
    stage_layers: list[int] | tuple[int, ...] | None = None,
    pieces_per_rank: int = 1,
    ranks_per_node: int | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    node_limit: int | None = None,
    cp: int = 1,
) -> LayoutPlan:
    """Validate a (world, pp, ep) layout from numbers alone; raise ValueError naming what clashes.

    `pieces_per_rank` is the number of model pieces (virtual stages) one pipeline rank holds
    (1 for 1F1B, 2 for DualPipeV). `ranks_per_node` (default: world size, one node) and
    `node_limit` (M, the most nodes a token may reach; None = unchecked) drive the node-limited
    routing checks: when an expert-parallel group spans several nodes, an expert group of the
    router must never straddle two nodes, and topk_group groups must not reach more than M nodes.
    """
    errors: list[str] = []
    rpn = ranks_per_node or world_size
    if world_size < 1 or pp < 1 or ep < 1:
        raise ValueError(f"parallel: world size {world_size}, pp={pp} and ep={ep} must all be >= 1")
    if world_size % pp:
        fits = _divisors(world_size)
        raise ValueError(
            f"parallel.pp={pp} does not divide the world size {world_size}; pick pp among {fits} "
            f"(or use a world size that is a multiple of {pp})"
        )
    dp = world_size // pp
    if cp < 1:
        raise ValueError(f"parallel.cp={cp} must be >= 1")
    if dp % cp:
        raise ValueError(
            f"parallel.cp={cp} does not divide the ranks of one stage, world {world_size} / pp {pp} = {dp}; "
            f"pick cp among {_divisors(dp)}, or a world size that is a multiple of pp*cp = {pp * cp}"
        )
    if dp % ep:
        fits = _divisors(dp)
        errors.append(
            f"parallel.ep={ep} does not divide the data-parallel size dp = world {world_size} / pp {pp} = {dp}; "
            f"pick ep among {fits}, or a world size that is a multiple of pp*ep = {pp * ep}"
        )
    if n_routed_experts > 0 and n_routed_experts % ep:
        fits = [d for d in _divisors(n_routed_experts) if dp % d == 0]
        errors.append(
            f"model.n_routed_experts={n_routed_experts} is not divisible by parallel.ep={ep}; "
            f"pick ep among {fits} (divisors of both the expert count and dp={dp})"
        )
    pieces = pp * pieces_per_rank
    if stage_layers is not None:
        counts = list(stage_layers)
        if len(counts) != pieces:
            errors.append(
                f"parallel.stage_layers has {len(counts)} entries but the layout has {pieces} pipeline pieces "
                f"(pp={pp} x {pieces_per_rank} per rank); give one layer count per piece"
            )
        elif any(c < 0 for c in counts) or sum(counts) != num_layers:
            errors.append(
                f"parallel.stage_layers={counts} sums to {sum(counts)} but model.num_hidden_layers={num_layers}; "
                f"counts must be >= 0 and sum to {num_layers}, e.g. {partition_layers(num_layers, pieces=pieces)}"
            )
    else:
        counts = partition_layers(num_layers, pieces=pieces)
        if pieces > 2 and num_layers < pieces - 2:
            errors.append(
                f"model.num_hidden_layers={num_layers} cannot fill the {pieces - 2} inner pipeline pieces of "
                f"pp={pp} x {pieces_per_rank}; use pp <= {max(1, (num_layers + 2) // pieces_per_rank)} "
                "or give parallel.stage_layers explicitly"
            )
    if rpn < 1:
        errors.append(f"parallel.ranks_per_node={rpn} must be >= 1")
        rpn = world_size
    elif world_size % rpn and world_size > rpn:
        errors.append(f"world size {world_size} is not a multiple of ranks_per_node={rpn}")
    # Node-limited routing: the ep group spans ceil(ep / rpn) nodes.
    nodes = 1 if ep <= rpn else ep // rpn
    max_nodes = nodes
    if ep > rpn and ep % rpn:
        errors.append(
            f"parallel.ep={ep} spans nodes of {rpn} ranks unevenly; use ep <= {rpn} or a multiple of {rpn}"
        )
    elif nodes > 1 and n_routed_experts > 0 and not errors:
        experts_per_node = n_routed_experts // nodes
        per_group = n_routed_experts // max(n_group, 1)
        if n_group % nodes:
            errors.append(
                f"node-limited routing: model.n_group={n_group} expert groups over the {nodes} nodes of an "
                f"ep={ep} group (ranks_per_node={rpn}) would make a group straddle two nodes "
                f"({per_group} experts per group, {experts_per_node} per node); use n_group a multiple of {nodes}"
            )
        else:
            max_nodes = min(topk_group, nodes)
            if node_limit is not None and max_nodes > node_limit:
                errors.append(
                    f"node-limited routing: model.topk_group={topk_group} lets a token reach {max_nodes} nodes, "
                    f"more than parallel.node_limit={node_limit}; set model.topk_group <= {node_limit}"
                )
    if errors:
        raise ValueError(
            f"invalid parallel layout (world={world_size}, pp={pp}, ep={ep}, cp={cp}, dp={dp}):\n  - "
            + "\n  - ".join(errors)
        )
    return LayoutPlan(
        world_size=world_size,
        pp=pp,
        dp=dp,
        ep=ep,
        edp=dp // ep,
        stage_layers=tuple(counts),
        ranks_per_node=rpn,
        nodes_per_ep_group=nodes,
        max_nodes_per_token=max_nodes,
        cp=cp,
    )


@dataclass(frozen=True)
class LocalGroup:
    """A group known only by its size and this rank's place in it: no communication.

    `ParallelMesh.local` fills a mesh with these to build one rank's model and optimizer state
    without any other rank (`tools/rank_memory`); a step or a checkpoint needs real groups.
    """

    size: int
    rank: int


@dataclass
class ParallelMesh:
    """Degrees, this rank's coordinates and the process groups (see the module docstring)."""

    rank: int
    world_size: int
    pp: int
    dp: int
    ep: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int
    cp: int = 1
    cp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None
    embed_group: dist.ProcessGroup | None = None  # None when pp == 1 (one stage holds both uses)
    cp_group: dist.ProcessGroup | None = None  # None when cp == 1
    world_group: dist.ProcessGroup | None = None
    pp_ranks: list[int] = field(default_factory=list)  # global ranks of this rank's pipeline group
    dp_ranks: list[int] = field(default_factory=list)
    ep_ranks: list[int] = field(default_factory=list)
    edp_ranks: list[int] = field(default_factory=list)
    cp_ranks: list[int] = field(default_factory=list)

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def data_parallel(self) -> int:
        """Replicas reading different sequences (dp / cp)."""
        return self.dp // self.cp

    @property
    def data_rank(self) -> int:
        """This rank's replica among `data_parallel` (the cp ranks of a sequence share it)."""
        return self.dp_rank // self.cp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @staticmethod
    def coords(rank: int, *, pp: int, dp: int, ep: int) -> tuple[int, int, int, int]:
        """(pp_rank, dp_rank, ep_rank, edp_rank) of a global rank."""
        pp_rank, dp_rank = divmod(rank, dp)
        edp_rank, ep_rank = divmod(dp_rank, ep)
        assert pp_rank < pp
        return pp_rank, dp_rank, ep_rank, edp_rank

    @staticmethod
    def global_rank(*, pp_rank: int, dp_rank: int, dp: int) -> int:
        return pp_rank * dp + dp_rank

    @classmethod
    def build(cls, plan: LayoutPlan, *, rank: int | None = None, timeout_s: float | None = None) -> ParallelMesh:
        """Create every group of `plan` (collective: all ranks call this in the same order);
        `timeout_s`: of every group's collectives (None: torch's default for new groups)."""
        import datetime

        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        world = dist.get_world_size()
        if world != plan.world_size:
            raise ValueError(f"the layout was planned for {plan.world_size} ranks but the job has {world}")
        rank = dist.get_rank() if rank is None else rank
        pp, dp, ep = plan.pp, plan.dp, plan.ep
        pp_rank, dp_rank, ep_rank, edp_rank = cls.coords(rank, pp=pp, dp=dp, ep=ep)
        cp = plan.cp
        mesh = cls(
            rank=rank, world_size=world, pp=pp, dp=dp, ep=ep,
            pp_rank=pp_rank, dp_rank=dp_rank, ep_rank=ep_rank, edp_rank=edp_rank,
            cp=cp, cp_rank=dp_rank % cp, world_group=dist.group.WORLD,
        )
        g = lambda s, d: cls.global_rank(pp_rank=s, dp_rank=d, dp=dp)
        # Every rank creates every group (new_group is collective over the world), keeps its own.
        for d in range(dp):
            ranks = [g(s, d) for s in range(pp)]
            grp = dist.new_group(ranks, **kw)
            if d == dp_rank:
                mesh.pp_group, mesh.pp_ranks = grp, ranks
        for s in range(pp):
            ranks = [g(s, d) for d in range(dp)]
            grp = dist.new_group(ranks, **kw)
            if s == pp_rank:
                mesh.dp_group, mesh.dp_ranks = grp, ranks
            for e0 in range(0, dp, ep):
                ranks = [g(s, e0 + i) for i in range(ep)]
                grp = dist.new_group(ranks, **kw)
                if s == pp_rank and e0 == edp_rank * ep:
                    mesh.ep_group, mesh.ep_ranks = grp, ranks
            for i in range(ep):
                ranks = [g(s, e * ep + i) for e in range(dp // ep)]
                grp = dist.new_group(ranks, **kw)
                if s == pp_rank and i == ep_rank:
                    mesh.edp_group, mesh.edp_ranks = grp, ranks
            if cp > 1:
                for c0 in range(0, dp, cp):
                    ranks = [g(s, c0 + i) for i in range(cp)]
                    grp = dist.new_group(ranks, **kw)
                    if s == pp_rank and c0 == dp_rank - dp_rank % cp:
                        mesh.cp_group, mesh.cp_ranks = grp, ranks
        if cp == 1:
            mesh.cp_ranks = [mesh.rank]  # a sequence's only holder (as `ParallelMesh.local` gives)
        if pp > 1:
            for d in range(dp):
                grp = dist.new_group([g(0, d), g(pp - 1, d)], **kw)
                if d == dp_rank and (mesh.is_first_stage or mesh.is_last_stage):
                    mesh.embed_group = grp
        return mesh

    @classmethod
    def local(cls, plan: LayoutPlan, *, rank: int) -> ParallelMesh:
        """Rank `rank`'s coordinates with `LocalGroup`s in place of process groups (no
        communication, no other process): for building and measuring one rank's state alone."""
        pp, dp, ep = plan.pp, plan.dp, plan.ep
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is outside the layout's world of {plan.world_size} ranks")
        pp_rank, dp_rank, ep_rank, edp_rank = cls.coords(rank, pp=pp, dp=dp, ep=ep)
        g = lambda s, d: cls.global_rank(pp_rank=s, dp_rank=d, dp=dp)
        cp = plan.cp
        c0 = dp_rank - dp_rank % cp
        mesh = cls(
            rank=rank, world_size=plan.world_size, pp=pp, dp=dp, ep=ep,
            pp_rank=pp_rank, dp_rank=dp_rank, ep_rank=ep_rank, edp_rank=edp_rank, cp=cp, cp_rank=dp_rank % cp,
            cp_group=LocalGroup(cp, dp_rank % cp) if cp > 1 else None,  # type: ignore[arg-type]
            cp_ranks=[g(pp_rank, c0 + i) for i in range(cp)],
            pp_group=LocalGroup(pp, pp_rank), dp_group=LocalGroup(dp, dp_rank),  # type: ignore[arg-type]
            ep_group=LocalGroup(ep, ep_rank), edp_group=LocalGroup(dp // ep, edp_rank),  # type: ignore[arg-type]
            world_group=LocalGroup(plan.world_size, rank),  # type: ignore[arg-type]
            pp_ranks=[g(s, dp_rank) for s in range(pp)], dp_ranks=[g(pp_rank, d) for d in range(dp)],
            ep_ranks=[g(pp_rank, edp_rank * ep + i) for i in range(ep)],
            edp_ranks=[g(pp_rank, e * ep + ep_rank) for e in range(dp // ep)],
        )
        if pp > 1 and (mesh.is_first_stage or mesh.is_last_stage):
            mesh.embed_group = LocalGroup(2, 0 if mesh.is_first_stage else 1)  # type: ignore[assignment]
        return mesh

    def describe_degrees(self) -> str:
        cp = f", cp {self.cp}" if self.cp > 1 else ""
        return f"pp {self.pp}, dp {self.dp} (ep {self.ep}, edp {self.edp}{cp})"

    def describe(self) -> str:
        cp = f", cp {self.cp_rank}/{self.cp}" if self.cp > 1 else ""
        return (
            f"rank {self.rank}/{self.world_size}: pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp} "
            f"(ep {self.ep_rank}/{self.ep}, edp {self.edp_rank}/{self.edp}{cp})"
        )


# ------------------------------------------------------------------------------------------------
# bootstrap: torchrun (env://) or Slurm variables


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as `gpu[01-03,07],login1` into host names."""
    hosts: list[str] = []
    parts, depth, cur = [], 0, ""
    for ch in nodelist:  # split on commas outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            if part:
                hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def read_dist_env(environ: dict[str, str] | None = None, *, default_port: int = 29500) -> DistEnv:
    """Rank, world and master from torchrun's variables, else Slurm's, else a single process."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", default_port)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        hosts = expand_nodelist(nodelist) if nodelist else []
        ntasks = int(env["SLURM_NTASKS"])
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world = int(per_node) if per_node.isdigit() else max(1, ntasks // max(1, len(hosts) or 1))
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT") or (default_port + job_id % 10000 if job_id else default_port)),
            source="slurm",
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", default_port, "single")


def init_distributed(*, backend: str, env: DistEnv | None = None, timeout_s: float = 600.0) -> DistEnv:
    """Start the default process group from `env` (read from the environment when None)."""
    import datetime

    env = env or read_dist_env()
    if dist.is_initialized():
        return env
    if env.world_size == 1:
        # one process: a one-rank group on an in-memory store (no port to collide with another run)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return env
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env
