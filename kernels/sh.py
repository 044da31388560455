"""Real spherical harmonics up to degree 3, with the constants 3DGS uses.

Colour = SH(dir) + 0.5, clamped at 0, where dir points from the camera to the Gaussian.
"""

from __future__ import annotations

import numpy as np

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005,
      -1.0925484305920792, 0.5462742152960396)  # fmt: skip
C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
      -0.4570457994644658, 1.445305721320277, -0.5900435899266435)  # fmt: skip


def num_bases(degree: int) -> int:
    return (degree + 1) ** 2


def degree_of(num: int) -> int:
    for d in range(4):
        if num_bases(d) == num:
            return d
    raise ValueError(f"{num} SH bases is not (degree + 1)^2 for a degree in 0..3")


def sh_basis(dirs, degree: int):
    """Basis values ``[N, K]`` for unit directions ``[N, 3]``: numpy arrays or torch
    tensors (the same arithmetic serves the CPU inference path and autograd)."""
    x, y, z = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    out = [x * 0 + C0]
    if degree >= 1:
        out += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [C2[0] * xy, C2[1] * yz, C2[2] * (2 * zz - xx - yy), C2[3] * xz,
                C2[4] * (xx - yy)]  # fmt: skip
    if degree >= 3:
        out += [
            C3[0] * y * (3 * xx - yy),
            C3[1] * xy * z,
            C3[2] * y * (4 * zz - xx - yy),
            C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            C3[4] * x * (4 * zz - xx - yy),
            C3[5] * z * (xx - yy),
            C3[6] * x * (xx - 3 * yy),
        ]
    if isinstance(dirs, np.ndarray):
        return np.stack(out, axis=1)
    import torch

    return torch.stack(out, dim=1)


def eval_sh(sh: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Colours ``[N, 3]`` from coefficients ``[N, K, 3]`` and directions ``[N, 3]``."""
    degree = degree_of(sh.shape[1])
    if degree == 0:  # view-independent: no directions needed
        return np.maximum(C0 * sh[:, 0, :] + 0.5, 0.0)
    d = dirs / np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-12)
    basis = sh_basis(d, degree)
    return np.maximum(np.einsum("nk,nkc->nc", basis, sh) + 0.5, 0.0)


def rgb_to_sh0(rgb: np.ndarray) -> np.ndarray:
    """Linear colour ``[..., 3]`` → degree-0 coefficient ``[..., 3]``."""
    return (np.asarray(rgb) - 0.5) / C0
