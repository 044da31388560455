"""Pose an avatar: ARKit weights and a head transform → world-space Gaussians."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.arkit import index_of

from .avatar import Avatar
from .geometry import rotmat_to_quat, triangle_frames

#: Eye turn at weight 1 of an ``eyeLook*`` shape, radians (ARKit does not state one; these
#: are about the comfortable range of human gaze).
GAZE_YAW = np.radians(30.0)
GAZE_PITCH = np.radians(25.0)
MAX_TRANSLATION = 1e4  # metres: float32 still resolves about a millimetre here
MAX_SCALE = 1e3  # a head transform's uniform scale, either way
_GAZE_NAMES = tuple(
    f"eyeLook{d}{side}" for side in ("Left", "Right") for d in ("Out", "In", "Up", "Down")
)
_GAZE_INDEX = [index_of(n) for n in _GAZE_NAMES]


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
    non-uniform scale (a Gaussian cannot follow those exactly), or a translation or scale
    beyond :data:`MAX_TRANSLATION` and :data:`MAX_SCALE` (float32 positions and ``.ply``
    files would lose the head's millimetres, or overflow).
    """
    m = np.asarray(m, np.float64)
    if not np.allclose(m[3], (0, 0, 0, 1), atol=1e-6):
        raise ValueError("head transform's last row must be (0, 0, 0, 1)")
    if not np.abs(m[:3, 3]).max() <= MAX_TRANSLATION:
        raise ValueError(f"head transform's translation is beyond {MAX_TRANSLATION:g} m")
    a = m[:3, :3]
    det = np.linalg.det(a)
    if det <= 0:
        raise ValueError("head transform must not mirror or collapse (determinant <= 0)")
    s = det ** (1 / 3)
    if not 1 / MAX_SCALE <= s <= MAX_SCALE:
        raise ValueError(f"head transform's scale {s:.3g} is beyond {MAX_SCALE:g} either way")
    r = a / s
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-3):
        raise ValueError("head transform must be rotation, uniform scale and translation")
    return r, float(s), m[:3, 3]


def gaze_rotations(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eyeball rotations ``[3, 3]`` (subject's left eye, right eye) for ARKit weights.

    ``eyeLookOut``/``In`` turn an eye about the up axis by up to ``GAZE_YAW`` (out is
    towards the subject's own side: +X for the left eye), ``eyeLookUp``/``Down`` about
    the left-right axis by up to ``GAZE_PITCH``.
    """
    w = {name: float(weights[index_of(name)]) for name in _GAZE_NAMES}
    out = []
    for side, outward in (("Left", 1.0), ("Right", -1.0)):
        yaw = GAZE_YAW * outward * (w[f"eyeLookOut{side}"] - w[f"eyeLookIn{side}"])
        pitch = GAZE_PITCH * (w[f"eyeLookUp{side}"] - w[f"eyeLookDown{side}"])
        out.append(eye_turn(yaw) @ eye_lift(pitch))
    return out[0], out[1]


def eye_turn(yaw: float) -> np.ndarray:
    """``[3, 3]`` rotation about +Z (up): positive turns a -Y gaze towards +X."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def eye_lift(pitch: float) -> np.ndarray:
    """``[3, 3]`` rotation raising a -Y gaze by ``pitch``: a negative turn about +X."""
    c, s = np.cos(pitch), np.sin(pitch)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def pose_vertices(avatar: Avatar, weights: np.ndarray | None) -> np.ndarray:
    """Rest mesh plus weighted ARKit deltas ``[V, 3]`` (head frame), eyeballs turned
    rigidly about their centres for gaze (a linear delta would smear the iris)."""
    if weights is None or not np.any(weights):
        return avatar.vertices.astype(np.float64)
    active = np.flatnonzero(weights)
    if len(active) > 8:  # one float32 BLAS product beats gathering many shapes
        flat = avatar.shape_deltas.reshape(len(weights), -1)
        delta = (weights.astype(np.float32) @ flat).reshape(-1, 3)
    else:
        delta = np.tensordot(weights[active].astype(np.float64), avatar.shape_deltas[active], 1)
    verts = avatar.vertices.astype(np.float64) + delta
    if avatar.eyes and np.any(weights[_GAZE_INDEX]):
        for (ids, center), rot in zip(avatar.eyes, gaze_rotations(weights), strict=True):
            verts[ids] = (verts[ids] - center) @ rot.T + center
    return verts


def pose(
    avatar: Avatar, weights: np.ndarray | None = None, head: np.ndarray | None = None
) -> PosedGaussians:
    """Gaussians for ARKit ``weights`` ``[52]`` and head-to-world ``head`` ``[4, 4]``.

    The fast path: :func:`pose_vertices`, then one numba call
    (``posing_kernels.pose_gaussians``); :func:`pose_reference` is the same maths in numpy.
    """
    from .posing_kernels import pose_gaussians

    g = avatar.gaussians
    st = avatar.pose_static
    verts = np.ascontiguousarray(pose_vertices(avatar, weights), np.float64)
    r, s, t = (np.eye(3), 1.0, np.zeros(3)) if head is None else split_transform(head)
    means, quats, scales = pose_gaussians(
        verts, st.tri_corners, st.rest_area, st.index, st.corners, st.bary, st.offset,
        st.rotation, st.base_scale, np.ascontiguousarray(r), s, np.ascontiguousarray(t, np.float64),
    )  # fmt: skip
    opacities = st.opacities.copy()
    if len(st.fading):  # the lids' ~2,000 (layer, lashes, folds): stretch from posed scale
        stretch = scales[st.fading, 0] / (st.base_scale[st.fading, 0] * s)
        opacities[st.fading] *= appear_factor(stretch, st.appear)
    return PosedGaussians(means, quats, scales, opacities, g.sh)


@dataclass(frozen=True)
class _Static:
    """What the fast path needs of an avatar that does not change from frame to frame."""

    tri_corners: np.ndarray  # [U, 3] int32 vertex ids of the triangles carrying Gaussians
    rest_area: np.ndarray  # [U] float64
    index: np.ndarray  # [N] int64 row in tri_corners
    corners: np.ndarray  # [N, 3] int32 vertex ids of each Gaussian's triangle
    bary: np.ndarray  # [N, 3] float32 (float64 if the avatar's is)
    offset: np.ndarray  # [N] float32 (ditto)
    rotation: np.ndarray  # [N, 4] float32 (ditto)
    base_scale: np.ndarray  # [N, 3] float64 exp(log_scale)
    opacities: np.ndarray  # [N] float64 sigmoid(opacity_logit)
    fading: np.ndarray  # [M] int64 the Gaussians whose opacity follows their stretch
    appear: np.ndarray  # [M] float64 their ``appear``


def appear_factor(stretch: np.ndarray, appear: np.ndarray) -> np.ndarray:
    """Opacity factor of Gaussians with ``appear`` > 1 at triangle ``stretch``: 0 up to
    halfway from 1 to ``appear``, rising linearly to 1 at ``appear``; for ``appear`` < -1
    the reverse, 1 falling to 0 at ``-appear`` (see ``BoundGaussians.appear``)."""
    ramp = np.clip(2.0 * (stretch - 1.0) / (np.abs(appear) - 1.0) - 1.0, 0.0, 1.0)
    return np.where(appear > 0, ramp, 1.0 - ramp)


def static_arrays(avatar: Avatar) -> _Static:
    """Built once per avatar (``Avatar.pose_static`` caches it)."""
    g = avatar.gaussians

    def exact(a: np.ndarray) -> type:  # float32 as stored (one compiled kernel), or float64
        return np.float64 if a.dtype == np.float64 else np.float32

    used, index = avatar.bound_triangles
    tris = np.ascontiguousarray(avatar.triangles, np.int32)
    return _Static(
        tri_corners=tris[used],
        rest_area=np.ascontiguousarray(avatar.rest_area, np.float64),
        index=np.ascontiguousarray(index, np.int64),
        corners=tris[g.triangle],
        bary=np.ascontiguousarray(g.bary, exact(g.bary)),
        offset=np.ascontiguousarray(g.offset, exact(g.offset)),
        rotation=np.ascontiguousarray(g.rotation, exact(g.rotation)),
        base_scale=np.exp(g.log_scale.astype(np.float64)),
        opacities=1.0 / (1.0 + np.exp(-g.opacity_logit.astype(np.float64))),
        fading=np.flatnonzero(g.appear != 0),
        appear=g.appear[g.appear != 0].astype(np.float64),
    )


def pose_reference(
    avatar: Avatar, weights: np.ndarray | None = None, head: np.ndarray | None = None
) -> PosedGaussians:
    """:func:`pose` in plain numpy: slow (``[N, 3, 3]`` temporaries), obviously right."""
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
    fading = g.appear != 0
    opac[fading] *= appear_factor(stretch[fading], g.appear[fading].astype(np.float64))
    return PosedGaussians(means, rotmat_to_quat(rot), scales, opac, g.sh)
