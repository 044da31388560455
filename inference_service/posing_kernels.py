"""The posing fast path: posed mesh vertices → world-space Gaussians in one numba call.

Same maths as :func:`inference_service.posing.pose_reference` (tests hold them together),
without its ``[N, 3, 3]`` temporaries. Two parallel passes:

1. per triangle that carries Gaussians: its frame (edge, bitangent, normal) exactly as
   :func:`~inference_service.geometry.triangle_frames` builds it, the head rotation
   applied to it and turned into a quaternion, and the area stretch;
2. per Gaussian: barycentric mean pushed along the normal, then the head transform; the
   rotation as (head · frame) quaternion times the Gaussian's local quaternion; scales.

Rotations compose as quaternions, so ``head @ frame @ local`` never becomes a matrix per
Gaussian. What does not change from frame to frame (``exp`` of the log scales, the
opacities, vertex ids per Gaussian) ``posing`` computes once per avatar. Arithmetic is
float64 like the reference (outputs agree to ~1e-16; the means must hold 1e-9 m under a
head transform), reading the float32 fields as stored. A degenerate (zero-area) triangle
gets area 0, hence zero scales, the reference's mean, and the head rotation times the
local rotation as its quaternion (the reference's frame there is arbitrary): never NaN.

Compiled on first use and cached on disk (``cache=True``); :func:`warmup` loads it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

#: Below this doubled area (m²) a triangle has no frame (as in ``triangle_frames``).
TINY = 1e-20


@njit(cache=True, inline="always")
def _matrix_to_quat(m00, m01, m02, m10, m11, m12, m20, m21, m22):
    """Shepperd's method: the largest of (w, x, y, z) from the diagonal, the rest from
    the off-diagonal sums, so no component loses precision near zero. Returns (w, x, y, z),
    unit for a rotation matrix (not normalised here)."""
    tr = m00 + m11 + m22
    if tr >= m00 and tr >= m11 and tr >= m22:
        w = math.sqrt(max(0.0, 1.0 + tr)) * 0.5
        f = 0.25 / max(w, 1e-300)
        return w, (m21 - m12) * f, (m02 - m20) * f, (m10 - m01) * f
    if m00 >= m11 and m00 >= m22:
        x = math.sqrt(max(0.0, 1.0 + m00 - m11 - m22)) * 0.5
        f = 0.25 / max(x, 1e-300)
        return (m21 - m12) * f, x, (m01 + m10) * f, (m02 + m20) * f
    if m11 >= m22:
        y = math.sqrt(max(0.0, 1.0 - m00 + m11 - m22)) * 0.5
        f = 0.25 / max(y, 1e-300)
        return (m02 - m20) * f, (m01 + m10) * f, y, (m12 + m21) * f
    z = math.sqrt(max(0.0, 1.0 - m00 - m11 + m22)) * 0.5
    f = 0.25 / max(z, 1e-300)
    return (m10 - m01) * f, (m02 + m20) * f, (m12 + m21) * f, z


@njit(parallel=True, cache=True)
def pose_gaussians(verts, tri_corners, rest_area, index, corners, bary, offset, rotation,
                   base_scale, head_r, head_s, head_t):  # fmt: skip
    """World-space means, quaternions and scales.

    Args:
        verts: ``[V, 3]`` float64 posed vertices (head frame).
        tri_corners: ``[U, 3]`` vertex ids of the triangles that carry Gaussians;
            ``rest_area``: ``[U]`` their rest areas.
        index: ``[N]`` each Gaussian's row in ``tri_corners``; ``corners``: ``[N, 3]``
            its triangle's vertex ids.
        bary, offset, rotation: the Gaussians' fields (``BoundGaussians``, float32).
        base_scale: ``[N, 3]`` rest scales, metres (``exp(log_scale)``).
        head_r: ``[3, 3]`` rotation, ``head_s`` uniform scale, ``head_t`` ``[3]``
            translation: head to world (identity, 1, zeros for none).

    Returns: means ``[N, 3]``, quats ``[N, 4]`` (unit, w >= 0), scales ``[N, 3]``, all
    float64.
    """
    u_count = tri_corners.shape[0]
    n = index.shape[0]
    r = head_r
    # per triangle: the normal as the reference divides it, the (head · frame)
    # quaternion, the area stretch times the head scale
    tri = np.empty((u_count, 8))
    for k in prange(u_count):
        a, b, c = tri_corners[k, 0], tri_corners[k, 1], tri_corners[k, 2]
        ax, ay, az = verts[a, 0], verts[a, 1], verts[a, 2]
        e1x, e1y, e1z = verts[b, 0] - ax, verts[b, 1] - ay, verts[b, 2] - az
        e2x, e2y, e2z = verts[c, 0] - ax, verts[c, 1] - ay, verts[c, 2] - az
        nx, ny, nz = e1y * e2z - e1z * e2y, e1z * e2x - e1x * e2z, e1x * e2y - e1y * e2x
        area2 = math.sqrt(nx * nx + ny * ny + nz * nz)
        inv_n = 1.0 / max(area2, TINY)
        nx, ny, nz = nx * inv_n, ny * inv_n, nz * inv_n
        tri[k, 0], tri[k, 1], tri[k, 2] = nx, ny, nz
        if area2 > TINY:
            inv_t = 1.0 / max(math.sqrt(e1x * e1x + e1y * e1y + e1z * e1z), TINY)
            tx, ty, tz = e1x * inv_t, e1y * inv_t, e1z * inv_t
            bx, by, bz = ny * tz - nz * ty, nz * tx - nx * tz, nx * ty - ny * tx
        else:  # no frame: identity
            tx, ty, tz, bx, by, bz, nx, ny, nz = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0
        qw, qx, qy, qz = _matrix_to_quat(  # of head_r @ [t b n]
            r[0, 0] * tx + r[0, 1] * ty + r[0, 2] * tz,
            r[0, 0] * bx + r[0, 1] * by + r[0, 2] * bz,
            r[0, 0] * nx + r[0, 1] * ny + r[0, 2] * nz,
            r[1, 0] * tx + r[1, 1] * ty + r[1, 2] * tz,
            r[1, 0] * bx + r[1, 1] * by + r[1, 2] * bz,
            r[1, 0] * nx + r[1, 1] * ny + r[1, 2] * nz,
            r[2, 0] * tx + r[2, 1] * ty + r[2, 2] * tz,
            r[2, 0] * bx + r[2, 1] * by + r[2, 2] * bz,
            r[2, 0] * nx + r[2, 1] * ny + r[2, 2] * nz,
        )
        tri[k, 3], tri[k, 4], tri[k, 5], tri[k, 6] = qw, qx, qy, qz
        tri[k, 7] = math.sqrt(0.5 * area2 / max(rest_area[k], TINY)) * head_s

    means = np.empty((n, 3))
    quats = np.empty((n, 4))
    scales = np.empty((n, 3))
    for g in prange(n):
        k = index[g]
        a, b, c = corners[g, 0], corners[g, 1], corners[g, 2]
        w0, w1, w2 = np.float64(bary[g, 0]), np.float64(bary[g, 1]), np.float64(bary[g, 2])
        off = np.float64(offset[g])
        px = w0 * verts[a, 0] + w1 * verts[b, 0] + w2 * verts[c, 0] + off * tri[k, 0]
        py = w0 * verts[a, 1] + w1 * verts[b, 1] + w2 * verts[c, 1] + off * tri[k, 1]
        pz = w0 * verts[a, 2] + w1 * verts[b, 2] + w2 * verts[c, 2] + off * tri[k, 2]
        px, py, pz = head_s * px, head_s * py, head_s * pz
        for i in range(3):
            means[g, i] = r[i, 0] * px + r[i, 1] * py + r[i, 2] * pz + head_t[i]

        # (head · frame) ⊗ local, unit, w >= 0
        aw, ax, ay, az = tri[k, 3], tri[k, 4], tri[k, 5], tri[k, 6]
        bw, bx = np.float64(rotation[g, 0]), np.float64(rotation[g, 1])
        by, bz = np.float64(rotation[g, 2]), np.float64(rotation[g, 3])
        qw = aw * bw - ax * bx - ay * by - az * bz
        qx = aw * bx + ax * bw + ay * bz - az * by
        qy = aw * by - ax * bz + ay * bw + az * bx
        qz = aw * bz + ax * by - ay * bx + az * bw
        norm = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
        inv = 1.0 / norm if norm > 0.0 else 0.0
        if qw < 0.0:
            inv = -inv
        quats[g, 0], quats[g, 1] = qw * inv, qx * inv
        quats[g, 2], quats[g, 3] = qy * inv, qz * inv

        stretch = tri[k, 7]
        scales[g, 0] = base_scale[g, 0] * stretch
        scales[g, 1] = base_scale[g, 1] * stretch
        scales[g, 2] = base_scale[g, 2] * stretch
    return means, quats, scales


def warmup() -> None:
    """Load (or, on a cold cache, compile) the kernel for the dtypes posing passes it
    (float32 Gaussian fields, int32 vertex ids, int64 index) on one triangle."""
    verts = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    ids = np.array([[0, 1, 2]], np.int32)
    f32 = np.float32
    pose_gaussians(verts, ids, np.ones(1), np.zeros(1, np.int64), ids,
                   np.full((1, 3), 1 / 3, f32), np.zeros(1, f32), np.array([[1, 0, 0, 0]], f32),
                   np.ones((1, 3)), np.eye(3), 1.0, np.zeros(3))  # fmt: skip
