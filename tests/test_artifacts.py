"""Loading artifacts: every refusal names what is wrong; the runtime API and `inspect` work without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from maac_robot.runtime import artifacts
from maac_robot.runtime.artifacts import (
    FORMAT_VERSION,
    MAX_GRAPH_BYTES,
    MAX_MANIFEST_BYTES,
    ArtifactError,
    load_artifacts,
    sha256_bytes,
)
from maac_robot.cli import main

from tests.export_fixtures import export_components, random_components

ENV_ID = "HalfCheetah-v5"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "cheetah"
    export_components(random_components(ENV_ID), out)
    return out


@pytest.fixture
def copy(exported: Path, tmp_path: Path) -> Path:
    """A private copy to tamper with."""
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def _edit_manifest(path: Path, **fields: object) -> None:
    file = path / "manifest.json"
    data = json.loads(file.read_text())
    data.update(fields)
    file.write_text(json.dumps(data))


def _rehash(path: Path, name: str) -> None:
    """Make the manifest agree with a replaced file, so only the check under test can fire."""
    data = json.loads((path / "manifest.json").read_text())
    data["files"][name] = sha256_bytes((path / name).read_bytes())
    (path / "manifest.json").write_text(json.dumps(data))


def test_loads_and_reports_manifest(exported: Path) -> None:
    art = load_artifacts(exported, expected_env_id=ENV_ID)
    m = art.manifest
    assert (m.format_version, m.env_id, m.state_dim, m.act_dim) == (FORMAT_VERSION, ENV_ID, 18, 6)
    assert (m.num_models, m.num_elites, m.horizon, m.plan_horizon, m.train_steps) == (5, 3, 3, 3, 1234)
    assert m.normalisation == "inside_graphs" and m.reward == "closed_form" and not m.terminates
    assert m.act_low == [-1.0] * 6 and m.dt == pytest.approx(0.05)
    assert {"torch", "onnxruntime", "onnx", "numpy"} <= set(m.versions)


def test_missing_directory_and_file(copy: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact directory not found"):
        load_artifacts(copy / "nope")
    (copy / "q.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"missing file: .*q\.onnx"):
        load_artifacts(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"missing file: .*manifest\.json"):
        load_artifacts(copy)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_hash_mismatch(copy: Path, damage: str) -> None:
    file = copy / "plan.onnx"
    data = bytearray(file.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"plan\.onnx: SHA-256 mismatch .* modified or truncated"):
        load_artifacts(copy)


def test_hash_mismatch_is_refused_before_onnxruntime_parses_the_file(
        copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    parsed: list[bytes] = []
    real_session = onnxruntime.InferenceSession

    def recording_session(data: bytes, **kw: object) -> object:
        parsed.append(data)
        return real_session(data, **kw)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    file = copy / "ensemble.onnx"
    file.write_bytes(file.read_bytes() + b"appended")
    with pytest.raises(ArtifactError, match=r"ensemble\.onnx: SHA-256 mismatch"):
        load_artifacts(copy)
    assert parsed == [(copy / "policy.onnx").read_bytes()]  # graphs are loaded in order; ensemble never parsed


def _sparse(file: Path, size: int) -> None:
    """Replace `file` by a sparse file of `size` bytes: no disk or memory cost unless someone reads it."""
    with file.open("wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("name, limit", [("policy.onnx", MAX_GRAPH_BYTES), ("manifest.json", MAX_MANIFEST_BYTES)])
def test_oversized_file_is_refused_without_reading_it(copy: Path, name: str, limit: int) -> None:
    _sparse(copy / name, limit + 1)
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match=rf"{name}: {limit + 1} bytes, over the {limit}-byte limit"):
            load_artifacts(copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit // 4  # reading the file would have allocated all of it


def test_every_graph_is_size_checked(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "MAX_GRAPH_BYTES", (copy / "plan.onnx").stat().st_size - 1)
    with pytest.raises(ArtifactError, match=r"plan\.onnx: \d+ bytes, over the \d+-byte limit for a graph"):
        load_artifacts(copy)


def test_file_growing_past_the_limit_while_read_is_refused(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size check and the read are not atomic: the read itself stops at the limit."""
    real_stat = Path.stat

    def stat_before_growth(self: Path, **kw: bool) -> os.stat_result:
        st = real_stat(self, **kw)
        if self.name != "policy.onnx":
            return st
        fields = list(st[:10])
        fields[6] = 0  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(Path, "stat", stat_before_growth)
    monkeypatch.setattr(artifacts, "MAX_GRAPH_BYTES", 1000)
    monkeypatch.setattr(artifacts, "READ_CHUNK_BYTES", 256)
    with pytest.raises(ArtifactError, match=r"policy\.onnx: grew past the 1000-byte limit"):
        load_artifacts(copy)


def test_other_format_version(copy: Path) -> None:
    _edit_manifest(copy, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}.*reads format version "
                                            f"{FORMAT_VERSION}"):
        load_artifacts(copy)


def test_invalid_manifest_names_field(copy: Path) -> None:
    _edit_manifest(copy, act_high=[1.0] * 5)
    with pytest.raises(ArtifactError, match="act_high has 5 entries, act_dim is 6"):
        load_artifacts(copy)


def test_env_id_mismatch(exported: Path) -> None:
    with pytest.raises(ArtifactError, match="artifacts are for env 'HalfCheetah-v5', expected 'Hopper-v5'"):
        load_artifacts(exported, expected_env_id="Hopper-v5")


def test_manifest_dims_disagree_with_graphs(copy: Path) -> None:
    # a state_dim the layout does not fit is the manifest's own error
    _edit_manifest(copy, state_dim=17)
    with pytest.raises(ArtifactError, match=r"state_layout\.names has 18 entries, state_dim is 17"):
        load_artifacts(copy)
    # a consistent manifest for a smaller state: the graphs disagree, the first (policy.onnx) is named
    layout = json.loads((copy / "manifest.json").read_text())["state_layout"]
    layout.update(names=layout["names"][:17], obs_idx=list(range(1, 17)), net_obs_idx=list(range(1, 17)))
    _edit_manifest(copy, state_dim=17, state_layout=layout)
    with pytest.raises(ArtifactError, match=r"policy\.onnx: input 'net_obs' has shape \[batch, 17\], the manifest "
                                            r"implies \[batch, 16\]"):
        load_artifacts(copy)
    _edit_manifest(copy, state_layout={**layout, "obs_idx": list(range(17)), "net_obs_idx": list(range(17))})
    with pytest.raises(ArtifactError, match=r"ensemble\.onnx: input 'state' has shape \[batch, 18\], the manifest "
                                            r"implies \[batch, 17\]"):
        load_artifacts(copy)


def test_plan_horizon_disagrees_with_graph(copy: Path) -> None:
    _edit_manifest(copy, plan_horizon=5)
    with pytest.raises(ArtifactError, match=r"plan\.onnx: input 'actions' has shape \[.*, 3, 6\], the manifest "
                                            r"implies \[particles, 5, 6\]"):
        load_artifacts(copy)


def test_graph_with_fixed_batch_axis_is_refused(copy: Path) -> None:
    """A graph whose batch axis was exported as a constant (the dynamic-axis pitfall) must not load."""
    proto = onnx.load(copy / "q.onnx")
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    onnx.save(proto, copy / "q.onnx")
    _rehash(copy, "q.onnx")
    with pytest.raises(ArtifactError, match=r"q\.onnx: input 'state' has shape \[3, 18\]"):
        load_artifacts(copy)


def test_graph_from_another_export_is_refused(copy: Path) -> None:
    proto = onnx.load(copy / "policy.onnx")
    for prop in proto.metadata_props:
        if prop.key == "train_steps":
            prop.value = "99"
    onnx.save(proto, copy / "policy.onnx")
    _rehash(copy, "policy.onnx")
    with pytest.raises(ArtifactError, match=r"policy\.onnx: metadata_props train_steps='99' disagrees"):
        load_artifacts(copy)


def test_runtime_api_shapes_and_bounds(exported: Path) -> None:
    art = load_artifacts(exported)
    m = art.manifest
    rng = np.random.default_rng(0)
    state = rng.standard_normal((7, m.state_dim))
    noise = rng.standard_normal((7, m.act_dim))
    mean, log_std, action = art.policy(state, noise)
    assert mean.shape == log_std.shape == action.shape == (7, m.act_dim) and action.dtype == np.float32
    assert np.all(action >= m.act_low) and np.all(action <= m.act_high)
    # one row alone gives the same answer as inside a batch; noise 0 gives the squashed mean
    single = art.policy(state[2], noise[2])
    np.testing.assert_allclose(single[2], action[2], rtol=1e-6, atol=1e-6)
    zero = art.policy(state, np.zeros_like(noise))[2]
    np.testing.assert_allclose(zero, np.tanh(mean) * 1.0, rtol=1e-5, atol=1e-6)  # bounds are ±1
    ens = art.ensemble(state, noise)
    assert set(ens) == {"next_state_mean", "next_state_logvar", "reward"}
    assert ens["next_state_mean"].shape == (m.num_models, 7, m.state_dim) and ens["reward"].shape == (5, 7)
    q1, q2 = art.q(state, action)
    assert q1.shape == q2.shape == (7,)
    with pytest.raises(ValueError, match=r"expected state \[B,18\]"):
        art.q(state[:, :5], action)


def test_plan_pads_any_particle_count(exported: Path) -> None:
    art = load_artifacts(exported)
    m = art.manifest
    rng = np.random.default_rng(1)
    state = rng.standard_normal(m.state_dim)
    actions = rng.uniform(-1, 1, (6, m.plan_horizon, m.act_dim))
    full = art.plan(state, actions)
    assert full.shape == (6,) and np.all(np.isfinite(full))
    # 4 particles (not a multiple of 3 elites): padded inside, particle i keeps member i % 3
    np.testing.assert_allclose(art.plan(state, actions[:4]), full[:4], rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected actions \[P,3,6\]"):
        art.plan(state, actions[:, :2])


def test_session_options(exported: Path) -> None:
    art = load_artifacts(exported, intra_op_threads=2, allow_spinning=True)
    opts = art.sessions["plan"].get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    default = load_artifacts(exported).sessions["policy"].get_session_options()
    assert default.intra_op_num_threads == 1
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_controller_path_never_imports_torch(exported: Path) -> None:
    code = ("import sys; from maac_robot.runtime.artifacts import load_artifacts; import numpy as np; "
            f"a = load_artifacts({str(exported)!r}); a.plan(np.zeros(18), np.zeros((6, 3, 6))); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_inspect_prints_manifest_and_signatures(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "env_id: HalfCheetah-v5" in out and "plan_horizon: 3" in out and "sha256" in out
    for line in ("input  state              tensor(float)    [batch, 18]",
                 "output next_state_mean    tensor(float)    [5, batch, 18]",
                 "output returns            tensor(float)    [3*particles_per_elite]"):
        assert line in out


def test_inspect_reports_tampering_as_user_error(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / "ensemble.onnx").write_bytes(b"garbage")
    assert main(["inspect", str(copy)]) == 2
    assert "ensemble.onnx: SHA-256 mismatch" in capsys.readouterr().err



def test_graphs_not_asked_for_are_hash_checked_but_get_no_session(copy: Path) -> None:
    """The controller's load: no q.onnx session, yet a tampered q.onnx still refuses the whole directory."""
    art = load_artifacts(copy, graphs=("policy", "ensemble", "plan"))  # warm-up runs only these
    assert set(art.sessions) == {"policy", "ensemble", "plan"}
    with pytest.raises(ArtifactError, match=r"q\.onnx was verified but not loaded"):
        art.q(np.zeros(18), np.zeros(6))
    (copy / "q.onnx").write_bytes((copy / "q.onnx").read_bytes() + b"appended")
    with pytest.raises(ArtifactError, match=r"q\.onnx: SHA-256 mismatch"):
        load_artifacts(copy, graphs=("policy",))
    with pytest.raises(ValueError, match="unknown graphs \\['value'\\]"):
        load_artifacts(copy, graphs=("value",))
