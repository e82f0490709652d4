"""A sim that differs on purpose (`sim.perturb`, `maac-robot sim --perturb`): schema, model edits, determinism,
action delay, pushes, observation noise, and the reports in hello_reply, recordings and the CLI. Loopback only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from maac_robot.envs import make_env
from maac_robot.runtime.config import ConfigError, PerturbConfig, SimConfig, load_section, merge_perturb
from maac_robot.runtime.protocol import RobotClient
from maac_robot.runtime.recording import load_episodes
from sim.perturb import Perturber, PerturbError
from sim.server import SimError, SimServer
from sim_helpers import cli_sim, running_sim

PENDULUM = "InvertedPendulum-v5"


def rollout(server: SimServer, actions: list[float], seed: int = 3) -> tuple[np.ndarray, list]:
    """Lockstep: reset with `seed`, apply `actions` (1-D, the pendulum's) until the episode ends; the served states."""
    with RobotClient(server.endpoint, 5.0) as client:
        client.hello()
        first = client.reset(seed=seed)
        states, infos = [first.state.copy()], [first.info]
        for a in actions:
            obs = client.step(np.array([a]))
            states.append(obs.state.copy())
            infos.append(obs.info)
            if obs.terminated or obs.truncated:
                break
    return np.array(states), infos


# ---- schema ----
@pytest.mark.parametrize(("flags", "message"), [
    (["mass_scale=0"], r"sim\.perturb\.mass_scale \(from --perturb mass_scale=0\): .*number > 0"),
    (["damping_scale=[2, 1]"], r"sim\.perturb\.damping_scale .*lo must not exceed hi"),
    (["friction_scale=[1, 2, 3]"], r"sim\.perturb\.friction_scale .*two values"),
    (["body_mass_scale.pole=-1"], r"sim\.perturb\.body_mass_scale\.pole .*number > 0"),
    (["action_delay_ticks=1.5"], r"sim\.perturb\.action_delay_ticks .*whole number"),
    (["obs_noise_std=-0.1"], r"sim\.perturb\.obs_noise_std .*>= 0"),
    (["push_prob=1.5"], r"sim\.perturb\.push_prob .*probability"),
    (["push_prob=0.1"], r"sim\.perturb\.push_force: .*> 0 when push_prob > 0"),
    (["actuator_gain_scale=true"], r"sim\.perturb\.actuator_gain_scale .*got True"),
    (["mas_scale=1.2"], r"unknown perturbation 'mas_scale'; did you mean mass_scale"),
    (["mass_scale.pole=1.2"], r"only body_mass_scale takes a body name"),
    (["mass_scale"], r"expected KEY=VALUE"),
    (["mass_scale=[1,"], r"not valid YAML"),
])
def test_bad_perturbations_are_refused_naming_the_key(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        merge_perturb(PerturbConfig(), flags)


def test_the_config_section_refuses_unknown_keys_and_flags_merge_over_it(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"env": {"id": PENDULUM}, "sim": {"perturb": {"masss_scale": 2}}}))
    with pytest.raises(ConfigError, match=r"sim\.perturb\.masss_scale: Extra inputs are not permitted"):
        load_section(path, "sim", SimConfig)
    path.write_text(yaml.safe_dump({"env": {"id": PENDULUM}, "sim": {"perturb": {
        "damping_scale": 2, "mass_scale": 1.5, "body_mass_scale": {"cart": 0.5}}}}))
    base = load_section(path, "sim", SimConfig).perturb
    merged = merge_perturb(base, ["mass_scale=[0.8, 1.2]", "body_mass_scale.pole=1.5", "action_delay_ticks=[0, 2]"])
    assert merged.in_force() == {"mass_scale": [0.8, 1.2], "body_mass_scale": {"cart": 0.5, "pole": 1.5},
                                 "damping_scale": 2.0, "action_delay_ticks": [0, 2]}
    assert merge_perturb(base, None) is base and PerturbConfig().nominal and not merged.nominal
    # --set sim.perturb={...} replaces the section's mapping like any other key
    sim = load_section(path, "sim", SimConfig, {"sim.perturb": {"obs_noise_std": 0.1}})
    assert sim.perturb.in_force() == {"obs_noise_std": 0.1}


# ---- the model ----
def test_scales_change_the_mujoco_model_from_its_nominal_values_without_compounding() -> None:
    env = make_env(PENDULUM, seed=0)
    model = env.unwrapped.model
    nominal = {k: getattr(model, k).copy() for k in ("body_mass", "body_inertia", "dof_damping", "geom_friction",
                                                      "actuator_gainprm", "actuator_biasprm")}
    config = merge_perturb(PerturbConfig(), ["mass_scale=[0.5, 2]", "body_mass_scale.pole=1.5", "damping_scale=3",
                                             "friction_scale=[0.5, 0.6]", "actuator_gain_scale=0.8"])
    perturber = Perturber(config, env, seed=0, safe_action=np.zeros(1))
    drawn = set()
    for episode in range(1, 6):
        s = perturber.new_episode(reset_seed=episode, episode=episode)
        drawn.add(s["mass_scale"])
        assert 0.5 <= s["mass_scale"] <= 2 and 0.5 <= s["friction_scale"] <= 0.6
        body = np.array([1.0, 1.0, 1.5]) * s["mass_scale"]
        np.testing.assert_allclose(model.body_mass, nominal["body_mass"] * body, rtol=1e-12)
        np.testing.assert_allclose(model.body_inertia, nominal["body_inertia"] * body[:, None], rtol=1e-12)
        np.testing.assert_allclose(model.dof_damping, nominal["dof_damping"] * 3, rtol=1e-12)
        np.testing.assert_allclose(model.geom_friction, nominal["geom_friction"] * s["friction_scale"], rtol=1e-12)
        np.testing.assert_allclose(model.actuator_gainprm[:, 0], nominal["actuator_gainprm"][:, 0] * 0.8, rtol=1e-12)
    assert len(drawn) == 5  # a new draw per episode, each from the nominal values
    assert perturber.new_episode(reset_seed=1, episode=9)["mass_scale"] in drawn  # the same reset seed, the same draw
    env.close()


def test_only_what_is_perturbed_is_touched() -> None:
    env = make_env(PENDULUM, seed=0)
    before = env.unwrapped.model.body_mass.copy()
    perturber = Perturber(PerturbConfig(obs_noise_std=0.1), env, seed=0, safe_action=np.zeros(1))
    perturber.new_episode(reset_seed=0, episode=1)
    assert env.unwrapped.model.body_mass.tobytes() == before.tobytes()
    env.close()


def test_unknown_body_names_are_refused_at_start_listing_the_models_bodies() -> None:
    with pytest.raises(PerturbError, match=r"no body 'polle' in this model; its bodies are cart, pole"):
        SimServer(PENDULUM, bind="tcp://127.0.0.1:*", perturb={"body_mass_scale": {"polle": 1.5}})
    with pytest.raises(PerturbError, match=r"no body 'torso'"):
        SimServer(PENDULUM, bind="tcp://127.0.0.1:*", perturb={"push_prob": 0.1, "push_force": 1, "push_body": "torso"})
    with pytest.raises(SimError, match=r"sim\.perturb\.mass_scale"):
        SimServer(PENDULUM, bind="tcp://127.0.0.1:*", perturb={"mass_scale": -1})


# ---- served dynamics ----
PERTURBED = {"mass_scale": [0.8, 1.2], "body_mass_scale": {"pole": 1.5}, "actuator_gain_scale": 0.8,
             "obs_noise_std": 0.01, "action_delay_ticks": [0, 2], "push_prob": 0.2, "push_force": [0.5, 1.0],
             "push_body": "pole"}
ACTIONS = list(np.sin(np.arange(40) * 0.3) * 0.5)


def test_lockstep_with_the_same_seed_and_perturbation_repeats_and_another_perturbation_differs() -> None:
    with running_sim(PENDULUM, seed=7, perturb=PERTURBED) as server:
        first, infos = rollout(server, ACTIONS)
        again, _ = rollout(server, ACTIONS)  # a second episode of the same sim, same reset seed
    with running_sim(PENDULUM, seed=7, perturb=PERTURBED) as server:
        other_sim, other_infos = rollout(server, ACTIONS)
    with running_sim(PENDULUM, seed=7, perturb={**PERTURBED, "body_mass_scale": {"pole": 1.2}}) as server:
        different, _ = rollout(server, ACTIONS)
    with running_sim(PENDULUM, seed=7) as server:
        nominal, nominal_infos = rollout(server, ACTIONS)
    assert first.tobytes() == again.tobytes() == other_sim.tobytes()
    assert [i.get("pushed") for i in infos] == [i.get("pushed") for i in other_infos]
    assert infos[0]["perturbation"] == other_infos[0]["perturbation"]
    assert not np.array_equal(first[:5], different[:5]) and not np.array_equal(first[:5], nominal[:5])
    assert "perturbation" not in nominal_infos[0] and "pushed" not in nominal_infos[1]


def test_a_perturbation_of_ones_serves_the_nominal_physics_exactly() -> None:
    """Scales of 1 leave every model value as it was (x * 1.0 == x): the served states equal the nominal sim's."""
    ones = {"mass_scale": 1.0, "damping_scale": [1, 1], "actuator_gain_scale": 1.0, "action_delay_ticks": 0}
    with running_sim(PENDULUM, perturb=ones) as server:
        assert server.metadata() == {"perturbation": {"config": {"damping_scale": [1.0, 1.0]}, "episode": 0,
                                                      "sampled": None}}
        perturbed, _ = rollout(server, ACTIONS)
    with running_sim(PENDULUM) as server:
        nominal, _ = rollout(server, ACTIONS)
    assert perturbed.tobytes() == nominal.tobytes()


def test_an_action_delay_applies_each_action_n_ticks_later(tmp_path: Path) -> None:
    delay = 3
    with running_sim(PENDULUM, perturb={"action_delay_ticks": delay}, record_dir=tmp_path) as server:
        served, _ = rollout(server, ACTIONS, seed=5)
        server.stop()
    env = make_env(PENDULUM)
    state, _ = env.reset(seed=5)
    expected = [state]
    for a in [0.0] * delay + ACTIONS[:len(served) - 1 - delay]:  # the safe action (zero) until the first arrives
        expected.append(env.step(np.array([a]))[0])
    np.testing.assert_array_equal(served, np.array(expected))
    (episode,) = load_episodes(tmp_path)
    np.testing.assert_array_equal(episode.actions[:, 0], [0.0] * delay + ACTIONS[:len(episode) - delay])


def test_a_push_changes_the_velocity_and_is_flagged() -> None:
    push = {"push_prob": 1.0, "push_force": 20.0, "push_body": "pole"}
    with running_sim(PENDULUM, perturb=push) as server:
        pushed, infos = rollout(server, [0.0] * 2)
    with running_sim(PENDULUM) as server:
        nominal, _ = rollout(server, [0.0] * 2)
    assert pushed[0].tobytes() == nominal[0].tobytes()  # the push acts during a step, never on the reset state
    assert np.abs(pushed[1, 2:] - nominal[1, 2:]).max() > 0.05  # qvel: cart and pole velocity
    assert infos[0]["pushed"] is False and infos[1]["pushed"] is True
    assert infos[0]["perturbation"]["push_body"] == "pole"


def test_realtime_ticks_go_through_the_delay_and_the_pushes(tmp_path: Path) -> None:
    """HalfCheetah (dt 50 ms, never terminates): every tick, held ones included, takes the perturbed path."""
    perturb = {"action_delay_ticks": 2, "push_prob": 0.5, "push_force": 50.0, "obs_noise_std": 0.01}
    with running_sim(mode="realtime", perturb=perturb, record_dir=tmp_path) as server, \
            RobotClient(server.endpoint, 2.0) as client:
        first = client.reset(seed=0)
        assert first.info["perturbation"]["action_delay_ticks"] == 2
        client.send_action(np.full(6, 0.5))
        observations = [client.latest_observation(timeout_s=1.0) for _ in range(8)]
        client.reset(seed=1)  # ends and records the first episode
    assert all("pushed" in o.info for o in observations)
    (episode,) = load_episodes(tmp_path)
    applied = np.flatnonzero(episode.actions[:, 0] == 0.5)
    assert applied.size and applied[0] >= 2 and not episode.actions[:2].any()  # the safe action for 2 ticks
    assert episode.flags["pushed"].any() and not episode.flags["pushed"].all()


def test_observation_noise_is_served_and_recorded_but_the_physics_is_untouched(tmp_path: Path) -> None:
    with running_sim(PENDULUM, perturb={"obs_noise_std": 0.05}, record_dir=tmp_path) as server:
        served, _ = rollout(server, ACTIONS)
        server.stop()
    env = make_env(PENDULUM)
    state, _ = env.reset(seed=3)
    clean = [state] + [env.step(np.array([a]))[0] for a in ACTIONS[:len(served) - 1]]
    noise = served - np.array(clean)
    assert 0.02 < noise.std() < 0.08  # noise on every served state, none compounding into the physics
    (episode,) = load_episodes(tmp_path)
    np.testing.assert_array_equal(episode.states, served[:-1])
    np.testing.assert_array_equal(episode.next_states, served[1:])
    assert episode.meta["states"].startswith("as served: observation noise")


def test_hello_reply_and_recordings_carry_the_perturbation(tmp_path: Path) -> None:
    config = {"mass_scale": [0.8, 1.2], "action_delay_ticks": 1}
    with running_sim(PENDULUM, perturb=config, record_dir=tmp_path) as server, \
            RobotClient(server.endpoint, 5.0) as client:
        info = client.hello()
        assert info.metadata == {"perturbation": {"config": {"mass_scale": [0.8, 1.2], "action_delay_ticks": 1},
                                                  "episode": 0, "sampled": None}}
        draws = []
        for seed in (1, 2):
            draws.append(client.reset(seed=seed).info["perturbation"])
            client.step(np.zeros(1))
        client.reset(seed=3)  # ends episode 2, so it is recorded
        assert client.hello().metadata["perturbation"]["episode"] == 3
    assert draws[0]["mass_scale"] != draws[1]["mass_scale"] and draws[0]["action_delay_ticks"] == 1
    episodes = load_episodes(tmp_path)
    assert [e.meta["perturbation"]["sampled"] for e in episodes] == draws
    assert [e.meta["perturbation"]["episode"] for e in episodes] == [1, 2]
    assert episodes[0].meta["perturbation"]["config"] == {"mass_scale": [0.8, 1.2], "action_delay_ticks": 1}
    assert "states" not in episodes[0].meta  # no observation noise: the states are the physics state


def test_a_nominal_sims_hello_reply_has_no_metadata_on_the_wire() -> None:
    """An unperturbed robot's hello_reply stays what version-2 peers from before `metadata` read."""
    import zmq

    from maac_robot.runtime.protocol import Hello, decode, encode

    with running_sim(PENDULUM) as server:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        try:
            sock.send_multipart(encode(Hello(seq=1, t=0.0)))
            assert sock.poll(5000)
            frames = sock.recv_multipart()
        finally:
            sock.close(linger=0)
    assert b"metadata" not in frames[0] and decode(frames)[0].metadata == {}


# ---- the command line, end to end over real sockets ----
def test_cli_sim_perturb_flags_merge_over_the_config_and_are_reported(tmp_path: Path) -> None:
    record = tmp_path / "rec"
    flags = ["--perturb", "body_mass_scale.pole=1.5", "--perturb", "actuator_gain_scale=0.8",
             "--perturb", "mass_scale=[0.8,1.2]", "--record", str(record)]
    with cli_sim(tmp_path, PENDULUM, *flags, sim_section={"perturb": {"damping_scale": 2.0, "mass_scale": 3.0}}) \
            as (proc, endpoint), RobotClient(endpoint, 10.0) as client:
        info = client.hello()
        first = client.reset(seed=0)
        for _ in range(3):
            client.step(np.zeros(1))
        client.reset(seed=1)
    expected = {"mass_scale": [0.8, 1.2], "body_mass_scale": {"pole": 1.5}, "damping_scale": 2.0,
                "actuator_gain_scale": 0.8}
    assert info.metadata["perturbation"]["config"] == expected
    sampled = first.info["perturbation"]
    assert 0.8 <= sampled["mass_scale"] <= 1.2 and sampled["body_mass_scale"] == {"pole": 1.5}
    (episode,) = load_episodes(record)
    assert episode.meta["perturbation"] == {"config": expected, "episode": 1, "sampled": sampled}
    assert len(episode) == 3
    log = proc.stderr.read()
    assert "perturbed dynamics: " in log and "episode 1 perturbation: mass_scale=" in log
    assert "episode 2 perturbation: " in log and "body_mass_scale.pole=1.5" in log


def test_cli_sim_refuses_a_body_the_model_lacks_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump({"env": {"id": PENDULUM}}))
    done = subprocess.run([sys.executable, "-m", "maac_robot.cli", "sim", "--config", str(config), "--bind",
                           "tcp://127.0.0.1:*", "--perturb", "body_mass_scale.torso=1.5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: sim.perturb: no body 'torso' in this model; its bodies are cart, pole" in done.stderr
