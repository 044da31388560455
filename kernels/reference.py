"""The slow, obviously correct rasterizer: the ground truth other backends are tested on.

One Python loop over Gaussians sorted front to back; each Gaussian is evaluated on the
pixels of its 3-sigma box and composited with the transmittance so far. Same maths as
3DGS/gsplat (EWA projection with the 1.3x frustum clamp, 0.3 px low-pass, alpha capped at
0.99, contributions under 1/255 dropped, a pixel stops once transmittance would fall to
1e-4 or below). Not supported: antialiased mode, gradients.
"""

from __future__ import annotations

import math

import numpy as np

from .sh import eval_sh
from .types import Camera, Passes

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
EPS2D = 0.3


def quat_to_rotmat(quats: np.ndarray) -> np.ndarray:
    """Quaternions ``[N, 4]`` (w, x, y, z), normalised here → rotations ``[N, 3, 3]``."""
    q = quats / np.linalg.norm(quats, axis=1, keepdims=True)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def project(means, quats, scales, camera: Camera, width: int, height: int):
    """EWA projection. Returns camera points ``[N,3]``, means2d ``[N,2]``, cov2d
    ``[N,2,2]`` (with the low-pass added), camera-space normals ``[N,3]``, radii ``[N]``
    (0 = culled)."""
    rot_cw = camera.world_to_camera[:3, :3]
    p = means @ rot_cw.T + camera.world_to_camera[:3, 3]
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    in_range = (z > camera.near) & (z < camera.far)
    zs = np.where(in_range, z, 1.0)

    rot = rot_cw @ quat_to_rotmat(quats)  # camera-from-local
    m = rot * scales[:, None, :]
    cov3d = m @ m.transpose(0, 2, 1)

    tan_x, tan_y = 0.5 * width / camera.fx, 0.5 * height / camera.fy
    lim_x_pos = (width - camera.cx) / camera.fx + 0.3 * tan_x
    lim_x_neg = camera.cx / camera.fx + 0.3 * tan_x
    lim_y_pos = (height - camera.cy) / camera.fy + 0.3 * tan_y
    lim_y_neg = camera.cy / camera.fy + 0.3 * tan_y
    tx = zs * np.clip(x / zs, -lim_x_neg, lim_x_pos)
    ty = zs * np.clip(y / zs, -lim_y_neg, lim_y_pos)
    jac = np.zeros((len(p), 2, 3))
    jac[:, 0, 0] = camera.fx / zs
    jac[:, 0, 2] = -camera.fx * tx / zs**2
    jac[:, 1, 1] = camera.fy / zs
    jac[:, 1, 2] = -camera.fy * ty / zs**2
    cov2d = jac @ cov3d @ jac.transpose(0, 2, 1) + EPS2D * np.eye(2)

    means2d = np.stack([camera.fx * x / zs + camera.cx, camera.fy * y / zs + camera.cy], 1)
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    det = a * c - b * b
    mid = 0.5 * (a + c)
    lam = mid + np.sqrt(np.maximum(mid * mid - det, 0.1))
    radii = np.ceil(3.0 * np.sqrt(lam))
    visible = (
        in_range
        & (det > 0)
        & (means2d[:, 0] + radii > 0)
        & (means2d[:, 0] - radii < width)
        & (means2d[:, 1] + radii > 0)
        & (means2d[:, 1] - radii < height)
    )
    radii = np.where(visible, radii, 0).astype(np.int64)

    shortest = np.argmin(scales, axis=1)
    normals = rot[np.arange(len(p)), :, shortest]
    normals *= np.where(np.sum(normals * p, axis=1) > 0, -1.0, 1.0)[:, None]
    return p, means2d, cov2d, normals, radii


def rasterize_reference(
    means: np.ndarray,  # [N, 3] world metres
    quats: np.ndarray,  # [N, 4] (w, x, y, z), need not be normalised
    scales: np.ndarray,  # [N, 3] metres (not log)
    opacities: np.ndarray,  # [N] in [0, 1]
    colors: np.ndarray,  # [N, 3] linear colour, or [N, K, 3] SH coefficients
    camera: Camera,
    width: int,
    height: int,
    passes: tuple[str, ...] = ("rgb", "alpha", "depth"),
    background: np.ndarray | None = None,  # [3]
    out_dtype=np.float32,  # float64 keeps full precision (finite-difference tests)
) -> Passes:
    means = np.asarray(means, np.float64)
    n = len(means)
    assert means.shape == (n, 3), means.shape
    assert np.shape(quats) == (n, 4) and np.shape(scales) == (n, 3)
    assert np.shape(opacities) == (n,)
    colors = np.asarray(colors, np.float64)
    if colors.ndim == 3:
        colors = eval_sh(colors, means - camera.position)
    assert colors.shape == (n, 3), colors.shape

    p, means2d, cov2d, normals, radii = project(
        means,
        np.asarray(quats, np.float64),
        np.asarray(scales, np.float64),
        camera,
        width,
        height,
    )
    conic = np.linalg.inv(np.where(radii[:, None, None] > 0, cov2d, np.eye(2)))

    rgb = np.zeros((height, width, 3))
    depth_acc = np.zeros((height, width))
    normal_acc = np.zeros((height, width, 3))
    trans = np.ones((height, width))
    done = np.zeros((height, width), bool)

    order = np.argsort(p[:, 2], kind="stable")
    for g in order[radii[order] > 0]:
        r = radii[g]
        mx, my = means2d[g]
        # pixel centres (j + 0.5) inside [mean - r, mean + r]
        j0, j1 = max(0, math.ceil(mx - r - 0.5)), min(width - 1, math.floor(mx + r - 0.5))
        i0, i1 = max(0, math.ceil(my - r - 0.5)), min(height - 1, math.floor(my + r - 0.5))
        if j0 > j1 or i0 > i1:
            continue
        dx = (np.arange(j0, j1 + 1) + 0.5 - mx)[None, :]
        dy = (np.arange(i0, i1 + 1) + 0.5 - my)[:, None]
        ca, cb, cc = conic[g, 0, 0], conic[g, 0, 1], conic[g, 1, 1]
        power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
        alpha = np.minimum(ALPHA_MAX, opacities[g] * np.exp(power))
        tile = (slice(i0, i1 + 1), slice(j0, j1 + 1))
        t = trans[tile]
        live = (power <= 0) & (alpha >= ALPHA_MIN) & ~done[tile]
        stop = live & (t * (1 - alpha) <= T_MIN)
        done[tile] |= stop
        live &= ~stop
        w = np.where(live, alpha * t, 0.0)
        rgb[tile] += w[..., None] * colors[g]
        depth_acc[tile] += w * p[g, 2]
        normal_acc[tile] += w[..., None] * normals[g]
        trans[tile] = np.where(live, t * (1 - alpha), t)

    alpha_img = 1.0 - trans
    out: dict[str, np.ndarray] = {}
    if "rgb" in passes:
        if background is not None:
            rgb = rgb + trans[..., None] * np.asarray(background, np.float64)
        out["rgb"] = rgb.astype(out_dtype)
    if "alpha" in passes:
        out["alpha"] = alpha_img.astype(out_dtype)
    if "depth" in passes:
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(alpha_img > 0, depth_acc / alpha_img, np.inf)
        out["depth"] = d.astype(out_dtype)
    if "normal" in passes:
        norm = np.linalg.norm(normal_acc, axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["normal"] = np.where(norm > 0, normal_acc / norm, 0.0).astype(out_dtype)
    return Passes(**out)
