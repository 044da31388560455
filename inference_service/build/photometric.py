"""Fit Gaussian colour, opacity, offset and size to the photo through the rasterizer.

The input view is trusted fully (the "consistent" half of FaceCraft4D's COIN training):
the Gaussians are rendered from the fitted photo camera with the differentiable CPU
backend, on a crop around the head scaled to a preset size, and compared with the photo
(L1, linear colour) inside the head's silhouette where MediaPipe's person segmentation
says the photo shows the person. Only Gaussians facing the camera are fitted; the rest
keep their mirrored or filled colours. Regularisers keep offsets and sizes
near their start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

import kernels
from kernels import Camera

from ..avatar import BoundGaussians
from ..geometry import quat_to_rotmat, rotmat_to_quat, triangle_frames
from ..images import srgb_to_linear

#: preset → (iterations, crop size in pixels)
SCHEDULE = {"fast": (20, 192), "default": (60, 288), "high": (150, 384)}
LR = {"sh": 0.04, "opacity": 0.05, "offset": 2e-4, "log_scale": 0.01}
OFFSET_WEIGHT = 1e4  # per squared metre of offset from the surface
SCALE_WEIGHT = 0.01  # per squared unit of log-scale change

_seg_lock = threading.Lock()
_seg_model = None


def person_mask(photo: np.ndarray) -> np.ndarray:
    """[H, W] bool: where MediaPipe's selfie segmentation sees a person."""
    global _seg_model
    import mediapipe as mp

    with _seg_lock:
        if _seg_model is None:
            _seg_model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
        result = _seg_model.process(photo)
    if result.segmentation_mask is None:
        return np.ones(photo.shape[:2], bool)
    return result.segmentation_mask > 0.5


def _crop_camera(intrinsics, w2c, box, size):
    """Camera for the square ``box`` (x0, y0, side) of the photo resampled to ``size``."""
    x0, y0, side = box
    s = size / side
    fx, fy, cx, cy = intrinsics
    return Camera(fx * s, fy * s, (cx - x0) * s, (cy - y0) * s, w2c)


def _resample(image: np.ndarray, box, size: int) -> np.ndarray:
    """The square ``box`` (x0, y0, side) of ``image`` at ``size`` x ``size``; parts of
    the box outside the image come out black (and outside the person mask)."""
    from PIL import Image

    x0, y0, side = box
    pad = int(np.ceil(side)) + 1
    widths = ((pad, pad), (pad, pad)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, widths)
    region = (x0 + pad, y0 + pad, x0 + pad + side, y0 + pad + side)
    return np.asarray(Image.fromarray(padded).resize((size, size), Image.BILINEAR, box=region))


def bind(
    g: BoundGaussians,
    vertices: np.ndarray,  # [V, 3] the mesh the Gaussians sit on
    rest_vertices: np.ndarray,  # [V, 3] the rest mesh their scales are stored for
    triangles: np.ndarray,  # [T, 3]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of a Gaussian's world pose its fit does not move, float64 tensors:
    base point on the surface ``[N, 3]``, unit normal ``[N, 3]``, world quaternion
    ``[N, 4]`` and the triangle's area stretch from rest ``[N]``. A fit then places
    Gaussians at ``base + offset * normal`` with scales ``exp(log_scale) * stretch``."""
    frames, area = triangle_frames(vertices, triangles)
    _, rest_area = triangle_frames(rest_vertices, triangles)
    corners = vertices[triangles[g.triangle]]
    base = torch.tensor(np.einsum("nk,nkc->nc", g.bary, corners))
    normal = torch.tensor(frames[g.triangle, :, 2])
    quats = torch.tensor(
        rotmat_to_quat(frames[g.triangle] @ quat_to_rotmat(g.rotation.astype(np.float64)))
    )
    stretch = torch.tensor(np.sqrt(area / np.maximum(rest_area, 1e-20))[g.triangle])
    return base, normal, quats, stretch


def photo_crop(
    points: np.ndarray,  # [N, 3] world points of the head
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    size: int,
) -> tuple[tuple[float, float, float], Camera]:
    """The square box (x0, y0, side) of the photo around the projected head, 10 % wider,
    and the camera that sees it at ``size`` x ``size``: fits work on this crop so their
    cost is the preset's, not the photo's."""
    from protocol.camera import project

    uv, z = project(points, intrinsics, world_to_camera)
    ok = z > 0
    lo, hi = uv[ok].min(0), uv[ok].max(0)
    side = float(max(hi - lo) * 1.1)
    center = 0.5 * (lo + hi)
    box = (float(center[0] - side / 2), float(center[1] - side / 2), side)
    return box, _crop_camera(intrinsics, world_to_camera, box, size)


def fit_photo(
    gaussians: BoundGaussians,
    vertices: np.ndarray,  # [V, 3] the head as the photo shows it
    rest_vertices: np.ndarray,  # [V, 3] the rest mesh the avatar keeps
    triangles: np.ndarray,
    photo: np.ndarray,  # [H, W, 3] uint8 sRGB
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    preset: str,
    progress: Callable[[float, str], None] = lambda f, m: None,
    person: np.ndarray | None = None,
) -> tuple[BoundGaussians, dict]:
    """Returns the fitted Gaussians and facts about the fit (loss before/after).
    ``person``: the photo's :func:`person_mask` if the caller has it (else computed)."""
    iterations, size = SCHEDULE[preset]
    g = gaussians
    base, normal, quats, stretch = bind(g, vertices, rest_vertices, triangles)
    box, cam = photo_crop(base.numpy(), intrinsics, world_to_camera, size)
    target = torch.tensor(srgb_to_linear(_resample(photo, box, size) / 255.0))
    if person is None:
        person = person_mask(photo)
    person = torch.tensor(_resample((person * 255).astype(np.uint8), box, size) > 127)

    sh = torch.tensor(g.sh.astype(np.float64), requires_grad=True)
    opacity = torch.tensor(g.opacity_logit.astype(np.float64), requires_grad=True)
    offset = torch.tensor(g.offset.astype(np.float64), requires_grad=True)
    log_scale = torch.tensor(g.log_scale.astype(np.float64), requires_grad=True)
    start_scale = log_scale.detach().clone()
    opt = torch.optim.Adam([
        {"params": [sh], "lr": LR["sh"]}, {"params": [opacity], "lr": LR["opacity"]},
        {"params": [offset], "lr": LR["offset"]}, {"params": [log_scale], "lr": LR["log_scale"]},
    ])  # fmt: skip

    def render():
        means = base + offset[:, None] * normal
        scales = torch.exp(log_scale) * stretch[:, None]
        out = kernels.rasterize(means, quats, scales, torch.sigmoid(opacity), sh, cam, size,
                                size, ("rgb", "alpha"), backend="cpu")  # fmt: skip
        return out.rgb, out.alpha

    with torch.no_grad():
        _, alpha0 = render()
    mask = (alpha0 > 0.5) & person
    if mask.sum() < 100:
        return gaussians, {"iterations": 0, "reason": "head barely visible in the photo"}
    weight = mask.to(torch.float64)[..., None]
    # Only Gaussians facing the camera learn from the photo. Surfaces are not fully
    # opaque, so the back of the head gets gradients through the face and would turn
    # into whatever colour makes up the difference.
    cam_pos = torch.tensor(cam.position)
    frozen = ((normal * (cam_pos - base)).sum(1) <= 0).numpy()
    losses = []
    for it in range(iterations):
        opt.zero_grad()
        rgb, _ = render()
        data = (weight * (rgb - target).abs()).sum() / (3 * weight.sum())
        reg = (
            OFFSET_WEIGHT * (offset**2).mean()
            + SCALE_WEIGHT * ((log_scale - start_scale) ** 2).mean()
        )
        loss = data + reg
        loss.backward()
        for p in (sh, opacity, offset, log_scale):
            p.grad[frozen] = 0.0  # Adam moves nothing whose gradient was always 0
        opt.step()
        losses.append(float(data.detach()))
        progress((it + 1) / iterations, f"photo fit {it + 1}/{iterations}: L1 {losses[-1]:.4f}")
    fitted = BoundGaussians(
        triangle=g.triangle, bary=g.bary, rotation=g.rotation,
        offset=offset.detach().numpy().astype(np.float32),
        log_scale=log_scale.detach().numpy().astype(np.float32),
        opacity_logit=opacity.detach().numpy().astype(np.float32),
        sh=sh.detach().numpy().astype(np.float32),
    )  # fmt: skip
    return fitted, {"iterations": iterations, "size": size, "l1_start": round(losses[0], 5),
                    "l1_end": round(losses[-1], 5)}  # fmt: skip
