"""End-to-end training (Algorithm 1) on a tiny InvertedPendulum config: files, resume, seeding, errors.

Sizes are tiny so the whole file stays fast on 2 shared cores; what is checked is the loop's
bookkeeping (run files, buffers, counters, RNG streams, checkpoints), not learning progress,
which benchmarks/sample_efficiency.py measures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from maac_robot import cli
from maac_robot.learn.buffer import ReplayBuffer
from maac_robot.learn.config import config_from_dict, load_config
from maac_robot.learn.trainer import (RunError, Trainer, eval_seeds, load_checkpoint, load_run, read_metrics,
                                      train)
from maac_robot.runtime.errors import UserError
from tiny_configs import tiny

TINY = tiny()


def _tb_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag in a run's TensorBoard events, as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _config_file(tmp_path: Path, data: dict | None = None) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data or TINY))
    return path


# ---- replay buffer -----------------------------------------------------------------------------


def test_replay_buffer_ring_sampling_and_state_dict() -> None:
    buf = ReplayBuffer(state_dim=2, act_dim=1, capacity=5)
    for i in range(7):  # wraps: rows 0, 1 now hold transitions 5, 6
        buf.add(np.full(2, i), np.full(1, -i), float(i), np.full(2, i + 1), i % 2 == 0)
    assert (len(buf), buf.ptr, buf.total_added) == (5, 2, 7)
    assert sorted(buf.reward.tolist()) == [2, 3, 4, 5, 6]
    b1 = buf.sample(16, np.random.default_rng(0))
    b2 = buf.sample(16, np.random.default_rng(0))
    assert torch.equal(b1.reward, b2.reward) and len(b1) == 16
    # every sampled row is a stored transition, fields stay aligned
    assert torch.equal(b1.state[:, 0], b1.reward) and torch.equal(b1.action[:, 0], -b1.reward)
    assert torch.equal(b1.terminated, b1.reward.long() % 2 == 0)

    buf.add_batch(*(np.arange(3 * k, dtype=np.float32).reshape(3, k) if k else np.arange(3.0)
                    for k in (2, 1, 0, 2)), np.ones(3, bool))
    clone = ReplayBuffer(2, 1, 5)
    clone.load_state_dict(buf.state_dict())
    for f in ("state", "action", "reward", "next_state", "terminated"):
        assert np.array_equal(getattr(clone, f), getattr(buf, f))
    assert (clone.ptr, clone.size, clone.total_added) == (buf.ptr, buf.size, buf.total_added) == (0, 5, 10)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(2, 1, 5).sample(1, np.random.default_rng(0))


# ---- metrics.jsonl ------------------------------------------------------------------------------


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # no evaluation yet
    path.write_text('{"env_step": 100}\n\n{"env_step": 200}\n{"env_step": 300, "eval_ret')
    assert read_metrics(path) == [{"env_step": 100}, {"env_step": 200}]


@pytest.mark.parametrize("text, line", [('{"env_step": 100}\n{"env_st\n{"env_step": 300}\n', 2),
                                        ('{"env_step": 100}\n[1, 2]\n', 2),
                                        ('{"env_step": 100}\n{"env_step": 2\n', 2)])  # complete, yet not JSON
def test_read_metrics_names_a_corrupt_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(RunError, match=rf"metrics\.jsonl:{line}: not a JSON evaluation record"):
        read_metrics(path)


# ---- end to end ---------------------------------------------------------------------------------


def test_tiny_training_writes_run_files_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(_config_file(tmp_path)), "--out", str(run), "--seed", "5"]) == 0
    bars = capsys.readouterr().err  # a bar per phase: the learning bar's time estimate is not the random phase's
    assert "random actions:" in bars and "learning:" in bars
    for name in ("config.yaml", "metrics.jsonl", "train.log", "learning_curve.png", "checkpoints/latest.pt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp*")), "atomic writes left temporary files"
    assert load_config(run / "config.yaml").train.seed == 5  # resolved config includes the override
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["env_step"] for r in rows] == [100, 200]
    assert all(math.isfinite(x) for r in rows for x in r["eval_returns"])
    # the critic's bias is logged once it has trained (this policy drops the pole well inside the 60-step limit)
    assert rows[0]["critic_bias"] is None and math.isfinite(rows[-1]["critic_bias"])
    trained = rows[-1]
    assert trained["losses"]["q_loss"] > 0 and math.isfinite(trained["losses"]["policy_loss"])
    assert trained["model"], "the ensemble was never fitted"
    assert trained["buffer_env"] == 200 and trained["buffer_model"] > 0
    assert set(trained["phase_time_s"]) >= {"env", "model_fit", "rollout", "update", "eval", "checkpoint"}
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    # the same evaluations as TensorBoard events: returns, losses, alpha, model error, timings
    for tag in ("eval/return_mean", "eval/return_std", "update/q_loss", "update/policy_loss", "update/alpha",
                "model/holdout_mse", "time/update_cpu_s", "time/env_steps_per_s"):
        assert [step for step, _ in _tb_scalars(run, tag)] == [100, 200], tag
    assert [v for _, v in _tb_scalars(run, "eval/return_mean")] == pytest.approx(
        [r["eval_return_mean"] for r in rows])

    loaded = load_run(run)
    assert loaded.env_step == 200 and loaded.config.env.id == "InvertedPendulum-v5"
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "InvertedPendulum-v5 after 200 env steps: return" in out and "±" in out


def test_same_seed_same_first_evaluation(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(train={"total_steps": 100, "initial_random_steps": 60}))
    first = [train(cfg, tmp_path / f"run{i}", progress=False) for i in range(2)]
    rows = [read_metrics(tmp_path / f"run{i}" / "metrics.jsonl")[0] for i in range(2)]
    assert rows[0]["eval_returns"] == rows[1]["eval_returns"]
    assert rows[0]["losses"] == rows[1]["losses"]  # the G2 updates before it were identical too
    for a, b in zip(first[0].agent.actor.parameters(), first[1].agent.actor.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_continues_buffers_counters_and_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _config_file(tmp_path)
    assert cli.main(["train", "--config", str(config), "--out", str(run), "--steps", "100"]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["env_step"] == 100 and ckpt["d_env"]["size"] == 100
    # An evaluation written after the checkpoint by a process that then died must not be duplicated.
    # A line torn by a kill mid-write must not break the resume either.
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"env_step": 150, "eval_return_mean": 0.0, "eval_return_std": 0.0}) + "\n")
        f.write('{"env_step": 160, "eval_ret')

    assert cli.main(["train", "--resume", str(run), "--steps", "200"]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["env_step"] == 200
    assert ckpt["d_env"]["size"] == ckpt["d_env"]["total_added"] == 200  # restored, then continued: not refilled
    assert [r["env_step"] for r in read_metrics(run / "metrics.jsonl")] == [100, 200]
    assert load_config(run / "config.yaml").train.total_steps == 200
    assert "resumed from" in (run / "train.log").read_text()


def test_training_stops_once_the_target_return_holds_for_the_asked_evaluations(tmp_path: Path) -> None:
    """Every InvertedPendulum episode returns at least 1, so stop_return 1 holds from the first evaluation on."""
    run = tmp_path / "run"
    cfg = config_from_dict(tiny(train={"total_steps": 400, "eval_every": 50, "stop_return": 1.0, "stop_evals": 2}))
    trainer = train(cfg, run, progress=False)
    assert trainer.env_step == 100 and load_checkpoint(run / "checkpoints" / "latest.pt")["env_step"] == 100
    assert [r["env_step"] for r in read_metrics(run / "metrics.jsonl")] == [50, 100]
    assert "stopped at env step 100" in (run / "train.log").read_text()
    assert train(cfg, run, resume=True, progress=False).env_step == 100  # a resume does not train past the stop
    never = config_from_dict(tiny(train={"total_steps": 150, "eval_every": 50, "stop_return": 1e9}))
    assert train(never, tmp_path / "never", progress=False).env_step == 150


def test_every_start_records_the_cores_and_threads_it_ran_with(tmp_path: Path) -> None:
    from maac_robot.learn.trainer import available_cores, default_threads

    run = tmp_path / "run"
    config = _config_file(tmp_path)
    assert cli.main(["train", "--config", str(config), "--out", str(run), "--steps", "60",
                     "--set", "train.num_threads=null"]) == 0
    assert cli.main(["train", "--resume", str(run), "--steps", "80"]) == 0
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert [s["env_step"] for s in sessions] == [0, 60]
    assert all(s["cores_available"] == available_cores() for s in sessions)
    assert all(s["torch_threads"] == default_threads(s["cores_available"], s["cores_busy"]) for s in sessions)
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
    # the cores other processes are running on are left to them; at least one thread always
    assert default_threads(4, 0) == 4 and default_threads(4, 3) == 1 and default_threads(2, 5) == 1


def test_resume_appends_to_the_event_files_without_repeating_steps(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    config = _config_file(tmp_path, tiny(train={"eval_every": 50}))
    assert cli.main(["train", "--config", str(config), "--out", str(run), "--steps", "100"]) == 0
    with SummaryWriter(str(run / "tensorboard")) as dead:  # what a process killed after its checkpoint logged
        dead.add_scalar("eval/return_mean", -12345.0, 150)
    assert cli.main(["train", "--resume", str(run), "--steps", "200"]) == 0
    logged = _tb_scalars(run, "eval/return_mean")
    assert [step for step, _ in logged] == [50, 100, 150, 200]
    assert -12345.0 not in [v for _, v in logged]
    assert [v for _, v in logged] == pytest.approx([r["eval_return_mean"] for r in read_metrics(run / "metrics.jsonl")])


def test_wandb_is_used_only_when_asked_and_refused_clearly_when_missing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    calls: list[tuple[str, object]] = []

    class FakeRun:
        def log(self, values: dict, step: int) -> None:
            calls.append(("log", step))

        def finish(self) -> None:
            calls.append(("finish", None))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw["id"])) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = _config_file(tmp_path)
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "off"), "--steps", "100"]) == 0
    assert calls == []  # installed but not asked for: unused
    run = tmp_path / "on"
    assert cli.main(["train", "--config", str(config), "--out", str(run), "--steps", "100",
                     "--set", "train.wandb=true"]) == 0
    run_id = (run / "wandb_id").read_text().strip()
    assert calls == [("init", run_id), ("log", 100), ("finish", None)]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError, match="wandb is not installed"):
        train(config_from_dict(tiny(train={"wandb": True})), tmp_path / "missing", progress=False)


def test_ctrl_c_checkpoints_prints_the_resume_command_and_resumes(tmp_path: Path) -> None:
    """SIGINT to a training process: it stops between env steps, saves that step and says how to continue."""
    run = tmp_path / "run"
    data = tiny(train={"total_steps": 100_000, "checkpoint_every": 1000, "eval_every": 50,
                        "initial_random_steps": 100})
    cmd = [sys.executable, "-m", "maac_robot.cli", "train", "--config", str(_config_file(tmp_path, data)),
           "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(read_metrics(run / "metrics.jsonl")) < 3:
            time.sleep(0.3)
        assert len(read_metrics(run / "metrics.jsonl")) >= 3, "no evaluation at step 150 within 240 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    step = load_checkpoint(run / "checkpoints" / "latest.pt")["env_step"]  # not a multiple of checkpoint_every
    assert (f"interrupted at env step {step}; checkpoint saved; continue with: maac-robot train --resume {run}"
            in err), err
    assert "interrupted at env step" in (run / "train.log").read_text()
    assert cli.main(["train", "--resume", str(run), "--steps", str(step + 60)]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["env_step"] == ckpt["d_env"]["total_added"] == step + 60
    steps = [r["env_step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == step + 60
    assert [s for s, _ in _tb_scalars(run, "eval/return_mean")] == steps


def test_kill_9_then_resume(tmp_path: Path) -> None:
    """A real SIGKILL mid-run: the atomic checkpoint survives and the run continues from it."""
    run = tmp_path / "run"
    data = tiny(train={"total_steps": 100_000, "checkpoint_every": 50, "eval_every": 50,
                        "initial_random_steps": 100})
    cmd = [sys.executable, "-m", "maac_robot.cli", "train", "--config", str(_config_file(tmp_path, data)),
           "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240  # generous: a loaded CI box can take a minute to import torch
        while time.monotonic() < deadline:
            path = run / "checkpoints" / "latest.pt"
            if path.is_file() and load_checkpoint(path)["env_step"] >= 150:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint at step >= 150 within 240 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    step = load_checkpoint(run / "checkpoints" / "latest.pt")["env_step"]
    target = step + 50
    assert cli.main(["train", "--resume", str(run), "--steps", str(target)]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["env_step"] == ckpt["d_env"]["total_added"] == target
    steps = [r["env_step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == target


def test_model_free_ablation_skips_the_model(tmp_path: Path) -> None:
    """horizon 0 + no STEVE + real data only is SAC: no ensemble fit, no imagined data."""
    cfg = config_from_dict(tiny(agent={"horizon": 0, "steve": False, "real_data_only": True},
                                 train={"total_steps": 150}))
    trainer = train(cfg, tmp_path / "run", progress=False)
    assert not trainer.model_fitted and len(trainer.d_model) == 0
    assert trainer.update_count == 0 and trainer.env_step == 150  # losses were reported at the last eval
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["model"] == {} and math.isfinite(row["losses"]["policy_loss"])


@pytest.mark.parametrize("real_ratio", [0.0, 1.0])
def test_real_ratio_extremes_train(tmp_path: Path, real_ratio: float) -> None:
    """All-imagined or all-real G2 batches: the empty side of the split must not break an update."""
    cfg = config_from_dict(tiny(agent={"real_ratio": real_ratio}, train={"total_steps": 120}))
    trainer = train(cfg, tmp_path / "run", progress=False)
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["env_step"] == 120 and math.isfinite(row["losses"]["q_loss"]) and len(trainer.d_model) > 0


def test_bfloat16_updates_keep_float32_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """precision: bfloat16 autocasts G2's matrix products only; weights (so checkpoints and exports) stay float32."""
    monkeypatch.setattr("maac_robot.learn.trainer.cpu_has_bf16", lambda: True)  # run the bf16 path on any CPU
    trainers, losses = {}, {}
    for precision in ("float32", "bfloat16"):
        cfg = config_from_dict(tiny(train={"total_steps": 120, "precision": precision}))
        trainers[precision] = train(cfg, tmp_path / precision, progress=False)
        losses[precision] = read_metrics(tmp_path / precision / "metrics.jsonl")[-1]["losses"]
    assert all(math.isfinite(v) for v in losses["bfloat16"].values())
    assert losses["bfloat16"]["q_loss"] != losses["float32"]["q_loss"]  # same seed: only the rounding differs
    agent = trainers["bfloat16"].agent
    assert {p.dtype for m in (agent.actor, agent.critic) for p in m.parameters()} == {torch.float32}


def test_bfloat16_without_native_support_falls_back_to_float32_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("maac_robot.learn.trainer.cpu_has_bf16", lambda: False)
    caplog.set_level(logging.WARNING, logger="maac_robot.learn.trainer")
    losses = {}
    for precision in ("float32", "bfloat16"):
        cfg = config_from_dict(tiny(train={"total_steps": 120, "precision": precision}))
        assert train(cfg, tmp_path / precision, progress=False).precision == "float32"
        losses[precision] = read_metrics(tmp_path / precision / "metrics.jsonl")[-1]["losses"]
    assert losses["bfloat16"] == losses["float32"]  # what ran is float32, bit for bit
    assert "no native bfloat16" in caplog.text and "float32 instead" in caplog.text


class _FallingPole:
    """Stand-in dynamics: every step tips half of the surviving branches past the pendulum's 0.2 rad limit."""

    learn_reward = False

    def step(self, state: torch.Tensor, action: torch.Tensor, *, sample: bool = True,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, None]:
        next_state = state.clone()
        next_state[: len(state) // 2, 1] = 1.0  # pole angle
        next_state[len(state) // 2:, 1] = 0.0
        return next_state, None


def test_imagined_rollouts_stop_terminated_branches(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(rollout={"length": 3, "batch_size": 64}))
    trainer = Trainer(cfg, tmp_path)
    for _ in range(100):
        trainer._env_step()
    trainer.model = _FallingPole()  # type: ignore[assignment]
    trainer.imagine()
    # 64 branches, then the 32 that survived step 1, then the 16 that survived step 2.
    assert len(trainer.d_model) == 64 + 32 + 16
    assert int(trainer.d_model.terminated[: len(trainer.d_model)].sum()) == 32 + 16 + 8
    stored = trainer.d_model.arrays()
    assert np.array_equal(stored["terminated"], np.abs(stored["next_state"][:, 1]) > 0.2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train"], "exactly one of --config"),
        (["train", "--config", "{cfg}", "--resume", "{tmp}"], "exactly one of --config"),
        (["train", "--config", "{tmp}/missing.yaml"], "config file not found"),
        (["train", "--resume", "{tmp}/nowhere"], "run directory not found"),
        (["train", "--resume", "{tmp}"], "not a run directory"),
        (["train", "--resume", "{tmp}/fresh"], "has no checkpoint yet"),
        (["train", "--resume", "{tmp}/fresh", "--seed", "1"], "--seed cannot change a run being resumed"),
        (["train", "--config", "{cfg}", "--out", "{tmp}/used"], "already holds a run"),
        (["train", "--config", "{cfg}", "--device", "gpu"], "train.device"),
        pytest.param(["train", "--config", "{cfg}", "--out", "{tmp}/gpu", "--device", "cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        (["evaluate", "{tmp}/fresh"], "has no checkpoint yet"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                       message: str) -> None:
    cfg = _config_file(tmp_path)
    for name in ("fresh", "used"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(cfg.read_text())
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    argv = [a.format(cfg=cfg, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "gpu").exists(), "a refused run must not leave a run directory behind"


def test_evaluate_states_its_seeds_repeats_the_training_curve_and_records_video(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(_config_file(tmp_path)), "--out", str(run), "--steps", "100"]) == 0
    row = read_metrics(run / "metrics.jsonl")[-1]
    curve = eval_seeds(3, 2)  # TINY: train.seed 3, train.eval_episodes 2
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--episodes", "2"]) == 0
    printed = capsys.readouterr()
    assert "reset seeds 10000..10001, --seeds default" in printed.out
    assert f"other reset seeds, {curve[0]}..{curve[1]}" in printed.out and "--seeds training" in printed.out
    assert "evaluate: [2/2] reset seed 10001: return" in printed.err  # progress, one line an episode
    assert cli.main(["evaluate", str(run), "--seeds", "training"]) == 0
    out = capsys.readouterr().out
    # the training curve's own seeds give the training curve's own number
    assert f"return {row['eval_return_mean']:.1f} ± {row['eval_return_std']:.1f} over 2 episodes" in out
    assert f"the training curve read {row['eval_return_mean']:.1f}" in out
    assert cli.main(["evaluate", str(run), "--seeds", "training", "--seed", "5"]) == 2
    pytest.importorskip("imageio_ffmpeg", reason="--video needs the [render] extra")
    video = tmp_path / "eval.mp4"
    assert cli.main(["evaluate", str(run), "--episodes", "1", "--video", str(video)]) == 0
    import imageio.v3 as iio

    length = int(capsys.readouterr().err.split(" in ")[-1].split()[0])
    assert sum(1 for _ in iio.imiter(video)) == length + 1  # the reset, then one frame a step
