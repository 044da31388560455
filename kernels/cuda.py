"""The CUDA backend: gsplat's rasterizer, with our conventions on both sides.

Only imported when CUDA is present (gsplat has no CPU rasterizer). Colours are evaluated
from SH here (the same code as the CPU path) and rendered as features together with the
camera-space normals, so one gsplat call gives every pass. Differences from the CPU
backend, by gsplat's design: alpha is capped at 0.999 instead of 0.99, and arithmetic is
float32.
"""

from __future__ import annotations

import torch

from .projection import eval_sh, quat_to_rotmat
from .types import Camera


def rasterize_cuda(means, quats, scales, opacities, colors, camera: Camera, width: int,
                   height: int, background=None, passes=("rgb", "alpha", "depth", "normal"),
                   ) -> dict[str, torch.Tensor]:  # fmt: skip
    from gsplat import rasterization

    dev, out_dtype = means.device, means.dtype
    f32 = dict(dtype=torch.float32, device=dev)
    means, quats, scales, opacities = (t.to(**f32) for t in (means, quats, scales, opacities))
    w2c = torch.as_tensor(camera.world_to_camera, **f32)
    ks = torch.tensor([[camera.fx, 0, camera.cx], [0, camera.fy, camera.cy], [0, 0, 1]], **f32)
    if colors.dim() == 3:
        colors = eval_sh(colors.to(**f32), means - torch.as_tensor(camera.position, **f32))
    feats = [colors.to(**f32)]
    if "normal" in passes:
        with torch.no_grad():
            rot = w2c[:3, :3] @ quat_to_rotmat(quats)
            n = rot[torch.arange(len(means), device=dev), :, torch.argmin(scales, dim=1)]
            p = means @ w2c[:3, :3].T + w2c[:3, 3]
            n = torch.where(((n * p).sum(1) > 0)[:, None], -n, n)
        feats.append(n)
    feats = torch.cat(feats, dim=1)
    bg = torch.zeros(feats.shape[1], **f32)
    if background is not None:
        bg[:3] = torch.as_tensor(background, **f32)
    mode = "RGB+ED" if "depth" in passes else "RGB"
    img, alphas, _ = rasterization(
        means, quats, scales, opacities, feats, w2c[None], ks[None], width, height,
        near_plane=camera.near, far_plane=camera.far, eps2d=0.3, sh_degree=None,
        packed=False, tile_size=16, backgrounds=bg[None], render_mode=mode,
        rasterize_mode="classic",
    )  # fmt: skip
    img, alpha = img[0], alphas[0, ..., 0]
    out = {"rgb": img[..., :3], "alpha": alpha}
    with torch.no_grad():
        if "depth" in passes:
            out["depth"] = torch.where(alpha > 0, img[..., -1], torch.inf)
        if "normal" in passes:
            n = img[..., 3:6]
            norm = n.norm(dim=-1, keepdim=True)
            out["normal"] = torch.where(norm > 0, n / norm.clamp_min(1e-12), torch.zeros_like(n))
    return {k: v.to(out_dtype) for k, v in out.items()}
