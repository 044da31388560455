"""Request validation against the op table, and the spec that documents it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from protocol import OPS, errors
from protocol.codec import Message
from protocol.errors import ProtocolError
from protocol.messages import validate

SPEC = (Path(__file__).resolve().parents[1] / "protocol" / "SPEC.md").read_text()


def check(op, arrays=None, **fields):
    return validate(Message({"protocol": 1, "op": op, **fields}, arrays or {}))


def fails(code, op, arrays=None, **fields):
    with pytest.raises(ProtocolError) as e:
        check(op, arrays, **fields)
    assert e.value.code == code, e.value
    return e.value.message


def render_arrays(f=1):
    return {
        "intrinsics": np.tile([[100.0, 100, 32, 32]], (f, 1)),
        "world_to_camera": np.tile(np.eye(4), (f, 1, 1)),
    }


def test_defaults_filled_and_unknown_fields_ignored():
    fields, arrays = check("render", render_arrays(), avatar="a", width=64, height=32, extra=1)
    assert fields["passes"] == ["rgb", "alpha"] and fields["near"] == 0.01
    assert "extra" not in fields and set(arrays) == {"intrinsics", "world_to_camera"}


def test_unknown_op_lists_known_ops():
    msg = fails(errors.UNKNOWN_OP, "explode")
    assert "hello" in msg and "render" in msg


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"width": 64}, "height"),  # missing
        ({"width": "64", "height": 64}, "must be int"),
        ({"width": True, "height": 64}, "must be int"),
        ({"width": 0, "height": 64}, "must be in"),
        ({"width": 5000, "height": 64}, "must be in"),
        ({"width": 64, "height": 64, "passes": ["rgb", "beauty"]}, "must be one of"),
        ({"width": 64, "height": 64, "passes": "rgb"}, "must be a list"),
        ({"width": 64, "height": 64, "background": [0, 0]}, "3 items"),
        ({"width": 64, "height": 64, "near": float("nan")}, "finite"),
    ],
)
def test_bad_fields(fields, words):
    assert words in fails(errors.BAD_REQUEST, "render", render_arrays(), avatar="a", **fields)


def test_oversize_string_is_too_large():
    fails(errors.TOO_LARGE, "get", avatar="x" * 1000)


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"intrinsics": np.zeros((1, 3))}, "shape"),
        ({"curves": np.zeros(52, np.float32)}, "must have shape [frames, shapes], got [52]"),
        ({"world_to_camera": np.zeros((1, 4, 4), np.int32)}, "float32 or float64"),
        ({"curves": np.full((2, 52), np.nan, np.float32)}, "NaN"),
        ({"curves": np.zeros((0, 52), np.float32)}, "empty"),
        ({"bogus": np.zeros(3)}, "takes no array"),
    ],
)
def test_bad_arrays(arrays, words):
    a = render_arrays()
    a.update(arrays)
    assert words in fails(errors.BAD_REQUEST, "render", a, avatar="a", width=8, height=8)


def test_too_many_frames():
    message = fails(errors.TOO_LARGE, "render", render_arrays(2000), avatar="a", width=8,
                    height=8)  # fmt: skip
    assert "has 2000 frames, over the limit of 1024 a request: send them in parts" in message


def test_a_photo_file_over_the_limit_says_its_size_and_what_to_do():
    big = np.zeros((72 << 20) + 1, np.uint8)
    message = fails(errors.TOO_LARGE, "build", {"image": big})
    assert "the photo file is 72.0 MiB, over the service's limit of 64 MiB" in message
    assert "save it compressed" in message
    check("build", {"image": np.zeros(64 << 20, np.uint8)})  # at the limit: taken
    # a client says it before sending: past the codec's own limit (256 MiB) the service
    # could only name an array's dimension
    from protocol import Client

    with Client("tcp://127.0.0.1:9", timeout=1, retries=0) as c, pytest.raises(ProtocolError) as e:
        c.build(bytes(300 << 20))
    assert e.value.code == errors.TOO_LARGE and "the photo file is 300.0 MiB" in e.value.message


def test_build_needs_image():
    assert "image" in fails(errors.BAD_REQUEST, "build")


def test_spec_documents_every_op_field_and_array():
    for op, spec in OPS.items():
        section = re.search(rf"### `{op}`\n(.*?)(?=\n### |\Z)", SPEC, re.S)
        assert section, f"SPEC.md has no section for {op}"
        for name in [*spec.fields, *spec.arrays]:
            assert f"`{name}`" in section.group(1), f"SPEC.md's {op} does not document {name}"


def test_spec_documents_every_error_code():
    for code in errors.CODES:
        assert f"`{code}`" in SPEC, code
