"""`maac-robot sweep` and `maac-robot report`: a 2 x 2 sweep of tiny runs on a local Ray instance (started and
stopped here, every server on loopback), its CSV, the skip of finished trials, the resume of interrupted ones
(a checkpoint short of a raised budget, and a kill -9 of the driver mid-trial), and the aggregate statistics
against known cases.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from maac_robot import cli
from maac_robot.learn.trainer import read_metrics
from maac_robot.sweep import records, stats
from maac_robot.sweep.report import budgets, report
from maac_robot.sweep.runner import (SweepError, checkpoint_step, grid_points, parse_grid, plan, run_sweep,
                                     start_ray, sweep_command)
from tiny_configs import tiny

ROOT = Path(__file__).resolve().parents[1]

TINY = tiny()


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ---- statistics: known cases ---------------------------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    assert stats.iqm(range(1, 9)) == pytest.approx(4.5)  # 3, 4, 5, 6
    assert stats.iqm([100.0, 1.0, 2.0, 3.0, -50.0, 4.0, 5.0, 6.0]) == pytest.approx(3.5)  # outliers drop out
    assert stats.iqm([1.0, 2.0, 9.0]) == pytest.approx(4.0)  # fewer than 4: nothing dropped (scipy's trim_mean)
    assert stats.iqm(list(range(10))) == pytest.approx(np.mean(range(2, 8)))  # ⌊10/4⌋ = 2 dropped each side
    np.testing.assert_allclose(stats.iqm(np.array([range(1, 9), range(11, 19)]), axis=-1), [4.5, 14.5])
    with pytest.raises(ValueError):
        stats.iqm([])


def test_bootstrap_ci_matches_the_normal_theory_interval_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 2.0, size=400)
    lo, hi = stats.bootstrap_ci(x, stats.mean, reps=4000, seed=0)
    half = 1.96 * x.std() / np.sqrt(len(x))  # the percentile bootstrap of a mean approaches it for large n
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half) and hi == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)
    assert stats.bootstrap_ci(x, seed=3) != stats.bootstrap_ci(x, seed=4)
    # two runs, 0 and 1: the resampled mean is 0, 1/2 or 1, so the 95 % interval spans [0, 1]
    assert stats.bootstrap_ci([0.0, 1.0], stats.mean, reps=4000) == (0.0, 1.0)
    assert stats.bootstrap_ci([5.0]) == (5.0, 5.0) and stats.bootstrap_ci([2.0] * 7) == (2.0, 2.0)


def test_the_iqm_interval_holds_the_estimate_and_narrows_with_more_runs() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for n in (8, 64, 512):
        x = rng.normal(0.0, 1.0, size=n)
        a = stats.aggregate(x)
        assert a["ci_low"] <= a["iqm"] <= a["ci_high"] and a["n"] == n
        widths.append(a["ci_high"] - a["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[2] == pytest.approx(np.sqrt(512 / 64), rel=0.35)  # ~1/sqrt(n)


def test_report_budgets_are_the_final_step_and_milestones() -> None:
    curve = {s: 0.0 for s in range(100, 1001, 100)}
    assert budgets({"a": {0: curve, 1: curve}, "b": {0: {s: 0.0 for s in range(100, 801, 100)}}}) == [200, 400, 600, 800]


# ---- planning ------------------------------------------------------------------------------------------------


def test_grid_and_plan(tmp_path: Path) -> None:
    grid = parse_grid(["agent.horizon=0,1,3", "agent.steve=true, false"])
    assert grid == [("agent.horizon", ["0", "1", "3"]), ("agent.steve", ["true", "false"])]
    assert grid_points(grid)[:2] == [("agent.horizon=0", "agent.steve=true"), ("agent.horizon=0", "agent.steve=false")]
    trials = plan(_config(tmp_path), [0, 1], ["agent.horizon=0,2"], ["agent.tau=0.01"], 300, tmp_path / "sw")
    assert [t.name for t in trials] == ["agent.horizon=0-s0", "agent.horizon=0-s1", "agent.horizon=2-s0",
                                        "agent.horizon=2-s1"]
    t = trials[3]
    assert (t.config["agent"]["horizon"], t.config["agent"]["tau"], t.config["train"]["seed"]) == (2, 0.01, 1)
    assert (t.steps, t.config["train"]["num_threads"], t.sets) == (300, 1, ("agent.tau=0.01", "agent.horizon=2"))
    assert trials[0].digest == trials[1].digest != trials[2].digest  # seeds share a digest, variants do not
    assert [t.name for t in plan("inverted_pendulum", [4], out=tmp_path)] == ["base-s4"]
    for bad, match in ((["agent.horizon"], "expected"), (["agent.horizon=1,1"], "repeated"),
                       (["agent.horizon=1", "agent.horizon=2"], "already")):
        with pytest.raises(SweepError, match=match):
            plan("inverted_pendulum", [0], bad, out=tmp_path)
    with pytest.raises(SweepError, match="--seeds"):
        plan("inverted_pendulum", [0], sets=["train.seed=3"], out=tmp_path)
    with pytest.raises(SweepError, match="repeated"):
        plan("inverted_pendulum", [0, 0], out=tmp_path)
    with pytest.raises(Exception, match="agent.horizn"):  # a typo'd key fails before anything runs
        plan("inverted_pendulum", [0], ["agent.horizn=1,2"], out=tmp_path)
    assert sweep_command("hopper", [0, 1], ["agent.horizon=0,1"], [], 500, "sweeps/x", None, 1) == (
        "maac-robot sweep --config hopper --seeds 0 1 --grid agent.horizon=0,1 --steps 500 --out sweeps/x")


def test_plan_of_an_explicit_variant_list(tmp_path: Path) -> None:
    config = _config(tmp_path)
    variants = [(), ("agent.horizon=0",), ("agent.steve=false", "agent.tau=0.02")]
    trials = plan(config, [0], sets=["agent.tau=0.01"], steps=300, out=tmp_path / "sw", variants=variants)
    assert [t.name for t in trials] == ["base-s0", "agent.horizon=0-s0", "agent.steve=false,agent.tau=0.02-s0"]
    agents = [t.config["agent"] for t in trials]
    assert [(a["horizon"], a["steve"], a["tau"]) for a in agents] == [(2, True, 0.01), (0, True, 0.01),
                                                                      (2, False, 0.02)]  # a variant's items win
    assert trials[2].sets == ("agent.tau=0.01", "agent.steve=false", "agent.tau=0.02")
    for bad, kwargs, match in (([(), ()], {}, "repeated"), ([], {}, "at least one"),
                               ([("train.seed=1",)], {}, "--seeds"),
                               ([()], {"grid": ["agent.horizon=0,1"]}, "not both")):
        with pytest.raises(SweepError, match=match):
            plan(config, [0], out=tmp_path, variants=bad, **kwargs)
    with pytest.raises(SweepError, match="command"):  # no `maac-robot sweep` line can rerun it
        run_sweep(config, [0], tmp_path / "sw", variants=variants)


def test_sweep_without_ray_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None; from maac_robot.cli import main;"
            f"sys.exit(main(['sweep', '--config', {str(_config(tmp_path))!r}, '--seeds', '0', '--out', "
            f"{str(tmp_path / 'sw')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install 'maac-robot[sweep]'" in result.stderr


# ---- on a local Ray instance ---------------------------------------------------------------------------------


def _listening_sockets_of_descendants() -> list[str]:
    """Hex local addresses of the TCP sockets in LISTEN state that this process or its descendants hold."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    ours, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        ours |= new
        grew = bool(new)
    inodes = set()
    for pid in ours:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                found.append(cols[1].split(":")[0])
    return found


def _loopback(hex_addr: str) -> bool:
    if len(hex_addr) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return hex_addr.endswith("7F")
    return hex_addr in ("00000000000000000000000001000000",) or (
        hex_addr.startswith("0000000000000000FFFF0000") and hex_addr.endswith("7F"))  # ::1, ::ffff:127.x


@pytest.fixture(scope="module")
def local_ray():
    try:
        import ray
    except ModuleNotFoundError as err:
        pytest.fail(f"the sweep tests need Ray: pip install -e '.[sweep]' ({err})")
    try:
        start_ray(None, num_cpus=2)
    except Exception as err:  # noqa: BLE001 - say why the sweep tests cannot run, not skip them
        pytest.fail(f"a local Ray instance did not start: {type(err).__name__}: {err}")
    try:
        yield ray
    finally:
        ray.shutdown()


def test_local_ray_listens_on_loopback_only(local_ray) -> None:
    assert local_ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    sockets = _listening_sockets_of_descendants()
    assert sockets, "no listening socket found for the Ray processes"
    assert all(_loopback(a) for a in sockets), sockets


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _rows(path: Path) -> list[dict[str, str]]:
    return records.read_rows(path)


def test_a_2x2_sweep_writes_the_csv_skips_finished_trials_and_resumes_the_others(local_ray, tmp_path: Path) -> None:
    config, out = _config(tmp_path), tmp_path / "sw"
    args = dict(config=config, seeds=[0, 1], out=out, grid=["agent.horizon=0,2"])
    first = run_sweep(**args, steps=100)
    assert not first.errors and {s for s, _ in first.states.values()} == {"new"}
    names = ["agent.horizon=0-s0", "agent.horizon=0-s1", "agent.horizon=2-s0", "agent.horizon=2-s1"]
    assert sorted(first.results) == names and {r["env_step"] for r in first.results.values()} == {100}
    assert len({r["pid"] for r in first.results.values()}) == 2  # two trials at a time on 2 CPUs, 1 per trial
    rows = _rows(out / "evaluations.csv")
    assert tuple(rows[0]) == records.SWEEP_COLUMNS
    assert [(r["run"], r["env_step"]) for r in rows] == [(n, "100") for n in names]
    first_command = sweep_command(config, [0, 1], ["agent.horizon=0,2"], [], 100, out, None, 1)
    assert {r["command"] for r in rows} == {first_command} and rows[0]["commit"]
    assert rows[0]["variant"] == "agent.horizon=0" and rows[0]["overrides"] == "--set agent.horizon=0"
    assert rows[0]["config_digest"] == rows[1]["config_digest"] != rows[2]["config_digest"]
    for row in rows:
        metrics = read_metrics(out / row["run"] / "metrics.jsonl")
        assert float(row["eval_return_mean"]) == pytest.approx(metrics[-1]["eval_return_mean"], rel=1e-5)
        cfg = yaml.safe_load((out / row["run"] / "config.yaml").read_text())
        assert (cfg["train"]["seed"], cfg["train"]["num_threads"]) == (int(row["seed"]), 1)

    # the same sweep with a larger budget: every trial is an interrupted one, resumed from its checkpoint
    second = run_sweep(**args, steps=200)
    assert {s for s, _ in second.states.values()} == {"resume"} and not second.errors
    assert {r["from_step"] for r in second.results.values()} == {100}
    rows2 = _rows(out / "evaluations.csv")
    assert [(r["run"], r["env_step"]) for r in rows2] == [(n, s) for n in names for s in ("100", "200")]
    earlier = {r["run"]: r for r in rows}
    for row in rows2:
        if row["env_step"] == "100":  # kept, not retrained: same value, and the first command still computed it
            assert (row["eval_return_mean"], row["command"]) == (earlier[row["run"]]["eval_return_mean"], first_command)
        else:
            assert "--steps 200" in row["command"]
    sessions = [json.loads(line) for line in (out / names[0] / "sessions.jsonl").read_text().splitlines()]
    assert [s["env_step"] for s in sessions] == [0, 100] and sessions[-1]["torch_threads"] == 1

    # rerun: nothing left to train, Ray is not asked for anything, the CSV is unchanged
    before = (out / "evaluations.csv").read_bytes()
    third = run_sweep(**args, steps=200)
    assert {s for s, _ in third.states.values()} == {"done"} and third.results == {}
    assert (out / "evaluations.csv").read_bytes() == before
    assert len((out / names[0] / "sessions.jsonl").read_text().splitlines()) == 2
    # the sweep directory holds another experiment: refused rather than mixed
    with pytest.raises(SweepError, match="agent.tau"):
        run_sweep(**args, steps=200, sets=["agent.tau=0.01"])

    lines = report(out)
    text = (out / "report.md").read_text()
    assert "\n".join(lines) == text and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    finals = {r["variant"]: [float(x["eval_return_mean"]) for x in rows2 if x["variant"] == r["variant"]
                             and x["env_step"] == "200"] for r in rows2}
    for variant, values in finals.items():
        a = stats.aggregate(values)
        assert f"| {variant} | " in text
        assert f"{a['iqm']:.1f} [{a['ci_low']:.1f}, {a['ci_high']:.1f}] (n=2)" in text


def test_a_sweep_resumes_a_trial_after_kill_9_of_its_driver(local_ray, tmp_path: Path) -> None:
    config, out = _config(tmp_path), tmp_path / "sw"
    # the driver joins the test's Ray instance (--address), as one joins a team's cluster
    address = local_ray.get_runtime_context().gcs_address
    argv = ["sweep", "--config", str(config), "--seeds", "7", "--steps", "400", "--out", str(out), "--address", address]
    run_dir = out / "base-s7"
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "maac_robot.cli", *argv], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not checkpoint.is_file():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 90 s: " + (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.05)
        driver.kill()  # SIGKILL of the driver, mid-trial
        driver.wait(timeout=30)
        # and of the Ray worker training the trial (its pid is in the trial's lock file), which would otherwise
        # train on until Ray reaps a dead driver's tasks; a successor waits for its lock meanwhile
        worker = int((run_dir / ".trial.lock").read_text().split()[0])
        assert worker != driver.pid
        os.kill(worker, signal.SIGKILL)
        while Path(f"/proc/{worker}").exists() and "Z" not in _state(worker):
            time.sleep(0.05)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    killed_at = checkpoint_step(run_dir)
    assert killed_at is not None and 100 <= killed_at < 400, f"the trial was not caught mid-run ({killed_at})"

    # the same command again (here through the library, on the test's Ray instance)
    outcome = run_sweep(config=config, seeds=[7], out=out, steps=400)
    assert outcome.states["base-s7"] == ("resume", killed_at) and not outcome.errors
    assert outcome.results["base-s7"]["from_step"] == killed_at and outcome.results["base-s7"]["env_step"] == 400
    assert [m["env_step"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(100, 401, 100))
    sessions = [json.loads(line)["env_step"] for line in (run_dir / "sessions.jsonl").read_text().splitlines()]
    assert sessions == [0, killed_at]
    rows = _rows(out / "evaluations.csv")
    assert [int(r["env_step"]) for r in rows] == list(range(100, 401, 100))
    stretches = json.loads((run_dir / "trial.json").read_text())["stretches"]
    assert [s["from_step"] for s in stretches] == [0, killed_at]
    assert cli.main(["report", str(out)]) == 0


def test_a_killed_worker_is_retried_by_ray_and_resumes_from_the_checkpoint(local_ray, tmp_path: Path) -> None:
    import threading

    config, out = _config(tmp_path), tmp_path / "sw"
    run_dir = out / "base-s8"
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(result=run_sweep(config=config, seeds=[8], out=out,
                                                                             steps=400)))
    driver.start()
    deadline = time.monotonic() + 90
    while not checkpoint.is_file():
        assert driver.is_alive() and time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)
    worker = int((run_dir / ".trial.lock").read_text().split()[0])
    assert worker != os.getpid()
    os.kill(worker, signal.SIGKILL)  # kill -9 of the Ray worker training the trial
    killed_at = checkpoint_step(run_dir)
    driver.join(timeout=120)
    result = outcome["result"]
    assert not result.errors and killed_at is not None and killed_at < 400, killed_at
    assert result.results["base-s8"]["from_step"] == killed_at and result.results["base-s8"]["env_step"] == 400
    assert result.results["base-s8"]["pid"] != worker
    assert [m["env_step"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(100, 401, 100))
    sessions = [json.loads(line)["env_step"] for line in (run_dir / "sessions.jsonl").read_text().splitlines()]
    assert sessions == [0, killed_at]
