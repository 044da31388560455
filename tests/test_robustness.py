"""Awkward photos build or are refused with a clear, typed reason; nothing crashes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from inference_service.build.builder import BuildOptions, build_avatar
from inference_service.build.detect import detect_faces
from protocol import errors
from protocol.errors import ProtocolError

from .conftest import encode_png


def build(im: Image.Image):
    return build_avatar(encode_png(np.asarray(im)), BuildOptions(preset="fast"), "0123456789ab",
                        lambda s, f, m: None)  # fmt: skip


@pytest.fixture(scope="module")
def portrait(astronaut) -> Image.Image:
    return Image.fromarray(astronaut)


def refused(im, code) -> str:
    with pytest.raises(ProtocolError) as e:
        build(im)
    assert e.value.code == code, e.value
    return e.value.message


def test_tiny_face_is_refused_with_the_size_it_needs(portrait):
    message = refused(portrait.resize((96, 96)), errors.FACE_TOO_SMALL)
    assert "18 px" in message and "at least 24 px" in message


def pasted(astronaut, size: tuple[int, int], face_px: float):
    """The astronaut scaled so her face is ``face_px`` across, on a grey photo of ``size``;
    and her face's box there."""
    s = face_px / 95.0  # her face is about 95 px across in the 512 px original
    small = np.asarray(Image.fromarray(astronaut).resize((round(512 * s),) * 2, Image.BILINEAR))
    img = np.full((size[1], size[0], 3), 128, np.uint8)
    x, y = size[0] // 4, size[1] // 3
    img[y : y + small.shape[0], x : x + small.shape[1]] = small
    return img, (x + 177 * s, y + 83 * s, x + 273 * s, y + 178 * s)


@pytest.mark.parametrize("size, face_px", [((1920, 1440), 64), ((4000, 3000), 100)])
def test_small_faces_in_large_photos_are_found(astronaut, size, face_px):
    """The detectors see a face down to about 1/20 of what they are given: these are found
    in overlapping squares of the photo, not in the whole of it."""
    from inference_service.build.detect import _iou, detect_faces

    img, true = pasted(astronaut, size, face_px)
    assert max(_iou(f.box, true) for f in detect_faces(img)) > 0.5


def test_a_face_box_is_searched_on_its_own(astronaut):
    from inference_service.build.detect import _iou, choose_face, detect_faces

    img, true = pasted(astronaut, (4000, 3000), 48)  # too small even for the squares
    assert all(_iou(f.box, true) < 0.5 for f in detect_faces(img))
    face = choose_face(detect_faces(img, near=list(true)), None, list(true), (4000, 3000))
    assert _iou(face.box, true) > 0.5


ASTRONAUT_HEAD = (106.0, 21.0, 233.0)  # the square box of her fitted head (x0, y0, side)


def test_a_small_head_in_a_large_photo_is_segmented_around_it(astronaut):
    """MediaPipe segments a 256 px copy: a 157 px head in a 4000 px photo is lost in the
    whole photo's, and found in a square around it."""
    from inference_service.build.photometric import person_mask

    s = 157 / ASTRONAUT_HEAD[2]
    img, _ = pasted(astronaut, (4000, 3000), 95 * s)
    x, y = 1000, 1000  # where pasted() puts her, from its quarter and third of the photo
    head = (x + ASTRONAUT_HEAD[0] * s, y + ASTRONAUT_HEAD[1] * s, ASTRONAUT_HEAD[2] * s)
    size = round(512 * s)
    own = person_mask(astronaut)
    truth = np.zeros((3000, 4000), bool)
    truth[y : y + size, x : x + size] = np.asarray(
        Image.fromarray(own).resize((size, size), Image.NEAREST)
    )

    near = np.zeros_like(truth)  # the head's box: what the fit's crop of the photo holds
    near[round(head[1]) : round(head[1] + head[2]), round(head[0]) : round(head[0] + head[2])] = 1

    def iou(mask):
        return (mask & truth & near).sum() / ((mask | truth) & near).sum()

    assert iou(person_mask(img, head)) > 0.95
    assert iou(person_mask(img)) < 0.5  # measured 0.0: what the head box is for


def test_a_small_face_in_a_large_photo_builds_from_the_photo(astronaut):
    """Measured before the head box: no photo pixel reached the fit (its L1 was 0 from
    the start) and no hair was grown, a bald grey head."""
    img, _ = pasted(astronaut, (1920, 1440), 64)
    av = build(Image.fromarray(img))
    assert av.meta["coin_fit"]["l1_start"] > 0.01
    assert av.meta["gaussians"] > 16000  # measured 16.7k with hair, 13.7k without


def test_a_portrait_is_segmented_whole(astronaut):
    from inference_service.build.photometric import person_mask

    assert np.array_equal(person_mask(astronaut, ASTRONAUT_HEAD), person_mask(astronaut))


ASTRONAUT_FACE = (178.0, 83.0, 273.0, 178.0)  # her detected face box


def test_a_false_box_beside_a_face_gives_way_to_the_face(astronaut):
    """The face mesh searches twice the box, so a false box below-left of the face finds
    the face's landmarks; they are not the box's own, and the face itself is used."""
    from inference_service.build.detect import Face, locate_face

    faces = [Face((150.0, 150.0, 300.0, 300.0), 0.6), Face(ASTRONAUT_FACE, 0.9)]
    face, landmarks = locate_face(astronaut, faces, None, None)
    assert face is faces[1] and 178 < landmarks[:, 0].mean() < 273


def test_a_false_box_around_a_smaller_face_gives_way_to_the_face(astronaut):
    """A wide photo where the detectors, unsure of a 95 px face, also box her suit and
    shoulders 335 px wide: that box holds the face's landmarks, but they span a third of
    it, so they are not its own; the face itself is used."""
    from inference_service.build.detect import Face, locate_face

    img = np.full((600, 4000, 3), 110, np.uint8)
    img[88:600, 2000:2512] = astronaut
    face = Face(
        tuple(v + d for v, d in zip(ASTRONAUT_FACE, (2000, 88, 2000, 88), strict=True)), 0.7
    )
    faces = [Face((2084.0, 134.0, 2419.0, 469.0), 0.62), face]
    used, landmarks = locate_face(img, faces, None, None)
    assert used is face and 2178 < landmarks[:, 0].mean() < 2273
    with pytest.raises(ProtocolError) as e:
        locate_face(img, faces, 0, None)
    assert e.value.code == errors.NO_FACE and "a false box around a smaller face" in e.value.message


def test_a_false_box_without_landmarks_gives_way_to_the_face(astronaut):
    from inference_service.build.detect import Face, locate_face

    img = np.full((1024, 1024, 3), 128, np.uint8)
    img[:512, :512] = astronaut
    faces = [Face((600.0, 600.0, 900.0, 900.0), 0.6), Face(ASTRONAUT_FACE, 0.9)]
    assert locate_face(img, faces, None, None)[0] is faces[1]


def test_a_false_box_asked_for_is_refused_naming_where_the_face_is(astronaut):
    from inference_service.build.detect import Face, locate_face

    faces = [Face((150.0, 150.0, 300.0, 300.0), 0.6), Face(ASTRONAUT_FACE, 0.9)]
    with pytest.raises(ProtocolError) as e:
        locate_face(astronaut, faces, 0, None)
    assert e.value.code == errors.NO_FACE and "no landmarks of its own" in e.value.message
    assert len(e.value.details["faces"]) == 2


def test_small_photo_builds(portrait):
    av = build(portrait.resize((192, 192)))  # a face of about 36 px
    assert av.meta["source"] == {"width": 192, "height": 192} and av.meta["landmark_rms"] < 0.06


def test_face_cut_by_the_border_builds(portrait):
    av = build(portrait.crop((215, 0, 512, 512)))  # the left side of the face is gone
    assert av.meta["landmark_rms"] < 0.08


def test_heavy_blur_is_refused(portrait):
    assert "blurred" in refused(portrait.filter(ImageFilter.GaussianBlur(6)), errors.NO_FACE)


def test_heavy_blur_with_a_false_box_around_it_is_refused_as_blurred(hopper):
    # blurred this much, her photo also yields a box around her whole head and shoulders;
    # the refusal named that false box, not her face's blur
    blurred = Image.fromarray(hopper).filter(ImageFilter.GaussianBlur(12))
    assert len(detect_faces(np.asarray(blurred))) == 2
    message = refused(blurred, errors.NO_FACE)
    assert "too blurred" in message and "false box" not in message


def test_line_drawing_is_refused(portrait):
    drawing = ImageOps.invert(portrait.convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB")
    assert "no face found" in refused(drawing, errors.NO_FACE)


def test_sideways_photo_builds_a_rolled_head(portrait):
    av = build(portrait.rotate(90, expand=True))  # no EXIF: the face really lies sideways
    up_in_camera = av.photo_world_to_camera[:3, :3] @ np.array([0.0, 0.0, 1.0])
    assert abs(up_in_camera[0]) > 0.9  # the head's up points along the image's x axis


@pytest.mark.parametrize("turn", [1, 2, 3])
def test_a_face_turned_without_exif_is_read_turned(hopper, turn):
    """Her face lying sideways or upside down gave no landmarks (so `no_face`): the mesh is
    run on the crop stood upright as the detection's key points say."""
    from inference_service.build.detect import detect_faces, locate_face

    upright = locate_face(hopper, detect_faces(hopper), None, None)[1][:, :2]
    img = np.ascontiguousarray(np.rot90(hopper, turn))
    points = locate_face(img, detect_faces(img), None, None)[1][:, :2]
    expected = upright.copy()
    h, w = hopper.shape[:2]
    for k in range(turn):  # where np.rot90 takes each point, a quarter turn at a time
        expected = np.stack([expected[:, 1], (w if k % 2 == 0 else h) - expected[:, 0]], axis=1)
    assert np.abs(points - expected).mean() < 2.0  # measured 0.74-0.79 px


def test_an_upside_down_face_read_upright_in_doubt_is_read_turned(hopper):
    """At twice her size, upside down, the upright detectors pass her face at 0.6 with key
    points as if upright; the turned search's sure reading takes its place."""
    from inference_service.build.detect import detect_faces, locate_face

    big = np.asarray(Image.fromarray(hopper).resize((1024, 1200)))
    img = np.ascontiguousarray(np.rot90(big, 2))
    face, landmarks = locate_face(img, detect_faces(img), None, None)
    upright = locate_face(big, detect_faces(big), None, None)[1][:, :2]
    assert face.turn == 2
    assert np.abs(landmarks[:, :2] - ([1024, 1200] - upright)).mean() < 3.0


def test_a_face_centred_past_the_border_keeps_its_landmarks(hopper):
    from inference_service.build.detect import detect_faces, locate_face

    img = np.ascontiguousarray(hopper[:, 260:])  # her face's centre lies left of the photo
    face, landmarks = locate_face(img, detect_faces(img), 0, None)
    assert landmarks[:, 0].mean() < 0


def test_an_upside_down_photo_builds_an_upside_down_head(hopper):
    av = build(Image.fromarray(np.ascontiguousarray(np.rot90(hopper, 2))))
    up_in_camera = av.photo_world_to_camera[:3, :3] @ np.array([0.0, 0.0, 1.0])
    assert up_in_camera[1] > 0.9 and av.meta["landmark_rms"] < 0.06  # image y runs down


def test_8k_photo_builds(portrait):
    av = build(portrait.resize((4320, 4320)))
    assert av.meta["source"] == {"width": 4320, "height": 4320}
    assert av.meta["landmark_rms"] < 0.05


@pytest.mark.parametrize("yaw", [45.0, -45.0])
def test_face_turned_45_degrees_builds_facing_the_right_way(client, astronaut_id, yaw):
    """A face turned 45° (our astronaut rendered from the side, over a plain wall) builds,
    and the fitted camera sits on the side that took the photo (MediaPipe reads large
    turns a little short: 36-41° was measured)."""
    from inference_service.cli import linear_to_srgb8
    from protocol.camera import framing_distance, intrinsics_from_fov, orbit

    info = client.get(astronaut_id, mesh=False, rig=False).header["avatar"]
    size, fov = 512, 25.0
    w2c = orbit(info["center"], framing_distance(info["radius"], fov, 0.6), yaw, 0.0)
    r = client.render(astronaut_id, intrinsics_from_fov(size, size, fov), w2c, size, size,
                      background=(0.6, 0.55, 0.5))  # fmt: skip
    photo = linear_to_srgb8(np.clip(r["rgb"][0], 0, 1))
    av = build(Image.fromarray(photo))
    assert av.meta["landmark_rms"] < 0.08
    axis = av.photo_world_to_camera[:3, :3].T @ np.array([0.0, 0.0, 1.0])  # head frame
    seen_from = np.degrees(np.arctan2(-axis[0], axis[1]))  # orbit's yaw convention
    assert np.sign(seen_from) == np.sign(yaw) and abs(seen_from - yaw) < 15.0, seen_from


def test_statue_builds_in_its_own_stone_colour(portrait):
    """A statue (the portrait as stone: grey, low contrast, warm tint) builds, and nothing
    the builder invents (the unseen side, the back, inpainted skin) brings skin colour
    in: every view stays as unsaturated as the photo."""
    from PIL import ImageEnhance

    from inference_service.cli import linear_to_srgb8
    from inference_service.render import render_frames
    from protocol.camera import framing_distance, intrinsics_from_fov, orbit

    grey = ImageEnhance.Contrast(ImageOps.grayscale(portrait)).enhance(0.6)
    statue = ImageOps.colorize(grey, black=(70, 66, 60), white=(236, 232, 222))
    limit = np.asarray(statue.convert("HSV"))[..., 1].max() / 255 + 0.05
    av = build(statue)
    assert av.meta["landmark_rms"] < 0.05
    intr = intrinsics_from_fov(128, 128, 25.0)
    for yaw in (0.0, 60.0, -60.0, 180.0):
        w2c = orbit(av.center, framing_distance(av.radius, 25.0, 0.9), yaw, 0.0)
        out = render_frames(av, intr[None], w2c[None], 128, 128)
        img = linear_to_srgb8(np.clip(out["rgb"][0], 0, 1))
        head = out["alpha"][0] > 0.9
        sat = np.asarray(Image.fromarray(img).convert("HSV"))[..., 1][head] / 255
        assert head.sum() > 2000 and np.percentile(sat, 95) < limit, (yaw, sat.mean())


def test_a_long_search_for_small_faces_reports_and_stops_when_cancelled():
    """A photo 400,000 px wide is searched in hundreds of squares for small faces; its
    build heard nothing meanwhile, so a cancel waited for the whole search (a 4,000,000
    px one: 3 minutes). The search reports, and a build's progress stops it there."""
    heard = []

    def progress(stage, fraction, message):
        heard.append((stage, fraction, message))
        if "squares" in message:
            raise ProtocolError(errors.CANCELLED, "the build was cancelled")

    strip = np.full((64, 400_000, 3), 128, np.uint8)
    with pytest.raises(ProtocolError) as e:
        build_avatar(encode_png(strip), BuildOptions(preset="fast"), "0123456789ab", progress)
    assert e.value.code == errors.CANCELLED
    stage, fraction, message = heard[-1]
    assert stage == "detect" and 0.1 <= fraction < 0.3
    assert "searching squares of 781 px" in message


def test_squares_a_face_could_not_fill_are_not_searched():
    """A face is no larger than the photo's short side: in squares over 20 times that it
    would be too small for the detectors, so a 16 px strip needs no square search."""
    heard = []
    assert (
        detect_faces(np.full((16, 200_000, 3), 128, np.uint8), progress=lambda *a: heard.append(a))
        == []
    )
    assert heard == []
