"""benchmarks/ablations.py (paper §5.3, issue 23) without training and without Ray: the variant list on the real
configs, the resume and skip of the sweep it runs (the runner's Ray step replaced by a fake that writes run
directories), and the statistics and verdict sentences on synthetic returns whose ranking is known."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from maac_robot.sweep import runner, stats
from tiny_configs import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

ablations = importlib.import_module("ablations")
report = importlib.import_module("report")
results_csv = importlib.import_module("results_csv")

SEEDS = [0, 1, 2, 3, 4]
# the final return of seed 0 per variant (seed s adds s); half of it at the first evaluation
FINAL = {"base": 100.0, "agent.horizon=0": 10.0, "agent.steve=false": 99.0, "agent.num_samples=1": 101.0,
         "agent.entropy=false": 200.0, "agent.real_data_only=true": 30.0, "agent.horizon=1": 50.0,
         "agent.horizon=3": 90.0, "agent.horizon=4": 60.0, "agent.horizon=5": 20.0}  # the tiny config's H is 2


def test_the_variant_list_on_the_real_configs(tmp_path: Path) -> None:
    kept, same_as, trials = ablations.plan_study("inverted_pendulum", SEEDS, 5000, tmp_path / "ip")
    names = [ablations.variant_of(p) for p in kept]
    assert names == ["base", "agent.horizon=0", "agent.steve=false", "agent.num_samples=1", "agent.entropy=false",
                     "agent.real_data_only=true", "agent.horizon=1", "agent.horizon=2", "agent.horizon=4",
                     "agent.horizon=5"]
    assert same_as == {"agent.horizon=3": "base"}  # the config's own horizon is full MAAC, not trained twice
    assert len(trials) == 50 and trials[0].name == "base-s0" and trials[-1].name == "agent.horizon=5-s4"
    by = {t.name: t.config for t in trials}
    h0 = by["agent.horizon=0-s2"]["agent"]
    assert (h0["horizon"], h0["steve"], h0["real_data_only"], h0["entropy"]) == (0, True, False, True)
    assert by["agent.real_data_only=true-s0"]["agent"]["real_data_only"] is True
    assert by["agent.entropy=false-s0"]["agent"]["entropy"] is False
    assert {t.steps for t in trials} == {5000} and by["base-s3"]["train"]["seed"] == 3
    assert len({t.digest for t in trials}) == 10

    kept, same_as, trials = ablations.plan_study("hopper", [0], None, tmp_path / "hop")
    assert same_as == {"agent.horizon=4": "base"} and len(kept) == 10
    base = trials[0].config["agent"]
    assert (base["num_samples"], base["terminal_q_samples"], base["updates_per_step"]) == (2, 1, 2)
    assert next(t for t in trials if t.variant == "agent.num_samples=1").config["agent"]["num_samples"] == 1


def _return(variant: str, seed: int, step: int, steps: int) -> float:
    return (FINAL[variant] + seed) * step / steps


def _fake_run_trials(calls: list[list[str]], stop_at: dict[str, int]):
    """Stands in for `runner.run_trials`: 'trains' each trial by writing its run directory (config, checkpoint,
    evaluations every 100 steps), up to `stop_at[name]` when given (a trial killed mid-run)."""

    def fake(trials, address=None, cpus_per_trial=1, max_retries=2, on_result=None, work=None) -> dict[str, Any]:
        calls.append([t.name for t in trials])
        for t in trials:
            end = stop_at.pop(t.name, t.steps)
            start = runner.checkpoint_step(t.run_dir) or 0
            (t.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (t.run_dir / "config.yaml").write_text(yaml.safe_dump(t.config))
            torch.save({"env_step": end}, t.run_dir / "checkpoints" / "latest.pt")
            with (t.run_dir / "metrics.jsonl").open("a") as f:
                for step in range(start + 100, end + 1, 100):
                    r = _return(t.variant, t.config["train"]["seed"], step, t.steps)
                    f.write(json.dumps({"env_step": step, "eval_return_mean": r, "eval_return_std": 0.0,
                                        "eval_returns": [r]}) + "\n")
            if on_result is not None:
                on_result(t, {"run_dir": str(t.run_dir), "from_step": start, "env_step": end, "last": None,
                              "pid": 0}, None)
        return {}

    return fake


def test_run_skips_finished_trials_resumes_the_others_and_reports_the_known_ranking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny()))  # horizon 2: agent.horizon=2 is the full config here
    monkeypatch.setitem(ablations.PRESETS, "tiny", ablations.Preset(str(config), ("agent.tau=0.01",), 200,
                                                                    (0.5, 1.0), "test"))
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "run_trials", _fake_run_trials(calls, {"agent.steve=false-s3": 100}))
    out = tmp_path / "study"
    argv = ["run", "--task", "tiny", "--seeds", *map(str, SEEDS), "--out", str(out)]
    assert ablations.main(argv) == 0
    assert len(calls) == 1 and len(calls[0]) == 50 and "agent.horizon=2-s0" not in calls[0]
    info = json.loads((out / ablations.INFO_FILE).read_text())
    assert info["same_as"] == {"agent.horizon=2": "base"} and info["sets"] == ["agent.tau=0.01"]
    # rerun: the one trial killed at 100 of 200 steps resumes, the 49 finished ones are skipped
    assert ablations.main(argv) == 0
    assert calls[1] == ["agent.steve=false-s3"]
    assert ablations.main(argv) == 0 and len(calls) == 2  # everything done: the runner is not called
    rows = results_csv.read_rows(out / "evaluations.csv")
    assert len(rows) == 50 * 2 and all(r["command"].startswith("python") and r["commit"] for r in rows)

    results = tmp_path / "results"
    lines = ablations.report("tiny", out, results=results, command="python benchmarks/ablations.py report")
    csv_rows = results_csv.read_rows(results / "ablations_tiny.csv")
    assert tuple(csv_rows[0]) == ablations.COLUMNS
    assert [(r["variant"], r["env_step"]) for r in csv_rows[:4]] == [
        ("base", "100"), ("base", "200"), ("agent.horizon=0", "100"), ("agent.horizon=0", "200")]
    at = {(r["variant"], int(r["env_step"])): r for r in csv_rows}
    finals = [100.0 + s for s in SEEDS]
    a = stats.aggregate(finals)
    base = at[("base", 200)]
    assert float(base["iqm"]) == pytest.approx(a["iqm"], rel=1e-5) == pytest.approx(102.0)
    assert (float(base["ci_low"]), float(base["ci_high"])) == (pytest.approx(a["ci_low"], rel=1e-5),
                                                               pytest.approx(a["ci_high"], rel=1e-5))
    assert base["n"] == "5" and base["seeds"] == "0 1 2 3 4" and float(base["share"]) == 1.0
    assert float(at[("base", 100)]["iqm"]) == pytest.approx(51.0)
    alias = at[("agent.horizon=2", 200)]  # the config's horizon: full MAAC's numbers, marked as the same
    assert alias["same_as"] == "base" and alias["iqm"] == base["iqm"]
    assert "benchmarks/ablations.py report" in base["report_command"] and base["command"].startswith("python")

    text = "\n".join(lines)
    assert "| full MAAC | – | 51.0 [" in text
    assert f"{a['iqm']:.1f} [{a['ci_low']:.1f}, {a['ci_high']:.1f}] (n=5) |" in text
    assert "| H = 2 (= full MAAC) | `agent.horizon=2` |" in text
    sentences = {line.split("**")[1]: line for line in lines if line.startswith("- **")}
    assert "full MAAC ranks above it (disjoint CIs)" in sentences["H = 0 (no model in the policy objective)"]
    assert "consistent with it." in sentences["H = 0 (no model in the policy objective)"]
    assert "the CIs overlap (full MAAC's IQM higher by 1.0)" in sentences["−STEVE"]
    assert sentences["−STEVE"].endswith("consistent with it.") and "NOT" not in sentences["−STEVE"]
    assert "the CIs overlap (full MAAC's IQM lower by 1.0)" in sentences["single sample"]
    assert "full MAAC ranks BELOW it" in sentences["no entropy"] and "NOT consistent" in sentences["no entropy"]
    assert "above" in sentences["real data only"] and "NOT" not in sentences["real data only"]
    assert "(earlier budgets: 100: above)" in sentences["real data only"]
    assert "the same config as full MAAC" in sentences["H = 2"]
    assert "no return ablation" in sentences["H = 1"]
    assert sentences["Horizons"].startswith(
        "- **Horizons** at 200 env steps, by IQM: H = 2 (102.0) > H = 3 (92.0) > H = 4 (62.0)")
    assert "is inside the range 0–5" in sentences["Horizons"] and "consistent with it." in sentences["Horizons"]

    # benchmarks/report.py renders the same table into the marker pair
    generated = report.tables(results, None)
    assert generated["ablations_tiny"] == lines[2:]
    md = "x\n<!-- table:ablations_tiny:begin -->\n<!-- table:ablations_tiny:end -->\n"
    filled, missing = report.fill_markers(md, generated)
    assert not missing and "full MAAC ranks above it" in filled


def test_budgets_snap_down_to_evaluated_steps_and_verdicts_need_two_seeds() -> None:
    assert ablations.budget_steps([500, 1000, 1500, 2000, 2500, 5000], 5000, (0.25, 0.5, 1.0)) == [
        (0.25, 1000), (0.5, 2500), (1.0, 5000)]
    assert ablations.budget_steps([1000, 2000], 2000, (0.25, 0.5, 1.0)) == [(0.5, 1000), (1.0, 2000)]
    row = {"n": "1", "ci_low": "0", "ci_high": "1"}
    assert report.ablation_verdict(row, {**row, "n": "5"}) is None
    full = {"n": "5", "ci_low": "10", "ci_high": "20"}
    assert report.ablation_verdict(full, {"n": "5", "ci_low": "0", "ci_high": "9.9"}) == "above"
    assert report.ablation_verdict(full, {"n": "5", "ci_low": "20", "ci_high": "30"}) == "overlap"
    assert report.ablation_verdict(full, {"n": "5", "ci_low": "20.1", "ci_high": "30"}) == "below"


def test_report_without_a_study_says_how_to_run_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ablations.main(["report", "--task", "inverted_pendulum", "--out", str(tmp_path / "none")]) == 2
    assert "benchmarks/ablations.py run --task inverted_pendulum" in capsys.readouterr().err
