"""Animations → keyframes at the scene's frame rate, and where a take turns the head.

A take recorded at one rate (Live Link Face at 60 fps) is keyed at another (a 24 fps
scene) by linear interpolation in time, one key per scene frame, so what plays back is
what was recorded, not a time-stretched copy. Head angles are resampled the same way
(per angle: takes are sampled densely enough for that to be smooth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KeyframePlan:
    """Keys to insert.

    Attributes:
        frames: float64 ``[K]`` scene frame numbers.
        values: ``[K, C]`` in the input's columns and float dtype (float32 ``[K, 52]``
            weights in canonical ARKit order for curves; ``[K, 3]`` for head angles).
    """

    frames: np.ndarray
    values: np.ndarray


def plan_keyframes(
    curves: np.ndarray,
    take_fps: float | None,
    scene_fps: float,
    start_frame: float = 1.0,
    times: np.ndarray | None = None,
) -> KeyframePlan:
    """One key per scene frame covering the take.

    Args:
        curves: ``[F, C]`` values (weights, angles), one row per take frame; float dtypes
            are kept, others become float32.
        take_fps: the take's frame rate; None keys one row per scene frame.
        scene_fps: ``scene.render.fps / scene.render.fps_base``.
        start_frame: scene frame of the take's first row.
        times: ``[F]`` seconds of each row after the first (increasing), as the take's
            timecodes say (``Animation.row_times``); rows are then placed at their own
            times, so a capture that dropped frames keeps its length. None: rows are
            ``1 / take_fps`` apart.
    """
    curves = np.asarray(curves)
    if not np.issubdtype(curves.dtype, np.floating):
        curves = curves.astype(np.float32)
    if curves.ndim != 2 or len(curves) == 0:
        raise ValueError(f"curves must be [frames, shapes] with frames > 0, got {curves.shape}")
    if not scene_fps > 0 or (take_fps is not None and not take_fps > 0):
        raise ValueError("frame rates must be positive")
    if times is not None:
        t_take = np.asarray(times, np.float64)
        if t_take.shape != (len(curves),) or not np.all(np.diff(t_take) > 0):
            raise ValueError(f"times must be [{len(curves)}] increasing seconds")
        t_take = t_take - t_take[0]
    elif take_fps is None or abs(take_fps - scene_fps) < 1e-9:
        frames = start_frame + np.arange(len(curves), dtype=np.float64)
        return KeyframePlan(frames, curves.copy())
    else:
        t_take = np.arange(len(curves)) / take_fps
    count = int(np.floor(t_take[-1] * scene_fps + 1e-9)) + 1
    t_scene = np.arange(count) / scene_fps
    values = np.stack(
        [np.interp(t_scene, t_take, curves[:, i]) for i in range(curves.shape[1])], axis=1
    )
    frames = start_frame + np.arange(count, dtype=np.float64)
    return KeyframePlan(frames, values.astype(curves.dtype))
