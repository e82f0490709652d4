"""The MAAC objective's pathwise gradient, checked where the truth is known (paper §5.2).

A double integrator (s = [pos, vel], s' = A s + B a) with quadratic reward, a linear-Gaussian policy
a = K s + σ ε and a known quadratic terminal Q: the autograd gradient of `maac_policy_loss` under the
true dynamics must equal (1) the finite-difference gradient of the same sampled objective (common random
numbers, float64) and (2) the gradient of the closed-form expected objective, up to Monte-Carlo error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from maac_robot.learn.agent import Actor, TwinQ, maac_policy_loss

F64 = torch.float64
DT, GAMMA, ALPHA = 0.1, 0.9, 0.3
A_MAT = torch.tensor([[1.0, DT], [0.0, 1.0]], dtype=F64)
B_MAT = torch.tensor([[0.5 * DT**2], [DT]], dtype=F64)
Q_COST = torch.tensor([[1.0, 0.0], [0.0, 0.1]], dtype=F64)
R_COST = torch.tensor([[0.05]], dtype=F64)
P_TERM = torch.tensor([[3.0, 0.5], [0.5, 1.5]], dtype=F64)  # terminal Q(s, a) = -(sᵀPs + aᵀRa)


def _quad(x: Tensor, m: Tensor) -> Tensor:
    return ((x @ m) * x).sum(-1)


def dynamics(s: Tensor, a: Tensor) -> tuple[Tensor, None]:
    return s @ A_MAT.T + a @ B_MAT.T, None


def reward_fn(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    return -(_quad(s, Q_COST) + _quad(a, R_COST))


def critic(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    q = -(_quad(s, P_TERM) + _quad(a, R_COST))
    return q, q + 1.0  # the min picks the first head


def linear_gaussian(gain: Tensor, log_std: Tensor, generator: torch.Generator):
    """a = K s + σ ε, log π(a|s) computed from a (both pathwise routes to the parameters are kept)."""

    def policy(s: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
        mean = (s @ gain.T).repeat_interleave(repeat, dim=0)
        a = mean + log_std.exp() * torch.randn(mean.shape, generator=generator, dtype=F64)
        log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(a).sum(-1)
        return a, log_prob

    return policy


def sampled_loss(theta: Tensor, start: Tensor, horizon: int, num_samples: int, seed: int) -> Tensor:
    gain, log_std = theta[:2].view(1, 2), theta[2:]
    policy = linear_gaussian(gain, log_std, torch.Generator().manual_seed(seed))
    return maac_policy_loss(
        start, policy, dynamics, critic, reward_fn, None,
        horizon=horizon, num_samples=num_samples, terminal_q_samples=3, gamma=GAMMA, alpha=ALPHA,
    ).loss


def expected_loss(theta: Tensor, start: Tensor, horizon: int) -> Tensor:
    """−E[J_π] in closed form: propagate each start state's mean and covariance through the linear system."""
    gain, log_std = theta[:2].view(1, 2), theta[2:]
    noise_cov = torch.diag(log_std.exp() ** 2)
    closed = A_MAT + B_MAT @ gain

    def expected_quad_sa(mu: Tensor, cov: Tensor, m_s: Tensor) -> Tensor:  # E[sᵀM s + aᵀR a], a ~ π(s)
        a_mu = mu @ gain.T
        a_cov = gain @ cov @ gain.T + noise_cov
        return _quad(mu, m_s) + torch.trace(m_s @ cov) + _quad(a_mu, R_COST) + torch.trace(R_COST @ a_cov)

    mu, cov = start, torch.zeros(2, 2, dtype=F64)
    value = torch.zeros(start.shape[0], dtype=F64)
    for t in range(horizon):
        value = value - GAMMA**t * expected_quad_sa(mu, cov, Q_COST)
        mu, cov = mu @ closed.T, closed @ cov @ closed.T + B_MAT @ noise_cov @ B_MAT.T
    value = value - GAMMA**horizon * expected_quad_sa(mu, cov, P_TERM)
    expected_log_prob = -(log_std + 0.5 * math.log(2 * math.pi * math.e)).sum()  # −entropy of π(·|s)
    return ALPHA * expected_log_prob - value.mean()


def _grad(fn, theta: Tensor) -> Tensor:
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(theta), theta)
    return g


THETA = torch.tensor([-0.8, -1.2, math.log(0.4)], dtype=F64)
START = torch.tensor([[1.0, 0.0], [-0.5, 0.3], [0.2, -1.0], [2.0, 0.5]], dtype=F64)


@pytest.mark.parametrize("horizon", [0, 1, 3])
def test_pathwise_gradient_matches_finite_differences(horizon: int) -> None:
    loss = lambda th: sampled_loss(th, START, horizon, num_samples=4, seed=1)  # noqa: E731
    autograd = _grad(loss, THETA)
    eps = 1e-6
    finite = torch.stack([(loss(THETA + eps * e) - loss(THETA - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=F64)])
    assert torch.linalg.norm(autograd - finite) / torch.linalg.norm(finite) < 1e-4


@pytest.mark.parametrize("horizon", [0, 2, 4])
def test_pathwise_gradient_matches_analytic_gradient(horizon: int) -> None:
    """The estimator is unbiased: with many samples it approaches the closed-form expected gradient."""
    analytic = _grad(lambda th: expected_loss(th, START, horizon), THETA)
    estimate = _grad(lambda th: sampled_loss(th, START, horizon, num_samples=20_000, seed=2), THETA)
    # Monte-Carlo standard error at 80k samples is ~0.3 % here; 2 % is far outside it, a wrong term is not.
    assert torch.linalg.norm(estimate - analytic) / torch.linalg.norm(analytic) < 2e-2
    # ...and the sampled objective's value is unbiased too.
    value = sampled_loss(THETA, START, horizon, num_samples=20_000, seed=3)
    assert value.item() == pytest.approx(expected_loss(THETA, START, horizon).item(), rel=2e-2)


def test_horizon_zero_is_the_sac_actor_loss() -> None:
    """H = 0: no model call, and loss and actor gradient equal the hand-written mean(α log π(a|s) − min Q(s, a))."""
    torch.manual_seed(0)
    actor = Actor(3, 2, 32, 2, (1, 2), np.array([-2.0, -1.0]), np.array([2.0, 1.0])).double()
    twin = TwinQ(3, 2, 32, 2, (1, 2)).double()
    states = torch.randn(6, 3, dtype=F64)
    num_samples, terminal_q_samples = 3, 2
    noise = torch.randn(6 * num_samples * terminal_q_samples, 2, dtype=F64)

    def no_model(s: Tensor, a: Tensor):
        raise AssertionError("horizon 0 must not call the model")

    maac = maac_policy_loss(
        states, lambda s, n: actor.sample(s, noise, repeat=n), no_model, twin, None, None,
        horizon=0, num_samples=num_samples, terminal_q_samples=terminal_q_samples, gamma=0.99, alpha=ALPHA,
    ).loss
    g_maac = torch.autograd.grad(maac, list(actor.parameters()))

    a, log_prob = actor.sample(states.repeat_interleave(num_samples * terminal_q_samples, 0), noise)
    sac = (ALPHA * log_prob - torch.min(*twin(states.repeat_interleave(6, 0), a))).mean()
    g_sac = torch.autograd.grad(sac, list(actor.parameters()))
    torch.testing.assert_close(maac, sac)
    for x, y in zip(g_maac, g_sac):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_termination_stops_reward_and_value_accumulation(k: int) -> None:
    """Row 0 terminates on its transition k (of H = 4), row 1 never: nothing after k reaches row 0's objective.

    State = [t, terminating step, x]; reward w[t] + c·a, terminal Q = q0 + d·a, action θ. So
    ∂J/∂w_t = γ^t while alive, ∂J/∂q0 = γ^H only if alive at H, ∂J/∂θ collects c·γ^t (+ d·γ^H) likewise.
    """
    horizon, c, d = 4, 0.7, -1.3
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64, requires_grad=True)
    q0 = torch.tensor(5.0, dtype=F64, requires_grad=True)
    theta = torch.tensor(0.25, dtype=F64, requires_grad=True)
    start = torch.tensor([[0.0, float(k), 0.0], [0.0, 99.0, 0.0]], dtype=F64)

    def step(s: Tensor, a: Tensor) -> tuple[Tensor, None]:
        return s + torch.cat([torch.ones_like(a), torch.zeros_like(a), a], -1), None

    def reward(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
        return w[s[:, 0].long()] + c * a[:, 0]

    def terminated(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
        return s[:, 0] == s[:, 1]

    def policy(s: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
        return theta.expand(s.shape[0] * repeat, 1), torch.zeros(s.shape[0] * repeat, dtype=F64)

    def q(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        value = q0 + d * a[:, 0]
        return value, value + 1.0

    out = maac_policy_loss(
        start, policy, step, q, reward, terminated,
        horizon=horizon, num_samples=1, terminal_q_samples=1, gamma=GAMMA, alpha=0.0,
    )
    out.loss.backward()
    disc = GAMMA ** torch.arange(horizon, dtype=torch.float64)
    alive = (torch.arange(horizon) <= k).double()  # row 0 earns rewards of transitions 0..k
    # loss = −mean over the two rows; row 1 earns everything.
    torch.testing.assert_close(w.grad, -(disc * alive + disc) / 2)
    torch.testing.assert_close(q0.grad, torch.tensor(-GAMMA**horizon / 2, dtype=F64))
    expected_theta = -(c * (disc * alive).sum() + c * disc.sum() + d * GAMMA**horizon) / 2
    torch.testing.assert_close(theta.grad, expected_theta)
    row0 = ((w.detach() + c * 0.25) * disc * alive).sum()
    row1 = ((w.detach() + c * 0.25) * disc).sum() + GAMMA**horizon * (5.0 + d * 0.25)
    torch.testing.assert_close(out.loss.detach(), -(row0 + row1) / 2)
