"""The `--device cuda` path: train, resume, evaluate and diagnose on a GPU. Skipped where CUDA is absent
(CI and this project's machines have none); run it wherever a GPU is at hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from maac_robot import cli
from maac_robot.learn.config import config_from_dict
from maac_robot.learn.diagnostics import diagnose
from maac_robot.learn.evaluation import mean_critic_bias
from maac_robot.learn.trainer import Trainer, load_checkpoint, load_run, read_metrics, train

from test_trainer import _config_file
from tiny_configs import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_resume_evaluate_diagnose_on_cuda(tmp_path: Path, precision: str) -> None:
    run = tmp_path / "run"
    data = tiny(train={"device": "cuda", "precision": precision})
    assert cli.main(["train", "--config", str(_config_file(tmp_path, data)), "--out", str(run), "--steps", "100"]) == 0
    assert cli.main(["train", "--resume", str(run), "--steps", "200"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["env_step"] for r in rows] == [100, 200]
    assert math.isfinite(rows[-1]["losses"]["policy_loss"]) and math.isfinite(rows[-1]["critic_bias"])
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["d_env"]["size"] == 200
    loaded = load_run(run)  # a GPU checkpoint loads on the CPU, where export and the controller run
    assert next(loaded.agent.actor.parameters()).device.type == "cpu"
    assert cli.main(["evaluate", str(run), "--episodes", "2"]) == 0
    assert len(diagnose(loaded, [5])) == 1


def test_critic_bias_leaves_the_cuda_rng_alone(tmp_path: Path) -> None:
    trainer = Trainer(config_from_dict(tiny(train={"device": "cuda"})), tmp_path / "run")
    state = torch.cuda.get_rng_state()
    mean_critic_bias(trainer.agent, "InvertedPendulum-v5", [5, 6], 0.99, 60)
    assert torch.equal(torch.cuda.get_rng_state(), state)  # evaluations must not restart the GPU noise stream


def test_train_function_on_cuda_keeps_weights_there(tmp_path: Path) -> None:
    trainer = train(config_from_dict(tiny(train={"device": "cuda", "total_steps": 150})), tmp_path / "r", progress=False)
    assert {p.device.type for p in trainer.agent.actor.parameters()} == {"cuda"}
    assert {p.device.type for p in trainer.model.parameters()} == {"cuda"}
