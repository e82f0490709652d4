"""CEM model-predictive planning seeded by the stochastic policy (paper §5.4), as pure functions.

Search space: the policy's *pre-tanh* space. The exported policy is a Gaussian u ~ N(mean, std)
squashed by `squash` into the action bounds, so working on u (i) makes "sample from the policy"
exact, (ii) lets the policy's own std be the initial CEM std without a delta-method guess, and
(iii) keeps every candidate inside the bounds without clipping, which in action space piles
probability mass onto the bounds and biases the elite refit. The price is that a saturated
dimension (|u| large) moves little per unit of std; the policy's std already reflects that.

Scoring: `score(state, actions [P,H,A]) -> returns [P]` is the fused plan graph, where particle
i rolls through elite member i % E (E = num_elites). A single particle's return is therefore a
one-member estimate. Sequences that may be *executed* (the "anchors": the policy's sequence,
the previous plan shifted by one step, and the CEM mean of every iteration) are replicated E
times in consecutive slots so each is scored on every elite member and ranked by the ensemble
mean. The executed sequence is the best anchor seen, so under the model's ensemble-mean return
MPC never scores below the policy's own sequence (which is the iteration-0 anchor).

Measured (benchmarks/mpc.py, benchmarks/RESULTS.md): momentum 0.1 beat 0.5 and elite_frac 0.1
beat 0.2 on InvertedPendulum; TD-MPC2's closed-loop policy samples (`policy_frac`) showed no
gain on InvertedPendulum, Hopper or HalfCheetah and cost ~2 ms a step, so they are off by
default. Not implemented: iCEM's colored noise (over H = 3-5 steps a 1/f^β spectrum is barely
distinguishable from white noise) and iCEM's elite reuse (not measured).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from maac_robot.runtime.config import ControllerConfig

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""score(state [S], actions [P,H,A] env units) -> predicted return [P]; P a multiple of num_elites."""

PolicyFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""policy(state [B,S], noise [B,A]) -> (pre-tanh mean [B,A], log_std [B,A], action [B,A])."""

StepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""step(state [B,S], action [B,A]) -> next state [B,S] (the elite members' mean prediction)."""


class NonFiniteError(ArithmeticError):
    """The model or policy produced NaN/inf; the control loop falls back to the policy action."""


class ShapeError(ValueError):
    """A graph returned an output of the wrong shape; the control loop falls back to the policy action."""


def squash(u: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Pre-tanh values -> env-unit actions, the same affine tanh map as the exported policy graph."""
    return low + (np.tanh(u) + 1.0) * (0.5 * (high - low))


@dataclass(frozen=True)
class Prior:
    """The policy's view of the next H steps, rolled through the model from the current state.

    mean/std: the deterministic rollout's pre-tanh means and the policy's stds along it [H,A];
    samples: closed-loop stochastic rollouts of the policy [N,H,A] (pre-tanh), TD-MPC2's share of
    policy-sampled sequences in every CEM population.
    """

    mean: np.ndarray
    std: np.ndarray
    samples: np.ndarray


def policy_prior(policy: PolicyFn, step: StepFn, state: np.ndarray, act_dim: int, horizon: int,
                 num_samples: int, rng: np.random.Generator) -> Prior:
    """Roll the policy through the model for `horizon` steps: row 0 deterministic, rows 1.. sampled.

    One batched policy call per step and one batched model call between steps, so the prior costs
    2·H - 1 small graph calls whatever `num_samples` is (but each model call runs every member on
    every row: closed-loop samples are not free, see benchmarks/RESULTS.md). The noise comes from
    `rng` (the policy graph takes it as an input), so the rollout is reproducible.
    """
    states = np.repeat(np.asarray(state, np.float32).reshape(1, -1), num_samples + 1, axis=0)
    means, stds, samples = [], [], []
    for t in range(horizon):
        noise = rng.standard_normal((num_samples + 1, act_dim)).astype(np.float32)
        noise[0] = 0.0
        mean, log_std, action = policy(states, noise)
        std = np.exp(log_std)
        means.append(mean[0])
        stds.append(std[0])
        samples.append(mean[1:] + std[1:] * noise[1:])
        if t < horizon - 1:  # the state after the last action is the plan graph's business
            states = step(states, action)
    prior = Prior(mean=np.stack(means).astype(np.float64), std=np.stack(stds).astype(np.float64),
                  samples=np.stack(samples, axis=1).astype(np.float64))
    if not (np.isfinite(prior.mean).all() and np.isfinite(prior.std).all() and np.isfinite(prior.samples).all()):
        raise NonFiniteError("policy rollout through the model is not finite")
    return prior


@dataclass
class Plan:
    """The planner's answer: the sequence to execute (pre-tanh, for the next step's warm start) and its
    first action in env units, with the evidence: ensemble-mean returns of it and of the policy's
    own sequence, CEM iterations completed and each iteration's wall time."""

    sequence: np.ndarray
    action: np.ndarray
    score: float
    policy_score: float
    iterations: int
    iteration_seconds: list[float] = field(default_factory=list)


def cem_plan(score: Scorer, state: np.ndarray, prior: Prior, warm: np.ndarray | None, cfg: ControllerConfig,
             num_elites: int, low: np.ndarray, high: np.ndarray, rng: np.random.Generator,
             keep_going: Callable[[], bool] = lambda: True,
             clock: Callable[[], float] = time.perf_counter) -> Plan:
    """CEM over pre-tanh action sequences, initialised from the policy prior; anytime.

    Each iteration scores one population of ceil(population / E)·E particles in one `score` call:
    the anchors (replicated E times: iteration 0 the policy's sequence and `warm`, the previous
    plan shifted by one step; later iterations the current CEM mean), the prior's fixed
    policy-sampled sequences, and Gaussian samples around the mean with the current std. The top
    `elite_frac` candidates refit mean and std with `momentum` (new = m·old + (1-m)·elite stat).
    After the last refit one small pass scores the final mean (E particles), so every refit can
    be executed. `keep_going()` is asked before every pass (the control loop's deadline); with
    no pass done the answer is the policy's own sequence with its score unknown (nan).
    Raises ShapeError if `score` does not return one value per particle ([P]), NonFiniteError if
    it returns NaN/inf for any particle.
    """
    horizon, act_dim = prior.mean.shape
    total = -(-cfg.population // num_elites) * num_elites
    mean, std = prior.mean.copy(), prior.std.copy()
    anchors = [prior.mean] + ([warm] if warm is not None else [])
    if total - len(anchors) * num_elites - len(prior.samples) < 1:
        raise ValueError(f"population {cfg.population} leaves no room for Gaussian samples next to "
                         f"{len(anchors)} anchors x {num_elites} elites and {len(prior.samples)} policy samples")
    best, best_score, policy_score = prior.mean, -np.inf, np.nan
    times: list[float] = []
    for it in range(cfg.iterations + 1):
        if not keep_going():
            break
        start = clock()
        refit = it < cfg.iterations  # the last pass only scores the final mean
        n_anchor = len(anchors) * num_elites
        samples = [prior.samples, mean + std * rng.standard_normal((total - n_anchor - len(prior.samples),
                                                                    horizon, act_dim))] if refit else []
        population = np.concatenate([np.repeat(np.stack(anchors), num_elites, axis=0), *samples])
        returns = np.asarray(score(state, squash(population, low, high).astype(np.float32)), np.float64)
        if returns.shape != (len(population),):
            raise ShapeError(f"plan graph returned returns of shape {returns.shape} for {len(population)} "
                             f"particles, expected ({len(population)},)")
        if not np.isfinite(returns).all():
            raise NonFiniteError(f"model returned non-finite scores for {int((~np.isfinite(returns)).sum())} "
                                 f"of {len(population)} particles")
        anchor_scores = returns[:n_anchor].reshape(len(anchors), num_elites).mean(axis=1)
        if it == 0:
            policy_score = float(anchor_scores[0])
        top = int(np.argmax(anchor_scores))
        if anchor_scores[top] > best_score:
            best, best_score = anchors[top], float(anchor_scores[top])
        if refit:
            candidates = np.concatenate([np.stack(anchors), population[n_anchor:]])
            cand_scores = np.concatenate([anchor_scores, returns[n_anchor:]])
            n_elite = max(2, round(cfg.elite_frac * len(candidates)))
            elites = candidates[np.argpartition(cand_scores, -n_elite)[-n_elite:]]
            mean = cfg.momentum * mean + (1 - cfg.momentum) * elites.mean(axis=0)
            std = cfg.momentum * std + (1 - cfg.momentum) * elites.std(axis=0)
            anchors = [mean]
        times.append(clock() - start)
    return Plan(sequence=best, action=squash(best[0], low, high), score=best_score if times else np.nan,
                policy_score=policy_score, iterations=min(len(times), cfg.iterations), iteration_seconds=times)


def shift(sequence: np.ndarray, prior: Prior) -> np.ndarray:
    """The previous plan advanced by one step, its last step filled from the new policy prior."""
    return np.concatenate([sequence[1:], prior.mean[-1:]])
