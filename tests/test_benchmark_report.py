"""benchmarks/: the result CSVs, the report that rebuilds RESULTS.md from them, and the SAC baseline's policy.

Everything here runs on synthetic rows written to tmp_path: no test reads committed experiment output.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

results_csv = importlib.import_module("results_csv")
report = importlib.import_module("report")
sample_efficiency = importlib.import_module("sample_efficiency")


def _rows(variant: str, seed: int, returns: list[float], every: int = 1000, digest: str = "d1",
          **extra: Any) -> list[dict[str, Any]]:
    algo = variant.partition("[")[0]
    return [{"task": "hopper", "algo": algo, "variant": variant, "seed": seed, "env_step": every * (i + 1),
             "eval_return_mean": r, "eval_return_std": 0.0, "train_cpu_s": 100.0 * (i + 1), "config_digest": digest,
             "command": "python benchmarks/sample_efficiency.py --task hopper", "commit": "abc1234", **extra}
            for i, r in enumerate(returns)]


def _groups(tmp_path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    path = tmp_path / "sample_efficiency_hopper.csv"
    results_csv.write_rows(path, rows, results_csv.EVAL_COLUMNS)
    return report.groups(results_csv.read_rows(path))


def test_iqm_drops_a_quarter_each_side_and_is_the_mean_below_four_values() -> None:
    assert report.iqm([0, 10, 20, 1000]) == 15.0  # the lowest and highest of four dropped
    assert report.iqm([1, 2, 3, 4, 5, 6, 7, 100]) == 4.5  # two each side of eight
    assert report.iqm([1.0, 2.0, 6.0]) == 3.0


def test_csv_rows_round_trip_with_empty_cells_for_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    results_csv.write_rows(path, _rows("maac", 0, [1.5, 2.5]), results_csv.EVAL_COLUMNS)
    rows = results_csv.read_rows(path)
    assert [r["eval_return_mean"] for r in rows] == ["1.5", "2.5"]
    assert rows[0]["critic_bias"] == "" and rows[0]["commit"] == "abc1234"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    assert results_csv.read_rows(tmp_path / "absent.csv") == []


def test_replace_run_replaces_one_run_and_keeps_the_provenance_of_unchanged_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    results_csv.replace_run(path, _rows("maac", 0, [10.0, 20.0]))
    results_csv.replace_run(path, _rows("sac", 0, [5.0]))
    # resumed: the first two evaluations are the same, a third is new; then a second command and commit
    resumed = _rows("maac", 0, [10.0, 20.0, 30.0], commit="def5678", command="python second")
    results_csv.replace_run(path, resumed)
    rows = results_csv.read_rows(path)
    maac = [r for r in rows if r["variant"] == "maac"]
    assert [r["commit"] for r in maac] == ["abc1234", "abc1234", "def5678"]
    assert [r["variant"] for r in rows].count("sac") == 1  # another run's rows stay
    restarted = _rows("maac", 0, [11.0], commit="fff0000")  # a new run from scratch: new values, new provenance
    results_csv.replace_run(path, restarted)
    maac = [r for r in results_csv.read_rows(path) if r["variant"] == "maac"]
    assert [(r["env_step"], r["commit"]) for r in maac] == [("1000", "fff0000")]
    with pytest.raises(ValueError, match="one run"):
        results_csv.replace_run(path, [*_rows("maac", 0, [1.0]), *_rows("maac", 1, [1.0])])


def test_config_digest_ignores_seed_budget_threads_and_the_robot_side_sections() -> None:
    base = {"agent": {"tau": 0.005}, "train": {"seed": 0, "total_steps": 10, "num_threads": 1, "eval_every": 5},
            "sim": {"port": 1}}
    same = {"agent": {"tau": 0.005}, "train": {"seed": 3, "total_steps": 99, "num_threads": 2, "eval_every": 5},
            "sim": {"port": 2}}
    assert results_csv.config_digest(base) == results_csv.config_digest(same)
    assert results_csv.config_digest(base) != results_csv.config_digest({**base, "agent": {"tau": 0.02}})


def test_summary_table_gives_mean_std_and_iqm_over_seeds_and_the_ratio_to_sac(tmp_path: Path) -> None:
    rows = [*_rows("maac", 0, [0, 100, 200]), *_rows("maac", 1, [0, 300, 400]), *_rows("maac", 2, [0, 500, 600]),
            *_rows("maac", 3, [0, 700, 2000]), *_rows("sac", 0, [0, 0, 0, 250])]
    found = _groups(tmp_path, rows)
    lines = report.summary_table("hopper", found)
    maac = next(line for line in lines if line.startswith("| MAAC |"))
    values = [200, 400, 600, 2000]
    assert f"{np.mean(values):.0f} ± {np.std(values):.0f} (500) at 3000, n=4" in maac  # IQM drops 200 and 2000
    assert "| 0.50 (2000 / 4000) |" in maac  # MAAC's mean (375) first reaches SAC's final 250 at 2000
    assert maac.endswith("| 100 |")  # training CPU seconds per 1000 env steps
    assert report.milestone_table("hopper", found) == []  # no run reached a milestone step: no empty table


def test_milestone_table_has_the_milestone_steps_some_run_reached(tmp_path: Path) -> None:
    found = _groups(tmp_path, [*_rows("maac", 0, [10, 20, 30], every=5000), *_rows("maac", 1, [30, 40], every=5000),
                               *_rows("sac", 0, [1, 2, 3, 4, 5, 6], every=5000)])
    lines = report.milestone_table("hopper", found)
    assert lines[0] == "| variant | 5000 | 10000 | 15000 | 20000 | 30000 |"  # 25000 is no milestone
    assert lines[2] == "| MAAC | 20 ± 10 (n=2) | 30 ± 10 (n=2) | 30 ± 0 (n=1) |  |  |"


@pytest.mark.parametrize(("returns", "budget", "expected"), [
    ([0, 50, 100], 3000, "3000 ✓; 1 of 1 seeds by 3000 (1 ran to it)"),
    ([0, 50, 100], 2000, "3000; 0 of 1 seeds by 2000 (1 ran to it)"),
    ([0, 50, 60], 3000, "not by 3000; 0 of 1 seeds by 3000 (1 ran to it)"),
    ([0, 50], 3000, "not run to 3000; 0 of 1 seeds by 3000 (0 ran to it)"),  # stopped early: not a miss
])
def test_target_cell_calls_a_miss_only_when_the_runs_got_to_the_budget(tmp_path: Path, returns: list[float],
                                                                        budget: int, expected: str) -> None:
    group = _groups(tmp_path, _rows("maac", 0, returns))["maac"]
    assert report.target_cell(group, 100.0, budget) == expected


def test_target_cell_says_when_the_mean_that_reached_it_is_over_fewer_seeds(tmp_path: Path) -> None:
    group = _groups(tmp_path, [*_rows("maac", 10, [0, 50]), *_rows("maac", 2, [0, 50, 100])])["maac"]
    assert report.target_cell(group, 100.0, 3000).startswith("3000 (n=1) ✓; 1 of 2 seeds")


def test_a_label_that_ran_under_two_configs_is_not_averaged_across_them(tmp_path: Path) -> None:
    found = _groups(tmp_path, [*_rows("maac", 0, [1.0], digest="aaa"), *_rows("maac", 1, [3.0], digest="bbb")])
    assert set(found) == {"maac @aaa", "maac @bbb"}
    assert found["maac @aaa"].at(1000) == [1.0]


def test_legend_name_abbreviates_overrides() -> None:
    assert report.legend_name("sac") == "SAC"
    assert report.legend_name("maac[num_samples=1,updates_per_step=2,precision=bfloat16,horizon=10]") \
        == "MAAC [ns=1, ups=2, bf16, horizon=10]"


def test_fill_markers_replaces_only_between_markers_and_is_idempotent() -> None:
    text = ("# R\nprose before\n<!-- table:a:begin -->\nold\n<!-- table:a:end -->\nprose between\n"
            "<!-- table:b:begin -->\nkept\n<!-- table:b:end -->\n")
    new, missing = report.fill_markers(text, {"a": ["| x |", "|---|"]})
    assert "<!-- table:a:begin -->\n| x |\n|---|\n<!-- table:a:end -->" in new
    assert "prose before" in new and "prose between" in new and "old" not in new
    assert missing == ["b"] and "kept" in new  # no data: the table is left as it was
    assert report.fill_markers(new, {"a": ["| x |", "|---|"]})[0] == new


def test_report_rebuilds_the_markdown_and_the_figure_from_csvs_alone(tmp_path: Path) -> None:
    results = tmp_path / "results"
    rows = [*_rows("maac", 0, [0, 1000, 3000]), *_rows("maac", 1, [0, 500, 1000]), *_rows("sac", 0, [0, 0, 100])]
    results_csv.write_rows(results_csv.eval_csv("hopper", results), rows, results_csv.EVAL_COLUMNS)
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text("intro\n<!-- table:sample_efficiency_hopper:begin -->\n<!-- table:sample_efficiency_hopper:end -->\n")
    assert report.main(["--results", str(results), "--markdown", str(markdown), "--check"]) == 1  # stale
    generated = report.tables(results, figures=tmp_path)
    new, _ = report.fill_markers(markdown.read_text(), generated)
    markdown.write_text(new)
    assert "| MAAC | 0, 1 | 2000 ± 1000 (2000) at 3000, n=2 |" in new
    assert "sample_efficiency_hopper.csv" in new
    assert report.main(["--results", str(results), "--markdown", str(markdown), "--check"]) == 0
    assert (tmp_path / "hopper_learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_archived_means_render_and_plot(tmp_path: Path) -> None:
    rows = [{"task": "hopper", "variant": "maac[precision=bfloat16]", "env_step": s, "return_mean": m,
             "return_std": 1.0, "n_seeds": 2, "seeds": "seed 0, seed 1", "command": "c", "source": "s"}
            for s, m in ((5000, 90.0), (10000, 1020.0))]
    found = report.archived_groups(rows, "hopper")
    lines = report.archived_table("hopper", found)
    assert lines[0] == "| variant | seeds | 5000 | 10000 |"
    assert "| MAAC[precision=bfloat16] | seed 0, seed 1 | 90 ± 1 (n=2) | 1020 ± 1 (n=2) |" in lines
    report.plot_archived("hopper", found, tmp_path / "a.png")
    assert (tmp_path / "a.png").is_file()


def test_training_cost_tables_read_long_rows() -> None:
    stamp = {"command": "python benchmarks/profile_update.py", "commit": "abc", "date": "d", "cpu": "c", "threads": "1"}
    rows = [{"kind": "per_1000_steps", "item": "G2 updates", "value": "90", "unit": "cpu_s", **stamp},
            {"kind": "per_1000_steps", "item": "G2 updates", "value": "180", "unit": "wall_s", **stamp},
            {"kind": "per_1000_steps", "item": "env steps", "value": "10", "unit": "cpu_s", **stamp},
            {"kind": "per_1000_steps", "item": "env steps", "value": "20", "unit": "wall_s", **stamp},
            {"kind": "update_cost", "item": "the config's settings", "value": "10.3", "unit": "gflop", **stamp},
            {"kind": "update_cost", "item": "the config's settings", "value": "180", "unit": "cpu_ms", **stamp},
            {"kind": "update_cost", "item": "the config's settings", "value": "1439", "unit": "cpu_s_per_1000_env_steps",
             **stamp}]
    profile = report.profile_table(rows)
    assert "| G2 updates | 90.0 | 90 % | 180.0 |" in profile and "| **total** | **100.0** | target ≤ 150 s | 200.0 |" in profile
    assert "| the config's settings | 10.3 | 180 | 1439 |" in report.update_cost_table(rows)
    assert report.profile_table([]) == [] and report.update_cost_table([]) == []


def test_train_speed_table_one_row_per_setting_with_its_window(tmp_path: Path) -> None:
    train_speed = importlib.import_module("train_speed")
    stamp = {"command": "python benchmarks/train_speed.py", "commit": "abc", "date": "d", "cpu": "c", "threads": "1",
             "versions": "v"}
    values = {"gflop": 0.4, "cpu_ms": 20.0, "matmul_gflop_per_s": 40.0, "floor_ms": 10.0, "floor_ratio": 2.0,
              "env_steps_per_s": 12.5, "update_share": 0.9, "sac_s_per_1000": 8.0, "maac_over_sac": 10.0,
              "load_1min": 1.5}
    rows = [{"setting": "inverted_pendulum", "item": k, "value": v, "unit": "u", "window": 2000, **stamp}
            for k, v in values.items()]
    path = tmp_path / "train_speed.csv"
    results_csv.write_rows(path, rows, train_speed.COLUMNS)
    table = report.train_speed_table(results_csv.read_rows(path))
    assert "| inverted_pendulum | 0.40 | 20.0 | 40.0 | 2.0 | 12.5 (2000) | 0.90 / – / – / – | 8.0 | 10.0 | 1.5 |" in table
    assert "- `python benchmarks/train_speed.py` at abc on c, d" in table
    assert report.train_speed_table([]) == []


def test_demo_timing_table_counts_the_seeds_that_balanced_in_time(tmp_path: Path) -> None:
    demo_timing = importlib.import_module("demo_timing")
    stamp = {"command": "python benchmarks/demo_timing.py", "commit": "abc", "cpu": "c", "date": "d", "stop_return": 1000}
    rows = [{"seed": 1, "total_s": 591.0, "train_s": 491.0, "export_s": 15.0, "episodes_s": 85.0, "env_steps": 4000,
             "policy_eval": 263.0, "cem_returns": "1000 1000", "load_1min": 1.0, **stamp},
            {"seed": 0, "total_s": 230.0, "train_s": 140.0, "export_s": 10.0, "episodes_s": 80.0, "env_steps": 3000,
             "policy_eval": 1000.0, "cem_returns": "1000 612", "load_1min": 1.0, **stamp}]
    path = tmp_path / "demo_timing.csv"
    results_csv.write_rows(path, rows, demo_timing.COLUMNS)
    table = report.demo_timing_table(results_csv.read_rows(path))
    assert table[2].startswith("| 0 | 230 | 140 | 3000 |") and "| 1000 1000 |" in table[3]
    assert "Every CEM-MPC episode at 1000 on 1 of 2 seeds; within 240 s as well on 0" in table[-4]
    assert report.demo_timing_table([]) == []



def test_finetune_screen_table_orders_by_seed_data_and_rounds(tmp_path: Path) -> None:
    screen = importlib.import_module("finetune_screen")
    stamp = {"task": "inverted_pendulum", "perturbation": "damping_scale=10", "command": "python x", "commit": "abc",
             "cpu": "c", "date": "d", "d_model": 40000, "seconds": 70}
    rows = [{**stamp, "seed": 0, "record_steps": 5000, "variant": "default", "rounds": 500, "d_env_env": 5500,
             "d_env_recorded": 5000, "perturbed_return": 320.0, "returns": "207.0 547.0 206.0"},
            {**stamp, "seed": 0, "record_steps": 1000, "variant": "none", "rounds": 500, "d_env_env": 5500,
             "d_env_recorded": 0, "perturbed_return": 153.0, "returns": "149.0 161.0 149.0"}]
    path = tmp_path / "finetune_screen_inverted_pendulum.csv"
    results_csv.write_rows(path, rows, screen.COLUMNS)
    table = report.finetune_screen_table(results_csv.read_rows(path))
    assert table[4] == "| 0 | 1000 | none | 500 | 5500 / 0 | 40000 | 153.0 | 149.0 161.0 149.0 |"
    assert table[5].startswith("| 0 | 5000 | default | 500 | 5500 / 5000 |") and "`python x` at abc" in table[-1]
    assert "finetune_screen_inverted_pendulum" in report.tables(tmp_path, figures=None)
    assert report.finetune_screen_table([]) == []

def _diagnosed_episode(**extra: Any) -> dict[str, Any]:
    return {"return": 1050.0, "length": 1000, "final_state": {"x": 0.4}, "elites_predicting_end": {},
            "stochastic_return": 1052.0, "q_start": 173.0, "soft_return_start": 80.0, "q_bias_mean": 88.0, **extra}


def test_diagnosis_table_shows_the_model_return_and_tolerates_rows_diagnosed_before_it() -> None:
    new = {"run": "benchmarks/runs/hopper/a", "env_step": 20000, "episodes": [
        _diagnosed_episode(model_return={"predicted": 4.0, "real": 4.5}, model_return_steps=4),
        _diagnosed_episode(model_return={"predicted": 5.0, "real": 4.5}, model_return_steps=4)]}
    old = {"run": "benchmarks/runs/hopper/b", "env_step": 12000, "episodes": [_diagnosed_episode()]}
    rows = [line for line in report.diagnosis_table({"runs": [new, old]}) if line.startswith("| hopper/")]
    assert "| 4.50 / 4.50 (H=4) |" in rows[0] and "| – |" in rows[1]
    assert all(row.count("|") == rows[0].count("|") for row in rows)  # same columns either way


def test_probe_fit_lines_set_the_data_beside_the_frozen_policys_episodes() -> None:
    fit = {"D_env, last 1000 steps": {"rows": 1000, "reward": 1.734, "terminal": 0.003, "q": 122.8, "target": 125.0}}
    lines = report.probe_fit_lines({"fit_at_checkpoint": fit, "episode_steps": 5000, "episode_reward": 1.052})
    assert "| D_env, last 1000 steps | 1000 | 1.734 | 0.0030 | 122.8 | 125.0 |" in lines
    assert "| the frozen policy's stochastic episodes | 5000 | 1.052 | | | |" in lines
    assert report.probe_fit_lines({}) == []  # probes from before the fit check


def test_entropy_pressure_table_one_row_per_checkpoint() -> None:
    row = {"run": "benchmarks/runs/half_cheetah/a", "env_step": 16000, "alpha": 0.3047, "push": 1.4846,
           "pull_by_step": [-1.4998, -0.1078, -0.028, -0.0193, -0.0212],
           "pull_first_step": {"rewards_only": -0.0819, "terminal_q_only": -1.4179},
           "pull_first_step_by_horizon": {"0": -0.0645, "1": -0.2784, "2": -0.6643, "4": -1.4998}}
    lines = report.entropy_pressure_table({"runs": [row, {**row, "env_step": 20000}]})
    rows = [line for line in lines if line.startswith("| half_cheetah/a |")]
    assert len(rows) == 2 and "| 16000 | 0.305 | +1.485 |" in rows[0] and "| 20000 |" in rows[1]
    assert "-0.082 / -1.418" in rows[0] and "-0.065 / -0.278 / -0.664 / -1.500 (H=4)" in rows[0]
    assert all(r.count("|") == lines[0].count("|") for r in rows)


def test_run_labels_follow_the_config_not_the_command_line() -> None:
    def label(overrides: dict[str, Any]) -> str:
        cfg = sample_efficiency.resolved_config("inverted_pendulum", 0, 100, 1, overrides)
        return sample_efficiency.variant_label("maac", "inverted_pendulum", cfg.model_dump(mode="json"))

    steve = sample_efficiency.resolved_config("inverted_pendulum", 0, 100, 1, {}).agent.steve_horizon
    assert label({"agent.steve_horizon": steve}) == "maac"  # restating the config is no variant
    assert label({"agent.tau": 0.02, "model.train_every": 100}) == label({"model.train_every": 100, "agent.tau": 0.02})
    assert label({"agent.lr": "1e-3"}) == "maac[lr=0.001]"


def test_a_run_whose_rows_cannot_be_continued_is_not_overwritten(tmp_path: Path) -> None:
    csv_path = tmp_path / "sample_efficiency_hopper.csv"
    results_csv.write_rows(csv_path, _rows("sac", 0, [5.0]), results_csv.EVAL_COLUMNS)
    key = {"algo": "sac", "variant": "sac", "seed": 0, "config_digest": "d1"}
    run_dir = tmp_path / "sac-s0"
    with pytest.raises(SystemExit, match="already holds 1 evaluations"):
        sample_efficiency.claim(csv_path, run_dir, key, resumable=False, restart=False)
    run_dir.mkdir()
    sample_efficiency.claim(csv_path, run_dir, key, resumable=False, restart=True)  # --restart: a fresh run dir
    assert not run_dir.exists()
    (run_dir / "checkpoints").mkdir(parents=True)
    sample_efficiency.claim(csv_path, run_dir, key, resumable=True, restart=False)  # resumable: left to the trainer
    assert (run_dir / "checkpoints").is_dir()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sac_is_evaluated_by_the_librarys_episode_loop() -> None:
    from maac_robot.learn.evaluation import evaluate_policy

    class Model:  # SB3's predict signature: (action, state)
        def __init__(self) -> None:
            self.calls: list[bool] = []

        def predict(self, obs: np.ndarray, deterministic: bool = False) -> tuple[np.ndarray, None]:
            self.calls.append(deterministic)
            return np.zeros(1, dtype=np.float32), None

    model = Model()
    returns = evaluate_policy(sample_efficiency.sac_policy(model), "InvertedPendulum-v5", [0, 1], max_episode_steps=20)
    assert returns.shape == (2,) and np.all(returns > 0)  # one reward per step until the pole falls or 20 steps
    assert model.calls and all(model.calls)  # deterministic actions only
    action, entropy = sample_efficiency.sac_policy(model)(np.zeros(4))
    assert np.isnan(entropy)
