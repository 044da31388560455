"""The 52 expressions, verified by looking at them (issue 5).

Two kinds of check, on the astronaut built once in-process (``fast`` preset):

* **MediaPipe on renders.** The avatar is rendered framed on the face (long lens; frontal
  and turned 8 degrees either way, one ``render_frames`` batch) at weights 0, 0.5 and 1 of
  the shapes the issue names, and MediaPipe's face mesh (478 points, through
  ``build.detect``) is run on every frame; each measure is the median over the three
  views. Distances are in units of the rest render's face height ``H``: chin (152) to the
  brows' midpoint (the mean of both brows' ten contour points each).
* **Geometry, all 52 shapes.** The posed mesh vertices (``posing.pose_vertices``, so gaze
  turns the eyeballs as rendering does) against the rest mesh: where the largest motion
  is, which side moves, and that regions far from the shape's name stay put. The same
  geometry, projected into the frontal camera through ICT's 68 landmark vertices, must meet
  the issue's numbers for jaw, blink, smile, brows and gaze.

The jaw passes since the builder keeps the photo's open mouth off the lips (the astronaut
smiles with her teeth showing: learnt onto the lips, teeth made the closed rest mouth
look parted to MediaPipe, and the gap grew by only 9 % of H). Blinks pass since closing
lids fade
in a skin layer (``gaussians.lid_layer``: the fold of an open lid lies over the lashes
and iris, which would otherwise spread over the closed eye), and gaze since the builder
draws the eyeballs (irises 1.3-4.7 % of H the named way, the other iris under 0.2 %).

Sides are derived, never assumed: ``up`` points from the chin to the brows, ``forward``
from the eyes to the nose tip, and the subject's left is ``up x forward`` (right-handed
world). Which of ICT's eyes, MediaPipe's eyes, irises and mouth corners is the subject's
left is decided by projecting points on that side with ``protocol.camera.project``.

Regions (all from ICT's 68 landmark vertices of the built head, ``H`` = chin (8) to the
brows' mean (17-26), ``IOD`` = distance between the eye centres, each eye centre the mean
of its six contour landmarks (36-41, 42-47)):

=================  ================================================================
eye               within 0.5 IOD of the named eye's centre (largest motion);
                  0.35 IOD for "the other eye must not move"
above the eyes    higher (along ``up``) than the eye centres
inner / outer     nearer to / further from the midline than the eye centres
lower face        lower than the nose base (33)
lips              within 0.15 H of the mouth centre (mean of 48-67)
below the mouth   lower than the mouth centre (the jaw and chin)
cheek             below the eye centres and further out than the nose's alae (31, 35)
nose              between the mouth centre and the eye centres, inside the eye centres
forehead          more than 0.1 H above the highest brow landmark
back of the head  more than 1.1 H behind the eye centres (along ``-forward``; the ears end
                  about 0.8 H behind them), above the chin
tongue            vertices ``headmodel`` marks as the tongue
=================  ================================================================

Where the largest motion (weight 1) must lie: ``eye*`` in the named eye's region;
``brow*`` above the eyes (``browInnerUp`` inner, ``browOuterUp*`` outer); ``jaw*`` below the
mouth; ``mouth*`` in the lower face within 0.4 H of the mouth centre; ``cheek*`` in the
cheek; ``nose*`` in the nose region; ``tongueOut`` on the tongue. A ``Left``/``Right`` shape
has it on the named side, moves that side's vertices (total displacement, beyond 2 mm of
the midline) at least 3x the other side's, and moves the other eye's region at most 0.5
mm; ``jawLeft/Right`` and ``mouthLeft/Right`` instead shift what they move (vertices moving
over 20 % of the maximum) at least 1 mm on average towards the named side. Far regions
(at most 0.5 mm): the back of the head for all; the lips for ``eye*`` and ``brow*``; the
forehead for ``mouth*``, ``jaw*``, ``tongueOut`` and ``cheekPuff``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from inference_service.build.builder import BuildOptions, build_avatar
from inference_service.build.detect import detect_faces, face_landmarks
from inference_service.cli import linear_to_srgb8
from inference_service.headmodel import (
    PART_EYE_LEFT,
    PART_EYE_RIGHT,
    PART_TONGUE,
    load_head_model,
)
from inference_service.posing import pose_vertices
from inference_service.render import render_frames
from protocol.arkit import ARKIT_NAMES, index_of
from protocol.camera import framing_distance, intrinsics_from_fov, look_at, project

from .conftest import encode_png

MM = 1e-3
SIZE = 448  # render side, pixels
FOV = 14.0  # degrees: a long lens framed on the face, so MediaPipe sees detail
FILL = 0.9  # the face landmarks' bounding sphere spans this much of the frame
# MediaPipe's reading of one render shifts with the view by several % of H, so each
# measure is the median over three cameras: frontal and turned 8 degrees either way.
YAWS = (-8.0, 0.0, 8.0)

# MediaPipe face-mesh indices (its canonical topology).
MP_CHIN = 152
MP_BROWS = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55,  # one brow, upper then lower contour
            300, 293, 334, 296, 336, 276, 283, 282, 295, 285)  # the other  # fmt: skip
MP_INNER_BROWS = ((107, 55), (336, 285))  # medial ends of each brow
MP_OUTER_BROWS = ((70, 46), (300, 276))
MP_LIPS_INNER = (13, 14)  # upper, lower inner lip midpoints
MP_EYES = ((33, 160, 158, 133, 153, 144), (362, 385, 387, 263, 373, 380))  # p1..p6 for EAR
MP_IRISES = (468, 473)  # iris centres
MP_MOUTH_CORNERS = (61, 291)
MP_NOSE_BRIDGE = 168

# The frames MediaPipe looks at: the rest pose, and each shape at 0.5 and 1.
LOOKED_AT = ("jawOpen", "eyeBlinkLeft", "eyeBlinkRight", "mouthSmileLeft", "mouthSmileRight",
             "browInnerUp", "eyeLookOutLeft", "eyeLookInLeft", "eyeLookOutRight",
             "eyeLookInRight")  # fmt: skip
HALF, FULL = 0.5, 1.0

PARTS = {"Left": PART_EYE_LEFT, "Right": PART_EYE_RIGHT}  # headmodel's eyeballs (checked)

# Shapes that move both sides towards the named one (rather than one side of the face).
DIRECTIONAL = ("jawLeft", "jawRight", "mouthLeft", "mouthRight")
# "Nothing far from it moves": the most a far region may move at weight 1.
FAR_TOLERANCE = 0.5 * MM


def weights(**named: float) -> np.ndarray:
    w = np.zeros(len(ARKIT_NAMES), np.float32)
    for name, value in named.items():
        w[index_of(name)] = value
    return w


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Face:
    """Directions, landmarks and regions of the built head at rest (see the module doc)."""

    rest: np.ndarray  # [V, 3] float64
    lm: np.ndarray  # [68, 3] ICT landmark positions
    up: np.ndarray
    forward: np.ndarray
    left: np.ndarray  # the subject's left, derived
    eye_left: np.ndarray  # centre of the subject's left eye
    eye_right: np.ndarray
    eye_ids_left: tuple[int, ...]  # its six ICT landmarks (p1..p6 for EAR, p1 outer)
    eye_ids_right: tuple[int, ...]
    mid: np.ndarray  # between the eye centres
    mouth: np.ndarray
    height: float  # H
    iod: float

    @classmethod
    def of(cls, vertices: np.ndarray) -> Face:
        rest = vertices.astype(np.float64)
        lm = rest[load_head_model().landmarks68]
        brows, chin = lm[17:27].mean(0), lm[8]
        up = unit(brows - chin)
        eye_a, eye_b = lm[36:42].mean(0), lm[42:48].mean(0)
        mid = 0.5 * (eye_a + eye_b)
        towards_nose = lm[30] - mid
        forward = unit(towards_nose - (towards_nose @ up) * up)
        left = np.cross(up, forward)
        # Multi-PIE order: 36-41 one eye (outer corner 36), 42-47 the other (outer 45);
        # p1..p6 = outer, upper, upper, inner, lower, lower.
        ids_a, ids_b = (36, 37, 38, 39, 40, 41), (45, 44, 43, 42, 47, 46)
        a_is_left = (eye_a - eye_b) @ left > 0
        return cls(
            rest=rest, lm=lm, up=up, forward=forward, left=left,
            eye_left=eye_a if a_is_left else eye_b, eye_right=eye_b if a_is_left else eye_a,
            eye_ids_left=ids_a if a_is_left else ids_b,
            eye_ids_right=ids_b if a_is_left else ids_a,
            mid=mid, mouth=lm[48:68].mean(0),
            height=float(np.linalg.norm(brows - chin)),
            iod=float(np.linalg.norm(eye_a - eye_b)),
        )  # fmt: skip

    def lateral(self, p: np.ndarray) -> np.ndarray:
        """Signed distance towards the subject's left from the midline."""
        return (p - self.mid) @ self.left

    def eye(self, side: str) -> np.ndarray:
        return self.eye_left if side == "Left" else self.eye_right


def side_of(name: str) -> str | None:
    for side in ("Left", "Right"):
        if name.endswith(side):
            return side
    return None


def other(side: str) -> str:
    return "Right" if side == "Left" else "Left"


@pytest.fixture(scope="module")
def avatar(astronaut):
    return build_avatar(encode_png(astronaut), BuildOptions(preset="fast"), "0123456789ab",
                        lambda s, f, m: None)  # fmt: skip


@pytest.fixture(scope="module")
def face(avatar) -> Face:
    return Face.of(avatar.vertices)


def camera_at(face: Face, yaw: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A camera on the face, turned ``yaw`` degrees towards the subject's left:
    intrinsics [4], world-to-camera [4, 4]."""
    radius = float(np.linalg.norm(face.lm - face.lm.mean(0), axis=1).max())
    centre = face.lm.mean(0)
    t = np.radians(yaw)
    direction = face.forward * np.cos(t) + face.left * np.sin(t)
    eye = centre + direction * framing_distance(radius, FOV, FILL)
    return intrinsics_from_fov(SIZE, SIZE, FOV), look_at(eye, centre, face.up)


@pytest.fixture(scope="module")
def camera(face):
    """The frontal camera."""
    return camera_at(face)


# ------------------------------------------------------------------ the subject's left


def test_the_subjects_left_is_plus_x_and_ict_left_is_the_subjects_left(face, avatar, camera):
    # The canonical frame's claim, derived from the head itself.
    assert face.left @ np.array([1.0, 0.0, 0.0]) > 0.99
    assert face.forward @ np.array([0.0, -1.0, 0.0]) > 0.95
    # ICT's eyeBlink_L (our eyeBlinkLeft) moves the eye on the derived left side.
    d = np.linalg.norm(pose_vertices(avatar, weights(eyeBlinkLeft=1)) - face.rest, axis=1)
    assert face.lateral(face.rest[np.argmax(d)]) > 0
    # In a frontal render the subject's left is on the image's right.
    (u_left, _), (u_right, _) = project(np.stack([face.eye_left, face.eye_right]), *camera)[0]
    assert u_left > u_right


# ------------------------------------------------------------------ MediaPipe on renders


@dataclass(frozen=True)
class View:
    """What MediaPipe found in the renders from one camera, and how to read it."""

    points: dict[tuple[str, float], np.ndarray]  # (shape, weight) → [478, 2]; ("rest", 0)
    height: float  # H in pixels (rest render)
    img_left: np.ndarray  # unit image vector towards the subject's left
    img_up: np.ndarray  # unit image vector towards the top of the head
    eye: dict[str, tuple[int, ...]]  # "Left"/"Right" → MediaPipe EAR indices
    iris: dict[str, int]
    corner: dict[str, int]

    def at(self, name: str, w: float) -> np.ndarray:
        return self.points[("rest", 0.0) if w == 0 else (name, w)]


def read_view(face: Face, camera, points: dict) -> View:
    """Which MediaPipe eye, iris and mouth corner is the subject's left: the one nearer to
    the projection of a point on the derived left side."""
    intr, w2c = camera
    rest = points[("rest", 0.0)]

    def image(p: np.ndarray) -> np.ndarray:
        return project(np.atleast_2d(p), intr, w2c)[0][0]

    def pick(pair, target: np.ndarray, where) -> dict:
        a, b = (np.linalg.norm(where(x) - target) for x in pair)
        return {"Left": pair[0], "Right": pair[1]} if a < b else {
            "Left": pair[1], "Right": pair[0]}  # fmt: skip

    eye_l = image(face.eye_left)
    corner_l = image(max(face.lm[48], face.lm[54], key=face.lateral))  # left mouth corner
    return View(
        points=points,
        height=float(np.linalg.norm(rest[MP_CHIN] - rest[list(MP_BROWS)].mean(0))),
        img_left=unit(image(face.eye_left + 0.01 * face.left) - eye_l),
        img_up=unit(image(face.mid + 0.01 * face.up) - image(face.mid)),
        eye=pick(MP_EYES, eye_l, lambda ids: rest[list(ids)].mean(0)),
        iris=pick(MP_IRISES, eye_l, lambda i: rest[i]),
        corner=pick(MP_MOUTH_CORNERS, corner_l, lambda i: rest[i]),
    )


@pytest.fixture(scope="module")
def views(avatar, face) -> list[View]:
    """Every looked-at frame rendered from each of ``YAWS`` (one batch), read by MediaPipe."""
    keys = [("rest", 0.0)] + [(n, w) for n in LOOKED_AT for w in (HALF, FULL)]
    cams = [camera_at(face, yaw) for yaw in YAWS]
    # pose-major order: each pose is posed once and rendered from every camera
    curves = np.repeat(
        np.stack([weights() if n == "rest" else weights(**{n: w}) for n, w in keys]),
        len(cams), axis=0,
    )  # fmt: skip
    intr = np.tile(np.stack([c[0] for c in cams]), (len(keys), 1))
    w2c = np.tile(np.stack([c[1] for c in cams]), (len(keys), 1, 1))
    out = render_frames(avatar, intr, w2c, SIZE, SIZE, curves, None, ("rgb", "alpha"))
    points: list[dict] = [{} for _ in cams]
    for i in range(len(curves)):
        key, v = keys[i // len(cams)], i % len(cams)
        rgb = out["rgb"][i] + (1 - out["alpha"][i][..., None])  # on white
        img = linear_to_srgb8(np.clip(rgb, 0, 1))
        faces = detect_faces(img)
        assert faces, f"MediaPipe found no face in the render of {key} at yaw {YAWS[v]}"
        points[v][key] = face_landmarks(img, faces[0])[:, :2]
    return [read_view(face, cam, pts) for cam, pts in zip(cams, points, strict=True)]


def median(views: list[View], measure) -> float:
    """The median over the views of ``measure(view)``."""
    return float(np.median([measure(v) for v in views]))


def ear(p: np.ndarray, ids) -> float:
    """Eye aspect ratio: (|p2-p6| + |p3-p5|) / (2 |p1-p4|)."""
    p1, p2, p3, p4, p5, p6 = (p[i] for i in ids)
    return float((np.linalg.norm(p2 - p6) + np.linalg.norm(p3 - p5))
                 / (2 * np.linalg.norm(p1 - p4)))  # fmt: skip


def lip_gap(v: View, w: float) -> float:
    """Inner lip gap at ``jawOpen`` = ``w``, in units of H."""
    p = v.at("jawOpen", w)
    return float(np.linalg.norm(p[MP_LIPS_INNER[1]] - p[MP_LIPS_INNER[0]])) / v.height


def ear_change(v: View, name: str, w: float, side: str) -> float:
    """Relative change of that eye's aspect ratio from rest (negative: closing)."""
    return ear(v.at(name, w), v.eye[side]) / ear(v.at(name, 0), v.eye[side]) - 1


def lift(v: View, name: str, w: float, index: int) -> float:
    """How far a landmark moved up from rest, in units of H."""
    return float((v.at(name, w)[index] - v.at(name, 0)[index]) @ v.img_up) / v.height


def test_mediapipe_sides_agree_with_the_geometry(views):
    for v in views:
        rest = v.points[("rest", 0.0)]
        # the subject's left eye, iris and mouth corner all lie towards img_left
        for part in (v.eye, v.iris, v.corner):
            left = np.atleast_2d(rest[np.array(part["Left"])]).mean(0)
            right = np.atleast_2d(rest[np.array(part["Right"])]).mean(0)
            assert (left - right) @ v.img_left > 0
        # the "inner" brow points are the medial ones
        bridge = rest[MP_NOSE_BRIDGE]
        for inner, outer in zip(MP_INNER_BROWS, MP_OUTER_BROWS, strict=True):
            lat = [abs((rest[list(ids)].mean(0) - bridge) @ v.img_left) for ids in (inner, outer)]
            assert lat[0] < lat[1]


def test_jaw_open_opens_the_lips_monotonically(views):
    gaps = [median(views, lambda v, w=w: lip_gap(v, w)) for w in (0, HALF, FULL)]
    assert gaps[0] < gaps[1] < gaps[2], gaps


def test_jaw_open_opens_the_lips_by_15_percent_of_the_face_height(views):
    growth = median(views, lambda v: lip_gap(v, FULL) - lip_gap(v, 0))
    assert growth >= 0.15, f"lip gap grew by {growth:.1%} of the face height"


@pytest.mark.parametrize("side", ["Left", "Right"])
def test_blink_leaves_the_other_eye_open_and_closes_gradually(views, side):
    name = f"eyeBlink{side}"
    for w in (HALF, FULL):
        change = median(views, lambda v, w=w: ear_change(v, name, w, other(side)))
        assert abs(change) <= 0.15, f"{name}@{w}: the other eye's EAR changed {change:+.0%}"
    half, full = (median(views, lambda v, w=w: -ear_change(v, name, w, side)) for w in (HALF, FULL))
    assert 0 < half < full, (half, full)


@pytest.mark.parametrize("side", ["Left", "Right"])
def test_blink_closes_the_named_eye(views, side):
    drop = median(views, lambda v: -ear_change(v, f"eyeBlink{side}", FULL, side))
    assert drop >= 0.60, f"eyeBlink{side}: the {side.lower()} eye's EAR dropped {drop:.0%}"


def test_closed_eyes_show_their_lashes(avatar, face):
    """``gaussians.lash_line``: invisible at rest; with both eyes closed it makes them
    read as closed (without it a closed lid is a blank patch of skin, which MediaPipe
    reads as partly open: on the ``default`` astronaut at 512 px, eye aspect ratio
    0.15-0.22 without, 0.05-0.08 with)."""
    import dataclasses

    from inference_service.build.gaussians import LASH_LIFT

    g = avatar.gaussians
    lashes = (g.appear > 1) & np.isclose(g.offset, LASH_LIFT)
    assert lashes.sum() > 100
    bare = dataclasses.replace(avatar, gaussians=g.take(~lashes))
    cams = [camera_at(face, yaw) for yaw in YAWS]
    # pose-major: rest from each camera, then closed from each
    intr = np.tile(np.stack([c[0] for c in cams]), (2, 1))
    w2c = np.tile(np.stack([c[1] for c in cams]), (2, 1, 1))
    curves = np.repeat(np.stack([weights(), weights(eyeBlinkLeft=FULL, eyeBlinkRight=FULL)]),
                       len(cams), axis=0)  # fmt: skip
    ears, rest = {}, {}
    for label, av in (("with", avatar), ("without", bare)):
        out = render_frames(av, intr, w2c, SIZE, SIZE, curves)
        imgs = [linear_to_srgb8(np.clip(f + 1 - a[..., None], 0, 1))
                for f, a in zip(out["rgb"], out["alpha"], strict=True)]  # fmt: skip
        rest[label] = imgs[: len(cams)]
        lms = [face_landmarks(img, detect_faces(img)[0])[:, :2] for img in imgs[len(cams) :]]
        ears[label] = np.array([[ear(lm, ids) for ids in MP_EYES] for lm in lms])
    for a, b in zip(rest["with"], rest["without"], strict=True):
        assert np.array_equal(a, b)  # nothing shows at rest
    # MediaPipe reads a bare closed lid differently from build to build and view to view
    # (fast preset, frontal view, over eight builds from the photo with and without
    # ±1-level noise: the lashes took the eyes' mean ratio to 0.59-0.84 of the bare one's),
    # so the lashes' effect is held over both eyes and the three views together (0.61-0.74)
    assert np.median(ears["with"], axis=0).max() < 0.1, ears
    assert ears["with"].mean() < 0.8 * ears["without"].mean(), ears


@pytest.mark.parametrize("side", ["Left", "Right"])
def test_smile_lifts_the_named_mouth_corner(views, side):
    name = f"mouthSmile{side}"

    def corner(w, s):
        return median(views, lambda v: lift(v, name, w, v.corner[s]))

    full, half = corner(FULL, side), corner(HALF, side)
    assert full >= 0.02, f"{name} lifted its corner {full:.1%} of H"
    assert corner(FULL, other(side)) < 0.5 * full
    assert 0 < half < full, (half, full)


def test_brow_inner_up_raises_the_inner_brows(views):
    def rise(w, ids):
        return median(views, lambda v: np.mean([lift(v, "browInnerUp", w, i) for i in ids]))

    full = [rise(FULL, ids) for ids in MP_INNER_BROWS]
    half = [rise(HALF, ids) for ids in MP_INNER_BROWS]
    assert min(full) >= 0.005 and np.mean(full) >= 0.015, full
    assert 0 < np.mean(half) < np.mean(full), (half, full)


@pytest.mark.parametrize(
    "name",
    [
        "eyeLookOutLeft",
        "eyeLookInLeft",
        "eyeLookOutRight",
        "eyeLookInRight",
    ],
)
def test_gaze_moves_the_iris_the_named_way(views, face, name):
    side = side_of(name)
    # Out = away from the nose, towards the eye's own side; In = towards the nose.
    sign = np.sign(face.lateral(face.eye(side))) * (1 if "Out" in name else -1)

    def moved(v: View, w: float, i: int) -> np.ndarray:
        return (v.at(name, w)[i] - v.at(name, 0)[i]) / v.height

    half, full = (
        median(views, lambda v, w=w: moved(v, w, v.iris[side]) @ v.img_left * sign)
        for w in (HALF, FULL)
    )
    # the issue asks for the right way; 1 % of H is five times the other iris's jitter.
    # Not monotonic: turned fully in, the iris goes under the inner corner and MediaPipe
    # reads it short (eyeLookInRight: 2.6 % at 0.5, 1.3 % at 1).
    assert full >= 0.01, f"{name}: iris moved {full:.1%} of H the named way"
    assert half >= 0.005, f"{name}@0.5: iris moved {half:.1%} of H the named way"
    still = median(views, lambda v: np.linalg.norm(moved(v, FULL, v.iris[other(side)])))
    assert still < 0.01, f"{name} moved the other iris {still:.1%} of H"


# ------------------------------------------------------------------ geometry


def motion(avatar, face: Face, name: str, w: float = 1.0) -> np.ndarray:
    """Per-vertex displacement ``[V, 3]`` at weight ``w`` of one shape."""
    return pose_vertices(avatar, weights(**{name: w})) - face.rest


def projected(avatar, face: Face, camera, name: str, w: float) -> np.ndarray:
    """ICT's 68 landmarks of the posed mesh in the frontal camera, pixels ``[68, 2]``."""
    return project(pose_vertices(avatar, weights(**{name: w}))[load_head_model().landmarks68],
                   *camera)[0]  # fmt: skip


def test_rig_geometry_meets_the_issue_numbers(avatar, face, camera):
    """The issue's numbers on the rig itself: ICT's landmark vertices, projected."""
    rest = projected(avatar, face, camera, "jawOpen", 0)
    h = np.linalg.norm(rest[17:27].mean(0) - rest[8])
    top, mid = project(np.stack([face.mid + 0.01 * face.up, face.mid]), *camera)[0]
    img_up = unit(top - mid)

    def gap(p):
        return np.linalg.norm(p[66] - p[62])  # inner lip midpoints

    gaps = [gap(projected(avatar, face, camera, "jawOpen", w)) for w in (0, HALF, FULL)]
    assert gaps[0] < gaps[1] < gaps[2]
    assert (gaps[2] - gaps[0]) / h >= 0.15

    def ear68(p, ids):
        p1, p2, p3, p4, p5, p6 = (p[i] for i in ids)
        return (np.linalg.norm(p2 - p6) + np.linalg.norm(p3 - p5)) / (2 * np.linalg.norm(p1 - p4))

    ids = {"Left": face.eye_ids_left, "Right": face.eye_ids_right}
    for side in ("Left", "Right"):
        p = projected(avatar, face, camera, f"eyeBlink{side}", FULL)
        assert ear68(p, ids[side]) / ear68(rest, ids[side]) - 1 <= -0.60
        assert abs(ear68(p, ids[other(side)]) / ear68(rest, ids[other(side)]) - 1) <= 0.15

        p = projected(avatar, face, camera, f"mouthSmile{side}", FULL)
        left_corner, right_corner = sorted((48, 54), key=lambda c: -face.lateral(face.lm[c]))
        corners = {"Left": left_corner, "Right": right_corner}
        rise = {s: (p[c] - rest[c]) @ img_up / h for s, c in corners.items()}
        assert rise[side] >= 0.02 and rise[other(side)] < 0.5 * rise[side]

    p = projected(avatar, face, camera, "browInnerUp", FULL)
    assert min((p[i] - rest[i]) @ img_up / h for i in (21, 22)) >= 0.015  # inner brow ends

    # gaze: the cornea's apex (the eyeball vertex furthest forward) turns the named way
    for side in ("Left", "Right"):
        ball = np.flatnonzero(avatar.vertex_part == PARTS[side])
        apex = ball[np.argmax(face.rest[ball] @ face.forward)]
        assert face.lateral(face.rest[apex]) * (1 if side == "Left" else -1) > 0
        away = np.sign(face.lateral(face.eye(side)))
        for how, sign, axis in (("Out", 1, away * face.left), ("In", -1, away * face.left),
                                ("Up", 1, face.up), ("Down", -1, face.up)):  # fmt: skip
            name = f"eyeLook{how}{side}"
            half, full = (motion(avatar, face, name, w)[apex] @ axis * sign for w in (HALF, FULL))
            assert 0 < half < full and full >= 2 * MM, (name, half, full)


@pytest.mark.parametrize("name", ARKIT_NAMES)
def test_each_shape_moves_the_region_it_names_and_nothing_far(avatar, face, name):
    d3 = motion(avatar, face, name)
    d = np.linalg.norm(d3, axis=1)
    rest = face.rest
    assert d.max() >= 1 * MM, f"{name} moves at most {d.max() / MM:.2f} mm"
    k = int(np.argmax(d))
    p = rest[k]
    side = side_of(name)
    lat = face.lateral(p)
    height = (p - face.mid) @ face.up  # above the eye centres when positive

    def below(q: np.ndarray, ref: np.ndarray) -> bool:
        return (q - ref) @ face.up < 0

    def near(q: np.ndarray, ref: np.ndarray, r: float) -> bool:
        return np.linalg.norm(q - ref) < r

    where = f"{name}: largest motion {d.max() / MM:.1f} mm at {np.round(p / MM, 1)} mm"
    if name.startswith("eye"):
        assert near(p, face.eye(side), 0.5 * face.iod), where
    elif name.startswith("brow"):
        assert height > 0, where
        if name == "browInnerUp":
            assert abs(lat) < 0.5 * face.iod, where
        if name.startswith("browOuterUp"):
            assert abs(lat) > 0.5 * face.iod, where
    elif name.startswith("jaw"):
        assert below(p, face.mouth), where
    elif name.startswith("mouth"):
        assert below(p, face.lm[33]) and near(p, face.mouth, 0.4 * face.height), where
    elif name.startswith("cheek"):
        alae = 0.5 * abs(face.lateral(face.lm[35]) - face.lateral(face.lm[31]))
        assert height < 0 and abs(lat) > alae, where
    elif name.startswith("nose"):
        assert below(p, face.mid) and not below(p, face.mouth), where
        assert abs(lat) < 0.5 * face.iod, where
    elif name == "tongueOut":
        assert avatar.vertex_part[k] == PART_TONGUE, where
    else:
        pytest.fail(f"no region rule for {name}")

    # sides
    if name in DIRECTIONAL:
        moved = d > 0.2 * d.max()
        shift = float(np.mean(d3[moved] @ face.left)) * (1 if side == "Left" else -1)
        assert shift >= 1 * MM, f"{name} shifts {shift / MM:+.2f} mm towards the {side} side"
    elif side is not None:
        lateral = face.lateral(rest)
        named = lateral * (1 if side == "Left" else -1) > 2 * MM
        unnamed = lateral * (1 if side == "Left" else -1) < -2 * MM
        assert lat * (1 if side == "Left" else -1) > 0, where
        # total displacement over each side's vertices
        ratio = d[named].sum() / d[unnamed].sum()
        assert ratio >= 3, f"{name}: the named side moves {ratio:.1f}x the other"
        other_eye = np.linalg.norm(rest - face.eye(other(side)), axis=1) < 0.35 * face.iod
        assert d[other_eye].max() <= FAR_TOLERANCE, (
            f"{name} moves the other eye {d[other_eye].max() / MM:.2f} mm"
        )

    # far regions
    chin = face.lm[8]
    back = ((rest - face.mid) @ -face.forward > 1.1 * face.height) & ((rest - chin) @ face.up > 0)
    far = {"back of the head": back}
    if name.startswith(("eye", "brow")):
        far["lips"] = np.linalg.norm(rest - face.mouth, axis=1) < 0.15 * face.height
    if name.startswith(("mouth", "jaw", "tongue")) or name == "cheekPuff":
        top = (face.lm[17:27] @ face.up).max() + 0.1 * face.height
        far["forehead"] = rest @ face.up > top
    for region, mask in far.items():
        assert mask.sum() > 50, f"region {region} is (nearly) empty"
        assert d[mask].max() <= FAR_TOLERANCE, (
            f"{name} moves the {region} by {d[mask].max() / MM:.2f} mm"
        )
