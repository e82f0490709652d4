"""Actor, twin Q, STEVE targets and one MAACAgent G2 step, against small fakes of the ensemble and task."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from maac_robot.learn.agent import (
    Actor,
    MAACAgent,
    StateShapeError,
    fused_adam,
    inverse_variance_combine,
    soft_bellman_target,
    steve_targets,
    twin_value,
)
from maac_robot.learn.buffer import Batch
from maac_robot.learn.config import AgentConfig
from maac_robot.envs import EnvInfo
from maac_robot.learn.tasks import Task

F64 = torch.float64
LOW, HIGH = np.array([-2.0, -1.0]), np.array([2.0, 1.0])
INFO = EnvInfo("Fake-v0", state_dim=4, act_dim=2, act_low=LOW, act_high=HIGH, dt=0.05, net_obs_idx=(1, 2, 3),
               terminates=True)


def fake_reward(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    return (s2[..., 0] - s[..., 0]) / INFO.dt - 0.1 * a.square().sum(-1)


def fake_termination(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    return s2[..., 1].abs() > 1.5


FAKE_TASK = Task(INFO, fake_reward, fake_termination)


class FakeEnsemble(nn.Module):
    """Stands in for GaussianEnsemble (step, predict_members, elites): learnable, differentiable, noisy."""

    def __init__(self, num_models: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(INFO.state_dim + INFO.act_dim, INFO.state_dim)
        self.member_bias = nn.Parameter(0.01 * torch.randn(num_models, INFO.state_dim))
        self.register_buffer("elites", torch.arange(num_models))

    def _mean(self, state: Tensor, action: Tensor, members: Tensor) -> Tensor:
        return state + 0.1 * torch.tanh(self.net(torch.cat([state, action], -1))) + self.member_bias[members]

    def predict_members(self, state: Tensor, action: Tensor, members: Tensor):
        mean = self._mean(state, action, members.view(-1, 1))
        return mean, torch.full_like(mean, -6.0), None, None

    def step(self, state: Tensor, action: Tensor, *, sample: bool = True, generator: torch.Generator | None = None):
        members = self.elites[torch.randint(self.elites.numel(), state.shape[:1], generator=generator)]
        mean = self._mean(state, action, members)
        return (mean + 0.05 * torch.randn(mean.shape, generator=generator) if sample else mean), None


def make_batch(n: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(n, 4, generator=g)
    return Batch(state, torch.rand(n, 2, generator=g) * 2 - 1, torch.randn(n, generator=g),
                 state + 0.1 * torch.randn(n, 4, generator=g), torch.rand(n, generator=g) < 0.1)


# --- actor ---------------------------------------------------------------------------------------

def test_actor_log_prob_is_the_squashed_scaled_gaussian_density() -> None:
    torch.manual_seed(0)
    actor = Actor(4, 2, 32, 2, (1, 2, 3), LOW, HIGH)
    state, noise = torch.randn(64, 4), torch.randn(64, 2)
    action, log_prob = actor.sample(state, noise)
    mean, log_std = actor(state)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(actor.act_bias, actor.act_scale)],
    )
    torch.testing.assert_close(log_prob, dist.log_prob(action).sum(-1), atol=1e-4, rtol=1e-4)
    assert (action >= torch.as_tensor(LOW)).all() and (action <= torch.as_tensor(HIGH)).all()
    torch.testing.assert_close(actor.deterministic(state), torch.tanh(mean) * actor.act_scale + actor.act_bias)
    assert log_std.min() >= -5 and log_std.max() <= 2
    # repeat: one forward pass per state, same draws as sampling the repeated states.
    many_noise = torch.randn(64 * 3, 2)
    torch.testing.assert_close(actor.sample(state, many_noise, repeat=3),
                               actor.sample(state.repeat_interleave(3, dim=0), many_noise))


def test_actor_and_critic_ignore_excluded_position() -> None:
    """The networks see only net_obs_idx: changing root x (dim 0) changes nothing."""
    agent = MAACAgent(FAKE_TASK, AgentConfig())
    s = torch.randn(8, 4)
    shifted = s.clone()
    shifted[:, 0] += 100.0
    a = torch.rand(8, 2)
    torch.testing.assert_close(agent.actor(s), agent.actor(shifted))
    torch.testing.assert_close(agent.critic(s, a), agent.critic(shifted, a))


def test_actor_sample_is_reparameterised() -> None:
    """The action's gradient w.r.t. the actor's weights matches finite differences (float64)."""
    torch.manual_seed(1)
    actor = Actor(4, 2, 16, 2, (1, 2, 3), LOW, HIGH).double()
    state, noise = torch.randn(5, 4, dtype=F64), torch.randn(5, 2, dtype=F64)
    weight = actor.net[-1].weight
    (grad,) = torch.autograd.grad(actor.sample(state, noise)[0].sum(), weight)
    eps, i = 1e-6, 3  # row 3 of the output layer feeds the second action's log-std
    j = int(grad[i].abs().argmax())
    with torch.no_grad():
        weight[i, j] += eps
        plus = actor.sample(state, noise)[0].sum()
        weight[i, j] -= 2 * eps
        minus = actor.sample(state, noise)[0].sum()
    assert grad[i, j].item() == pytest.approx(((plus - minus) / (2 * eps)).item(), rel=1e-6)
    assert grad[i, j].abs() > 0


# --- STEVE ---------------------------------------------------------------------------------------

def _det_policy(s: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
    """Deterministic 'policy' with a state-dependent log-prob, so entropy terms are exercised."""
    s = s.repeat_interleave(repeat, dim=0)
    return torch.tanh(s[..., :2]), -0.5 * s.square().sum(-1)


def _target_critic(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    q = s.sum(-1) + a.sum(-1) ** 2
    return q, q + 0.5


def test_steve_horizon_zero_with_perfect_model_is_the_soft_bellman_target() -> None:
    g = torch.Generator().manual_seed(0)
    s2, r = torch.randn(32, 4, generator=g, dtype=F64), torch.randn(32, generator=g, dtype=F64)
    done = (torch.rand(32, generator=g) < 0.3).to(F64)
    perfect = lambda s, a: (s + 0.1 * torch.cat([a, a], -1), None)  # noqa: E731
    steve = steve_targets(r, done, s2, _det_policy, perfect, _target_critic, fake_reward, None,
                          horizon=0, num_members=3, gamma=0.9, alpha=0.2)
    plain = soft_bellman_target(r, done, s2, _det_policy, _target_critic, gamma=0.9, alpha=0.2)
    torch.testing.assert_close(steve, plain)


@pytest.mark.parametrize("pessimism", [0.0, 0.5, 1.0])
def test_critic_pessimism_moves_the_target_from_the_twin_min_to_their_mean(pessimism: float) -> None:
    """_target_critic's twins differ by 0.5 everywhere: the one-step target's bootstrapped value is
    min + (1 − pessimism)·0.25, and the STEVE expansion (H=0) applies the same twin reduction."""
    g = torch.Generator().manual_seed(1)
    s2, r = torch.randn(16, 4, generator=g, dtype=F64), torch.randn(16, generator=g, dtype=F64)
    done = torch.zeros(16, dtype=F64)
    clipped = soft_bellman_target(r, done, s2, _det_policy, _target_critic, gamma=0.9, alpha=0.2)
    target = soft_bellman_target(r, done, s2, _det_policy, _target_critic, gamma=0.9, alpha=0.2, pessimism=pessimism)
    torch.testing.assert_close(target - clipped, torch.full_like(r, 0.9 * (1 - pessimism) * 0.25))
    perfect = lambda s, a: (s, None)  # noqa: E731
    steve = steve_targets(r, done, s2, _det_policy, perfect, _target_critic, fake_reward, None,
                          horizon=0, num_members=2, gamma=0.9, alpha=0.2, pessimism=pessimism)
    torch.testing.assert_close(steve, target)
    q1, q2 = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    torch.testing.assert_close(twin_value(q1, q2, pessimism), torch.minimum(q1, q2) + (1 - pessimism) * 1.0)


@pytest.mark.parametrize("horizon", [1, 2, 3])
def test_steve_candidates_agree_at_the_soft_fixed_point(horizon: int) -> None:
    """r ≡ 1, log π ≡ ℓ, Q_targ ≡ c with c = 1 + γ(c − αℓ): every candidate T^i equals c (or r if done),
    so the entropy and discount bookkeeping of the expansion is consistent with the one-step target.
    """
    gamma, alpha, ell = 0.9, 0.3, -1.7
    c = (1 - gamma * alpha * ell) / (1 - gamma)
    s2 = torch.randn(16, 4, dtype=F64)
    done = torch.tensor([0.0, 1.0] * 8, dtype=F64)
    policy = lambda s, n: (s[..., :2], torch.full(s.shape[:-1], ell, dtype=F64))  # noqa: E731  (only n = 1 here)
    critic = lambda s, a: (torch.full(s.shape[:-1], c, dtype=F64),) * 2  # noqa: E731
    model = lambda s, a: (s + 0.1, torch.ones(s.shape[:-1], dtype=F64))  # learned reward ≡ 1  # noqa: E731
    target = steve_targets(torch.ones(16, dtype=F64), done, s2, policy, model, critic, None, None,
                           horizon=horizon, num_members=4, gamma=gamma, alpha=alpha)
    torch.testing.assert_close(target, torch.where(done.bool(), 1.0, c).to(F64))
    # A predicted termination on the first model step: T^0 = c, T^{i≥1} = 1 + γ(1 − αℓ); equal weights (no spread).
    always = lambda s, a, s2: torch.ones(s.shape[:-1], dtype=torch.bool)  # noqa: E731
    target = steve_targets(torch.ones(16, dtype=F64), torch.zeros(16, dtype=F64), s2, policy, model, critic,
                           None, always, horizon=horizon, num_members=4, gamma=gamma, alpha=alpha)
    cut = 1 + gamma * (1 - alpha * ell)
    torch.testing.assert_close(target, torch.full((16,), (c + horizon * cut) / (horizon + 1), dtype=F64))


def test_inverse_variance_weighting_prefers_the_confident_candidate() -> None:
    confident = torch.tensor([10.0, 10.01, 9.99, 10.0])
    vague = torch.tensor([0.0, 100.0, -50.0, 30.0])
    combined = inverse_variance_combine(torch.stack([vague, confident]).unsqueeze(-1))
    assert combined.item() == pytest.approx(10.0, abs=1e-2)
    # End to end: members disagree wildly about imagined rewards, so the target falls back to T^0.
    s2, r = torch.randn(8, 4, dtype=F64), torch.randn(8, dtype=F64)
    done = torch.zeros(8, dtype=F64)

    def quarrelsome(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64).view(4, 1)
        return s, 100.0 * sign.expand(s.shape[:-1])

    steve = steve_targets(r, done, s2, _det_policy, quarrelsome, _target_critic, None, None,
                          horizon=2, num_members=4, gamma=0.9, alpha=0.2)
    plain = soft_bellman_target(r, done, s2, _det_policy, _target_critic, gamma=0.9, alpha=0.2)
    torch.testing.assert_close(steve, plain, atol=1e-6, rtol=1e-6)


# --- MAACAgent -----------------------------------------------------------------------------------

def _agent(**overrides: object) -> MAACAgent:
    cfg = AgentConfig(hidden=32, batch_size=64, **overrides)
    return MAACAgent(FAKE_TASK, cfg)


def test_update_moves_targets_by_tau_and_returns_finite_losses() -> None:
    torch.manual_seed(0)
    agent, model = _agent(), FakeEnsemble()
    n_real, n_model = agent.batch_split()
    assert (n_real, n_model) == (3, 61)
    target_before = [p.clone() for p in agent.critic_target.parameters()]
    stats = agent.update(make_batch(n_real, 0), make_batch(n_model, 1), model)
    assert set(stats) >= {"q_loss", "policy_loss", "alpha", "entropy"}
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["alpha"] != 1.0  # α was tuned
    for old, new, online in zip(target_before, agent.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new, old + 5e-3 * (online - old))
    assert all(p.grad is None for p in model.parameters())  # the actor step never trains the model
    assert all(p.requires_grad for p in model.parameters())  # ...and hands it back trainable


def test_real_data_only_ignores_the_model_batch() -> None:
    torch.manual_seed(0)
    agent, model = _agent(real_data_only=True), FakeEnsemble()
    assert agent.batch_split() == (64, 0)
    poisoned = make_batch(16, 1)
    poisoned = Batch(poisoned.state * math.nan, *(getattr(poisoned, f) for f in ("action", "reward", "next_state",
                                                                                  "terminated")))
    stats = agent.update(make_batch(64, 0), poisoned, model)
    assert all(math.isfinite(v) for v in stats.values())


def test_ablations_run_without_model_or_entropy() -> None:
    torch.manual_seed(0)
    agent = _agent(horizon=0, entropy=False)
    stats = agent.update(make_batch(64, 0), None, None)
    assert stats["alpha"] == 0.0 and all(math.isfinite(v) for k, v in stats.items())
    with pytest.raises(ValueError, match="needs a dynamics model"):
        _agent(horizon=2).update(make_batch(64, 0), None, None)


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    agent, model = _agent(), FakeEnsemble()
    agent.update(make_batch(3, 0), make_batch(61, 1), model)
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)  # through bytes, as a checkpoint is (no shared optimizer tensors)
    buffer.seek(0)
    clone = _agent()
    clone.load_state_dict(torch.load(buffer))
    torch.manual_seed(5)
    a = agent.update(make_batch(3, 2), make_batch(61, 3), model)
    torch.manual_seed(5)
    b = clone.update(make_batch(3, 2), make_batch(61, 3), model)
    assert a == b
    for p, q in zip(agent.actor.parameters(), clone.actor.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="entropy"):
        _agent(entropy=False).load_state_dict(agent.state_dict())


def test_fused_adam_takes_the_per_tensor_step_to_float_rounding() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    fused, plain = copy.deepcopy(net), copy.deepcopy(net)
    opts = fused_adam(fused.parameters(), lr=1e-2), torch.optim.Adam(plain.parameters(), lr=1e-2)
    for step in range(20):
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(step))
        for model, opt in zip((fused, plain), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q, start in zip(fused.parameters(), plain.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, start)  # both moved


def test_a_checkpoint_of_the_per_tensor_adam_loads_fused() -> None:
    agent = _agent()
    sd = agent.state_dict()
    for key in ("actor_opt", "critic_opt", "alpha_opt"):  # what checkpoints written before the fused step hold
        for group in sd[key]["param_groups"]:
            group["fused"], group["foreach"] = None, None
    clone = _agent()
    clone.load_state_dict(sd)
    assert all(g["fused"] for opt in (clone.actor_opt, clone.critic_opt, clone.alpha_opt) for g in opt.param_groups)


def test_act_returns_bounded_numpy_actions() -> None:
    agent = _agent()
    one = agent.act(np.zeros(4, np.float32), deterministic=True)
    many = agent.act(np.random.default_rng(0).normal(size=(7, 4)))
    assert one.shape == (2,) and many.shape == (7, 2) and isinstance(many, np.ndarray)
    assert (np.abs(many) <= HIGH).all()
    with pytest.raises(StateShapeError, match="Fake-v0 states have 4 dims"):
        agent.act(np.zeros(3, np.float32))


@pytest.mark.parametrize("learn_reward", [False, True])
def test_update_with_the_real_ensemble(learn_reward: bool) -> None:
    """Hopper-v5's closed-form reward and termination, or a learned reward head (task.reward_fn None)."""
    from maac_robot.learn.ensemble import GaussianEnsemble
    from maac_robot.learn.tasks import get_task

    torch.manual_seed(0)
    task = get_task("Hopper-v5")
    if learn_reward:
        task = Task(task.info, None, task.termination_fn)
    info = task.info
    model = GaussianEnsemble(info.state_dim, info.act_dim, num_models=4, num_elites=3, hidden=32, layers=2,
                             learn_reward=learn_reward, net_obs_idx=info.net_obs_idx, min_logvar=-10, max_logvar=0.5)
    agent = MAACAgent(task, AgentConfig(hidden=32, batch_size=32, horizon=3, num_samples=2, terminal_q_samples=2))
    g = torch.Generator().manual_seed(0)
    state = torch.randn(32, info.state_dim, generator=g) * 0.1
    state[:, 1] += 1.25  # healthy torso height, so most imagined rollouts start alive
    batch = Batch(state, torch.rand(32, info.act_dim, generator=g) * 2 - 1, torch.randn(32, generator=g),
                  state + 0.01 * torch.randn(32, info.state_dim, generator=g), torch.zeros(32, dtype=torch.bool))
    for _ in range(3):
        stats = agent.update(batch, None, model)
    assert all(math.isfinite(v) for v in stats.values())
    assert all(p.grad is None for p in model.parameters())
