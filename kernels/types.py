"""Stage-boundary types of the rasterizer: the camera in, the passes out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in OpenCV convention (x right, y down, z forward).

    Attributes:
        fx, fy, cx, cy: intrinsics in pixels; pixel (i, j) has its centre at
            (j + 0.5, i + 0.5), so a centred camera has cx = width / 2.
        world_to_camera: ``[4, 4]`` float64, world metres → camera metres.
        near, far: depth range in metres; Gaussians whose centre lies outside are culled.
    """

    fx: float
    fy: float
    cx: float
    cy: float
    world_to_camera: np.ndarray
    near: float = 0.01
    far: float = 100.0

    @classmethod
    def from_arrays(cls, intrinsics, world_to_camera, near: float = 0.01, far: float = 100.0):
        fx, fy, cx, cy = (float(v) for v in np.asarray(intrinsics).reshape(4))
        w2c = np.asarray(world_to_camera, np.float64).reshape(4, 4)
        return cls(fx, fy, cx, cy, w2c, near, far)

    @property
    def position(self) -> np.ndarray:
        """Camera centre in world coordinates ``[3]``."""
        r, t = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        return -r.T @ t


@dataclass(frozen=True)
class Passes:
    """Rendered passes for one image; a pass not requested is ``None``.

    Attributes:
        rgb: ``[H, W, 3]`` float32, linear, premultiplied by alpha (plus background
            times the remaining transmittance when a background is given).
        alpha: ``[H, W]`` float32 in [0, 1].
        depth: ``[H, W]`` float32, expected camera z in metres over the covered part
            (sum of weight * z / alpha); +inf where no Gaussian contributed.
        normal: ``[H, W, 3]`` float32, camera-space unit normal (each Gaussian's shortest
            axis, turned towards the camera), zero where empty.
        segment: ``[H, W]`` int32, the label whose Gaussians contribute most weight to the
            pixel (labels composited like colour), -1 where empty.
    """

    rgb: np.ndarray | None = None
    alpha: np.ndarray | None = None
    depth: np.ndarray | None = None
    normal: np.ndarray | None = None
    segment: np.ndarray | None = None
