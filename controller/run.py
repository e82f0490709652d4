"""`maac-robot control`: connect to a robot (or the sim), run episodes, print returns and telemetry.

`--compare` runs policy-only and CEM-MPC on the same reset seeds against a lockstep sim and
prints the paper's Table 1 analogue. `--record DIR` writes every episode as the controller saw it in
the recording format of `maac_robot.runtime.recording` (meta source "controller"; per-step latency,
iterations, disagreement, guarded and which planner acted), which `maac-robot finetune` takes back
into a run. Imports no torch and no gymnasium: a robot computer runs
this with onnxruntime, numpy, pyzmq and pydantic only.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from maac_robot.runtime.config import ControllerConfig, load_section, parse_set
from maac_robot.runtime.errors import UserError
from maac_robot.runtime import link
from maac_robot.runtime.link import RobotLost, check_robot, handshake, open_client, reconnect
from maac_robot.runtime.protocol import RobotClient, RobotInfo, RobotTimeout
from maac_robot.runtime.recording import EpisodeRecorder

from controller.loop import GRAPHS, Controller, StepRecord, Telemetry, guard_threshold

PLANNER_NAMES = ("policy", "cem", "fallback", "guard_policy", "guard_safe")
"""`telemetry_planner` of a controller recording: what chose the action sent. policy: the policy planner;
cem: a CEM plan; fallback: CEM failed (deadline, error), the policy action went; guard_policy / guard_safe:
the uncertainty guard overrode with the policy or the safe action. Kept in meta["planner_names"]."""
ROBOT_FLAGS = ("clipped", "rejected", "watchdog", "held", "late", "pushed")
"""The robot's per-observation flags a controller recording keeps (absent ones read False)."""
SUBSTITUTING_FLAGS = ("rejected", "watchdog", "held", "late")
"""Flags saying the robot applied another action than the one this step sent (`flag_substituted`)."""


def planner_code(controller: Controller, record: StepRecord) -> int:
    """The index in PLANNER_NAMES of what chose this step's action."""
    if record.guarded:
        return PLANNER_NAMES.index("guard_policy" if controller.cfg.guard == "policy" else "guard_safe")
    if controller.planner == "policy":
        return PLANNER_NAMES.index("policy")
    return PLANNER_NAMES.index("fallback" if record.fallback is not None else "cem")


def recording_meta(manifest: Any, artifacts_dir: Path, info: RobotInfo) -> dict[str, Any]:
    """What every controller recording's meta carries: env and spaces, the artifacts' state layout and the
    SHA-256 of their manifest.json (which lists every graph's hash), and the robot's hello metadata."""
    import hashlib

    from maac_robot.runtime.artifacts import MANIFEST_NAME

    return {"env_id": manifest.env_id, "source": "controller", "state_dim": manifest.state_dim,
            "act_dim": manifest.act_dim, "dt": info.dt, "mode": info.mode,
            "state_layout": manifest.state_layout.model_dump(mode="json"),
            "artifacts": str(artifacts_dir),
            "artifacts_sha256": hashlib.sha256((Path(artifacts_dir) / MANIFEST_NAME).read_bytes()).hexdigest(),
            "train_steps": manifest.train_steps, "robot_session": info.session,
            "robot_metadata": dict(info.metadata), "planner_names": list(PLANNER_NAMES)}


def load_controller_config(path: Path | None, sets: list[str] | None = None) -> ControllerConfig:
    """The `controller` section of a task YAML with `--set controller.KEY=VALUE` applied; the other sections
    are not read (they are the learner's and the sim's)."""
    return load_section(path, "controller", ControllerConfig, *parse_set(sets, {"controller": ControllerConfig}))


GIL_SWITCH_INTERVAL_S = 5e-4
"""CPython hands the GIL to a waiting thread only every switch interval (default 5 ms): at the
deadline the control thread would wait up to that long for the CEM worker's numpy code. Measured
(benchmarks/mpc_scheduling.py, Hopper, 3.2 ms budget, SCHED_FIFO): max latency 8.4 ms at 5 ms in
both runs, 4.0 and 8.4 ms at 0.5 ms; p99 3.4-3.7 ms either way."""


def apply_realtime_settings(cfg: ControllerConfig) -> None:
    """Process settings for real-time control: a short GIL switch interval and, if configured, SCHED_FIFO.

    Call it before the first ZeroMQ socket exists: threads created afterwards inherit the policy,
    the CEM worker and ZeroMQ's I/O thread alike. Measured (benchmarks/mpc_scheduling.py, Hopper at
    125 Hz, sim at the same priority, load ~4.5): with the I/O thread left at normal priority,
    observations waited up to 4 ms (p99) in the socket and 0.6-0.9 % of robot ticks found no fresh
    action; with it real-time, 0.55 ms and 0.1 % (an unserialised run at load ~10: 35 % vs 0).
    Without real-time priority the control thread's p99 latency was 8-11 ms for a 3.2 ms budget.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if cfg.realtime_priority is None:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(cfg.realtime_priority))
    except (AttributeError, OSError) as err:
        raise UserError(f"cannot set SCHED_FIFO priority {cfg.realtime_priority} ({err}): run with CAP_SYS_NICE "
                        f"(docker: --cap-add SYS_NICE) or unset controller.realtime_priority") from None


def normal_scheduling() -> None:
    """Back to SCHED_OTHER for this thread (and threads it creates later): lockstep CEM runs flat out
    and must not hold a core at real-time priority on a shared machine."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@dataclass
class EpisodeResult:
    seed: int
    ret: float
    steps: int
    telemetry: Telemetry = field(default_factory=Telemetry)
    interrupted: int = 0  # attempts of this episode cut short by a lost or restarted robot


RESEND_AT_PERIODS = (0.2, 0.4, 0.6, 0.8)
"""Realtime: the action goes out again (same seq, applied at most once) at these fractions of the period,
so a lost action message still reaches the robot's next tick: with independent loss p the tick is
missed with p⁵ instead of p. Spaced to outlast a short burst of loss, early enough to beat the tick.
A robot that misses a tick holds the previous action, and one such tick can topple a balancing
policy: with two copies (p³) InvertedPendulum fell in 1 of 2 runs at 10 % loss (benchmarks/RESULTS.md)."""
MISSING_AFTER_PERIODS = 1.25
"""Realtime: an observation not here this long after the previous one is taken as lost. A quarter
period past the tick absorbs the robot's timing jitter and still leaves time to act before the next tick."""


def reset_owned(client: RobotClient, seed: int, wait_s: float) -> Any:
    """`client.reset(seed)`, waiting up to `wait_s` while another controller still owns the robot's episode."""
    return link.reset_owned(client, seed, wait_s, notify=lambda what: print(f"[control] {what}", flush=True))


def run_episode(client: RobotClient, controller: Controller, seed: int,
                clock: Any = time.perf_counter, recorder: EpisodeRecorder | None = None,
                record_name: str | None = None) -> EpisodeResult:
    """One episode. Lockstep: every step plans without a deadline; a lost message is retried by the client.
    Realtime: the planning deadline is `budget_frac`·dt after the observation arrived; the next
    observation is the robot's next tick; the action is sent again at `RESEND_AT_PERIODS`.
    An observation that has not come `MISSING_AFTER_PERIODS` after the last
    is taken as lost (`Telemetry.missing_observations`): the controller acts on the state the model
    predicts from the newest observation and the action sent for it (or on that observation when
    the model cannot say), so a lost message costs a tick, not the episode. Only `timeout_periods`
    without any observation, or a robot restart, end the episode (`RobotLost`).

    With a `recorder`, every step goes into it and the episode is written as `record_name` when it ends,
    also when it is cut short (then its last step is marked truncated)."""
    info = client.info
    if info is None:
        raise UserError("call client.hello() before running episodes")
    realtime = info.mode == "realtime"
    budget = controller.cfg.budget_frac * info.dt
    lost_after = controller.cfg.timeout_periods * info.dt
    tel = Telemetry()
    dropped_before = client.stats.dropped_observations
    controller.reset()
    obs = reset_owned(client, seed, info.owner_timeout_s + 1.0)
    episode_meta: dict[str, Any] = {}
    if recorder is not None:
        episode_meta = {"seed": seed, "planner": controller.planner, "robot_episode": obs.episode}
        if "perturbation" in obs.info:  # a perturbed sim's draws for this episode
            episode_meta["perturbation"] = obs.info["perturbation"]
    last_real = clock()
    ret, steps = 0.0, 0
    obs_predicted = False  # the state acted on is the model's stand-in for a lost observation
    try:
        while not obs.done:
            received = clock() - max(0.0, time.time() - obs.t_received)  # the observation's arrival, on `clock`
            action, record = controller.act(obs.state, received + budget if realtime else None, received)
            nxt_predicted = False
            if realtime:
                client.send_action(action, obs_seq=obs.seq)
                record.missed = clock() - received > info.dt
                nxt = None
                for at in (*RESEND_AT_PERIODS, MISSING_AFTER_PERIODS):
                    nxt = client.latest_observation(max(0.0, received + at * info.dt - clock()))
                    if nxt is not None or at == MISSING_AFTER_PERIODS:
                        break
                    client.resend_action()  # the usual case: the next tick is still ahead, and a copy covers a lost action
                if nxt is None:
                    tel.missing_observations += 1
                    if clock() - last_real > lost_after:
                        raise RobotLost(f"no observation from {client.endpoint} for {lost_after:.3g} s "
                                        f"({controller.cfg.timeout_periods:g} periods) during episode seed {seed}")
                    predicted = controller.predict(obs.state, action)
                    nxt = replace(obs, state=obs.state if predicted is None else predicted, reward=0.0,
                                  t_received=time.time())
                    nxt_predicted = True
                else:
                    last_real = clock()
                    tel.held_ticks += int(bool(nxt.info.get("held", False)))
            else:
                nxt = client.step(action)
            if nxt.session != obs.session:
                raise RobotLost(f"the robot at {client.endpoint} restarted during episode seed {seed} (new session)")
            tel.records.append(record)
            ret += float(nxt.reward)
            steps = nxt.step  # the robot's count: a step acted on a predicted state is no robot step
            if recorder is not None:
                _record_step(recorder, controller, record, obs, nxt, action, obs_predicted, nxt_predicted)
            obs_predicted = nxt_predicted
            obs = nxt
    finally:
        if recorder is not None:
            recorder.finish(record_name or f"episode-seed{seed}", episode_meta)
    tel.dropped_observations = client.stats.dropped_observations - dropped_before
    # a robot that keeps its own sum stays right when real-time control skipped stale observations
    ret = float(obs.info.get("episode_return", ret))
    return EpisodeResult(seed=seed, ret=ret, steps=steps, telemetry=tel)


def _record_step(recorder: EpisodeRecorder, controller: Controller, record: StepRecord, obs: Any, nxt: Any,
                 action: np.ndarray, obs_predicted: bool, nxt_predicted: bool) -> None:
    """One controller-side transition: the state acted on, the action sent, what the robot reported next."""
    flags = {name: bool(nxt.info.get(name) or False) for name in ROBOT_FLAGS}
    flags["predicted"] = obs_predicted or nxt_predicted
    flags["skipped"] = nxt.step != obs.step + 1
    flags["substituted"] = any(flags[name] for name in SUBSTITUTING_FLAGS)
    telemetry = {"latency": float(record.latency), "iterations": int(record.iterations),
                 "disagreement": float(record.disagreement), "guarded": bool(record.guarded),
                 "planner": planner_code(controller, record)}
    recorder.add(obs.state, action, float(nxt.reward), nxt.state, bool(nxt.terminated), bool(nxt.truncated),
                 flags, telemetry)


def run_resilient(client: RobotClient, controller: Controller, seed: int, manifest: Any,
                  reconnect_s: float, recorder: EpisodeRecorder | None = None,
                  record_prefix: str = "episode") -> EpisodeResult:
    """`run_episode`, reconnecting and starting the episode again when the robot is lost or restarts.

    With `reconnect_s` 0 a lost robot is one clear line (UserError) instead. With a `recorder`, each attempt is
    its own file `<record_prefix>-seed<seed>-try<n>.npz` (a cut attempt ends truncated).
    """
    interrupted = 0
    while True:
        try:
            res = run_episode(client, controller, seed, recorder=recorder,
                              record_name=f"{record_prefix}-seed{seed}-try{interrupted}")
            res.interrupted = interrupted
            return res
        except RobotTimeout as err:  # RobotLost included
            if reconnect_s <= 0:
                raise UserError(f"lost the robot: {err}; not reconnecting (controller.reconnect_s is 0 or "
                                f"--no-reconnect)") from None
            interrupted += 1
            print(f"[control] lost the robot ({err}); reconnecting for up to {reconnect_s:g} s", flush=True)
            start = time.monotonic()
            reconnect(client, manifest, reconnect_s)
            print(f"[control] reconnected after {time.monotonic() - start:.2f} s; episode seed {seed} starts again",
                  flush=True)


def run_episodes(client: RobotClient, controller: Controller, seeds: list[int], label: str,
                 manifest: Any = None, reconnect_s: float = 0.0, recorder: EpisodeRecorder | None = None,
                 record_prefix: str = "episode") -> list[EpisodeResult]:
    results = []
    for seed in seeds:
        res = run_resilient(client, controller, seed, manifest, reconnect_s, recorder, f"{record_prefix}-{label}")
        results.append(res)
        s = res.telemetry.summary()
        print(f"[{label}] seed {seed}: return {res.ret:.1f} over {res.steps} steps | latency median "
              f"{s['latency_ms_median']:.2f} ms p99 {s['latency_ms_p99']:.2f} ms | iterations "
              f"{s['iterations_mean']:.2f} | misses {s['deadline_misses']} held {s['held_ticks']} | guarded "
              f"{s['guarded']}")
    total = Telemetry()
    for res in results:
        total.records += res.telemetry.records
        total.held_ticks += res.telemetry.held_ticks
        total.missing_observations += res.telemetry.missing_observations
        total.dropped_observations += res.telemetry.dropped_observations
    print(f"[{label}] {total.format()}")
    if controller.warm_up_fallbacks:
        print(f"[{label}] planning failed during warm-up: {dict(controller.warm_up_fallbacks)} (policy action used)")
    if controller.last_error:
        print(f"[{label}] last planning error: {controller.last_error}")
    return results


def compare_table(rows: dict[str, list[EpisodeResult]]) -> str:
    """Markdown table: return mean ± std per planner on the same seeds, with latency and iterations."""
    lines = ["| planner | episodes | return mean ± std | min | max | latency median / p99 (ms) | CEM iterations |",
             "|---|---|---|---|---|---|---|"]
    for name, results in rows.items():
        rets = np.array([r.ret for r in results])
        tel = Telemetry(records=[rec for r in results for rec in r.telemetry.records]).summary()
        lines.append(f"| {name} | {len(rets)} | {rets.mean():.1f} ± {rets.std():.1f} | {rets.min():.1f} | "
                     f"{rets.max():.1f} | {tel['latency_ms_median']:.2f} / {tel['latency_ms_p99']:.2f} | "
                     f"{tel['iterations_mean']:.2f} |")
    return "\n".join(lines)


def make_controller(artifacts: Any, cfg: ControllerConfig, planner: Literal["cem", "policy"], seed: int) -> Controller:
    controller = Controller(artifacts, cfg, planner, np.random.default_rng(seed))
    controller.warm_up(np.zeros(artifacts.manifest.state_dim, np.float32))
    return controller


def control_from_cli(*, artifacts: Path, connect: str, planner: str | None, episodes: int, config: Path | None,
                     seed: int, compare: bool, client_key: Path | None = None, server_public: Path | None = None,
                     reconnect: bool = True, sets: list[str] | None = None, record: Path | None = None) -> int:
    """`maac-robot control`: run `episodes` episodes (reset seeds seed, seed+1, ...) and print the results.

    `record`: a directory to write each episode into (`control-<UTC time>-<planner>-seed<S>-try<N>.npz`)."""
    from maac_robot.runtime.artifacts import load_artifacts
    from maac_robot.runtime.auth import client_curve

    if episodes < 1:
        raise UserError(f"--episodes must be at least 1, got {episodes}")
    cfg = load_controller_config(config, sets)
    client_curve(client_key or cfg.client_key, server_public or cfg.server_public)  # half a key pair: refused first
    reconnect_s = cfg.reconnect_s if reconnect else 0.0
    arts = load_artifacts(artifacts, graphs=GRAPHS)
    apply_realtime_settings(cfg)  # before the client's socket: ZeroMQ's I/O thread must inherit the priority
    client = open_client(connect, cfg, arts.manifest.dt, name="controller", client_key=client_key,
                         server_public=server_public)
    try:
        info = handshake(client)
        check_robot(info, arts.manifest)
        if info.mode != "realtime" and cfg.realtime_priority is not None:
            normal_scheduling()
        seeds = [seed + i for i in range(episodes)]
        print(f"[control] {arts.manifest.env_id} at {connect} ({info.mode}, dt {info.dt * 1e3:.1f} ms); "
              f"artifacts {artifacts} (train steps {arts.manifest.train_steps}, plan horizon "
              f"{arts.manifest.plan_horizon}); CEM population {cfg.population}, iterations <= {cfg.iterations}, "
              f"budget {cfg.budget_frac:g}·dt")
        print(f"[control] {guard_threshold(arts.manifest, cfg)[1]}")
        recorder = None
        prefix = "control-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        if record is not None:
            recorder = EpisodeRecorder(record, recording_meta(arts.manifest, artifacts, info))
            print(f"[control] recording each episode to {record}/{prefix}-*.npz")
        if compare:
            if info.mode != "lockstep":
                raise UserError("--compare evaluates planners on identical seeds and needs a lockstep sim "
                                "(maac-robot sim --mode lockstep)")
            rows = {}
            for name in ("policy", "cem"):
                controller = make_controller(arts, cfg, name, cfg.seed)  # type: ignore[arg-type]
                try:
                    rows[name] = run_episodes(client, controller, seeds, name, arts.manifest, reconnect_s,
                                              recorder, prefix)
                finally:
                    controller.close()
            print(compare_table(rows))
            return 0
        controller = make_controller(arts, cfg, planner or cfg.planner, cfg.seed)  # type: ignore[arg-type]
        try:
            results = run_episodes(client, controller, seeds, planner or cfg.planner, arts.manifest, reconnect_s,
                                   recorder, prefix)
        finally:
            controller.close()
        rets = np.array([r.ret for r in results])
        print(f"[control] return over {len(rets)} episode(s): {rets.mean():.1f} ± {rets.std():.1f}")
        return 0
    finally:
        client.close()
