"""PNGs of a plan: the chosen layout's memory and time breakdown, throughput over the search."""

from __future__ import annotations

from pathlib import Path

from megads.plan.estimate import GB, Estimate


def breakdown_png(est: Estimate, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, t = est.memory, est.time
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    mem = {"parameters": m.params, "gradients": m.grads, "ZeRO-1 state": m.optimizer,
           "activations (peak)": m.activations, "all-to-all buffers": m.a2a_buffers}
    bottom = 0.0
    for k, v in mem.items():
        a.bar([0], [v / GB], bottom=bottom, label=f"{k} {v / GB:.1f} GB")
        bottom += v / GB
    a.axhline(m.usable / GB, color="k", ls="--", label=f"usable HBM {m.usable / GB:.0f} GB")
    a.set_xticks([0], [f"pp rank {m.pp_rank}"])
    a.set_ylabel("GB")
    a.set_title("memory of the fullest rank")
    a.legend(fontsize=8)
    parts = {"compute": t.compute_s, "SMs held by communication": t.slowdown_s, "exposed all-to-all": t.a2a_exposed_s, "pipeline bubble": t.bubble_s,
             "ZeRO-1 exchange": t.dp_s, "optimizer": t.optimizer_s}
    bottom = 0.0
    for k, v in parts.items():
        b.bar([0], [v], bottom=bottom, label=f"{k} {v:.2f} s")
        bottom += v
    b.set_xticks([0], ["step"])
    b.set_ylabel("seconds")
    b.set_title(f"step {t.step_s:.2f} s, {est.tokens_per_s_per_gpu:.0f} tokens/s/GPU")
    b.legend(fontsize=8)
    fig.suptitle(est.candidate.label())
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_png(ests: list[Estimate], path: Path, *, top: int = 30) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ests[:top]
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(shown) + 1.5))
    ys = list(range(len(shown)))[::-1]
    colors = ["tab:green" if e.memory.fits else "tab:red" for e in shown]
    ax.barh(ys, [e.tokens_per_s_per_gpu for e in shown], color=colors)
    ax.set_yticks(ys, [f"{e.candidate.label()} ({e.memory.total / GB:.0f} GB)" for e in shown], fontsize=7)
    ax.set_xlabel("predicted tokens/s/GPU (green: fits, red: does not fit)")
    ax.set_title(f"{len(ests)} valid layouts, best {len(shown)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
