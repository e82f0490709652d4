"""Paper §5.2: the error of the MAAC policy gradient against the true gradient, as a function of the horizon H.

    python benchmarks/gradient_error.py [--seeds 0 1 2 3 4] [--horizons 0 2 4 6 10 15 20 30] [--data 20 50 200]

On a double integrator (s = [pos, vel], s' = A s + B a, reward −(sᵀQs + aᵀRa)) with a linear-Gaussian policy
a = K s + σ ε, the expected discounted return J(K, log σ) from N(0, I) start states has a closed form, and so
has its gradient (autograd through the propagated state covariance, float64). The MAAC estimate is the
library's `maac_policy_loss` gradient, through H steps of
  * the true dynamics, or
  * a `GaussianEnsemble` fitted (the trainer's fit) on `--data` random transitions,
then γ^H · Q̂(s_H, a_H), with Q̂ a quadratic Q-function fitted by least squares to `--q-samples` noisy Monte-Carlo
returns of the policy (so Q̂ has the estimation error of a learned critic). The error is the L1 norm of the
difference of the two gradients, relative to the L1 norm of the true one, at 4096 × 8 sampled trajectories.

Where the error with the true dynamics comes from: the true gradient sums ∇_a Q · ∂a/∂θ over every step of the
discounted future (the deterministic policy-gradient theorem), while the objective, holding Q̂ fixed at s_H,
sums it over steps 0..H only; the tail it misses, and Q̂'s own error, are weighted by γ^H. A learned model
adds an error that compounds with every imagined step.

The paper's claim: with the true dynamics the error falls as H grows (only Q̂'s error remains, weighted by γ^H);
with a learned model it falls and then rises (the model's error compounds), so an intermediate H is best.
Writes benchmarks/results/gradient_error.csv (every seed, with command and commit) and
benchmarks/gradient_error.png, and prints whether each shape holds (`report.py` renders the same from the CSV).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import FIGURES, gradient_error_curves, gradient_error_verdicts, plot_gradient_error  # noqa: E402
from results_csv import RESULTS, command_line, git_commit, read_rows, write_rows  # noqa: E402

from maac_robot.learn.agent import maac_policy_loss  # noqa: E402
from maac_robot.learn.config import ModelConfig  # noqa: E402
from maac_robot.learn.ensemble import GaussianEnsemble  # noqa: E402

DT, GAMMA = 0.1, 0.95
A_MAT = torch.tensor([[1.0, DT], [0.0, 1.0]], dtype=torch.float64)
B_MAT = torch.tensor([[0.5 * DT**2], [DT]], dtype=torch.float64)
Q_COST = torch.tensor([[1.0, 0.0], [0.0, 0.1]], dtype=torch.float64)
R_COST = torch.tensor([[0.05]], dtype=torch.float64)
THETA = (-0.8, -1.2, math.log(0.3))  # gain K = [k_pos, k_vel], log σ: a stabilising, not optimal, policy
TRUE_HORIZON = 1000  # γ^1000 < 1e-22: the closed form's truncation is far below float64 resolution
COLUMNS = ("dynamics", "data", "seed", "horizon", "rel_l1_error", "q_rel_error", "model_rel_error", "command", "commit")


def reward_fn(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    return -(((s @ Q_COST.to(s.dtype)) * s).sum(-1) + ((a @ R_COST.to(a.dtype)) * a).sum(-1))


def true_dynamics(s: Tensor, a: Tensor) -> tuple[Tensor, None]:
    return s @ A_MAT.T.to(s.dtype) + a @ B_MAT.T.to(s.dtype), None


def linear_gaussian(theta: Tensor):
    """a = K s + σ ε (reparameterised), with log π(a|s); `policy(s, repeat)` as `maac_policy_loss` wants it."""
    gain, log_std = theta[:2].view(1, 2), theta[2:]

    def policy(s: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
        mean = (s @ gain.T).repeat_interleave(repeat, dim=0)
        a = mean + log_std.exp() * torch.randn_like(mean)
        return a, torch.distributions.Normal(mean, log_std.exp()).log_prob(a).sum(-1)

    return policy


def true_objective(theta: Tensor) -> Tensor:
    """J = −Σ_t γ^t E[sᵀQs + aᵀRa] from s_0 ~ N(0, I): the state stays zero-mean, its covariance propagates
    through the closed loop A + BK with the policy noise B σ² Bᵀ added each step."""
    gain, var = theta[:2].view(1, 2), (2 * theta[2:]).exp()
    closed, noise = A_MAT + B_MAT @ gain, B_MAT @ torch.diag(var) @ B_MAT.T
    cov, total = torch.eye(2, dtype=theta.dtype), theta.new_zeros(())
    for t in range(TRUE_HORIZON):
        step_cost = torch.trace((Q_COST + gain.T @ R_COST @ gain) @ cov) + torch.trace(R_COST @ torch.diag(var))
        total = total - GAMMA**t * step_cost
        cov = closed @ cov @ closed.T + noise
    return total


def _features(s: Tensor, a: Tensor) -> Tensor:
    """Quadratic monomials of z = [s, a] and a constant: the exact function class of this problem's Q^π."""
    z = torch.cat([s, a], -1)
    i, j = torch.triu_indices(z.shape[-1], z.shape[-1])
    return torch.cat([z[:, i] * z[:, j], torch.ones_like(z[:, :1])], -1)


def fit_q(theta: Tensor, samples: int, rollout: int, generator: torch.Generator):
    """Q̂ by least squares on `samples` Monte-Carlo returns (one noisy rollout each) from random (s, a)."""
    s = 1.5 * torch.randn(samples, 2, generator=generator, dtype=torch.float64)
    a = 1.5 * torch.randn(samples, 1, generator=generator, dtype=torch.float64)
    gain, std = theta[:2].view(1, 2), theta[2:].exp()
    ret, state, action = torch.zeros(samples, dtype=torch.float64), s, a
    for t in range(rollout):
        nxt, _ = true_dynamics(state, action)
        ret += GAMMA**t * reward_fn(state, action, nxt)
        state = nxt
        action = state @ gain.T + std * torch.randn(samples, 1, generator=generator, dtype=torch.float64)
    coef = torch.linalg.lstsq(_features(s, a), ret.unsqueeze(-1)).solution.squeeze(-1)

    def q_hat(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        q = _features(s.to(torch.float64), a.to(torch.float64)) @ coef
        return q.to(s.dtype), q.to(s.dtype)

    return q_hat, coef


def true_q_coef(theta: Tensor, samples: int = 4096) -> Tensor:
    """Q^π's coefficients in the same features, fitted to exact expected returns (for Q̂'s error only)."""
    g = torch.Generator().manual_seed(12345)
    s = 1.5 * torch.randn(samples, 2, generator=g, dtype=torch.float64)
    a = 1.5 * torch.randn(samples, 1, generator=g, dtype=torch.float64)
    gain, var = theta[:2].view(1, 2), (2 * theta[2:]).exp()
    closed, noise = A_MAT + B_MAT @ gain, B_MAT @ torch.diag(var) @ B_MAT.T
    mean, cov = true_dynamics(s, a)[0], torch.zeros(2, 2, dtype=torch.float64)
    value = reward_fn(s, a, mean)
    for t in range(1, 400):
        step = ((mean @ (Q_COST + gain.T @ R_COST @ gain)) * mean).sum(-1)
        step = step + torch.trace((Q_COST + gain.T @ R_COST @ gain) @ cov) + torch.trace(R_COST @ torch.diag(var))
        value = value - GAMMA**t * step
        mean, cov = mean @ closed.T, closed @ cov @ closed.T + noise
    return torch.linalg.lstsq(_features(s, a), value.unsqueeze(-1)).solution.squeeze(-1)


def fit_model(data: int, generator: torch.Generator) -> tuple[GaussianEnsemble, float]:
    """The trainer's ensemble fit on `data` random transitions; returns it and its relative one-step error."""
    cfg = ModelConfig(num_models=5, num_elites=3, hidden=64, layers=3, max_epochs=200, batch_size=64)
    model = GaussianEnsemble(2, 1, num_models=cfg.num_models, num_elites=cfg.num_elites, hidden=cfg.hidden,
                             layers=cfg.layers, learn_reward=False, net_obs_idx=(0, 1), min_logvar=cfg.min_logvar,
                             max_logvar=cfg.max_logvar)
    s = 1.5 * torch.randn(data, 2, generator=generator)
    a = 1.5 * torch.randn(data, 1, generator=generator)
    model.fit(s, a, true_dynamics(s, a)[0], None, cfg, generator)
    model.eval()
    test_s, test_a = torch.randn(2048, 2, generator=generator), torch.randn(2048, 1, generator=generator)
    with torch.no_grad():
        delta_true = true_dynamics(test_s, test_a)[0] - test_s
        delta_model = model.step(test_s, test_a, sample=False)[0] - test_s
    return model, float((delta_model - delta_true).norm() / delta_true.norm())


def maac_gradient(theta: Tensor, dynamics, q_hat, horizon: int, starts: int, samples: int) -> Tensor:
    """∇θ of the MAAC objective (α = 0: with a fixed σ the entropy term does not depend on the gain)."""
    theta = theta.clone().to(torch.float32).requires_grad_(True)
    start = torch.randn(starts, 2)
    loss = maac_policy_loss(start, linear_gaussian(theta), dynamics, q_hat, reward_fn, None, horizon=horizon,
                            num_samples=samples, terminal_q_samples=1, gamma=GAMMA, alpha=0.0).loss
    (grad,) = torch.autograd.grad(-loss, theta)
    return grad.to(torch.float64)


def run(seeds: list[int], horizons: list[int], data_sizes: list[int], q_samples: int) -> list[dict]:
    theta = torch.tensor(THETA, dtype=torch.float64)
    theta_req = theta.clone().requires_grad_(True)
    (truth,) = torch.autograd.grad(true_objective(theta_req), theta_req)
    exact_q = true_q_coef(theta)
    rows, command, commit = [], command_line(), git_commit()
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        q_hat, coef = fit_q(theta, q_samples, rollout=200, generator=generator)
        q_error = float((coef - exact_q).abs().sum() / exact_q.abs().sum())
        models = [("true", 0, lambda s, a: true_dynamics(s, a), 0.0)]
        for data in data_sizes:
            model, model_error = fit_model(data, generator)
            models.append(("learned", data, model.step, model_error))
        for name, data, dynamics, model_error in models:
            for horizon in horizons:
                torch.manual_seed(1000 * seed + horizon)
                grad = maac_gradient(theta, dynamics, q_hat, horizon, starts=4096, samples=8)
                rows.append({"dynamics": name, "data": data, "seed": seed, "horizon": horizon,
                             "rel_l1_error": round(float((grad - truth).abs().sum() / truth.abs().sum()), 5),
                             "q_rel_error": round(q_error, 5), "model_rel_error": round(model_error, 5),
                             "command": command, "commit": commit})
            print(f"seed {seed} {name}{f' ({data} transitions)' if data else ''}: "
                  + " ".join(f"H{r['horizon']} {r['rel_l1_error']:.3f}" for r in rows[-len(horizons):]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--horizons", type=int, nargs="+", default=[0, 2, 4, 6, 10, 15, 20, 30])
    parser.add_argument("--data", type=int, nargs="+", default=[20, 50, 200],
                        help="transitions the learned ensembles are fitted on")
    parser.add_argument("--q-samples", type=int, default=1000, help="Monte-Carlo returns Q̂ is fitted to")
    parser.add_argument("--out", type=Path, default=RESULTS / "gradient_error.csv")
    parser.add_argument("--figure", type=Path, default=FIGURES / "gradient_error.png")
    args = parser.parse_args(argv)
    if min(args.horizons) < 0 or min(args.data) <= 0 or args.q_samples < 10:
        parser.error("horizons must be >= 0, data sizes > 0 and --q-samples >= 10")
    torch.set_num_threads(1)
    rows = run(args.seeds, sorted(set(args.horizons)), args.data, args.q_samples)
    write_rows(args.out, rows, COLUMNS)
    mean = gradient_error_curves(read_rows(args.out))
    plot_gradient_error(mean, args.figure)
    print("\n".join(gradient_error_verdicts(mean)))
    print(f"wrote {args.out} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
