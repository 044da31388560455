"""The head's colour as a texture: the photo projected into ICT's UV space where it saw
the surface, mirrored across the face's symmetry where it did not, inpainted from the
skin around it elsewhere (with the photo's own skin texture over it); eyes, teeth, gums
and mouth interior drawn.

The atlas. ICT's UVs are UDIM-like tiles (``floor(u)``): the face in tile 0, head and
neck with the mouth and eye sockets in 1, gums and tongue in 2, teeth in 3, and both
eyeballs, each two shells (cornea and ball) with different layouts, all overlapping
tile 0. Our atlas is ``2S x S`` pixels (``S``: :data:`ATLAS_UNIT` of the preset): the
face gets the left ``S x S`` square (the photo's detail is there), the head and each
eyeball's outer shell (the one that shows, drawn with a sharp iris and pupil) an
``S/2`` square, and gums, teeth (one colour each) and the hidden inner shells ``S/4``::

    +---------------+-------+-------+
    |               |       | left  |
    |               | head  | eye   |
    |     face      +-------+---+---+
    |               | right |gum|tth|
    |               | eye   |L i|R i|
    +---------------+-------+---+---+

Within a square, ICT's ``(u - tile, v)`` runs left to right and bottom to top (the image
upright); atlas coordinates are ``(x, y) / (2S, S)`` with y downwards (glTF's and the
image's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

from protocol.camera import project

from ..avatar import sphere_center
from ..geometry import edge_adjacency, triangle_frames
from ..headmodel import PART_TONGUE, HeadModel
from ..images import srgb_to_linear
from .gaussians import (
    COLOUR_FACING,
    FILL,
    OCCLUSION_TOLERANCE,
    SKIN_FILL,
    TONGUE_FILL,
    ZBUFFER_CELL,
    _eye_colours,
    _on,
)
from .pseudoviews import PatchTexture

#: Face square's side in pixels per preset (the atlas is twice as wide).
ATLAS_UNIT = {"fast": 512, "default": 1024, "high": 1024}
#: Squares of the atlas: name → (x, y, side) in units of ``S``.
TILES = {
    "face": (0.0, 0.0, 1.0), "head": (1.0, 0.0, 0.5), "eyeball_left_outer": (1.5, 0.0, 0.5),
    "eyeball_right_outer": (1.0, 0.5, 0.5), "gums_tongue": (1.5, 0.5, 0.25),
    "teeth": (1.75, 0.5, 0.25), "eyeball_left_inner": (1.5, 0.75, 0.25),
    "eyeball_right_inner": (1.75, 0.75, 0.25),
}  # fmt: skip
TILE_NAMES = tuple(TILES)
#: ICT's UDIM tile → our square (eyeballs are placed by region instead).
UDIM = {0: "face", 1: "head", 2: "gums_tongue", 3: "teeth"}

#: ``Texture.source`` labels.
SOURCE_NONE, SOURCE_PHOTO, SOURCE_MIRROR, SOURCE_FILLED, SOURCE_DRAWN = range(5)
#: cos(normal, ray) over which the photo's weight ramps from 0 (at COLOUR_FACING) to 1:
#: near grazing it hands over smoothly to the mirror image, where that was seen.
FACING_RAMP = 0.15
#: Fewer known texels than this in a fill group: fill with its flat colour instead.
MIN_KNOWN = 20
#: Unseen skin takes the colour of the known skin near it, fading into its region's
#: median (hair colour for the scalp) over this share of its square's side.
NEAR_RADIUS = 1 / 16
#: Unseen face and neck skin is not left flat: over its smooth fill lies the photo's own
#: skin texture, as the ratio of known skin to its trend, in patches of this share of
#: the face square's side (a solid texture on the 3-D points, :class:`PatchTexture`).
DETAIL_PATCH = 1 / 20
#: Patches kept, from the smoother half of those cut: brows, lids, lips and glasses rims
#: are features, not texture.
DETAIL_PATCHES = 48
#: The detail fades in from this far from the known skin to full at twice it (share of
#: a square's side): near the photo's edge the fill carries the photo's own colours.
DETAIL_FADE = 1 / 64
#: Triangles rasterised per batch (bounds the candidate arrays' memory).
BATCH = 4096


@dataclass(frozen=True)
class Texture:
    """The head's colour in the atlas (module docstring), as the photo showed it.

    Attributes:
        image: ``[H, W, 3]`` uint8 sRGB, ``W = 2 H``.
        source: ``[H, W]`` uint8 ``SOURCE_*``: where each texel's colour came from
            (``SOURCE_NONE``: no triangle covers it, padding for filtering).
        uvs: ``[UV, 2]`` float32 atlas coordinates in [0, 1], x right, y down.
        triangle_uvs: ``[T, 3]`` int32 index into ``uvs`` per triangle corner.
    """

    image: np.ndarray
    source: np.ndarray
    uvs: np.ndarray
    triangle_uvs: np.ndarray

    def corner_uvs(self) -> np.ndarray:
        """``[T, 3, 2]`` float32 atlas coordinates of each triangle's corners."""
        return self.uvs[self.triangle_uvs]

    def sample(self, triangle: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """``[N, 3]`` linear RGB, bilinear, at barycentric ``bary [N, 3]`` of
        ``triangle [N]``."""
        corners = self.uvs[self.triangle_uvs[triangle]]
        uv = np.einsum("nk,nkc->nc", bary.astype(np.float64), corners)
        h, w = self.source.shape
        return bilinear(self.image, uv * (w, h), _LINEAR)

    def validate(self, triangles: int) -> str | None:
        """What is wrong with it for a mesh of ``triangles`` triangles, or None."""
        if self.source.ndim != 2 or self.source.dtype != np.uint8:
            return "texture source must be [H, W] uint8"
        h, w = self.source.shape
        if self.image.shape != (h, w, 3) or self.image.dtype != np.uint8:
            return "texture image must be [H, W, 3] uint8 matching its source map"
        if self.triangle_uvs.shape != (triangles, 3):
            return "texture triangle_uvs must be [T, 3]"
        if self.uvs.ndim != 2 or self.uvs.shape[1] != 2:
            return "texture uvs must be [UV, 2]"
        t = self.triangle_uvs
        if t.min() < 0 or t.max() >= len(self.uvs):
            return "texture uv index out of range"
        if not (np.isfinite(self.uvs).all() and self.uvs.min() >= 0 and self.uvs.max() <= 1):
            return "texture uvs must lie in [0, 1]"
        return None


@dataclass(frozen=True)
class Atlas:
    """Where ICT's triangles lie in the atlas and which texels each covers.

    Attributes:
        width, height: pixels (``2S``, ``S``).
        tile: ``[T]`` int8 index into :data:`TILE_NAMES`.
        uvs, triangle_uvs: as in :class:`Texture`.
        pixel: ``[M]`` int64 flat index (row * width + column) of each covered texel.
        row, col: ``[M]`` int64 its row and column.
        triangle: ``[M]`` int32 the triangle covering its centre.
        texel_tile: ``[M]`` int8 that triangle's square (``tile[triangle]``).
        bary: ``[M, 3]`` float64 the centre's barycentric coordinates on it.
        corner: ``[M, 3]`` int32 that triangle's vertices.
        interp: ``[M, V]`` sparse (CSR): ``interp @ vertices`` puts each texel on the mesh.
        right: ``[M]`` int64 the covered texel to its right in the same square, or -1.
    """

    width: int
    height: int
    tile: np.ndarray
    uvs: np.ndarray
    triangle_uvs: np.ndarray
    pixel: np.ndarray
    row: np.ndarray
    col: np.ndarray
    triangle: np.ndarray
    texel_tile: np.ndarray
    bary: np.ndarray
    corner: np.ndarray
    interp: csr_matrix
    right: np.ndarray


_LINEAR = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)  # uint8 sRGB → linear
_SRGB_STEPS = 1 << 14
_TO_SRGB8 = None  # linear → uint8 sRGB lookup, made on first use


def _srgb8(linear: np.ndarray) -> np.ndarray:
    """uint8 sRGB of linear colour (a lookup on 16384 steps: under 1/255 of error)."""
    global _TO_SRGB8
    if _TO_SRGB8 is None:
        from ..images import linear_to_srgb

        steps = np.arange(_SRGB_STEPS) / (_SRGB_STEPS - 1)
        _TO_SRGB8 = (linear_to_srgb(steps) * 255 + 0.5).astype(np.uint8)
    idx = (np.clip(linear, 0.0, 1.0) * (_SRGB_STEPS - 1) + 0.5).astype(np.int32)
    return _TO_SRGB8[idx]


def bilinear(image: np.ndarray, xy: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """``image [H, W, C]`` at pixel coordinates ``xy [N, 2]`` (pixel (i, j) covers
    [j, j+1) x [i, i+1)), bilinear, clamped at the border → ``[N, C]`` float32.
    ``lut``: the texels' values are ``lut[image]`` (uint8 sRGB → linear, say)."""
    h, w = image.shape[:2]
    flat = image.reshape(h * w, -1)
    x = np.clip(xy[:, 0] - 0.5, 0, w - 1).astype(np.float32)
    y = np.clip(xy[:, 1] - 0.5, 0, h - 1).astype(np.float32)
    x0 = np.minimum(x.astype(np.int64), max(w - 2, 0))
    y0 = np.minimum(y.astype(np.int64), max(h - 2, 0))
    fx, fy = (x - x0.astype(np.float32))[:, None], (y - y0.astype(np.float32))[:, None]
    dx, dy = np.minimum(x0 + 1, w - 1) - x0, (np.minimum(y0 + 1, h - 1) - y0) * w
    at = y0 * w + x0

    def texel(i: np.ndarray) -> np.ndarray:
        v = flat[i]
        return lut[v] if lut is not None else v.astype(np.float32)

    top = texel(at) * (1 - fx) + texel(at + dx) * fx
    bottom = texel(at + dy) * (1 - fx) + texel(at + dy + dx) * fx
    return top * (1 - fy) + bottom * fy


# ---------------------------------------------------------------- the layout


def triangle_tiles(model: HeadModel) -> np.ndarray:
    """``[T]`` int8 square of each triangle: by ICT's tile (``floor`` of its centroid's
    u) for skin and mouth, by eyeball and shell (outer: the larger radius) for the eyes."""
    u = model.uvs[model.triangle_uvs][..., 0].mean(axis=1)
    udim = np.clip(np.floor(u).astype(np.int64), 0, max(UDIM))
    lookup = np.array([TILE_NAMES.index(UDIM[k]) for k in sorted(UDIM)])
    tile = lookup[udim].astype(np.int8)
    for side in ("left", "right"):
        eye = np.flatnonzero(model.triangle_region == model.region(f"eyeball_{side}"))
        if len(eye) == 0:
            continue
        shell = _shells(model.neutral, model.triangles[eye])
        tile[eye] = np.where(shell == 0, TILE_NAMES.index(f"eyeball_{side}_outer"),
                             TILE_NAMES.index(f"eyeball_{side}_inner"))  # fmt: skip
    return tile


def _shells(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``[t]`` 0 for triangles on the outermost connected shell of an eyeball, else 1."""
    from scipy.sparse.csgraph import connected_components

    _, label = connected_components(edge_adjacency(triangles, len(vertices)))
    comp = label[triangles[:, 0]]
    centre = sphere_center(vertices[np.unique(triangles)].astype(np.float64))
    radius = np.linalg.norm(vertices[triangles].mean(axis=1) - centre, axis=1)
    ids = np.unique(comp)
    mean_r = np.array([radius[comp == c].mean() for c in ids])
    return np.where(comp == ids[np.argmax(mean_r)], 0, 1)


def atlas_uvs(model: HeadModel, tile: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Atlas coordinates ``[UV', 2]`` and ``[T, 3]`` indices: ICT's UVs moved into each
    triangle's square (one entry per ICT UV and square, so the eyes' shared island
    splits)."""
    width, height = 2 * unit, unit
    corner_tile = np.repeat(tile.astype(np.int64)[:, None], 3, axis=1)
    key = model.triangle_uvs.astype(np.int64) * len(TILE_NAMES) + corner_tile
    keys, inverse = np.unique(key.ravel(), return_inverse=True)
    ict, sq = keys // len(TILE_NAMES), keys % len(TILE_NAMES)
    rect = np.array([TILES[n] for n in TILE_NAMES]) * unit  # [tiles, 3] x, y, side
    udim = {name: k for k, name in UDIM.items()}
    offset = np.array([udim.get(n, 0) for n in TILE_NAMES], np.float64)
    u = np.clip(model.uvs[ict, 0] - offset[sq], 0.0, 1.0)
    v = np.clip(model.uvs[ict, 1], 0.0, 1.0)
    x = rect[sq, 0] + u * rect[sq, 2]
    y = rect[sq, 1] + (1.0 - v) * rect[sq, 2]
    uvs = np.stack([x / width, y / height], axis=1).astype(np.float32)
    return uvs, inverse.reshape(-1, 3).astype(np.int32)


def rasterize_uv(
    corners: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre, vectorised over batches of triangles.

    Args:
        corners: ``[T, 3, 2]`` triangle corners in pixels (x right, y down).
    Returns:
        pixel ``[M]`` int64 flat index of each covered texel (row * width + column),
        triangle ``[M]`` int32, bary ``[M, 3]`` float64. A centre on a shared edge (or
        under overlapping triangles) goes to the highest triangle index; triangles of
        zero area cover nothing.
    """
    corners = np.asarray(corners, np.float64)
    owner = np.full(width * height, -1, np.int64)
    found = []
    for start in range(0, len(corners), BATCH):
        c = corners[start : start + BATCH]
        cand_tri, cand_pix, cand_bary = _candidates(c, width, height)
        cand_tri += start
        np.maximum.at(owner, cand_pix, cand_tri)
        found.append((cand_tri, cand_pix, cand_bary))
    tri = np.concatenate([f[0] for f in found])
    pix = np.concatenate([f[1] for f in found])
    bary = np.concatenate([f[2] for f in found])
    keep = owner[pix] == tri
    order = np.argsort(pix[keep], kind="stable")
    return pix[keep][order], tri[keep][order].astype(np.int32), bary[keep][order]


def _candidates(c: np.ndarray, width: int, height: int):
    """Texel centres inside each of the triangles ``c [t, 3, 2]``: (triangle, pixel,
    bary), triangle indices local to ``c``."""
    lo = np.clip(np.ceil(c.min(axis=1) - 0.5), 0, [width, height]).astype(np.int64)
    hi = np.clip(np.floor(c.max(axis=1) - 0.5), -1, [width - 1, height - 1]).astype(np.int64)
    a, b, d = c[:, 0], c[:, 1], c[:, 2]
    denom = (b[:, 1] - d[:, 1]) * (a[:, 0] - d[:, 0]) + (d[:, 0] - b[:, 0]) * (a[:, 1] - d[:, 1])
    nx = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0)
    ny = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    count = np.where(np.abs(denom) > 1e-12, nx * ny, 0)
    tri = np.repeat(np.arange(len(c)), count)
    k = np.arange(len(tri)) - np.repeat(np.cumsum(count) - count, count)
    col = lo[tri, 0] + k % nx[tri]
    row = lo[tri, 1] + k // nx[tri]
    px, py = col + 0.5, row + 0.5
    dx, dy = px - d[tri, 0], py - d[tri, 1]
    l0 = ((b[tri, 1] - d[tri, 1]) * dx + (d[tri, 0] - b[tri, 0]) * dy) / denom[tri]
    l1 = ((d[tri, 1] - a[tri, 1]) * dx + (a[tri, 0] - d[tri, 0]) * dy) / denom[tri]
    l2 = 1.0 - l0 - l1
    eps = -1e-9
    inside = (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
    bary = np.stack([l0, l1, l2], axis=1)[inside]
    return tri[inside], (row * width + col)[inside], bary


_ATLAS: dict[tuple[int, int], tuple[HeadModel, Atlas]] = {}


def atlas(model: HeadModel, unit: int) -> Atlas:
    """The atlas of ``model`` with a face square of ``unit`` pixels (kept per model and
    size: it depends on neither the photo nor the fit)."""
    hit = _ATLAS.get((id(model), unit))
    if hit is not None and hit[0] is model:
        return hit[1]
    tile = triangle_tiles(model)
    uvs, triangle_uvs = atlas_uvs(model, tile, unit)
    width, height = 2 * unit, unit
    corners = uvs[triangle_uvs].astype(np.float64) * (width, height)
    pixel, triangle, bary = rasterize_uv(corners, width, height)
    corner = model.triangles[triangle].astype(np.int32)
    rows = np.repeat(np.arange(len(pixel)), 3)
    interp = csr_matrix((bary.ravel(), (rows, corner.ravel())), (len(pixel), len(model.neutral)))
    row, col = np.divmod(pixel, width)
    texel_tile = tile[triangle]
    index = np.full(width * height + 1, -1, np.int64)  # the last entry: off the atlas
    index[pixel] = np.arange(len(pixel))
    right = index[np.where(col + 1 < width, pixel + 1, width * height)]
    same = right >= 0
    same[same] = texel_tile[right[same]] == texel_tile[same]
    right[~same] = -1
    out = Atlas(width, height, tile, uvs, triangle_uvs, pixel, row, col, triangle,
                texel_tile, bary, corner, interp, right)  # fmt: skip
    if len(_ATLAS) >= 4:
        _ATLAS.clear()
    _ATLAS[(id(model), unit)] = (model, out)
    return out


# ---------------------------------------------------------------- the bake


class _DepthCells:
    """The photo's nearest depth per cell of ZBUFFER_CELL pixels, from points that face
    it; answers whether another point is in front (first along its ray)."""

    def __init__(self, uv: np.ndarray, z: np.ndarray, facing: np.ndarray, size) -> None:
        w, h = size
        self.size = size
        self.gw = int(np.ceil(w / ZBUFFER_CELL)) + 1
        self.zbuf = np.full(self.gw * (int(np.ceil(h / ZBUFFER_CELL)) + 1), np.inf)
        key, inside = self._key(uv, z)
        sel = inside & facing
        np.minimum.at(self.zbuf, key[sel], z[sel])

    def _key(self, uv: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, h = self.size
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        cells = np.floor(np.where(inside[:, None], uv, 0) / ZBUFFER_CELL).astype(np.int64)
        return cells[:, 1] * self.gw + cells[:, 0], inside

    def front(self, uv: np.ndarray, z: np.ndarray) -> np.ndarray:
        key, inside = self._key(uv, z)
        return inside & (z <= self.zbuf[np.where(inside, key, 0)] + OCCLUSION_TOLERANCE)


def _facing(points: np.ndarray, normals: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """``[M]`` cos between each normal and the direction to the photo's camera."""
    to_cam = (-w2c[:3, :3].T @ w2c[:3, 3]) - points
    dist = np.sqrt(np.einsum("mc,mc->m", to_cam, to_cam))
    return np.einsum("mc,mc->m", normals, to_cam) / np.maximum(dist, 1e-12)


def _photo_linear(photo: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """The photo's pixel under pixel coordinates ``uv [M, 2]``, linear RGB ``[M, 3]``.

    Nearest, not interpolated: the atlas is finer than the photo, and the photo's own
    pixels keep its contrast (interpolating twice, photo then texture, blurs lashes,
    brows and irises enough to shift what MediaPipe reads on renders)."""
    h, w = photo.shape[:2]
    j = np.clip(np.floor(uv[:, 0]).astype(np.int64), 0, w - 1)
    i = np.clip(np.floor(uv[:, 1]).astype(np.int64), 0, h - 1)
    return _LINEAR[photo[i, j]]


def bake_texture(
    model: HeadModel,
    vertices: np.ndarray,
    photo: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    person: np.ndarray | None = None,
    hair_colour: np.ndarray | None = None,
    preset: str = "default",
) -> Texture:
    """The photo baked into the atlas of ``model``'s UVs.

    Args:
        vertices: ``[V, 3]`` the head as the photo shows it (its expression, head frame).
        photo: ``[H, W, 3]`` uint8 sRGB.
        intrinsics, world_to_camera: the photo's camera (``[4]`` pixels, ``[4, 4]``).
        person: ``[H, W]`` bool, the photo's person mask: elsewhere it shows backdrop.
        hair_colour: ``[3]`` linear, the hair's colour, for the scalp the photo missed.
        preset: picks the atlas size (:data:`ATLAS_UNIT`).
    Returns:
        The :class:`Texture`. Face and head texels the photo saw squarely (cos above
        COLOUR_FACING, ramping in over FACING_RAMP) take its colour; others take their
        mirror image's (x → -x) where the photo saw that; the rest of each region is
        filled from the known texels around it (pull-push), fading with distance into
        the face's median colour (``hair_colour`` on the scalp above the eyes), and
        unseen face and neck skin away from the photo's edge takes the seen skin's
        relative detail over that (:data:`DETAIL_PATCH`); eyes
        are drawn (pupil, iris of the photo's colour, sclera), mouth, gums and teeth
        take fixed colours.
    """
    at = atlas(model, ATLAS_UNIT[preset])
    region = model.triangle_region[at.triangle]
    rows, cols = at.row, at.col
    # every texel as a point on ``vertices``: all of them may hide what lies behind them
    # from the photo; skin takes its colour from the photo, the rest is drawn
    v = vertices.astype(np.float64)
    points = at.interp @ v
    normals = triangle_frames(vertices, model.triangles)[0][at.triangle, :, 2]
    skin = np.isin(region, [model.region(n) for n in ("face", "head_neck")])
    seen, uv, colour, known, source = _project_photo(
        points, normals.astype(np.float64), skin, photo, intrinsics, world_to_camera, person
    )
    face = known & (region == model.region("face"))
    face_median = np.median(colour[face], axis=0) if face.any() else srgb_to_linear(SKIN_FILL)
    for r, name in enumerate(model.region_names):
        in_r = region == r
        if name.startswith("eyeball"):  # drawn: pupil, iris (the photo's colour), sclera
            ids = np.unique(model.triangles[model.triangle_region == r])
            seen_r = seen[in_r]
            photo_colour = np.zeros((int(in_r.sum()), 3))
            photo_colour[seen_r] = _photo_linear(photo, uv[in_r][seen_r])
            colour[in_r] = _eye_colours(points[in_r], sphere_center(v[ids]), seen_r, photo_colour)
            source[in_r] = SOURCE_DRAWN
        elif name in FILL:  # the mouth and sockets: fixed colours
            colour[in_r] = srgb_to_linear(np.array(FILL[name]))
            source[in_r] = SOURCE_DRAWN
            if name == "gums_tongue":
                tongue = in_r & np.all(model.vertex_part[at.corner] == PART_TONGUE, axis=1)
                colour[tongue] = srgb_to_linear(np.array(TONGUE_FILL))
    grid = np.zeros((at.height, at.width, 3), np.float32)  # linear RGB
    label = np.zeros((at.height, at.width), np.uint8)
    grid[rows, cols] = colour
    label[rows, cols] = source

    # unknown skin: from the known texels of its group, fading into its statistics
    eye_z = v[model.landmarks68[[36, 45]], 2].mean()
    neck = region == model.region("head_neck")
    scalp = neck & (points[:, 2] > eye_z)
    neck &= ~scalp
    scalp_colour = hair_colour
    if scalp_colour is None:
        scalp_colour = np.median(colour[scalp & known], 0) if (scalp & known).any() else face_median
    groups = [(region == model.region("face"), face_median), (neck, face_median),
              (scalp, scalp_colour)]  # fmt: skip
    spread = _fill_skin(grid, label, at, known, groups)
    detail = _skin_detail(grid, at, face, points, 0.5 * (v.min(0) + v.max(0)))
    if detail is not None:
        _add_detail(grid, at, known, (region == model.region("face")) | neck, points, detail)
    _pad(grid, label, at, spread)
    return Texture(image=_srgb8(grid), source=label, uvs=at.uvs, triangle_uvs=at.triangle_uvs)


def _fill_skin(
    grid: np.ndarray,
    label: np.ndarray,
    at: Atlas,
    known: np.ndarray,
    groups: list[tuple[np.ndarray, np.ndarray]],
) -> dict[int, np.ndarray]:
    """Fill, in place, the unknown texels of each group (``[M]`` bool over the texels of
    ``at``, and its target colour) from its known texels in the same square
    (:func:`inpaint`), or with its target where it has fewer than MIN_KNOWN. Returns
    the fills of squares one group holds entirely (padding reuses them)."""
    rows, cols, tile_of = at.row, at.col, at.texel_tile
    spread: dict[int, np.ndarray] = {}
    for member, target in groups:
        for t in np.unique(tile_of[member]):
            group = member & (tile_of == t)
            todo = group & ~known
            if not todo.any():
                continue
            if (group & known).sum() >= MIN_KNOWN:
                x, y, side = _rect(TILE_NAMES[t], at)
                weight = np.zeros((side, side), np.float32)
                weight[rows[group & known] - y, cols[group & known] - x] = 1.0
                filled = inpaint(grid[y : y + side, x : x + side], weight, target)
                grid[rows[todo], cols[todo]] = _at(filled, rows[todo] - y, cols[todo] - x)
                if group.sum() == np.count_nonzero(tile_of == t):
                    spread[t] = filled
            else:
                grid[rows[todo], cols[todo]] = target
            label[rows[todo], cols[todo]] = SOURCE_FILLED
    return spread


def _skin_detail(
    grid: np.ndarray, at: Atlas, known: np.ndarray, points: np.ndarray, center: np.ndarray
) -> PatchTexture | None:
    """The face's known skin (``known``: ``[M]`` bool over the texels of ``at``) as a
    solid texture of its ratio to its trend (a plane per patch and channel, so a cheek's
    shading is not copied); None if too little is known."""
    x, y, side = _rect("face", at)
    rows, cols = at.row, at.col
    weight = np.zeros((side, side))
    weight[rows[known] - y, cols[known] - x] = 1.0
    h = max(4, int(round(DETAIL_PATCH * side / 2)))
    s = 2 * h + 1
    inside = np.zeros((side, side), bool)  # patch centres: known throughout the patch
    inside[h:-h, h:-h] = (_box_mean(weight, h) > 1.0 - 1e-9)[h:-h, h:-h]
    ys, xs = np.nonzero(inside)
    if len(ys) < DETAIL_PATCHES:
        return None
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ys), size=min(8 * DETAIL_PATCHES, len(ys)), replace=False)
    image = grid[y : y + side, x : x + side]
    patches = np.stack([image[r - h : r + h + 1, c - h : c + h + 1]
                        for r, c in zip(ys[pick], xs[pick], strict=True)])  # fmt: skip
    v, u = np.mgrid[-h : h + 1, -h : h + 1] / h
    design = np.stack([np.ones(s * s), u.ravel(), v.ravel()], axis=1)
    flat = patches.reshape(len(patches), s * s, 3).astype(np.float64)
    trend = design @ (np.linalg.pinv(design) @ flat)
    ratio = flat / np.maximum(trend, 1e-4)
    energy = np.abs(np.log(np.maximum(ratio, 1e-3))).mean(axis=(1, 2))
    smooth = np.flatnonzero(energy <= np.median(energy))
    keep = rng.choice(smooth, size=min(DETAIL_PATCHES, len(smooth)), replace=False)
    # metres per texel, from known texels and their right-hand neighbours in one square
    k = np.flatnonzero(known)
    k = k[at.right[k] >= 0]
    step = np.linalg.norm(points[k] - points[at.right[k]], axis=1)
    patches = ratio[keep].reshape(len(keep), s, s, 3).astype(np.float32)
    return PatchTexture(patches, s * float(np.median(step)), center)


def _add_detail(
    grid: np.ndarray,
    at: Atlas,
    known: np.ndarray,
    skin: np.ndarray,
    points: np.ndarray,
    detail: PatchTexture,
) -> None:
    """Multiply, in place, the unknown texels of ``skin`` (``[M]`` bool) by ``detail``,
    fading in with their distance from the known texels of their square."""
    from scipy import ndimage

    rows, cols, tile_of = at.row, at.col, at.texel_tile
    for t in np.unique(tile_of[skin & ~known]):
        todo = np.flatnonzero(skin & ~known & (tile_of == t))
        x, y, side = _rect(TILE_NAMES[t], at)
        unknown = np.ones((side, side), bool)
        mine = known & (tile_of == t)
        unknown[rows[mine] - y, cols[mine] - x] = False
        fade = np.ones((len(todo), 1))
        if not unknown.all():
            far = ndimage.distance_transform_edt(unknown)[rows[todo] - y, cols[todo] - x]
            fade[:, 0] = np.clip(far / (DETAIL_FADE * side) - 1.0, 0.0, 1.0)
        some = fade[:, 0] > 0
        todo, fade = todo[some], fade[some]
        ratio = detail(points[todo])
        grid[rows[todo], cols[todo]] *= (1.0 + fade * (ratio - 1.0)).astype(np.float32)


def _pad(grid: np.ndarray, label: np.ndarray, at: Atlas, spread: dict[int, np.ndarray]) -> None:
    """Texels no triangle covers take their covered neighbours' colour (in place), so
    that filtering (bilinear, mipmaps) across an island's edge stays in colour."""
    for t, name in enumerate(TILE_NAMES):
        x, y, side = _rect(name, at)
        part = grid[y : y + side, x : x + side]
        covered = label[y : y + side, x : x + side] > SOURCE_NONE
        if covered.any() and not covered.all():
            filled = spread.get(t)
            if filled is None:
                filled = inpaint(part, covered.astype(np.float32))
            r, c = np.nonzero(~covered)
            part[r, c] = _at(filled, r, c)


def _project_photo(
    points: np.ndarray,
    normals: np.ndarray,
    skin: np.ndarray,
    photo: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    person: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The photo's colour on texels ``points [M, 3]`` with ``normals [M, 3]``.

    Returns ``seen`` [M] (first along their ray and facing the photo by cos > 0.15: for
    the iris), ``uv`` [M, 2] (their photo pixels), ``colour`` [M, 3] linear, ``known``
    [M] and ``source`` [M] (``SOURCE_*``). Only ``skin`` [M] texels take colour: the
    photo's where it saw them squarely on the person, blended by view angle into their
    mirror image's (x → -x) where that was seen instead."""
    size = (photo.shape[1], photo.shape[0])
    uv, z = project(points, intrinsics, world_to_camera)
    cos = _facing(points, normals, world_to_camera)
    depth = _DepthCells(uv, z, cos > 0.15, size)
    seen = depth.front(uv, z) & (cos > 0.15)
    weight = np.where(seen & skin, _ramp(cos), 0.0)
    if person is not None:
        weight[weight > 0] *= _on(person, uv[weight > 0])
    colour = np.zeros((len(points), 3), np.float32)
    source = np.full(len(points), SOURCE_FILLED, np.uint8)
    have = np.flatnonzero(weight > 0)
    colour[have] = _photo_linear(photo, uv[have])

    idx = np.flatnonzero(skin & (weight < 1))  # where the mirror image may help
    mirror = np.array([-1.0, 1.0, 1.0])
    uv_m, z_m = project(points[idx] * mirror, intrinsics, world_to_camera)
    cos_m = _facing(points[idx] * mirror, normals[idx] * mirror, world_to_camera)
    seen_m = depth.front(uv_m, z_m) & (cos_m > COLOUR_FACING)
    if person is not None:
        seen_m &= _on(person, uv_m)
    idx, uv_m = idx[seen_m], uv_m[seen_m]
    w = weight[idx][:, None]
    colour[idx] = w * colour[idx] + (1 - w) * _photo_linear(photo, uv_m)
    known = weight > 0
    known[idx] = True
    source[known] = SOURCE_PHOTO
    source[idx[weight[idx] < 0.5]] = SOURCE_MIRROR
    return seen, uv, colour, known, source


def _rect(tile: str, at: Atlas) -> tuple[int, int, int]:
    """Pixel column, row and side of the square ``tile`` in ``at``."""
    x, y, side = (int(round(c * at.height)) for c in TILES[tile])
    return x, y, side


def _ramp(cos: np.ndarray) -> np.ndarray:
    """The photo's weight by view angle: 0 up to COLOUR_FACING, 1 from FACING_RAMP on."""
    return np.clip((cos - COLOUR_FACING) / FACING_RAMP, 0.0, 1.0)


def inpaint(colour: np.ndarray, weight: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """A fill for ``colour [H, W, 3]`` where ``weight [H, W]`` is 0, at half resolution
    ``[H/2, W/2, 3]`` (read it with :func:`_at`): near known texels their colours
    (:func:`pull_push` from the first level down, which is all an unknown texel takes
    from the full-resolution level), fading into ``target [3]`` (the region's
    statistics) over NEAR_RADIUS of the square's side away from them."""
    w2, c2 = _halve(colour, weight)
    fill = pull_push(c2, w2)
    if target is not None:
        near = _box_mean(w2 / 4, max(1, int(NEAR_RADIUS * w2.shape[0])))
        t = np.clip(2.0 * near, 0.0, 1.0)[..., None]
        fill = t * fill + (1 - t) * np.asarray(target, np.float32)
    return fill.astype(np.float32)


def _at(half: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``[n, 3]`` the half-resolution ``half`` at full-resolution texels (rows, cols)."""
    return bilinear(half, np.stack([(cols + 0.5) / 2, (rows + 0.5) / 2], axis=1))


def _halve(colour: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pull step: summed weights ``[h, w]`` and weighted mean colours of 2x2 blocks
    (odd sizes padded with zero weight)."""
    h, w = weight.shape
    ph, pw = h + h % 2, w + w % 2
    wc = np.zeros((ph, pw), np.float32)
    cc = np.zeros((ph, pw, colour.shape[2]), np.float32)
    wc[:h, :w] = weight
    cc[:h, :w] = colour * weight[..., None]
    w2 = wc[0::2, 0::2] + wc[1::2, 0::2] + wc[0::2, 1::2] + wc[1::2, 1::2]
    c2 = cc[0::2, 0::2] + cc[1::2, 0::2] + cc[0::2, 1::2] + cc[1::2, 1::2]
    return w2, c2 / np.maximum(w2, 1e-12)[..., None]


def _box_mean(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean of ``a [H, W]`` over the (2 radius + 1)² box about each texel (clipped)."""
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    s[1:, 1:] = a.cumsum(0).cumsum(1)
    lo_r, hi_r = _span(a.shape[0], radius)
    lo_c, hi_c = _span(a.shape[1], radius)
    box = s[hi_r][:, hi_c] - s[lo_r][:, hi_c] - s[hi_r][:, lo_c] + s[lo_r][:, lo_c]
    return box / ((hi_r - lo_r)[:, None] * (hi_c - lo_c)[None, :])


def _span(n: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n)
    return np.clip(i - radius, 0, n), np.clip(i + radius + 1, 0, n)


def pull_push(colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fill the texels of ``colour [H, W, C]`` where ``weight [H, W]`` is 0 from those
    where it is not: average down a pyramid (pull), then fill each level's holes from
    the level below, bilinearly upsampled (push). Known texels keep their colour;
    every fill is a weighted mean of known ones (so within their range). float32."""
    known = weight > 0
    if known.all() or not known.any():
        return colour.astype(np.float32)
    h, w = weight.shape
    w2, c2 = _halve(colour, weight)
    up = _upsample(pull_push(c2, w2))[:h, :w]
    return np.where(known[..., None], colour, up).astype(np.float32)


def _upsample(c: np.ndarray) -> np.ndarray:
    """``[h, w, C]`` → ``[2h, 2w, C]``, bilinear (pixel centres), clamped at the edges."""
    h, w = c.shape[:2]
    rows = np.empty((2 * h, w, c.shape[2]), c.dtype)
    rows[0::2] = 0.75 * c + 0.25 * c[np.maximum(np.arange(h) - 1, 0)]
    rows[1::2] = 0.75 * c + 0.25 * c[np.minimum(np.arange(h) + 1, h - 1)]
    out = np.empty((2 * h, 2 * w, c.shape[2]), c.dtype)
    out[:, 0::2] = 0.75 * rows + 0.25 * rows[:, np.maximum(np.arange(w) - 1, 0)]
    out[:, 1::2] = 0.75 * rows + 0.25 * rows[:, np.minimum(np.arange(w) + 1, w - 1)]
    return out
