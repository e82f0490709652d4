"""Bootstrap ensemble of probabilistic dynamics models (MAAC §4.3 'Model learning', as in PETS/MBPO).

M Gaussian MLPs with diagonal covariance predict the normalised Δstate (and reward, for envs without
a closed-form reward). All members live in one module with weights shaped [M, in, out] and run as
batched matmuls (`torch.baddbmm`): one kernel per layer for the whole ensemble, never a Python loop
over members. Each member sees only the network dims of the state (`net_obs_idx`), so absolute root
position never enters a network, yet Δx is predicted and the closed-form reward stays exact.

For an env whose termination rule nobody wrote down (`learn_termination`), each member also has a termination
head: a small MLP from the network dims of a state to one Bernoulli logit, "this state ends the episode",
trained with BCE on D_env's `terminated` flags (each member on its bootstrap resample) and used as a hard mask
in imagined rollouts like a closed-form rule (`terminated`). It reads the *next* state, as every closed-form
rule does, rather than being one more output of the dynamics MLP on (s, a): so it judges the ŝ' the rollout
actually sampled, and it costs one small MLP per step instead of a second pass of the ensemble (the rollouts
call dynamics and termination separately, `rollout.model_rollout`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maac_robot.learn.config import ModelConfig

_LOGVAR_BOUND_REG = 0.01  # PETS: pulls max_logvar down and min_logvar up, keeping the learned bounds tight
_HOLDOUT_CHUNK = 8192  # rows per holdout evaluation pass (bounds memory on large buffers)
_UNMODELLED_LOGVAR = -20.0  # log-variance reported for the dims carried over unchanged (std ~5e-5)
_TERM_HIDDEN, _TERM_LAYERS = 64, 2  # termination head: a rule over a few state dims (ranges, a box) needs little
# The head starts at p(terminal) = 1 % (the prior bias of rare-event classifiers): terminal transitions are ~1 per
# episode, and an untrained head must say "never", not sit at p = 0.5 where the hard mask flips on rounding.
_TERM_PRIOR_LOGIT = math.log(0.01 / 0.99)


def holdout_split(n: int, ratio: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Random (train, holdout) row indices; `fit` draws this first from its generator."""
    num_holdout = int(n * ratio)
    if num_holdout < 1 or num_holdout >= n:
        raise ValueError(f"cannot hold out {ratio:.0%} of {n} transitions: need at least one in each split")
    perm = torch.randperm(n, generator=generator)
    return perm[num_holdout:], perm[:num_holdout]


def _set_moments(mean: Tensor, std: Tensor, data: Tensor) -> None:
    """Per-dim mean/std of `data` into the buffers; constant dims get std 1 (no division by ~0)."""
    mean.copy_(data.mean(0))
    sd = data.std(0)
    std.copy_(torch.where(sd < 1e-6, torch.ones_like(sd), sd))


class GaussianEnsemble(nn.Module):
    """M probabilistic MLPs over (state[net_obs_idx], action) -> N(Δstate [, reward]) in normalised units."""

    def __init__(self, state_dim: int, act_dim: int, *, num_models: int, num_elites: int, hidden: int, layers: int,
                 learn_reward: bool, net_obs_idx: tuple[int, ...] | list[int], min_logvar: float, max_logvar: float,
                 modelled_idx: tuple[int, ...] | list[int] | None = None, learn_termination: bool = False):
        """`modelled_idx`: the state dims the members predict (None: all). The others are carried over unchanged
        (Δ = 0, variance ~0): Ant's contact forces, mostly zero with rare spikes, kept an ensemble that also
        predicted them from learning anything (held-out MSE 0.95 after 40 epochs against 0.39 without them;
        benchmarks/model_fit.py). `learn_termination` adds the termination heads (module docstring); their
        parameters are created last, so an ensemble without them is initialised exactly as before they existed."""
        super().__init__()
        if not 0 < num_elites <= num_models:
            raise ValueError(f"num_elites must be in 1..num_models ({num_models}), got {num_elites}")
        modelled = list(range(state_dim) if modelled_idx is None else modelled_idx)
        for name, idx in (("net_obs_idx", list(net_obs_idx)), ("modelled_idx", modelled)):
            if not idx or not all(0 <= i < state_dim for i in idx):
                raise ValueError(f"{name} must index into the {state_dim} state dims, got {tuple(idx)}")
        self.state_dim, self.act_dim, self.num_models, self.learn_reward = state_dim, act_dim, num_models, learn_reward
        self.register_buffer("net_obs_idx", torch.as_tensor(list(net_obs_idx), dtype=torch.long))
        self.num_modelled = len(modelled)
        in_dim, out_dim = len(net_obs_idx) + act_dim, self.num_modelled + int(learn_reward)
        # Derived from the env, not learned: kept out of the state dict. `_embed` maps the modelled dims into the
        # full state (a matmul, which exports to ONNX as is); None when every dim is modelled.
        self.register_buffer("modelled_idx", torch.as_tensor(modelled, dtype=torch.long), persistent=False)
        self._embed: Tensor | None
        if self.num_modelled == state_dim:
            self._embed = None
        else:
            self.register_buffer("_embed", torch.eye(state_dim)[modelled], persistent=False)
            self.register_buffer("_carried", 1.0 - self._embed.sum(0), persistent=False)  # 1 where carried over
        dims = [in_dim] + [hidden] * layers + [2 * out_dim]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(num_models, i, o)) for i, o in zip(dims, dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_models, 1, o)) for o in dims[1:])
        for w in self.weights:  # PETS/MBPO init: truncated normal, std 1 / (2 sqrt(fan_in))
            std = 1.0 / (2.0 * math.sqrt(w.shape[1]))
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
        # per member, so a member's best snapshot during early stopping is self-contained
        self.max_logvar = nn.Parameter(torch.full((num_models, 1, out_dim), float(max_logvar)))
        self.min_logvar = nn.Parameter(torch.full((num_models, 1, out_dim), float(min_logvar)))
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.register_buffer("out_mean", torch.zeros(out_dim))
        self.register_buffer("out_std", torch.ones(out_dim))
        self.register_buffer("elites", torch.arange(num_elites))
        self.learn_termination = learn_termination
        if learn_termination:
            tdims = [len(net_obs_idx)] + [_TERM_HIDDEN] * _TERM_LAYERS + [1]
            self.term_weights = nn.ParameterList(nn.Parameter(torch.empty(num_models, i, o))
                                                 for i, o in zip(tdims, tdims[1:]))
            self.term_biases = nn.ParameterList(nn.Parameter(torch.zeros(num_models, 1, o)) for o in tdims[1:])
            for w in self.term_weights:
                std = 1.0 / (2.0 * math.sqrt(w.shape[1]))
                nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
            nn.init.constant_(self.term_biases[-1], _TERM_PRIOR_LOGIT)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """nn.Module's, with one clear message for the one mismatch a user can cause: a run of an env of their own
        trained before termination heads existed (or with `env.terminates: false`) loaded as one that has them."""
        if self.learn_termination and strict and not any(k.startswith("term_") for k in state_dict):
            raise RuntimeError("this ensemble state has no termination head: the run was trained without one (before "
                               "learned terminations existed, or with env.terminates: false); set env.terminates: "
                               "false in the run's config.yaml to load it as it was trained")
        return super().load_state_dict(state_dict, strict, assign)

    def _member_params(self) -> list[nn.Parameter]:
        return [*self.weights, *self.biases, self.max_logvar, self.min_logvar]

    def _term_params(self) -> list[nn.Parameter]:
        return [*self.term_weights, *self.term_biases] if self.learn_termination else []

    def _term_logits(self, state: Tensor, members: Tensor | None = None) -> Tensor:
        """Termination logits of members `members` (all if None) on states [len(members), B, S]: [K, B]."""
        n = self.net_obs_idx.numel()  # the heads share the dynamics' input normaliser (its state part)
        x = (state.index_select(-1, self.net_obs_idx) - self.in_mean[:n]) / self.in_std[:n]
        for i, (w, b) in enumerate(zip(self.term_weights, self.term_biases)):
            x = torch.baddbmm(b if members is None else b.index_select(0, members), x,
                              w if members is None else w.index_select(0, members))
            if i < len(self.term_weights) - 1:
                x = F.silu(x)
        return x.squeeze(-1)

    def terminated(self, next_state: Tensor) -> Tensor:
        """Hard termination mask [...] of states [..., S]: the elites' mean p(terminal) > 0.5.

        Every elite judges every row (one batched pass of the small heads), whatever member predicted it, so
        the mask is the same for [B, S] batches, [K, B, S] member trajectories and the plan graph's particles.
        The input is detached: a comparison has no gradient, and the heads need no graph in the actor loss.
        """
        if not self.learn_termination:
            raise RuntimeError("this ensemble has no termination head (learn_termination=False)")
        elites = self.elites.numel()
        rows = next_state.detach().reshape(1, -1, self.state_dim).expand(elites, -1, -1)
        prob = torch.sigmoid(self._term_logits(rows, self.elites)).mean(0)
        return (prob > 0.5).reshape(next_state.shape[:-1])

    def _forward(self, state: Tensor, action: Tensor, members: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Members `members` (all if None) on inputs [len(members), B, ·]; normalised mean and log-variance."""
        def pick(p: Tensor) -> Tensor:
            return p if members is None else p.index_select(0, members)

        x = (torch.cat([state.index_select(-1, self.net_obs_idx), action], -1) - self.in_mean) / self.in_std
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(pick(b), x, pick(w))
            if i < len(self.weights) - 1:
                x = F.silu(x)  # swish
        mean, logvar = x.chunk(2, dim=-1)
        max_logvar, min_logvar = pick(self.max_logvar), pick(self.min_logvar)
        logvar = max_logvar - F.softplus(max_logvar - logvar)  # soft bounds (PETS), differentiable everywhere
        logvar = min_logvar + F.softplus(logvar - min_logvar)
        return mean, logvar

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """All members: state [M, B, S], action [M, B, A] -> (mean, logvar) [M, B, out] in normalised units."""
        return self._forward(state, action)

    def predict_all(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Every member's prediction in env units: next-state mean/logvar [M, B, S], reward mean/logvar [M, B]."""
        m = self.num_models
        return self.predict_members(state.unsqueeze(0).expand(m, -1, -1), action.unsqueeze(0).expand(m, -1, -1))

    def predict_members(self, state: Tensor, action: Tensor, members: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Members `members` (all if None), each on its own rows [K, B, ·], in env units: next-state
        mean/logvar [K, B, S], reward mean/logvar [K, B] (None unless learned). The export's fused plan
        graph runs particle i through elite i % E with this, one batched pass over the elites."""
        mean, logvar = self._forward(state, action, members)
        mean = mean * self.out_std + self.out_mean
        logvar = logvar + 2.0 * self.out_std.log()
        k = self.num_modelled
        next_mean, next_logvar = state + self._full(mean[..., :k]), self._full(logvar[..., :k], _UNMODELLED_LOGVAR)
        if not self.learn_reward:
            return next_mean, next_logvar, None, None
        return next_mean, next_logvar, mean[..., k], logvar[..., k]

    def mean_step(self, state: Tensor, action: Tensor, members: Tensor) -> tuple[Tensor, Tensor | None]:
        """`predict_members`' mean next state and reward (None unless learned): a deterministic model step,
        what the plan graph and the diagnostics roll open-loop action sequences through."""
        next_mean, _, reward_mean, _ = self.predict_members(state, action, members)
        return next_mean, reward_mean

    def _full(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """Modelled dims [..., K] -> full state dims [..., S], `fill` in the dims that are carried over."""
        if self._embed is None:
            return x
        full = x @ self._embed
        return full if fill == 0.0 else full + fill * self._carried

    def step(self, state: Tensor, action: Tensor, *, sample: bool = True,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """One imagined transition per row, each through a uniformly random elite member.

        A random permutation of the batch is cut into one chunk per elite (the last chunk padded by
        wrapping around), and the chunk-to-elite assignment is itself shuffled, so every row's member is
        uniform over the elites while the compute stays one batched pass over E members. Samples use
        std = exp(logvar / 2) (the authors' code used exp(logvar), a bug) and are reparameterised, so
        gradients flow to state and action.
        `generator` (if given) must live on the device its random numbers should be drawn on.
        """
        batch, num_elites = state.shape[0], self.elites.numel()
        per_member = -(-batch // num_elites)
        rng_device = generator.device if generator is not None else state.device
        perm = torch.randperm(batch, generator=generator, device=rng_device).to(state.device)
        members = self.elites[torch.randperm(num_elites, generator=generator, device=rng_device).to(state.device)]
        slots = perm[torch.arange(num_elites * per_member, device=state.device) % batch]
        mean, logvar = self._forward(state[slots].view(num_elites, per_member, self.state_dim),
                                     action[slots].view(num_elites, per_member, self.act_dim), members)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=rng_device, dtype=mean.dtype)
            mean = mean + (0.5 * logvar).exp() * noise.to(mean.device)
        out = mean.reshape(num_elites * per_member, mean.shape[-1])[:batch][torch.argsort(perm)]
        out = out * self.out_std + self.out_mean
        next_state = state + self._full(out[:, : self.num_modelled])
        return next_state, (out[:, self.num_modelled] if self.learn_reward else None)

    def loss(self, state: Tensor, action: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(training loss, Gaussian NLL) on per-member minibatches [M, B, ·] with normalised targets.

        The NLL (constant dropped) is averaged over rows and output dims per member and summed over
        members, so each member's gradient does not depend on M; the PETS regulariser keeps the
        learnable log-variance bounds tight.
        """
        mean, logvar = self(state, action)
        nll = ((mean - target).square() * (-logvar).exp() + logvar).mean((1, 2)).sum()
        return nll + _LOGVAR_BOUND_REG * (self.max_logvar.sum() - self.min_logvar.sum()), nll

    @torch.no_grad()
    def _holdout_mse(self, state: Tensor, action: Tensor, target: Tensor) -> Tensor:
        """Per-member MSE of the mean on normalised targets, averaged over rows and output dims: [M]."""
        m, total = self.num_models, torch.zeros(self.num_models, device=state.device)
        for i in range(0, state.shape[0], _HOLDOUT_CHUNK):
            s, a, y = (t[i:i + _HOLDOUT_CHUNK] for t in (state, action, target))
            mean, _ = self(s.expand(m, -1, -1), a.expand(m, -1, -1))
            total += (mean - y).square().mean(-1).sum(-1)
        return total / state.shape[0]

    def fit(self, state: Tensor | np.ndarray, action: Tensor | np.ndarray, next_state: Tensor | np.ndarray,
            reward: Tensor | np.ndarray | None, cfg: ModelConfig,
            generator: torch.Generator | None, terminated: Tensor | np.ndarray | None = None) -> dict[str, float]:
        """Train all members on bootstrap resamples until the holdout error stops improving.

        Holdout split (cfg.holdout_ratio), normaliser refit on the training split, one bootstrap resample
        per member, Gaussian NLL + log-variance bound regulariser, Adam with L2 weight decay on weights.
        A member's weights are snapshotted whenever its holdout MSE improves by >1 % (relative); training
        stops after cfg.patience epochs in which no member improved (or at cfg.max_epochs), every member
        returns to its best snapshot, and the num_elites members with the lowest holdout MSE become elites.
        Adam is fresh per call so that everything fit depends on lives in state_dict (exact resume).
        `generator` is a CPU generator; all index sampling draws from it.

        With termination heads, `terminated` [N] (D_env's flags) trains them in the same minibatches (BCE of
        each member's head on next_state); a member's head keeps its own best snapshot by holdout BCE, since
        the dynamics' early stopping says nothing about it, and warm starts carry it across fits.
        """
        if self.learn_reward and reward is None:
            raise ValueError("this ensemble learns reward: fit needs rewards")
        if self.learn_termination and terminated is None:
            raise ValueError("this ensemble learns termination: fit needs the terminated flags")
        s, s2, a = (torch.as_tensor(x) for x in (state, next_state, action))
        r = torch.as_tensor(reward).reshape(-1, 1) if self.learn_reward else s[:, :0]
        if s.shape != s2.shape or s.shape[1:] != (self.state_dim,) or a.shape != (len(s), self.act_dim) \
                or len(r) != len(s):
            raise ValueError(f"fit expects state/next_state [N, {self.state_dim}], action [N, {self.act_dim}] and "
                             f"reward [N]; got {tuple(s.shape)}, {tuple(s2.shape)}, {tuple(a.shape)}, {len(r)} rows")
        like = dict(dtype=self.in_mean.dtype, device=self.in_mean.device)
        # Δ before the cast: float64 positions keep their precision
        y = torch.cat([(s2 - s).index_select(-1, self.modelled_idx.to(s.device)).to(**like), r.to(**like)], -1)
        s, a = s.to(**like), a.to(**like)
        if self.learn_termination:
            s2, done = s2.to(**like), torch.as_tensor(terminated).reshape(-1).to(**like)
            if len(done) != len(s):
                raise ValueError(f"fit expects terminated [N]: got {len(done)} flags for {len(s)} rows")

        train_idx, hold_idx = holdout_split(s.shape[0], cfg.holdout_ratio, generator)
        train_rows = train_idx.to(s.device)
        _set_moments(self.in_mean, self.in_std, torch.cat([s.index_select(-1, self.net_obs_idx), a], -1)[train_rows])
        _set_moments(self.out_mean, self.out_std, y[train_rows])
        y = (y - self.out_mean) / self.out_std
        hold = tuple(t[hold_idx.to(s.device)] for t in (s, a, y))
        if self.learn_termination:
            term_hold = tuple(t[hold_idx.to(s.device)] for t in (s2, done))
            term_best = self._holdout_bce(*term_hold)
            term_snapshot = [p.detach().clone() for p in self._term_params()]

        m, n_train = self.num_models, train_idx.numel()
        boot = train_idx[torch.randint(n_train, (m, n_train), generator=generator)]  # [M, N] rows, with replacement
        # Adam's (coupled) weight_decay is the gradient of wd/2 * |W|^2: the authors' wd * tf.nn.l2_loss(W)
        groups = [{"params": list(self.weights), "weight_decay": cfg.weight_decay},
                  {"params": [*self.biases, self.max_logvar, self.min_logvar], "weight_decay": 0.0}]
        if self.learn_termination:
            groups += [{"params": list(self.term_weights), "weight_decay": cfg.weight_decay},
                       {"params": list(self.term_biases), "weight_decay": 0.0}]
        opt = torch.optim.Adam(groups, lr=cfg.lr)
        best = self._holdout_mse(*hold)
        snapshot = [p.detach().clone() for p in self._member_params()]
        epochs = since_improved = 0
        while cfg.max_epochs is None or epochs < cfg.max_epochs:
            order = boot.gather(1, torch.rand(m, n_train, generator=generator).argsort(1)).to(s.device)
            nll_sum = torch.zeros((), device=s.device)  # accumulated on device: no sync per minibatch
            for i in range(0, n_train, cfg.batch_size):
                rows = order[:, i:i + cfg.batch_size]
                loss, nll = self.loss(s[rows], a[rows], y[rows])
                if self.learn_termination:  # mean over rows, summed over members, like the NLL
                    loss = loss + F.binary_cross_entropy_with_logits(
                        self._term_logits(s2[rows]), done[rows], reduction="none").mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                nll_sum += nll.detach() * rows.shape[1]
            epochs += 1
            if self.learn_termination:
                bce = self._holdout_bce(*term_hold)
                better = bce < term_best
                for p, snap in zip(self._term_params(), term_snapshot):
                    snap.copy_(torch.where(better.view(-1, 1, 1), p.detach(), snap))
                term_best = torch.where(better, bce, term_best)
            mse = self._holdout_mse(*hold)
            improved = (best - mse) / best > 0.01
            if improved.any():
                for p, snap in zip(self._member_params(), snapshot):
                    snap.copy_(torch.where(improved.view(-1, 1, 1), p.detach(), snap))
                best = torch.where(improved, mse, best)
                since_improved = 0
            else:
                since_improved += 1
                if since_improved >= cfg.patience:
                    break
        with torch.no_grad():
            for p, snap in zip(self._member_params() + self._term_params(),
                               snapshot + (term_snapshot if self.learn_termination else [])):
                p.copy_(snap)
        self.elites.copy_(best.argsort()[: self.elites.numel()])
        term = self._termination_stats(*term_hold, term_best) if self.learn_termination else {}
        return {"epochs": float(epochs), "train_nll": nll_sum.item() / (n_train * m),
                "holdout_mse": best.mean().item(), "elite_holdout_mse": best[self.elites].mean().item(),
                "last_epoch_holdout_mse": mse.mean().item(),
                "num_train": float(n_train), "num_holdout": float(hold_idx.numel()), **term}

    @torch.no_grad()
    def _holdout_bce(self, next_state: Tensor, done: Tensor) -> Tensor:
        """Per-member termination BCE on holdout rows: [M]."""
        m, total = self.num_models, torch.zeros(self.num_models, device=next_state.device)
        for i in range(0, next_state.shape[0], _HOLDOUT_CHUNK):
            s2, d = next_state[i:i + _HOLDOUT_CHUNK], done[i:i + _HOLDOUT_CHUNK]
            logits = self._term_logits(s2.expand(m, -1, -1))
            total += F.binary_cross_entropy_with_logits(logits, d.expand(m, -1), reduction="none").sum(-1)
        return total / next_state.shape[0]

    @torch.no_grad()
    def _termination_stats(self, next_state: Tensor, done: Tensor, bce: Tensor) -> dict[str, float]:
        """How the elites' hard mask does on holdout: the terminal transitions it catches (recall, when there are
        any) and the others it ends (false alarms): imagined rollouts live with exactly this mask."""
        predicted, terminal = self.terminated(next_state), done > 0.5
        stats = {"termination_holdout_bce": bce[self.elites].mean().item(),
                 "termination_holdout_terminal": float(terminal.sum()),
                 "termination_holdout_false_alarm": predicted[~terminal].float().mean().item() if (~terminal).any()
                 else 0.0}
        if terminal.any():
            stats["termination_holdout_recall"] = predicted[terminal].float().mean().item()
        return stats
