"""Views of the head the builder fits to: the photo and the pseudo-views made from it.

A :class:`View` is one stage boundary: pseudo-view generation makes them, the optional
``enhance`` stage (diffusion) repaints their low-confidence pixels, and the COIN fit
consumes them. :func:`warp` carries colour from one view to another through the head's
rendered depth; it is how the photo fills the pseudo-views and how a finished
pseudo-view constrains the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kernels import Camera

#: Where a view's pixel colour came from (``View.source``).
SOURCE_NONE = 0  # nothing yet (or outside the head)
SOURCE_PHOTO = 1  # warped from the input photo by depth
SOURCE_MIRROR = 2  # warped from the photo after mirroring across the face's symmetry
SOURCE_INPAINT = 3  # filled from skin/hair statistics
SOURCE_GENERATED = 4  # painted by a diffusion model (``enhance``)
SOURCE_VIEW = 5  # warped from another finished view


@dataclass(frozen=True)
class View:
    """One view of the head with a colour target and how far to trust it.

    Attributes:
        camera: OpenCV pinhole in the head's canonical frame (metres, +Z up, facing -Y).
        image: ``[H, W, 3]`` float32 linear RGB in [0, 1].
        confidence: ``[H, W]`` float32 in [0, 1]; 1 where the photo saw the surface
            head-on, 0 where nothing is known. Fits weight their loss by it.
        depth: ``[H, W]`` float32 camera z in metres of the head as built before the fit;
            +inf outside the head.
        alpha: ``[H, W]`` float32 in [0, 1], the head's rendered coverage.
        source: ``[H, W]`` uint8, one of the ``SOURCE_*`` codes per pixel.
        yaw, pitch: degrees about the head centre (0, 0 = the front); ``None`` for the photo.
    """

    camera: Camera
    image: np.ndarray
    confidence: np.ndarray
    depth: np.ndarray
    alpha: np.ndarray
    source: np.ndarray
    yaw: float | None = None
    pitch: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.image.shape[1], self.image.shape[0]

    def with_pixels(self, image, confidence, source) -> View:
        """A copy with new colour, confidence and source (same camera and geometry)."""
        return replace(self, image=image, confidence=confidence, source=source)


def unproject(depth: np.ndarray, camera: Camera) -> np.ndarray:
    """``[H, W, 3]`` world points of each pixel centre at its depth (inf where empty)."""
    h, w = depth.shape
    j, i = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    x = (j - camera.cx) / camera.fx * depth
    y = (i - camera.cy) / camera.fy * depth
    cam = np.stack([x, y, depth], -1)
    r, t = camera.world_to_camera[:3, :3], camera.world_to_camera[:3, 3]
    with np.errstate(invalid="ignore"):
        return (cam - t) @ r  # r.T applied to each row: camera → world


def _bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample ``image`` [H, W, ...] at continuous pixel coordinates (u right, v down)."""
    h, w = image.shape[:2]
    x = np.clip(u - 0.5, 0, w - 1)
    y = np.clip(v - 0.5, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 2 if w > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 2 if h > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    if image.ndim == 3:
        fx, fy = fx[:, None], fy[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _nearest_depth(depth: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The source's depth at each sample: bilinear where the 2x2 pixels around it are
    all covered, else their minimum (inf-safe). The minimum alone would reject sloped
    surfaces, whose depth changes by more than the tolerance across one pixel; bilinear
    across an occluder's edge gives a depth between the two surfaces, so the hidden one
    stays rejected."""
    h, w = depth.shape
    x0 = np.clip(np.floor(u - 0.5).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(v - 0.5).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    corners = [depth[y0, x0], depth[y0, x1], depth[y1, x0], depth[y1, x1]]
    nearest = np.minimum.reduce(corners)
    full = np.isfinite(np.maximum.reduce(corners))
    out = nearest.copy()
    if full.any():
        out[full] = _bilinear(depth, u[full], v[full])
    return out


def warp(
    src_image: np.ndarray,  # [Hs, Ws, C] any per-pixel quantity of the source view
    src_depth: np.ndarray,  # [Hs, Ws] the source's camera z, inf where empty
    src_camera: Camera,
    dst_depth: np.ndarray,  # [H, W] the destination's camera z, inf where empty
    dst_camera: Camera,
    tolerance: float = 0.01,  # metres: how far behind the source's surface still counts
) -> tuple[np.ndarray, np.ndarray]:
    """Carry ``src_image`` into the destination view through the destination's depth.

    Each destination pixel with finite depth is lifted to its 3-D point, projected into
    the source camera, and takes the source's colour there if the source sees that point
    (inside its image, in front of it, and not hidden: the point's depth in the source is
    within ``tolerance`` of the source's own depth). Returns the warped ``[H, W, C]``
    (zero where not valid) and the validity mask ``[H, W]`` bool.
    """
    h, w = dst_depth.shape
    squeeze = src_image.ndim == 2
    values = src_image[..., None] if squeeze else src_image
    out = np.zeros((h, w, values.shape[2]), np.float32)
    valid = np.zeros((h, w), bool)
    covered = np.isfinite(dst_depth) & (dst_depth > 0)
    if covered.any():
        points = unproject(dst_depth, dst_camera)[covered]
        r, t = src_camera.world_to_camera[:3, :3], src_camera.world_to_camera[:3, 3]
        p = points @ r.T + t
        z = p[:, 2]
        hs, ws = src_depth.shape
        with np.errstate(divide="ignore", invalid="ignore"):
            u = src_camera.fx * p[:, 0] / z + src_camera.cx
            v = src_camera.fy * p[:, 1] / z + src_camera.cy
        inside = (z > 0) & (u >= 0) & (u <= ws) & (v >= 0) & (v <= hs)
        seen = np.zeros_like(inside)
        seen[inside] = z[inside] <= _nearest_depth(src_depth, u[inside], v[inside]) + tolerance
        rows, cols = np.nonzero(covered)
        out[rows[seen], cols[seen]] = _bilinear(values, u[seen], v[seen])
        valid[rows[seen], cols[seen]] = True
    return (out[..., 0] if squeeze else out), valid


def mirror_camera(camera: Camera, width: int) -> Camera:
    """The camera that sees the head's mirror image (across x = 0, the canonical frame's
    symmetry plane) exactly as ``camera``'s image of width ``width`` flipped left-right.

    A point X seen by ``camera`` at (u, v) is, mirrored to (-x, y, z), seen by the
    returned camera at (width - u, v). Warping the flipped photo through it lends the
    face's seen side to its unseen side.
    """
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    w2c = flip @ camera.world_to_camera @ flip
    return replace(camera, world_to_camera=w2c, cx=width - camera.cx)
