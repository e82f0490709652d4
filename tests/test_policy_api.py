"""The SB3-style API: `Policy` (onnxruntime only) and `MAAC` (the trainer's facade), fed plain Gymnasium
observations, and the manifest's `state_layout`, which must let a third party with only manifest.json,
onnxruntime and Gymnasium rebuild the state and run the policy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

import maac_robot
from maac_robot import MAAC, Policy
from maac_robot.envs import ENV_KWARGS, env_info, state_layout
from maac_robot.learn.trainer import RunError
from maac_robot.runtime.artifacts import ArtifactError, FORMAT_VERSION, load_artifacts
from maac_robot.runtime.policy import to_net_obs
from tests.export_fixtures import Components, export_components, random_components
from tiny_configs import tiny

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("InvertedPendulum-v5", "Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5")
TINY = tiny(train={"total_steps": 150, "eval_every": 150, "checkpoint_every": 150})  # one model fit, 50 updates


@pytest.fixture(scope="module", params=["InvertedPendulum-v5", "Hopper-v5"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Components, Path]:
    c = random_components(request.param, seed=4, num_models=3, num_elites=2, hidden=16)
    out = tmp_path_factory.mktemp("policy") / request.param
    export_components(c, out)
    return c, out


def _episode(env_id: str, steps: int, seed: int = 7, **kwargs: object) -> np.ndarray:
    """Observations of `gym.make(env_id, **kwargs)` along one seeded random-action path (the same path for any
    kwargs: the actions come from a generator of their own)."""
    env = gym.make(env_id, **kwargs)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    seen = [obs]
    for _ in range(steps - 1):
        obs, _, terminated, truncated, _ = env.step(rng.uniform(env.action_space.low, env.action_space.high))
        if terminated or truncated:
            break
        seen.append(obs)
    env.close()
    return np.array(seen)


def _actor_action(c: Components, states: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    with torch.inference_mode():
        s = torch.as_tensor(states, dtype=torch.float32)
        if noise is None:
            return c.actor.deterministic(s).numpy()
        return c.actor.sample(s, torch.as_tensor(noise))[0].numpy()


def test_policy_predicts_from_the_default_gym_observation(exported: tuple[Components, Path]) -> None:
    c, out = exported
    env_id = c.task.info.env_id
    policy = Policy.load(out)
    obs = _episode(env_id, 6)  # gym.make(env_id): Gymnasium's default observation, no kwargs
    states = _episode(env_id, 6, **ENV_KWARGS[env_id])  # the same steps as the project's state
    assert obs.shape[1] == policy.observation_dim and states.shape[1] == policy.manifest.state_dim
    want = _actor_action(c, states)  # what the trained actor does on the full state
    batch, recurrent = policy.predict(obs)
    assert recurrent is None and batch.shape == want.shape and batch.dtype == np.float32
    np.testing.assert_allclose(batch, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batch, load_artifacts(out).policy(states, np.zeros_like(want))[2], rtol=1e-6, atol=1e-6)
    for i in range(len(obs)):  # one at a time: [obs_dim] -> [act_dim], the same as in the batch
        single, _ = policy.predict(obs[i], deterministic=True)
        assert single.shape == (policy.action_dim,)
        np.testing.assert_allclose(single, batch[i], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(policy.predict(states)[0], batch)  # the full state gives the same actions
    # SB3's evaluate_policy passes state= and episode_start=; both are ignored
    np.testing.assert_array_equal(policy.predict(obs, None, np.ones(len(obs), bool))[0], batch)


def test_policy_stochastic_predict_is_seeded(exported: tuple[Components, Path]) -> None:
    c, out = exported
    obs = _episode(c.task.info.env_id, 5)
    states = _episode(c.task.info.env_id, 5, **ENV_KWARGS[c.task.info.env_id])
    first = Policy.load(out, seed=11).predict(obs, deterministic=False)[0]
    again = Policy.load(out, seed=11).predict(obs, deterministic=False)[0]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, Policy.load(out).predict(obs)[0])  # sampled, not the mean
    noise = np.random.default_rng(11).standard_normal(first.shape, dtype=np.float32)
    np.testing.assert_allclose(first, _actor_action(c, states, noise), rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(11)  # a caller's own Generator
    np.testing.assert_array_equal(Policy.load(out).predict(obs, deterministic=False, rng=rng)[0], first)
    low, high = Policy.load(out).manifest.act_low, Policy.load(out).manifest.act_high
    assert np.all(first >= np.float32(low)) and np.all(first <= np.float32(high))


def test_policy_refuses_other_shapes_saying_what_it_takes(exported: tuple[Components, Path]) -> None:
    _, out = exported
    policy = Policy.load(out)
    m = policy.manifest
    for bad in (np.zeros(m.state_dim + 3), np.zeros((2, 3, policy.observation_dim)), np.float32(1.0)):
        with pytest.raises(ValueError, match=rf"the env's observation \[{policy.observation_dim}\] or "
                                             rf"\[B, {policy.observation_dim}\].*got shape {re.escape(str(list(np.shape(bad))))}"):
            policy.predict(bad)
    if m.state_dim != policy.observation_dim:
        with pytest.raises(ValueError, match=rf"the full state \[{m.state_dim}\]"):
            policy.predict(np.zeros(1))


def test_third_party_runs_the_policy_from_manifest_json_alone(exported: tuple[Components, Path]) -> None:
    """Only manifest.json, onnxruntime and Gymnasium: build the state and the graph's input by the layout."""
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    layout = manifest["state_layout"]
    env_id = manifest["env_id"]
    state_env = gym.make(env_id, **layout["env_kwargs"])  # the state, as the sim and robot protocol carry it
    plain_env = gym.make(env_id)  # what a third party has
    state, _ = state_env.reset(seed=3)
    obs, _ = plain_env.reset(seed=3)
    assert state.shape == (manifest["state_dim"],) and len(layout["names"]) == manifest["state_dim"]
    np.testing.assert_array_equal(state[layout["obs_idx"]], obs)
    net_obs = obs[[layout["obs_idx"].index(i) for i in layout["net_obs_idx"]]]
    np.testing.assert_array_equal(net_obs, state[layout["net_obs_idx"]])
    session = ort.InferenceSession(str(out / "policy.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["net_obs", "noise"]
    action = session.run(["action"], {"net_obs": net_obs[None].astype(np.float32),
                                      "noise": np.zeros((1, manifest["act_dim"]), np.float32)})[0][0]
    np.testing.assert_allclose(action, Policy.load(out).predict(obs)[0], rtol=1e-6, atol=1e-6)
    # a lone policy.onnx carries the layout too
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["state_layout"]) == layout
    plain_env.step(action)  # the action fits the plain env
    state_env.close()
    plain_env.close()


@pytest.mark.parametrize("env_id", BUILTIN)
def test_state_layout_of_every_builtin_task_matches_gymnasium(env_id: str) -> None:
    """What export writes into every built-in task's manifest, checked against the envs along a trajectory."""
    layout = state_layout(env_id)
    info = env_info(env_id)
    assert layout.env_kwargs == ENV_KWARGS[env_id] and list(info.net_obs_idx) == layout.net_obs_idx
    states = _episode(env_id, 5, **layout.env_kwargs)
    obs = _episode(env_id, 5)
    assert states.shape[1] == info.state_dim and len(layout.names) == info.state_dim
    np.testing.assert_array_equal(states[:, layout.obs_idx], obs)
    net_obs, single = to_net_obs(obs, info.state_dim, layout)
    assert not single and np.array_equal(net_obs, states[:, layout.net_obs_idx].astype(np.float32))
    np.testing.assert_array_equal(to_net_obs(states[0], info.state_dim, layout)[0][0], net_obs[0])
    root = {"InvertedPendulum-v5": [], "Ant-v5": ["qpos:root:x", "qpos:root:y"]}.get(env_id, ["qpos:rootx"])
    assert [layout.names[i] for i in range(info.state_dim) if i not in layout.obs_idx] == root
    if env_id == "Ant-v5":  # the networks read qpos[2:] and qvel, not the 78 contact forces
        assert len(layout.net_obs_idx) == 27 and layout.names[-1].startswith("cfrc_ext:")
        assert all(not layout.names[i].startswith("cfrc_ext") for i in layout.net_obs_idx)


def test_format_1_artifacts_are_refused_with_a_reexport_hint(exported: tuple[Components, Path],
                                                             tmp_path: Path) -> None:
    _, out = exported
    copy = tmp_path / "old"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = json.loads((copy / "manifest.json").read_text())
    data["format_version"] = 1
    del data["state_layout"]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"format version 1, .* reads format version {FORMAT_VERSION} \(format 1 "
                                            r"policy graphs take the full state.*\); re-export the run"):
        Policy.load(copy)


def test_policy_runs_without_torch_or_gymnasium(exported: tuple[Components, Path]) -> None:
    c, out = exported
    obs = _episode(c.task.info.env_id, 3)
    code = ("import sys, json, numpy as np\n"
            "from maac_robot import Policy\n"
            f"policy = Policy.load({str(out)!r})\n"
            f"action, _ = policy.predict(np.array({obs.tolist()!r}))\n"
            "bad = [m for m in ('torch', 'gymnasium', 'mujoco', 'onnx', 'maac_robot.learn') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print(json.dumps(action.tolist()))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(json.loads(result.stdout), Policy.load(out).predict(obs)[0], rtol=1e-6)


def test_package_root_is_torch_free_and_lazy() -> None:
    code = ("import sys, maac_robot\n"
            "assert 'torch' not in sys.modules and 'maac_robot.runtime.policy' not in sys.modules\n"
            "assert {'MAAC', 'Policy'} <= set(maac_robot.__all__) and 'MAAC' in dir(maac_robot)\n"
            "from maac_robot import Policy\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    assert maac_robot.MAAC is MAAC and maac_robot.Policy is Policy
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        maac_robot.Nope  # noqa: B018


def test_maac_learn_predict_load_save_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = MAAC(TINY, run_dir=run)
    with pytest.raises(RunError, match="not been trained yet"):
        model.predict(np.zeros(4))
    assert model.learn(150) is model and model.num_timesteps == 150
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["total_steps"] == 150
    obs = _episode("InvertedPendulum-v5", 8)
    action, recurrent = model.predict(obs)
    assert recurrent is None and action.shape == (len(obs), 1) and action.dtype == np.float32
    np.testing.assert_allclose(model.predict(obs[0])[0], action[0], rtol=1e-6, atol=1e-6)
    loaded = MAAC.load(run)
    assert loaded.num_timesteps == 150 and loaded.env_id == "InvertedPendulum-v5"
    np.testing.assert_allclose(loaded.predict(obs)[0], action, rtol=1e-6, atol=1e-6)
    stochastic = loaded.predict(obs, deterministic=False, rng=np.random.default_rng(0))[0]
    assert model.save(tmp_path / "copy") == tmp_path / "copy"
    np.testing.assert_allclose(MAAC.load(tmp_path / "copy").predict(obs)[0], action, rtol=1e-6, atol=1e-6)
    with pytest.raises(RunError, match="already holds a run"):
        MAAC("inverted_pendulum", run_dir=run)

    manifest = model.export(tmp_path / "artifacts")
    assert manifest.train_steps == 150
    policy = Policy.load(tmp_path / "artifacts")
    np.testing.assert_allclose(policy.predict(obs)[0], action, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(policy.predict(obs, deterministic=False, rng=np.random.default_rng(0))[0],
                               stochastic, rtol=1e-4, atol=1e-5)

    loaded.learn(50)  # resumes the run: 50 more env steps
    assert loaded.num_timesteps == 200 and loaded.predict(obs)[0].shape == action.shape
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["total_steps"] == 200


def test_maac_takes_a_config_name_and_overrides(tmp_path: Path) -> None:
    model = MAAC("inverted_pendulum", run_dir=tmp_path / "r", overrides={"agent.horizon": 1}, seed=5)
    assert (model.config.agent.horizon, model.config.train.seed, model.num_timesteps) == (1, 5, 0)
    assert not (tmp_path / "r").exists()  # nothing is written before learn()
