"""Curves files: one loader for every ``--curves`` file, and a Live Link Face CSV writer.

Accepted files (``load_animation``):

- **Live Link Face CSV** (Epic's iOS app): ``Timecode,BlendShapeCount,`` the 52 shapes in
  PascalCase (``EyeBlinkLeft``), then ``HeadYaw,HeadPitch,HeadRoll`` and
  ``LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,RightEyePitch,RightEyeRoll``.
- **splatface's plain CSV**: a header naming ARKit shapes in any order and case, with an
  optional ``frame`` column counting up by one (the head and eye columns above are read
  there too).
- **.npy**: float ``[F, 52]`` (or ``[52]``, one frame) in the canonical ``ARKIT_NAMES`` order.

Columns are matched by name, case-insensitively; shapes missing from a CSV stay 0 and are
listed in ``Animation.missing``. Weights are clamped to [0, 1]; NaN, infinities, non-numbers,
ragged rows, unknown or repeated columns and weights far outside [0, 1] (another scale, such
as percentages) are errors naming the file, the frame and the column.

What was checked, and what was chosen (sources: Epic's ``LiveLinkFaceImporterFactory.cpp``
and ``AppleARKitFaceSupport`` in Unreal Engine, Faceit's and other public importers):

- *Timecode* ``HH:MM:SS:FF.mmm``: Epic's importer reads the last field as a fractional frame
  number (``FF`` frames plus ``.mmm`` thousandths of a frame, a sub-frame), at a rate the file
  does not state. Epic infers 60 fps when any ``FF`` exceeds 30, else 30. Here: when the
  seconds field changes within the file, the rate is the largest ``FF`` + 1, or the common
  rate (24, 25, 30, 48, 50, 60, 100, 120) up to 5 % above it (a recording that dropped the
  last frames of every second); in a take shorter than one second, Epic's rule (30, or 60
  once ``FF`` reaches 30). ``save_livelink_csv`` starts a take of ours that would not pass
  a second at the last frame label of a second, so its labels wrap and read at its rate.
  Drop-frame timecodes (``;`` before ``FF`` on every row) read as 29.97 or 59.94 fps, their
  labels counted as SMPTE counts them. A take that runs past midnight (``23:59:59`` to
  ``00:00:00``) counts on into the next day. Files without timecodes have ``fps`` None.
- *Column order*: real captures (quoted byte for byte by several importers) follow Unreal's
  ``EARFaceBlendShape`` order, which is Apple's, except ``JawRight`` before ``JawLeft`` and
  ``MouthRight`` before ``MouthLeft``; ``save_livelink_csv`` writes that order. Some captures
  spell the second column ``BlendshapeCount``; names are matched case-insensitively.
- *BlendShapeCount* is 61 (52 shapes + 9 angles) and written so; on reading it is
  bookkeeping: any count is accepted since the header names every column, and a row whose
  count is 0 (the app had no face that frame, as Faceit's importer treats it) keeps its
  place in time and repeats the nearest tracked frame before it (or the first tracked one).
- *Angle units*: Faceit's Live Link Face importer reads the angles as radians, and
  splatface does too. Not confirmed: the UE 4.2x ``AppleARKitFaceSupport`` source streamed
  degrees / 180 (-1..1), so some app versions may record that scale; angles are kept
  exactly as recorded in ``head_angles``/``eye_angles``.
- *Angle signs*: not confirmed from a recording. Unreal negates yaw and roll unless the app
  mirrors the face, so the recorded signs depend on the app's mirror setting. splatface
  reads them as right-handed rotations about the subject's own axes, the convention of
  ARKit's face anchor (x = subject's left, y = up, z = out of the face): see
  :func:`head_rotation`. ``LeftEye*`` is taken to be the subject's left eye, as ARKit's
  ``leftEyeTransform`` is.

Only numpy and the standard library: ``protocol.Client`` (and so Blender) loads these files.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .arkit import ARKIT_NAMES, NUM_SHAPES, check_curves, check_weight_range
from .files import atomic_write


def _pascal(name: str) -> str:
    return name[0].upper() + name[1:]


def _llf_shape_order() -> tuple[str, ...]:
    names = [_pascal(n) for n in ARKIT_NAMES]
    for a, b in (("JawLeft", "JawRight"), ("MouthLeft", "MouthRight")):
        i, j = names.index(a), names.index(b)
        names[i], names[j] = names[j], names[i]
    return tuple(names)


#: The 52 shapes in PascalCase in the column order Live Link Face records.
LLF_SHAPE_NAMES: tuple[str, ...] = _llf_shape_order()
HEAD_COLUMNS: tuple[str, ...] = ("HeadYaw", "HeadPitch", "HeadRoll")
#: Subject's left eye, then right eye; yaw, pitch, roll each.
EYE_COLUMNS: tuple[str, ...] = (
    "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
    "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
)  # fmt: skip
#: The full header ``save_livelink_csv`` writes.
LLF_COLUMNS: tuple[str, ...] = (
    "Timecode",
    "BlendShapeCount",
    *LLF_SHAPE_NAMES,
    *HEAD_COLUMNS,
    *EYE_COLUMNS,
)
LLF_BLENDSHAPE_COUNT = 61
COMMON_FPS: tuple[int, ...] = (24, 25, 30, 48, 50, 60, 100, 120)
DROP_TOLERANCE = 0.05  # largest FF + 1 this far below a common rate reads as that rate
#: The NTSC rates (24, 30, 48, 60, 120 × 1000/1001).
NTSC_FPS: tuple[float, ...] = tuple(r * 1000 / 1001 for r in (24, 30, 48, 60, 120))
#: How close (relative) rows' measured rate comes to a known one to be read as it.
RATE_SNAP = 0.005
MAX_HELD = 10.0  # seconds: a longer gap in a take's timecodes is no run of dropped frames
#: Bookkeeping columns read past in CSVs (any case).
IGNORED_COLUMNS: tuple[str, ...] = ("frame", "time", "timestamp")

assert len(LLF_COLUMNS) == 2 + LLF_BLENDSHAPE_COUNT
assert sorted(n.lower() for n in LLF_SHAPE_NAMES) == sorted(n.lower() for n in ARKIT_NAMES)

_SHAPE_INDEX = {n.lower(): i for i, n in enumerate(ARKIT_NAMES)}
_HEAD_INDEX = {n.lower(): i for i, n in enumerate(HEAD_COLUMNS)}
_EYE_INDEX = {n.lower(): i for i, n in enumerate(EYE_COLUMNS)}
_EYE_YAW_PITCH = {0, 1, 3, 4}


# -- angles --------------------------------------------------------------------------


def head_pivot(center: Sequence[float] | np.ndarray, radius: float) -> np.ndarray:
    """Where a take's head rotation turns the head (``Animation.head_transforms``' pivot)
    for an avatar with this bounding-sphere ``center`` and ``radius``: about the top of
    the neck, behind and below the head's centre (+Z up, the face towards -Y), metres.
    One rule, so the CLI and the Blender add-on turn a take's head alike."""
    c = np.asarray(center, np.float64).reshape(3)
    return c + np.array([0.0, 0.15 * float(radius), -0.45 * float(radius)])


def head_rotation(yaw, pitch, roll) -> np.ndarray:
    """Rotation matrices ``[..., 3, 3]`` from yaw, pitch, roll (radians, broadcast).

    In splatface's head frame (+Z up, the face looks towards -Y, the subject's left at +X),
    every angle is a right-handed rotation about the subject's own axis, applied
    yaw, then pitch, then roll (``R = Rz(yaw) @ Rx(pitch) @ R_forward(roll)``):

    - yaw about +Z (up): positive turns the face towards the subject's own left (the nose,
      at -Y, moves towards +X);
    - pitch about +X (the subject's left): positive nods the face down (nose to -Z);
    - roll about the forward axis (-Y): positive tilts the head towards the subject's
      right shoulder (the top of the head moves towards -X).

    These are the signs of right-handed rotations about ARKit's face-anchor axes
    (x = subject's left, y = up, z = out of the face), which map onto these axes with a
    proper rotation, so Euler angles taken from ARKit's face transform carry over unchanged.
    """
    yaw, pitch, roll = np.broadcast_arrays(
        np.asarray(yaw, np.float64), np.asarray(pitch, np.float64), np.asarray(roll, np.float64)
    )
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    rz = np.stack([cy, -sy, zero, sy, cy, zero, zero, zero, one], -1).reshape(*yaw.shape, 3, 3)
    rx = np.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).reshape(*yaw.shape, 3, 3)
    # about -Y by roll == about +Y by -roll
    rf = np.stack([cr, zero, -sr, zero, one, zero, sr, zero, cr], -1).reshape(*yaw.shape, 3, 3)
    return rz @ rx @ rf


# -- the animation ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Animation:
    """Curves and what else a curves file recorded.

    Attributes:
        curves: float32 ``[F, 52]`` in canonical ``ARKIT_NAMES`` order, clamped to [0, 1].
        fps: the timecodes' frame rate when the file has them (Live Link Face), else
            None. The rows may come faster: see :meth:`row_rate`.
        head_angles: float64 ``[F, 3]`` HeadYaw, HeadPitch, HeadRoll as recorded (radians,
            see the module notes), or None when the file has no head columns.
        eye_angles: float64 ``[F, 2, 3]`` (subject's left eye, right eye) x (yaw, pitch,
            roll) as recorded, or None.
        timecodes: the file's timecode per frame, or None.
        missing: ARKit names a CSV did not have (those curves are 0), so callers can warn.
    """

    curves: np.ndarray
    fps: float | None = None
    head_angles: np.ndarray | None = None
    eye_angles: np.ndarray | None = None
    timecodes: tuple[str, ...] | None = None
    missing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        curves = check_curves(self.curves)
        frames = len(curves)
        if frames == 0:
            raise ValueError("an animation needs at least one frame")
        object.__setattr__(self, "curves", curves)
        if self.fps is not None:
            fps = float(self.fps)
            if not (math.isfinite(fps) and fps > 0):
                raise ValueError(f"fps must be a positive number, got {self.fps!r}")
            object.__setattr__(self, "fps", fps)
        for name, shape in (("head_angles", (frames, 3)), ("eye_angles", (frames, 2, 3))):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value, np.float64)
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
            if not np.isfinite(value).all():
                raise ValueError(f"{name} contain NaN or infinite values")
            object.__setattr__(self, name, value)
        if self.timecodes is not None:
            timecodes = tuple(str(t) for t in self.timecodes)
            if len(timecodes) != frames:
                raise ValueError(f"{len(timecodes)} timecodes for {frames} frames")
            object.__setattr__(self, "timecodes", timecodes)
        missing = tuple(str(m) for m in self.missing)
        unknown = [m for m in missing if m not in ARKIT_NAMES]
        if unknown:
            raise ValueError(f"missing names unknown ARKit shapes: {', '.join(unknown)}")
        object.__setattr__(self, "missing", missing)

    @property
    def frames(self) -> int:
        return len(self.curves)

    def _timecode_times(self) -> np.ndarray | None:
        """:func:`_times_of` the timecodes; None without timecodes and a rate."""
        if self.timecodes is None or self.fps is None:
            return None
        return _times_of(self.timecodes, self.fps)

    def row_times(self) -> np.ndarray | None:
        """Seconds of each row after the first, from the timecodes at ``fps``: a capture
        that dropped frames has gaps here that counting rows would close. None without
        timecodes and a rate, or when they do not increase (a timecode written twice, or
        rows out of order): no time can be told for those rows."""
        return _increasing(self._timecode_times())

    def row_rate(self) -> float | None:
        """Rows per second, the rate the take plays at one frame per row: ``fps`` where
        the rows step one timecode frame, else the rows' typical step (see
        :func:`_rate_of`). None without timecodes and a rate."""
        return _rate_of(self._timecode_times(), self.fps)

    def fill_dropped(self) -> tuple[Animation, int]:
        """This take one row per frame at :meth:`row_rate`, and how many frames were
        added: a frame the capture dropped (a gap in the timecodes) repeats the row before
        it, so a take rendered one frame per row keeps its length and stays in time with
        its sound. A gap over :data:`MAX_HELD` seconds is no dropped frame (two takes in
        one file, a clock that jumped): the rows either side follow each other. Without
        gaps (or timecodes), the take itself and 0. The filled take has no timecodes; its
        ``fps`` is the row rate."""
        stamped = self._timecode_times()  # parsed once for both
        times, rate = _increasing(stamped), _rate_of(stamped, self.fps)
        if times is None or rate is None:
            return self, 0
        steps = np.diff(np.rint(times * rate).astype(np.int64), prepend=0)
        steps[steps > max(1, round(MAX_HELD * rate))] = 1
        frame = np.cumsum(steps)
        if frame[-1] <= self.frames - 1:
            return self, 0
        row = np.searchsorted(frame, np.arange(frame[-1] + 1), "right") - 1
        filled = Animation(
            curves=self.curves[row],
            fps=rate,
            head_angles=None if self.head_angles is None else self.head_angles[row],
            eye_angles=None if self.eye_angles is None else self.eye_angles[row],
            missing=self.missing,
        )
        return filled, len(row) - self.frames

    def head_transforms(self, pivot: Sequence[float] | np.ndarray) -> np.ndarray:
        """Head-to-world transforms ``[F, 4, 4]``: the recorded head rotation about ``pivot``.

        ``pivot`` (``[3]``, metres, in the head frame; the neck, say) stays where it is.
        Angles as in :func:`head_rotation`; identity for every frame without head angles.
        """
        pivot = np.asarray(pivot, np.float64).reshape(3)
        out = np.tile(np.eye(4), (self.frames, 1, 1))
        if self.head_angles is None:
            return out
        rot = head_rotation(*self.head_angles.T)
        out[:, :3, :3] = rot
        out[:, :3, 3] = pivot - rot @ pivot
        return out


# -- timecodes -------------------------------------------------------------------------

_TIMECODE = re.compile(r"^\s*(\d{1,3}):(\d{1,2}):(\d{1,2})[:;](\d{1,3})(\.\d+)?\s*$")


def parse_timecode(text: str) -> tuple[int, int, int, float]:
    """``HH:MM:SS:FF.mmm`` → (hours, minutes, seconds, frame), frame with its sub-frame
    fraction (``FF.mmm`` is frame ``FF`` plus ``.mmm`` of a frame). ``.mmm`` is optional."""
    m = _TIMECODE.match(str(text))
    if not m:
        raise ValueError(f"timecode {text!r} is not HH:MM:SS:FF.mmm")
    hours, mins, secs, frame, sub = m.groups()  # unpacked, not looped: it runs once a row
    minutes, seconds = int(mins), int(secs)
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"timecode {text!r} has minutes or seconds over 59")
    return int(hours), minutes, seconds, int(frame) + (float("0" + sub) if sub else 0.0)


def timecode_seconds(text: str, fps: float) -> float:
    """Seconds since midnight of a timecode at ``fps`` frames per second. A drop-frame
    timecode (``;`` before the frame, at 29.97 or 59.94 fps) counts its labels as SMPTE
    does: frame numbers 0 and 1 (0-3 at 59.94) are skipped at each minute but every tenth,
    so the labels keep pace with the clock."""
    hours, minutes, seconds, frame = parse_timecode(text)
    nominal = _drop_frame_nominal(fps) if ";" in text else None
    if nominal is None:
        return hours * 3600 + minutes * 60 + seconds + frame / fps
    total_minutes = 60 * hours + minutes
    skipped = nominal // 15 * (total_minutes - total_minutes // 10)
    return ((3600 * hours + 60 * minutes + seconds) * nominal + frame - skipped) / fps


def _drop_frame_nominal(fps: float) -> int | None:
    """30 or 60 where ``fps`` is 29.97 or 59.94, the rates drop-frame timecode counts."""
    return next((n for n in (30, 60) if abs(fps - n * 1000 / 1001) < 0.005), None)


def format_timecode(seconds: float, fps: float) -> str:
    """Seconds → ``HH:MM:SS:FF.mmm`` at ``fps`` (``.mmm``: thousandths of a frame)."""
    if not (math.isfinite(seconds) and seconds >= 0 and fps > 0):
        raise ValueError(f"cannot format {seconds!r} s at {fps!r} fps as a timecode")
    whole = math.floor(seconds)
    thousandths = round((seconds - whole) * fps * 1000)
    if thousandths >= round(fps * 1000):  # rounding reached the next second
        whole, thousandths = whole + 1, 0
    frame, sub = divmod(thousandths, 1000)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}:{frame:02d}.{sub:03d}"


def infer_fps(timecodes: Sequence[str]) -> float | None:
    """Frame rate of Live Link Face timecodes (see the module notes), or None."""
    return _fps_of([parse_timecode(t) for t in timecodes], _drop_frame(timecodes))


def timecodes_rate(timecodes: Sequence[str]) -> float | None:
    """The rate rows with these timecodes play at (:meth:`Animation.row_rate` of a take
    that has them), or None without any."""
    fps = infer_fps(timecodes)
    return None if fps is None else _rate_of(_times_of(timecodes, fps), fps)


def _times_of(timecodes: Sequence[str], fps: float) -> np.ndarray:
    """Seconds of each row after the first as its timecode at ``fps`` says, a take that
    runs past midnight counted on into the next day."""
    t = np.array([timecode_seconds(tc, fps) for tc in timecodes])
    # a drop-frame day of labels is a little short of 24 h: its midnight is its own
    day = timecode_seconds("24:00:00;00" if _drop_frame(timecodes) else "24:00:00:00", fps)
    t += day * np.cumsum(np.diff(t, prepend=t[0]) < -day / 2)  # 23:59:59 → 00:00:00
    return t - t[0]


def _increasing(times: np.ndarray | None) -> np.ndarray | None:
    """``times`` where each row comes after the one before, else None."""
    if times is None or (len(times) > 1 and not np.all(np.diff(times) > 0)):
        return None
    return times


def _rate_of(times: np.ndarray | None, fps: float | None) -> float | None:
    """Rows per second of rows at ``times`` (seconds; None: ``fps``): the rows' typical
    step (a 60 fps capture stamped with a 30 fps timecode steps half a frame, ``FF.000``,
    ``FF.500``; 29.97 on a 30 fps clock steps ``1.001`` frames), taken to ``fps`` or the
    nearest common or NTSC rate within :data:`RATE_SNAP` (else rounded to a millionth of
    a frame a second). A timecode written twice does not count as a step; without any
    step, ``fps``."""
    steps = np.array([]) if times is None else np.diff(times)
    steps = steps[steps > 0]
    if not len(steps):
        return fps
    rate = 1.0 / float(np.median(steps))
    rates = (fps, *COMMON_FPS, *NTSC_FPS)  # times come with a rate
    near = min(rates, key=lambda r: abs(rate - r))
    return float(near) if abs(rate - near) <= RATE_SNAP * near else round(rate, 6)


def _drop_frame(timecodes: Sequence[str]) -> bool:
    """Whether every timecode is drop-frame (``;`` before its frame number)."""
    return bool(timecodes) and all(";" in t for t in timecodes)


def _fps_of(parsed: list[tuple[int, int, int, float]], drop_frame: bool = False) -> float | None:
    """:func:`infer_fps` of timecodes already parsed; ``drop_frame`` timecodes at 30 or
    60 read as 29.97 or 59.94."""
    if not parsed:
        return None
    top = max(int(p[3]) for p in parsed)
    if len({p[:3] for p in parsed}) > 1:  # FF wrapped at least once
        # a common rate up to DROP_TOLERANCE above, where the seconds' last frames were
        # dropped; else the rate the frames show (our own files at 15 fps, say)
        rate = next((r for r in COMMON_FPS if top < r <= (top + 1) * (1 + DROP_TOLERANCE)), None)
        rate = float(rate or top + 1)
    else:
        rate = next((float(r) for r in (30, 60) if r > top), None)
    if drop_frame and rate in (30.0, 60.0):
        return rate * 1000 / 1001
    return rate


# -- loading ---------------------------------------------------------------------------


def load_animation(path: str | os.PathLike) -> Animation:
    """Read a curves file: ``.csv`` (Live Link Face or splatface's) or ``.npy``.

    Raises ``ValueError`` naming the file and what is wrong with it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npy"):
        raise ValueError(
            f"{path}: curves must be a .csv (Live Link Face, or a header of ARKit names) "
            "or a .npy [frames, 52] array"
        )
    try:
        return _load_npy(path) if suffix == ".npy" else _load_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _load_npy(path: Path) -> Animation:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):  # a .npy, or a .npz (below)
        raise ValueError(
            "not a .npy array (it has no NumPy header): save curves with numpy.save, "
            "or name a CSV .csv"
        )
    try:
        curves = np.load(path, allow_pickle=False)
    except (EOFError, ValueError) as exc:
        raise ValueError(f"not a .npy array ({exc})") from None
    if not isinstance(curves, np.ndarray):
        curves.close()
        raise ValueError("a .npz archive, not a .npy array: save one array with numpy.save")
    if curves.ndim == 1 and curves.shape[0] == NUM_SHAPES:
        curves = curves[None]
    if curves.ndim != 2 or curves.shape[1] != NUM_SHAPES:
        raise ValueError(
            f"wrong curve count: an array of shape {list(curves.shape)}; a .npy must be "
            f"[frames, {NUM_SHAPES}] in the canonical order of protocol.ARKIT_NAMES "
            "(to give curves by name, use a CSV with a header)"
        )
    if curves.dtype == bool or not np.issubdtype(curves.dtype, np.number):
        raise ValueError(f"curves must be numbers, got dtype {curves.dtype}")
    if np.iscomplexobj(curves):
        raise ValueError("curves must be real numbers, got complex values")
    if len(curves) == 0:
        raise ValueError("the array has no frames")
    curves = curves.astype(np.float64)
    bad = ~np.isfinite(curves)
    if bad.any():
        frame, shape = np.argwhere(bad)[0]
        raise ValueError(
            f"{_describe(curves[frame, shape])} weight at frame {frame}, shape {ARKIT_NAMES[shape]}"
        )
    check_weight_range(curves)
    return Animation(curves=curves)


def _describe(value: float) -> str:
    return "NaN" if math.isnan(value) else "infinite"


def _read_lines(path: Path) -> tuple[list[str], bool]:
    """The file's lines, and whether its text is plain: ASCII without quotes or
    underscores, where csv.reader, ``float()`` and numpy's parser read every cell alike
    (see :func:`_plain_table`)."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(
            "the file is UTF-16 text (Excel's Unicode Text): save it as CSV UTF-8 (comma delimited)"
        )
    text = data.decode("utf-8-sig")
    del data  # 60 MB for an hour's take: not held with the text and its lines
    return text.splitlines(), text.isascii() and '"' not in text and "_" not in text


def _delimiter(lines: list[str]) -> str:
    """``,``, else ``;`` or a tab where the header (the first line not blank) has one."""
    first = next((line for line in lines if line.strip()), "")  # the header
    if "," in first:
        return ","
    return next((d for d in (";", "\t") if d in first), ",")


def _read_rows(lines: list[str], delimiter: str) -> list[list[str]]:
    return [[c.strip() for c in row] for row in csv.reader(lines, delimiter=delimiter)]


def _valid_columns() -> str:
    return (
        f"the 52 ARKit shapes in any case ({', '.join(ARKIT_NAMES)}); "
        f"Timecode, BlendShapeCount, {', '.join(HEAD_COLUMNS)}, {', '.join(EYE_COLUMNS)}; "
        f"{', '.join(IGNORED_COLUMNS)}"
    )


class _Columns(NamedTuple):
    """What a CSV's header says each column holds (indices into a row)."""

    header: list[str]
    shape_cols: list[tuple[int, int]]  # (column, ARKit index)
    head_cols: dict[int, int]  # HEAD_COLUMNS index -> column
    eye_cols: dict[int, int]  # EYE_COLUMNS index -> column
    numeric: list[int]  # the shape, head and eye columns, in file order
    frame_col: int | None
    tc_col: int | None
    count_col: int | None


class _Table(NamedTuple):
    """A CSV's frames as read, before untracked rows are filled and the columns placed:
    what both readers (row by row, and :func:`_plain_table`) hand to :func:`_animation`."""

    columns: _Columns
    values: np.ndarray  # float64 [rows, len(columns.numeric)], all finite
    untracked: np.ndarray  # bool [rows]: BlendShapeCount 0
    timecodes: list[str]
    parsed: list[tuple[int, int, int, float]]  # the timecodes parsed
    lines: Sequence[int]  # each row's line number, as an editor shows it


def _columns(header: list[str], header_line: int) -> _Columns:
    """Classify the header's columns by name (a trailing empty name, a trailing comma,
    dropped), refusing numbers, repeated or unknown names and partial angle sets."""
    header = list(header)
    while header and header[-1] == "":  # a trailing comma
        header.pop()

    if header and all(_is_number(n) for n in header):
        raise ValueError(
            f"line {header_line} is numbers, not a header: the first row must name the "
            "columns (a CSV of bare numbers is ambiguous; use a .npy for arrays in "
            "canonical order)"
        )

    kinds: list[tuple] = []
    seen: dict[str, str] = {}
    unknown: list[str] = []
    for col, name in enumerate(header):
        key = name.lower()
        if key in seen:
            raise ValueError(f"column {name!r} appears twice (columns {seen[key]} and {col + 1})")
        seen[key] = str(col + 1)
        if key == "timecode":
            kinds.append(("timecode",))
        elif key == "blendshapecount":
            kinds.append(("count",))
        elif key in _SHAPE_INDEX:
            kinds.append(("shape", _SHAPE_INDEX[key]))
        elif key in _HEAD_INDEX:
            kinds.append(("head", _HEAD_INDEX[key]))
        elif key in _EYE_INDEX:
            kinds.append(("eye", _EYE_INDEX[key]))
        elif key == "frame":
            kinds.append(("frame",))
        elif key in IGNORED_COLUMNS:
            kinds.append(("ignore",))
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"unknown column(s) {', '.join(repr(u) for u in unknown)}; valid columns: "
            f"{_valid_columns()}"
        )
    shape_cols = [(c, k[1]) for c, k in enumerate(kinds) if k[0] == "shape"]
    if not shape_cols:
        raise ValueError(f"no ARKit shape columns in the header; valid columns: {_valid_columns()}")
    head_cols = {k[1]: c for c, k in enumerate(kinds) if k[0] == "head"}
    eye_cols = {k[1]: c for c, k in enumerate(kinds) if k[0] == "eye"}
    if head_cols and len(head_cols) != 3:
        have = [HEAD_COLUMNS[i] for i in sorted(head_cols)]
        lack = [n for i, n in enumerate(HEAD_COLUMNS) if i not in head_cols]
        raise ValueError(
            f"head angles need all of {', '.join(HEAD_COLUMNS)}: the file has "
            f"{', '.join(have)} but not {', '.join(lack)}"
        )
    if eye_cols and len(eye_cols) != 6 and set(eye_cols) != _EYE_YAW_PITCH:
        have = [EYE_COLUMNS[i] for i in sorted(eye_cols)]
        raise ValueError(
            f"eye angles need {', '.join(EYE_COLUMNS)} (the Roll columns may be left out): "
            f"the file has only {', '.join(have)}"
        )
    return _Columns(
        header=header,
        shape_cols=shape_cols,
        head_cols=head_cols,
        eye_cols=eye_cols,
        numeric=[c for c, k in enumerate(kinds) if k[0] in ("shape", "head", "eye")],
        frame_col=next((c for c, k in enumerate(kinds) if k[0] == "frame"), None),
        tc_col=next((c for c, k in enumerate(kinds) if k[0] == "timecode"), None),
        count_col=next((c for c, k in enumerate(kinds) if k[0] == "count"), None),
    )


def _load_csv(path: Path) -> Animation:
    return _animation(_read_table(path))  # the file's lines let go of first


def _read_table(path: Path) -> _Table:
    """The file's rows: by :func:`_plain_table` where it can, else row by row."""
    lines, plain = _read_lines(path)
    delimiter = _delimiter(lines)
    table = _plain_table(lines, delimiter) if plain else None
    return _row_table(_read_rows(lines, delimiter)) if table is None else table


def _row_table(rows: list[list[str]]) -> _Table:
    """Read a CSV row by row: any file, and the reader that names what is wrong with one."""
    # line numbers as an editor shows them; blank (or all-space) lines skipped, and rows of
    # empty cells before the header and after the last frame. A row of empty cells between
    # frames is a frame with no values: an error, not a row to drop, which would shift
    # every later frame's time.
    numbered = [(n, row) for n, row in enumerate(rows, 1) if any(row) or len(row) > 1]
    while numbered and not any(numbered[0][1]):
        numbered.pop(0)
    while numbered and not any(numbered[-1][1]):
        numbered.pop()
    if not numbered:
        raise ValueError("the file is empty; it needs a header row and one row per frame")
    header_line, header = numbered[0]
    body = numbered[1:]
    cols = _columns(header, header_line)
    header, numeric, frame_col = cols.header, cols.numeric, cols.frame_col
    tc_col, count_col = cols.tc_col, cols.count_col
    if not body:
        raise ValueError("the file has a header but no frames")

    # rows: right length, numbers where numbers belong
    width = len(header)
    timecodes: list[str] = []
    parsed: list[tuple[int, int, int, float]] = []
    untracked: list[bool] = []
    cells: list[list[str]] = []
    frame_cells: list[tuple[int, str | None]] = []
    for line, row in body:
        while len(row) > width and row[-1] == "":
            row.pop()
        count = None
        if count_col is not None and count_col < len(row):
            count = _number(row[count_col], line, header[count_col])
            if not math.isfinite(count) or count < 0 or count != int(count):
                raise ValueError(
                    f"line {line}: BlendShapeCount {row[count_col]!r} is not a count of shapes"
                )
        # an untracked row may stop after its count and timecode, or leave the rest empty
        empty = (
            count == 0
            and len(row) <= width
            and (tc_col is None or tc_col < len(row))
            and not any(row[max(count_col, tc_col or 0) + 1 :])
        )
        if len(row) != width and not empty:
            raise ValueError(f"line {line} has {len(row)} values, the header has {width} columns")
        untracked.append(count == 0)
        if tc_col is not None:
            parsed.append(_parse_timecode_at(row[tc_col], line))
            timecodes.append(row[tc_col])
        cells.append(["0"] * len(numeric) if empty else [row[c] for c in numeric])
        if frame_col is not None:  # an untracked row may leave its frame out
            cell = row[frame_col] if frame_col < len(row) else ""
            frame_cells.append((line, None if empty and not cell.strip() else cell))
    if frame_col is not None:
        _check_frame_numbers(frame_cells, header[frame_col])
    try:
        if any("_" in "".join(cell_row) for cell_row in cells):
            raise ValueError  # numpy, as float(), reads "0_5" as 5
        values = np.array(cells, dtype=np.float64).reshape(len(cells), len(numeric))
    except ValueError:
        for (line, _), cell_row in zip(body, cells, strict=True):
            for c, cell in zip(numeric, cell_row, strict=True):
                _number(cell, line, header[c])
        raise
    bad = ~np.isfinite(values)
    if bad.any():
        frame, j = np.argwhere(bad)[0]
        raise ValueError(
            f"{_describe(values[frame, j])} value for {header[numeric[j]]} at frame {frame} "
            f"(line {body[frame][0]})"
        )
    return _Table(cols, values, np.array(untracked, bool), timecodes, parsed, [n for n, _ in body])


def _plain_table(lines: list[str], delimiter: str) -> _Table | None:
    """Read a CSV of plain rows with one call to numpy's parser: an hour's take (108,000
    rows) in a fraction of the time and memory of csv.reader's lists of cells. None for
    anything the row-by-row reader (:func:`_row_table`) might read otherwise, for it to
    read and name what is wrong: blank lines or empty cells between frames, rows too
    short or too long, cells that are not finite numbers, counts or frame numbers it
    refuses, bad timecodes. The text must be plain (:func:`_read_lines`): without quotes,
    a line's cells are the line split at the delimiter; in ASCII, the spaces
    ``str.strip`` takes off a number, numpy skips too."""

    def blank(line: str) -> bool:  # csv.reader finds no cell that is not all spaces
        return not any(c.strip() for c in line.split(delimiter))

    start = next((i for i, line in enumerate(lines) if not blank(line)), None)
    if start is None or max(map(len, lines)) > csv.field_size_limit():
        return None
    end = len(lines)
    while blank(lines[end - 1]):
        end -= 1
    body = lines[start + 1 : end]
    try:
        cols = _columns([c.strip() for c in lines[start].split(delimiter)], start + 1)
    except ValueError:
        return None
    if not body:
        return None

    # every row as wide as the header, past it only empty cells (a trailing comma)
    width = len(cols.header)
    fields = np.fromiter((line.count(delimiter) for line in body), np.int64, len(body)) + 1
    if (fields < width).any():
        return None
    for i in np.flatnonzero(fields > width):
        if any(c.strip() for c in body[i].rsplit(delimiter, fields[i] - width)[1:]):
            return None

    extra = [c for c in (cols.count_col, cols.frame_col) if c is not None]
    try:
        table = np.loadtxt(
            body, np.float64, comments=None, delimiter=delimiter,
            usecols=cols.numeric + extra, ndmin=2,
        )  # fmt: skip
    except ValueError:
        return None
    if len(table) != len(body) or not np.isfinite(table).all():  # it skips empty lines
        return None
    values, table = table[:, : len(cols.numeric)], table[:, len(cols.numeric) :]
    untracked = np.zeros(len(body), bool)
    if cols.count_col is not None:
        counts, table = table[:, 0], table[:, 1:]
        if (counts < 0).any() or (counts != np.floor(counts)).any():
            return None
        untracked = counts == 0
    if cols.frame_col is not None:
        frames = table[:, 0]
        if (frames != np.floor(frames)).any() or (frames[1:] != frames[:-1] + 1).any():
            return None
    timecodes: list[str] = []
    parsed: list[tuple[int, int, int, float]] = []
    if cols.tc_col is not None:
        col = cols.tc_col
        timecodes = [line.split(delimiter, col + 1)[col].strip() for line in body]
        try:
            parsed = [parse_timecode(t) for t in timecodes]
        except ValueError:
            return None
    return _Table(cols, values, untracked, timecodes, parsed, range(start + 2, end + 1))


def _animation(table: _Table) -> Animation:
    """The animation of a CSV's rows: untracked rows filled, columns placed by name."""
    cols, values, untracked, lines = table.columns, table.values, table.untracked, table.lines
    if untracked.all():
        raise ValueError("no frame has tracking data (BlendShapeCount is 0 on every row)")
    if untracked.any():
        # hold the nearest tracked frame before (or the first tracked one) so timing stays
        tracked = np.flatnonzero(~untracked)
        before = np.searchsorted(tracked, np.arange(len(values)), "right") - 1
        values = values[tracked[np.maximum(before, 0)]]

    col_of = {c: j for j, c in enumerate(cols.numeric)}
    frames = len(values)
    curves = np.zeros((frames, NUM_SHAPES), np.float64)
    for c, idx in cols.shape_cols:
        curves[:, idx] = values[:, col_of[c]]
    check_weight_range(curves, lambda f: f"frame {f} (line {lines[f]})")
    head = None
    if cols.head_cols:
        head = np.stack([values[:, col_of[cols.head_cols[i]]] for i in range(3)], axis=1)
    eyes = None
    if cols.eye_cols:
        eyes = np.zeros((frames, 6))
        for i, c in cols.eye_cols.items():
            eyes[:, i] = values[:, col_of[c]]
        eyes = eyes.reshape(frames, 2, 3)
    present = {idx for _, idx in cols.shape_cols}
    return Animation(
        curves=curves,
        fps=_fps_of(table.parsed, _drop_frame(table.timecodes)),
        head_angles=head,
        eye_angles=eyes,
        timecodes=tuple(table.timecodes) if table.timecodes else None,
        missing=tuple(n for i, n in enumerate(ARKIT_NAMES) if i not in present),
    )


def _check_frame_numbers(cells: list[tuple[int, str | None]], column: str) -> None:
    """A ``frame`` column must count up by one: rows play one per frame, in file order,
    so frames given out of order, twice or with gaps (keys on tens, say) would not play
    where their numbers say. A cell None (an untracked row without it) counts as the
    next frame."""
    before = None
    for line, cell in cells:
        if cell is None:
            before = None if before is None else before + 1
            continue
        frame = _number(cell, line, column)
        if not math.isfinite(frame) or frame != int(frame):
            raise ValueError(f"line {line}: {column} {cell!r} is not a whole frame number")
        if before is not None and frame != before + 1:
            raise ValueError(
                f"line {line}: {column} {frame:g} follows {before:g}; rows play one per frame "
                f"in file order, so the {column} column must count up by one (give every "
                "frame its row, or leave the column out)"
            )
        before = frame


def _parse_timecode_at(text: str, line: int) -> tuple[int, int, int, float]:
    try:
        return parse_timecode(text)
    except ValueError as exc:
        raise ValueError(f"line {line}: {exc}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, line: int, column: str) -> float:
    try:
        if "_" in text:  # float() reads "0_5" as 5
            raise ValueError
        return float(text)
    except ValueError:
        what = "is empty" if text == "" else f"{text!r} is not a number"
        raise ValueError(f"line {line}, column {column}: {what}") from None


# -- writing ---------------------------------------------------------------------------


def save_livelink_csv(
    path: str | os.PathLike, animation: Animation | np.ndarray, fps: float | None = None
) -> tuple[str, ...]:
    """Write a Live Link Face CSV (``LLF_COLUMNS``, BlendShapeCount 61), atomically;
    returns the timecodes written (:func:`infer_fps` of them is the clock readers take,
    :meth:`Animation.row_rate` the rate the rows play at).

    ``animation`` may be an :class:`Animation` or curves ``[F, 52]``. Timecodes are the
    animation's own, or generated from 00:00:00:00.000 at ``fps`` (else the animation's
    fps, else 30) when it has none or ``fps`` is given, on the whole-number clock at or
    above it (29.97 on a 30 clock, stepping ``1.001`` frames). A generated take of two
    rows or more that would not pass a second starts at the clock's last frame label of
    a second instead (00:00:00:23.000 at 24 fps): the format states no rate, readers
    infer it from where the labels wrap, and a take that never wraps read as 30 fps.
    Missing head or eye angles are written as 0. Weights and angles with 6 decimals.
    """
    if not isinstance(animation, Animation):
        animation = Animation(curves=animation)
    frames = animation.frames
    if fps is None and animation.timecodes is not None:
        timecodes = animation.timecodes
    else:
        # on a whole-number clock, as the app's: 29.97 steps 1.001 frames of a 30 clock,
        # and reads back at 29.97 (frames counted at 29.97 would read as a 30 fps take
        # with a frame dropped every 33 s)
        rate = float(fps or animation.fps or 30.0)
        clock = math.ceil(rate - 1e-9)
        timecodes = tuple(format_timecode(i / rate, clock) for i in range(frames))
        if frames > 1 and timecodes[0][:8] == timecodes[-1][:8]:
            # no wrap to read the rate from: start on the clock's last label, and the
            # second row (1 / rate ≥ 1 / clock later) wraps into the next second
            start = (clock - 1) / clock
            timecodes = tuple(format_timecode(start + i / rate, clock) for i in range(frames))
    order = [_SHAPE_INDEX[n.lower()] for n in LLF_SHAPE_NAMES]
    head = animation.head_angles if animation.head_angles is not None else np.zeros((frames, 3))
    eyes = animation.eye_angles if animation.eye_angles is not None else np.zeros((frames, 2, 3))
    values = np.concatenate(
        [animation.curves[:, order].astype(np.float64), head, eyes.reshape(frames, 6)], axis=1
    )
    lines = [",".join(LLF_COLUMNS)]
    for tc, row in zip(timecodes, values, strict=True):
        lines.append(f"{tc},{LLF_BLENDSHAPE_COUNT}," + ",".join(f"{v:.6f}" for v in row))
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))
    return tuple(timecodes)
