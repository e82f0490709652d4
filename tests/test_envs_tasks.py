"""Closed-form rewards/terminations against the envs' own, on real transitions; the state convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maac_robot.envs import EnvError, env_info, make_env
from maac_robot.learn.tasks import get_task

BUILTIN = ["InvertedPendulum-v5", "Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5"]
ROOT_DIMS = {"InvertedPendulum-v5": 0, "Hopper-v5": 1, "HalfCheetah-v5": 1, "Walker2d-v5": 1, "Ant-v5": 2}
SENSOR_DIMS = {"Ant-v5": 78}  # trailing dims neither networks see nor the ensemble predicts: Ant's contact forces


def rollout(env_id: str, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random-action transitions with the env's reward, termination and reported x-velocity."""
    env = make_env(env_id, seed=seed)
    state, _ = env.reset(seed=seed)
    keys = ("state", "action", "next_state", "reward", "terminated", "x_velocity")
    data: dict[str, list] = {k: [] for k in keys}
    for _ in range(steps):
        action = env.action_space.sample()
        next_state, reward, terminated, truncated, info = env.step(action)
        for k, v in zip(keys, (state, action, next_state, reward, terminated, info.get("x_velocity", np.nan))):
            data[k].append(v)
        state = env.reset()[0] if terminated or truncated else next_state
    env.close()
    return {k: np.asarray(v) for k, v in data.items()}


@pytest.fixture(scope="module", params=BUILTIN)
def transitions(request) -> tuple[str, dict[str, np.ndarray]]:
    return request.param, rollout(request.param, steps=400)


def _apply(env_id: str, d: dict[str, np.ndarray], dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    task = get_task(env_id)
    s, a, s2 = (torch.as_tensor(d[k], dtype=dtype) for k in ("state", "action", "next_state"))
    return task.reward_fn(s, a, s2).double().numpy(), task.termination_fn(s, a, s2).numpy()


def test_termination_matches_env(transitions):
    env_id, d = transitions
    _, done = _apply(env_id, d, torch.float64)
    assert done.dtype == np.bool_ and done.shape == d["terminated"].shape
    np.testing.assert_array_equal(done, d["terminated"])
    if env_id in ("InvertedPendulum-v5", "Hopper-v5", "Walker2d-v5"):
        assert d["terminated"].any(), "random actions should end some episodes, so both outcomes are checked"


def test_reward_matches_env(transitions):
    env_id, d = transitions
    reward, _ = _apply(env_id, d, torch.float64)
    err = np.abs(reward - d["reward"])
    # The env squares the float32 action in float32, so its ctrl cost carries ~1e-7 rounding; hence 1e-6.
    if env_id == "Ant-v5":
        # Ant's env reward lags by one physics substep (torso xpos, see tasks.py); every other term is exact,
        # so our error must be exactly the difference of the two x-velocities, which itself stays small.
        vx = (d["next_state"][:, 0] - d["state"][:, 0]) / env_info(env_id).dt
        np.testing.assert_allclose(reward - d["reward"], vx - d["x_velocity"], atol=1e-6)
        assert err.mean() < 0.02 and err.max() < 0.5
    else:
        assert err.max() < 1e-6
    # float32 (what training uses): root x differences lose a little precision, nothing more
    reward32, _ = _apply(env_id, d, torch.float32)
    assert np.abs(reward32 - reward).max() < 1e-3


def test_reward_is_differentiable_in_action_and_next_state():
    for env_id in BUILTIN[1:]:  # InvertedPendulum's reward is 1 per surviving step: piecewise constant
        info = env_info(env_id)
        s = torch.zeros(5, info.state_dim, dtype=torch.float64)
        s2 = torch.zeros(5, info.state_dim, dtype=torch.float64, requires_grad=True)
        a = torch.full((5, info.act_dim), 0.3, dtype=torch.float64, requires_grad=True)
        get_task(env_id).reward_fn(s, a, s2).sum().backward()
        assert a.grad.abs().sum() > 0 and s2.grad[:, 0].abs().sum() > 0


def test_halfcheetah_never_terminates():
    task = get_task("HalfCheetah-v5")
    s = torch.randn(64, task.info.state_dim) * 1e3
    s[0] = float("nan")
    assert not task.termination_fn(s, torch.zeros(64, task.info.act_dim), s).any()
    assert not task.info.terminates
    assert all(get_task(e).info.terminates for e in BUILTIN if e != "HalfCheetah-v5")


def test_ant_termination_rule():
    task = get_task("Ant-v5")
    s = torch.zeros(4, task.info.state_dim)
    s[:, 2] = torch.tensor([0.5, 0.1, 1.2, 0.5])
    s[3, 20] = float("inf")  # a non-finite velocity ends the episode; the contact dims are not checked
    assert task.termination_fn(s, torch.zeros(4, 8), s).tolist() == [False, True, True, True]


@pytest.mark.parametrize("env_id", BUILTIN)
def test_state_holds_root_position_and_networks_do_not_see_it(env_id):
    env = make_env(env_id, seed=1)
    state, _ = env.reset(seed=1)
    for _ in range(5):
        state = env.step(env.action_space.sample())[0]
    info = env_info(env_id)
    k = ROOT_DIMS[env_id]
    np.testing.assert_array_equal(state[:k], env.unwrapped.data.qpos[:k])
    end = info.state_dim - SENSOR_DIMS.get(env_id, 0)
    assert info.net_obs_idx == tuple(range(k, end))
    assert info.modelled_idx == tuple(range(end))  # the root position the reward reads + what networks see
    if env_id == "Ant-v5":  # what is hidden is exactly the contact forces; the networks see the papers' 27 dims
        np.testing.assert_array_equal(state[end:], env.unwrapped.contact_forces[1:].flatten())  # [0]: world body
        assert len(info.net_obs_idx) == 27
    assert state.shape == (info.state_dim,) and info.dt == env.unwrapped.dt
    env.close()


def test_unknown_env_learns_reward_and_termination_unless_declared_never_terminating():
    """Not built in, nothing registered: the ensemble learns the reward and a termination head (no longer the
    silent "never terminates"); `env.terminates: false` declares the env never terminates."""
    from maac_robot.learn.tasks import LearnedTermination

    task = get_task("Pendulum-v1")
    assert task.reward_fn is None and task.info.terminates and isinstance(task.termination_fn, LearnedTermination)
    assert task.termination == "learned"
    assert task.info.net_obs_idx == (0, 1, 2) and task.info.dt == pytest.approx(0.05)
    never = get_task("Pendulum-v1", terminates=False)
    assert never.reward_fn is None and not never.info.terminates and never.termination == "never"
    s = torch.zeros(3, 3)
    assert not never.termination_fn(s, torch.zeros(3, 1), s).any()


@pytest.mark.parametrize("env_id,match", [("NoSuchEnv-v0", "unknown"), ("CartPole-v1", "Box")])
def test_bad_env_ids_fail_clearly(env_id, match):
    with pytest.raises(EnvError, match=match):
        make_env(env_id)


def test_reward_and_termination_export_to_onnx(tmp_path):
    """All five tasks' reward and termination in one exported graph, checked in onnxruntime on real data
    at a batch size other than the one traced (the batch axis must stay dynamic)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    tasks = [get_task(env_id) for env_id in BUILTIN]

    class RewardDone(torch.nn.Module):
        def forward(self, *transitions: torch.Tensor) -> list[torch.Tensor]:
            out = []
            for task, i in zip(tasks, range(0, len(transitions), 3)):
                out += [task.reward_fn(*transitions[i:i + 3]), task.termination_fn(*transitions[i:i + 3])]
            return out

    inputs = []
    for env_id in BUILTIN:
        d = rollout(env_id, steps=40)
        inputs += [torch.as_tensor(d[k], dtype=torch.float32) for k in ("state", "action", "next_state")]
    path = tmp_path / "reward.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(RewardDone().eval(), tuple(x[:20] for x in inputs), path, dynamo=True,
                      dynamic_shapes=(tuple({0: batch} for _ in inputs),))  # one entry: the *transitions
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})
    for got, want in zip(outputs, RewardDone()(*inputs)):
        assert got.shape == (40,)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
