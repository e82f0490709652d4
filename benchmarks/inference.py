"""Inference latency of the deployment graphs: onnxruntime vs PyTorch vs plain NumPy (not a test).

Two calls the controller makes: one policy action (state [S] + noise [A] -> mean, log_std, action) and
one fused plan call (state [S], actions [P,H,A] -> returns [P], particle i through elite i % E, H model
steps, closed-form reward, terminal γ^H·min Q at the deterministic policy action) for P in --particles.
Each (backend, threads[, spinning]) configuration runs in its own fresh process, so thread pools of
one configuration (onnxruntime's spinning workers, torch's OpenMP pool) cannot disturb another, and
the configurations take turns over --rounds rounds so a shared machine's changing load hits all alike.
Before timing, every backend's output is checked against onnxruntime's (same computation).

    python benchmarks/inference.py                  # random HalfCheetah-v5-shaped model (built-in config half_cheetah)
    python benchmarks/inference.py --run runs/NAME  # a trained run
    python benchmarks/inference.py --calls 1000 --rounds 1 --particles 64   # quick look

Output: a markdown table on stdout (and --json PATH with every figure). Latency includes the Python
call overhead each backend's caller pays (numpy in, numpy out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BACKENDS = ("onnxruntime", "torch", "numpy")


# ---- the plain-NumPy twin of the graphs (HalfCheetah: closed-form reward, no termination) --------------


class NumpyModel:
    """The policy and plan computations written with numpy matmuls, weights copied from the torch modules."""

    def __init__(self, task: Any, actor: Any, critic: Any, model: Any, gamma: float, plan_horizon: int) -> None:
        import numpy as np
        from maac_robot.learn.agent import LOG_STD_MAX, LOG_STD_MIN

        if task.info.env_id != "HalfCheetah-v5":
            raise SystemExit("the NumPy twin implements HalfCheetah-v5's reward only; "
                             "pass --backends onnxruntime torch")

        def layers(seq: Any) -> list[tuple[Any, Any]]:
            return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                    for m in seq if hasattr(m, "weight")]

        self.np = np
        self.log_std_range = (LOG_STD_MIN, LOG_STD_MAX)
        self.actor_idx = actor.net_obs_idx.numpy()
        self.actor = layers(actor.net)
        self.act_scale, self.act_bias = actor.act_scale.numpy(), actor.act_bias.numpy()
        self.critic_idx = critic.net_obs_idx.numpy()
        self.q1, self.q2 = layers(critic.q1), layers(critic.q2)
        elites = model.elites.numpy()
        self.ens = [(w.detach().numpy()[elites], b.detach().numpy()[elites])
                    for w, b in zip(model.weights, model.biases)]
        self.ens_idx = model.net_obs_idx.numpy()
        self.in_mean, self.in_std = model.in_mean.numpy(), model.in_std.numpy()
        self.out_mean, self.out_std = model.out_mean.numpy(), model.out_std.numpy()
        self.state_dim, self.num_elites = model.state_dim, len(elites)
        self.dt, self.gamma, self.horizon = task.info.dt, gamma, plan_horizon

    def _mlp(self, x: Any, layers: list[tuple[Any, Any]]) -> Any:
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            if i < len(layers) - 1:
                x = self.np.maximum(x, 0.0)
        return x

    def _actor(self, state: Any) -> tuple[Any, Any]:
        out = self._mlp(state[..., self.actor_idx], self.actor)
        mean, raw = self.np.split(out, 2, axis=-1)
        lo, hi = self.log_std_range
        return mean, lo + 0.5 * (hi - lo) * (self.np.tanh(raw) + 1)

    def policy(self, state: Any, noise: Any) -> tuple[Any, Any, Any]:
        mean, log_std = self._actor(state)
        action = self.np.tanh(mean + self.np.exp(log_std) * noise) * self.act_scale + self.act_bias
        return mean, log_std, action

    def plan(self, state: Any, actions: Any) -> Any:
        np, e = self.np, self.num_elites
        p, h, a_dim = actions.shape
        acts = actions.reshape(-1, e, h, a_dim).transpose(1, 0, 2, 3)
        s = np.broadcast_to(state, (e, acts.shape[1], state.shape[0]))
        returns = np.zeros(s.shape[:2], np.float32)
        for t in range(self.horizon):
            a = acts[:, :, t]
            x = (np.concatenate([s[..., self.ens_idx], a], -1) - self.in_mean) / self.in_std
            for i, (w, b) in enumerate(self.ens):
                x = np.matmul(x, w) + b
                if i < len(self.ens) - 1:
                    x = x / (1.0 + np.exp(-x))  # swish
            delta = x[..., : x.shape[-1] // 2] * self.out_std + self.out_mean
            nxt = s + delta[..., : self.state_dim]
            reward = (nxt[..., 0] - s[..., 0]) / self.dt - 0.1 * np.square(a).sum(-1)  # HalfCheetah-v5
            returns = returns + self.gamma**t * reward
            s = nxt
        flat = s.reshape(-1, s.shape[-1])
        mean, _ = self._actor(flat)
        sa = np.concatenate([flat[:, self.critic_idx], np.tanh(mean) * self.act_scale + self.act_bias], -1)
        q = np.minimum(self._mlp(sa, self.q1), self._mlp(sa, self.q2)).reshape(returns.shape)
        returns = returns + self.gamma**self.horizon * q
        return returns.transpose(1, 0).reshape(p)


# ---- measurement ---------------------------------------------------------------------------------------


def _stats(samples: list[list[int]]) -> dict[str, float]:
    """Wall-clock median/p99/mean/max, and the median CPU time of the calling thread, in µs."""
    import numpy as np

    us = np.asarray(samples, dtype=np.float64).reshape(-1, 2) / 1e3
    wall, cpu = us[:, 0], us[:, 1]
    return {"median_us": float(np.median(wall)), "p99_us": float(np.percentile(wall, 99)),
            "mean_us": float(wall.mean()), "max_us": float(wall.max()),
            "thread_cpu_median_us": float(np.median(cpu)), "calls": int(len(wall))}


def _time(fn: Callable[[], Any], calls: int, warmup: int) -> list[list[int]]:
    """Per call [wall-clock ns, calling thread's CPU ns], after `warmup` untimed calls.

    The thread CPU time does not grow while the thread waits for a core, so on a loaded machine it
    still compares the single-threaded backends' work; with 2 threads the other thread's work is missing.
    """
    for _ in range(warmup):
        fn()
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    samples = []
    for _ in range(calls):
        t0, c0 = clock(), cpu_clock()
        fn()
        samples.append([clock() - t0, cpu_clock() - c0])
    return samples


def _padded(plan: Callable[[Any, Any], Any], num_elites: int) -> Callable[[Any, Any], Any]:
    """P padded to a multiple of num_elites exactly as `Artifacts.plan` does, so all backends pay it."""
    import numpy as np

    def padded(state: Any, actions: Any) -> Any:
        p = actions.shape[0]
        pad = -p % num_elites
        if pad:
            actions = np.concatenate([actions, np.zeros((pad, *actions.shape[1:]), np.float32)])
        return plan(state, actions)[:p]

    return padded


def _components(source: dict[str, Any]) -> tuple[Any, Any, Any, Any, float, int]:
    """(task, actor, critic, model, gamma, horizon): a trained run, or a seeded random init (deterministic)."""
    import torch
    from maac_robot.learn.config import load_config
    from maac_robot.learn.trainer import build_components, load_run

    if source["run"]:
        run = load_run(source["run"])
        return run.task, run.agent.actor, run.agent.critic, run.model, run.config.agent.gamma, run.config.agent.horizon
    cfg = load_config(source["config"])
    torch.manual_seed(source["seed"])
    task, agent, model = build_components(cfg, torch.device("cpu"))
    model.eval()
    return task, agent.actor, agent.critic, model, cfg.agent.gamma, cfg.agent.horizon


def child(spec: dict[str, Any]) -> dict[str, list[list[int]]]:
    """Measure one configuration (one round of it); runs in a fresh process whose thread env vars the parent set."""
    import numpy as np
    from maac_robot.runtime.artifacts import load_artifacts

    art_dir, calls, warmup = spec["artifacts"], spec["calls"], spec["warmup"]
    reference = load_artifacts(art_dir)
    m = reference.manifest
    rng = np.random.default_rng(0)
    state = rng.standard_normal(m.state_dim).astype(np.float32)
    noise = rng.standard_normal(m.act_dim).astype(np.float32)
    plans = {p: rng.uniform(-1, 1, (p, m.plan_horizon, m.act_dim)).astype(np.float32) for p in spec["particles"]}

    backend, threads = spec["backend"], spec["threads"]
    if backend == "onnxruntime":
        art = load_artifacts(art_dir, intra_op_threads=threads, allow_spinning=spec["spinning"])
        policy, plan = art.policy, art.plan
    else:
        import torch

        torch.set_num_threads(threads)
        task, actor, critic, model, gamma, _ = _components(spec["source"])
        if backend == "torch":
            from maac_robot.learn.export import build_graphs

            graphs = build_graphs(task, actor, critic, model, gamma=gamma, plan_horizon=m.plan_horizon)

            def policy(s: Any, n: Any) -> tuple[Any, ...]:
                with torch.inference_mode():
                    return tuple(x[0].numpy() for x in graphs["policy"](torch.from_numpy(s)[None],
                                                                        torch.from_numpy(n)[None]))

            def plan(s: Any, a: Any) -> Any:
                with torch.inference_mode():
                    return graphs["plan"](torch.from_numpy(s), torch.from_numpy(a)).numpy()
        else:
            twin = NumpyModel(task, actor, critic, model, gamma, m.plan_horizon)

            def policy(s: Any, n: Any) -> tuple[Any, ...]:
                return tuple(x[0] for x in twin.policy(s[None], n[None]))

            plan = twin.plan
        plan = _padded(plan, m.num_elites)
    # same computation: every backend must agree with onnxruntime before it is timed
    for got, want in zip(policy(state, noise), reference.policy(state, noise), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for p, acts in plans.items():
        np.testing.assert_allclose(plan(state, acts), reference.plan(state, acts), rtol=1e-4, atol=1e-3)
    del reference
    results = {"policy": _time(lambda: policy(state, noise), calls, warmup)}
    for p, acts in plans.items():
        results[f"plan P={p}"] = _time(lambda acts=acts: plan(state, acts), spec["plan_calls"], warmup)
    return results


# ---- driver --------------------------------------------------------------------------------------------


def _configurations(threads: list[int], reference_threads: list[int]) -> list[dict[str, Any]]:
    """onnxruntime first (what deployment uses; spinning off before on), then the references."""
    configs = [{"backend": "onnxruntime", "threads": t, "spinning": s} for s in (False, True) for t in threads]
    return configs + [{"backend": b, "threads": t, "spinning": None}
                      for t in reference_threads for b in ("numpy", "torch")]


def _label(c: dict[str, Any]) -> str:
    spin = "" if c["spinning"] is None else (", spin on" if c["spinning"] else ", spin off")
    return f"{c['backend']} ({c['threads']} thr{spin})"


def _machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import importlib.metadata as md

    versions = {n: md.version(n) for n in ("torch", "onnxruntime", "onnx", "numpy")}
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "load_avg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()), **versions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="trained run directory (default: random init from --config)")
    p.add_argument("--config", type=Path, default=Path("half_cheetah"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--particles", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op threads")
    p.add_argument("--reference-threads", type=int, nargs="+", help="torch / numpy threads (default: --threads)")
    p.add_argument("--calls", type=int, default=10_000, help="timed policy calls per configuration")
    p.add_argument("--plan-calls", type=int, help="timed plan calls per P (default: --calls)")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the configurations")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    source = {"run": str(args.run) if args.run else None, "config": str(args.config), "seed": args.seed}
    calls = ["policy", *(f"plan P={n}" for n in args.particles)]
    plan_calls = args.plan_calls or args.calls
    configs = [c for c in _configurations(args.threads, args.reference_threads or args.threads)
               if c["backend"] in args.backends]
    samples: list[dict[str, list[list[int]]]] = [{c: [] for c in calls} for _ in configs]
    loads: list[list[float]] = [[] for _ in configs]
    with tempfile.TemporaryDirectory() as tmp:
        from maac_robot.learn.export import export_artifacts

        task, actor, critic, model, gamma, horizon = _components(source)
        manifest = export_artifacts(Path(tmp) / "artifacts", task=task, actor=actor, critic=critic, model=model,
                                    gamma=gamma, horizon=horizon, train_steps=0, config={"benchmark": source})
        machine = _machine()
        # Round-robin: every configuration measures 1/rounds of its calls per round, so load that
        # comes and goes on a shared machine is spread over all configurations instead of biasing one.
        for r in range(args.rounds):
            for i, config in enumerate(configs):
                spec = {**config, "artifacts": str(Path(tmp) / "artifacts"), "source": source,
                        "calls": -(-args.calls // args.rounds), "plan_calls": -(-plan_calls // args.rounds),
                        "warmup": args.warmup, "particles": args.particles}
                env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"]),
                       "OPENBLAS_NUM_THREADS": str(config["threads"]), "MKL_NUM_THREADS": str(config["threads"])}
                loads[i].append(os.getloadavg()[0])
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{_label(config)} failed:\n{out.stderr[-3000:]}")
                for call, ns in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    samples[i][call] += ns
            rows = [{**c, "load_avg_1min": f"{min(ld):.1f}-{max(ld):.1f}",
                     "results": {k: _stats(v) for k, v in smp.items()}}
                    for c, smp, ld in zip(configs, samples, loads, strict=True)]
            print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            if args.json:  # after every round, so a cut-short run keeps what it measured
                args.json.write_text(json.dumps({"machine": machine, "source": source, "argv": sys.argv,
                                                 "rounds_done": r + 1, "manifest": manifest.model_dump(
                                                     exclude={"config"}), "rows": rows}, indent=2))

    print(f"model: {'run ' + source['run'] if source['run'] else 'random init, ' + source['config']} -- "
          f"{manifest.env_id}, S={manifest.state_dim}, A={manifest.act_dim}, {manifest.num_models} models / "
          f"{manifest.num_elites} elites, H={manifest.plan_horizon}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"command: {' '.join(['python', *sys.argv])}")
    print(f"timed calls per configuration: policy {rows[0]['results']['policy']['calls']}, plan "
          f"{rows[0]['results'][calls[-1]]['calls']} per P, in {args.rounds} interleaved rounds "
          f"({args.warmup} warm-up calls each)\n")
    print("Wall clock, median / p99 (µs):\n")
    print("| backend | " + " | ".join(calls) + " | load avg (1 min) |")
    print("|---|" + "---|" * (len(calls) + 1))
    for row in rows:
        cells = [f"{row['results'][c]['median_us']:,.0f} / {row['results'][c]['p99_us']:,.0f}" for c in calls]
        print(f"| {_label(row)} | " + " | ".join(cells) + f" | {row['load_avg_1min']} |")
    print("\nCPU time of the calling thread, median (µs; the whole work only for 1-thread rows):\n")
    print("| backend | " + " | ".join(calls) + " |")
    print("|---|" + "---|" * len(calls))
    for row in rows:
        cells = [f"{row['results'][c]['thread_cpu_median_us']:,.0f}" for c in calls]
        print(f"| {_label(row)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
