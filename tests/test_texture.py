"""The texture: the atlas rasteriser against a per-texel reference, texels on the mesh,
the mirror fill, no holes, fills within their region's colours, unseen skin's detail,
Gaussians sampling it, and avatars keeping it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.spatial import cKDTree

from inference_service.avatar import Avatar
from inference_service.build import texture as tx
from inference_service.build.gaussians import (
    BUST_BELOW_CHIN,
    BUST_DENSITY,
    BUST_SIGMA,
    COLOUR_FACING,
    COUNTS,
    DENSITY,
    FILL,
    TANGENT_SIGMA,
    TONGUE_FILL,
    make_gaussians,
)
from inference_service.geometry import triangle_frames
from inference_service.headmodel import PART_TONGUE, load_head_model
from inference_service.images import srgb_to_linear
from inference_service.store import Store
from kernels.sh import eval_sh
from protocol.camera import intrinsics_from_fov, orbit

SIZE = 256  # photo pixels
YAW = 50.0  # degrees: the head turned far enough that one cheek is hidden
HAIR = (0.3, 0.2, 0.1)  # sRGB


def smooth_photo(size: int = SIZE) -> np.ndarray:
    """A photo whose colour changes slowly and differently along x and y (60..200)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    rgb = np.stack([130 + 70 * np.sin(x / 23.0), 130 + 70 * np.cos(y / 29.0),
                    130 + 70 * np.sin((x + 2 * y) / 37.0)], axis=2)  # fmt: skip
    return np.round(rgb).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    return load_head_model()


@pytest.fixture(scope="module")
def camera(model):
    face = model.triangles[model.triangle_region == model.region("face")]
    centre = model.neutral[np.unique(face)].mean(axis=0)
    return intrinsics_from_fov(SIZE, SIZE, 30.0), orbit(centre, 0.6, YAW, 0.0)


@pytest.fixture(scope="module")
def baked(model, camera):
    intr, w2c = camera
    person = np.ones((SIZE, SIZE), bool)
    hair = srgb_to_linear(np.array(HAIR))
    return tx.bake_texture(model, model.neutral, smooth_photo(), intr, w2c, person, hair, "fast")


# ---------------------------------------------------------------- the rasteriser


def reference_raster(corners: np.ndarray, width: int, height: int):
    """Per texel, per triangle: solve for the centre's barycentric coordinates; the
    highest-numbered triangle holding it (edges included) wins."""
    owner = np.full((height, width), -1)
    bary = np.zeros((height, width, 3))
    for row in range(height):
        for col in range(width):
            p = np.array([col + 0.5, row + 0.5])
            for t, (a, b, c) in enumerate(corners):
                m = np.array([b - a, c - a]).T
                if abs(np.linalg.det(m)) < 1e-12:
                    continue
                l1, l2 = np.linalg.solve(m, p - a)
                if min(1 - l1 - l2, l1, l2) >= -1e-9:
                    owner[row, col] = t
                    bary[row, col] = (1 - l1 - l2, l1, l2)
    return owner, bary


def test_uv_rasteriser_matches_the_per_texel_reference():
    rng = np.random.default_rng(3)
    w, h = 23, 17
    tris = [rng.uniform(-3, [w + 3, h + 3], (3, 2)) * rng.uniform(0.2, 1) for _ in range(9)]
    # a square split along its diagonal, corners on texel centres: shared edges through
    # centres go to the higher triangle; one degenerate triangle covers nothing
    sq = np.array([[2.5, 2.5], [12.5, 2.5], [12.5, 12.5], [2.5, 12.5]])
    tris += [sq[[0, 1, 2]], sq[[0, 2, 3]], np.array([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]])]
    corners = np.array(tris)
    pixel, tri, bary = tx.rasterize_uv(corners, w, h)
    owner, ref_bary = reference_raster(corners, w, h)
    got = np.full(w * h, -1)
    got[pixel] = tri
    assert len(np.unique(pixel)) == len(pixel)  # one triangle per texel
    np.testing.assert_array_equal(got.reshape(h, w), owner)
    np.testing.assert_allclose(bary, ref_bary.reshape(-1, 3)[pixel], atol=1e-9)
    assert (owner == len(tris) - 2).sum() > 20  # the diagonal's texels went to the second half
    assert not (owner == len(tris) - 1).any()


def test_atlas_texels_land_on_their_triangles_in_their_squares(model):
    unit = 64
    at = tx.atlas(model, unit)
    # each texel's centre is where its barycentric coordinates put it in UV space
    uv = np.einsum("mk,mkc->mc", at.bary, at.uvs[at.triangle_uvs[at.triangle]].astype(np.float64))
    rows, cols = np.divmod(at.pixel, at.width)
    centre = np.stack([(cols + 0.5) / at.width, (rows + 0.5) / at.height], axis=1)
    np.testing.assert_allclose(uv, centre, atol=1e-6)  # float32 UVs: ~1e-7 relative
    assert (at.bary >= -1e-9).all()
    np.testing.assert_allclose(at.bary.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(at.corner, model.triangles[at.triangle])
    # ... and in 3-D on the same triangle at the same barycentric coordinates
    posed = model.neutral + 0.01 * np.sin(np.arange(model.neutral.size)).reshape(-1, 3)
    on_mesh = np.einsum("mk,mkc->mc", at.bary, posed[model.triangles[at.triangle]])
    np.testing.assert_allclose(at.interp @ posed, on_mesh, atol=1e-12)
    # ... inside its triangle's square, and each square about as full as its UV area says
    rect = np.array([tx.TILES[n] for n in tx.TILE_NAMES]) * unit
    r = rect[at.tile[at.triangle]]
    assert ((cols >= r[:, 0]) & (cols < r[:, 0] + r[:, 2])).all()
    assert ((rows >= r[:, 1]) & (rows < r[:, 1] + r[:, 2])).all()
    # each texel's right-hand neighbour in its square, by a plain search
    where = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(rows, cols, strict=True))}
    square = at.tile[at.triangle]
    right = [where.get((int(a), int(b) + 1), -1) for a, b in zip(rows, cols, strict=True)]
    right = [j if j >= 0 and square[j] == square[i] else -1 for i, j in enumerate(right)]
    np.testing.assert_array_equal(at.right, right)
    assert (at.right >= 0).mean() > 0.9
    corner_uv = at.uvs[at.triangle_uvs] * (at.width, at.height)
    e1, e2 = corner_uv[:, 1] - corner_uv[:, 0], corner_uv[:, 2] - corner_uv[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    for t, name in enumerate(tx.TILE_NAMES):
        expected = area[at.tile == t].sum()
        got = np.count_nonzero(at.tile[at.triangle] == t)
        assert expected > 0 and abs(got - expected) < 0.1 * expected + 20, name
    # the eyeballs' shells each got their own square, outer ones the larger radius
    for side in ("left", "right"):
        eye = model.triangle_region == model.region(f"eyeball_{side}")
        tiles = set(at.tile[eye].tolist())
        assert tiles == {tx.TILE_NAMES.index(f"eyeball_{side}_{s}") for s in ("outer", "inner")}
    # a face triangle whose UVs ICT put in tile 1 lies in the head's square
    u = model.uvs[model.triangle_uvs][..., 0].mean(axis=1)
    face = model.triangle_region == model.region("face")
    assert (at.tile[face & (u >= 1)] == tx.TILE_NAMES.index("head")).all()
    assert (at.tile[face & (u < 1)] == tx.TILE_NAMES.index("face")).all()


# ---------------------------------------------------------------- the bake


def mirror_triangles(model) -> tuple[np.ndarray, np.ndarray]:
    """Each triangle's mirror image (x → -x) on the symmetric neutral head, and where
    each corner went: ``[T]`` triangle, ``[T, 3]`` its corner index for ours."""
    v = model.neutral.astype(np.float64)
    dist, mirror_v = cKDTree(v).query(v * [-1, 1, 1])
    index = {tuple(sorted(t)): i for i, t in enumerate(model.triangles.tolist())}
    tri = np.full(len(model.triangles), -1)
    perm = np.zeros((len(model.triangles), 3), int)
    for i, t in enumerate(model.triangles):
        m = mirror_v[t]
        j = index.get(tuple(sorted(m.tolist())), -1)
        if j >= 0 and dist[t].max() < 1e-6:
            tri[i] = j
            perm[i] = [list(model.triangles[j]).index(x) for x in m]
    return tri, perm


def test_unseen_side_takes_its_mirror_images_colour(model, camera, baked):
    """Far-cheek texels the photo cannot see (cos below COLOUR_FACING) equal the texture
    at their mirror point, which the photo saw."""
    at = tx.atlas(model, tx.ATLAS_UNIT["fast"])
    intr, w2c = camera
    frames, _ = triangle_frames(model.neutral, model.triangles)
    points = np.einsum("mk,mkc->mc", at.bary, model.neutral[at.corner].astype(np.float64))
    cam = -w2c[:3, :3].T @ w2c[:3, 3]
    to_cam = cam - points
    cos = np.sum(frames[at.triangle, :, 2] * to_cam, 1) / np.linalg.norm(to_cam, axis=1)
    rows, cols = np.divmod(at.pixel, at.width)
    face = model.triangle_region[at.triangle] == model.region("face")
    mirror = face & (baked.source[rows, cols] == tx.SOURCE_MIRROR) & (cos < COLOUR_FACING - 0.05)
    assert mirror.sum() > 2000  # the hidden cheek
    assert (points[mirror, 0] * np.sign(points[face & (cos > 0.6), 0].mean()) < 0).mean() > 0.95

    m_tri, perm = mirror_triangles(model)
    pick = np.flatnonzero(mirror & (m_tri[at.triangle] >= 0))
    bary = np.zeros((len(pick), 3))
    np.put_along_axis(bary, perm[at.triangle[pick]], at.bary[pick], axis=1)
    theirs = baked.sample(m_tri[at.triangle[pick]], bary)
    ours = srgb_to_linear(baked.image[rows[pick], cols[pick]] / 255.0)
    # the two differ by sampling the photo at neighbouring texels (a texel spans < 1
    # photo pixel here; the photo changes < 3/255 per pixel) and by uint8 rounding
    err = np.abs(ours - theirs).max(axis=1)
    assert np.median(err) < 0.01 and np.percentile(err, 95) < 0.03
    # and the seen side is the photo's: a different colour from a flat fill
    assert ours.std(axis=0).min() > 0.02


def test_every_used_texel_has_a_colour_and_fills_stay_within_their_region(model, baked):
    at = tx.atlas(model, tx.ATLAS_UNIT["fast"])
    rows, cols = np.divmod(at.pixel, at.width)
    label = baked.source[rows, cols]
    assert (label != tx.SOURCE_NONE).all()
    uncovered = np.ones(baked.source.shape, bool)
    uncovered[rows, cols] = False
    assert (baked.source[uncovered] == tx.SOURCE_NONE).all()
    # no black holes anywhere: the photo is 60..200, drawn colours are no darker than
    # the pupil, and padding copies its neighbours
    assert baked.image.max(axis=2).min() >= 7  # the pupil: 0.03 sRGB

    region = model.triangle_region[at.triangle]
    rgb = baked.image[rows, cols].astype(int)
    for name in ("face", "head_neck"):
        in_r = region == model.region(name)
        known = in_r & np.isin(label, [tx.SOURCE_PHOTO, tx.SOURCE_MIRROR])
        filled = in_r & (label == tx.SOURCE_FILLED)
        assert known.sum() > 1000 and filled.sum() > 1000, name
        if name == "face":  # the scalp takes the hair colour; face and neck the face's
            lo, hi = rgb[known].min(axis=0), rgb[known].max(axis=0)
            assert ((rgb[filled] >= lo - 1) & (rgb[filled] <= hi + 1)).all()
    # the unseen scalp: the hair colour, blending into the seen scalp near it
    eye_z = model.neutral[model.landmarks68[[36, 45]], 2].mean()
    points_z = np.einsum("mk,mk->m", at.bary, model.neutral[at.corner, 2])
    scalp = (region == model.region("head_neck")) & (points_z > eye_z)
    hair = np.round(np.array(HAIR) * 255)
    fill = rgb[scalp & (label == tx.SOURCE_FILLED)]
    assert (np.abs(fill - hair).max(axis=1) <= 1).mean() > 0.5
    known = np.concatenate([rgb[scalp & (label == tx.SOURCE_PHOTO)], hair[None]])
    assert ((fill >= known.min(axis=0) - 1) & (fill <= known.max(axis=0) + 1)).all()
    # mouth and sockets: their fixed colours; eyes drawn with an iris and a pupil
    # (the tongue, inside gums_tongue, lighter than the gums)
    tongue = np.all(model.vertex_part[at.corner] == PART_TONGUE, axis=1)
    for name in ("teeth", "gums_tongue", "mouth_socket", "eye_sockets"):
        in_r = region == model.region(name)
        assert (label[in_r] == tx.SOURCE_DRAWN).all()
        for part, colour in ((in_r & ~tongue, FILL[name]), (in_r & tongue, TONGUE_FILL)):
            expected = np.broadcast_to(np.round(np.array(colour) * 255), rgb[part].shape)
            np.testing.assert_allclose(rgb[part], expected, atol=1)
    assert tongue[region == model.region("gums_tongue")].mean() > 0.2
    eye = region == model.region("eyeball_left")
    assert (label[eye] == tx.SOURCE_DRAWN).all()
    assert len(np.unique(rgb[eye], axis=0)) == 3  # sclera, iris, pupil


def test_gaussians_take_the_texture_colour_at_their_place(model, baked):
    g = make_gaussians(model, baked, "fast")
    colour = eval_sh(g.sh[:, :1].astype(np.float64), None)
    np.testing.assert_allclose(colour, baked.sample(g.triangle, g.bary), atol=1e-6)
    # and that sample is the texture's, read the slow way: bilinear between texel centres
    h, w = baked.source.shape
    lin = srgb_to_linear(baked.image / 255.0)
    for i in np.random.default_rng(0).choice(len(g), 200, replace=False):
        uv = g.bary[i].astype(np.float64) @ baked.uvs[baked.triangle_uvs[g.triangle[i]]]
        x, y = uv[0] * w - 0.5, uv[1] * h - 0.5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        ref = sum(
            wgt * lin[min(max(r, 0), h - 1), min(max(c, 0), w - 1)]
            for r, c, wgt in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                              (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy))
        )  # fmt: skip
        np.testing.assert_allclose(colour[i], ref, atol=1e-5)  # float32 weights


def test_the_bust_gets_denser_wider_overlapping_gaussians(model, baked):
    g = make_gaussians(model, baked, "fast")
    chin = model.neutral[model.landmarks68[8], 2]
    neck_region = model.region("head_neck")
    # the bust, triangle by triangle: the neck's whose centre is that far below the chin
    bust = np.array([
        r == neck_region and model.neutral[list(t), 2].mean() < chin - BUST_BELOW_CHIN
        for t, r in zip(model.triangles.tolist(), model.triangle_region.tolist(), strict=True)
    ])  # fmt: skip
    neck = (model.triangle_region == neck_region) & ~bust
    face = model.triangle_region == model.region("face")
    assert 0 < bust.sum() < (model.triangle_region == neck_region).sum()
    _, area = triangle_frames(model.neutral, model.triangles)
    counts = np.bincount(g.triangle, minlength=len(area))
    per_area = {k: counts[m].sum() / area[m].sum() for k, m in (("bust", bust), ("neck", neck))}
    ratio = per_area["bust"] / per_area["neck"]
    assert abs(ratio / (BUST_DENSITY / DENSITY["head_neck"]) - 1) < 0.03, ratio
    # the extra Gaussians come on top: the face keeps its share of the preset's count
    weights = [DENSITY[n] * area[model.triangle_region == model.region(n)].sum()
               for n in model.region_names]  # fmt: skip
    plain = DENSITY["face"] * area[face].sum() / sum(weights)
    assert abs(counts[face].sum() / (COUNTS["fast"] * plain) - 1) < 0.03
    sigma = np.exp(g.log_scale[:, 0].astype(np.float64))
    for where, factor in ((bust, BUST_SIGMA), (neck, 1.0)):
        on = where[g.triangle]
        spacing = np.sqrt(area[where].sum() / on.sum())
        np.testing.assert_allclose(sigma[on], factor * TANGENT_SIGMA * spacing, rtol=1e-3)


def _fine_detail(image: np.ndarray) -> np.ndarray:
    """``[H, W]``: log luminance less its local mean (a texel's relative detail)."""
    from scipy import ndimage

    lum = np.log(image.astype(np.float64).mean(axis=2) + 1.0)
    return np.abs(lum - ndimage.gaussian_filter(lum, 2.0))


def test_unseen_skin_carries_the_photos_skin_detail_not_a_flat_fill(model, camera, baked):
    from scipy import ndimage

    intr, w2c = camera
    rng = np.random.default_rng(3)
    grain = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 1.0)
    grain *= 0.15 / grain.std()  # skin-like: +-15 % in brightness, a pixel or two across
    photo = np.clip(smooth_photo() * (1.0 + grain[..., None]), 0, 255).astype(np.uint8)
    person = np.ones((SIZE, SIZE), bool)
    hair = srgb_to_linear(np.array(HAIR))
    grainy = tx.bake_texture(model, model.neutral, photo, intr, w2c, person, hair, "fast")

    at = tx.atlas(model, tx.ATLAS_UNIT["fast"])
    x, y, side = tx._rect("face", at)
    region = np.full(grainy.source.shape, -1)
    rows, cols = np.divmod(at.pixel, at.width)
    region[rows, cols] = model.triangle_region[at.triangle]
    face = (region == model.region("face"))[y : y + side, x : x + side]
    label = grainy.source[y : y + side, x : x + side]
    known = face & np.isin(label, [tx.SOURCE_PHOTO, tx.SOURCE_MIRROR])
    interior = ndimage.binary_erosion(face, np.ones((9, 9), bool))
    reach = 2 * tx.DETAIL_FADE * side + 6  # past the fade, and the filter's reach
    far = interior & (label == tx.SOURCE_FILLED) & (ndimage.distance_transform_edt(~known) > reach)
    seen = interior & ndimage.binary_erosion(known, np.ones((9, 9), bool))
    assert far.sum() > 200 and seen.sum() > 2000
    fine = _fine_detail(grainy.image[y : y + side, x : x + side])
    plain = _fine_detail(baked.image[y : y + side, x : x + side])
    assert fine[far].mean() > 0.25 * fine[seen].mean()  # the seen skin's detail, blended
    assert plain[far].mean() < 0.1 * fine[seen].mean()  # a smooth photo lends none
    # the detail is relative: the fill's colour stays what it was
    mean = grainy.image[y : y + side, x : x + side][far].mean(axis=0)
    np.testing.assert_allclose(mean, baked.image[y : y + side, x : x + side][far].mean(axis=0),
                               atol=6)  # fmt: skip


def test_pull_push_fills_from_the_nearest_known_texels():
    colour = np.zeros((37, 50, 3), np.float32)
    weight = np.zeros((37, 50), np.float32)
    colour[5, 5], weight[5, 5] = (1.0, 0.0, 0.0), 1.0
    colour[30, 44], weight[30, 44] = (0.0, 0.0, 1.0), 1.0
    out = tx.pull_push(colour, weight)
    np.testing.assert_array_equal(out[5, 5], colour[5, 5])
    np.testing.assert_allclose(out.sum(axis=2), 1.0, atol=1e-5)  # means of the two
    assert out[8, 8, 0] > 0.8 and out[28, 40, 2] > 0.8  # closer to one than the other


# ---------------------------------------------------------------- avatars keep it


def test_avatars_store_their_texture_and_old_ones_load_without(tmp_path, model, baked):
    from tests.test_bundle import ict_avatar

    av = dataclasses.replace(ict_avatar(n=300), texture=baked)
    store = Store(tmp_path)
    store.save(av)
    back = store.load(av.id)
    for f in dataclasses.fields(baked):
        np.testing.assert_array_equal(getattr(back.texture, f.name), getattr(baked, f.name))
    old = {k: v for k, v in av.to_arrays().items() if not k.startswith("tex_")}
    assert Avatar.from_arrays(av.id, av.name, old, {}).texture is None
    bad = dataclasses.replace(baked, triangle_uvs=baked.triangle_uvs[:-1])
    with pytest.raises(ValueError, match="triangle_uvs"):
        dataclasses.replace(av, texture=bad).validate()
