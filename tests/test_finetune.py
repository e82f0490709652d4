"""Robot data back into training: `control --record` over loopback, and `finetune` of a tiny InvertedPendulum run
on those recordings (D_env grows by exactly them, tagged; the ensemble refit; the original run untouched; the
new run exports), refusals of recordings of another env or state layout, and checkpoints from before the tag."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from maac_robot.learn.buffer import SOURCE_ENV, SOURCE_RECORDED, ReplayBuffer
from maac_robot.runtime.recording import Episode, RecordingError, load_episode, load_episodes, save_episode
from tiny_configs import deployable

ENV = "InvertedPendulum-v5"
EPISODE_STEPS = 30
TINY = deployable()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-step run, its artifacts, and `control --compare --record` against a lockstep sim that records too:
    2 policy and 2 CEM episodes of at most EPISODE_STEPS steps (train ~10 s, export ~25 s on 2 cores)."""
    from controller.run import control_from_cli
    from export_fixtures import train_and_export
    from sim_helpers import running_sim

    root = tmp_path_factory.mktemp("finetune")
    train_and_export(root, TINY)
    (root / "task.yaml").write_text(yaml.safe_dump(TINY))
    with running_sim(ENV, mode="lockstep", max_episode_steps=EPISODE_STEPS, record_dir=root / "sim_rec") as server:
        assert control_from_cli(artifacts=root / "artifacts", connect=server.endpoint, planner=None, episodes=2,
                                config=root / "task.yaml", seed=0, compare=True, record=root / "ctl_rec") == 0
    return root


# ---- control --record ------------------------------------------------------------------------------


def test_control_records_each_episode_as_the_controller_saw_it(recorded: Path):
    from controller.run import PLANNER_NAMES
    from maac_robot.runtime.artifacts import read_manifest

    manifest = read_manifest(recorded / "artifacts")
    files = sorted((recorded / "ctl_rec").glob("*.npz"))
    assert len(files) == 4 and sum("-policy-seed" in f.name for f in files) == 2, files
    sim_eps = load_episodes(recorded / "sim_rec")
    assert len(sim_eps) == 4 and all(e.source == "sim" for e in sim_eps)
    for f in files:
        ep = load_episode(f)
        m = ep.meta
        assert ep.source == "controller" and m["env_id"] == ENV and m["mode"] == "lockstep"
        assert (m["state_dim"], m["act_dim"]) == (manifest.state_dim, manifest.act_dim)
        assert m["state_layout"] == manifest.state_layout.model_dump(mode="json")
        manifest_bytes = (recorded / "artifacts" / "manifest.json").read_bytes()
        assert m["artifacts_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
        assert m["planner_names"] == list(PLANNER_NAMES) and m["robot_metadata"] == {}
        assert m["planner"] in ("policy", "cem") and m["seed"] in (0, 1)
        n = len(ep)
        assert 0 < n <= EPISODE_STEPS and ep.states.shape == (n, manifest.state_dim)
        np.testing.assert_array_equal(ep.states[1:], ep.next_states[:-1])  # one transition per robot step
        assert ep.truncated[-1] or ep.terminated[-1]
        assert set(ep.telemetry) == {"latency", "iterations", "disagreement", "guarded", "planner"}
        assert all(v.shape == (n,) for v in ep.telemetry.values())
        assert (ep.telemetry["latency"] > 0).all() and np.isfinite(ep.telemetry["disagreement"]).all()
        planners = {PLANNER_NAMES[c] for c in ep.telemetry["planner"]}
        if m["planner"] == "policy":
            assert planners <= {"policy", "guard_policy"} and (ep.telemetry["iterations"] == 0).all()
        else:
            assert "cem" in planners and ep.telemetry["iterations"].max() == 3
        assert np.array_equal(ep.telemetry["guarded"], np.isin(ep.telemetry["planner"], [3, 4]))
        for flag in ("predicted", "skipped", "substituted", "clipped", "held"):  # lockstep: every step exact
            assert not ep.flags[flag].any(), flag
        assert ep.usable_mask().all()
        # the very transitions the sim applied and recorded on its side
        twin = next(s for s in sim_eps if len(s) == n and np.allclose(s.states, ep.states))
        np.testing.assert_allclose(twin.actions, ep.actions, rtol=0, atol=1e-6)
        np.testing.assert_allclose(twin.next_states, ep.next_states)
        np.testing.assert_array_equal(twin.rewards, ep.rewards)
        np.testing.assert_array_equal(twin.terminated, ep.terminated)


def test_a_realtime_recording_of_a_perturbed_sim_flags_inexact_steps_and_keeps_the_perturbation(recorded: Path,
                                                                                                   tmp_path: Path):
    from controller.run import control_from_cli
    from sim_helpers import running_sim

    with running_sim(ENV, mode="realtime", max_episode_steps=EPISODE_STEPS, perturb={"mass_scale": 1.2}) as server:
        assert control_from_cli(artifacts=recorded / "artifacts", connect=server.endpoint, planner="policy",
                                episodes=1, config=recorded / "task.yaml", seed=0, compare=False,
                                record=tmp_path / "rec") == 0
    (ep,) = load_episodes(tmp_path / "rec")
    assert ep.meta["mode"] == "realtime" and ep.source == "controller"
    assert ep.meta["robot_metadata"]["perturbation"]["config"]["mass_scale"] == 1.2, ep.meta["robot_metadata"]
    assert "perturbation" in ep.meta  # this episode's draws, from its first observation
    for flag in ("predicted", "skipped", "substituted", "held", "late", "watchdog", "rejected", "clipped", "pushed"):
        assert ep.flags[flag].shape == (len(ep),)
    mask = ep.usable_mask()
    assert mask.sum() >= len(ep) // 2  # loopback: most ticks are exact
    assert not (mask & (ep.flags["skipped"] | ep.flags["predicted"] | ep.flags["substituted"])).any()


def test_the_cli_takes_record_for_control_and_finetune():
    from maac_robot.cli import build_parser

    args = build_parser().parse_args(["control", "--artifacts", "a", "--record", "rec"])
    assert args.record == Path("rec")
    args = build_parser().parse_args(["finetune", "run", "--data", "rec", "--out", "new", "--steps", "5"])
    assert (args.run, args.data, args.out, args.steps) == (Path("run"), Path("rec"), Path("new"), 5)


# ---- finetune --------------------------------------------------------------------------------------


def test_finetune_adds_the_recordings_to_a_copy_refits_and_the_copy_exports(recorded: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]):
    from maac_robot.commands import finetune_from_cli
    from maac_robot.learn.export import export_from_run
    from maac_robot.learn.trainer import RunPaths, load_checkpoint, read_metrics
    from maac_robot.runtime.artifacts import load_artifacts

    run, new = recorded / "run", tmp_path / "new"
    before = _tree_digest(run)
    old = load_checkpoint(RunPaths(run).checkpoint)
    episodes = load_episodes(recorded / "ctl_rec")
    total = sum(len(e) for e in episodes)

    assert finetune_from_cli(run, recorded / "ctl_rec", new, steps=20) == 0
    out = capsys.readouterr().out
    assert f"{total} recorded transitions from 4 episode(s)" in out and "20 G2 round(s) = 20 updates" in out, out

    assert _tree_digest(run) == before  # RUN untouched
    ckpt = load_checkpoint(RunPaths(new).checkpoint)
    d_old, d_new = old["d_env"], ckpt["d_env"]
    size = int(d_old["size"])
    assert int(d_new["size"]) == size + total and int(d_new["total_added"]) == int(d_old["total_added"]) + total
    source = d_new["source"].numpy()
    assert (source[:size] == SOURCE_ENV).all() and (source[size:] == SOURCE_RECORDED).all()
    np.testing.assert_allclose(d_new["state"].numpy()[size:], np.concatenate([e.states for e in episodes]), rtol=1e-6)
    np.testing.assert_allclose(d_new["action"].numpy()[size:], np.concatenate([e.actions for e in episodes]),
                               rtol=1e-6)
    torch.testing.assert_close(d_new["state"][:size], d_old["state"])  # the sim's rows as they were
    assert ckpt["env_step"] == old["env_step"]
    # the ensemble was refit, the agent updated
    changed = [k for k in old["model"] if not torch.equal(old["model"][k], ckpt["model"][k])]
    assert changed, "ensemble unchanged"
    assert ckpt["fit_stats"] != old["fit_stats"]
    # metrics: one more line, same env_step, with the finetune record
    rows = read_metrics(RunPaths(new).metrics)
    assert len(rows) == len(read_metrics(RunPaths(run).metrics)) + 1
    last = rows[-1]
    assert last["env_step"] == old["env_step"] and last["buffer_env_recorded"] == total
    ft = last["finetune"]
    assert (ft["transitions_added"], ft["episodes"], ft["rounds"], ft["updates"]) == (total, 4, 20, 20)
    assert ft["sources"] == ["controller"] and ft["model_fits"] == 1 and ft["rollouts"] == 1
    assert ft["d_env"] == {"env": size, "recorded": total}
    sessions = [json.loads(x) for x in RunPaths(new).sessions.read_text().splitlines()]
    assert sessions[-1]["finetune"]["transitions_added"] == total
    assert "finetune from" in RunPaths(new).log.read_text()

    # export works on the new run as on any other
    manifest = export_from_run(new, tmp_path / "artifacts")
    arts = load_artifacts(tmp_path / "artifacts", graphs=("policy",))
    assert manifest.env_id == ENV and manifest.train_steps == old["env_step"] and manifest.guard is not None
    assert arts.policy(np.zeros((1, manifest.state_dim), np.float32), np.zeros((1, 1), np.float32))[2].shape == (1, 1)


def test_finetune_defaults_to_one_round_per_transition_and_takes_sim_recordings(recorded: Path, tmp_path: Path):
    from maac_robot.learn.finetune import finetune

    data = tmp_path / "data"
    data.mkdir()
    first = sorted((recorded / "sim_rec").glob("*.npz"))[0]
    shutil.copy(first, data)
    n = len(load_episode(first))
    result = finetune(recorded / "run", data, tmp_path / "new")
    assert result.record["rounds"] == n and result.record["sources"] == ["sim"]
    assert result.trainer.d_env.source_counts()["recorded"] == n


def test_finetune_leaves_out_steps_that_were_not_one_real_transition(recorded: Path, tmp_path: Path):
    from maac_robot.learn.finetune import finetune

    ep = max(load_episodes(recorded / "ctl_rec"), key=len)
    assert len(ep) >= 5
    flags = dict(ep.flags)
    flags["predicted"] = np.zeros(len(ep), bool)
    flags["predicted"][:3] = True
    flags["substituted"] = flags["substituted"].copy()
    flags["substituted"][3] = True
    data = tmp_path / "data"
    save_episode(data / "a.npz", Episode(ep.states, ep.actions, ep.rewards, ep.next_states, ep.terminated,
                                         ep.truncated, flags, ep.meta, ep.telemetry))
    result = finetune(recorded / "run", data, tmp_path / "new", steps=1)
    assert result.record["transitions_added"] == len(ep) - 4 and result.record["recorded_steps"] == len(ep)


def _foreign(data: Path, env_id: str, state_dim: int, act_dim: int, **meta) -> None:
    n = 5
    save_episode(data / "foreign.npz", Episode(
        np.zeros((n, state_dim)), np.zeros((n, act_dim)), np.ones(n), np.zeros((n, state_dim)), np.zeros(n, bool),
        np.eye(1, n, n - 1, dtype=bool)[0], {}, {"env_id": env_id, "source": "controller", **meta}))


def test_finetune_refuses_a_recording_of_another_env_naming_the_file(recorded: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    from maac_robot.cli import main

    data = tmp_path / "data"
    shutil.copy(sorted((recorded / "ctl_rec").glob("*.npz"))[0], data.mkdir() or data)
    _foreign(data, "Hopper-v5", 12, 3)
    assert main(["finetune", str(recorded / "run"), "--data", str(data), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'foreign.npz'}: recorded for another env" in err, err
    assert "env 'Hopper-v5' vs the run's 'InvertedPendulum-v5'" in err and "state/action dims 12/3 vs" in err, err
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_finetune_refuses_another_state_layout(recorded: Path, tmp_path: Path):
    from maac_robot.learn.finetune import finetune

    ep = load_episodes(recorded / "ctl_rec")[0]
    layout = dict(ep.meta["state_layout"])
    layout["names"] = list(reversed(layout["names"]))
    data = tmp_path / "data"
    save_episode(data / "swapped.npz", Episode(ep.states, ep.actions, ep.rewards, ep.next_states, ep.terminated,
                                               ep.truncated, ep.flags, {**ep.meta, "state_layout": layout}))
    with pytest.raises(RecordingError, match=r"swapped\.npz: .*state layout names differ from the run's at dims"):
        finetune(recorded / "run", data, tmp_path / "new", steps=1)
    with pytest.raises(RecordingError, match="holds no recorded episodes"):
        finetune(recorded / "run", tmp_path, tmp_path / "new", steps=1)
    assert not (tmp_path / "new").exists()


def test_finetune_refuses_to_overwrite(recorded: Path, tmp_path: Path):
    from maac_robot.learn.finetune import finetune
    from maac_robot.learn.trainer import RunError

    (tmp_path / "new").mkdir()
    with pytest.raises(RunError, match="already exists"):
        finetune(recorded / "run", recorded / "ctl_rec", tmp_path / "new", steps=1)


# ---- the source tag -----------------------------------------------------------------------------------


def test_the_source_tag_survives_the_ring_and_a_checkpoint_and_old_checkpoints_read_as_env():
    buf = ReplayBuffer(2, 1, 5)
    buf.add(np.zeros(2), np.zeros(1), 0.0, np.zeros(2), False)
    buf.add_batch(np.ones((3, 2)), np.ones((3, 1)), np.ones(3), np.ones((3, 2)), np.zeros(3, bool),
                  source=SOURCE_RECORDED)
    assert buf.source_counts() == {"env": 1, "recorded": 3}
    sd = buf.state_dict()
    again = ReplayBuffer(2, 1, 5)
    again.load_state_dict(sd)
    assert again.source_counts() == {"env": 1, "recorded": 3}
    buf.add_batch(np.ones((3, 2)), np.ones((3, 1)), np.ones(3), np.ones((3, 2)), np.zeros(3, bool))  # wraps
    assert buf.source_counts() == {"env": 3, "recorded": 2}
    del sd["source"]  # a checkpoint written before the tag
    old = ReplayBuffer(2, 1, 5)
    old.source[:] = SOURCE_RECORDED
    old.load_state_dict(sd)
    assert old.source_counts() == {"env": 4, "recorded": 0}


def test_a_run_checkpointed_before_the_tag_loads_and_finetunes(recorded: Path, tmp_path: Path):
    from maac_robot.learn.finetune import finetune
    from maac_robot.learn.trainer import RunPaths, load_run

    run = tmp_path / "oldrun"
    shutil.copytree(recorded / "run", run)
    path = RunPaths(run).checkpoint
    ckpt = torch.load(path, weights_only=True)
    for buffer in ("d_env", "d_model"):
        del ckpt[buffer]["source"]
    torch.save(ckpt, path)
    loaded = load_run(run)
    assert loaded.d_env.source_counts() == {"env": int(ckpt["d_env"]["size"]), "recorded": 0}
    result = finetune(run, recorded / "ctl_rec", tmp_path / "new", steps=1)
    assert result.trainer.d_env.source_counts()["recorded"] == result.record["transitions_added"]


def test_keep_compacts_the_chosen_rows_with_their_tags_and_writing_continues_after_them():
    buf = ReplayBuffer(2, 1, 4)
    for i in range(4):
        buf.add(np.full(2, i), np.full(1, i), float(i), np.full(2, i + 1), i == 3, source=i % 2)
    buf.keep(np.array([False, True, False, True]))
    assert len(buf) == 2 and buf.reward[:2].tolist() == [1.0, 3.0] and buf.terminated[:2].tolist() == [False, True]
    assert buf.source_counts() == {"env": 0, "recorded": 2}
    buf.add(np.full(2, 9), np.full(1, 9), 9.0, np.full(2, 9), False)
    assert buf.reward[:3].tolist() == [1.0, 3.0, 9.0] and buf.source_counts() == {"env": 1, "recorded": 2}
    buf.keep(np.zeros(len(buf), bool))
    assert len(buf) == 0 and buf.arrays()["state"].shape == (0, 2)


def test_finetune_prepare_reshapes_the_data_before_the_refit_and_says_so(recorded: Path, tmp_path: Path):
    from maac_robot.learn.buffer import SOURCE_RECORDED
    from maac_robot.learn.finetune import finetune

    def recorded_only(trainer) -> str:
        trainer.d_env.keep(trainer.d_env.source[: len(trainer.d_env)] == SOURCE_RECORDED)
        trainer.d_model.keep(np.zeros(len(trainer.d_model), bool))
        return "recorded rows only"

    result = finetune(recorded / "run", recorded / "ctl_rec", tmp_path / "new", steps=1, prepare=recorded_only)
    added = result.record["transitions_added"]
    assert result.record["prepared"] == "recorded rows only"
    assert result.record["d_env"] == {"env": 0, "recorded": added}
    # the refit saw only the recorded rows (its holdout split is a share of them), and the round's rollout refilled D_model
    assert result.trainer.fit_stats["num_train"] + result.trainer.fit_stats["num_holdout"] == added
    assert 0 < len(result.trainer.d_model) <= result.trainer.cfg.rollout.batch_size
    assert "prepared" not in finetune(recorded / "run", recorded / "ctl_rec", tmp_path / "plain", steps=1).record


def test_the_finetune_screen_runs_each_variant_on_the_adaptation_layout_and_writes_its_rows(recorded: Path,
                                                                                           tmp_path: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import finetune_screen
    from maac_robot.sweep.records import read_rows

    shutil.copytree(recorded / "ctl_rec", tmp_path / "work" / "s0" / "data-30")
    out = tmp_path / "screen.csv"
    argv = ["--seeds", "0", "--record-steps", "30", "--rounds", "1", "--episodes", "1", "--nominal",
            str(recorded / "run"), "--work", str(tmp_path / "work"), "--out", str(out)]
    assert finetune_screen.main([*argv, "--variants", "default", "none", "recorded_only"]) == 0
    rows = {r["variant"]: r for r in read_rows(out)}
    assert set(rows) == {"default", "none", "recorded_only"}
    added = int(rows["default"]["d_env_recorded"])
    assert added > 0 and int(rows["none"]["d_env_recorded"]) == 0
    assert int(rows["recorded_only"]["d_env_env"]) == 0 and int(rows["recorded_only"]["d_env_recorded"]) == added
    assert int(rows["none"]["d_env_env"]) == int(rows["default"]["d_env_env"]) > 0
    assert all(float(r["perturbed_return"]) >= 0 and r["commit"] and r["command"] for r in rows.values())
    assert finetune_screen.main([*argv, "--variants", "none"]) == 0  # a rerun replaces its row
    assert len(read_rows(out)) == 3
