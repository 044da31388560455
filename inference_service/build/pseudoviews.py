"""Pseudo-views: the head as built, seen from a ring of cameras, each with a colour target.

FaceCraft4D fills views the photo never saw by depth-guided warping of the input, then
an image generator for the rest. Here, without weights: each pseudo-view renders the
initial Gaussians (depth, coverage, which part is hair) and takes, per pixel,

1. the photo, warped through the rendered depth where the photo saw that surface and
   MediaPipe calls it the person (not the backdrop), trusted by how squarely the photo
   saw it (cosine between surface normal and the photo's ray);
2. the mirrored photo (:func:`~.views.mirror_camera`) at half that trust, which lends
   the seen side of the face to the other;
3. an inpainted fill for what was never seen, at low trust: the hair as a solid texture
   of patches cut from the photo's own hair (solid, i.e. a function of the 3-D point,
   so every view paints the back of the head alike and the fit does not average
   unrelated strands into mush), the skin and the mouth as the initial colours.

The photo's own view comes first in the list, at full confidence inside the head and
the person. An ``enhance`` stage may repaint low-confidence pixels before the fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import kernels
from kernels import Camera
from protocol.camera import framing_distance, intrinsics_from_fov, orbit

from ..geometry import smoothstep
from ..images import srgb_to_linear
from .photometric import resample
from .views import (
    SOURCE_INPAINT,
    SOURCE_MIRROR,
    SOURCE_NONE,
    SOURCE_PHOTO,
    View,
    mirror_camera,
    unproject,
    warp,
)

#: Gaussian labels for :attr:`Splats.labels`: what kind of fill an unseen pixel gets.
LABEL_SKIN, LABEL_HAIR, LABEL_INNER = 0, 1, 2


@dataclass(frozen=True)
class ViewPlan:
    """A preset's pseudo-views: ``size`` pixels square, at (yaw, pitch) degrees."""

    size: int
    ring: tuple[tuple[float, float], ...]


_RING = ((45, 0), (-45, 0), (90, 0), (-90, 0), (135, 0), (-135, 0), (180, 0))
PLANS = {
    "fast": ViewPlan(112, ((60, 0), (-60, 0), (120, 0), (-120, 0), (180, 0), (0, 65))),
    "default": ViewPlan(144, _RING + ((0, 65), (0, -40))),
    "high": ViewPlan(192, _RING + ((25, 0), (-25, 0), (0, 65), (180, 55), (0, -40))),
}
FOV = 30.0  # degrees
FILL = 0.9  # the head sphere spans this share of a pseudo-view
MIRROR_TRUST = 0.5  # mirrored photo vs photo
INPAINT_TRUST = 0.15
GRAZING = (0.25, 0.75)  # cos(normal, ray to the photo): no trust below, full above
PHOTO_GRAZING = (0.0, 0.2)  # the same for skin in the photo's own view
DEPTH_TOLERANCE = 0.008  # metres; the rendered depth is an alpha-weighted mean
EDGE_ALPHA = 0.9  # rendered alpha below this is a silhouette edge: blended depth
PATCH = 0.045  # hair patch side as a share of the head's crop in the photo
PATCHES = 48  # hair patches cut from the photo


@dataclass(frozen=True)
class Splats:
    """The initial head as world-space Gaussians (the photo's expression).

    Attributes: means ``[N, 3]`` metres; quats ``[N, 4]`` (w, x, y, z); scales ``[N, 3]``
    metres; opacities ``[N]``; sh ``[N, K, 3]``; labels ``[N]`` int, ``LABEL_*``.
    """

    means: np.ndarray
    quats: np.ndarray
    scales: np.ndarray
    opacities: np.ndarray
    sh: np.ndarray
    labels: np.ndarray

    def render(self, camera: Camera, size: int, passes: tuple[str, ...]) -> kernels.Passes:
        return kernels.rasterize(self.means, self.quats, self.scales, self.opacities, self.sh,
                                 camera, size, size, passes, backend="cpu",
                                 labels=self.labels)  # fmt: skip


def ring_cameras(
    center: np.ndarray, radius: float, plan: ViewPlan
) -> list[tuple[Camera, float, float]]:
    """(camera, yaw, pitch) orbiting ``center`` so a sphere of ``radius`` fills the view."""
    intr = intrinsics_from_fov(plan.size, plan.size, FOV)
    distance = framing_distance(radius, FOV, fill=FILL)
    return [
        (Camera.from_arrays(intr, orbit(center, distance, yaw, pitch)), yaw, pitch)
        for yaw, pitch in plan.ring
    ]


def _facing(points: np.ndarray, normals: np.ndarray, position: np.ndarray) -> np.ndarray:
    """cos between each world normal ``[..., 3]`` and the ray to ``position``."""
    ray = position - points
    ray /= np.maximum(np.linalg.norm(ray, axis=-1, keepdims=True), 1e-12)
    return np.nan_to_num(np.sum(normals * ray, axis=-1))


class PatchTexture:
    """A solid texture: the 3-D point picks a patch cut from the photo (the hair here;
    the skin's relative detail in :mod:`.texture`).

    Space is cut into cubes of the patch's size on three planes (x-z for the back and
    front, y-z for the sides, x-y for the top); each cube shows one patch, chosen by
    hashing the cube's index; the planes are blended by the direction from the head's
    centre, and two layers half a cube apart are blended so cube edges do not show.
    """

    def __init__(self, patches: np.ndarray, cell: float, center: np.ndarray) -> None:
        self.patches = patches  # [P, S, S, 3] linear
        self.cell = cell  # metres a patch spans
        self.center = center

    @classmethod
    def from_photo(
        cls, image: np.ndarray, hair: np.ndarray, metres_per_px: float, center: np.ndarray,
        rng: np.random.Generator,
    ) -> PatchTexture | None:  # fmt: skip
        """Hair: cut patches where ``hair`` [H, W] is true throughout; None if too few fit."""
        from scipy import ndimage

        s = max(4, int(round(PATCH * image.shape[0])))
        inside = ndimage.binary_erosion(hair, np.ones((s, s), bool), border_value=0)
        ys, xs = np.nonzero(inside)
        if len(ys) < 8:
            return None
        pick = rng.choice(len(ys), size=min(4 * PATCHES, len(ys)), replace=False)
        h = s // 2
        patches = np.stack([image[y - h : y - h + s, x - h : x - h + s]
                            for y, x in zip(ys[pick], xs[pick], strict=True)])  # fmt: skip
        # keep the patches most like the hair's median: a cap's badge or a highlight is
        # part of the photo's "hair" but repeated over the back it reads as camouflage
        typical = np.abs(patches.mean(axis=(1, 2)) - np.median(image[hair], axis=0)).sum(1)
        patches = patches[np.argsort(typical)[:PATCHES]]
        return cls(patches.astype(np.float32), s * metres_per_px, center)

    def _plane(self, a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
        p, s = self.patches.shape[:2]
        out = np.zeros(a.shape + (3,))
        total = np.zeros(a.shape)
        for shift in (0.0, 0.5):
            u, v = a / self.cell + shift, b / self.cell + shift
            cu, cv = np.floor(u), np.floor(v)
            fu, fv = u - cu, v - cv
            weight = (1 - np.abs(2 * fu - 1)) * (1 - np.abs(2 * fv - 1)) + 1e-6
            key = (cu.astype(np.int64) * 73856093) ^ (cv.astype(np.int64) * 19349663)
            idx = (key ^ (salt * 83492791 + int(shift * 2))) % p
            px = np.clip((fu * s).astype(np.int64), 0, s - 1)
            py = np.clip((fv * s).astype(np.int64), 0, s - 1)
            out += weight[..., None] * self.patches[idx, py, px]
            total += weight
        return out / total[..., None]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """``[M, 3]`` world points → ``[M, 3]`` linear colour."""
        d = points - self.center
        n = np.abs(d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)) ** 4
        n /= n.sum(1, keepdims=True)
        # image rows run down: a plane's second axis is -z (or -y for the top)
        return (n[:, 1:2] * self._plane(d[:, 0], -d[:, 2], 1)
                + n[:, 0:1] * self._plane(d[:, 1], -d[:, 2], 2)
                + n[:, 2:3] * self._plane(d[:, 0], d[:, 1], 3))  # fmt: skip


def photo_view(
    out: kernels.Passes, photo: np.ndarray, person: np.ndarray, box, camera: Camera, size: int
) -> View:
    """The input photo's crop ``box`` as a :class:`View`, given the head's passes ``out``
    (alpha, depth, normal, segment) from ``camera``: confidence 1 where the head covers it
    and the photo shows the person, fading out on skin the photo saw edge-on (the neck's
    sides, where the photo shows the collar beside a narrower real neck)."""
    image = srgb_to_linear(resample(photo, box, size) / 255.0).astype(np.float32)
    body = resample((person * 255).astype(np.uint8), box, size) > 127
    cos = _facing(unproject(out.depth, camera), out.normal @ camera.world_to_camera[:3, :3],
                  camera.position)  # fmt: skip
    trust = np.where(out.segment == LABEL_SKIN, smoothstep(cos, *PHOTO_GRAZING), 1.0)
    conf = np.where((out.alpha > 0.5) & body, trust, 0.0).astype(np.float32)
    source = np.where(conf > 0, SOURCE_PHOTO, SOURCE_NONE).astype(np.uint8)
    return View(camera, image, conf, out.depth, out.alpha, source)


def make_pseudo_views(
    splats: Splats,
    photo: np.ndarray,  # [H, W, 3] uint8 sRGB
    person: np.ndarray,  # [H, W] bool, MediaPipe's person mask of the photo
    box: tuple[float, float, float],  # the photo crop (x0, y0, side) the fit uses
    crop_camera: Camera,  # the photo's camera for that crop
    crop_size: int,
    preset: str,
    progress: Callable[[float, str], None] = lambda f, m: None,
    seed: int = 0,
) -> list[View]:
    """The photo's view, then the preset's ring of pseudo-views (see the module text)."""
    plan = PLANS[preset]
    front_passes = splats.render(crop_camera, crop_size, ("alpha", "depth", "normal", "segment"))
    front = photo_view(front_passes, photo, person, box, crop_camera, crop_size)
    src = np.concatenate([front.image, (front.confidence > 0)[..., None]], axis=2)
    mirror_cam = mirror_camera(crop_camera, crop_size)
    mirror_depth = splats.render(mirror_cam, crop_size, ("depth",)).depth
    mirror_src = src[:, ::-1].copy()

    center = 0.5 * (splats.means.min(0) + splats.means.max(0))
    radius = float(np.linalg.norm(splats.means - center, axis=1).max())
    labels = front_passes.segment
    metres_per_px = float(np.median(front.depth[front.confidence > 0])) / crop_camera.fx
    hair = (labels == LABEL_HAIR) & (front.confidence > 0)
    texture = PatchTexture.from_photo(front.image, hair, metres_per_px, center,
                                     np.random.default_rng(seed))  # fmt: skip

    views = [front]
    ring = ring_cameras(center, radius, plan)
    for k, (cam, yaw, pitch) in enumerate(ring):
        progress(
            k / len(ring), f"pseudo-view {k + 1}/{len(ring)} (yaw {yaw:+.0f}, pitch {pitch:+.0f})"
        )
        views.append(_pseudo_view(splats, cam, plan.size, yaw, pitch, src, front.depth,
                                  crop_camera, mirror_src, mirror_depth, mirror_cam,
                                  texture))  # fmt: skip
    progress(1.0, f"{len(ring)} pseudo-views")
    return views


def _pseudo_view(
    splats: Splats, cam: Camera, size: int, yaw: float, pitch: float,
    src: np.ndarray, src_depth: np.ndarray, src_cam: Camera,
    mirror_src: np.ndarray, mirror_depth: np.ndarray, mirror_cam: Camera,
    texture: PatchTexture | None,
) -> View:  # fmt: skip
    """One pseudo-view: photo, mirrored photo and fill blended by their trust."""
    out = splats.render(cam, size, ("rgb", "alpha", "depth", "normal", "segment"))
    alpha, depth = out.alpha, out.depth
    inside = alpha > 0.5
    points = unproject(depth, cam)
    normals = out.normal @ cam.world_to_camera[:3, :3]  # camera → world (rows)
    solid = alpha >= EDGE_ALPHA  # depth at silhouette edges blends front and back

    cover = []  # how much of the pixel each source claims, by how squarely it saw it
    colours = []
    for values, s_depth, s_cam in ((src, src_depth, src_cam),
                                   (mirror_src, mirror_depth, mirror_cam)):  # fmt: skip
        warped, valid = warp(values, s_depth, s_cam, depth, cam, DEPTH_TOLERANCE)
        ok = valid & solid & (warped[..., 3] > 0.99)
        cos = _facing(points, normals, s_cam.position)
        cover.append(np.where(ok, smoothstep(cos, *GRAZING), 0.0))
        colours.append(warped[..., :3])

    fill = out.rgb / np.maximum(alpha, 1e-6)[..., None]
    if texture is not None:
        hair = inside & (out.segment == LABEL_HAIR)
        if hair.any():
            fill[hair] = texture(points[hair])
    # "over" compositing: the photo, then the mirror, then the fill takes what is left;
    # the confidence is the same mix of each source's trust
    weights = [cover[0], (1 - cover[0]) * cover[1]]
    weights.append(1 - weights[0] - weights[1])
    image = sum(w[..., None] * c for w, c in zip(weights, (*colours, fill), strict=True))
    confidence = weights[0] + MIRROR_TRUST * weights[1] + INPAINT_TRUST * weights[2]
    best = np.argmax(np.stack(weights), axis=0)
    source = np.array([SOURCE_PHOTO, SOURCE_MIRROR, SOURCE_INPAINT], np.uint8)[best]
    confidence = np.where(inside, confidence, 0.0).astype(np.float32)
    source = np.where(inside, source, SOURCE_NONE).astype(np.uint8)
    image = np.where(inside[..., None], image, 0.0).astype(np.float32)
    return View(cam, image, confidence, depth, alpha, source, float(yaw), float(pitch))


def splats_labels(
    region: np.ndarray,  # [N] region index of each Gaussian's triangle
    inner_regions: tuple[int, ...],  # regions never seen from outside (mouth, eyes)
    scalp: np.ndarray,  # [N] bool, on the scalp or the hair shell
) -> np.ndarray:
    """``[N]`` int32 ``LABEL_*`` per Gaussian."""
    labels = np.where(scalp, LABEL_HAIR, LABEL_SKIN)
    labels[np.isin(region, inner_regions)] = LABEL_INNER
    return labels.astype(np.int32)
