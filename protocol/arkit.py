"""The 52 ARKit blendshape names in splatface's one canonical order.

Order: left eye, right eye, jaw, mouth, brows, cheeks, nose, tongue (Apple's grouping in
the ARFaceAnchor documentation). "Left" is the subject's left. Curves travel as float32
``[F, 52]`` in this order; curves given with names are matched by name, case-insensitively,
so Live Link Face's PascalCase columns (``EyeBlinkLeft``) match too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ARKIT_NAMES: tuple[str, ...] = (
    # left eye
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft",
    # right eye
    "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight",
    "eyeSquintRight", "eyeWideRight",
    # jaw
    "jawForward", "jawLeft", "jawRight", "jawOpen",
    # mouth
    "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight",
    "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthUpperUpLeft", "mouthUpperUpRight",
    # brows
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    # cheeks
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    # nose
    "noseSneerLeft", "noseSneerRight",
    # tongue
    "tongueOut",
)  # fmt: skip

NUM_SHAPES = len(ARKIT_NAMES)
assert NUM_SHAPES == 52

_INDEX = {name.lower(): i for i, name in enumerate(ARKIT_NAMES)}


def index_of(name: str) -> int:
    """Canonical index of an ARKit name (case-insensitive); ``KeyError`` lists valid names."""
    try:
        return _INDEX[name.strip().lower()]
    except KeyError:
        raise KeyError(
            f"unknown ARKit shape {name!r}; valid names: {', '.join(ARKIT_NAMES)}"
        ) from None


def reorder(values: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Curves ``[F, len(names)]`` given with column names → canonical ``[F, 52]``.

    Names may come in any order and any case; shapes not named stay 0. Unknown or
    repeated names raise ``ValueError`` naming them.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"curves have shape {values.shape} but {len(names)} names were given")
    out = np.zeros((values.shape[0], NUM_SHAPES), np.float32)
    seen: set[int] = set()
    unknown = []
    for col, name in enumerate(names):
        key = str(name).strip().lower()
        if key not in _INDEX:
            unknown.append(str(name))
            continue
        idx = _INDEX[key]
        if idx in seen:
            raise ValueError(f"ARKit shape {ARKIT_NAMES[idx]!r} is named twice")
        seen.add(idx)
        out[:, idx] = values[:, col]
    if unknown:
        raise ValueError(
            f"unknown ARKit shape names: {', '.join(unknown)}; valid names: "
            f"{', '.join(ARKIT_NAMES)}"
        )
    return out


#: Weights outside this range are taken for another scale (percentages...) and refused;
#: inside it they are clamped to [0, 1].
WEIGHT_LIMITS = (-1.0, 2.0)


def check_curves(curves: np.ndarray) -> np.ndarray:
    """Validate curves ``[F, 52]``: NaN/inf and weights outside :data:`WEIGHT_LIMITS`
    rejected, the rest clamped to [0, 1], float32."""
    curves = np.asarray(curves)
    if curves.ndim != 2 or curves.shape[1] != NUM_SHAPES:
        raise ValueError(f"curves must have shape [frames, 52], got {list(curves.shape)}")
    if not np.issubdtype(curves.dtype, np.floating) and not np.issubdtype(curves.dtype, np.integer):
        raise ValueError(f"curves must be numeric, got dtype {curves.dtype}")
    bad = ~np.isfinite(curves)
    if bad.any():
        frame, shape = np.argwhere(bad)[0]
        raise ValueError(
            f"curves contain NaN or infinite values (first at frame {frame}, "
            f"shape {ARKIT_NAMES[shape]})"
        )
    check_weight_range(curves)
    return np.clip(curves.astype(np.float32, copy=False), 0.0, 1.0)


def check_weight_range(curves: np.ndarray, where=lambda frame: f"frame {frame}") -> None:
    """Refuse weights outside :data:`WEIGHT_LIMITS`, naming the first one's shape and
    ``where(frame)`` (a file's line, say)."""
    lo, hi = WEIGHT_LIMITS
    outside = (curves < lo) | (curves > hi)
    if outside.any():
        frame, shape = np.argwhere(outside)[0]
        raise ValueError(
            f"weight {float(curves[frame, shape]):g} for {ARKIT_NAMES[shape]} at {where(frame)} "
            f"is far outside [0, 1] (another scale, such as percentages?); weights are 0..1, "
            f"values within [{lo:g}, {hi:g}] are clamped"
        )
