"""Staged runs (issue 13, items 1-2): the stage list, automatic transitions, a kill inside a stage.

A stage list of three stages (seq_len 32 -> 64 with YaRN -> 128, the last from weights only) runs
through the real CLI (`python -m megads.train.cli`, one process, a stages preset in a config
folder of the test's own: `--config-dir`). The reference run goes through uninterrupted; a
second run is killed with SIGKILL in the middle of stage 2 and relaunched: the stages finished
before the kill are skipped, stage 2 resumes from its own newest checkpoint, and every stage's
per-step losses and gradient norms equal the reference's bit for bit (fp32, CPU). The last stage
launched on its own (`stages.start/stop` + `checkpoint.init_from`) repeats the chain's numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megads.train.config import ConfigError, StagesConfig, StageSpec
from megads.train.stages import DONE_FILE, plan_stages, stage_config

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model=tiny", "parallel=single", "seq_len=32", "schedule=tiny", "schedule.train_tokens=0",
          "schedule.train_steps=6", "schedule.warmup_steps=2", "schedule.batch_start=4", "schedule.batch_end=4",
          "logging.wandb.mode=disabled", "logging.console_every=1", "data=fallback", "data.max_bytes=200000",
          "logging.expert_load_png=false", "logging.expert_heatmap_png=false"]
STAGES_YAML = """
list:
  - name: short
    overrides: []
  - name: yarn64
    carry_optimizer: true
    overrides:
      - seq_len=64
      - model.rope_scaling={type:yarn,factor:2.0,original_max_position_embeddings:32,beta_fast:32.0,beta_slow:1.0,mscale:1.0,mscale_all_dim:1.0}
      - schedule.warmup_steps=0
      - schedule.train_steps=16
      - checkpoint.every_steps=3
  - name: long
    carry_optimizer: false
    overrides: [seq_len=128, schedule.warmup_steps=0, schedule.train_steps=3]
start: null
stop: null
"""


def _compose(*overrides: str):  # noqa: ANN202
    from megads.train.cli import compose_config as compose

    return compose([*COMMON, *overrides])


def _cmd(conf: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megads.train.cli", "--config-dir", str(conf), *COMMON, "stages=three",
            f"run_dir={run_dir}"]


def _metrics(stage_dir: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [(int(r["step"]), r["loss/lm"], r["loss/mtp"], r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conf = tmp_path_factory.mktemp("conf")
    (conf / "stages").mkdir()
    (conf / "stages" / "three.yaml").write_text(STAGES_YAML)
    return conf


def test_three_stages_with_transitions_and_a_kill_inside_stage_two(conf_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(conf_dir, ref), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("short", "yarn64", "long"):
        assert (ref / "stages" / name / DONE_FILE).is_file()
    assert "starting from" in done.stdout and "(model and optimizer)" in done.stdout and "(weights only)" in done.stdout
    assert (ref / "loss.png").is_file()
    record = json.loads((ref / "stages" / "yarn64" / DONE_FILE).read_text())
    assert record["steps"] == 16 and record["checkpoint"].endswith("step_00000016")

    # the same run, killed (SIGKILL) in the middle of stage 2, then launched again
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(conf_dir, run), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = run / "stages" / "yarn64" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 7:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "stages" / "yarn64" / DONE_FILE).exists(), "the kill came too late: stage 2 had finished"
    assert not (run / "stages" / "long").exists()
    again = subprocess.run(_cmd(conf_dir, run), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stage short: complete (6 steps), skipped" in again.stdout
    assert "stage yarn64 (2/3): resuming from" in again.stdout
    for name in ("short", "yarn64", "long"):
        assert _metrics(run / "stages" / name) == _metrics(ref / "stages" / name), name

    # one stage as a job of its own (one Slurm job per stage): the same numbers as in the chain
    alone = tmp_path / "alone"
    init = ref / "stages" / "yarn64" / "checkpoints" / "step_00000016"
    one = subprocess.run([*_cmd(conf_dir, alone), "stages.start=long", "stages.stop=long",
                          f"checkpoint.init_from={init}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert sorted(p.name for p in (alone / "stages").iterdir()) == ["long"]
    assert _metrics(alone / "stages" / "long") == _metrics(ref / "stages" / "long")


def test_stage_overrides_are_typed_and_checked() -> None:
    cfg = _compose()
    spec = StageSpec(name="x", overrides=["seq_len=64", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=2",
                                          "optim.lr=1e-5", "parallel.micro_batch_size=1"])
    s = stage_config(cfg, spec, where="stages.list[1]")
    assert (s.seq_len, s.optim.lr, s.parallel.micro_batch_size, s.model.rope_scaling.factor) == (64, 1e-5, 1, 2.0)
    assert cfg.seq_len == 32 and cfg.model.rope_scaling is None  # the run's config is untouched
    for bad, fragment in (("model=small", "chooses a config group"), ("optim.bogus=1", "optim.bogus"),
                          ("seq_len=abc", "seq_len"), ("+extra=1", "plain `key=value`"),
                          ("optim.lr=1,2", "plain `key=value`")):
        with pytest.raises(ConfigError, match="stages.list\\[1\\]") as e:
            stage_config(cfg, StageSpec(name="x", overrides=[bad]), where="stages.list[1]")
        assert fragment in str(e.value), (bad, str(e.value))


def test_stage_list_rules(tmp_path: Path) -> None:
    cfg = _compose("stages=tiny_extension")
    stages = plan_stages(cfg, run_dir=tmp_path)
    assert [s.name for s in stages] == ["pretrain", "ext512", "ext2048"]
    assert [s.cfg.seq_len for s in stages] == [32, 512, 2048]
    assert stages[1].cfg.model.rope_scaling.factor == 16.0 and stages[0].cfg.model.rope_scaling is None
    assert all(s.cfg.checkpoint.at_end and s.run_dir == tmp_path / "stages" / s.name for s in stages)
    import dataclasses

    def with_stages(**kw: object):  # noqa: ANN202
        return dataclasses.replace(cfg, stages=dataclasses.replace(cfg.stages, **kw))

    with pytest.raises(ConfigError, match="set checkpoint.init_from"):
        plan_stages(with_stages(start="ext512"), run_dir=tmp_path)
    picked = plan_stages(dataclasses.replace(with_stages(start="ext512", stop="ext512"), checkpoint=dataclasses.replace(
        cfg.checkpoint, init_from="/some/step_00000231")), run_dir=tmp_path)
    assert [s.name for s in picked] == ["ext512"] and picked[0].cfg.checkpoint.init_from == "/some/step_00000231"
    with pytest.raises(ConfigError, match="stages.start='nope' is not a stage"):
        plan_stages(with_stages(start="nope"), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="occurs 2 times"):
        plan_stages(with_stages(list=[StageSpec(name="a"), StageSpec(name="a")]), run_dir=tmp_path)
    assert plan_stages(dataclasses.replace(cfg, stages=StagesConfig()), run_dir=tmp_path) == []


def test_deepseek_v3_preset_is_the_recipe(tmp_path: Path) -> None:
    """SPEC.md: 1000 steps at 32K (batch 1920) and 1000 at 128K (batch 480), lr 7.3e-6, YaRN s=40
    over 4096 original positions, beta_fast 32, beta_slow 1."""
    cfg = _compose("model=deepseek_v3_671b", "stages=deepseek_v3", "seq_len=4096")
    pre, ext32, ext128 = plan_stages(cfg, run_dir=tmp_path)
    for st, T, B in ((ext32, 32768, 1920), (ext128, 131072, 480)):
        c = st.cfg
        assert (c.seq_len, c.schedule.batch_start, c.schedule.batch_end, c.schedule.train_steps) == (T, B, B, 1000)
        assert c.optim.lr == 7.3e-6 and st.spec.carry_optimizer
        rs = c.model.rope_scaling
        assert (rs.type, rs.factor, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow) == (
            "yarn", 40.0, 4096, 32.0, 1.0)
        c.model.validate()
    assert pre.cfg.seq_len == 4096 and pre.cfg.model.rope_scaling is None


@pytest.mark.usefixtures("quiet_transformers")
def test_stage_yarn_matches_transformers_beyond_the_original_length(tmp_path: Path) -> None:
    """The ext2048 stage of tiny_extension: its rotary cos/sin at positions 0..2047 (16x the 128
    original ones) and its softmax scale equal transformers' DeepseekV3 for the same config, and
    a model under it gives transformers' logits at 300 tokens (> 128)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    import megads
    from megads.model.rope import RotaryEmbedding

    stage = plan_stages(_compose("stages=tiny_extension"), run_dir=tmp_path)[2]
    mcfg = stage.cfg.model
    hf_cfg = DeepseekV3Config(**{k: v for k, v in mcfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    positions = torch.arange(2048)
    cos, sin, _ = RotaryEmbedding(mcfg)(positions, dtype=torch.float32)
    hf_cos, hf_sin = DeepseekV3RotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), positions[None])
    # ours is half-split, HF's interleaved: compare the frequency sets as multisets per position
    assert torch.allclose(cos.sort(dim=-1).values, hf_cos[0].sort(dim=-1).values, atol=1e-5)
    assert torch.allclose(sin.sort(dim=-1).values, hf_sin[0].sort(dim=-1).values, atol=1e-5)
    hf_model = DeepseekV3ForCausalLM(hf_cfg).float().eval()
    assert abs(hf_model.model.layers[0].self_attn.scaling - mcfg.softmax_scale()) < 1e-7
    hf_model.save_pretrained(tmp_path / "hf")
    ours = megads.from_hf(tmp_path / "hf", init_missing_mtp=True).eval()  # transformers has no MTP
    ids = torch.randint(0, mcfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - hf_model(ids).logits).abs().max() < 1e-4
