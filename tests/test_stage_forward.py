"""The stage forward under bf16 autocast: the overlapped stage's all-to-alls move autocast-dtype rows.

One gloo rank, an ep group of one with the all-to-all dispatcher (so the overlapped stage cuts its
graph at the exchanges): the dispatch of the overlapped forward must send the same bytes as the
non-overlapped one, the rows cast to the autocast dtype before the exchange (`MoE.dispatch`'s
rule: the experts' first GEMM casts them anyway, so it halves the all-to-all bytes for free).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megads.testing.parallel import spawn, tiny_config


def _bytes_worker(rank: int, world: int, outpath: str) -> None:
    from megads.pipeline.schedules import build_schedule

    from megads.parallel.expert_parallel import AllToAllDispatcher, moe_modules
    from megads.parallel.stages import build_stage_model, piece_specs
    from megads.testing.schedule_check import make_stage

    cfg = tiny_config()
    sched = build_schedule("1f1b", pp=1, num_microbatches=1)
    specs = piece_specs([cfg.num_hidden_layers])
    tok = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    mbs = [(tok[:, :-1].contiguous(), tok[:, 1:].contiguous())]
    out: dict[str, Any] = {}
    for overlap in (False, True):
        model = build_stage_model(cfg, specs=specs, seed=3)
        dispatchers = []
        for moe in moe_modules(model):
            moe.dispatcher = AllToAllDispatcher(cfg.n_routed_experts, group=None, ep_size=1, ep_rank=0)
            dispatchers.append(moe.dispatcher)
        stage = make_stage(model, layout=sched.layout, specs=specs, overlap=overlap, autocast_dtype=torch.bfloat16)
        stage.begin_step(microbatches=mbs, num_microbatches=1)
        loss = stage.forward(0, 0, None)
        stage.backward_full(0, 0, torch.tensor(1.0))
        stage.end_step()
        out[overlap] = {
            "bytes": sum(d.sent_bytes for d in dispatchers),
            "rows": sum(d.sent_rows for d in dispatchers),
            "loss": loss.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    torch.save(out, outpath)


def test_overlapped_dispatch_moves_autocast_dtype_rows(tmp_path: Path) -> None:
    cfg = tiny_config()
    outpath = tmp_path / "bytes.pt"
    spawn(1, _bytes_worker, str(outpath))
    res = torch.load(outpath, weights_only=False)
    plain, overlapped = res[False], res[True]
    assert plain["rows"] == overlapped["rows"] > 0
    # bf16 rows: 2 bytes per element of the hidden size
    assert plain["bytes"] == plain["rows"] * cfg.hidden_size * 2, plain
    assert overlapped["bytes"] == plain["bytes"], (overlapped["bytes"], plain["bytes"])
    # and the two stages still agree
    torch.testing.assert_close(overlapped["loss"], plain["loss"], rtol=0, atol=0)
    assert plain["grads"].keys() == overlapped["grads"].keys()
