"""Camera maths shared by every client: OpenCV convention, world metres, +Z up.

A camera is ``intrinsics`` ``[4]`` = (fx, fy, cx, cy) in pixels and ``world_to_camera``
``[4, 4]``. Camera space is x right, y down, z forward. Pixel (row i, column j) covers
[j, j+1) x [i, i+1), so its centre is at (j + 0.5, i + 0.5) and a centred camera has
cx = width / 2 (gsplat's convention, so both rasterizer backends agree).
"""

from __future__ import annotations

import math

import numpy as np


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """World-to-camera ``[4, 4]`` of a camera at ``eye`` looking at ``target``."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    forward = target - eye
    norm = np.linalg.norm(forward)
    if norm == 0:
        raise ValueError("eye and target coincide")
    forward /= norm
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:  # looking straight along `up`: any axis across it
        right = np.cross(forward, np.eye(3)[np.argmin(np.abs(forward))])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    m = np.eye(4)
    m[:3, :3] = np.stack([right, down, forward])
    m[:3, 3] = -m[:3, :3] @ eye
    return m


def orbit(center, distance: float, yaw_deg: float = 0.0, pitch_deg: float = 0.0) -> np.ndarray:
    """World-to-camera of a camera orbiting ``center``.

    Yaw 0, pitch 0 looks at the face from the front (camera on -Y). Positive yaw moves
    the camera round to the subject's left (+X); positive pitch raises it.
    """
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    direction = np.array(
        [math.sin(yaw) * math.cos(pitch), -math.cos(yaw) * math.cos(pitch), math.sin(pitch)]
    )
    eye = np.asarray(center, np.float64) + distance * direction
    # the image's up, in the plane of the view and +Z: straight above or below (pitch
    # ±90) the view turns on as it did just short of it, not flipped
    up = (-math.sin(yaw) * math.sin(pitch), math.cos(yaw) * math.sin(pitch), math.cos(pitch))
    return look_at(eye, center, up)


def intrinsics_from_fov(width: int, height: int, fov_deg: float) -> np.ndarray:
    """(fx, fy, cx, cy) of a centred pinhole with square pixels; fov spans the longer side."""
    f = 0.5 * max(width, height) / math.tan(math.radians(fov_deg) / 2)
    return np.array([f, f, width / 2, height / 2])


def framing_distance(radius: float, fov_deg: float, fill: float = 0.85) -> float:
    """Distance at which a sphere of ``radius`` spans ``fill`` of the narrower fov, in the
    small-angle form (its radius at its centre's depth) that the builder's pseudo-views
    and ``eval`` are framed with; past about 60° use :func:`outline_distance`."""
    return radius / (fill * math.tan(math.radians(fov_deg) / 2))


def outline_distance(radius: float, fov_deg: float, fill: float = 0.85) -> float:
    """Distance at which a sphere's outline spans ``fill`` of the narrower fov, at any fov:
    a near sphere's outline is wider than its radius at its centre's depth, so the
    small-angle form puts a wide camera inside the sphere (past 96° at fill 0.9)."""
    return radius / math.sin(math.atan(fill * math.tan(math.radians(fov_deg) / 2)))


def project(points, intrinsics, world_to_camera) -> tuple[np.ndarray, np.ndarray]:
    """World points ``[N, 3]`` → pixel coordinates ``[N, 2]`` and camera depth ``[N]``."""
    p = np.asarray(points, np.float64) @ np.asarray(world_to_camera)[:3, :3].T
    p += np.asarray(world_to_camera)[:3, 3]
    fx, fy, cx, cy = np.asarray(intrinsics, np.float64)
    z = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([fx * p[:, 0] / z + cx, fy * p[:, 1] / z + cy], axis=1)
    return uv, z
