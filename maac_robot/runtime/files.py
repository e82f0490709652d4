"""Crash-safe file writes: a reader, or the next run after a kill -9 or a power cut, sees the old file or the
new one, never half of one.

A rename is atomic, but it is durable only once the directory entry is on disk, and it publishes complete
data only if the data reached the disk first. So: write a temporary file in the same directory (a rename
across file systems is a copy), fsync it, rename it over the target, then fsync the directory.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_directory(directory: str | Path) -> None:
    """Make the renames, creations and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Replace `path` with `data` (bytes, or a callback that writes into the open binary file) atomically.

    The parent directory is created if missing. The temporary file, `.NAME.tmp` beside it, gets the
    permissions an ordinary `open` would give (umask applied) and is removed if writing fails, so an
    exception leaves `path` as it was. Its name is fixed, so the one a kill -9 leaves behind (a checkpoint
    can be gigabytes) is reused by the next write instead of piling up; one writer per path, as every
    user here has (a run's files, a recorder's episodes, an export's own directory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new, uniquely named directory in `parent` with the permissions an ordinary `mkdir` gives (umask applied).

    `tempfile.mkdtemp` makes 0700 directories, private to their owner; a directory built to be renamed into
    place for others to read (an export's artifacts, served by another user's controller) must not be.
    """
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary directory name {prefix}* in {parent}")
