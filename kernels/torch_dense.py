"""A plain vectorised-torch rasterizer: the benchmark baseline and a gradient cross-check.

Per 16x16 tile it evaluates every overlapping Gaussian on every pixel of the tile at
once and composites with ``cumprod``; autograd gives the backward pass. Same maths as the
reference (the early stop at transmittance 1e-4 becomes a mask after the first pixel
whose transmittance would reach it). Memory grows with tile population; meant for
comparisons, not production.
"""

from __future__ import annotations

import torch

from .projection import project
from .reference import ALPHA_MAX, ALPHA_MIN, T_MIN
from .types import Camera

TILE = 16


def rasterize_torch(means, quats, scales, opacities, colors, camera: Camera, width: int,
                    height: int, background=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """rgb [H,W,3] and alpha [H,W], differentiable through autograd."""
    p = project(means, quats, scales, colors, camera, width, height)
    dt = means.dtype
    vis = torch.nonzero(p.radii > 0).squeeze(1)
    vis = vis[torch.argsort(p.depths[vis], stable=True)]
    m2d, con, col, op, rad = (
        p.means2d[vis],
        p.conics[vis],
        p.colors[vis],
        opacities[vis],
        p.radii[vis],
    )
    r = rad.to(dt)
    # inclusive pixel boxes, as in the reference
    j0 = torch.ceil(m2d[:, 0].detach() - r - 0.5).clamp_min(0)
    j1 = torch.floor(m2d[:, 0].detach() + r - 0.5).clamp_max(width - 1)
    i0 = torch.ceil(m2d[:, 1].detach() - r - 0.5).clamp_min(0)
    i1 = torch.floor(m2d[:, 1].detach() + r - 0.5).clamp_max(height - 1)
    rgb = torch.zeros(height, width, 3, dtype=dt)
    alpha_img = torch.zeros(height, width, dtype=dt)
    for y0 in range(0, height, TILE):
        for x0 in range(0, width, TILE):
            y1, x1 = min(y0 + TILE, height), min(x0 + TILE, width)
            hit = (
                (j0 <= x1 - 1) & (j1 >= x0) & (i0 <= y1 - 1) & (i1 >= y0) & (j0 <= j1) & (i0 <= i1)
            )
            idx = torch.nonzero(hit).squeeze(1)
            if len(idx) == 0:
                continue
            jj, ii = torch.meshgrid(torch.arange(x0, x1, dtype=dt), torch.arange(y0, y1, dtype=dt),
                                    indexing="xy")  # fmt: skip
            px, py = jj.reshape(-1, 1), ii.reshape(-1, 1)  # [P, 1]
            dx = px + 0.5 - m2d[idx, 0]
            dy = py + 0.5 - m2d[idx, 1]
            a, b, c = con[idx, 0], con[idx, 1], con[idx, 2]
            power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
            alpha = (op[idx] * torch.exp(power)).clamp_max(ALPHA_MAX)
            inside = (px >= j0[idx]) & (px <= j1[idx]) & (py >= i0[idx]) & (py <= i1[idx])
            keep = inside & (power <= 0) & (alpha >= ALPHA_MIN)
            alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
            t_incl = torch.cumprod(1 - alpha, dim=1)
            stopped = torch.cumsum((t_incl <= T_MIN).to(torch.int32), dim=1) > 0
            alpha = torch.where(stopped, torch.zeros_like(alpha), alpha)
            t_excl = torch.cumprod(
                torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1
            )
            w = alpha * t_excl  # [P, K]
            rgb[y0:y1, x0:x1] = (w @ col[idx]).reshape(y1 - y0, x1 - x0, 3)
            alpha_img[y0:y1, x0:x1] = w.sum(1).reshape(y1 - y0, x1 - x0)
    if background is not None:
        rgb = rgb + (1 - alpha_img)[..., None] * torch.as_tensor(background, dtype=dt)
    return {"rgb": rgb, "alpha": alpha_img}
