"""Wire format: round trips, zero-copy receive, every malformed shape refused, fuzzing."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import errors
from protocol.codec import DTYPES, Limits, decode, encode
from protocol.errors import ProtocolError


def to_bytes(frames):
    return [bytes(memoryview(f)) for f in frames]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_every_dtype(dtype):
    a = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    msg = decode(to_bytes(encode({"op": "x", "k": [1, "two"]}, {"a": a, "b": a[:, 0]})))
    assert msg.header["op"] == "x" and msg.header["k"] == [1, "two"]
    assert msg.header["protocol"] == 1
    np.testing.assert_array_equal(msg.arrays["a"], a)
    np.testing.assert_array_equal(msg.arrays["b"], a[:, 0])
    assert msg.arrays["a"].dtype == np.dtype(dtype)


def test_big_endian_and_noncontiguous_inputs_travel_as_little_endian():
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    msg = decode(to_bytes(encode({"op": "x"}, {"a": a})))
    np.testing.assert_array_equal(msg.arrays["a"], a)
    assert msg.arrays["a"].dtype.byteorder in ("<", "=")


def test_receive_is_zero_copy():
    frames = [bytearray(f) for f in to_bytes(encode({"op": "x"}, {"a": np.zeros(4, np.float32)}))]
    msg = decode(frames)
    frames[1][:4] = np.float32(7).tobytes()  # write into the received buffer
    assert msg.arrays["a"][0] == 7  # the array is a view of it, not a copy


def test_unsupported_dtype_refused_on_encode():
    with pytest.raises(ProtocolError) as e:
        encode({"op": "x"}, {"a": np.zeros(2, np.complex64)})
    assert e.value.code == errors.BAD_REQUEST


def header(**kw):
    return msgpack.packb({"protocol": 1, "op": "x", **kw})


@pytest.mark.parametrize(
    "frames, code, words",
    [
        ([], errors.BAD_REQUEST, "empty"),
        ([b"\xc1\xc1\xc1"], errors.BAD_REQUEST, "msgpack"),
        ([msgpack.packb([1, 2])], errors.BAD_REQUEST, "map"),
        ([header(arrays="no")], errors.BAD_REQUEST, "list"),
        (
            [header(arrays=[{"name": "a", "dtype": "float32", "shape": [2]}])],
            errors.BAD_REQUEST,
            "1 arrays but 0",
        ),
        ([header(), b"extra"], errors.BAD_REQUEST, "0 arrays but 1"),
        (
            [header(arrays=[{"name": "a", "dtype": "float32", "shape": [2]}]), b"\0" * 7],
            errors.BAD_REQUEST,
            "needs 8 bytes",
        ),
        (
            [header(arrays=[{"name": "a", "dtype": "object", "shape": [1]}]), b"\0"],
            errors.BAD_REQUEST,
            "dtype",
        ),
        (
            [header(arrays=[{"name": "a", "dtype": "uint8", "shape": [-1]}]), b""],
            errors.BAD_REQUEST,
            "shape",
        ),
        (
            [header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1.5]}]), b""],
            errors.BAD_REQUEST,
            "shape",
        ),
        (
            [header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1] * 9}]), b"\0"],
            errors.BAD_REQUEST,
            "shape",
        ),
        (
            [header(arrays=[{"name": "", "dtype": "uint8", "shape": [1]}]), b"\0"],
            errors.BAD_REQUEST,
            "name",
        ),
        (
            [header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1]}] * 2), b"\0", b"\0"],
            errors.BAD_REQUEST,
            "twice",
        ),
        (
            [header(arrays=[{"name": "a", "dtype": "float64", "shape": [1 << 28]}]), b""],
            errors.TOO_LARGE,
            "limit",
        ),
        ([header(pad="x" * (2 << 20))], errors.TOO_LARGE, "header"),
    ],
)
def test_malformed_messages_get_typed_errors(frames, code, words):
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code == code
    assert words in e.value.message


def test_array_count_limit():
    specs = [{"name": f"a{i}", "dtype": "uint8", "shape": [0]} for i in range(20)]
    with pytest.raises(ProtocolError) as e:
        decode([header(arrays=specs)] + [b""] * 20, Limits(max_arrays=16))
    assert e.value.code == errors.TOO_LARGE


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_fuzz_random_frames_never_crash(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(st.sampled_from(["name", "dtype", "shape", "x"]), _values, max_size=4),
    st.lists(st.binary(max_size=32), max_size=2),
)
def test_fuzz_array_specs_never_crash(spec, frames):
    """Structurally valid msgpack with arbitrary array descriptions."""
    try:
        msg = decode([header(arrays=[spec])] + frames)
    except ProtocolError:
        return
    (arr,) = msg.arrays.values()
    assert arr.nbytes == len(frames[0])
