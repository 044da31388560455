"""ARKit names and the ICT mapping; camera conventions (axes, yaw, pixel centres)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from inference_service.headmodel import load_head_model
from protocol.arkit import ARKIT_NAMES, check_curves, index_of, reorder
from protocol.camera import intrinsics_from_fov, look_at, orbit, outline_distance, project


def test_52_unique_apple_names_in_grouped_order():
    assert len(ARKIT_NAMES) == len(set(ARKIT_NAMES)) == 52
    assert ARKIT_NAMES[0] == "eyeBlinkLeft" and ARKIT_NAMES[-1] == "tongueOut"
    assert ARKIT_NAMES.index("jawOpen") < ARKIT_NAMES.index("mouthClose")
    assert ARKIT_NAMES.index("browInnerUp") < ARKIT_NAMES.index("cheekPuff")


def test_reorder_by_name_any_case_and_order():
    names = ["JawOpen", "eyeblinkleft", "tongueOut"]
    out = reorder(np.array([[0.5, 0.25, 1.0]]), names)
    assert out[0, index_of("jawOpen")] == 0.5 and out[0, index_of("eyeBlinkLeft")] == 0.25
    assert out[0].sum() == pytest.approx(1.75)


def test_reorder_rejects_unknown_and_repeated_names():
    with pytest.raises(ValueError, match="valid names: eyeBlinkLeft"):
        reorder(np.zeros((1, 1)), ["eyeBlinkMiddle"])
    with pytest.raises(ValueError, match="twice"):
        reorder(np.zeros((1, 2)), ["jawOpen", "JAWOPEN"])


def test_check_curves_clamps_and_rejects_nan():
    c = np.zeros((2, 52), np.float32)
    c[0, 0], c[1, 1] = 1.5, -0.2
    out = check_curves(c)
    assert out[0, 0] == 1 and out[1, 1] == 0
    c[1, 5] = np.nan
    with pytest.raises(ValueError, match="frame 1, shape eyeSquintLeft"):
        check_curves(c)
    with pytest.raises(ValueError, match=r"\[frames, 52\]"):
        check_curves(np.zeros((3, 51)))
    for far in (50.0, -3.0, 1e300):  # percentages, another scale: refused, not clamped
        c = np.zeros((1, 52))
        c[0, index_of("jawOpen")] = far
        with pytest.raises(ValueError, match=re.escape(f"weight {far:g} for jawOpen at frame 0")):
            check_curves(c)


def test_ict_expressions_map_to_arkit_with_subject_left_at_plus_x():
    model = load_head_model()
    d = model.arkit_deltas
    moved = np.abs(d).max(axis=(1, 2)) > 1e-4
    assert moved.all()  # tongueOut is made by us, the other 51 come from ICT
    # eyeBlinkLeft moves the subject's left eyelid: vertices at +X move, -X do not
    blink = np.linalg.norm(d[index_of("eyeBlinkLeft")], axis=1)
    x = model.neutral[:, 0]
    assert blink[x > 0.02].max() > 0.005
    assert blink[x > 0.02].max() > 20 * blink[x < -0.02].max()  # artist shapes leak a little
    # jawOpen moves the chin down (-Z)
    chin = model.landmarks68[8]
    assert d[index_of("jawOpen")][chin, 2] < -0.01
    # browInnerUp drives both halves
    brow = d[index_of("browInnerUp")]
    assert np.abs(brow[x > 0.01]).max() > 1e-3 and np.abs(brow[x < -0.01]).max() > 1e-3


def test_front_camera_sees_subject_left_on_image_right_and_up_as_up():
    w2c = orbit((0, 0, 0), 1.0)
    intr = intrinsics_from_fov(100, 100, 40)
    uv, z = project(np.array([[0.1, 0, 0], [0, 0, 0.1], [0, 0, 0]]), intr, w2c)
    assert np.all(z > 0)
    assert uv[0, 0] > 50  # subject's left (+X) on the image's right
    assert uv[1, 1] < 50  # +Z up is up in the image
    np.testing.assert_allclose(uv[2], [50, 50])  # the centre projects to cx, cy
    cam = -w2c[:3, :3].T @ w2c[:3, 3]
    np.testing.assert_allclose(cam, [0, -1, 0], atol=1e-12)  # in front of a -Y-facing head


def test_yaw_and_pitch_directions():
    for yaw, pitch, expect in ((90, 0, [1, 0, 0]), (-90, 0, [-1, 0, 0]), (0, 90, [0, 0, 1])):
        w2c = orbit((0, 0, 0), 2.0, yaw, pitch)
        cam = -w2c[:3, :3].T @ w2c[:3, 3]
        np.testing.assert_allclose(cam, 2 * np.array(expect, float), atol=1e-9)
        r = w2c[:3, :3]
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1)


@pytest.mark.parametrize("yaw", [0.0, 37.0, 90.0, -120.0])
def test_straight_above_or_below_the_view_turns_on_as_just_short_of_it(yaw):
    """Pitch ±90 looks along +Z, where ``look_at``'s up says nothing: the image keeps the
    orientation it had at ±89.999 (at -90 it came out upside down)."""
    for pitch in (90.0, -90.0):
        at = orbit((0.1, 0.2, 0.3), 1.3, yaw, pitch)
        near = orbit((0.1, 0.2, 0.3), 1.3, yaw, np.sign(pitch) * 89.999)
        np.testing.assert_allclose(at[:3, :3], near[:3, :3], atol=1e-4)
    for pitch in (-60.0, 0.0, 30.0):  # elsewhere as look_at with +Z up always gave
        w2c = orbit((0.1, 0.2, 0.3), 1.3, yaw, pitch)
        eye = -w2c[:3, :3].T @ w2c[:3, 3]
        np.testing.assert_allclose(w2c, look_at(eye, (0.1, 0.2, 0.3)), atol=1e-12)


def test_look_at_rejects_coincident_points():
    with pytest.raises(ValueError):
        look_at((1, 1, 1), (1, 1, 1))


@pytest.mark.parametrize("up", [(0, 1, 0), (0, -1, 0), (1, 0, 0), (0, 0, 1)])
def test_look_at_along_any_up_is_a_rotation_looking_at_the_target(up):
    """Looking straight along ``up`` leaves the roll free; any axis across the view will
    do, but never NaN (an up of ±Y crossed the view with its own fallback axis)."""
    eye = np.array([0.2, -0.1, 0.4])
    m = look_at(eye, eye + np.asarray(up), up=up)
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0)
    np.testing.assert_allclose(m[2, :3], up, atol=1e-12)
    np.testing.assert_allclose(m[:3, :3] @ eye + m[:3, 3], 0, atol=1e-12)


@pytest.mark.parametrize("fov", [0.2, 30.0, 90.0, 120.0, 170.0])
def test_outline_distance_frames_a_sphere_at_any_fov(fov):
    """The sphere's outline, found by projecting points all over it, spans ``fill`` of the
    image at narrow and wide fovs alike, from a camera outside it."""
    size, radius, fill, centre = 200, 0.2, 0.9, np.array([0.1, 0.0, 1.6])
    d = outline_distance(radius, fov, fill)
    assert d > radius
    rng = np.random.default_rng(0)
    points = rng.normal(size=(400_000, 3))
    points = centre + radius * points / np.linalg.norm(points, axis=1, keepdims=True)
    uv, z = project(points, intrinsics_from_fov(size, size, fov), orbit(centre, d, 20, 10))
    assert (z > 0).all()
    reach = np.abs(uv - size / 2).max(axis=0) / (size / 2)
    np.testing.assert_allclose(reach, fill, rtol=2e-3)


def test_tongue_out_pushes_the_tongue_tip_past_the_lips():
    from inference_service.headmodel import PART_TONGUE

    model = load_head_model()
    tongue = np.flatnonzero(model.vertex_part == PART_TONGUE)
    assert 300 < len(tongue) < 2000
    assert abs(model.neutral[tongue, 0].mean()) < 0.002  # centred in the mouth
    lips_y = model.neutral[model.landmarks68[[62, 66]], 1].min()  # front of the lips
    out = model.neutral + model.arkit_deltas[index_of("tongueOut")]
    assert model.neutral[tongue, 1].min() > lips_y  # inside at rest
    assert out[tongue, 1].min() < lips_y - 0.01  # a centimetre past the lips
    others = np.setdiff1d(np.arange(len(out)), tongue)
    jaw = model.arkit_deltas[index_of("jawOpen")][others]
    # besides the tongue, only a little jaw opening so it clears the teeth
    np.testing.assert_allclose(out[others] - model.neutral[others], 0.3 * jaw, atol=1e-6)
