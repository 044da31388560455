"""ARKit curves files for the service and the CLI.

Reading goes through :func:`protocol.animation.load_animation`, the one loader for every
``--curves`` file (and for ``protocol.Client``): a Live Link Face CSV, splatface's own CSV
(a header of ARKit names in any order and case, optional ``frame`` column) or a ``.npy``
``[F, 52]`` array. Writing produces the Live Link Face layout, so what splatface writes
(``demo``'s ``curves.csv``, ``track``'s output) opens wherever Live Link Face takes open.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.animation import Animation, load_animation, save_livelink_csv, timecodes_rate


def load_curves(path: str | Path) -> np.ndarray:
    """Curves ``[F, 52]`` float32 in protocol order, clamped to [0, 1].

    Raises ``ValueError`` naming the file and what is wrong with it.
    """
    return load_animation(path).curves


def save_curves_csv(
    path: str | Path,
    curves: np.ndarray,
    fps: float = 30.0,
    head_angles: np.ndarray | None = None,
) -> float | None:
    """Write curves ``[F, 52]`` (protocol order) as a Live Link Face CSV, atomically.

    Layout: ``Timecode,BlendShapeCount,`` the 52 shapes in PascalCase in Live Link Face's
    column order, then head and eye yaw/pitch/roll; timecodes ``HH:MM:SS:FF.mmm`` from
    00:00:00:00.000 at ``fps`` (a take under a second from the last frame of a second,
    see ``save_livelink_csv``); BlendShapeCount 61. ``head_angles`` ``[F, 3]`` (HeadYaw,
    HeadPitch, HeadRoll, radians) are written when given, else 0, as are the eye angles.
    Weights are clamped to [0, 1]; NaN is an error. Returns the rate readers will play
    the rows at, from the timecodes (30 for a single row, which states no rate).
    """
    animation = Animation(curves=curves, fps=fps, head_angles=head_angles)
    return timecodes_rate(save_livelink_csv(path, animation))
