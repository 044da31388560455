"""Gaussian rasterization behind one call, ``rasterize``, whatever the backend.

Backends:
- ``cpu``: our tiled numba kernels, forward and backward (``cpu.py``);
- ``cuda``: gsplat's rasterizer, only when CUDA is present (gsplat has no CPU path);
- ``reference``: numpy, slow, obviously correct: the ground truth tests compare against.

``auto`` picks cuda when available, else cpu. Importing this package is cheap: torch,
numba and gsplat load on first use.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .reference import rasterize_reference
from .types import Camera, Passes

BACKENDS = ("cpu", "cuda", "reference")
PASS_NAMES = ("rgb", "alpha", "depth", "normal", "segment")


@functools.cache
def has_cuda() -> bool:
    """True when torch sees a CUDA device and gsplat imports (its rasterizer needs one)."""
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend() -> str:
    return "cuda" if has_cuda() else "cpu"


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def rasterize(
    means,  # [N, 3] world metres
    quats,  # [N, 4] (w, x, y, z), need not be normalised
    scales,  # [N, 3] metres (not log)
    opacities,  # [N] in [0, 1]
    colors,  # [N, 3] linear colour, or SH coefficients [N, K, 3], K = 1, 4, 9 or 16
    camera: Camera,
    width: int,
    height: int,
    passes: tuple[str, ...] = ("rgb", "alpha", "depth"),
    background=None,  # [3] linear colour behind the Gaussians; None = black
    backend: str = "auto",
    labels=None,  # [N] int labels 0..L-1, needed for the "segment" pass
) -> Passes:
    """Render Gaussians into the requested passes (see :class:`Passes` for units).

    numpy in, numpy out (float32). torch tensors in, torch tensors out: with the cpu and
    cuda backends ``rgb`` and ``alpha`` are differentiable with respect to every input
    tensor, so torch optimisers can fit Gaussians; ``depth``, ``normal`` and ``segment``
    are not. ``segment`` (int32 [H, W]) needs ``labels``.

    Example::

        cam = Camera.from_arrays(intrinsics_from_fov(256, 256, 30), orbit(c, 1.0))
        out = rasterize(means, quats, scales, opac, sh, cam, 256, 256, ("rgb", "alpha"))
    """
    unknown = set(passes) - set(PASS_NAMES)
    if unknown:
        raise ValueError(f"unknown passes {sorted(unknown)}; valid: {', '.join(PASS_NAMES)}")
    if backend == "auto":
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    if backend == "cuda" and not has_cuda():
        raise RuntimeError("the cuda backend needs a CUDA device and gsplat")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if "segment" in passes:
        segment = _segment(means, quats, scales, opacities, camera, width, height, backend,
                           labels)  # fmt: skip
        rest = tuple(p for p in passes if p != "segment")
        out = rasterize(means, quats, scales, opacities, colors, camera, width, height,
                        rest or ("alpha",), background, backend)  # fmt: skip
        return Passes(**{**{k: getattr(out, k) if k in rest else None for k in PASS_NAMES},
                         "segment": segment})  # fmt: skip

    torch_in = _is_torch(means)
    if backend == "reference":
        args = [a.detach().cpu().numpy() if _is_torch(a) else a
                for a in (means, quats, scales, opacities, colors)]  # fmt: skip
        bg = background.detach().cpu().numpy() if _is_torch(background) else background
        out = rasterize_reference(*args, camera, width, height, passes, bg)
        if not torch_in:
            return out
        import torch

        return Passes(**{k: None if v is None else torch.from_numpy(v)
                         for k, v in out.__dict__.items()})  # fmt: skip

    import torch

    if backend == "cuda":
        from .cuda import rasterize_cuda as run
    else:
        from .cpu import rasterize_cpu as run
    if torch_in:
        result = run(
            means, quats, scales, opacities, colors, camera, width, height, background, passes
        )
        return Passes(**{k: result[k] if k in passes else None for k in PASS_NAMES})
    if backend == "cpu":
        from .cpu import rasterize_numpy

        result = rasterize_numpy(means, quats, scales, opacities, colors, camera, width, height,
                                 background, passes)  # fmt: skip
        return Passes(**{k: result[k] if k in passes else None for k in PASS_NAMES})
    tensors = [torch.from_numpy(np.asarray(a, np.float64)).cuda()
               for a in (means, quats, scales, opacities, colors)]  # fmt: skip
    with torch.no_grad():
        result = run(*tensors, camera, width, height, background, passes)
    return Passes(**{k: result[k].cpu().numpy().astype(np.float32) if k in passes else None
                     for k in PASS_NAMES})  # fmt: skip


def _segment(means, quats, scales, opacities, camera, width, height, backend, labels):
    """Label per pixel: the one whose one-hot channel composites to the largest weight
    (ties to the lower label), -1 where nothing was drawn. Three labels per render."""
    if labels is None:
        raise ValueError("the segment pass needs labels: [N] integers 0..L-1")
    torch_in = _is_torch(means)
    lab = labels.detach().cpu().numpy() if _is_torch(labels) else np.asarray(labels)
    if lab.shape != (len(means),) or (lab.size and lab.min() < 0):
        raise ValueError(f"labels must be [N] = [{len(means)}] non-negative integers")
    count = int(lab.max()) + 1 if lab.size else 1
    best = np.full((height, width), -1, np.int32)
    best_w = np.zeros((height, width))
    for first in range(0, count, 3):
        onehot = np.zeros((len(lab), 3))
        for c in range(3):
            onehot[lab == first + c, c] = 1.0
        if torch_in:
            import torch

            onehot = torch.as_tensor(onehot, dtype=means.dtype, device=means.device)
            args = [a.detach() for a in (means, quats, scales, opacities)]
        else:
            args = [means, quats, scales, opacities]
        rgb = rasterize(*args, onehot, camera, width, height, ("rgb",), None, backend).rgb
        rgb = rgb.cpu().numpy() if torch_in else rgb
        for c in range(min(3, count - first)):
            better = rgb[..., c] > best_w
            best[better], best_w[better] = first + c, rgb[..., c][better]
    if torch_in:
        import torch

        return torch.from_numpy(best)
    return best


def warmup(backend: str = "auto") -> None:
    """Load (or, on a cold cache, compile) a backend's kernels with a one-pixel render;
    on the cpu backend also the fitting path's (torch in, gradients back): on a cold
    cache those take seconds more, which a first build would otherwise pay."""
    cam = Camera(1.0, 1.0, 0.5, 0.5, np.eye(4))
    args = (np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0, 0, 0]]), np.full((1, 3), 0.1),
            np.full(1, 0.5), np.ones((1, 1, 3)))  # fmt: skip
    rasterize(*args, cam, 1, 1, ("rgb", "alpha", "depth", "normal"), backend=backend)
    if (default_backend() if backend == "auto" else backend) == "cpu":
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in args]
        out = rasterize(*ts, cam, 1, 1, ("rgb", "alpha"), backend="cpu")
        (out.rgb.sum() + out.alpha.sum()).backward()


__all__ = ["BACKENDS", "Camera", "PASS_NAMES", "Passes", "default_backend", "has_cuda",
           "rasterize", "warmup"]  # fmt: skip
