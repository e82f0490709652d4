"""Your own env (README "Your own env", examples/custom_env): `yourpkg.module:EnvId` ids, `register_task`, the
ensemble's termination head and `env.terminates: false`, end to end from the documented example.

The example package `point_reach` (examples/custom_env) is put on sys.path here and on PYTHONPATH for the
processes the tests start, as the README's `PYTHONPATH=examples/custom_env` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from maac_robot.envs import EnvError, env_info, make_env, register_task, state_layout
from maac_robot.learn.config import ModelConfig, config_from_dict
from maac_robot.learn.ensemble import GaussianEnsemble
from maac_robot.learn.rollout import model_rollout
from maac_robot.learn.tasks import LearnedTermination, TaskError, get_task
from maac_robot.runtime.config import ConfigError
from sim_helpers import cli_sim, running_sim
from tiny_configs import deployable

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_env"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))
REGISTERED, LEARNED = "point_reach:PointReach-v0", "point_reach:PointReachLearned-v0"
EPISODE_STEPS = 40


@pytest.fixture
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a process that can import the example package (and the project, from any cwd)."""
    path = os.pathsep.join([str(EXAMPLE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    return dict(os.environ)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- env ids ------------------------------------------------------------------------------------


def test_module_env_id_imports_the_module_and_keeps_the_full_id():
    env = make_env(REGISTERED, seed=0)
    assert env.observation_space.shape == (4,)
    env.close()
    info = env_info(REGISTERED)
    assert info.env_id == REGISTERED and info.dt == 0.05 and info.net_obs_idx == (0, 1, 2, 3)
    layout = state_layout(REGISTERED)  # the state is Gymnasium's default observation of gym.make(full id)
    assert layout.obs_idx == [0, 1, 2, 3] and layout.env_kwargs == {}


def test_unregistered_plain_id_says_how_to_name_it():
    with pytest.raises(EnvError, match=r"write 'yourpkg\.module:PointReachNowhere-v0'"):
        make_env("PointReachNowhere-v0")


def test_module_that_cannot_be_imported_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(EnvError) as err:
        make_env("no_such_pkg_zz.envs:MyEnv-v0")
    message = str(err.value)
    assert "cannot import module 'no_such_pkg_zz.envs'" in message and "ModuleNotFoundError" in message
    assert "PYTHONPATH" in message and "\n" not in message
    (tmp_path / "needs_a_dep_zz.py").write_text("import not_installed_dep_zz\n")  # the module's own ImportError
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvError, match=r"'needs_a_dep_zz'.*No module named 'not_installed_dep_zz'") as err:
        make_env("needs_a_dep_zz:MyEnv-v0")
    assert "PYTHONPATH" not in str(err.value)  # the module was found; its dependency is what is missing
    with pytest.raises(EnvError, match="module 'point_reach' was imported but registers no 'PointRech-v0'.*"
                                       "did you mean 'PointReach-v0'"):
        make_env("point_reach:PointRech-v0")


def test_config_and_cli_refuse_a_bad_env_id_in_one_line(tmp_path: Path, example_on_path: dict[str, str]):
    with pytest.raises(ConfigError, match=r"env\.id: Value error, env id 'no_such_pkg_zz:X-v0': cannot import"):
        config_from_dict({"env": {"id": "no_such_pkg_zz:X-v0"}})
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"env": {"id": "no_such_pkg_zz:X-v0"}}))
    result = subprocess.run([sys.executable, "-m", "maac_robot.cli", "train", "--config", str(config), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=example_on_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot import module 'no_such_pkg_zz'" in result.stderr and not (tmp_path / "run").exists()


# ---- register_task and get_task -----------------------------------------------------------------


def _register_env(name: str) -> str:
    gym.register(id=name, entry_point="point_reach.env:PointReachEnv", max_episode_steps=50)
    return name


def test_the_example_task_is_the_envs_own_reward_and_termination():
    task = get_task(REGISTERED)
    assert task.describe() == {"reward": "closed_form", "termination": "closed_form",
                               "reward_fn": "point_reach.task.reward", "termination_fn": "point_reach.task.terminated"}
    env, ended = make_env(REGISTERED, seed=0), 0
    state, _ = env.reset(seed=0)
    for _ in range(3000):
        action = env.action_space.sample()
        next_state, reward, terminated, truncated, _ = env.step(action)
        s, a, s2 = (torch.as_tensor(x, dtype=torch.float64) for x in (state, action, next_state))
        assert float(task.reward_fn(s, a, s2)) == pytest.approx(reward, abs=1e-9)
        assert bool(task.termination_fn(s, a, s2)) == terminated
        ended += terminated
        state = env.reset()[0] if terminated or truncated else next_state
    env.close()
    assert ended >= 3  # random actions do leave the arena: the rule was exercised


def test_register_task_paths_and_refusals():
    assert get_task(LEARNED).termination == "learned" and get_task(LEARNED).reward_fn is None
    assert get_task(LEARNED, terminates=False).termination == "never"
    with pytest.raises(TaskError, match="terminates by its register_task call; env.terminates: false contradicts"):
        get_task(REGISTERED, terminates=False)
    with pytest.raises(EnvError, match="built in"):
        register_task("Hopper-v5", reward_fn=lambda s, a, s2: s2[..., 0])
    with pytest.raises(ValueError, match="contradicts terminates=False"):
        register_task("AnyEnv-v0", termination_fn=lambda s, a, s2: s2[..., 0] > 0, terminates=False)
    with pytest.raises(TypeError, match="'module:function' string"):
        register_task("AnyEnv-v0", reward_fn="point_reach.task.reward")

    never = _register_env("PointReachNeverTest-v0")  # reward in closed form (a callable), declared never to end
    register_task(never, reward_fn=lambda s, a, s2: -s2[..., :2].square().sum(-1), terminates=False)
    task = get_task(never)
    assert task.termination == "never" and not task.info.terminates and task.reward_fn is not None
    with pytest.raises(TaskError, match="never terminates by its register_task call"):
        get_task(never, terminates=True)

    broken = _register_env("PointReachBrokenTaskTest-v0")
    register_task(broken, reward_fn="point_reach.task:no_such_reward")
    with pytest.raises(TaskError, match=r"'point_reach.task:no_such_reward' cannot be loaded: AttributeError"):
        get_task(broken)


def test_built_in_tasks_refuse_a_contradicting_terminates():
    assert get_task("Hopper-v5", terminates=True).termination == "closed_form"
    with pytest.raises(TaskError, match="Hopper-v5 terminates by its closed-form rule"):
        get_task("Hopper-v5", terminates=False)
    with pytest.raises(TaskError, match="HalfCheetah-v5 never terminates"):
        get_task("HalfCheetah-v5", terminates=True)


# ---- the termination head -----------------------------------------------------------------------

S, A = 3, 1


def _ensemble(learn_termination: bool) -> GaussianEnsemble:
    torch.manual_seed(0)
    return GaussianEnsemble(S, A, num_models=3, num_elites=2, hidden=32, layers=2, learn_reward=False,
                            net_obs_idx=(0, 1, 2), min_logvar=-10.0, max_logvar=0.5,
                            learn_termination=learn_termination)


def _rule(next_state: torch.Tensor) -> torch.Tensor:
    return next_state[..., 0].abs() > 0.8


@pytest.fixture(scope="module")
def trained_head() -> GaussianEnsemble:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        state = torch.rand(2000, S, generator=g) * 2 - 1
        action = torch.rand(2000, A, generator=g) * 2 - 1
        next_state = state + 0.1 * action + 0.02 * torch.randn(2000, S, generator=g)
        model = _ensemble(True)
        cfg = ModelConfig(num_models=3, num_elites=2, hidden=32, layers=2, batch_size=64, max_epochs=25)
        model.stats = model.fit(state, action, next_state, None, cfg, g, _rule(next_state))
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_head_leaves_the_dynamics_initialisation_alone_and_starts_at_never():
    plain, headed = _ensemble(False), _ensemble(True)
    for name, p in plain.state_dict().items():  # an ensemble without the head is built exactly as before
        assert torch.equal(p, headed.state_dict()[name]), name
    assert {k for k in headed.state_dict() if k not in plain.state_dict()} == {
        *(f"term_{kind}.{i}" for kind in ("weights", "biases") for i in range(3))}
    assert not headed.terminated(torch.randn(2000, S) * 3).any()  # untrained: p(terminal) ~ 1 %, "never"
    with pytest.raises(ValueError, match="terminated flags"):
        headed.fit(torch.zeros(10, S), torch.zeros(10, A), torch.zeros(10, S), None, ModelConfig(), None)
    with pytest.raises(RuntimeError, match="no termination head"):
        plain.terminated(torch.zeros(1, S))
    with pytest.raises(RuntimeError, match="set env.terminates: false in the run's config.yaml"):
        headed.load_state_dict(plain.state_dict())  # a run trained before heads existed


def test_termination_head_learns_a_rule(trained_head: GaussianEnsemble):
    stats = trained_head.stats
    assert stats["termination_holdout_recall"] > 0.85 and stats["termination_holdout_false_alarm"] < 0.03
    fresh = torch.rand(4000, S, generator=torch.Generator().manual_seed(1)) * 2 - 1
    predicted, truth = trained_head.terminated(fresh), _rule(fresh)
    assert (predicted == truth).float().mean() > 0.97
    assert predicted[truth].float().mean() > 0.85
    batched = trained_head.terminated(fresh.view(2, 2000, S))  # any leading shape, the same per-row answer
    assert torch.equal(batched.flatten(), predicted)


def test_learned_termination_ends_imagined_rollouts(trained_head: GaussianEnsemble):
    """Through the one `model_rollout`: rows pushed past |x| = 0.8 stop earning reward, the others keep going."""
    termination = LearnedTermination()
    termination.model = trained_head
    start = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    path = model_rollout(start, lambda t, s: (torch.zeros(2, A), None), lambda s, a: (s + torch.tensor([0.2, 0, 0]), None),
                         lambda s, a, s2: torch.ones(2), termination, horizon=3, gamma=1.0)
    # row 0: x = 0.2, 0.4, 0.6 (never terminal); row 1: x = 0.7, 0.9 (terminal after step 2)
    assert path.alive[-1].tolist() == [1.0, 0.0]
    assert path.returns[-1].tolist() == [3.0, 2.0]


# ---- runs: what they say, end to end ------------------------------------------------------------


def _tiny(env_id: str, **env: object) -> dict:
    return deployable(env={"id": env_id, "max_episode_steps": 100, **env}, train={"total_steps": 200})


def test_a_run_of_an_env_declared_never_to_terminate_has_no_head(tmp_path: Path):
    from maac_robot.learn.trainer import train

    trainer = train(config_from_dict(_tiny(LEARNED, terminates=False)), tmp_path / "run", progress=False)
    assert not trainer.model.learn_termination and trainer.agent.termination_fn is None
    session = json.loads((tmp_path / "run" / "sessions.jsonl").read_text().splitlines()[-1])
    assert (session["reward"], session["termination"]) == ("learned", "never")
    assert "termination none (never terminates)" in (tmp_path / "run" / "train.log").read_text()


def test_learned_reward_and_termination_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """An env with nothing registered: train, evaluate, export (the head inside the plan graph), sim, control."""
    from controller.run import control_from_cli
    from maac_robot.commands import evaluate_from_cli
    from maac_robot.learn.export import export_from_run
    from maac_robot.learn.trainer import load_run, read_metrics, train

    cfg = _tiny(LEARNED, max_episode_steps=EPISODE_STEPS)
    train(config_from_dict(cfg), tmp_path / "run", progress=False)
    session = json.loads((tmp_path / "run" / "sessions.jsonl").read_text())
    assert (session["reward"], session["termination"]) == ("learned", "learned")
    assert "termination learned by the ensemble's termination head" in (tmp_path / "run" / "train.log").read_text()
    assert "termination_holdout_bce" in read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["model"]
    run = load_run(tmp_path / "run")  # the checkpoint restores the head, bound to the loaded ensemble
    assert run.model.learn_termination and run.task.termination_fn.model is run.model
    assert evaluate_from_cli(tmp_path / "run", episodes=1) == 0

    manifest = export_from_run(tmp_path / "run", tmp_path / "artifacts")
    assert (manifest.env_id, manifest.reward, manifest.termination, manifest.terminates) == (
        LEARNED, "learned", "learned", True)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    with running_sim(LEARNED, mode="lockstep", max_episode_steps=EPISODE_STEPS) as server:
        rc = control_from_cli(artifacts=tmp_path / "artifacts", connect=server.endpoint, planner="cem", episodes=1,
                              config=tmp_path / "task.yaml", seed=0, compare=False)
    assert rc == 0 and "return over 1 episode(s)" in capsys.readouterr().out


def test_the_documented_example_from_the_cli(tmp_path: Path, example_on_path: dict[str, str]):
    """README "Your own env": train, export, sim and control as separate processes on the example's config
    (made tiny with --set), the env named `point_reach:PointReach-v0` throughout."""
    tiny = _tiny(REGISTERED)
    sets = [f"{section}.{key}={json.dumps(value)}" for section, values in tiny.items() if section != "env"
            for key, value in values.items()]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "maac_robot.cli", *args], capture_output=True, text=True,
                                timeout=300, cwd=tmp_path, env=example_on_path)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    config = str(EXAMPLE / "point_reach.yaml")
    trained = cli("train", "--config", config, "--out", "run", *(arg for s in sets for arg in ("--set", s)))
    assert "point_reach:PointReach-v0: reward closed-form point_reach.task.reward; termination closed-form " \
           "point_reach.task.terminated" in trained.stderr
    cli("export", "run", "--out", "artifacts")
    manifest = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert (manifest["env_id"], manifest["reward"], manifest["termination"]) == (REGISTERED, "closed_form",
                                                                                 "closed_form")
    with cli_sim(tmp_path, REGISTERED) as (_, endpoint):
        (tmp_path / "task.yaml").write_text(yaml.safe_dump(tiny))  # the tiny run's small CEM
        controlled = cli("control", "--artifacts", "artifacts", "--connect", endpoint, "--config", "task.yaml",
                         "--episodes", "1")
    assert "return over 1 episode(s)" in controlled.stdout
