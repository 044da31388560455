"""Per-Gaussian work in torch: EWA projection and SH colour, differentiable by autograd.

The same maths as ``reference.project`` (which stays the readable twin), vectorised over
Gaussians; torch's autograd carries gradients from 2-D means, conics and colours back to
the 3-D parameters. The plain-torch rasterizer (``torch_dense.py``) projects with it,
and tests hold the CPU backend's hand-written projection (``cpu_projection.py``) and its
gradients to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import EPS2D
from .sh import C0, degree_of, sh_basis
from .types import Camera


@dataclass(frozen=True)
class Projected:
    """Screen-space Gaussians. Differentiable: ``means2d`` [N,2], ``conics`` [N,3]
    (a, b, c of the inverse 2-D covariance), ``colors`` [N,3]. Not: ``depths`` [N]
    (camera z), ``normals`` [N,3] (camera space), ``radii`` [N] int64 (0 = culled)."""

    means2d: torch.Tensor
    conics: torch.Tensor
    colors: torch.Tensor
    depths: torch.Tensor
    normals: torch.Tensor
    radii: torch.Tensor


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=1,
    )


def eval_sh(sh: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Colours [N,3] from SH [N,K,3] and directions [N,3] (camera → Gaussian)."""
    if sh.shape[1] == 1:  # view-independent: the builder's colours, every fitting step
        return (sh[:, 0] * C0 + 0.5).clamp_min(0.0)
    d = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    basis = sh_basis(d, degree_of(sh.shape[1]))
    return (torch.einsum("nk,nkc->nc", basis, sh) + 0.5).clamp_min(0.0)


def project(
    means: torch.Tensor,  # [N, 3]
    quats: torch.Tensor,  # [N, 4]
    scales: torch.Tensor,  # [N, 3]
    colors: torch.Tensor,  # [N, 3] or SH [N, K, 3]
    camera: Camera,
    width: int,
    height: int,
) -> Projected:
    dt = means.dtype
    w2c = torch.as_tensor(camera.world_to_camera, dtype=dt)
    rot_cw, trans = w2c[:3, :3], w2c[:3, 3]
    p = means @ rot_cw.T + trans
    x, y, z = p.unbind(1)
    in_range = (z > camera.near) & (z < camera.far)
    zs = torch.where(in_range, z, torch.ones_like(z))

    rot = rot_cw @ quat_to_rotmat(quats)
    m = rot * scales[:, None, :]
    cov3d = m @ m.transpose(1, 2)

    fx, fy, cx, cy = camera.fx, camera.fy, camera.cx, camera.cy
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = zs * (x / zs).clamp(-(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
    ty = zs * (y / zs).clamp(-(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(zs)
    jac = torch.stack(
        [
            torch.stack([fx / zs, zero, -fx * tx / zs**2], -1),
            torch.stack([zero, fy / zs, -fy * ty / zs**2], -1),
        ],
        dim=1,
    )
    cov2d = jac @ cov3d @ jac.transpose(1, 2)
    a = cov2d[:, 0, 0] + EPS2D
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + EPS2D
    det = a * c - b * b
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], 1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = mid + torch.sqrt((mid * mid - det).clamp_min(0.1))
        radii = torch.ceil(3.0 * torch.sqrt(lam))
        visible = (
            in_range
            & (det > 0)
            & (means2d[:, 0] + radii > 0)
            & (means2d[:, 0] - radii < width)
            & (means2d[:, 1] + radii > 0)
            & (means2d[:, 1] - radii < height)
        )
        radii = torch.where(visible, radii, torch.zeros_like(radii)).to(torch.int64)
        shortest = torch.argmin(scales, dim=1)
        normals = rot[torch.arange(len(p)), :, shortest].detach().clone()
        flip = (normals * p).sum(1) > 0
        normals[flip] *= -1

    safe_det = torch.where(visible, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], 1)
    if colors.dim() == 3:
        cam_pos = torch.as_tensor(camera.position, dtype=dt)
        colors = eval_sh(colors, means - cam_pos)
    return Projected(means2d, conics, colors, z.detach(), normals, radii)
