"""benchmarks/sample_efficiency.py report helpers: target verdicts, legend names, the learning-curve PNG."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from maac_robot.learn.plotting import plot_learning_curves

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_efficiency.py"
_spec = importlib.util.spec_from_file_location("sample_efficiency", _PATH)
sample_efficiency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_efficiency)


def _run(seed: int, returns: list[float], planned: int, every: int = 1000) -> dict[str, Any]:
    return {"meta": {"seed": seed, "planned_steps": planned},
            "rows": [{"env_step": every * (i + 1), "eval_return_mean": r} for i, r in enumerate(returns)]}


@pytest.mark.parametrize(("runs", "budget", "expected"), [
    # the mean of the two seeds first reaches 100 at 3000 (seed 1 alone already at 2000)
    ([_run(0, [0, 50, 100], 3), _run(1, [0, 140, 100], 3)], 3000, "reached at 3000 env steps (meets it)"),
    ([_run(0, [0, 50, 100], 3)], 2000, "reached at 3000 env steps (misses it)"),
    ([_run(0, [0, 50, 60], 3)], 3000, "not reached by 3000 (misses it)"),
    ([_run(0, [0, 50], 5000)], 3000, "not reached by 2000 (open: the runs continue to 5000)"),
    ([_run(0, [0, 50], 2000)], 3000, "not reached by 2000 (not run to 3000)"),
])
def test_target_verdict_calls_a_miss_only_when_the_runs_got_to_the_budget(runs, budget, expected) -> None:
    verdict = sample_efficiency._target_verdict(runs, 100.0, budget)
    assert verdict.startswith(f"mean over seeds {expected}")


def test_target_verdict_names_each_seeds_first_hit() -> None:
    verdict = sample_efficiency._target_verdict([_run(0, [0, 50, 100], 3), _run(1, [0, 140, 100], 3)], 100.0, 3000)
    assert verdict.endswith("per seed: seed 0: 3000, seed 1: 2000")


def test_target_verdict_says_when_the_mean_that_reached_it_is_over_fewer_seeds() -> None:
    # seed 10 stopped at 2000; the "mean" at 3000 is seed 2's alone, and seeds sort as numbers
    verdict = sample_efficiency._target_verdict([_run(10, [0, 50], 2), _run(2, [0, 50, 100], 3)], 100.0, 3000)
    assert "reached at 3000 env steps (a mean over 1 of its 2 seeds: the others stopped earlier) (meets it)" in verdict
    assert verdict.endswith("per seed: seed 2: 3000, seed 10: not by 2000")


def test_legend_name_abbreviates_overrides() -> None:
    assert sample_efficiency._legend_name("sac") == "SAC"
    assert sample_efficiency._legend_name("maac[num_samples=1,updates_per_step=2,precision=bfloat16,horizon=10]") \
        == "MAAC [ns=1, ups=2, bf16, horizon=10]"


def test_learning_curve_png_with_targets(tmp_path: Path) -> None:
    path = tmp_path / "curve.png"
    plot_learning_curves({"MAAC, 1 seed": ([1000, 2000], [10.0, 20.0], [0.0, 0.0])}, path, "t",
                         targets=[(50.0, 2000), (100.0, 5000)], members={"MAAC, 1 seed": [([1000, 2000], [10, 20])]},
                         partial={"MAAC, 1 seed": ([2000, 3000], [20.0, 30.0])})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))  # written atomically: no temporary left behind


def _diagnosed_episode(**extra: Any) -> dict[str, Any]:
    return {"return": 1050.0, "length": 1000, "final_state": {"x": 0.4}, "elites_predicting_end": {},
            "stochastic_return": 1052.0, "q_start": 173.0, "soft_return_start": 80.0, "q_bias_mean": 88.0, **extra}


def test_diagnosis_table_shows_the_model_return_and_tolerates_rows_diagnosed_before_it() -> None:
    new = {"run": "benchmarks/runs/hopper/a", "env_step": 20000, "episodes": [
        _diagnosed_episode(model_return={"predicted": 4.0, "real": 4.5}, model_return_steps=4),
        _diagnosed_episode(model_return={"predicted": 5.0, "real": 4.5}, model_return_steps=4)]}
    old = {"run": "benchmarks/runs/hopper/b", "env_step": 12000, "episodes": [_diagnosed_episode()]}
    rows = [line for line in sample_efficiency._diagnosis_table({"runs": [new, old]}) if line.startswith("| hopper/")]
    assert "| 4.50 / 4.50 (H=4) |" in rows[0] and "| – |" in rows[1]
    assert all(row.count("|") == rows[0].count("|") for row in rows)  # same columns either way


def test_probe_fit_lines_set_the_data_beside_the_frozen_policys_episodes() -> None:
    fit = {"D_env, last 1000 steps": {"rows": 1000, "reward": 1.734, "terminal": 0.003, "q": 122.8, "target": 125.0}}
    lines = sample_efficiency._probe_fit_lines({"fit_at_checkpoint": fit, "episode_steps": 5000, "episode_reward": 1.052})
    assert "| D_env, last 1000 steps | 1000 | 1.734 | 0.0030 | 122.8 | 125.0 |" in lines
    assert "| the frozen policy's stochastic episodes | 5000 | 1.052 | | | |" in lines
    assert sample_efficiency._probe_fit_lines({}) == []  # probes from before the fit check


def test_a_run_marked_stopped_is_not_called_open(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "meta.json").write_text('{"seed": 0, "planned_steps": 5000}')
    (run_dir / "metrics.jsonl").write_text('{"env_step": 1000, "eval_return_mean": 0}\n{"env_step": 2000, "eval_return_mean": 50}\n')
    stopped = sample_efficiency.mark_stopped(run_dir, "a negative result")
    assert stopped["env_step"] == 2000 and stopped["why"] == "a negative result"
    meta = sample_efficiency.json.loads((run_dir / "meta.json").read_text())
    runs = [{"meta": meta, "rows": [{"env_step": 1000, "eval_return_mean": 0}, {"env_step": 2000, "eval_return_mean": 50}]}]
    assert "(not run to 3000)" in sample_efficiency._target_verdict(runs, 100.0, 3000)


def test_entropy_pressure_table_one_row_per_checkpoint() -> None:
    row = {"run": "benchmarks/runs/half_cheetah/a", "env_step": 16000, "alpha": 0.3047, "push": 1.4846,
           "pull_by_step": [-1.4998, -0.1078, -0.028, -0.0193, -0.0212],
           "pull_first_step": {"rewards_only": -0.0819, "terminal_q_only": -1.4179},
           "pull_first_step_by_horizon": {"0": -0.0645, "1": -0.2784, "2": -0.6643, "4": -1.4998}}
    lines = sample_efficiency._entropy_pressure_table({"runs": [row, {**row, "env_step": 20000}]})
    rows = [line for line in lines if line.startswith("| half_cheetah/a |")]
    assert len(rows) == 2 and "| 16000 | 0.305 | +1.485 |" in rows[0] and "| 20000 |" in rows[1]
    assert "-0.082 / -1.418" in rows[0] and "-0.065 / -0.278 / -0.664 / -1.500 (H=4)" in rows[0]
    header = next(line for line in lines if line.startswith("| run |"))
    assert all(r.count("|") == header.count("|") for r in rows)


@pytest.mark.parametrize(("relpath", "ignored"), [
    ("checkpoints/latest.pt", True),  # large, and only needed to resume on the machine that trained
    ("checkpoints/latest.pt.tmp", True),
    ("train.log", True),
    ("learning_curve.png", True),
    ("metrics.jsonl", False),  # the record the report is built from: committed, so a lost machine loses no result
    ("meta.json", False),
    ("config.yaml", False),
])
def test_benchmark_run_records_are_committed_and_checkpoints_are_not(relpath: str, ignored: bool) -> None:
    git = shutil.which("git")
    root = _PATH.parents[1]
    if git is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    path = sample_efficiency.RUNS / "hopper" / "maac[num_samples=1]-s0" / relpath
    result = subprocess.run([git, "check-ignore", "-q", "--no-index", str(path.relative_to(root))], cwd=root)
    assert result.returncode == (0 if ignored else 1), f"{relpath}: git check-ignore exit {result.returncode}"


def _maac_records() -> list[Path]:
    return sorted(p.parent for p in sample_efficiency.RUNS.glob("*/maac*/config.yaml"))


@pytest.mark.parametrize("run_dir", _maac_records(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_committed_runs_label_names_what_its_config_changes(run_dir: Path) -> None:
    """The report groups runs by label and reads each label against configs/<task>.yaml as it is now; a
    config change that is not followed by renaming the earlier runs would make their labels lie."""
    label = sample_efficiency._run_label(run_dir)
    variant = sample_efficiency.config_variant(run_dir.parent.name, run_dir / "config.yaml")
    assert sample_efficiency.label_matches(label, variant), f"{run_dir.name} ran {variant}"


def test_label_matching_reads_values_and_keys() -> None:
    variant = {"agent.tau": 0.02, "agent.lr": 0.001}
    assert sample_efficiency.label_matches("maac[lr=1e-3,tau=0.02]", variant)
    assert not sample_efficiency.label_matches("maac[tau=0.02]", variant)
    assert not sample_efficiency.label_matches("maac[lr=1e-3,tau=0.05]", variant)
    assert sample_efficiency.label_matches("maac", {})
    assert sample_efficiency.label_matches("maac-contact-inputs", {})


def test_config_variant_ignores_seed_budget_and_threads(tmp_path: Path) -> None:
    from maac_robot.learn.config import load_config, save_config

    cfg = load_config(sample_efficiency.ROOT / "configs" / "hopper.yaml",
                      {"train.seed": 3, "train.total_steps": 7, "train.num_threads": 2, "agent.tau": 0.5})
    save_config(cfg, tmp_path / "config.yaml")
    assert sample_efficiency.config_variant("hopper", tmp_path / "config.yaml") == {"agent.tau": 0.5}


def test_a_record_that_cannot_be_continued_is_not_overwritten(tmp_path: Path) -> None:
    run_dir = tmp_path / "maac-s0"
    run_dir.mkdir()
    record = '{"env_step": 500, "eval_return_mean": 14.2}\n'
    (run_dir / "metrics.jsonl").write_text(record)
    for algo in ("maac", "sac"):  # MAAC: its checkpoint is on another machine; SAC: never resumed
        with pytest.raises(SystemExit, match="1 evaluations, to env step 500"):
            sample_efficiency._claim_record(run_dir, algo, restart=False)
        assert (run_dir / "metrics.jsonl").read_text() == record
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"x")
    sample_efficiency._claim_record(run_dir, "maac", restart=False)  # resumable: left for the trainer
    assert (run_dir / "metrics.jsonl").is_file()
    sample_efficiency._claim_record(run_dir, "maac", restart=True)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    sample_efficiency._claim_record(tmp_path / "new-s0", "sac", restart=False)  # nothing there: nothing to do


def test_run_labels_follow_the_config_not_the_command_line() -> None:
    def label(overrides: dict[str, Any]) -> str:
        resolved = sample_efficiency._config("inverted_pendulum", 0, 100, 1, overrides).model_dump(mode="json")
        return sample_efficiency._label("maac", sample_efficiency._variant("inverted_pendulum", resolved))

    steve = sample_efficiency._config("inverted_pendulum", 0, 100).agent.steve_horizon
    assert label({"agent.steve_horizon": steve}) == "maac"  # restating the config is no variant
    assert label({"agent.tau": 0.02, "model.train_every": 100}) == label({"model.train_every": 100, "agent.tau": 0.02})
    assert label({"agent.lr": "1e-3"}) == "maac[lr=0.001]"


def test_run_refuses_to_resume_a_record_whose_label_went_stale(tmp_path: Path) -> None:
    from maac_robot.learn.config import save_config

    run_dir = tmp_path / "maac-s0"  # says "the config as it is now"...
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"x")
    steve = sample_efficiency._config("inverted_pendulum", 0, 100).agent.steve_horizon
    ran = sample_efficiency._config("inverted_pendulum", 0, 100, 1, {"agent.steve_horizon": steve + 1})
    save_config(ran, run_dir / "config.yaml")  # ...but it ran another STEVE horizon
    with pytest.raises(SystemExit, match="no longer names"):
        sample_efficiency.run_maac("inverted_pendulum", 0, 100, run_dir, 1, {})
    assert not (run_dir / "meta.json").exists()  # refused before touching the record
