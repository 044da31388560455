"""Gaussians on the head's surface, coloured from the photo where it saw them."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kernels.sh import eval_sh, rgb_to_sh0
from protocol.arkit import index_of
from protocol.camera import project

from ..avatar import BoundGaussians
from ..geometry import triangle_frames
from ..headmodel import PART_TONGUE, HeadModel
from ..images import srgb_to_linear

if TYPE_CHECKING:
    from .texture import Texture

COUNTS = {"fast": 12_000, "default": 30_000, "high": 60_000}
#: Relative density per region (Gaussians per m², before normalising to the preset).
DENSITY = {
    "face": 2.0, "head_neck": 1.0, "mouth_socket": 0.3, "eye_sockets": 0.0,
    "gums_tongue": 0.3, "teeth": 0.6, "eyeball_left": 3.0, "eyeball_right": 3.0,
}  # fmt: skip
#: The tongue (inside gums_tongue) shows when it is out: dense like the face, and
#: lighter than the gums around it.
TONGUE_DENSITY = 2.0
TONGUE_FILL = (0.35, 0.14, 0.14)
#: sRGB colour of parts the photo cannot show (inside the mouth, back of the eyes). The
#: mouth's interior is in its own shadow: dark, so an open mouth reads as open (bright
#: red reads as lips, to a viewer and to MediaPipe).
FILL = {
    "mouth_socket": (0.05, 0.02, 0.02), "gums_tongue": (0.25, 0.10, 0.10),
    "teeth": (0.90, 0.87, 0.80), "eyeball_left": (0.88, 0.85, 0.82),
    "eyeball_right": (0.88, 0.85, 0.82), "eye_sockets": (0.5, 0.3, 0.3),
}  # fmt: skip
IRIS_ANGLE = 24.0  # degrees from the eyeball's forward axis (centre of its fitted sphere)
PUPIL_ANGLE = 8.0
IRIS_FILL = (0.35, 0.25, 0.15)  # sRGB, when the photo shows too little of the iris
PUPIL_FILL = (0.03, 0.03, 0.03)
OPACITY = 0.98
TANGENT_SIGMA = 0.8  # x the region's mean spacing: opaque enough that novel views have no holes
#: More overlap for the hair shell (``hair.py``), which novel views see edge-on and the
#: fit has least to go on. Measured on the astronaut: coverage at ±30° 0.967-0.970 with
#: 1, 0.973-0.978 with 1.15 (stray alpha outside the silhouette 0.5-0.7 % either way).
#: Widening the neck's too covers 0.984 but spills 0.8 % and shifts MediaPipe's reading
#: of the face enough to fail a gaze check.
EDGE_ON_SIGMA = 1.15
#: The bust: the neck's triangles whose centre lies more than BUST_BELOW_CHIN (metres)
#: below the chin. Novel views see it as one layer (nothing behind it: the mesh ends
#: across the chest), so random gaps between its Gaussians show as holes, where the head
#: hides them behind its far side. It gets BUST_DENSITY x the neck's Gaussians per area,
#: each BUST_SIGMA x the usual multiple of their (closer) spacing: more overlap, with
#: Gaussians no wider than the neck's (wider ones spill past the chest's cut). Measured on
#: default builds over ``eval``'s seven views, against 1.25x as wide and no denser (away
#: from the cut): coverage 0.990-0.995 → 0.995-0.999 (astronaut), the bust's holes gone.
BUST_BELOW_CHIN = 0.06
BUST_DENSITY = 2.5
BUST_SIGMA = 1.6  # x TANGENT_SIGMA
THICKNESS = 0.15  # normal-axis sigma as a fraction of the tangent sigma
ZBUFFER_CELL = 2.0  # photo pixels
OCCLUSION_TOLERANCE = 0.01  # metres
#: cos(normal, ray) above which a Gaussian takes the photo's colour: at grazing angles a
#: pixel holds whatever lies beside the surface (collar, lining), not the surface
COLOUR_FACING = 0.35


_LIDS = ("eyeBlinkLeft", "eyeBlinkRight")
#: sRGB skin colour where the photo shows none of it
SKIN_FILL = (0.75, 0.6, 0.5)


def closed_eyes(vertices: np.ndarray, model: HeadModel) -> np.ndarray:
    """``[V, 3]``: the head of ``vertices`` with both eyes closed (both blinks at 1)."""
    return vertices + sum(model.arkit_deltas[index_of(n)] for n in _LIDS)


def open_and_closed_area(vertices: np.ndarray, model: HeadModel) -> tuple[np.ndarray, np.ndarray]:
    """``[T]`` triangle areas of ``vertices`` and of the same head with both eyes closed."""
    _, area = triangle_frames(vertices, model.triangles)
    return area, triangle_frames(closed_eyes(vertices, model), model.triangles)[1]


def random_bary(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 3]`` barycentric coordinates uniform over a triangle (the square's upper
    half folded back onto the lower)."""
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return np.stack([1 - u - v, u, v], axis=1)


def stratified(weight: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """About ``count`` triangle indices, each triangle ``t`` repeated its share
    ``count * weight[t] / weight.sum()`` of times (the fraction by chance): spread as
    evenly as the shares allow, where independent draws would clump and leave gaps."""
    expected = count * weight / weight.sum()
    per_tri = np.floor(expected).astype(np.int64)
    per_tri += rng.random(len(expected)) < (expected - per_tri)
    return np.repeat(np.arange(len(per_tri)), per_tri)


def density_classes(model: HeadModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class ``[T]`` of each triangle (its region; the tongue apart from the gums, the
    bust apart from the neck), each class's density ``[C]`` (Gaussians per m², relative)
    and each triangle's area ``[T]``: the largest it takes at rest or with the eyes closed
    (the lids fold away when open and spread over the eye when closed, and must carry
    enough Gaussians for that)."""
    area = np.maximum(*open_and_closed_area(model.neutral, model))
    tongue = np.all(model.vertex_part[model.triangles] == PART_TONGUE, axis=1)
    cls = np.where(tongue, len(model.region_names), model.triangle_region)
    cls = np.where(bust_triangles(model), len(model.region_names) + 1, cls)
    density = np.array([DENSITY[n] for n in model.region_names] + [TONGUE_DENSITY, BUST_DENSITY])
    return cls, density, area


def preset_count(model: HeadModel, preset: str) -> int:
    """The preset's count plus the bust's extra Gaussians (which must not come out of
    the face's share)."""
    cls, density, area = density_classes(model)
    plain = density.copy()
    plain[-1] = DENSITY["head_neck"]
    return round(COUNTS[preset] * (density[cls] * area).sum() / (plain[cls] * area).sum())


def sample_surface(
    model: HeadModel, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified sampling by area and density class (:func:`density_classes`): about
    ``count`` Gaussians as (triangle ``[N]``, bary ``[N, 3]``, tangent sigma ``[N]``)."""
    cls, density, area = density_classes(model)
    tri = stratified(density[cls] * area, count, rng)
    bary = random_bary(rng, len(tri))
    # mean spacing in each class: sqrt(class area / Gaussians there)
    class_area = np.bincount(cls, weights=area, minlength=len(density))
    class_n = np.bincount(cls[tri], minlength=len(density))
    spacing = np.sqrt(class_area / np.maximum(class_n, 1))
    return tri.astype(np.int32), bary.astype(np.float32), spacing[cls[tri]]


def bust_triangles(model: HeadModel) -> np.ndarray:
    """``[T]`` bool: the neck's triangles whose centre is more than ``BUST_BELOW_CHIN``
    below the chin (on the neutral head)."""
    centre_z = model.neutral[model.triangles, 2].mean(axis=1)
    chin = model.neutral[model.landmarks68[8], 2]
    neck = model.triangle_region == model.region("head_neck")
    return neck & (centre_z < chin - BUST_BELOW_CHIN)


def _visible(
    points, normals, intrinsics, w2c, size, facing_min: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """Which points the photo saw (facing it by cos > ``facing_min``, first along their
    ray), and where."""
    uv, z = project(points, intrinsics, w2c)
    cam = -w2c[:3, :3].T @ w2c[:3, 3]
    to_cam = cam - points
    facing = np.sum(normals * to_cam, axis=1) > facing_min * np.linalg.norm(to_cam, axis=1)
    w, h = size
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    cells = np.floor(np.nan_to_num(uv) / ZBUFFER_CELL).astype(np.int64)
    gw = int(np.ceil(w / ZBUFFER_CELL)) + 1
    key = cells[:, 1] * gw + cells[:, 0]
    zbuf = np.full(gw * (int(np.ceil(h / ZBUFFER_CELL)) + 1), np.inf)
    sel = inside & facing
    np.minimum.at(zbuf, key[sel], z[sel])
    seen = sel & (z <= zbuf[np.where(inside, key, 0)] + OCCLUSION_TOLERANCE)
    return seen, uv


def _eye_colours(
    points: np.ndarray, centre: np.ndarray, seen: np.ndarray, photo_colour: np.ndarray
) -> np.ndarray:
    """An eyeball drawn rather than projected: pupil, iris (its colour the median of the
    photo's where the iris was ``seen``) and sclera, by angle from the eye's forward axis.
    Projected colour would paint the parts the lids hid with lids and lashes, which
    show, and read as a misplaced iris, as soon as the eye turns."""
    direction = points - centre
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    angle = np.degrees(np.arccos(np.clip(-direction[:, 1], -1.0, 1.0)))  # forward is -Y
    iris, pupil = angle < IRIS_ANGLE, angle < PUPIL_ANGLE
    sample = seen & iris & ~pupil
    iris_colour = (
        np.median(photo_colour[sample], axis=0)
        if sample.sum() >= 5
        else srgb_to_linear(np.array(IRIS_FILL))
    )
    out = np.tile(srgb_to_linear(np.array(FILL["eyeball_left"])), (len(points), 1))
    out[iris] = iris_colour
    out[pupil] = srgb_to_linear(np.array(PUPIL_FILL))
    return out


def _on(mask: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """``[N]`` bool: ``mask`` [H, W] at pixel coordinates ``uv`` [N, 2] (False outside)."""
    h, w = mask.shape
    j, i = np.floor(np.nan_to_num(uv, nan=-1.0)).astype(np.int64).T
    inside = (j >= 0) & (j < w) & (i >= 0) & (i < h)
    out = np.zeros(len(uv), bool)
    out[inside] = mask[i[inside], j[inside]]
    return out


def _sample_photo(photo: np.ndarray, uv: np.ndarray) -> np.ndarray:
    h, w = photo.shape[:2]
    j = np.clip(np.floor(uv[:, 0]).astype(np.int64), 0, w - 1)
    i = np.clip(np.floor(uv[:, 1]).astype(np.int64), 0, h - 1)
    return srgb_to_linear(photo[i, j] / 255.0)


def make_gaussians(
    model: HeadModel, texture: Texture, preset: str, seed: int = 0
) -> BoundGaussians:
    """Gaussians bound to the mesh, each taking ``texture``'s colour (``texture.py``: the
    photo where it saw the surface, its mirror image, fills, drawn eyes and mouth) at
    its own place on its triangle."""
    rng = np.random.default_rng(seed)
    tri, bary, spacing = sample_surface(model, preset_count(model, preset), rng)
    colour = texture.sample(tri, bary)
    n = len(tri)
    sigma_t = TANGENT_SIGMA * spacing * np.where(bust_triangles(model)[tri], BUST_SIGMA, 1.0)
    log_scale = np.log(np.stack([sigma_t, sigma_t, THICKNESS * sigma_t], axis=1))
    return BoundGaussians(
        triangle=tri,
        bary=bary,
        offset=np.zeros(n, np.float32),
        rotation=np.tile(np.array([1.0, 0, 0, 0], np.float32), (n, 1)),
        log_scale=log_scale.astype(np.float32),
        opacity_logit=np.full(n, np.log(OPACITY / (1 - OPACITY)), np.float32),
        sh=rgb_to_sh0(colour)[:, None, :].astype(np.float32),
    )


#: The lid skin layer (``BoundGaussians.appear``): on the face triangles whose edges grow
#: by at least LID_GROWTH from rest to closed eyes, LID_DENSITY x as many Gaussians as the
#: ordinary set has there, each fading in from half LID_APPEAR of the way to closed (by
#: its triangle's growth) and fully opaque from LID_APPEAR of the way, lifted LID_LIFT in
#: front of the ordinary ones (closed, it covers the lower lid's lashes) and LID_OVERLAP x as wide
#: (lids stretch more up-down than across: wider splats close the gaps that leaves).
#: MediaPipe reads a closed lid as partly open wherever a dark fold Gaussian shows through
#: it: with 3x, a full left blink at a 10 degree turn read 0.33 and 0.5 on two astronaut
#: builds, with 6x 0.45 and 0.6 (and the round trip's blinks 0.02-0.05 higher on three).
LID_GROWTH = 1.2
LID_APPEAR = 0.6
LID_LIFT = 0.001  # metres
LID_OVERLAP = 1.5
LID_DENSITY = 6.0
#: The lid layer's colour: per Gaussian, from the LID_SKIN_K nearest of the lighter half of
#: the skin (not stretching) that lies within LID_SKIN_RING (metres) of the closed lid. A
#: per-eye median of a 4-15 mm ring (before) took in the brows' and the socket's shadow:
#: the astronaut's closed lids were tan patches, 0.09 darker (sRGB) than the skin around.
LID_SKIN_RING = (0.0005, 0.006)
LID_SKIN_K = 24
#: The ordinary Gaussians on the lid layer's triangles fade out (``fading_folds``) from half
#: LID_VANISH of the way to closed to LID_VANISH of the way, after the layer is opaque.
LID_VANISH = 0.9


def lid_growth(area: np.ndarray, closed_area: np.ndarray, model: HeadModel) -> np.ndarray:
    """``[T]`` how much each face triangle's edges grow from ``area`` at rest to
    ``closed_area`` with both eyes closed (1 outside the face and where they shrink)."""
    growth = np.sqrt(np.maximum(closed_area, area) / np.maximum(area, 1e-20))
    return np.where(model.triangle_region == model.region("face"), growth, 1.0)


def _lid_colour(
    model: HeadModel,
    rest: np.ndarray,
    gaussians: BoundGaussians,
    tri: np.ndarray,
    bary: np.ndarray,
    growth: np.ndarray,
) -> np.ndarray:
    """``[N, 3]`` linear RGB of lid-layer Gaussians at ``tri``/``bary``: the skin around
    the closed lid, interpolated by inverse squared distance with the eyes closed, so the
    closed lid takes the tone of the skin it meets (see ``LID_SKIN_RING``). The lighter
    half only: lashes, brows and the folds' shadows are not the lid's colour."""
    from scipy.spatial import cKDTree

    closed = closed_eyes(rest, model)
    points = np.einsum("nk,nkc->nc", bary, closed[model.triangles[tri]])
    have = np.einsum("nk,nkc->nc", gaussians.bary, closed[model.triangles[gaussians.triangle]])
    skin = (
        (gaussians.appear == 0)
        & (growth[gaussians.triangle] < 1.05)
        & (model.triangle_region[gaussians.triangle] == model.region("face"))
    )
    near, _ = cKDTree(points).query(have, distance_upper_bound=LID_SKIN_RING[1])
    ring = skin & np.isfinite(near) & (near > LID_SKIN_RING[0])
    rgb = eval_sh(gaussians.sh[:, :1], None)  # the view-independent colour
    lum = rgb @ np.array([0.2126, 0.7152, 0.0722])
    if ring.any():
        ring &= lum >= np.median(lum[ring])
    if ring.sum() < LID_SKIN_K:  # a head without skin around its eyes
        return np.tile(srgb_to_linear(np.array(SKIN_FILL)), (len(tri), 1))
    dist, idx = cKDTree(have[ring]).query(points, k=LID_SKIN_K)
    weight = 1.0 / np.maximum(dist, 1e-4) ** 2
    return np.einsum("nk,nkc->nc", weight, rgb[ring][idx]) / weight.sum(1, keepdims=True)


def lid_layer(
    model: HeadModel, rest: np.ndarray, gaussians: BoundGaussians, seed: int = 0
) -> BoundGaussians:
    """Skin-coloured Gaussians that cover the eyes as the lids close, invisible while they
    are open (their ``appear`` > 1).

    The ordinary Gaussians on the lids' folds take the photo's colour where the fold lies
    while the eye is open: lashes and iris, which spread over the closed eye as a dark
    patch (``fading_folds`` fades them out). This layer gives the closed lid its skin,
    coloured from ``gaussians`` (fitted) on the skin around it (``_lid_colour``)."""
    area, closed_area = open_and_closed_area(rest, model)
    growth = lid_growth(area, closed_area, model)
    lid = growth >= LID_GROWTH
    count = int(LID_DENSITY * lid[gaussians.triangle].sum())
    if count == 0:  # a head without closing lids
        return gaussians.take(slice(0))
    rng = np.random.default_rng(seed)
    weight = np.where(lid, area * growth**2, 0.0)  # the area closed (where it grows)
    tri = rng.choice(len(weight), count, p=weight / weight.sum()).astype(np.int32)
    bary = random_bary(rng, count)
    spacing = np.sqrt(weight.sum() / count)  # between neighbours once the lids are closed
    sigma = TANGENT_SIGMA * LID_OVERLAP * spacing / growth[tri]  # at rest; grows with the lid
    log_scale = np.log(np.stack([sigma, sigma, THICKNESS * sigma], 1))

    colour = _lid_colour(model, rest, gaussians, tri, bary, growth)
    k = gaussians.sh.shape[1]
    sh = np.zeros((count, k, 3), np.float32)
    sh[:, 0] = rgb_to_sh0(colour)
    return BoundGaussians(
        triangle=tri,
        bary=bary.astype(np.float32),
        offset=np.full(count, LID_LIFT, np.float32),
        rotation=np.tile(np.array([1.0, 0, 0, 0], np.float32), (count, 1)),
        log_scale=log_scale.astype(np.float32),
        opacity_logit=np.full(count, np.log(OPACITY / (1 - OPACITY)), np.float32),
        sh=sh,
        appear=(1 + LID_APPEAR * (growth[tri] - 1)).astype(np.float32),
    )


#: The lash line of a closed eye (``lash_line``): dark Gaussians on the lid layer's
#: triangles within LASH_WIDTH of the seam where the closed upper lid meets the lower one,
#: about LASH_SPACING apart, LASH_SIGMA / growth wide once closed (thinner where the lid
#: stretches most), lifted LASH_LIFT (in front of the lid layer), fading in from half
#: LASH_APPEAR of the way to closed and fully opaque from LASH_APPEAR (later than the lid
#: layer: a half-closed lid's edge passes over the iris, which gaze is read from).
LASH_APPEAR = 0.9
LASH_WIDTH = 0.0012  # metres
LASH_SPACING = 0.0006  # metres
LASH_SIGMA = 0.0009  # metres
LASH_LIFT = 0.0013  # metres
LASH_OPACITY = 0.98
LASH_SAMPLES = 60_000  # candidate points on the lid triangles, thinned to LASH_SPACING
LASH_COLUMN = 0.001  # metres: the seam is traced in columns this wide across each eye
SEAM_FOLD = 0.0008  # metres: a seam column this far off its neighbours' line is a fold
#: metres: a column this far above the other eye's mirrored seam is a fold (folds rise
#: 1.3-6 mm above the margin; the two margins differ by up to 1 mm where columns fall apart)
SEAM_MIRROR = 0.0012
SEAM_REACH = 0.002  # metres past the other seam's end that it still vouches for
LASH_DARK = 15  # percentile: the lash colour is the median of the margin's darkest
LASH_FLOOR = 0.01  # linear RGB: not pitch black


def fading_folds(model: HeadModel, rest: np.ndarray, gaussians: BoundGaussians) -> BoundGaussians:
    """``gaussians`` with the ordinary ones on the lid layer's triangles (growth of
    LID_GROWTH or more) fading out as the lids close (``appear`` below -1, LID_VANISH).

    They carry the open lid's fold: lashes and iris, stretched up to 1.7x over the closed
    eye. The lid layer, lifted 1 mm, hides most of them, but at the eye's corners, where
    the lid curves back, the widest stood in front of it as dark strokes (astronaut: 4.8
    mm wide, 1.2 mm nearer the camera than the layer)."""
    area, closed_area = open_and_closed_area(rest, model)
    growth = lid_growth(area, closed_area, model)[gaussians.triangle]
    fold = (gaussians.appear == 0) & (growth >= LID_GROWTH)
    appear = gaussians.appear.copy()
    appear[fold] = -(1 + LID_VANISH * (growth[fold] - 1))
    return replace(gaussians, appear=appear.astype(np.float32))


def lid_seams(model: HeadModel, rest: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per eye (68-point corners 36-39, then 42-45): the upper lid's front margin
    ``[K]`` vertex ids and where its blink takes them ``[K, 3]`` (the seam of the closed
    eye). Column by column across the eye, the front vertex the blink moves furthest.
    Where that is a fold above the margin instead, it is dropped: columns off the median
    of their neighbours by more than ``SEAM_FOLD``, and columns more than ``SEAM_MIRROR``
    above the other eye's seam mirrored across the face. A fold at an eye's end has too
    few neighbours on one side to be out-voted; ICT's mesh is symmetric, and a face
    nearly so."""
    from scipy.ndimage import median_filter

    face = np.unique(model.triangles[model.triangle_region == model.region("face")])
    deltas = [model.arkit_deltas[index_of(n)].astype(np.float64) for n in _LIDS]
    out = []
    for a, b in ((36, 39), (42, 45)):
        corners = rest[model.landmarks68[[a, b]]]
        near = face[np.linalg.norm(rest[face] - corners.mean(0), axis=1) < 0.02]
        delta = max(deltas, key=lambda d: float(np.linalg.norm(d[near], axis=1).max()))
        moved = np.linalg.norm(delta, axis=1)
        x0, x1 = sorted(corners[:, 0])
        front = face[(np.abs(rest[face, 2] - corners[:, 2].mean()) < 0.012)
                     & (rest[face, 1] < corners[:, 1].max())]  # fmt: skip
        ids = []
        for lo in np.arange(x0, x1, LASH_COLUMN):
            col = front[(rest[front, 0] >= lo) & (rest[front, 0] < lo + LASH_COLUMN)]
            if len(col) and moved[col].max() > 0.001:
                ids.append(col[np.argmax(moved[col])])
        ids = np.array(ids, np.int64)
        seam = rest[ids] + delta[ids]
        if len(ids) >= 3:
            med = median_filter(seam[:, 1:], size=(7, 1), mode="nearest")
            keep = np.abs(seam[:, 1:] - med).max(axis=1) < SEAM_FOLD
            ids, seam = ids[keep], seam[keep]
        out.append((ids, seam))
    keeps = _below_mirror(out)
    return [(ids[keep], seam[keep]) for (ids, seam), keep in zip(out, keeps, strict=True)]


def _below_mirror(seams: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Per seam, ``[K]`` bool: not more than ``SEAM_MIRROR`` above the other seam
    mirrored in x, where that spans the column's x to within ``SEAM_REACH`` (held level
    past its ends)."""
    keeps = []
    for (_, seam), (_, other) in zip(seams, seams[::-1], strict=True):
        keep = np.ones(len(seam), bool)
        if len(other) >= 2:
            x, z = -other[:, 0], other[:, 2]
            order = np.argsort(x)
            x, z = x[order], z[order]
            inside = (seam[:, 0] >= x[0] - SEAM_REACH) & (seam[:, 0] <= x[-1] + SEAM_REACH)
            keep[inside] = seam[inside, 2] - np.interp(seam[inside, 0], x, z) <= SEAM_MIRROR
        keeps.append(keep)
    return keeps


def _polyline_distance(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """``[N]`` distance of each point to the polyline ``[K, 3]`` (inf for K < 2)."""
    d = np.full(len(points), np.inf)
    for a, b in zip(line[:-1], line[1:], strict=True):
        ab = b - a
        t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-20), 0.0, 1.0)
        d = np.minimum(d, np.linalg.norm(points - (a + t[:, None] * ab), axis=1))
    return d


def lash_line(
    model: HeadModel, rest: np.ndarray, gaussians: BoundGaussians, seed: int = 0
) -> BoundGaussians:
    """Dark Gaussians that draw the lashes along a closed eye's seam, invisible while
    the eye is open (``appear``, see ``LASH_APPEAR``).

    Without them a closed eye is a blank patch of skin (the lid layer), which neither
    looks closed nor reads as closed to a landmark detector (MediaPipe leaves it a third
    open). Their colour is the median of the darkest ``LASH_DARK`` % of ``gaussians``
    (fitted, ordinary) within 4 mm of the open lids' margins: the photo's lashes."""
    empty = gaussians.take(slice(0))
    seams = [s for s in lid_seams(model, rest) if len(s[0]) >= 2]
    area, closed_area = open_and_closed_area(rest, model)
    growth = lid_growth(area, closed_area, model)
    lid = np.flatnonzero(growth >= LID_GROWTH)
    if not seams or not len(lid):
        return empty
    closed = closed_eyes(rest.astype(np.float64), model)
    rng = np.random.default_rng(seed)
    tri = rng.choice(lid, LASH_SAMPLES, p=closed_area[lid] / closed_area[lid].sum())
    bary = random_bary(rng, LASH_SAMPLES)
    points = np.einsum("nk,nkc->nc", bary, closed[model.triangles[tri]])
    near = np.min([_polyline_distance(points, seam) for _, seam in seams], axis=0)
    on = near < LASH_WIDTH
    cells = np.round(points[on] / LASH_SPACING).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    tri, bary = tri[on][first], bary[on][first]
    count = len(tri)
    if count == 0:
        return empty

    ordinary = gaussians.appear == 0
    at = np.einsum("nk,nkc->nc", gaussians.bary, rest[model.triangles[gaussians.triangle]])
    margin = np.concatenate([rest[ids] for ids, _ in seams])
    close = ordinary & (np.min(np.linalg.norm(at[:, None] - margin[None], axis=2), axis=1) < 0.004)
    colour = np.full(3, LASH_FLOOR)
    if close.sum() >= 5:
        rgb = eval_sh(gaussians.sh[close][:, :1], None)
        lum = rgb @ np.array([0.2126, 0.7152, 0.0722])
        colour = np.clip(
            np.median(rgb[lum <= np.percentile(lum, LASH_DARK)], axis=0), LASH_FLOOR, 1
        )
    sigma = LASH_SIGMA / growth[tri]  # at rest; posing scales it by the growth
    sh = np.zeros((count, gaussians.sh.shape[1], 3), np.float32)
    sh[:, 0] = rgb_to_sh0(colour[None])
    return BoundGaussians(
        triangle=tri.astype(np.int32),
        bary=bary.astype(np.float32),
        offset=np.full(count, LASH_LIFT, np.float32),
        rotation=np.tile(np.array([1.0, 0, 0, 0], np.float32), (count, 1)),
        log_scale=np.log(np.stack([sigma, sigma, THICKNESS * sigma], 1)).astype(np.float32),
        opacity_logit=np.full(count, np.log(LASH_OPACITY / (1 - LASH_OPACITY)), np.float32),
        sh=sh,
        appear=(1 + LASH_APPEAR * (growth[tri] - 1)).astype(np.float32),
    )
