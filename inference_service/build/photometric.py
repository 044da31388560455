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

#: The person mask's edge is refined on the photo scaled to at most this side (pixels).
MATTE_SIDE = 1024
#: Guided filter window radius, as a share of that image's longer side (8 px at 512):
#: MediaPipe segments at 256 px, and the window must reach across its blurred edge.
MATTE_RADIUS = 1 / 64
MATTE_EPS = 1e-3  # guided filter regulariser, per squared unit of grey level in [0, 1]

#: A head's box times this, around it, is what the person mask segments (see person_mask):
#: the photo's own portraits (a head 0.46 and 0.77 of their side) are segmented whole.
SEG_REACH = 2.5

_seg_lock = threading.Lock()
_seg_model = None


def person_mask(photo: np.ndarray, head: tuple[float, float, float] | None = None) -> np.ndarray:
    """[H, W] bool: where MediaPipe's selfie segmentation sees a person, its edge moved
    to the photo's own edges (:func:`refine_matte`).

    MediaPipe segments a 256 px copy, in which a head small in a large photo is lost (a
    200 px head in a 4000 px photo gave an empty mask). Given the ``head``'s square box
    (x0, y0, side), only a square :data:`SEG_REACH` times that side around it is
    segmented, where that is smaller than the photo; outside it is not the person."""
    h, w = photo.shape[:2]
    if head is not None:
        x0, y0, side = head
        reach = max(32, round(SEG_REACH * side))
        if reach < max(h, w):
            cw, ch = min(reach, w), min(reach, h)
            left = int(np.clip(round(x0 + (side - cw) / 2), 0, w - cw))
            top = int(np.clip(round(y0 + (side - ch) / 2), 0, h - ch))
            mask = np.zeros((h, w), bool)
            mask[top : top + ch, left : left + cw] = _segment(
                np.ascontiguousarray(photo[top : top + ch, left : left + cw])
            )
            return mask
    return _segment(photo)


def _segment(photo: np.ndarray) -> np.ndarray:
    global _seg_model
    import mediapipe as mp

    with _seg_lock:
        if _seg_model is None:
            _seg_model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
        result = _seg_model.process(photo)
    if result.segmentation_mask is None:
        return np.ones(photo.shape[:2], bool)
    return refine_matte(photo, result.segmentation_mask) > 0.5


def box_mean(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean of ``a`` [H, W] over the (2 radius + 1)² window around each pixel."""
    from scipy import ndimage

    return ndimage.uniform_filter(a, 2 * radius + 1, mode="reflect")


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter: ``src`` [H, W] smoothed as a local linear function of
    ``guide`` [H, W], so its edges snap to the guide's."""
    mean_g, mean_s = box_mean(guide, radius), box_mean(src, radius)
    cov = box_mean(guide * src, radius) - mean_g * mean_s
    var = box_mean(guide * guide, radius) - mean_g * mean_g
    a = cov / (var + eps)
    b = mean_s - a * mean_g
    return box_mean(a, radius) * guide + box_mean(b, radius)


def refine_matte(photo: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """[H, W] float32: the soft segmentation ``soft`` with its edge guided by the photo.
    MediaPipe's mask reaches 2-3 px past a hair line into the backdrop (measured on the
    astronaut); pixels there mix the backdrop into the hair the fit learns."""
    from PIL import Image

    h, w = soft.shape
    scale = min(1.0, MATTE_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = Image.fromarray(photo).convert("L").resize(size, Image.BILINEAR)
    small = Image.fromarray(soft.astype(np.float32)).resize(size, Image.BILINEAR)
    guide = np.asarray(grey, np.float32) / 255.0
    radius = max(1, round(max(size) * MATTE_RADIUS))
    refined = guided_filter(guide, np.asarray(small, np.float32), radius, MATTE_EPS)
    refined = refined.astype(np.float32)
    if size != (w, h):
        refined = np.asarray(Image.fromarray(refined).resize((w, h), Image.BILINEAR))
    return refined


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
    # the box and what the filter reads around it (its support grows with the shrink),
    # zeros outside the image: a window, not a padded copy of a whole 80 MP photo
    margin = int(np.ceil(side / size)) + 2
    top, left = int(np.floor(y0)) - margin, int(np.floor(x0)) - margin
    bottom, right = int(np.ceil(y0 + side)) + margin, int(np.ceil(x0 + side)) + margin
    h, w = image.shape[:2]
    window = np.zeros((bottom - top, right - left) + image.shape[2:], image.dtype)
    r0, r1, c0, c1 = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    if r1 > r0 and c1 > c0:
        window[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    region = (x0 - left, y0 - top, x0 - left + side, y0 - top + side)
    return np.asarray(Image.fromarray(window).resize((size, size), Image.BILINEAR, box=region))


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
