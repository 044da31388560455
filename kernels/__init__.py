"""Gaussian rasterization behind one call, ``rasterize``, whatever the backend.

Backends: ``reference`` (numpy, slow, the ground truth). The fast CPU kernels and the
CUDA path through gsplat plug in behind the same signature. Importing this package is
cheap: backends load on first use.
"""

from __future__ import annotations

import numpy as np

from .reference import rasterize_reference
from .types import Camera, Passes

BACKENDS = ("reference",)
PASS_NAMES = ("rgb", "alpha", "depth", "normal")


def has_cuda() -> bool:
    """True when torch sees a CUDA device (gsplat's rasterizer needs one)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def rasterize(
    means: np.ndarray,  # [N, 3]
    quats: np.ndarray,  # [N, 4] wxyz
    scales: np.ndarray,  # [N, 3]
    opacities: np.ndarray,  # [N]
    colors: np.ndarray,  # [N, 3] or SH [N, K, 3]
    camera: Camera,
    width: int,
    height: int,
    passes: tuple[str, ...] = ("rgb", "alpha", "depth"),
    background: np.ndarray | None = None,  # [3]
    backend: str = "auto",
) -> Passes:
    """Render Gaussians into the requested passes (see :class:`Passes` for units).

    Example::

        cam = Camera.from_arrays(intrinsics_from_fov(256, 256, 30), orbit(c, 1.0))
        out = rasterize(means, quats, scales, opac, sh, cam, 256, 256, ("rgb", "alpha"))
    """
    unknown = set(passes) - set(PASS_NAMES)
    if unknown:
        raise ValueError(f"unknown passes {sorted(unknown)}; valid: {', '.join(PASS_NAMES)}")
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    return rasterize_reference(
        means, quats, scales, opacities, colors, camera, width, height, passes, background
    )


__all__ = ["BACKENDS", "Camera", "PASS_NAMES", "Passes", "has_cuda", "rasterize"]
