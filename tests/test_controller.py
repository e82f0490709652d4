"""Control loop: deadlines, fallbacks, telemetry, episodes, config; a property test on every action sent."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from controller.loop import Controller, ControllerError, Telemetry
from controller.run import check_robot, compare_table, load_controller_config, run_episode
from controller_fakes import FakeRobot, PointMass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from maac_robot.runtime.config import ConfigError, ControllerConfig
from maac_robot.runtime.errors import UserError

LOW, HIGH = np.array([-1.0, -0.5]), np.array([1.0, 2.0])


def _model(**kw) -> PointMass:
    return PointMass(goal=np.array([0.3, 0.5]), low=LOW, high=HIGH, dt=0.5, **kw)


def _controller(pm: PointMass, planner: str = "cem", **cfg) -> Controller:
    return Controller(pm, ControllerConfig(**cfg), planner, np.random.default_rng(0))


def _policy_action(pm: PointMass, state: np.ndarray) -> np.ndarray:
    return pm.policy(state[None].astype(np.float32), np.zeros((1, 2), np.float32))[2][0]


def test_slow_scorer_the_deadline_wins_then_the_budget_says_no():
    pm = _model(plan_delay=0.3)
    ctl = _controller(pm, iterations=3)
    try:
        state = np.array([0.1, -0.2])
        start = time.perf_counter()
        action, rec = ctl.act(state, deadline=start + 0.03)
        assert time.perf_counter() - start < 0.03 + 0.02  # answered at the deadline, not after the 0.3 s pass
        assert rec.fallback == "late" and rec.iterations == 0
        np.testing.assert_allclose(action, _policy_action(pm, state), rtol=1e-6)
        _, rec = ctl.act(state, deadline=time.perf_counter() + 0.03)
        assert rec.fallback == "busy"  # the abandoned pass is still running: do not queue behind it
        ctl._running.result()  # noqa: SLF001 - wait for the abandoned pass; its duration now counts
        assert ctl.pass_estimate() >= 0.3
        calls = pm.plan_calls
        _, rec = ctl.act(state, deadline=time.perf_counter() + 0.03)
        assert rec.fallback == "budget" and pm.plan_calls == calls  # no pass fits: none is started
    finally:
        ctl.close()


def test_warm_up_measures_the_pass_cost_so_real_time_never_starts_a_pass_that_cannot_fit():
    pm = _model(plan_delay=0.05)
    ctl = _controller(pm, iterations=2, population=16)
    try:
        ctl.warm_up(np.zeros(2), steps=1)
        assert ctl.pass_estimate() >= 0.05
        recs = [ctl.act(np.zeros(2), deadline=time.perf_counter() + 0.12)[1] for _ in range(3)]
        assert [r.fallback for r in recs] == [None] * 3
        assert all(1 <= r.iterations <= 2 and r.latency < 0.12 for r in recs)
    finally:
        ctl.close()


@pytest.mark.parametrize("failure, reason", [("nan", "nonfinite"), ("inf", "nonfinite"), ("raise", "error")])
@pytest.mark.parametrize("deadline", [None, 0.5])
def test_planning_failures_fall_back_to_the_policy_action_and_are_counted(failure, reason, deadline):
    pm = _model()

    def broken(state, actions):
        if failure == "raise":
            raise RuntimeError("onnxruntime exploded")
        return np.full(actions.shape[0], np.nan if failure == "nan" else np.inf, np.float32)

    pm.plan = broken
    ctl = _controller(pm)
    try:
        state = np.array([0.4, 0.1])
        action, rec = ctl.act(state, None if deadline is None else time.perf_counter() + deadline)
        assert rec.fallback == reason and np.isfinite(action).all()
        np.testing.assert_allclose(action, _policy_action(pm, state), rtol=1e-6)
        assert ctl.last_error is not None and (failure != "raise" or "exploded" in ctl.last_error)
    finally:
        ctl.close()


def test_a_non_finite_policy_action_is_never_sent():
    ctl = _controller(_model(policy_mean=np.array([np.nan, 0.0])))
    with pytest.raises(ControllerError, match="non-finite"):
        ctl.act(np.zeros(2))
    ctl.close()


@pytest.mark.parametrize("shape", [(1, 3), (1, 1), (2,), (1, 2, 1)])
@pytest.mark.parametrize("planner", ["policy", "cem"])
def test_a_wrong_length_policy_action_is_never_sent(shape, planner):
    pm = _model()
    pm.policy = lambda state, noise: (np.zeros(shape, np.float32),) * 3
    ctl = _controller(pm, planner)
    try:
        for call in (lambda: ctl.warm_up(np.zeros(2)), lambda: ctl.act(np.zeros(2)),
                     lambda: ctl.act(np.zeros(2), deadline=time.perf_counter() + 0.5)):
            with pytest.raises(ControllerError, match=rf"policy graph returned an action of shape "
                                                      rf"{re.escape(str(shape))}.*expected \(1, 2\)"):
                call()
    finally:
        ctl.close()


@pytest.mark.parametrize("broken", ["ensemble", "plan"])
def test_nan_during_warm_up_is_counted_and_act_falls_back_to_the_policy(broken):
    pm = _model()
    if broken == "ensemble":
        true_ensemble = pm.ensemble

        def ensemble(state, action):
            out = true_ensemble(state, action)
            out["next_state_mean"][:, -1] = np.nan
            return out

        pm.ensemble = ensemble
    else:
        pm.plan = lambda state, actions: np.full(actions.shape[0], np.nan, np.float32)
    ctl = _controller(pm)
    try:
        ctl.warm_up(np.zeros(2), steps=2)
        assert ctl.warm_up_fallbacks == {"nonfinite": 3}
        assert ctl.last_error is not None and "NonFiniteError" in ctl.last_error
        state = np.array([0.4, 0.1])
        for deadline in (None, time.perf_counter() + 0.5):
            action, rec = ctl.act(state, deadline)
            assert rec.fallback == "nonfinite" and rec.iterations == 0
            np.testing.assert_allclose(action, _policy_action(pm, state), rtol=1e-6)
    finally:
        ctl.close()


def _wrong_plan_shape(pm: PointMass) -> None:
    true_plan = pm.plan
    pm.plan = lambda state, actions: true_plan(state, actions)[:-1]


def _wrong_ensemble_shape(pm: PointMass) -> None:
    true_ensemble = pm.ensemble

    def ensemble(state, action):
        out = true_ensemble(state, action)
        out["next_state_mean"] = out["next_state_mean"][:, :, :1]
        return out

    pm.ensemble = ensemble


def _wrong_rollout_shape(pm: PointMass) -> None:
    """Right for the single state of the policy action, wrong for the batch of the planner's rollout."""
    true_policy = pm.policy

    def policy(state, noise):
        outputs = true_policy(state, noise)
        return outputs if len(state) == 1 else tuple(out[:, :1] for out in outputs)

    pm.policy = policy


@pytest.mark.parametrize("breakage, graph", [(_wrong_plan_shape, "plan graph returned returns"),
                                             (_wrong_ensemble_shape, "ensemble graph returned next_state_mean"),
                                             (_wrong_rollout_shape, "policy graph returned mean")])
@pytest.mark.parametrize("deadline", [None, 0.5])
def test_a_wrong_output_shape_during_planning_falls_back_and_is_counted(breakage, graph, deadline):
    pm = _model()
    breakage(pm)
    ctl = _controller(pm, policy_frac=0.1)  # policy samples: the rollout calls the policy with a batch > 1
    try:
        ctl.warm_up(np.zeros(2), steps=1)
        assert ctl.warm_up_fallbacks == {"shape": 2}
        state = np.array([0.4, 0.1])
        action, rec = ctl.act(state, None if deadline is None else time.perf_counter() + deadline)
        assert rec.fallback == "shape" and action.shape == (2,)
        np.testing.assert_allclose(action, _policy_action(pm, state), rtol=1e-6)
        assert ctl.last_error.startswith("ShapeError: ") and graph in ctl.last_error
        assert "expected" in ctl.last_error
    finally:
        ctl.close()


def test_a_planned_action_of_the_wrong_length_falls_back(monkeypatch):
    from controller import loop
    from controller.planner import Plan

    def bad_plan(*_args, **_kw):
        return Plan(sequence=np.zeros((5, 3)), action=np.zeros(3), score=0.0, policy_score=0.0, iterations=1)

    monkeypatch.setattr(loop, "cem_plan", bad_plan)
    ctl = _controller(_model())
    try:
        action, rec = ctl.act(np.zeros(2))
        assert rec.fallback == "shape" and action.shape == (2,)
        assert "planned action has shape (3,), expected (2,)" in ctl.last_error
        assert Telemetry(records=[rec]).summary()["fallback_shape"] == 1
    finally:
        ctl.close()


def test_a_controller_horizon_is_refused_the_plan_graph_fixes_it(tmp_path):
    """The controller plans over the artifacts' plan_horizon (set at export): a config that still sets one is refused."""
    config = tmp_path / "task.yaml"
    config.write_text("controller:\n  horizon: 3\n")
    with pytest.raises(ConfigError, match=r"controller\.horizon: Extra inputs are not permitted"):
        load_controller_config(config)
    with pytest.raises(ConfigError, match=r"unknown config key 'controller\.horizon'"):
        load_controller_config(None, ["controller.horizon=3"])


def test_population_is_checked_up_front():
    with pytest.raises(UserError, match="no room"):
        _controller(_model(), population=6, policy_frac=0.5)


def test_mpc_beats_an_uninformed_policy_on_the_point_mass_episode():
    pm = _model()
    returns = {}
    for planner in ("policy", "cem"):
        robot = FakeRobot(pm, episode_steps=10)
        robot.hello()
        ctl = _controller(pm, planner, iterations=8, population=128)
        try:
            res = run_episode(robot, ctl, seed=3)
        finally:
            ctl.close()
        assert res.steps == 10 and len(res.telemetry.records) == 10
        assert all(np.all(a >= LOW) and np.all(a <= HIGH) for a in robot.actions)
        returns[planner] = res.ret
        its = res.telemetry.summary()["iterations_mean"]
        assert its == (8 if planner == "cem" else 0)
    assert returns["cem"] > returns["policy"] + 1.0
    table = compare_table({"policy": [res], "cem": [res]})
    assert table.count("\n") == 3 and "| cem | 1 |" in table


def test_telemetry_summary_counts_and_percentiles():
    from controller.loop import StepRecord

    tel = Telemetry(records=[StepRecord(latency=i / 1000, iterations=i % 3, fallback="late" if i == 7 else None,
                                        missed=i == 99) for i in range(100)])
    s = tel.summary()
    assert s["steps"] == 100 and s["fallback_late"] == 1 and s["deadline_misses"] == 1
    assert s["latency_ms_median"] == pytest.approx(49.5) and s["latency_ms_p99"] == pytest.approx(98.01)
    assert s["iterations_min"] == 0 and "p99 98.01 ms" in tel.format()


def test_controller_config_is_read_from_the_task_yaml(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("env: {id: Nope-v0}\ncontroller: {population: 64, budget_frac: 0.3}\n")
    cfg = load_controller_config(path)  # the env section is not validated here: it needs gymnasium
    assert (cfg.population, cfg.budget_frac) == (64, 0.3)
    path.write_text("controller: {populaton: 64}\n")
    with pytest.raises(ConfigError, match="controller.populaton"):
        load_controller_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_controller_config(tmp_path / "missing.yaml")
    assert load_controller_config(None) == ControllerConfig()


def test_robot_and_artifacts_must_agree():
    pm = _model()
    robot = FakeRobot(pm)
    info = robot.hello()
    check_robot(info, pm.manifest)
    info.dt = 0.05
    info.env_id = "Other-v5"
    with pytest.raises(UserError, match="env 'Other-v5'.*dt 0.05"):
        check_robot(info, pm.manifest)


_finite = st.floats(-1e3, 1e3)
_scores = st.sampled_from(["ok", "nan", "inf", "raise", "huge"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(low=st.lists(st.floats(-5, 4), min_size=1, max_size=3), width=st.floats(0.01, 10), goal=_finite,
       state=_finite, bias=st.floats(-10, 10), policy_mean=st.floats(-50, 50), log_std=st.floats(-20, 3),
       population=st.integers(8, 64), iterations=st.integers(1, 4), elite_frac=st.floats(0.01, 1),
       momentum=st.floats(0, 0.99), policy_frac=st.floats(0, 0.3), scores=_scores, realtime=st.booleans())
def test_every_action_sent_is_finite_and_within_bounds(low, width, goal, state, bias, policy_mean, log_std,
                                                       population, iterations, elite_frac, momentum, policy_frac,
                                                       scores, realtime):
    low = np.array(low)
    high = low + width
    a = len(low)
    pm = PointMass(goal=np.full(a, goal), low=low, high=high, dt=0.1, bias=np.full((3, a), bias),
                   policy_mean=np.full(a, policy_mean), policy_log_std=log_std)
    if scores != "ok":
        true_plan = pm.plan

        def plan(s, acts):
            if scores == "raise":
                raise RuntimeError("boom")
            out = true_plan(s, acts)
            out[-1] = {"nan": np.nan, "inf": -np.inf, "huge": 3e38}[scores]
            return out

        pm.plan = plan
    cfg = dict(population=population, iterations=iterations, elite_frac=elite_frac, momentum=momentum,
               policy_frac=policy_frac)
    try:
        ctl = Controller(pm, ControllerConfig(**cfg), "cem", np.random.default_rng(0))
    except UserError as err:  # refused up front: population too small for anchors + policy samples
        assert "no room" in str(err)
        return
    try:
        for _ in range(2):  # the second step exercises the shifted warm start
            deadline = time.perf_counter() + 0.05 if realtime else None
            action, _ = ctl.act(np.full(a, state), deadline)
            assert action.shape == (a,) and np.isfinite(action).all()
            assert np.all(action >= low) and np.all(action <= high)
    finally:
        ctl.close()


def test_realtime_settings_shorten_the_gil_switch_and_explain_a_refused_priority(monkeypatch):
    import sys

    from controller.run import GIL_SWITCH_INTERVAL_S, apply_realtime_settings

    before = sys.getswitchinterval()
    try:
        apply_realtime_settings(ControllerConfig())
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)

        def refuse(*_):
            raise PermissionError("Operation not permitted")

        monkeypatch.setattr("os.sched_setscheduler", refuse)
        with pytest.raises(UserError, match="CAP_SYS_NICE"):
            apply_realtime_settings(ControllerConfig(realtime_priority=10))
    finally:
        sys.setswitchinterval(before)


def test_predict_stands_in_for_a_lost_observation_with_the_elite_mean_or_says_it_cannot():
    bias = np.array([[0.1, 0.0], [0.3, 0.0], [5.0, 5.0]])  # member 2 is no elite: it must not count
    pm = _model()
    pm.bias = bias
    ctl = _controller(pm)
    try:
        state, action = np.array([0.5, -0.5]), np.array([1.0, 2.0])
        expected = state + pm.dt * action + bias[list(pm.elites)].mean(axis=0)
        np.testing.assert_allclose(ctl.predict(state, action), expected, rtol=1e-6)
        true_ensemble = pm.ensemble

        def broken(s, a):
            out = true_ensemble(s, a)
            out["next_state_mean"][:] = np.inf
            return out

        pm.ensemble = broken
        assert ctl.predict(state, action) is None and "NonFiniteError" in ctl.last_error
    finally:
        ctl.close()


def test_a_run_saved_with_horizon_null_still_loads(tmp_path):
    """Configs saved while the controller had a `horizon` field hold `horizon: null`; their runs must still load."""
    from maac_robot.learn.config import load_config

    config = tmp_path / "config.yaml"
    config.write_text("env:\n  id: InvertedPendulum-v5\ncontroller:\n  horizon: null\n  population: 64\n")
    assert load_controller_config(config).population == 64
    assert load_config(config).controller.population == 64
