"""A build's warnings about its photo: each fires on the photo it names, none on a clear
portrait."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from PIL import Image

from inference_service.build import detect
from inference_service.build.align import align
from inference_service.build.checks import photo_warnings, view_angles
from inference_service.build.fit import fit_geometry
from inference_service.build.photometric import CROP_SIZE, photo_crop
from inference_service.headmodel import load_correspondence, load_head_model
from protocol.camera import orbit

CROP = CROP_SIZE["default"]


def fitted(photo: np.ndarray):
    """(fit, head box side, faces found) as the builder has them before its checks."""
    h, w = photo.shape[:2]
    model = load_head_model()
    faces = detect.detect_faces(photo)
    _, landmarks = detect.locate_face(photo, faces, None, None)
    fit = fit_geometry(model, load_correspondence(), landmarks, align(model, landmarks, (w, h)))
    head, _ = photo_crop(fit.photo_vertices(model), fit.intrinsics, fit.world_to_camera, CROP)
    return fit, head[2], len(faces)


def warnings_of(photo: np.ndarray, fit=None, crop: int = CROP, faces: int | None = None,
                asked: bool = False) -> list[dict[str, str]]:  # fmt: skip
    found, side, n = fitted(photo)
    h, w = photo.shape[:2]
    return photo_warnings(load_head_model(), load_correspondence(), fit or found, (w, h),
                          crop / side, list(range(n if faces is None else faces)), 0,
                          asked)  # fmt: skip


def turned(fit, axis: int, degrees: float):
    """``fit`` with the head turned ``degrees`` about its centre's ``axis`` (0: x, across
    the face, nodding; 2: z, up, shaking): the camera, in the head's frame, moves round
    it the other way."""
    center = fit.photo_vertices(load_head_model()).mean(0)
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    turn = np.eye(4)
    turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
    to_center, back = np.eye(4), np.eye(4)
    to_center[:3, 3], back[:3, 3] = -center, center
    return dataclasses.replace(fit, world_to_camera=fit.world_to_camera @ back @ turn @ to_center)


def codes(warnings: list[dict[str, str]]) -> list[str]:
    return [w["code"] for w in warnings]


@pytest.mark.parametrize(("yaw", "pitch"), [(0, 0), (-60, 10), (35, -25), (120, 40)])
def test_view_angles_read_back_the_orbit_that_placed_the_camera(yaw, pitch):
    center = np.array([0.01, -0.02, 0.03])
    off, y, p = view_angles(orbit(center, 0.7, yaw, pitch), center)
    assert y == pytest.approx(yaw, abs=1e-6) and p == pytest.approx(pitch, abs=1e-6)
    # the angle off the face's forward direction (-Y) by the dot product
    forward = math.cos(math.radians(yaw)) * math.cos(math.radians(pitch))
    assert off == pytest.approx(math.degrees(math.acos(forward)), abs=1e-6)


def test_a_clear_portrait_has_no_warnings(astronaut, hopper):
    assert warnings_of(astronaut) == []
    assert warnings_of(hopper) == []


def test_a_head_turned_from_the_camera(astronaut):
    fit, _, _ = fitted(astronaut)
    center = fit.photo_vertices(load_head_model()).mean(0)
    _, yaw0, pitch0 = view_angles(fit.world_to_camera, center)  # the photo's: 1.6°, 3.0°
    found = warnings_of(astronaut, turned(fit, 2, 50))
    assert codes(found) == ["turned"]
    assert f"(yaw {yaw0 - 50:.0f}°" in found[0]["message"], found[0]["message"]
    assert warnings_of(astronaut, turned(fit, 2, 25)) == []
    # looking up or down, a smaller angle: 40° reads as 32-33° (see PITCHED_DEG)
    found = warnings_of(astronaut, turned(fit, 0, 32))
    assert codes(found) == ["turned"]
    assert f"pitch {pitch0 + 32:.0f}°" in found[0]["message"], found[0]["message"]
    assert warnings_of(astronaut, turned(fit, 0, 20)) == []


def test_a_loose_landmark_fit(astronaut):
    fit, _, _ = fitted(astronaut)
    found = warnings_of(astronaut, dataclasses.replace(fit, rms=0.1))
    assert codes(found) == ["loose_fit"] and "0.100" in found[0]["message"]


@pytest.mark.parametrize(
    ("rows", "cols", "named"),
    [
        (slice(60, None), slice(None), "top edge cuts"),
        (slice(None), slice(200, None), "left edge cuts"),
        (slice(60, None), slice(None, 250), "top and right edges cut"),
        (slice(45, 170), slice(180, 270), "top, bottom, left and right edges cut"),
    ],
)
def test_the_photo_cutting_off_the_head(astronaut, rows, cols, named):
    found = warnings_of(np.ascontiguousarray(astronaut[rows, cols]))
    assert codes(found) == ["cut"] and named in found[0]["message"], found


def test_a_small_head_for_the_preset(astronaut):
    small = np.asarray(Image.fromarray(astronaut).resize((160, 160), Image.LANCZOS))
    found = warnings_of(small)
    side = fitted(small)[1]  # the head's box, neck and a margin in: 288 px enlarge it
    assert codes(found) == ["small"] and f"enlarges {CROP / side:.1f}x" in found[0]["message"]
    # her head, crown to chin, is about 147 px of the 512 px photo (read off it by eye)
    tall = float(re.search(r"is (\d+) px from crown to chin", found[0]["message"])[1])
    assert abs(tall - 147 * 160 / 512) < 4, found
    # the fast preset works at 192 px: the astronaut's 233 px head box is not small for it
    assert warnings_of(astronaut, crop=CROP_SIZE["fast"]) == []


def test_several_faces_warn_only_when_none_was_chosen(astronaut):
    assert codes(warnings_of(astronaut, faces=3)) == ["faces"]
    fit, side, _ = fitted(astronaut)
    (many,) = photo_warnings(load_head_model(), load_correspondence(), fit, (512, 512),
                             CROP / side, list(range(8)), 0, False, more=True)  # fmt: skip
    assert many["message"].startswith("8 or more faces found; this avatar is face 0")
    # a doubtful box (face 0 here) has no landmarks and is no choice: the indices say
    (two,) = photo_warnings(load_head_model(), load_correspondence(), fit, (512, 512),
                            CROP / side, [1, 2], 1, False)  # fmt: skip
    assert two["message"].startswith(
        "2 faces found; this avatar is face 1 (0 = largest), the other is face 2: choose"
    )
    (three,) = photo_warnings(load_head_model(), load_correspondence(), fit, (512, 512),
                              CROP / side, [0, 2, 3], 0, False)  # fmt: skip
    assert "is face 0 (0 = largest), the others are faces 2 and 3: choose" in three["message"]
    assert photo_warnings(load_head_model(), load_correspondence(), fit, (512, 512),
                          CROP / side, [1], 1, False) == []  # fmt: skip
    assert warnings_of(astronaut, faces=3, asked=True) == []
