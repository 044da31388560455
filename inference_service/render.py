"""Frames of passes: curves + head transforms + cameras → ``[F, H, W, ...]`` arrays."""

from __future__ import annotations

import numpy as np

import kernels
from kernels import Camera

from .avatar import Avatar
from .posing import pose


def frame_count(*arrays: np.ndarray | None) -> int:
    """Common frame count of per-frame arrays; each has F frames or a single one."""
    counts = {len(a) for a in arrays if a is not None}
    many = counts - {1}
    if len(many) > 1:
        raise ValueError(f"per-frame arrays disagree on the frame count: {sorted(counts)}")
    return many.pop() if many else 1


def _at(a: np.ndarray | None, i: int) -> np.ndarray | None:
    return None if a is None else a[0 if len(a) == 1 else i]


def render_frames(
    avatar: Avatar,
    intrinsics: np.ndarray,  # [F|1, 4]
    world_to_camera: np.ndarray,  # [F|1, 4, 4]
    width: int,
    height: int,
    curves: np.ndarray | None = None,  # [F|1, 52]
    heads: np.ndarray | None = None,  # [F|1, 4, 4]
    passes: tuple[str, ...] = ("rgb", "alpha"),
    background: np.ndarray | None = None,
    near: float = 0.01,
    far: float = 100.0,
    check=lambda i, n: None,
    backend: str = "auto",
    bottom_up: bool = False,
) -> dict[str, np.ndarray]:
    """Render every frame; ``check(i, n)`` is called before each (it may raise to stop).

    Consecutive frames with the same pose are posed once (a turntable poses once).
    ``bottom_up``: rows in OpenGL/Blender order, flipped in the copy out of the
    rasterizer's buffers that is made anyway.
    """
    f = frame_count(intrinsics, world_to_camera, curves, heads)
    out = {
        "rgb": np.zeros((f, height, width, 3), np.float32) if "rgb" in passes else None,
        "alpha": np.zeros((f, height, width), np.float32) if "alpha" in passes else None,
        "depth": np.zeros((f, height, width), np.float32) if "depth" in passes else None,
        "normal": np.zeros((f, height, width, 3), np.float32) if "normal" in passes else None,
    }
    last_key, posed = None, None
    for i in range(f):
        check(i, f)
        w, h = _at(curves, i), _at(heads, i)
        key = (None if w is None else w.tobytes(), None if h is None else h.tobytes())
        if key != last_key:
            posed, last_key = pose(avatar, w, h), key
        cam = Camera.from_arrays(_at(intrinsics, i), _at(world_to_camera, i), near, far)
        p = kernels.rasterize(
            posed.means,
            posed.quats,
            posed.scales,
            posed.opacities,
            posed.sh,
            cam,
            width,
            height,
            passes=tuple(passes),
            background=background,
            backend=backend,
        )
        for name, arr in out.items():
            if arr is not None:
                arr[i] = getattr(p, name)[::-1] if bottom_up else getattr(p, name)
    return {k: v for k, v in out.items() if v is not None}
