"""CEM planner on a point mass whose optimal action sequence is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from controller.planner import NonFiniteError, Prior, cem_plan, policy_prior, shift, squash
from controller_fakes import PointMass
from maac_robot.runtime.config import ControllerConfig

LOW, HIGH = np.array([-1.0, -0.5]), np.array([1.0, 2.0])  # asymmetric bounds exercise the affine squash
X0 = np.zeros(2)


def _model(**kw) -> PointMass:
    return PointMass(goal=np.array([0.3, 0.5]), low=LOW, high=HIGH, dt=0.5, **kw)


def _step(pm: PointMass):
    return lambda s, a: pm.ensemble(s, a)["next_state_mean"][list(pm.elites)].mean(0)


def _plan(pm: PointMass, seed: int, warm=None, keep_going=lambda: True, **cfg):
    rng = np.random.default_rng(seed)
    config = ControllerConfig(**cfg)
    num_samples = round(config.policy_frac * config.population)
    prior = policy_prior(pm.policy, _step(pm), X0, 2, pm.plan_horizon, num_samples, rng)
    return prior, cem_plan(pm.plan, X0, prior, warm, config, len(pm.elites), LOW, HIGH, rng, keep_going)


def test_optimum_is_interior_so_the_test_means_something():
    opt = _model().optimal_sequence(X0)
    assert np.all(opt > LOW + 0.2) and np.all(opt < HIGH - 0.2)


@pytest.mark.parametrize("seed", range(4))
def test_cem_finds_the_optimal_first_action_from_an_uninformed_policy(seed):
    pm = _model()  # policy: pre-tanh mean 0 (mid-bounds), std 1 — far from the optimum
    opt = pm.optimal_sequence(X0)
    prior, plan = _plan(pm, seed, iterations=20)
    assert np.abs(plan.action - opt[0]).max() < 0.1
    assert plan.score > pm.sequence_return(X0, opt) - 0.005  # within 0.5 % of the optimal return
    assert plan.score > plan.policy_score + 1.0
    np.testing.assert_allclose(plan.score, pm.sequence_return(X0, squash(plan.sequence, LOW, HIGH)), rtol=1e-5)
    assert plan.iterations == 20 and len(plan.iteration_seconds) == 21  # 20 refits + the final mean's score


@pytest.mark.parametrize("seed", range(6))
def test_never_scores_below_the_policy_sequence_under_the_ensemble(seed):
    """Near-optimal policy, disagreeing members, 1-3 iterations: the executed sequence's ensemble-mean
    return is never below the policy's own sequence (it is one of the candidates)."""
    rng = np.random.default_rng(100 + seed)
    opt_u = np.arctanh(2 * (_model().optimal_sequence(X0)[0] - LOW) / (HIGH - LOW) - 1)
    pm = _model(bias=rng.normal(0, 0.05, (3, 2)), policy_mean=opt_u + rng.normal(0, 0.05, 2), policy_log_std=-1.0)
    prior, plan = _plan(pm, seed, iterations=1 + seed % 3, population=32, policy_frac=0.1)
    assert prior.samples.shape == (3, pm.plan_horizon, 2)  # closed-loop policy samples in every population
    policy_seq = squash(prior.mean, LOW, HIGH)
    assert plan.score >= plan.policy_score
    assert pm.sequence_return(X0, squash(plan.sequence, LOW, HIGH)) >= pm.sequence_return(X0, policy_seq) - 1e-6
    np.testing.assert_allclose(plan.policy_score, pm.sequence_return(X0, policy_seq), rtol=1e-5)


def test_warm_start_is_a_candidate():
    pm = _model()
    opt = pm.optimal_sequence(X0)
    warm = np.arctanh(2 * (opt - LOW) / (HIGH - LOW) - 1)
    _, plan = _plan(pm, 0, warm=warm, iterations=1)
    np.testing.assert_allclose(plan.sequence, warm)  # one iteration cannot beat the exact optimum


def test_policy_prior_is_the_policy_rollout_through_the_model():
    pm = _model(policy_mean=np.array([0.2, -0.3]), policy_log_std=-0.5)
    prior = policy_prior(pm.policy, _step(pm), X0, 2, 5, 7, np.random.default_rng(0))
    assert prior.mean.shape == prior.std.shape == (5, 2) and prior.samples.shape == (7, 5, 2)
    np.testing.assert_allclose(prior.mean, np.tile([0.2, -0.3], (5, 1)), rtol=1e-6)
    np.testing.assert_allclose(prior.std, np.exp(-0.5), rtol=1e-6)
    assert np.std(prior.samples) > 0.1  # sampled, not copies of the mean
    again = policy_prior(pm.policy, _step(pm), X0, 2, 5, 7, np.random.default_rng(0))
    np.testing.assert_array_equal(prior.samples, again.samples)  # the caller's rng makes it reproducible


def test_no_time_means_the_policy_sequence_and_no_model_call():
    pm = _model()
    prior, plan = _plan(pm, 0, keep_going=lambda: False)
    assert plan.iterations == 0 and pm.plan_calls == 0 and np.isnan(plan.score)
    np.testing.assert_allclose(plan.action, squash(prior.mean[0], LOW, HIGH))


def test_keep_going_is_asked_before_every_pass():
    calls = []
    pm = _model()
    _, plan = _plan(pm, 0, keep_going=lambda: calls.append(1) or len(calls) <= 3, iterations=10)
    assert plan.iterations == 3 and pm.plan_calls == 3 and len(calls) == 4


def test_population_is_a_multiple_of_num_elites_and_fits_the_anchors():
    pm = _model(elites=(0, 1, 2))
    seen = []
    scorer = pm.plan
    pm.plan = lambda s, a: seen.append(a.shape[0]) or scorer(s, a)
    _plan(pm, 0, population=100, iterations=2)
    assert seen == [102, 102, 3]  # ceil(100/3)*3 per refit, then the final mean on every elite
    with pytest.raises(ValueError, match="no room"):
        _plan(_model(elites=(0, 1)), 0, population=4, policy_frac=0.5)


def test_non_finite_scores_raise():
    pm = _model()
    pm.plan = lambda s, a: np.full(a.shape[0], np.nan, np.float32)
    with pytest.raises(NonFiniteError):
        _plan(pm, 0)


def test_non_finite_policy_rollout_raises():
    pm = _model(policy_mean=np.array([np.nan, 0.0]))
    with pytest.raises(NonFiniteError):
        policy_prior(pm.policy, _step(pm), X0, 2, 5, 3, np.random.default_rng(0))


def test_shift_drops_the_executed_step_and_appends_the_policy_tail():
    prior = Prior(mean=np.full((3, 1), 9.0), std=np.ones((3, 1)), samples=np.zeros((0, 3, 1)))
    np.testing.assert_array_equal(shift(np.array([[1.0], [2.0], [3.0]]), prior), [[2.0], [3.0], [9.0]])
