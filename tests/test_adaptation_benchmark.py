"""`benchmarks/adaptation.py --quick` end to end on a tiny deployable InvertedPendulum run, so the issue-22 script
cannot rot: sims on free loopback ports, control/export/finetune through the CLI, the fresh run in-process on the
perturbed env, the rows it writes and the tables `report.py` renders from them (~1-2 min on 2 cores)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import yaml
from tiny_configs import deployable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_quick_path_measures_every_row_and_the_report_renders_them(tmp_path: Path) -> None:
    from maac_robot.learn.config import config_from_dict
    from maac_robot.learn.trainer import train

    adaptation = importlib.import_module("adaptation")
    report = importlib.import_module("report")
    results_csv = importlib.import_module("results_csv")
    cfg = deployable()
    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train(config_from_dict(cfg), tmp_path / "nominal-s0", progress=False)
    out = tmp_path / "results" / "adaptation_inverted_pendulum.csv"
    common = ["--config", str(config), "--seeds", "0", "--nominal", str(tmp_path / "nominal-s{seed}"),
              "--work", str(tmp_path / "work"), "--out", str(out), "--quick", "--timeout", "300"]
    assert adaptation.main([*common, "--perturb", "body_mass_scale.pole=3", "--perturb",
                            "actuator_gain_scale=0.5"]) == 0
    assert adaptation.main([*common, "--screen", "actuator_gain_scale=0.5"]) == 0

    rows = results_csv.read_rows(out)
    got = {(r["measure"], r["condition"]) for r in rows}
    for condition in ("nominal:policy", "nominal:cem_guard", "perturbed:policy", "perturbed:cem",
                      "perturbed:cem_guard", "ft40:policy", "ft40:cem_guard", "ft80:policy", "ft80:cem_guard"):
        assert ("return", condition) in got, condition
    assert {("model_nmse", "nominal"), ("model_nmse", "ft40"), ("model_nmse", "ft80"), ("fresh_steps", "reach"),
            ("guarded_share", "perturbed:cem_guard"), ("recorded_steps", "data")} <= got
    assert any(m == "fresh_return" for m, _ in got)
    assert {r["perturbation"] for r in rows if r["measure"] == "return"} == {
        "body_mass_scale.pole=3,actuator_gain_scale=0.5"}
    assert {r["perturbation"] for r in rows if r["measure"] == "screen_return"} == {"nominal",
                                                                                   "actuator_gain_scale=0.5"}
    assert all(r["command"] and r["commit"] for r in rows)
    nmse = [float(r["value"]) for r in rows if r["measure"] == "model_nmse"]
    assert all(x >= 0 for x in nmse)
    recorded = next(r for r in rows if r["measure"] == "recorded_steps")
    assert float(recorded["value"]) >= 80

    tables = report.tables(out.parent, None)
    assert "adaptation_inverted_pendulum" in tables and "adaptation_screen_inverted_pendulum" in tables
    text = "\n".join(tables["adaptation_inverted_pendulum"])
    assert "finetuned on 40 recorded steps" in text and "Fresh run on the perturbed env" in text
