"""What the photo fits share: the person mask, the crop around the head they work on, and
the Gaussians bound to the head as the photo shows it (``bind``); the fit itself is the
COIN fit (``coin.py``)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from kernels import Camera

from ..avatar import BoundGaussians
from ..geometry import quat_to_rotmat, rotmat_to_quat, triangle_frames

#: preset → side in pixels of the square crop around the head that fits work on
CROP_SIZE = {"fast": 192, "default": 288, "high": 384}

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


def resample(image: np.ndarray, box, size: int) -> np.ndarray:
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
