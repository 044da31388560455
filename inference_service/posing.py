"""Pose an avatar: ARKit weights and a head transform → world-space Gaussians."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .avatar import Avatar
from .geometry import rotmat_to_quat, triangle_frames


@dataclass(frozen=True)
class PosedGaussians:
    """World-space Gaussians ready for ``kernels.rasterize`` or export.

    Attributes:
        means: ``[N, 3]`` float64 metres.
        quats: ``[N, 4]`` unit (w, x, y, z).
        scales: ``[N, 3]`` metres.
        opacities: ``[N]`` in (0, 1).
        sh: ``[N, K, 3]`` SH coefficients (degree-0 only is rotation-invariant; higher
            degrees are carried as they are).
    """

    means: np.ndarray
    quats: np.ndarray
    scales: np.ndarray
    opacities: np.ndarray
    sh: np.ndarray


def split_transform(m: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """A rigid-plus-uniform-scale ``[4, 4]`` → (rotation [3,3], scale, translation [3]).

    Raises ``ValueError`` for a bottom row other than (0, 0, 0, 1), a mirror, shear or
    non-uniform scale (a Gaussian cannot follow those exactly).
    """
    m = np.asarray(m, np.float64)
    if not np.allclose(m[3], (0, 0, 0, 1), atol=1e-6):
        raise ValueError("head transform's last row must be (0, 0, 0, 1)")
    a = m[:3, :3]
    det = np.linalg.det(a)
    if det <= 0:
        raise ValueError("head transform must not mirror or collapse (determinant <= 0)")
    s = det ** (1 / 3)
    r = a / s
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-3):
        raise ValueError("head transform must be rotation, uniform scale and translation")
    return r, float(s), m[:3, 3]


def pose_vertices(avatar: Avatar, weights: np.ndarray | None) -> np.ndarray:
    """Rest mesh plus weighted ARKit deltas ``[V, 3]`` (head frame)."""
    if weights is None or not np.any(weights):
        return avatar.vertices.astype(np.float64)
    active = np.flatnonzero(weights)
    return avatar.vertices + np.tensordot(
        weights[active].astype(np.float64), avatar.shape_deltas[active], axes=1
    )


def pose(
    avatar: Avatar, weights: np.ndarray | None = None, head: np.ndarray | None = None
) -> PosedGaussians:
    """Gaussians for ARKit ``weights`` ``[52]`` and head-to-world ``head`` ``[4, 4]``."""
    g = avatar.gaussians
    verts = pose_vertices(avatar, weights)
    used, index = avatar.bound_triangles  # frames only where Gaussians sit
    frames, area = triangle_frames(verts, avatar.triangles[used])

    corners = verts[avatar.triangles[g.triangle]]  # [N, 3, 3]
    normal = frames[index, :, 2]
    means = np.einsum("nk,nkc->nc", g.bary, corners) + g.offset[:, None] * normal
    rot = frames[index] @ avatar.local_rotation
    stretch = np.sqrt(area / np.maximum(avatar.rest_area, 1e-20))[index]
    scales = np.exp(g.log_scale.astype(np.float64)) * stretch[:, None]

    if head is not None:
        r, s, t = split_transform(head)
        means = s * means @ r.T + t
        rot = r @ rot
        scales = scales * s
    opac = 1.0 / (1.0 + np.exp(-g.opacity_logit.astype(np.float64)))
    return PosedGaussians(means, rotmat_to_quat(rot), scales, opac, g.sh)
