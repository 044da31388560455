"""Small vectorised geometry helpers (numpy). Quaternions are (w, x, y, z)."""

from __future__ import annotations

import numpy as np

from kernels.reference import quat_to_rotmat

__all__ = [
    "edge_adjacency",
    "quat_to_rotmat",
    "rotmat_to_quat",
    "smoothstep",
    "triangle_frames",
    "vertex_normals",
]


def rotmat_to_quat(r: np.ndarray) -> np.ndarray:
    """Rotations ``[N, 3, 3]`` → unit quaternions ``[N, 4]`` with w >= 0."""
    r = np.asarray(r, np.float64)
    m00, m11, m22 = r[:, 0, 0], r[:, 1, 1], r[:, 2, 2]
    q = np.stack(
        [
            np.sqrt(np.maximum(0.0, 1 + m00 + m11 + m22)) / 2,
            np.sqrt(np.maximum(0.0, 1 + m00 - m11 - m22)) / 2,
            np.sqrt(np.maximum(0.0, 1 - m00 + m11 - m22)) / 2,
            np.sqrt(np.maximum(0.0, 1 - m00 - m11 + m22)) / 2,
        ],
        axis=1,
    )
    q[:, 1] = np.copysign(q[:, 1], r[:, 2, 1] - r[:, 1, 2])
    q[:, 2] = np.copysign(q[:, 2], r[:, 0, 2] - r[:, 2, 0])
    q[:, 3] = np.copysign(q[:, 3], r[:, 1, 0] - r[:, 0, 1])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def triangle_frames(vertices: np.ndarray, triangles: np.ndarray):
    """Per-triangle orthonormal frames ``[T, 3, 3]`` (columns: edge, bitangent, normal)
    and areas ``[T]``. Degenerate triangles get an arbitrary frame and area 0."""
    v0, v1, v2 = (vertices[triangles[:, k]].astype(np.float64) for k in range(3))
    e1, e2 = v1 - v0, v2 - v0
    n = np.cross(e1, e2)
    area2 = np.linalg.norm(n, axis=1)
    t = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-20)
    n = n / np.maximum(area2[:, None], 1e-20)
    b = np.cross(n, t)
    return np.stack([t, b, n], axis=2), 0.5 * area2


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted smooth unit normals ``[V, 3]`` float32; vertices no triangle uses
    (or whose faces cancel) get +Y, so every normal is unit length as glTF requires."""
    v = vertices.astype(np.float64)
    face = np.cross(
        v[triangles[:, 1]] - v[triangles[:, 0]], v[triangles[:, 2]] - v[triangles[:, 0]]
    )
    acc = np.zeros_like(v)
    for k in range(3):
        np.add.at(acc, triangles[:, k], face)
    length = np.linalg.norm(acc, axis=1, keepdims=True)
    ok = length[:, 0] > 1e-30
    out = np.tile(np.array([0.0, 1.0, 0.0]), (len(v), 1))
    out[ok] = acc[ok] / length[ok]
    return out.astype(np.float32)


def edge_adjacency(triangles: np.ndarray, n: int):
    """``[n, n]`` sparse (CSR) matrix with 1 where two of the ``n`` indices share a
    triangle edge (vertex ids, or UV ids for UV islands)."""
    from scipy.sparse import coo_matrix

    a, b = triangles.ravel(), triangles[:, [1, 2, 0]].ravel()
    m = coo_matrix((np.ones(2 * len(a)), (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr()
    m.data[:] = 1.0
    return m


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 at or below ``lo``, 1 at or above ``hi``, a smooth cubic ramp between."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)
