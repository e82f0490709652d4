"""runtime.files.atomic_write: the one way files are replaced (checkpoints, metrics, plots, configs,
recordings, artifact files): the old file or the new one, never half, and durable once it returns."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from maac_robot.runtime.files import atomic_write


def test_writes_bytes_or_a_callback_and_replaces_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.bin"
    assert atomic_write(target, b"old") == target  # the parent directory is created
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]  # no temporary file left


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    atomic_write(target, b"old")

    def half(f: BinaryIO) -> None:
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    atomic_write(target, b"old")
    started = tmp_path / "started"
    child = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, time\n"
        "from maac_robot.runtime.files import atomic_write\n"
        "def slow(f):\n"
        f"    f.write(b'new' * 1000); f.flush(); pathlib.Path({str(started)!r}).touch(); time.sleep(60)\n"
        f"atomic_write({str(target)!r}, slow)\n")])
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the writer never started"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
    assert target.read_bytes() == b"old"


def test_the_file_and_its_directory_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "data.bin", b"x")
    assert synced == ["file", "dir"]  # the data before the rename, the rename after it


def test_permissions_follow_the_umask_like_an_ordinary_open(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "data.bin", b"x")
        (tmp_path / "plain.bin").write_bytes(b"x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "data.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o644


def test_the_temporary_a_kill_left_behind_is_reused(tmp_path: Path) -> None:
    (tmp_path / ".data.bin.tmp").write_bytes(b"a stale half-written checkpoint")
    atomic_write(tmp_path / "data.bin", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_make_temp_dir_applies_the_umask_not_0700(tmp_path):
    from maac_robot.runtime.files import make_temp_dir

    old = os.umask(0o022)
    try:
        first, second = make_temp_dir(tmp_path, ".out."), make_temp_dir(tmp_path, ".out.")
    finally:
        os.umask(old)
    assert first != second and first.name.startswith(".out.") and first.parent == tmp_path
    assert stat.S_IMODE(first.stat().st_mode) == 0o755
