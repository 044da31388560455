"""Every op's request fields and arrays, with their limits, in one table.

The service validates requests against :data:`OPS` before doing any work, and
``protocol/SPEC.md`` documents the same table (a test keeps them in step). Unknown
fields are ignored, so newer clients can talk to older services within a version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import errors
from .codec import Message
from .errors import ProtocolError

MAX_NAME = 128
MAX_ID = 64
MAX_FRAMES = 1024
MAX_FRAME = MAX_FRAMES * 1000  # the highest frame number an export may name
MAX_SIZE = 4096
MAX_IMAGE_BYTES = 64 << 20
MAX_PATH = 4096
MAX_RENDER_BYTES = 1 << 30
PASSES = ("rgb", "alpha", "depth", "normal")
#: float32 channels per pixel of each pass: what a render reply weighs
PASS_CHANNELS = {"rgb": 3, "alpha": 1, "depth": 1, "normal": 3}
#: Row order of rendered images: OpenCV's (row 0 at the top) or OpenGL's and Blender's.
ROWS = ("top_down", "bottom_up")
PRESETS = ("fast", "default", "high")
EXPORT_FORMATS = ("ply", "bundle")


def frames_per_render(width: int, height: int, passes: tuple[str, ...] | list[str]) -> int:
    """The most frames one ``render`` request may ask for: :data:`MAX_FRAMES`, fewer
    where that many frames of ``width`` x ``height`` with ``passes`` would weigh more
    than :data:`MAX_RENDER_BYTES` (256 frames of 512 px with rgb and alpha)."""
    channels = sum(PASS_CHANNELS.get(p, 0) for p in dict.fromkeys(passes))
    per_frame = max(1, width * height * max(1, channels) * 4)
    return max(1, min(MAX_FRAMES, MAX_RENDER_BYTES // per_frame))


@dataclass(frozen=True)
class Field:
    """A scalar or list header field. ``kind``: str, int, float, bool, list."""

    kind: str
    required: bool = False
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    choices: tuple[str, ...] | None = None
    item: str | None = None  # kind of list items
    item_len: int = MAX_NAME  # longest string item of a list
    length: int | None = None  # exact list length


@dataclass(frozen=True)
class ArrayField:
    """An array frame. ``shape`` entries: an int (exact), or None (any, up to ``dim_max``)."""

    dtypes: tuple[str, ...]
    shape: tuple[int | None, ...]
    required: bool = False
    dim_max: int = MAX_FRAMES
    max_bytes: int | None = None
    finite: bool = True
    empty_code: str = errors.BAD_REQUEST  # the error for an array with no elements
    #: What the array holds and what to do, for a ``too_large`` a user can act on
    #: ("the photo file", "save it compressed"); else the array's name and limit.
    too_large: tuple[str, str] | None = None
    #: What each ``None`` dimension counts, for messages ("frames"); "N" where unnamed.
    dims: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpSpec:
    fields: dict[str, Field]
    arrays: dict[str, ArrayField]


_FLOAT = ("float32", "float64")
_AVATAR = Field("str", required=True, max_len=MAX_NAME)
_CURVES = ArrayField(_FLOAT, (None, None), dims=("frames", "shapes"))
_CURVE_NAMES = Field("list", item="str", max_len=52)
_HEAD = ArrayField(_FLOAT, (None, 4, 4), dims=("frames",))

OPS: dict[str, OpSpec] = {
    "hello": OpSpec({"client": Field("str", max_len=200, default="")}, {}),
    "build": OpSpec(
        {
            "name": Field("str", max_len=MAX_NAME, default=""),
            "preset": Field("str", default="default", choices=PRESETS),
            "face": Field("int", lo=0, hi=63),
            "face_box": Field("list", item="float", length=4),
            # diffusion weight folders on the service's machine: [model] or [model,
            # controlnet]; [] turns the service's own (`serve --enhance`) off
            "enhance": Field("list", item="str", max_len=2, item_len=MAX_PATH),
        },
        {
            "image": ArrayField(
                ("uint8",),
                (None,),
                required=True,
                dim_max=MAX_IMAGE_BYTES,
                max_bytes=MAX_IMAGE_BYTES,
                empty_code=errors.BAD_IMAGE,
                too_large=(
                    "the photo file",
                    "save it compressed (JPEG, or PNG/TIFF with compression) or smaller",
                ),
            )
        },
    ),
    "status": OpSpec(
        {
            "job": Field("str", required=True, max_len=MAX_ID),
            "since": Field("int", lo=0, hi=1 << 31, default=0),
        },
        {},
    ),
    "cancel": OpSpec({"job": Field("str", required=True, max_len=MAX_ID)}, {}),
    "list": OpSpec({}, {}),
    "get": OpSpec(
        {
            "avatar": _AVATAR,
            "mesh": Field("bool", default=True),
            "rig": Field("bool", default=True),
        },
        {},
    ),
    "render": OpSpec(
        {
            "avatar": _AVATAR,
            "width": Field("int", required=True, lo=1, hi=MAX_SIZE),
            "height": Field("int", required=True, lo=1, hi=MAX_SIZE),
            "passes": Field(
                "list", item="str", choices=PASSES, default=["rgb", "alpha"], max_len=len(PASSES)
            ),
            "background": Field(
                "list", item="float", length=3, default=[0.0, 0.0, 0.0], lo=-1e4, hi=1e4
            ),
            "near": Field("float", lo=1e-4, hi=1e3, default=0.01),
            "far": Field("float", lo=1e-3, hi=1e5, default=100.0),
            "curve_names": _CURVE_NAMES,
            "rows": Field("str", choices=ROWS, default="top_down"),
        },
        {
            "curves": _CURVES,
            "head": _HEAD,
            "intrinsics": ArrayField(_FLOAT, (None, 4), required=True, dims=("frames",)),
            "world_to_camera": ArrayField(_FLOAT, (None, 4, 4), required=True, dims=("frames",)),
        },
    ),
    "export": OpSpec(
        {
            "avatar": _AVATAR,
            "format": Field("str", default="ply", choices=EXPORT_FORMATS),
            "frame": Field("int", lo=0, hi=MAX_FRAME, default=0),
            "frames": Field("list", item="int", length=2),
            "to": Field("str", default="reply", choices=("reply", "folder")),
            "curve_names": _CURVE_NAMES,
            "sh_degree": Field("int", lo=0, hi=3),
        },
        {  # a whole take, of which ``frame``/``frames`` pick rows: heads as many as curves
            "curves": ArrayField(
                _FLOAT, (None, None), dim_max=MAX_FRAMES * 100, dims=("frames", "shapes")
            ),
            "head": ArrayField(_FLOAT, (None, 4, 4), dim_max=MAX_FRAMES * 100, dims=("frames",)),
        },
    ),
    "delete": OpSpec({"avatar": _AVATAR}, {}),
}


def _check_scalar(name: str, kind: str, value: Any, spec: Field) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise _bad(f"field {name!r} must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _bad(f"field {name!r} must be a string, got {type(value).__name__}")
        if spec.max_len is not None and len(value) > spec.max_len and spec.kind == "str":
            raise ProtocolError(
                errors.TOO_LARGE, f"field {name!r} is longer than {spec.max_len} characters"
            )
        if spec.choices and value not in spec.choices:
            raise _bad(f"field {name!r} must be one of {', '.join(spec.choices)}, got {value!r}")
        return value
    if kind in ("int", "float"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            ok = ok or isinstance(value, float)
        if not ok:
            raise _bad(f"field {name!r} must be {kind}, got {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise _bad(f"field {name!r} must be finite, got {value!r}")
        if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
            raise _bad(f"field {name!r} must be in [{spec.lo}, {spec.hi}], got {value!r}")
        return float(value) if kind == "float" else int(value)
    raise AssertionError(kind)


def request_fields() -> dict[str, list[str]]:
    """Every op's request fields, as ``hello`` reports them (``capabilities.fields``): a
    service drops fields it does not know, so a client asks before it relies on one."""
    return {op: sorted(spec.fields) for op, spec in OPS.items()}


#: Fields some services in use do not take: a client checks ``hello``'s
#: ``capabilities.fields`` before it sends one, and a service that reports no fields
#: (any from before the report) is taken not to take them. ``export``'s ``sh_degree``
#: came after the first sessions (such a service wrote no ``f_rest_*`` for it, and said
#: nothing); every other field dates from them. A field added from now on belongs here.
CHECKED_FIELDS = {"export": ("sh_degree",)}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(errors.BAD_REQUEST, message)


def validate(msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Check a request against :data:`OPS`; return (fields with defaults, arrays).

    Raises :class:`ProtocolError` with ``unknown_op``, ``bad_request`` or ``too_large``.
    Unknown fields are dropped; unknown arrays are an error (they cost bytes).
    """
    op = msg.header.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(errors.UNKNOWN_OP, f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    spec = OPS[op]
    fields: dict[str, Any] = {}
    for name, f in spec.fields.items():
        value = msg.header.get(name)
        if value is None:
            if f.required:
                raise _bad(f"op {op!r} needs field {name!r}")
            fields[name] = list(f.default) if isinstance(f.default, list) else f.default
            continue
        if f.kind == "list":
            if not isinstance(value, list):
                raise _bad(f"field {name!r} must be a list, got {type(value).__name__}")
            if f.length is not None and len(value) != f.length:
                raise _bad(f"field {name!r} must have {f.length} items, got {len(value)}")
            if f.max_len is not None and len(value) > f.max_len:
                raise ProtocolError(
                    errors.TOO_LARGE, f"field {name!r} has more than {f.max_len} items"
                )
            item_spec = Field(f.item or "str", lo=f.lo, hi=f.hi, choices=f.choices,
                              max_len=f.item_len)  # fmt: skip
            fields[name] = [
                _check_scalar(f"{name}[{i}]", item_spec.kind, v, item_spec)
                for i, v in enumerate(value)
            ]
        else:
            fields[name] = _check_scalar(name, f.kind, value, f)
    for name in msg.arrays:
        if name not in spec.arrays:
            raise _bad(
                f"op {op!r} takes no array {name!r}; it takes: {', '.join(spec.arrays) or 'none'}"
            )
    arrays: dict[str, np.ndarray] = {}
    for name, a in spec.arrays.items():
        arr = msg.arrays.get(name)
        if arr is None:
            if a.required:
                raise _bad(f"op {op!r} needs array {name!r}")
            continue
        arrays[name] = _check_array(name, arr, a)
    return fields, arrays


def too_large(spec: ArrayField, nbytes: int) -> ProtocolError:
    """The ``too_large`` error for an array a user gave (``spec`` has ``too_large`` words
    and ``max_bytes``): clients raise it before sending, the service for what reaches it."""
    what, remedy = spec.too_large
    return ProtocolError(
        errors.TOO_LARGE,
        f"{what} is {nbytes / 2**20:.1f} MiB, over the service's limit of "
        f"{spec.max_bytes / 2**20:.0f} MiB: {remedy}",
    )


def _check_array(name: str, arr: np.ndarray, spec: ArrayField) -> np.ndarray:
    if arr.dtype.name not in spec.dtypes:
        raise _bad(f"array {name!r} must be {' or '.join(spec.dtypes)}, got {arr.dtype.name}")
    names = iter(spec.dims)
    labels = [next(names, "N") if s is None else str(s) for s in spec.shape]
    want = "[" + ", ".join(labels) + "]"
    if arr.ndim != len(spec.shape) or any(
        s is not None and s != d for s, d in zip(spec.shape, arr.shape, strict=True)
    ):
        raise _bad(f"array {name!r} must have shape {want}, got {list(arr.shape)}")
    if spec.too_large is not None and spec.max_bytes is not None and arr.nbytes > spec.max_bytes:
        raise too_large(spec, arr.nbytes)
    for s, d, label in zip(spec.shape, arr.shape, labels, strict=True):
        if s is None and d > spec.dim_max:
            what = "a dimension" if label == "N" else label
            hint = " a request: send them in parts" if label == "frames" else ""
            raise ProtocolError(
                errors.TOO_LARGE,
                f"array {name!r} has {d} {what}, over the limit of {spec.dim_max}{hint}",
            )
    if any(d == 0 for d in arr.shape):
        raise ProtocolError(spec.empty_code, f"array {name!r} is empty")
    if spec.max_bytes is not None and arr.nbytes > spec.max_bytes:
        raise ProtocolError(
            errors.TOO_LARGE, f"array {name!r} is {arr.nbytes} bytes, limit {spec.max_bytes}"
        )
    if spec.finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise _bad(f"array {name!r} contains NaN or infinite values")
    return arr
