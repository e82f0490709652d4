"""ONNX export: signatures, parity with PyTorch, the fused plan graph's semantics, export from a run.

Parity tolerance (float32): |onnxruntime − PyTorch| ≤ PARITY_ATOL + PARITY_RTOL·|PyTorch| = 1e-4 + 1e-4·|x|
per element, for every output of every graph, at batch sizes other than the one used for export.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from maac_robot import cli
from maac_robot.learn import export
from maac_robot.runtime.artifacts import GRAPH_NAMES, load_artifacts
from maac_robot.learn.config import config_from_dict, save_config
from maac_robot.learn.export import (
    OPSET,
    PARITY_ATOL,
    PARITY_RTOL,
    ExportError,
    assert_exported_shapes,
    build_graphs,
)
from maac_robot.learn.trainer import RunPaths, Trainer

from tests.export_fixtures import Components, export_components, random_components

RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


@pytest.fixture(scope="module")
def cheetah(tmp_path_factory: pytest.TempPathFactory) -> tuple[Components, Path]:
    """Closed-form reward, never terminates (HalfCheetah-v5 dims: state 18 incl. root x, action 6)."""
    c = random_components("HalfCheetah-v5", seed=1)
    out = tmp_path_factory.mktemp("export") / "cheetah"
    export_components(c, out)
    return c, out


@pytest.fixture(scope="module")
def hopper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Components, Path]:
    """Learned reward (ensemble output + logvar) and a real termination function (Hopper-v5)."""
    c = random_components("Hopper-v5", learned_reward=True, seed=2, num_models=4, num_elites=2)
    out = tmp_path_factory.mktemp("export") / "hopper"
    export_components(c, out)
    return c, out


def _close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=PARITY_RTOL, atol=PARITY_ATOL, err_msg=what)


@pytest.mark.parametrize("which", ["cheetah", "hopper"])
def test_graph_files_pin_opset_have_metadata_and_no_random_ops(which: str, request: pytest.FixtureRequest) -> None:
    _, out = request.getfixturevalue(which)
    manifest = load_artifacts(out, warm_up=False).manifest
    for graph in GRAPH_NAMES:
        proto = onnx.load(out / f"{graph}.onnx")
        assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
        ops = {n.op_type for n in proto.graph.node}
        assert not ops & RANDOM_OPS, f"{graph}.onnx contains random ops {ops & RANDOM_OPS}"
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["graph"] == graph and json.loads(meta["env_id"]) == manifest.env_id
        assert json.loads(meta["plan_horizon"]) == manifest.plan_horizon
        assert_exported_shapes(proto, manifest, graph)


def test_exported_dynamic_axes_are_exactly_the_batch_axes(cheetah: tuple[Components, Path]) -> None:
    _, out = cheetah

    def shapes(graph: str) -> dict[str, list[int | str]]:
        proto = onnx.load(out / f"{graph}.onnx")
        return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in [*proto.graph.input, *proto.graph.output]}

    policy, plan = shapes("policy"), shapes("plan")
    # the policy takes what the actor reads (HalfCheetah's state without root x), the other graphs the full state
    assert policy["net_obs"] == ["batch", 17] and policy["noise"] == ["batch", 6] and policy["action"] == ["batch", 6]
    assert shapes("ensemble")["next_state_mean"] == [5, "batch", 18]
    assert plan["state"] == [18] and plan["actions"] == ["3*particles_per_elite", 3, 6]
    # the same check refuses a graph whose batch axis was frozen to the export example's size
    proto = onnx.load(out / "q.onnx")
    proto.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 3
    with pytest.raises(ExportError, match=r"q\.onnx: exported input 'action' has shape \[3, 6\]"):
        assert_exported_shapes(proto, load_artifacts(out, warm_up=False).manifest, "q")


@pytest.mark.parametrize("which", ["cheetah", "hopper"])
@pytest.mark.parametrize("batch", [1, 17])
def test_parity_every_output(which: str, batch: int, request: pytest.FixtureRequest) -> None:
    c, out = request.getfixturevalue(which)
    art = load_artifacts(out)
    m = art.manifest
    graphs = build_graphs(c.task, c.actor, c.critic, c.model, gamma=c.gamma, plan_horizon=m.plan_horizon)
    g = torch.Generator().manual_seed(batch)
    state = 1.0 + 2.0 * torch.randn(batch, m.state_dim, generator=g)
    noise = torch.randn(batch, m.act_dim, generator=g)
    actions = torch.rand(batch * m.num_elites, m.plan_horizon, m.act_dim, generator=g) * 2 - 1
    with torch.inference_mode():
        want = {"policy": graphs["policy"](state, noise), "ensemble": graphs["ensemble"](state, noise),
                "q": graphs["q"](state, noise.tanh()), "plan": graphs["plan"](state[0], actions)}
    got_policy = art.policy(state.numpy(), noise.numpy())
    got_ensemble = art.ensemble(state.numpy(), noise.numpy())
    got_q = art.q(state.numpy(), noise.tanh().numpy())
    for name, got, ref in zip(("mean", "log_std", "action"), got_policy, want["policy"], strict=True):
        _close(got, ref, f"policy.{name}")
    assert list(got_ensemble) == (["next_state_mean", "next_state_logvar", "reward"] + (
        ["reward_logvar"] if m.reward == "learned" else []))
    for (name, got), ref in zip(got_ensemble.items(), want["ensemble"], strict=True):
        _close(got, ref, f"ensemble.{name}")
    for name, got, ref in zip(("q1", "q2"), got_q, want["q"], strict=True):
        _close(got, ref, f"q.{name}")
    _close(art.plan(state[0].numpy(), actions.numpy()), want["plan"], "plan.returns")


def test_policy_graph_is_the_actor(cheetah: tuple[Components, Path]) -> None:
    """Graph outputs equal the actor's own forward / sample(noise) / deterministic (not just the wrapper)."""
    c, out = cheetah
    art = load_artifacts(out)
    g = torch.Generator().manual_seed(5)
    state, noise = torch.randn(9, 18, generator=g), torch.randn(9, 6, generator=g)
    mean, log_std, action = art.policy(state.numpy(), noise.numpy())
    with torch.inference_mode():
        ref_mean, ref_log_std = c.actor(state)
        _close(mean, ref_mean, "mean")
        _close(log_std, ref_log_std, "log_std")
        _close(action, c.actor.sample(state, noise)[0], "action")
        _close(art.policy(state.numpy(), np.zeros((9, 6), np.float32))[2], c.actor.deterministic(state), "noise 0")


def _reference_returns(c: Components, state: torch.Tensor, actions: torch.Tensor, horizon: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Particle by particle, through `predict_all` (not the batched path the graph uses): returns, alive."""
    elites = c.model.elites.tolist()
    returns, alive_end = [], []
    for i, seq in enumerate(actions):
        member = elites[i % len(elites)]
        s, ret, alive = state[None], 0.0, 1.0
        for t in range(horizon):
            a = seq[t : t + 1]
            mean, _, learned, _ = c.model.predict_all(s, a)
            nxt = mean[member]
            r = learned[member] if c.task.reward_fn is None else c.task.reward_fn(s, a, nxt)
            ret += c.gamma**t * alive * float(r)
            alive *= 0.0 if bool(c.task.termination_fn(s, a, nxt)) else 1.0
            s = nxt
        q1, q2 = c.critic(s, c.actor.deterministic(s))
        returns.append(ret + c.gamma**horizon * alive * float(torch.minimum(q1, q2)))
        alive_end.append(alive)
    return torch.tensor(returns), torch.tensor(alive_end)


@pytest.mark.parametrize("which", ["cheetah", "hopper"])
def test_plan_graph_semantics_particle_i_uses_elite_i_mod_e(which: str, request: pytest.FixtureRequest) -> None:
    c, out = request.getfixturevalue(which)
    art = load_artifacts(out)
    m = art.manifest
    assert m.elites == c.model.elites.tolist()
    g = torch.Generator().manual_seed(11)
    actions = torch.rand(4 * m.num_elites, m.plan_horizon, m.act_dim, generator=g) * 2 - 1
    state = torch.zeros(m.state_dim)
    state[1] = 1.25  # Hopper: healthy height; the torso angle (limit 0.2) decides who terminates
    for angle in np.linspace(0.0, 0.2, 21):  # the first start angle where some particles terminate, some survive
        state[2] = float(angle)
        with torch.inference_mode():
            want, alive = _reference_returns(c, state, actions, m.plan_horizon)
        if not m.terminates or 0 < alive.sum() < len(alive):
            break
    else:
        pytest.fail(f"no start angle gives a mix of terminated and surviving particles: alive {alive.tolist()}")
    np.testing.assert_allclose(art.plan(state.numpy(), actions.numpy()), want.numpy(), rtol=PARITY_RTOL,
                               atol=PARITY_ATOL)
    # members really differ, so a wrong particle->member mapping could not pass
    shifted = torch.roll(actions, 1, dims=0)
    assert not np.allclose(art.plan(state.numpy(), shifted.numpy()), torch.roll(want, 1).numpy(), rtol=1e-3)


def test_export_options_are_checked(cheetah: tuple[Components, Path], tmp_path: Path) -> None:
    c, _ = cheetah
    with pytest.raises(ExportError, match="plan_horizon must be >= 1"):
        export_components(Components(c.task, c.actor, c.critic, c.model, horizon=0), tmp_path / "a")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to overwrite .*precious: it exists and is not an artifact"):
        export_components(c, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_export_refuses_to_publish_without_parity(cheetah: tuple[Components, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With a zero tolerance, float32 kernel differences fail parity: nothing is published, nothing left over."""
    monkeypatch.setattr(export, "PARITY_ATOL", 0.0)
    monkeypatch.setattr(export, "PARITY_RTOL", 0.0)
    with pytest.raises(ExportError, match="onnxruntime and PyTorch disagree beyond rtol=0.0, atol=0.0"):
        export_components(cheetah[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == [], "a failed export left files behind"


def test_cli_export_from_a_run_then_reexport_with_other_plan_horizon(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_from_dict({
        "env": {"id": "InvertedPendulum-v5"},
        "model": {"num_models": 3, "num_elites": 2, "hidden": 16, "layers": 2},
        "agent": {"horizon": 2, "hidden": 16},
        "train": {"num_threads": 1, "seed": 4}})
    run, out = tmp_path / "run", tmp_path / "artifacts"
    trainer = Trainer(cfg, run)
    run.mkdir()
    save_config(cfg, RunPaths(run).config)
    trainer.save_checkpoint()
    umask = os.umask(0o022)
    try:
        assert cli.main(["export", str(run), "--out", str(out)]) == 0
    finally:
        os.umask(umask)
    printed = capsys.readouterr()
    assert "exported InvertedPendulum-v5" in printed.out
    steps = [line for line in printed.err.splitlines() if line.startswith("export: [")]  # progress, one line a step
    assert steps[0] == "export: [1/5] policy.onnx" and steps[-1].startswith("export: [5/5] verifying")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not tempfile.mkdtemp's 0700: others may read artifacts
    first = load_artifacts(out, expected_env_id="InvertedPendulum-v5").manifest
    assert (first.horizon, first.plan_horizon, first.train_steps, first.terminates) == (2, 2, 0, True)
    assert first.config == cfg.model_dump(mode="json") and first.gamma == cfg.agent.gamma
    assert cli.main(["export", str(run), "--out", str(out), "--plan-horizon", "5"]) == 0
    art = load_artifacts(out)
    assert (art.manifest.horizon, art.manifest.plan_horizon) == (2, 5)
    assert art.plan(np.zeros(4), np.zeros((3, 5, 1))).shape == (3,)
    assert all(math.isfinite(x) for x in art.plan(np.zeros(4), np.zeros((2, 5, 1))))
