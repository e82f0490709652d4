"""Cost of the ensemble's two hot paths at the authors' sizes (not a test; numbers go to RESULTS.md).

1. one G1 gradient step: M members of `layers`x`hidden`, `batch` rows per member (forward, NLL, backward, Adam);
2. the MAAC actor's use of the model: `horizon` chained `step()` calls on batch x samples rows,
   reparameterised, then backward to the actions (model weights frozen, as in the actor update).

    python benchmarks/ensemble_speed.py [--env HalfCheetah-v5] [--threads 1 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maac_robot.learn.ensemble import GaussianEnsemble
from maac_robot.envs import env_info


def timed(fn, reps: int, warmup: int = 3) -> str:
    """Median wall and process-CPU milliseconds of `fn()`. On a shared box the wall time includes waiting
    for other jobs; with one thread the CPU time is the better estimate of the uncontended cost."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(1e3 * (time.perf_counter() - t))
        cpu.append(1e3 * (time.process_time() - c))
    wall_ms, cpu_ms = statistics.median(wall), statistics.median(cpu)
    return f"wall median {wall_ms:.1f} ms (min {min(wall):.1f}), cpu median {cpu_ms:.1f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-models", type=int, default=8)
    p.add_argument("--num-elites", type=int, default=6)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    info, device = env_info(args.env), torch.device(args.device)
    torch.manual_seed(0)
    model = GaussianEnsemble(info.state_dim, info.act_dim, num_models=args.num_models, num_elites=args.num_elites,
                             hidden=args.hidden, layers=args.layers, learn_reward=False,
                             net_obs_idx=info.net_obs_idx, min_logvar=-10.0, max_logvar=0.5).to(device)
    m, s_dim, a_dim = args.num_models, info.state_dim, info.act_dim
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state, action = torch.randn(m, args.batch, s_dim, device=device), torch.randn(m, args.batch, a_dim, device=device)
    target = torch.randn(m, args.batch, s_dim, device=device)
    rows = args.batch * args.samples
    start = torch.randn(rows, s_dim, device=device)
    actions = torch.randn(args.horizon, rows, a_dim, device=device).tanh().requires_grad_()

    def train_step() -> None:
        loss, _ = model.loss(state, action, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def rollout_backward() -> None:
        s = start
        for t in range(args.horizon):
            s, _ = model.step(s, actions[t])
        s[:, 0].sum().backward()
        actions.grad = None

    def sync(fn):
        return (lambda: (fn(), torch.cuda.synchronize())) if device.type == "cuda" else fn

    print(f"{args.env} S={s_dim} A={a_dim}  ensemble {m}x({args.layers}x{args.hidden}), {args.num_elites} elites, "
          f"torch {torch.__version__}, device {device}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        model.requires_grad_(True)
        train = timed(sync(train_step), args.reps)
        model.requires_grad_(False)  # the actor update freezes the model's weights
        roll = timed(sync(rollout_backward), args.reps)
        print(f"threads={threads}: G1 train step, batch {args.batch}/member: {train}\n"
              f"threads={threads}: step() x H={args.horizon} fwd+bwd, {args.batch}x{args.samples} rows: {roll}")


if __name__ == "__main__":
    main()
