"""Export a trained run to ONNX deployment artifacts (policy, ensemble, Q, fused plan) + manifest.

The graphs are built from small wrapper modules around the trained actor, critic and ensemble,
exported with the dynamo exporter (`torch.onnx.export(..., dynamo=True)`) at a pinned opset with
`dynamic_shapes`, and checked three ways before the directory is published: the exported
input/output shapes must equal `artifacts.graph_signatures` (the batch / particle axis dynamic, and
only that axis), `load_artifacts` must accept the result, and every graph's onnxruntime output
must match PyTorch on random inputs within `PARITY_RTOL`/`PARITY_ATOL`. No graph contains a random
op: the policy takes its standard-normal noise as an input, the plan graph uses mean predictions.
"""

from __future__ import annotations

import datetime as dt_
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from maac_robot.runtime.artifacts import (
    FORMAT_VERSION,
    GRAPH_NAMES,
    MANIFEST_NAME,
    Artifacts,
    ArtifactError,
    Manifest,
    graph_signatures,
    load_artifacts,
    sha256_bytes,
    signature_mismatch,
)
from maac_robot.envs import state_layout
from maac_robot.runtime import guard
from maac_robot.runtime.artifacts import GuardSpec
from maac_robot.runtime.errors import UserError
from maac_robot.runtime.files import atomic_write, fsync_directory, make_temp_dir
from maac_robot.learn.rollout import model_rollout
from maac_robot.learn.tasks import Task

# The exporter logs one warning per torchvision op it cannot register (torchvision is not a dependency).
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

OPSET = 20  # pinned: onnxruntime 1.32 implements it fully; bump deliberately together with FORMAT_VERSION
# float32 parity between onnxruntime and PyTorch, |ort - torch| <= ATOL + RTOL·|torch| per element.
# Kernels differ in summation order (GEMM blocking, fused ops), and errors accumulate over the plan
# graph's H model steps. Measured at the authors' sizes (the half_cheetah and hopper configs; random
# init with a non-trivial normaliser; 5 seeds x batch 1 and 64) the worst |error| / tolerance over all
# outputs was 0.019 (ensemble logvar; plan returns 0.0035): ≥ 50x headroom.
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-4
# The uncertainty guard's threshold (manifest.guard; runtime/guard.py): the GUARD_PERCENTILE-th percentile of
# the elites' disagreement over up to GUARD_SAMPLES (state, action) pairs of the run's D_env, times GUARD_MARGIN.
# Those pairs are the ensemble's own training data (each elite fitted a bootstrap resample of 80 % of them; the
# fit's holdout split is not kept), where it disagrees less than on fresh transitions from the same env, and CEM
# picks bolder actions than the ones collected. The margin covers that gap: on InvertedPendulum the largest
# disagreement of closed-loop steps on the nominal env was 1.31x (300-step run, CEM) and 1.15x (1500 steps) the
# D_env 99th percentile, so with 1.5 no nominal step was guarded, while a 0.5 m cart-position offset guarded
# 30-86 % of the steps (tests/test_guard.py).
GUARD_PERCENTILE = 99.0
GUARD_MARGIN = 1.5
GUARD_SAMPLES = 10_000
_GUARD_CHUNK = 4096


class ExportError(UserError):
    """A run that cannot be exported as asked (bad option, unusable output directory, parity failure)."""


class PolicyGraph(nn.Module):
    """(net_obs [B,N], noise [B,A]) -> (mean, log_std, action): the actor's pre-tanh Gaussian and its
    tanh-squashed env-unit action for the given standard-normal noise (noise 0: deterministic).

    net_obs = state[:, net_obs_idx], only what the actor reads, so the graph runs from Gymnasium's default
    observation (manifest.state_layout). Called with a full state [B,S] (S ≠ N), it picks those dims itself:
    parity checks compare the graph with this module on the states the other graphs take.
    """

    def __init__(self, actor: nn.Module) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, net_obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if net_obs.shape[-1] != self.actor.net_obs_idx.numel():  # a full state (static at export: never traced)
            net_obs = net_obs.index_select(-1, self.actor.net_obs_idx)
        mean, log_std = self.actor.from_net_obs(net_obs)
        return mean, log_std, self.actor.squash(mean + log_std.exp() * noise)


class EnsembleGraph(nn.Module):
    """(state [B,S], action [B,A]) -> every member's next-state mean/logvar [M,B,S], reward [M,B]
    (+ reward_logvar when learned; a closed-form reward is the task's r(s, a, member mean))."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.reward_fn = task.reward_fn

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, ...]:
        mean, logvar, reward, reward_logvar = self.model.predict_all(state, action)
        if self.reward_fn is not None:
            return mean, logvar, self.reward_fn(state.unsqueeze(0), action.unsqueeze(0), mean)
        return mean, logvar, reward, reward_logvar


class QGraph(nn.Module):
    """(state [B,S], action [B,A]) -> (q1 [B], q2 [B])."""

    def __init__(self, critic: nn.Module) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        q1, q2 = self.critic(state, action)
        return q1.reshape(-1), q2.reshape(-1)


class PlanGraph(nn.Module):
    """(state [S], actions [P,H,A]) -> predicted discounted return [P] of each action sequence.

    Particle i rolls through elite member elites[i % E] (E = num_elites): the particles are
    reshaped [P] -> [P/E, E] -> transposed to [E, P/E], so each elite member runs once on its
    own P/E rows with the batched [E,in,out] weights (no per-particle gather, no loop over members).
    The return is the actor's (`rollout.model_rollout`): each step the member's mean prediction, the
    task's reward (or the learned reward mean) and termination mask (closed-form, or the elites' learned
    termination head), and γ^H·min(Q1,Q2)(s_H, deterministic policy action) for particles still alive.
    """

    def __init__(self, actor: nn.Module, critic: nn.Module, model: nn.Module, task: Task, *,
                 gamma: float, plan_horizon: int) -> None:
        super().__init__()
        self.actor, self.critic, self.model = actor, critic, model
        self.reward_fn, self.termination_fn = task.reward_fn, task.termination_fn
        self.gamma, self.plan_horizon = float(gamma), int(plan_horizon)
        self.register_buffer("elites", model.elites.detach().clone().long())

    def forward(self, state: Tensor, actions: Tensor) -> Tensor:
        num_elites = self.elites.shape[0]
        particles, _, act_dim = actions.shape
        # [P,H,A] -> [P/E, E, H, A] -> [E, P/E, H, A]: row e holds particles e, e+E, e+2E, ...
        acts = actions.reshape(-1, num_elites, self.plan_horizon, act_dim).transpose(0, 1)

        def terminal_q(last: Tensor) -> Tensor:
            flat = last.reshape(-1, last.shape[-1])
            q1, q2 = self.critic(flat, self.actor.deterministic(flat))
            return torch.minimum(q1, q2).reshape(last.shape[:-1])

        path = model_rollout(state.reshape(1, 1, -1).expand(num_elites, acts.shape[1], -1),
                             lambda t, s: (acts[:, :, t], None), lambda s, a: self.model.mean_step(s, a, self.elites),
                             self.reward_fn, self.termination_fn, horizon=self.plan_horizon, gamma=self.gamma,
                             terminal_value=terminal_q)
        return path.value.transpose(0, 1).reshape(particles)


def _example_inputs(m: Manifest, graph: str, generator: torch.Generator, batch: int) -> tuple[Tensor, ...]:
    """Random float32 inputs of the graph's signature, dynamic axes sized `batch` (particles: batch·E)."""
    sizes = {"batch": batch, "particles": batch * m.num_elites}
    shapes = graph_signatures(m)[graph]["inputs"].values()
    return tuple(torch.randn(*(sizes[d] if isinstance(d, str) else d for d in shape), generator=generator)
                 for shape in shapes)


def _dynamic_shapes(m: Manifest, graph: str) -> dict[str, dict[int, Any]]:
    """torch.export dims for the graph's inputs: `batch` free, `particles` a multiple of num_elites."""
    dims = {"batch": Dim("batch", min=1, max=1 << 20),
            "particles": m.num_elites * Dim("particles_per_elite", min=1, max=1 << 16)}
    return {name: {i: dims[d] for i, d in enumerate(shape) if isinstance(d, str)}
            for name, shape in graph_signatures(m)[graph]["inputs"].items()}


def _proto_io(values: Any) -> dict[str, tuple[str, list[int | str | None]]]:
    """ONNX ValueInfoProtos as onnxruntime describes them: ("tensor(float)", dims; None for an unnamed dynamic dim)."""
    return {v.name: (f"tensor({onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()})",
                     [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in v.type.tensor_type.shape.dim])
            for v in values}


def assert_exported_shapes(proto: onnx.ModelProto, m: Manifest, graph: str) -> None:
    """Refuse a graph the loader would refuse for its inputs/outputs (`artifacts.signature_mismatch`) before
    anything is written: the dynamo exporter can put a dynamic axis on the wrong input or freeze one."""
    io = {"inputs": _proto_io(proto.graph.input), "outputs": _proto_io(proto.graph.output)}
    if problem := signature_mismatch(io, m, graph):
        raise ExportError(f"{graph}.onnx: exported {problem}")


def _versions() -> dict[str, str]:
    names = ("maac-robot", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "pydantic")
    return {"python": platform.python_version(), **{n: importlib.metadata.version(n) for n in names}}


def _export_graph(module: nn.Module, m: Manifest, graph: str, generator: torch.Generator) -> bytes:
    signature = graph_signatures(m)[graph]
    with warnings.catch_warnings():
        # Exporter chatter that is expected here: inputs sharing the `batch` dim, and a torch-internal
        # deprecation. Anything else still shows.
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        program = torch.onnx.export(
            module, _example_inputs(m, graph, generator, batch=3), dynamo=True, opset_version=OPSET,
            input_names=list(signature["inputs"]), output_names=list(signature["outputs"]),
            dynamic_shapes=_dynamic_shapes(m, graph), optimize=True, verbose=False)
    proto = program.model_proto
    assert_exported_shapes(proto, m, graph)
    proto.doc_string = (module.__doc__ or "").strip()
    for key, value in m.metadata(graph).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def build_graphs(task: Task, actor: nn.Module, critic: nn.Module, model: nn.Module, *, gamma: float,
                 plan_horizon: int) -> dict[str, nn.Module]:
    """The four wrapper modules, in eval mode on CPU (what gets exported and what parity compares to)."""
    graphs = {"policy": PolicyGraph(actor), "ensemble": EnsembleGraph(model, task), "q": QGraph(critic),
              "plan": PlanGraph(actor, critic, model, task, gamma=gamma, plan_horizon=plan_horizon)}
    return {name: g.to("cpu").eval() for name, g in graphs.items()}


def parity_errors(artifacts: Artifacts, graphs: dict[str, nn.Module], *, batch: int = 8,
                  seed: int = 0) -> dict[str, float]:
    """Largest |ort − torch| / (ATOL + RTOL·|torch|) per graph output on random inputs (≤ 1 passes)."""
    generator = torch.Generator().manual_seed(seed)
    ratios = {}
    for graph in GRAPH_NAMES:
        inputs = _example_inputs(artifacts.manifest, graph, generator, batch)
        names = list(graph_signatures(artifacts.manifest)[graph]["inputs"])
        ort_out = artifacts.sessions[graph].run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})
        with torch.inference_mode():
            torch_out = graphs[graph](*inputs)
        torch_out = torch_out if isinstance(torch_out, tuple) else (torch_out,)
        out_names = list(graph_signatures(artifacts.manifest)[graph]["outputs"])
        for name, got, want in zip(out_names, ort_out, torch_out, strict=True):
            want = want.numpy()
            with np.errstate(divide="ignore", invalid="ignore"):  # a zero tolerance is allowed: inf / nan fail
                ratio = np.abs(got - want) / (PARITY_ATOL + PARITY_RTOL * np.abs(want))
            ratios[f"{graph}.{name}"] = float(np.max(ratio))
    return ratios


def guard_scale(model: nn.Module) -> np.ndarray:
    """Per state dim [S]: the std of Δs in the ensemble's training data (its output normaliser), 1 where the dim is
    carried over unchanged (the members never disagree there)."""
    scale = np.ones(model.state_dim)
    scale[model.modelled_idx.cpu().numpy()] = model.out_std[: model.num_modelled].detach().cpu().double().numpy()
    return scale


def guard_disagreements(ensemble: nn.Module, elites: list[int], scale: np.ndarray, states: np.ndarray,
                        actions: np.ndarray) -> np.ndarray:
    """`runtime.guard.disagreement` [N] of (states [N,S], actions [N,A]) on the ensemble graph module's
    next-state means (what `ensemble.onnx` computes, to parity), taken over `elites`."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(states), _GUARD_CHUNK):
            mean = ensemble(torch.as_tensor(states[i:i + _GUARD_CHUNK], dtype=torch.float32),
                            torch.as_tensor(actions[i:i + _GUARD_CHUNK], dtype=torch.float32))[0]
            out.append(guard.disagreement(mean[elites].numpy(), scale))
    return np.concatenate(out) if out else np.zeros(0)


def calibrate_guard(ensemble: nn.Module, model: nn.Module, states: np.ndarray, actions: np.ndarray, *,
                    percentile: float = GUARD_PERCENTILE, margin: float = GUARD_MARGIN) -> GuardSpec | None:
    """The manifest's guard from calibration pairs: percentile(disagreements, `percentile`) · `margin`.

    None when there is nothing to calibrate a spread on: fewer than 2 elites, no pairs, or elites that agree
    exactly on every pair (threshold 0).
    """
    if not 0 < percentile <= 100 or not margin > 0:
        raise ExportError(f"guard percentile must be in (0, 100] and margin > 0, got {percentile}, {margin}")
    elites = [int(e) for e in model.elites]
    if len(elites) < 2 or len(states) == 0:
        return None
    scale = guard_scale(model)
    d = guard_disagreements(ensemble, elites, scale, states, actions)
    threshold = float(np.percentile(d, percentile)) * margin
    if not (np.isfinite(threshold) and threshold > 0):
        return None
    return GuardSpec(threshold=threshold, percentile=percentile, margin=margin, samples=len(d),
                     scale=[float(x) for x in scale], definition=guard.DEFINITION)


def _check_replaceable(out: Path) -> None:
    """`out` may be absent, empty, or an earlier artifact directory; anything else is the user's."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise ExportError(f"refusing to overwrite {out}: it exists and is not an artifact directory")


def _publish(tmp: Path, out: Path) -> None:
    """Move the verified directory into place (checked again: `out` may have changed during the export), and
    make the move durable; its files were synced as they were written (`atomic_write`)."""
    _check_replaceable(out)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_directory(out.parent)


def export_artifacts(out: str | Path, *, task: Task, actor: nn.Module, critic: nn.Module, model: nn.Module,
                     gamma: float, horizon: int, plan_horizon: int | None = None, train_steps: int,
                     config: dict[str, Any], seed: int = 0,
                     progress: Callable[[int, int, str], None] | None = None,
                     calibration: tuple[np.ndarray, np.ndarray] | None = None,
                     guard_percentile: float = GUARD_PERCENTILE, guard_margin: float = GUARD_MARGIN) -> Manifest:
    """Write policy/ensemble/q/plan.onnx + manifest.json to `out`, verified, and return the manifest.

    `plan_horizon` (the fused graph's H) defaults to the trained `horizon`. `calibration` (states [N,S],
    actions [N,A]; `export_from_run` passes a sample of the run's D_env) sets the manifest's uncertainty guard
    (`calibrate_guard`); without it the manifest has none. The directory is built
    beside `out` and moved into place only after shapes, loading and parity all pass, so `out`
    never holds a half-written or unverified export. `progress(step, steps, what)`, if given, is
    called as each step starts (one per graph, then the verification).
    """
    plan_horizon = horizon if plan_horizon is None else plan_horizon
    if plan_horizon < 1:
        raise ExportError(f"plan_horizon must be >= 1 (the trained horizon is {horizon}); pass --plan-horizon")
    out = Path(out)
    _check_replaceable(out)
    info = task.info
    elites = [int(e) for e in model.elites]
    layout = state_layout(info.env_id)
    if [int(i) for i in actor.net_obs_idx] != layout.net_obs_idx:
        raise ExportError(f"the actor reads state dims {actor.net_obs_idx.tolist()}, the state convention of "
                          f"{info.env_id} gives the networks {layout.net_obs_idx}")
    manifest = Manifest(
        format_version=FORMAT_VERSION, env_id=info.env_id, state_dim=info.state_dim, state_layout=layout,
        act_dim=info.act_dim,
        act_low=[float(x) for x in info.act_low], act_high=[float(x) for x in info.act_high], dt=info.dt,
        gamma=gamma, horizon=horizon, plan_horizon=plan_horizon, num_models=int(model.num_models),
        num_elites=len(elites), elites=elites, reward="learned" if task.reward_fn is None else "closed_form",
        terminates=info.terminates, termination=task.termination, opset=OPSET, files={f"{g}.onnx": "" for g in GRAPH_NAMES},
        train_steps=train_steps, config=config, versions=_versions(),
        created_utc=dt_.datetime.now(dt_.UTC).isoformat(timespec="seconds"))
    graphs = build_graphs(task, actor, critic, model, gamma=gamma, plan_horizon=plan_horizon)
    if calibration is not None:
        states, actions = (np.asarray(x, np.float32) for x in calibration)
        if states.ndim != 2 or states.shape[1] != info.state_dim or actions.shape != (len(states), info.act_dim):
            raise ExportError(f"calibration needs states [N, {info.state_dim}] and actions [N, {info.act_dim}], got "
                              f"{list(states.shape)} and {list(actions.shape)}")
        manifest = manifest.model_copy(update={"guard": calibrate_guard(
            graphs["ensemble"], model, states, actions, percentile=guard_percentile, margin=guard_margin)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.")  # umask permissions, like the files in it
    steps = len(graphs) + 1
    try:
        generator = torch.Generator().manual_seed(seed)
        files = {}
        for step, (name, module) in enumerate(graphs.items(), start=1):
            if progress is not None:
                progress(step, steps, f"{name}.onnx")
            data = _export_graph(module, manifest, name, generator)
            atomic_write(tmp / f"{name}.onnx", data)
            files[f"{name}.onnx"] = sha256_bytes(data)
        manifest = manifest.model_copy(update={"files": files})
        atomic_write(tmp / MANIFEST_NAME, (json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n").encode())
        if progress is not None:
            progress(steps, steps, "verifying (load, signatures, onnxruntime vs PyTorch parity)")
        try:
            loaded = load_artifacts(tmp, expected_env_id=info.env_id, warm_up=False)
        except ArtifactError as err:
            raise ExportError(f"the export does not verify: {err}") from None
        failed = {k: v for k, v in parity_errors(loaded, graphs, seed=seed).items() if not v <= 1.0}
        if failed:
            raise ExportError(f"onnxruntime and PyTorch disagree beyond rtol={PARITY_RTOL}, atol={PARITY_ATOL} "
                              f"(error / tolerance): {failed}")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def export_from_run(run_dir: str | Path, out: str | Path, plan_horizon: int | None = None,
                    progress: Callable[[int, int, str], None] | None = None, *,
                    guard_percentile: float = GUARD_PERCENTILE, guard_margin: float = GUARD_MARGIN,
                    guard_samples: int = GUARD_SAMPLES) -> Manifest:
    """Export the latest checkpoint of a training run (see `trainer.load_run`); `progress` as in `export_artifacts`.

    The guard is calibrated on `guard_samples` (state, action) pairs drawn without replacement from the
    checkpoint's D_env (all of them when it holds fewer), seeded by the run's seed.
    """
    from maac_robot.learn.trainer import load_run

    if guard_samples < 1:
        raise ExportError(f"guard_samples must be >= 1, got {guard_samples}")
    run = load_run(run_dir)
    cfg = run.config
    calibration = None
    if run.d_env is not None and len(run.d_env):
        data = run.d_env.arrays()
        rows = np.random.default_rng(cfg.train.seed).permutation(len(run.d_env))[:guard_samples]
        calibration = (data["state"][rows], data["action"][rows])
    return export_artifacts(
        out, task=run.task, actor=run.agent.actor, critic=run.agent.critic, model=run.model,
        gamma=cfg.agent.gamma, horizon=cfg.agent.horizon,
        plan_horizon=plan_horizon,
        train_steps=run.env_step, config=cfg.model_dump(mode="json"), seed=cfg.train.seed, progress=progress,
        calibration=calibration, guard_percentile=guard_percentile, guard_margin=guard_margin)
