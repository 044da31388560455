"""Read ARKit curves from files: ``.npy`` ``[F, 52]`` or a CSV with named columns.

CSV: a header row, one row per frame. Columns named after ARKit shapes (any case, so Live
Link Face's ``EyeBlinkLeft`` works) are read; shapes not present stay 0; the bookkeeping
columns Live Link Face writes (timecode, counts, head and eye angles) are skipped; any
other column is an error that lists the valid names.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from protocol.arkit import ARKIT_NAMES, check_curves, reorder

IGNORED_COLUMNS = {
    "timecode", "frame", "time", "blendshapecount",
    "headyaw", "headpitch", "headroll",
    "lefteyeyaw", "lefteyepitch", "lefteyeroll",
    "righteyeyaw", "righteyepitch", "righteyeroll",
}  # fmt: skip


def load_curves(path: str | Path) -> np.ndarray:
    """Curves ``[F, 52]`` float32 in protocol order, clamped to [0, 1].

    Raises ``ValueError`` naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            curves = np.load(path, allow_pickle=False)
            if curves.ndim == 1 and curves.shape[0] == len(ARKIT_NAMES):
                curves = curves[None]
            return check_curves(curves)
        if path.suffix.lower() == ".csv":
            return _load_csv(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    raise ValueError(
        f"{path}: curves must be a .npy [frames, 52] array or a .csv with named columns"
    )


def _load_csv(path: Path) -> np.ndarray:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError("the CSV needs a header row and at least one frame")
    header = [h.strip() for h in rows[0]]
    keep = [i for i, h in enumerate(header) if h.lower() not in IGNORED_COLUMNS]
    names = [header[i] for i in keep]
    values = np.zeros((len(rows) - 1, len(keep)), np.float32)
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise ValueError(f"row {r + 2} has {len(row)} values, the header has {len(header)}")
        try:
            values[r] = [float(row[i]) for i in keep]
        except ValueError:
            raise ValueError(f"row {r + 2} has a value that is not a number") from None
    return check_curves(reorder(values, names))


def save_curves_csv(path: str | Path, curves: np.ndarray) -> None:
    """Write curves ``[F, 52]`` as a CSV with a ``frame`` column and the 52 ARKit names."""
    from .store import atomic_write

    lines = [",".join(["frame", *ARKIT_NAMES])]
    lines += [",".join([str(i), *(f"{v:.4f}" for v in row)]) for i, row in enumerate(curves)]
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode())
