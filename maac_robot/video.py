"""mp4 files of MuJoCo episodes, for `maac-robot sim --render` and `maac-robot evaluate --video`.

imageio with its ffmpeg backend (imageio-ffmpeg), the `[render]` extra; MuJoCo renders headless through EGL
unless `MUJOCO_GL` says otherwise, which must be decided before MuJoCo is first imported: call
`check_video_support` before making the env.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from maac_robot.runtime.errors import UserError


class VideoError(UserError):
    """Video was asked for, and this install cannot write it."""


def check_video_support(option: str) -> None:
    """Fail before any episode runs, naming the `option` that asked for video and how to install support."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401  - imageio's mp4 backend
    except ImportError as err:
        raise VideoError(f"{option} needs imageio and imageio-ffmpeg ({err}); "
                         f"install them with `pip install 'maac-robot[render]'` or drop {option}") from None


class VideoWriter:
    """Frames (H x W x 3 uint8) appended to one mp4 at `fps`; the file is complete once `close` returned."""

    def __init__(self, path: str | Path, fps: float) -> None:
        import imageio.v2 as imageio

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frames = 0
        self._writer = imageio.get_writer(path, fps=fps, macro_block_size=1)

    def add(self, frame: np.ndarray) -> None:
        self._writer.append_data(frame)
        self.frames += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
