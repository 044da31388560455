"""Awkward photos build or are refused with a clear, typed reason; nothing crashes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from inference_service.build.builder import BuildOptions, build_avatar
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


def test_small_photo_builds(portrait):
    av = build(portrait.resize((192, 192)))  # a face of about 36 px
    assert av.meta["source"] == {"width": 192, "height": 192} and av.meta["landmark_rms"] < 0.06


def test_face_cut_by_the_border_builds(portrait):
    av = build(portrait.crop((215, 0, 512, 512)))  # the left side of the face is gone
    assert av.meta["landmark_rms"] < 0.08


def test_heavy_blur_is_refused(portrait):
    assert "blurred" in refused(portrait.filter(ImageFilter.GaussianBlur(6)), errors.NO_FACE)


def test_line_drawing_is_refused(portrait):
    drawing = ImageOps.invert(portrait.convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB")
    assert "no face found" in refused(drawing, errors.NO_FACE)


def test_sideways_photo_builds_a_rolled_head(portrait):
    av = build(portrait.rotate(90, expand=True))  # no EXIF: the face really lies sideways
    up_in_camera = av.photo_world_to_camera[:3, :3] @ np.array([0.0, 0.0, 1.0])
    assert abs(up_in_camera[0]) > 0.9  # the head's up points along the image's x axis


def test_8k_photo_builds(portrait):
    av = build(portrait.resize((4320, 4320)))
    assert av.meta["source"] == {"width": 4320, "height": 4320}
    assert av.meta["landmark_rms"] < 0.05
