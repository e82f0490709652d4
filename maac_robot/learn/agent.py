"""MAAC's actor, twin critics and the two model-based objectives (paper §4.1, §4.3).

`horizon` (AgentConfig.horizon) is the paper's H, counted in *model transitions*:

    J_π = E[ Σ_{t<H} γ^t m_t r(ŝ_t, a_t, ŝ_{t+1})  +  γ^H m_H · mean_k min(Q1, Q2)(ŝ_H, a_H^k) ]  −  α·E[log π(a_0 | ŝ_0)]

with H model steps, H rewards and the terminal value discounted by γ^H; m_t is the alive mask (1 until a
predicted termination, 0 after it). horizon: 0 uses no model and is exactly SAC's actor loss
α·log π(a|s) − min Q(s, a). The authors' TF loop with their "T = 3" imagines T+1 = 4 model steps before
γ^{T+1}·Q, i.e. their setting is horizon: 4 here (Walker: 2). Entropy is charged on the first action
only, as in their code (with horizon: 0 the first action is the one the Q is evaluated at).

Dynamics, rewards, terminations and the critic are passed to the objectives as plain callables, so the
tests can plug the true dynamics of a linear system and check the pathwise gradient exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from maac_robot.learn.buffer import Batch
from maac_robot.learn.rollout import Dynamics, TransitionFn, model_rollout
from maac_robot.runtime.errors import UserError

if TYPE_CHECKING:
    from maac_robot.learn.config import AgentConfig
    from maac_robot.learn.ensemble import GaussianEnsemble
    from maac_robot.learn.tasks import Task

# policy(state [B, S], repeat) -> (action [B·repeat, A], log_prob [B·repeat]): `repeat` reparameterised draws
# per state, rows in repeat_interleave order, so repeated states share one network pass.
Policy = Callable[[Tensor, int], tuple[Tensor, Tensor]]
Critic = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (s, a) -> (q1, q2)

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class StateShapeError(UserError, ValueError):
    """A state whose size is not the task's (e.g. an env built without the root-position state convention)."""


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """`layers` hidden ReLU layers of width `hidden`, then a linear output."""
    dims = [in_dim] + [hidden] * layers
    blocks: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        blocks += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], out_dim))


def _index_buffer(net_obs_idx: Sequence[int]) -> Tensor:
    return torch.as_tensor(list(net_obs_idx), dtype=torch.long)


class Actor(nn.Module):
    """Tanh-Gaussian policy over env-unit actions; sees only `net_obs_idx` of the full state."""

    def __init__(
        self,
        state_dim: int,
        act_dim: int,
        hidden: int,
        layers: int,
        net_obs_idx: Sequence[int],
        act_low: np.ndarray,
        act_high: np.ndarray,
    ) -> None:
        super().__init__()
        self.state_dim, self.act_dim = state_dim, act_dim
        self.register_buffer("net_obs_idx", _index_buffer(net_obs_idx))
        low = torch.tensor(np.array(act_low, dtype=np.float32))  # copies: env bounds may be read-only arrays
        high = torch.tensor(np.array(act_high, dtype=np.float32))
        self.register_buffer("act_scale", (high - low) / 2)
        self.register_buffer("act_bias", (high + low) / 2)
        self.net = mlp(len(net_obs_idx), 2 * act_dim, hidden, layers)

    def forward(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-tanh mean and log-std; log-std softly squashed into [LOG_STD_MIN, LOG_STD_MAX] (keeps a gradient)."""
        return self.from_net_obs(state.index_select(-1, self.net_obs_idx))

    def from_net_obs(self, net_obs: Tensor) -> tuple[Tensor, Tensor]:
        """`forward` on the dims the actor reads, net_obs = state[..., net_obs_idx] (the exported graph's input)."""
        mean, raw = self.net(net_obs).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw) + 1)
        return mean, log_std

    def squash(self, u: Tensor) -> Tensor:
        """Pre-tanh values -> env-unit actions: scale·tanh(u) + bias."""
        return torch.tanh(u) * self.act_scale + self.act_bias

    def sample(self, state: Tensor, noise: Tensor | None = None, *, repeat: int = 1,
               log_std_shift: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
        """Reparameterised action a = scale·tanh(μ + σ·ε) + bias and its log-density in env units.

        `repeat` > 1 draws that many actions per state (rows in repeat_interleave order) from one forward pass.
        `log_std_shift` is added to log σ: a diagnostic differentiates objectives through it (`entropy_pressure`).
        """
        mean, log_std = self(state)
        log_std = log_std + log_std_shift
        if repeat > 1:
            mean, log_std = mean.repeat_interleave(repeat, dim=0), log_std.repeat_interleave(repeat, dim=0)
        if noise is None:
            noise = torch.randn_like(mean)
        u = mean + log_std.exp() * noise
        action = self.squash(u)
        # log N(u; μ, σ) − log|da/du|, with log(1 − tanh²u) = 2(log 2 − u − softplus(−2u)) (exact, no ε needed).
        log_det = torch.log(self.act_scale) + 2 * (math.log(2) - u - F.softplus(-2 * u))
        log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi) - log_det).sum(-1)
        return action, log_prob

    def deterministic(self, state: Tensor) -> Tensor:
        return self.squash(self(state)[0])


class TwinQ(nn.Module):
    """Two independent Q-networks (clipped double Q); actions in env units."""

    def __init__(self, state_dim: int, act_dim: int, hidden: int, layers: int, net_obs_idx: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("net_obs_idx", _index_buffer(net_obs_idx))
        self.q1 = mlp(len(net_obs_idx) + act_dim, 1, hidden, layers)
        self.q2 = mlp(len(net_obs_idx) + act_dim, 1, hidden, layers)

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([state.index_select(-1, self.net_obs_idx), action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class PolicyLoss(NamedTuple):
    loss: Tensor  # −J_π (minimise); differentiable w.r.t. the policy's parameters
    log_prob: Tensor  # log π of the entropy-charged (first) actions, detached: feeds the α loss
    model_return: Tensor  # mean discounted imagined reward Σ γ^t m_t r_t, detached (diagnostic)


def maac_policy_loss(
    start_states: Tensor,
    policy: Policy,
    dynamics: Dynamics | None,
    critic: Critic,
    reward_fn: TransitionFn | None,
    termination_fn: TransitionFn | None,
    *,
    horizon: int,
    num_samples: int,
    terminal_q_samples: int,
    gamma: float,
    alpha: float | Tensor,
) -> PolicyLoss:
    """The MAAC objective (paper §4.3), negated, with its pathwise gradient by backprop through time.

    J_π = mean over start states s_0 (each repeated `num_samples` times) of
        Σ_{t<H} γ^t m_t r(ŝ_t, a_t, ŝ_{t+1})  +  γ^H m_H · mean_{k<terminal_q_samples} min(Q1, Q2)(ŝ_H, a_H^k)
      − α · log π(a_0 | s_0)
    with a_t = policy(ŝ_t) reparameterised, ŝ_{t+1} = dynamics(ŝ_t, a_t) reparameterised, m_0 = 1 and
    m_{t+1} = m_t·(1 − termination(ŝ_t, a_t, ŝ_{t+1})). With H = 0 the first actions are the a_0^k the Q is
    evaluated at, so the loss is SAC's mean(α·log π(a|s) − min Q(s, a)).
    """
    if horizon > 0 and dynamics is None:
        raise ValueError(f"horizon {horizon} > 0 needs a dynamics model")
    terminal_log_prob = None

    def act(t: int, state: Tensor) -> tuple[Tensor, Tensor]:
        # The num_samples copies of a start state share one policy pass and draw their own noise.
        return policy(start_states, num_samples) if t == 0 else policy(state, 1)

    def terminal_q(last: Tensor) -> Tensor:
        """mean_k min(Q1, Q2)(ŝ_H, a_H^k); with H = 0 the a_0^k at the start states, whose log π is charged."""
        nonlocal terminal_log_prob
        last, repeat = (last, terminal_q_samples) if horizon > 0 else (start_states, num_samples * terminal_q_samples)
        terminal_actions, terminal_log_prob = policy(last, repeat)
        q1, q2 = critic(last.repeat_interleave(repeat, dim=0), terminal_actions)
        return torch.min(q1, q2).view(-1, terminal_q_samples).mean(dim=1)

    path = model_rollout(start_states.repeat_interleave(num_samples, dim=0), act, dynamics,  # type: ignore[arg-type]
                         reward_fn, termination_fn, horizon=horizon, gamma=gamma, terminal_value=terminal_q)
    first_log_prob = path.log_probs[0] if horizon > 0 else terminal_log_prob
    loss = alpha * first_log_prob.mean() - path.value.mean()  # type: ignore[union-attr]
    return PolicyLoss(loss, first_log_prob.detach(), path.returns[-1].detach().mean())


def twin_value(q1: Tensor, q2: Tensor, pessimism: float = 1.0) -> Tensor:
    """mean(Q1, Q2) − pessimism·|Q1 − Q2|/2: 1 is clipped double Q's min(Q1, Q2), 0 the twins' mean.

    The min's per-backup underestimate compounds over the ~1/(1−γ) steps a target looks ahead: on
    InvertedPendulum, with the policy frozen, the critic settles ~20 below the realised soft return under it
    (benchmarks/RESULTS.md, critic probe); the knob lets a task trade that pessimism back."""
    if pessimism == 1.0:  # the exact min: the formula below rounds differently, and 1 is every config's default
        return torch.min(q1, q2)
    return 0.5 * (q1 + q2) - pessimism * 0.5 * (q1 - q2).abs()


@torch.no_grad()
def soft_bellman_target(
    reward: Tensor, done: Tensor, next_state: Tensor, policy: Policy, target_critic: Critic, *, gamma: float,
    alpha: float | Tensor, pessimism: float = 1.0,
) -> Tensor:
    """SAC's target r + γ(1 − d)(min Q_targ(s', a') − α log π(a'|s')), a' ~ π(s') (min: see `twin_value`)."""
    next_action, log_prob = policy(next_state, 1)
    soft_value = twin_value(*target_critic(next_state, next_action), pessimism) - alpha * log_prob
    return reward + gamma * (1 - done) * soft_value


def inverse_variance_combine(candidates: Tensor, eps: float = 1e-6) -> Tensor:
    """STEVE's combination: candidates [I, K, B] (I horizons, K ensemble estimates each) -> [B].

    Each horizon's mean is weighted by the inverse of its variance across the K estimates, so a
    horizon the ensemble disagrees on contributes little. `eps` keeps zero-variance candidates finite.
    """
    weights = 1.0 / (candidates.var(dim=1, unbiased=False) + eps)
    return (weights * candidates.mean(dim=1)).sum(0) / weights.sum(0)


@torch.no_grad()
def steve_targets(
    reward: Tensor,
    done: Tensor,
    next_state: Tensor,
    policy: Policy,
    member_dynamics: Dynamics,
    target_critic: Critic,
    reward_fn: TransitionFn | None,
    termination_fn: TransitionFn | None,
    *,
    horizon: int,
    num_members: int,
    gamma: float,
    alpha: float | Tensor,
    pessimism: float = 1.0,
) -> Tensor:
    """Model-expanded critic targets in the spirit of STEVE (Buckman et al. 2018), soft and clipped-double-Q.

    From s'_0 = s', K = `num_members` imagined trajectories per row follow the policy through the model
    (`member_dynamics` maps [K, B, S], [K, B, A] -> [K, B, S]). Candidate i = 0..H:
        T^i = r + γ(1 − d)[ Σ_{j<i} γ^j m_j (r'_j − α log π(a'_j|s'_j)) + γ^i m_i (min Q_targ(s'_i, a'_i) − α log π(a'_i|s'_i)) ]
    T^0 is SAC's one-step target. The intermediate entropy terms keep every T^i an unbiased unrolling
    of the same soft Q (unlike the actor's, the critic's fixed point has entropy at every step). The K
    estimates of each T^i give its mean and variance, combined by inverse-variance weighting. The min is
    `twin_value` at `pessimism`.
    """
    def act(t: int, state: Tensor) -> tuple[Tensor, Tensor]:
        action, log_prob = policy(state.flatten(0, 1), 1)
        return action.view(*state.shape[:-1], -1), log_prob.view(state.shape[:-1])

    path = model_rollout(next_state.expand(num_members, *next_state.shape), act, member_dynamics, reward_fn,
                         termination_fn, horizon=horizon, gamma=gamma, alpha=alpha)
    # Every prefix of the rollout is a candidate, so the soft value is taken at every ŝ_i (the policy's action
    # at ŝ_H is the last draw), in one critic call for all horizons: [I, K, B].
    last_action, last_log_prob = act(horizon, path.states[-1])
    q1, q2 = target_critic(torch.stack(path.states), torch.stack([*path.actions, last_action]))
    soft_value = twin_value(q1, q2, pessimism) - alpha * torch.stack([*path.log_probs, last_log_prob])
    discount = gamma ** torch.arange(horizon + 1, dtype=soft_value.dtype, device=soft_value.device).view(-1, 1, 1)
    candidates = reward + gamma * (1 - done) * (torch.stack(path.returns) + discount * torch.stack(path.alive) * soft_value)
    return inverse_variance_combine(candidates)


def _member_dynamics(model: GaussianEnsemble) -> tuple[Dynamics, int]:
    """STEVE's K trajectories per row: each follows one member of a random half of the elites (at least
    two, as the authors used half the ensemble), sampled from its Gaussian, all K in one batched pass."""
    elites = model.elites
    num_members = min(elites.numel(), max(2, elites.numel() // 2))
    members = elites[torch.randperm(elites.numel(), device=elites.device)[:num_members]]

    def dynamics(state: Tensor, action: Tensor) -> tuple[Tensor, Tensor | None]:
        mean, logvar, reward_mean, reward_logvar = model.predict_members(state, action, members)
        next_state = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        if reward_mean is None:
            return next_state, None
        return next_state, reward_mean + (0.5 * reward_logvar).exp() * torch.randn_like(reward_mean)

    return dynamics, num_members


def fused_adam(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """Adam whose step is one fused kernel over all tensors: the same update as the per-tensor loop to float
    rounding, and on the small nets of the small configs the loop's ~10 operators per tensor cost more than
    the arithmetic (InvertedPendulum's actor: 0.51 ms per step against 0.13 ms fused, one EPYC core)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def _fuse(optimizer: torch.optim.Optimizer) -> None:
    """Checkpoints written before the fused step name the per-tensor one in their param groups: fuse them."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None


@contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Stop weight gradients of `modules` while the actor loss backpropagates through them (saves the work)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class MAACAgent:
    """Actor, twin critics with Polyak targets, temperature α and their optimisers: one G2 step per `update`."""

    def __init__(self, task: Task, cfg: AgentConfig, device: torch.device | str = "cpu") -> None:
        info = task.info
        self.task, self.cfg, self.device = task, cfg, torch.device(device)
        self.actor = Actor(
            info.state_dim, info.act_dim, cfg.hidden, cfg.layers, info.net_obs_idx, info.act_low, info.act_high
        ).to(self.device)
        self.critic = TwinQ(info.state_dim, info.act_dim, cfg.hidden, cfg.layers, info.net_obs_idx).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # entropy: false is the "no max-entropy" ablation: α is 0 and never tuned.
        init_log_alpha = math.log(cfg.init_alpha) if cfg.entropy else -math.inf
        self.log_alpha = torch.tensor(init_log_alpha, device=self.device, requires_grad=cfg.entropy)
        # log π is in env units (Actor.sample), so for bounds other than ±1 this −|A| is not SAC's: see AgentConfig.
        self.target_entropy = -float(info.act_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.actor_opt = fused_adam(self.actor.parameters(), lr=cfg.lr)
        self.critic_opt = fused_adam(self.critic.parameters(), lr=cfg.lr)
        self.alpha_opt = fused_adam([self.log_alpha], lr=cfg.lr) if cfg.entropy else None
        # Non-terminating tasks skip the (all-False) termination function in the hot loops.
        self.termination_fn = task.termination_fn if info.terminates else None

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    @property
    def temperature(self) -> Tensor:
        """α as a 0-d tensor on the agent's device: what the objectives multiply by, with no host sync on a GPU
        (the same float32 value as `alpha`, so the arithmetic is the same)."""
        return self.log_alpha.detach().exp()

    def batch_split(self, model_data: bool = True) -> tuple[int, int]:
        """(real rows, model rows) of one G2 batch: real_ratio of it from D_env, the rest from D_model."""
        batch = self.cfg.batch_size
        if self.cfg.real_data_only or not model_data:
            return batch, 0
        n_real = round(self.cfg.real_ratio * batch)
        return n_real, batch - n_real

    def _policy(self, state: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
        return self.actor.sample(state, repeat=repeat)

    @torch.no_grad()
    def act(self, state: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Action in env units for one state [S] or a batch [B, S]."""
        s = torch.as_tensor(state, dtype=torch.float32, device=self.device)
        if s.ndim not in (1, 2) or s.shape[-1] != self.task.info.state_dim:
            raise StateShapeError(
                f"{self.task.info.env_id} states have {self.task.info.state_dim} dims (root position included), "
                f"got an array of shape {tuple(s.shape)}"
            )
        action = self.actor.deterministic(s) if deterministic else self.actor.sample(s)[0]
        return action.cpu().numpy()

    def update(self, real_batch: Batch, model_batch: Batch | None, model: GaussianEnsemble | None) -> dict[str, Tensor]:
        """One G2 step on D_env ∪ D_model: critic (and its Polyak target), then actor (MAAC objective), then α.

        The batches are `buffer.Batch`es sized by `batch_split` (model_batch None or ignored when
        real_data_only); their states are also the actor's start states ŝ_0. `model` (its random-elite
        `step`) drives the policy rollouts and, with `steve`, the expanded targets; it may be None only
        with horizon 0 (then the critic target is SAC's). Returns the losses and diagnostics as 0-d tensors on the
        agent's device: reading them is the caller's host sync, once per env step rather than once per value.
        """
        if model_batch is not None and len(model_batch) > 0 and not self.cfg.real_data_only:
            batch = Batch.cat([real_batch, model_batch])
        else:
            batch = real_batch
        stats = self.update_critic(batch, model)
        return stats | self.update_actor(batch.state.to(self.device), model)

    def critic_targets(self, batch: Batch, model: GaussianEnsemble | None) -> Tensor:
        """The critic's regression targets for `batch`: STEVE-expanded (or SAC's one-step) soft targets."""
        cfg = self.cfg
        r, s2 = batch.reward.to(self.device), batch.next_state.to(self.device)
        done = batch.terminated.to(self.device, s2.dtype)
        if cfg.steve and cfg.steve_horizon > 0 and model is not None:
            member_dynamics, num_members = _member_dynamics(model)
            return steve_targets(
                r, done, s2, self._policy, member_dynamics, self.critic_target, self.task.reward_fn, self.termination_fn,
                horizon=cfg.steve_horizon, num_members=num_members, gamma=cfg.gamma, alpha=self.temperature,
                pessimism=cfg.critic_pessimism,
            )
        return soft_bellman_target(r, done, s2, self._policy, self.critic_target, gamma=cfg.gamma, alpha=self.temperature,
                                   pessimism=cfg.critic_pessimism)

    def update_critic(self, batch: Batch, model: GaussianEnsemble | None) -> dict[str, Tensor]:
        """One twin-Q step towards `critic_targets`, then the Polyak target step."""
        with record_function("critic_targets"):
            target = self.critic_targets(batch, model)
        with record_function("critic_step"):
            q1, q2 = self.critic(batch.state.to(self.device), batch.action.to(self.device))
            q_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
            self.critic_opt.zero_grad(set_to_none=True)
            q_loss.backward()
            self.critic_opt.step()
            with torch.no_grad():  # Polyak step of every target tensor in one kernel
                torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.cfg.tau)
        return {"q_loss": q_loss.detach(), "q_mean": q1.detach().mean(), "target_mean": target.mean()}

    def update_actor(self, start_states: Tensor, model: GaussianEnsemble | None) -> dict[str, Tensor]:
        """One actor step on the MAAC objective from `start_states`, then one α step towards the target entropy."""
        cfg = self.cfg
        with frozen(self.critic, model):
            with record_function("policy_objective"):
                pl = maac_policy_loss(
                    start_states, self._policy, None if model is None else model.step, self.critic,
                    self.task.reward_fn, self.termination_fn, horizon=cfg.horizon, num_samples=cfg.num_samples,
                    terminal_q_samples=cfg.terminal_q_samples, gamma=cfg.gamma, alpha=self.temperature,
                )
            with record_function("actor_step"):
                self.actor_opt.zero_grad(set_to_none=True)
                pl.loss.backward()
                self.actor_opt.step()

        if self.alpha_opt is not None:
            with record_function("alpha_step"):
                alpha_loss = -(self.log_alpha * (pl.log_prob + self.target_entropy)).mean()
                self.alpha_opt.zero_grad(set_to_none=True)
                alpha_loss.backward()
                self.alpha_opt.step()
        return {
            "policy_loss": pl.loss.detach(),
            "model_return": pl.model_return,
            "alpha": self.temperature,
            "entropy": -pl.log_prob.mean(),
        }

    def state_dict(self) -> dict[str, object]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": None if self.alpha_opt is None else self.alpha_opt.state_dict(),
        }

    def load_state_dict(self, sd: Mapping[str, object]) -> None:
        self.actor.load_state_dict(sd["actor"])  # type: ignore[arg-type]
        self.critic.load_state_dict(sd["critic"])  # type: ignore[arg-type]
        self.critic_target.load_state_dict(sd["critic_target"])  # type: ignore[arg-type]
        self.actor_opt.load_state_dict(sd["actor_opt"])  # type: ignore[arg-type]
        self.critic_opt.load_state_dict(sd["critic_opt"])  # type: ignore[arg-type]
        if (sd["alpha_opt"] is None) != (self.alpha_opt is None):
            raise ValueError(f"checkpoint's agent.entropy differs from this config's entropy: {self.cfg.entropy}")
        if self.alpha_opt is not None:
            self.alpha_opt.load_state_dict(sd["alpha_opt"])  # type: ignore[arg-type]
        for opt in (self.actor_opt, self.critic_opt, self.alpha_opt):
            if opt is not None:
                _fuse(opt)
        with torch.no_grad():
            self.log_alpha.copy_(sd["log_alpha"])  # type: ignore[arg-type]
