"""Run monitoring on rank 0: wandb (never fatal), console lines, and the end-of-run PNGs.

wandb: mode `auto` is online when WANDB_API_KEY is set and offline otherwise; a WANDB_MODE
environment variable overrides the configured mode; `disabled` never imports wandb. Every
wandb call is wrapped: an exception (no network, a broken install, a timeout) turns into one
warning and wandb is switched off for the rest of the run; training continues.

PNGs are written atomically (a temporary file in the run folder, then os.replace) with the
Agg backend, so no display is needed.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

from megads.train.config import WandbConfig

log = logging.getLogger("megads.train")


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if cfg.mode == "online" and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
        warnings.warn("logging.wandb.mode=online but no WANDB_API_KEY or wandb login: logging offline", stacklevel=2)
        return "offline"
    return cfg.mode


def _netrc_has_wandb() -> bool:
    try:
        return "api.wandb.ai" in (Path.home() / ".netrc").read_text()
    except OSError:
        return False


class WandbLogger:
    """A wandb run that can never block or crash training."""

    def __init__(self, cfg: WandbConfig, *, run_dir: Path, run_name: str, config: dict[str, Any],
                 group: str | None = None, tags: list[str] | None = None) -> None:
        """`group` and `tags` apply when the config names none (`logging.wandb.group` / `.tags` win)."""
        self.run: Any = None
        self.mode = resolve_wandb_mode(cfg)
        if self.mode == "disabled":
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run_id_file = run_dir / "wandb_run_id.txt"
            run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:8]
            run_id_file.write_text(run_id)
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group or group,
                tags=list(cfg.tags) or list(tags or []), name=run_name,
                id=run_id, resume="allow", dir=str(run_dir), mode=self.mode, config=config,
                settings=wandb.Settings(init_timeout=cfg.init_timeout_s, console="off"),
            )
        except Exception as e:  # noqa: BLE001 - wandb must never stop training
            self._fail("init", e)

    def _fail(self, what: str, e: BaseException) -> None:
        warnings.warn(f"wandb {what} failed ({type(e).__name__}: {e}); continuing without wandb", stacklevel=3)
        self.run = None

    def log(self, data: dict[str, float], *, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail("log", e)

    def log_images(self, images: dict[str, Path | None], *, step: int | None = None) -> None:
        """PNGs of the run folder as wandb images (missing ones are left out)."""
        if self.run is None:
            return
        try:
            import wandb

            data = {k: wandb.Image(str(v)) for k, v in images.items() if v is not None and Path(v).is_file()}
            if data:
                self.run.log(data, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail("log", e)

    @property
    def run_path(self) -> str | None:
        """The local folder of the run (the one `wandb sync` takes in offline mode)."""
        if self.run is None:
            return None
        try:
            return str(Path(self.run.dir).parent)
        except Exception:  # noqa: BLE001
            return None

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            self._fail("finish", e)


def _save_png(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_loss(history: list[dict[str, float]], path: Path, *, boundaries: list[tuple[float, str]] | None = None) -> Path | None:
    """Loss curves (total, LM, MTP) and the learning rate against tokens; `boundaries`: (token
    position, stage name) of each stage's start in a staged run, drawn as labelled lines."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tokens = [h["tokens"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lm = [h["loss/lm"] for h in history]
    ax.plot(tokens, lm, label="LM loss", lw=0.8, alpha=0.6)
    if len(lm) >= 20:  # a trailing mean over ~5% of the run makes the trend readable
        k = max(5, len(lm) // 20)
        smooth = [sum(lm[max(0, i - k + 1) : i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(lm))]
        ax.plot(tokens, smooth, label=f"LM loss, mean of {k} steps", lw=1.8, color="C3")
    if any(h["loss/mtp"] for h in history):
        ax.plot(tokens, [h["loss/mtp"] for h in history], label="MTP loss (depth mean)", lw=1.0, alpha=0.8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross entropy (nats)")
    ax.grid(alpha=0.3)
    for at, name in boundaries or []:
        ax.axvline(at, color="k", lw=0.8, ls=":")
        ax.annotate(name, (at, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8)  # at the bottom: the legend sits top right
    ax2 = ax.twinx()
    ax2.plot(tokens, [h["lr"] for h in history], color="gray", ls="--", lw=0.8, label="lr")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title(f"megads training: {len(history)} steps, final LM loss {history[-1]['loss/lm']:.3f}")
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_expert_load(history: list[dict[str, float]], path: Path) -> Path | None:
    """Expert-load imbalance (max/mean) per MoE router against steps."""
    keys = sorted({k for h in history for k in h if k.startswith("load/imbalance/")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [h["step"] for h in history]
    for k in keys:
        ax.plot(steps, [h.get(k, float("nan")) for h in history], lw=1.0, label=k.removeprefix("load/imbalance/"))
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("expert load imbalance per router (bias update, all ranks)")
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_expert_heatmap(load_RE: Any, names: list[str], path: Path, *, step: int) -> Path | None:
    """Per-expert load of one step as a heatmap: a row per router (layer), a column per routed
    expert, colour = tokens routed there / the mean of that row (1 = balanced)."""
    import torch

    if load_RE is None or load_RE.numel() == 0 or not names:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = load_RE.detach().to("cpu", torch.float64)[: len(names)]
    rel = rows / rows.mean(dim=1, keepdim=True).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * rel.shape[1]), 1.5 + 0.35 * rel.shape[0]))
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=max(2.0, float(rel.max())))
    ax.set_yticks(range(len(names)), [n.removesuffix(".mlp.gate") for n in names], fontsize=7)
    ax.set_xlabel("routed expert")
    ax.set_title(f"expert load / row mean at step {step} (all ranks)")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    _save_png(fig, path)
    plt.close(fig)
    return path
