"""Wire format: one msgpack header frame, then one raw frame per array.

Frame 0 (header), a msgpack map::

    {"protocol": 1, "op": "render", "id": "c1f…", ...fields...,
     "arrays": [{"name": "curves", "dtype": "float32", "shape": [F, 52]}, ...]}

Frames 1..n: the bytes of each array listed in ``arrays``, in that order, C-contiguous,
little-endian. They are sent without copying and received with ``np.frombuffer``: no
pickle, no base64. Every size is bounded by :class:`Limits` before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from . import errors
from .errors import ProtocolError

PROTOCOL_VERSION = 1
#: The longest request ``id`` a reply echoes (clients send 32 hex digits).
MAX_REQUEST_ID = 64

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint8", "uint16", "int32", "int64", "float16", "float32", "float64")
}


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked while decoding, before any array is built."""

    max_header_bytes: int = 1 << 20
    max_arrays: int = 16
    max_ndim: int = 5
    max_array_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30


REQUEST_LIMITS = Limits(max_array_bytes=256 << 20, max_total_bytes=512 << 20)
REPLY_LIMITS = Limits()


@dataclass(frozen=True)
class Message:
    """A decoded message: the header map (without ``arrays``) and the named arrays."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return self.header.get("op", "")


def _as_wire_array(name: str, arr: Any) -> np.ndarray:
    a = np.asarray(arr)
    key = a.dtype.name
    if key == "bool":
        a, key = a.astype(np.uint8), "uint8"
    if key not in DTYPES:
        raise ProtocolError(errors.BAD_REQUEST, f"array {name!r}: dtype {a.dtype} cannot travel")
    return np.ascontiguousarray(a, dtype=DTYPES[key])


def encode(header: Mapping[str, Any], arrays: Mapping[str, Any] | None = None) -> list[Any]:
    """Header and arrays → frames for ``send_multipart(frames, copy=False)``."""
    head = dict(header)
    head.setdefault("protocol", PROTOCOL_VERSION)
    wire = [(n, _as_wire_array(n, a)) for n, a in (arrays or {}).items()]
    head["arrays"] = [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in wire]
    return [msgpack.packb(head, use_bin_type=True)] + [
        a.reshape(-1).view(np.uint8) for _, a in wire
    ]


def _frame_bytes(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    return memoryview(buf).cast("B")


def decode(frames: Sequence[Any], limits: Limits = REQUEST_LIMITS) -> Message:
    """Frames → :class:`Message`; raises :class:`ProtocolError` on anything malformed."""
    if not frames:
        raise ProtocolError(errors.BAD_REQUEST, "empty message")
    header = _header(frames[0], limits)
    specs = header.pop("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError(errors.BAD_REQUEST, "'arrays' must be a list")
    if len(specs) > limits.max_arrays:
        raise ProtocolError(errors.TOO_LARGE, f"{len(specs)} arrays, limit {limits.max_arrays}")
    if len(specs) != len(frames) - 1:
        raise ProtocolError(
            errors.BAD_REQUEST,
            f"header lists {len(specs)} arrays but {len(frames) - 1} array frames arrived",
        )
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for spec, frame in zip(specs, frames[1:], strict=True):
        name, dtype, shape = _check_spec(spec, limits)
        if name in arrays:
            raise ProtocolError(errors.BAD_REQUEST, f"array {name!r} sent twice")
        nbytes = dtype.itemsize * math.prod(shape)
        if nbytes > limits.max_array_bytes:
            raise ProtocolError(
                errors.TOO_LARGE,
                f"array {name!r} is {nbytes} bytes, limit {limits.max_array_bytes}",
            )
        total += nbytes
        if total > limits.max_total_bytes:
            raise ProtocolError(
                errors.TOO_LARGE, f"arrays total over {limits.max_total_bytes} bytes"
            )
        buf = _frame_bytes(frame)
        if buf.nbytes != nbytes:
            raise ProtocolError(
                errors.BAD_REQUEST,
                f"array {name!r}: {dtype.name}{list(shape)} needs {nbytes} bytes, "
                f"frame has {buf.nbytes}",
            )
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(header, arrays)


def _header(frame: Any, limits: Limits) -> dict[str, Any]:
    """The header frame as a map, within ``limits``."""
    raw = _frame_bytes(frame)
    if raw.nbytes > limits.max_header_bytes:
        raise ProtocolError(
            errors.TOO_LARGE,
            f"header is {raw.nbytes} bytes, limit {limits.max_header_bytes}",
        )
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=100_000,
            max_map_len=10_000,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        why = str(exc) or type(exc).__name__  # some say nothing: their type then
        raise ProtocolError(errors.BAD_REQUEST, f"header is not valid msgpack: {why}") from None
    if not isinstance(header, dict):
        raise ProtocolError(errors.BAD_REQUEST, "header must be a msgpack map")
    return header


def request_op_and_id(frames: Sequence[Any], limits: Limits = REQUEST_LIMITS) -> tuple[Any, Any]:
    """``op`` and ``id`` of a request that :func:`decode` refused past its header (an array
    too large, a frame missing), so the error reply reaches the caller that waits on that
    id; (None, None) when the header itself is unreadable."""
    try:
        header = _header(frames[0], limits) if frames else {}
    except ProtocolError:
        return None, None
    req_id = header.get("id")
    return header.get("op"), req_id if usable_id(req_id) else None


def usable_id(req_id: Any) -> bool:
    """Whether a request's ``id`` can be echoed in its reply: a string of at most
    :data:`MAX_REQUEST_ID` characters (a request may also carry none)."""
    return isinstance(req_id, str) and len(req_id) <= MAX_REQUEST_ID


def _check_spec(spec: Any, limits: Limits) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise ProtocolError(errors.BAD_REQUEST, "each 'arrays' entry must be a map")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise ProtocolError(errors.BAD_REQUEST, f"array name must be a short string: {name!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(
            errors.BAD_REQUEST,
            f"array {name!r}: dtype {dtype!r} not one of {', '.join(DTYPES)}",
        )
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_ndim
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ProtocolError(
            errors.BAD_REQUEST,
            f"array {name!r}: shape must be a list of at most {limits.max_ndim} "
            f"non-negative ints, got {shape!r}",
        )
    if any(s > limits.max_array_bytes for s in shape):
        raise ProtocolError(errors.TOO_LARGE, f"array {name!r}: dimension too large")
    return name, DTYPES[dtype], tuple(shape)
