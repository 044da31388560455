"""Hair and everything else the bald ICT head lacks, from the photo's person silhouette.

The skull is given a shell: each scalp vertex is pushed out along its normal by a hair
thickness. ICT's face region reaches back past the temples to the ears, so the temples
are scalp too where the silhouette shows hair beside them (a bob, hair over the ears), and
so are the sides and back of the head below the ears down to the ear lobes; where it
does not (short hair, a receding hairline) they stay skin. Where the scalp lies
on the head's outline in the photo, the thickness is measured directly: march outwards
from the vertex, in the image, until leaving the person mask. Elsewhere (the back of the
head, the crown seen from the front) it is unobserved, and is spread over the scalp from
the measured places by smoothing on the mesh, which gives a plausible back-of-head depth.
Gaussians on the shell are bound to the scalp's triangles with that offset along the
normal, so they move rigidly with the skull when the head is posed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.sh import rgb_to_sh0
from protocol.camera import project

from ..avatar import BoundGaussians
from ..geometry import edge_adjacency, triangle_frames, vertex_normals
from ..headmodel import HeadModel
from .gaussians import (
    EDGE_ON_SIGMA,
    OPACITY,
    TANGENT_SIGMA,
    THICKNESS,
    _sample_photo,
    _visible,
    random_bary,
    stratified,
)

HAIR_MAX = 0.06  # metres: thicker than this is not hair on a head
MARCH_STEP = 0.0015  # metres along the normal per sample
OUTLINE_STEPS = 3  # samples within which a march from the outline leaves the bald head
RIM = 0.35  # |normal . view| below this: the vertex is on the head's outline
SMOOTHING = 300  # iterations spreading measured thickness over the scalp
MIN_SHELL = 0.004  # metres: thinner hair is drawn by the scalp's own Gaussians
SKULL_RADIUS = 0.09  # metres, for growing shell Gaussians with their distance out
TEMPLE = 0.055  # metres behind the outer eye corners where the temples may carry hair
#: metres below the outer eye corners: the ear lobes, where a bob or the nape's hairline
#: ends. From there up to the ears the sides and back of the head may carry hair, as the
#: temples do (only where the photo shows it or the scalp above spreads to). Ending at the
#: ears (before), the astronaut's bob stopped 2 cm short of the lobes it covers in the
#: photo, and the default build's view from behind was 0.9952 covered (now 0.9985).
LOBES = 0.045
WORK_SIZE = 768  # longest side of the images the silhouette is measured on


@dataclass(frozen=True)
class HairShell:
    """Attributes:
    thickness: ``[V]`` metres along the vertex normal (0 off the scalp).
    measured: ``[V]`` bool, where the silhouette measured it.
    scalp: ``[V]`` bool, vertices that may carry hair.
    colour: ``[3]`` linear RGB, median of the hair the photo shows, or None if the
        photo shows too little hair outside the bald head to tell.
    """

    thickness: np.ndarray
    measured: np.ndarray
    scalp: np.ndarray
    colour: np.ndarray | None


def scalp_vertices(model: HeadModel, vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[V]`` bool twice: the scalp (head-and-neck vertices above the ears, as long hair
    below is not modelled, and the top of the forehead), and the temples (the other
    vertices of the face and head regions ``TEMPLE`` behind the outer eye corners and
    above the ear lobes: the temples, and the sides and back of the head from the ears
    down to ``LOBES``), which carry hair only where the photo shows it."""
    top = vertices[model.landmarks68[[19, 24]], 2].mean()  # brow peaks
    corners = vertices[model.landmarks68[[36, 45]]]
    ear_level = corners[:, 2].mean() - 0.025
    scalp = np.zeros(len(vertices), bool)
    head = np.unique(model.triangles[model.triangle_region == model.region("head_neck")])
    scalp[head[vertices[head, 2] > ear_level]] = True
    face = np.unique(model.triangles[model.triangle_region == model.region("face")])
    scalp[face[vertices[face, 2] > top + 0.03]] = True  # the hairline at the forehead
    temple = np.zeros(len(vertices), bool)
    either = np.union1d(head, face)
    side = (vertices[either, 2] > corners[:, 2].mean() - LOBES) & (
        vertices[either, 1] > corners[:, 1].mean() + TEMPLE  # the face looks towards -Y
    )
    temple[either[side]] = True
    return scalp, temple & ~scalp


def _silhouette(model: HeadModel, uv: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool: pixels the bald head covers (every triangle filled)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    for tri in uv[model.triangles]:
        draw.polygon([tuple(p) for p in tri], fill=255)
    return np.asarray(img) > 0


def fit_hair(
    model: HeadModel,
    vertices: np.ndarray,
    photo: np.ndarray,
    person: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
) -> HairShell:
    """Measure the hair shell of ``vertices`` (the head as the photo shows it)."""
    from PIL import Image

    from ..images import srgb_to_linear

    h, w = person.shape
    s = min(1.0, WORK_SIZE / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    k = np.asarray(intrinsics, np.float64) * s
    mask = np.asarray(Image.fromarray(person.astype(np.uint8) * 255).resize(size)) > 127
    small = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR))

    uv, _ = project(vertices, k, world_to_camera)
    bald = _silhouette(model, uv, size)
    normals = vertex_normals(vertices, model.triangles).astype(np.float64)
    scalp, temple = scalp_vertices(model, vertices)
    scalp = scalp | temple

    cam = -world_to_camera[:3, :3].T @ world_to_camera[:3, 3]
    view = vertices - cam
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    rim = scalp & (np.abs(np.sum(normals * view, axis=1)) < RIM)

    steps = np.arange(1, int(HAIR_MAX / MARCH_STEP) + 1) * MARCH_STEP
    ids = np.flatnonzero(rim)
    pts = vertices[ids, None, :] + steps[None, :, None] * normals[ids, None, :]
    puv, z = project(pts.reshape(-1, 3), k, world_to_camera)
    col = np.clip(np.floor(puv[:, 0]).astype(int), 0, size[0] - 1)
    row = np.clip(np.floor(puv[:, 1]).astype(int), 0, size[1] - 1)
    inside = (puv[:, 0] >= 0) & (puv[:, 0] < size[0]) & (puv[:, 1] >= 0) & (puv[:, 1] < size[1])
    hit = (mask[row, col] & inside & (z > 0)).reshape(len(ids), len(steps))
    # only a vertex on the head's outline measures anything: the march from one whose
    # outward side the photo sees over the head itself stays on the head, hair or not
    off_head = (~bald[row, col] | ~inside).reshape(len(ids), len(steps))
    outline = off_head[:, :OUTLINE_STEPS].any(axis=1)
    ids, hit = ids[outline], hit[outline]
    # thickness: the samples still inside the person, counted from the scalp outwards
    run = np.cumprod(hit, axis=1).sum(axis=1)
    # unless the march left the photo (or passed behind the camera) still in the person or
    # before it began: what lies past the border is unknown, not bald
    seen = (inside & (z > 0)).reshape(-1, len(steps))[outline]
    known = (run == len(steps)) | seen[np.arange(len(run)), np.minimum(run, len(steps) - 1)]
    ids, run = ids[known], run[known]
    thickness = np.zeros(len(vertices))
    thickness[ids] = run * MARCH_STEP
    measured = np.zeros(len(vertices), bool)
    measured[ids] = True

    # spread over the scalp: unmeasured vertices take their neighbours' mean
    adj = edge_adjacency(model.triangles, len(vertices))
    adj = adj[scalp][:, scalp]
    deg = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1)
    t = thickness[scalp]
    known = measured[scalp]
    if known.any():
        t[~known] = np.median(t[known])
        for _ in range(SMOOTHING):
            t = np.where(known, t, (adj @ t) / deg)
        thickness[scalp] = t
    bare = temple & (thickness < MIN_SHELL)  # skin, not hair, beside the face here
    scalp &= ~bare
    thickness[bare] = 0.0

    hair_px = mask & ~bald
    top = uv[model.landmarks68[[19, 24]], 1].mean()  # brow row: hair is above it
    hair_px[int(max(0, top)) :, :] = False
    colour = None
    if hair_px.sum() > 200:
        colour = np.median(srgb_to_linear(small[hair_px] / 255.0), axis=0)
    return HairShell(thickness, measured, scalp, colour)


def hair_gaussians(
    model: HeadModel,
    vertices: np.ndarray,
    shell: HairShell,
    count: int,
    photo: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    rng: np.random.Generator,
) -> BoundGaussians:
    """Up to ``count`` Gaussians (none where the shell is thin) on the scalp's triangles,
    pushed out to the shell, coloured from the photo where it saw them and with the
    hair's median colour elsewhere."""
    tris = np.flatnonzero(shell.scalp[model.triangles].all(axis=1))
    frames, area = triangle_frames(vertices, model.triangles[tris])
    pick = stratified(area, count, rng)
    bary = random_bary(rng, len(pick))
    corner = model.triangles[tris[pick]]
    offset = np.einsum("nk,nk->n", bary, shell.thickness[corner])
    keep = offset >= MIN_SHELL
    pick, bary, corner, offset = pick[keep], bary[keep], corner[keep], offset[keep]
    n = len(pick)
    spacing = np.sqrt(area.sum() / max(count, 1))
    sigma = EDGE_ON_SIGMA * TANGENT_SIGMA * spacing * (1 + offset / SKULL_RADIUS)
    log_scale = np.log(np.stack([sigma, sigma, THICKNESS * sigma], axis=1))
    normals = frames[pick, :, 2]
    points = np.einsum("nk,nkc->nc", bary, vertices[corner]) + offset[:, None] * normals
    seen, uv = _visible(points, normals, intrinsics, world_to_camera, photo.shape[1::-1])
    colour = np.tile(shell.colour if shell.colour is not None else np.full(3, 0.05), (n, 1))
    colour[seen] = _sample_photo(photo, uv[seen])
    return BoundGaussians(
        triangle=tris[pick].astype(np.int32),
        bary=bary.astype(np.float32),
        offset=offset.astype(np.float32),
        rotation=np.tile(np.array([1.0, 0, 0, 0], np.float32), (n, 1)),
        log_scale=log_scale.astype(np.float32),
        opacity_logit=np.full(n, np.log(OPACITY / (1 - OPACITY)), np.float32),
        sh=rgb_to_sh0(colour)[:, None, :].astype(np.float32),
    )
