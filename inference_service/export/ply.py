"""INRIA 3D Gaussian Splatting ``.ply``: what SuperSplat, splat-transform and Blender's
splat importers read.

Binary little-endian, one ``vertex`` element with float properties, in this order:
``x y z nx ny nz f_dc_0..2 f_rest_0..M opacity scale_0..2 rot_0..3``, where f_rest is
channel-major (all red coefficients, then green, then blue), opacity is a logit, scale a
log and rot a (w, x, y, z) quaternion. Normals are written as zeros, as 3DGS does.

Colour is sRGB, as the layout's other writers (3DGS trains on sRGB photos) and its
viewers take it: ``0.5 + C0 * f_dc`` is the colour shown. Avatars hold linear colour
(the service renders in linear light and encodes sRGB on output), so the DC term is
converted exactly and higher SH degrees by the transfer curve's slope at the DC colour
(first order; builds fit degree 0 only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kernels.sh import C0
from protocol.files import atomic_write

from ..images import linear_to_srgb, linear_to_srgb_slope
from ..posing import PosedGaussians


def frame_file_name(frame: int, last: int) -> str:
    """``frame_NNNNN.ply``, padded to five digits or to ``last``'s width if wider, so a
    sequence's files sort by name in frame order."""
    return f"frame_{frame:0{max(5, len(str(last)))}d}.ply"


def property_names(num_bases: int) -> list[str]:
    rest = 3 * (num_bases - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def srgb_sh(sh: np.ndarray) -> np.ndarray:
    """Linear-light SH coefficients ``[N, K, 3]`` → the sRGB ones a ``.ply`` holds: the DC
    colour through the sRGB curve, the rest scaled by its slope there."""
    linear = np.clip(C0 * sh[:, 0, :].astype(np.float64) + 0.5, 0.0, 1.0)
    out = np.empty(sh.shape, np.float64)
    out[:, 0, :] = (linear_to_srgb(linear) - 0.5) / C0
    if sh.shape[1] > 1:
        out[:, 1:, :] = sh[:, 1:, :] * linear_to_srgb_slope(linear)[:, None, :]
    return out


def ply_bytes(g: PosedGaussians, sh_degree: int | None = None) -> bytes:
    """``sh_degree``: the degree the file holds (default: the Gaussians' own). Coefficients
    the Gaussians lack are written as zeros, which change no colour: loaders made for
    3DGS's training output (its reference code and tools built on it) assert degree 3."""
    n, have = g.sh.shape[:2]
    k = have if sh_degree is None else (sh_degree + 1) ** 2
    names = property_names(k)
    rows = np.zeros((n, len(names)), "<f4")
    rows[:, 0:3] = g.means
    sh = np.zeros((n, k, 3))
    sh[:, : min(k, have)] = srgb_sh(g.sh)[:, :k]
    rows[:, 6:9] = sh[:, 0, :]
    rows[:, 9 : 9 + 3 * (k - 1)] = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1)
    op = np.clip(g.opacities, 1e-7, 1 - 1e-7)
    rows[:, -8] = np.log(op / (1 - op))
    rows[:, -7:-4] = np.log(np.maximum(g.scales, 1e-12))
    rows[:, -4:] = g.quats / np.linalg.norm(g.quats, axis=1, keepdims=True)
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
        + [f"property float {p}" for p in names]
        + ["end_header"]
    )
    return header.encode("ascii") + b"\n" + rows.tobytes()


def write_ply(path: str | Path, g: PosedGaussians, sh_degree: int | None = None) -> Path:
    """Write atomically; returns the path. ``sh_degree`` as :func:`ply_bytes`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, ply_bytes(g, sh_degree))
    return path
