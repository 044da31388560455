"""The hair shell measured from the person's silhouette: the temples carry hair only
where the photo shows hair beside them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference_service.build.hair import LOBES, MIN_SHELL, _silhouette, fit_hair, scalp_vertices
from inference_service.headmodel import load_head_model
from protocol.camera import framing_distance, intrinsics_from_fov, orbit, project

SIZE = 400  # photo pixels


@pytest.fixture(scope="module")
def setup():
    model = load_head_model()
    verts = model.neutral.astype(np.float64)
    center = 0.5 * (verts.min(0) + verts.max(0))
    radius = float(np.linalg.norm(verts - center, axis=1).max())
    intr = intrinsics_from_fov(SIZE, SIZE, 25.0)
    w2c = orbit(center, framing_distance(radius, 25.0, 0.8))
    uv, _ = project(verts, intr, w2c)
    bald = _silhouette(model, uv, (SIZE, SIZE))
    scalp, temple = scalp_vertices(model, verts)
    return model, verts, intr, w2c, uv, bald, scalp, temple


def test_temples_are_beside_the_face_and_below_the_scalp_down_to_the_lobes(setup):
    model, verts, *_, scalp, temple = setup
    assert temple.any() and not (scalp & temple).any()
    corners = verts[model.landmarks68[[36, 45]]]
    eye_z = corners[:, 2].mean()
    assert (verts[temple, 1] > corners[:, 1].mean()).all()  # behind the eyes
    assert (verts[temple, 2] > eye_z - LOBES).all()  # above the ear lobes
    above_ears = temple & (verts[:, 2] > eye_z - 0.02)
    assert above_ears.any() and (np.abs(verts[above_ears, 0]) > 0.03).all()  # at the sides
    below_ears = temple & (verts[:, 2] < eye_z - 0.03)
    assert (np.abs(verts[below_ears, 0]) < 0.01).any()  # and round the back


def test_a_bob_covers_the_temples_and_a_bare_head_leaves_them_skin(setup):
    model, verts, intr, w2c, uv, bald, _, temple = setup
    photo = np.full((SIZE, SIZE, 3), 128, np.uint8)
    eye_row = uv[model.landmarks68[[36, 45]], 1].mean()
    # hair 25 px out from the head down to the ears; none at all on the bare head
    cut = int(eye_row + 0.06 * SIZE)
    bob = bald | ndimage.binary_dilation(bald, iterations=25)
    bob[cut:] = bald[cut:]
    bare = fit_hair(model, verts, photo, bald, intr, w2c)
    hair = fit_hair(model, verts, photo, bob, intr, w2c)

    assert not bare.scalp[temple].any() and (bare.thickness[temple] == 0).all()
    # below where the photo's hair ends the sides stay skin
    below = temple & hair.measured & (uv[:, 1] > cut + 8)
    assert below.sum() > 5 and not hair.scalp[below].any()
    on_rim = temple & hair.measured & (uv[:, 1] < cut - 8)
    assert on_rim.sum() > 20
    assert hair.scalp[on_rim].mean() > 0.9
    assert np.median(hair.thickness[on_rim]) > 3 * MIN_SHELL
    # the rest of the scalp is hair in both
    assert hair.scalp.sum() > bare.scalp.sum() + on_rim.sum() // 2
    # hair down past the ears covers the sides below them too
    long = fit_hair(model, verts, photo, bald | ndimage.binary_dilation(bald, iterations=25),
                    intr, w2c)  # fmt: skip
    eye_z = verts[model.landmarks68[[36, 45]], 2].mean()
    sides = temple & long.measured & (verts[:, 2] < eye_z - 0.03)
    assert sides.sum() > 5 and long.scalp[sides].mean() > 0.9


def test_a_bald_head_grows_no_shell(setup):
    """Where the photo shows no hair beyond the head, no scalp vertex measures any: a
    march from a vertex off the outline stays over the head itself and must not count."""
    model, verts, intr, w2c, _, bald, scalp, _ = setup
    photo = np.full((SIZE, SIZE, 3), 128, np.uint8)
    shell = fit_hair(model, verts, photo, bald, intr, w2c)
    assert shell.measured.sum() > 100
    assert shell.thickness[shell.scalp].max() < MIN_SHELL


@pytest.mark.parametrize("side", ["left", "top"])
def test_hair_past_the_photos_border_is_unknown_not_bald(setup, side):
    """A head cut by the photo's border: marches that leave the photo still in the hair
    (or begin outside it) measure nothing, and that side's scalp takes the hair the photo
    does show, not 0 (a face cut on the left had a bald left side)."""
    model, verts, intr, w2c, uv, bald, scalp, _ = setup
    photo = np.full((SIZE, SIZE, 3), 128, np.uint8)
    hair = bald | ndimage.binary_dilation(bald, iterations=20)
    whole = fit_hair(model, verts, photo, hair, intr, w2c)
    cols, rows = np.flatnonzero(hair.any(axis=0)), np.flatnonzero(hair.any(axis=1))
    axis, ends = (0, cols) if side == "left" else (1, rows)
    cut = int(ends[0] + 0.3 * (ends[-1] - ends[0]))  # 30 % of the head outside the frame
    k = np.asarray(intr, np.float64).copy()
    k[2 + axis] -= cut
    keep = (slice(None), slice(cut, None)) if side == "left" else (slice(cut, None),)
    shell = fit_hair(model, verts, photo[keep], hair[keep], k, w2c)
    gone = scalp & (uv[:, axis] < cut)
    assert gone.sum() > 50 and not shell.measured[gone].any()
    thick = np.median(whole.thickness[whole.scalp])
    assert thick > 3 * MIN_SHELL
    assert np.median(shell.thickness[gone]) == pytest.approx(thick, rel=0.35)
