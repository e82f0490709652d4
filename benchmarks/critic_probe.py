"""Where a critic's bias comes from: policy evaluation from a checkpoint with the policy frozen.

    python benchmarks/critic_probe.py --run benchmarks/runs/inverted_pendulum/maac-s9 --updates 4000 --every 1000

From a run's latest checkpoint (D_env, D_model, ensemble, critic and its optimiser restored), the critic alone
takes `--updates` G2 critic steps under each of `PROBE_VARIANTS` (target: STEVE or one-step; data: real +
imagined or real only; Polyak rate; twin min or mean), each time from the checkpoint's critic. Its bias
(min-twin Q − realised soft return on `--episodes` stochastic episodes of the frozen policy) is measured every
`--every` steps. A bias that shrinks under every variant means the critic lagged the moving policy; one that
stays under one target or data source names that source; one that shrinks much faster with a larger τ is the
target network's lag. The run directory is only read. One entry per run, merged into
benchmarks/results/critic_probe.json with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_results import merge_runs, provenance, run_name  # noqa: E402
from results_csv import RESULTS  # noqa: E402

PROBE_FIT_ROWS = 5000  # rows per data slice in the fit check
PROBE_VARIANTS: dict[str, tuple[bool, bool, float, float | None]] = {
    # name -> (STEVE-expanded targets, D_model rows in the batch, factor on τ, agent.critic_pessimism or None: the run's)
    "as trained (STEVE, real + imagined)": (True, True, 1.0, None),
    "one-step targets, real + imagined": (False, True, 1.0, None),
    "STEVE, real data only": (True, False, 1.0, None),
    "one-step targets, real data only": (False, False, 1.0, None),
    # Policy evaluation contracts the error by ~γ per target-network turnover (~1/τ updates): 10× τ tests
    # whether the bias is the critic's propagation speed rather than its data or targets.
    "as trained, 10× τ": (True, True, 10.0, None),
    # The twin min underestimates a little per backup, and that compounds over ~1/(1−γ) steps.
    "as trained, twin mean": (True, True, 1.0, 0.0),
    "one-step targets, real data only, twin mean": (False, False, 1.0, 0.0),
}


def last_rows(buffer, n: int) -> np.ndarray:  # buffer: maac_robot.learn.buffer.ReplayBuffer
    """Indices of the `n` rows most recently written to a ring buffer (`ptr` is the next row to write)."""
    n = min(n, len(buffer))
    return (buffer.ptr - n + np.arange(n)) % buffer.capacity


def critic_probe(run_dir: Path, updates: int, every: int, episodes: int) -> dict[str, Any]:
    """Bias curves per probe variant and the checkpoint critic's fit to its own targets (see the module)."""
    import torch
    from maac_robot.envs import make_env
    from maac_robot.learn.buffer import Batch
    from maac_robot.learn.config import load_config
    from maac_robot.learn.evaluation import critic_bias, measured_soft_returns, rollout_episode
    from maac_robot.learn.trainer import Trainer, eval_seeds, load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # the Trainer writes to its run directory: work on a copy
        work = Path(tmp) / "run"
        (work / "checkpoints").mkdir(parents=True)
        shutil.copy(run_dir / "config.yaml", work / "config.yaml")
        shutil.copy(run_dir / "checkpoints" / "latest.pt", work / "checkpoints" / "latest.pt")
        cfg = load_config(work / "config.yaml")
        trainer = Trainer(cfg, work)
        trainer.load_checkpoint()
        trainer.env.close()
        agent, model, gamma = trainer.agent, trainer.model, cfg.agent.gamma
        saved = load_checkpoint(work / "checkpoints" / "latest.pt", cfg.env.id)["agent"]
    env = make_env(cfg.env.id, max_episode_steps=cfg.env.max_episode_steps)
    try:
        eps = [rollout_episode(agent, env, seed, deterministic=False) for seed in eval_seeds(cfg.train.seed, episodes)]
    finally:
        env.close()

    def bias() -> float:
        diffs = np.concatenate([q - g for q, g in (critic_bias(agent, ep, gamma) for ep in eps)])
        return round(float(diffs.mean()), 2)

    # Before any probe update: does the critic fit its own targets on the data it trains on? A critic that
    # does, yet misjudges the frozen policy's episodes, was taught by data unlike them (older or other behaviour).
    rng = np.random.default_rng(cfg.train.seed)
    slices = {"D_env, last 1000 steps": (trainer.d_env, last_rows(trainer.d_env, 1000)),
              "D_env, all": (trainer.d_env, rng.permutation(len(trainer.d_env))[:PROBE_FIT_ROWS]),
              "D_model, all": (trainer.d_model, rng.permutation(len(trainer.d_model))[:PROBE_FIT_ROWS])}
    fit = {}
    torch.manual_seed(cfg.train.seed)
    for name, (buffer, idx) in slices.items():
        if len(idx) == 0:
            continue
        batch = buffer.batch(idx)
        with torch.no_grad():
            q = torch.min(*agent.critic(batch.state, batch.action))
            target = agent.critic_targets(batch, model)
        fit[name] = {"rows": len(idx), "reward": round(float(batch.reward.mean()), 3),
                     "terminal": round(float(batch.terminated.float().mean()), 4),
                     "q": round(float(q.mean()), 2), "target": round(float(target.mean()), 2)}

    curves, agent_cfg = {}, agent.cfg
    try:
        for name, (steve, imagined, tau_factor, pessimism) in PROBE_VARIANTS.items():
            agent.load_state_dict(saved)
            # A variant is a config of the agent: its own switches choose the target, τ and the twin rule.
            agent.cfg = agent_cfg.model_copy(update={
                "steve": steve, "tau": agent_cfg.tau * tau_factor,
                "critic_pessimism": agent_cfg.critic_pessimism if pessimism is None else pessimism})
            torch.manual_seed(cfg.train.seed)
            rng = np.random.default_rng(cfg.train.seed)
            n_real, n_model = agent.batch_split(model_data=imagined)
            curve = [(0, bias())]
            for step in range(1, updates + 1):
                parts = [trainer.d_env.sample(n_real, rng)] + ([trainer.d_model.sample(n_model, rng)] if n_model else [])
                agent.update_critic(Batch.cat(parts), model)
                if step % every == 0:
                    curve.append((step, bias()))
            curves[name] = curve
    finally:
        agent.cfg = agent_cfg
    return {"run": run_name(run_dir), "env_step": trainer.env_step, "alpha": round(agent.alpha, 4),
            "steps_measured": sum(len(measured_soft_returns(ep, agent.alpha, gamma)) for ep in eps),
            "episodes": episodes,
            "stochastic_return": round(float(np.mean([ep["rewards"].sum() for ep in eps])), 1),
            "episode_steps": sum(len(ep["rewards"]) for ep in eps),
            "episode_reward": round(float(np.mean(np.concatenate([ep["rewards"] for ep in eps]))), 3),
            "fit_at_checkpoint": fit, "bias_by_updates": curves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a MAAC run directory with a checkpoint")
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "critic_probe.json")
    args = parser.parse_args(argv)
    result = {**critic_probe(args.run, args.updates, args.every, args.episodes), **provenance()}
    merge_runs(args.out, [result])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
