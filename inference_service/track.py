"""``splatface track``: a video (or a folder of frames) → ARKit-52 curves and head pose.

Per frame, MediaPipe finds the face's 478 landmarks (the first frame, and any after a
gap, by detection; the others in a box around the previous frame's landmarks, so one
person is followed). The subject's ICT identity and the camera's focal length are fitted
once, jointly over a few frames spread across the first seconds (:func:`fit_subject`, with
the builder's priors). Each frame then solves only the 51 expression weights, bounded to
[0, 1], and the head's rotation and translation, identity fixed: a bounded
Levenberg-Marquardt least-squares fit with an analytic Jacobian (:class:`FrameSolver`),
warm-started from the frame before. Residuals are weighted as in the builder's fit, under
a Huber loss so that a landmark MediaPipe misplaces pulls only linearly.

- **Mouth and jaw**: their shapes overlap (``jawOpen`` with ``mouthLowerDown*``,
  ``mouthStretch*``, ``jawForward``, ``mouthFunnel``...), and a quadratic prior shares a
  movement out among all that overlap: with 1 % of the eye distance of landmark noise, a
  jaw-only frame read as the jaw plus 0.7-1.0 of weight over six other mouth shapes. An
  L1 term on the ``jaw*`` and ``mouth*`` shapes (``MOUTH_SPARSITY``) lets the few that
  explain a movement carry it, at the cost of shrinking them a little (smiles read ~0.04
  lower from exact landmarks). Lids, brows and gaze move landmarks too little for one: an
  L1 that helps the mouth zeroes blinks.

- **Gaze**: ICT's ``eyeLook*`` shapes only move the lids; splatface's posing turns the
  eyeballs by ``GAZE_YAW``/``GAZE_PITCH`` per unit weight. The fit models exactly that:
  MediaPipe's two iris centres are points ``IRIS_DEPTH`` of the way from each eyeball's
  centre to its front (the pupils), turned by the ``eyeLook*`` weights, so gaze is
  solved together with the lids, and weighted (``IRIS_WEIGHT``) so that the irises
  decide it. A weak prior (``GAZE_COUPLING``) keeps the two eyes turning together.
  Under a closed lid MediaPipe still places an iris, a guess: as an eye shuts
  (``EYE_SHUT``, from MediaPipe's lids) its iris counts for less and its gaze holds where
  it was (``GAZE_HOLD``). The lids' part of ``eyeLook*`` is left out of the fit
  (``GAZE_LIDS``): MediaPipe's lids close in a blink the way ICT's follow a downward look,
  and with it in, closing lids read as looking down.
- **Left at 0**: ``tongueOut`` (MediaPipe has no tongue landmarks). ``cheekPuff`` is
  solved, but expect it weak: a puff mostly moves the cheeks' silhouette, and MediaPipe's
  points are on the face.
- **Smoothing**: a centred Gaussian over time (``smooth`` seconds, 0 disables) within each
  run of tracked frames, so a gap's edges do not leak.
- **Neutral calibration** (``neutral=``, ``--neutral A-B``): frames in which the face is
  at rest fit the subject and calibrate the rig, so they read 0 (:func:`calibrate_neutral`).
  The landmarks wait in memory until the range has passed.
- **Gaps** (no face found): the frame holds the last tracked pose (before the first face,
  the first one found); :attr:`TrackResult.gaps` lists them as inclusive frame ranges.
- **Head angles**: the fitted head-to-camera rotation relative to a frontal camera (one
  on -Y looking at the face, upright), as :func:`protocol.animation.head_rotation` defines
  them, so ``Animation.head_transforms(pivot)`` rendered through a frontal camera turns the
  head as the video did. The pivot only moves where the head sits in the frame: head
  translation is not a Live Link Face column (it is in :attr:`TrackResult.world_to_camera`).
  A head far off the image centre is seen a little from the side, and that reads as yaw
  or pitch. The focal length is weakly determined by landmarks (it trades with distance);
  a wrong one scales yaw and pitch by a few per cent.
- **Eye angles**: per eye, yaw and pitch of the solved gaze in the head angles' convention
  (yaw towards the subject's left, pitch down), roll 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from protocol.animation import Animation, save_livelink_csv, timecodes_rate
from protocol.arkit import ARKIT_NAMES, index_of
from protocol.camera import orbit
from protocol.errors import ProtocolError

from .geometry import smoothstep
from .headmodel import eye_distance, load_correspondence, load_head_model
from .posing import GAZE_PITCH, GAZE_YAW, eye_lift, eye_turn
from .torch_threads import one_torch_thread

#: ``progress(frames_done, frames_total)``; the total is an estimate for some videos.
TrackProgress = Callable[[int, int], None]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MESH_CROP_SIDES = 2.2  # ``detect.face_landmarks`` crops this many face-box sides
DEFAULT_FPS = 30.0
#: Seconds: the Gaussian's sigma over time. About one frame at 30 fps: it takes out
#: landmark jitter and keeps blinks.
DEFAULT_SMOOTH = 0.03
#: Shapes the fit leaves at 0 (MediaPipe has no landmarks on the tongue).
UNSOLVED = ("tongueOut",)

IRIS = tuple(range(468, 478))  # MediaPipe's iris landmarks; the rest are face surface
IRIS_CENTER = (473, 468)  # subject's left eye, right eye
#: Per eye, as IRIS_CENTER: MediaPipe's upper and lower lid at the middle, then the corners.
LIDS = ((386, 374, 362, 263), (159, 145, 33, 133))
#: After a gap, in a video that has shown more than one face: how far (in sides of the
#: followed face's box) from where it was last seen a face may be and still be taken
#: for it. People move little while a detection fails; another person sits further off.
REFIND_REACH = 1.5
IDENTITY_FRAMES = 5  # frames fitted for the identity, spread over the first window
IDENTITY_WINDOW = 2.0  # seconds of video the identity frames come from
IDENTITY_ROUNDS = 8  # alternations of the identity fit
ROUND_ITERATIONS = 8  # per frame and alternation
IDENTITY_COMPONENTS = 50  # as the builder's fit
IDENTITY_PRIOR = 2e-5  # per squared coefficient, as the builder's fit
FOCAL_PRIOR = 2e-3  # per squared log-ratio to the assumed focal length, as the builder's fit
EXPRESSION_PRIOR = 1e-5  # per squared weight, against the iod-normalised landmark error
MOUTH_SPARSITY = 3e-5  # per unit of weight of a ``jaw*`` or ``mouth*`` shape (L1; weights >= 0)
#: MediaPipe's iris centre is the pupil seen through the cornea, and it turns with the
#: eye on a smaller radius than the cornea's apex (the eyeball's front point): in the
#: schematic human eye the entrance pupil lies ~3 mm behind the apex and the centre of
#: rotation ~13.5 mm, about 0.77 of the way. Modelled at the apex, the fit read gaze
#: short and head yaw as counter-gaze (at 10 degrees of yaw, 0.15-0.2 of ``eyeLook*``).
IRIS_DEPTH = 0.75
#: An iris centre against one landmark of correspondence weight 1. The ``eyeLook*``
#: shapes also move the lids, by a fraction of a millimetre, about MediaPipe's jitter on
#: them: at weight 2 the lids' misfit under head yaw swung gaze by up to half its range.
IRIS_WEIGHT = 32.0
#: The lids' opening (upper to lower lid over corner to corner, MediaPipe's) below which an
#: eye's iris centre counts for nothing, and above which it counts fully. Under a closed
#: lid MediaPipe still places an iris, and on renders of a blink at 0.7 or more it put the
#: astronaut's left one 0.07 of the eye distance across (against gaze) and lower: read as
#: gaze, a blink rolled the eye. Her open eyes measure 0.36-0.42, a blink of 0.5 0.20 (its
#: iris still right), 0.6 and more 0.06-0.07. Kept low, for narrow and squinting eyes
#: (and ICT's own closed lids, at the correspondence's points, measure 0.13).
EYE_SHUT = (0.07, 0.11)
#: Per squared unit of ``eyeLook*`` weight, how firmly a shut eye's gaze stays where it
#: was the frame before (scaled by how shut it is): far above the priors, which would
#: otherwise pull it to 0 over a blink.
GAZE_HOLD = 1e-2
#: Per squared radian the two eyes' yaw or pitch differ: eyes turn together (vergence at
#: filming distances is a few degrees). Kept weak: a half-closed eye's misread iris must
#: not drag the open one (at 4e-4, eyeLookInRight on the round trip fell 0.95 to 0.90).
GAZE_COUPLING = 1e-4
#: The share of ICT's ``eyeLook*`` lid deltas the fit keeps. With all of it, a blink on the
#: round trip's second clip read as eyeLookDown 0.4-0.6 and eyeBlink at a third of its
#: weight; the irises carry gaze on their own.
GAZE_LIDS = 0.0
#: Eye distances: a landmark further than this from the model counts linearly (Huber).
ROBUST_SCALE = 0.05
MAX_ITERATIONS = 30  # per frame; a warm start converges in a few
#: Rounds of the neutral calibration (pose fit with the weights held at 0, then the rest
#: offsets from the misfit). More change little: 8 instead of 3 took the weight left on the
#: synthetic test's worst rest frame from 0.14 to 0.12.
NEUTRAL_ROUNDS = 3
#: At most this many of the neutral frames calibrate (spread over the range): each costs a
#: pose fit per round, a few milliseconds.
NEUTRAL_FRAMES = 60
#: Against the offsets' normal equations' mean eigenvalue: keeps the depth of an offset,
#: which neutral frames seen from near the front barely tell, near 0. At 0.01 the depths
#: came out, and cost the round trip's gaze (astronaut, five clips: eyeLookOutRight 0.93
#: plain, 0.88 calibrated; 0.92 at 0.1), the weight left at rest 0.55 against 0.62.
NEUTRAL_RIDGE = 0.1


class TrackError(ValueError):
    """The input cannot be tracked: unreadable, empty, or no face in any frame."""


# -- reading frames ----------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSource:
    """Frames of a video or a folder. ``total`` is the count the container or the folder
    states (a video's may be off by a frame or two)."""

    name: str
    fps: float
    total: int
    frames: Iterator[np.ndarray]


def _natural_key(path: Path) -> list:
    """``frame2.png`` before ``frame10.png``: runs of digits compare as numbers."""
    return [int(p) if i % 2 else p.lower() for i, p in enumerate(re.split(r"(\d+)", path.name))]


def open_frames(source: str | Path, fps: float | None = None) -> FrameSource:
    """A video file (rate from its metadata unless ``fps`` is given) or a folder of
    images (sorted by name, numbers in names compared as numbers; ``fps``, else a render
    folder's preview's rate, else 30)."""
    path = Path(source)
    if fps is not None and not (np.isfinite(fps) and fps > 0):
        raise TrackError(f"fps must be a positive number, got {fps!r}")
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.iterdir()
                # hidden files: macOS leaves "._frame0.png" AppleDouble files on other disks
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
            ),
            key=_natural_key,
        )
        if not files:
            raise TrackError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        files = _one_series(path, files)
        # a render folder's frames record no rate; its preview.mp4 holds the take's
        preview = path / "preview.mp4"
        if fps is None and files[0].name.lower().startswith("rgb_") and preview.is_file():
            fps = video_rate(_nominal_rate(preview) or 0.0)
        return FrameSource(str(path), float(fps or DEFAULT_FPS), len(files), _read_images(files))
    if not path.is_file():
        raise TrackError(f"{path}: no such file or folder")
    return _open_video(path, fps)


def _one_series(folder: Path, files: list[Path]) -> list[Path]:
    """The frames of a folder holding one numbered series (``frame_0001.png``...). A
    ``splatface render`` folder also holds ``alpha_`` images: its ``rgb_`` ones are the
    frames. Several other numbered series are refused, named: read together, they would
    play as one take of interleaved frames; so is a series with images of other names
    beside it (a cover or a still would become a frame of the take, in name order).
    Images none of whose names hold a number are frames in name order."""
    series: dict[str, list[Path]] = {}
    for f in files:
        series.setdefault(re.sub(r"\d+", "#", f.name.lower()), []).append(f)
    if len(series) == 1 or not any("#" in k for k in series):
        return files
    rgb = [k for k in series if k.startswith("rgb_")]
    if len(rgb) == 1 and all(k.startswith(("rgb_", "alpha_")) for k in series):
        return series[rgb[0]]
    named = ", ".join(f"{k} ({len(v)})" for k, v in sorted(series.items())[:6])
    raise TrackError(
        f"{folder}: the folder holds several series of images ({named}"
        f"{', ...' if len(series) > 6 else ''}); put the take's frames in a folder of their own"
    )


def _read_images(files: list[Path]) -> Iterator[np.ndarray]:
    from .images import decode_image

    for f in files:
        try:
            yield decode_image(f.read_bytes())
        except (OSError, ProtocolError) as exc:
            raise TrackError(f"{f}: {getattr(exc, 'message', exc)}") from None


#: ffmpeg output options for every video: pixels made square (anamorphic, DV and HDV
#: footage stores them wide or narrow; MediaPipe and the fit need the picture's shape).
SQUARE_PIXELS = ["-vf", "scale=trunc(iw*sar+0.5):ih,setsar=1"]


def video_rate(printed: float) -> Fraction | None:
    """The frame rate ffmpeg printed (rounded: 29.97 for 30000/1001) as a fraction: the
    NTSC rate N x 1000/1001 it stands for, else as printed; None when it printed none."""
    if not (np.isfinite(printed) and printed > 0):
        return None
    whole = round(printed * 1.001)
    if whole >= 1 and abs(printed * 1.001 - whole) < 0.006 and abs(printed - whole) > 0.005:
        return Fraction(whole * 1000, 1001)
    return Fraction(printed).limit_denominator(1001)


def _standard_rate(fps: float) -> bool:
    """A rate a Live Link Face CSV's timecodes can state: whole frames a second, or an
    NTSC one (``video_rate``'s N x 1000/1001)."""
    rate = video_rate(fps)
    return rate is not None and (rate.denominator in (1, 1001))


def _nominal_rate(path: Path) -> float | None:
    """The rate a video's timestamps step at (ffmpeg's ``tbr``), None where it names
    none. A phone that drops frames in low light records 30 nominal and, say, 22.88 on
    average: tracked at the average, the take's CSV could not state its rate (readers
    took it as 24, playing 5 % fast); at the nominal one, ffmpeg repeats a frame where
    one was dropped and every row keeps its time."""
    import subprocess

    import imageio_ffmpeg

    try:
        probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"Video:.*?, ([0-9]+(?:\.[0-9]+)?) tbr", probe.stderr)
    return float(found.group(1)) if found else None


class _ResizeNotice(logging.Filter):
    """imageio-ffmpeg warns that frames come out another size than the file's whenever
    ``SQUARE_PIXELS`` or a phone's rotation tag makes them so: the sizes asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The frame size for reading")


def _open_video(path: Path, fps: float | None) -> FrameSource:
    """Frames at one steady rate: the video's own, unless ``fps`` is given. ffmpeg hands
    a variable-rate video (a phone that dropped frames) on at a steady rate of its own
    choosing, so that rate is asked for by name and is the rate the frames carry."""
    import imageio_ffmpeg

    quiet = logging.getLogger("imageio_ffmpeg")
    if not any(isinstance(f, _ResizeNotice) for f in quiet.filters):
        quiet.addFilter(_ResizeNotice())

    def start(output: list[str]) -> tuple[Iterator[bytes], dict]:
        try:
            gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=output)
            return gen, next(gen)
        except (OSError, RuntimeError, StopIteration) as exc:
            raise TrackError(f"{path}: not a readable video ({_ffmpeg_reason(exc)})") from None

    gen, meta = start(SQUARE_PIXELS)
    printed = float(meta.get("fps") or 0)
    if not fps and not _standard_rate(printed):
        nominal = _nominal_rate(path)
        if nominal is not None and nominal > printed and _standard_rate(nominal):
            printed = nominal  # a phone's variable rate: its frames at their nominal times
    steady = None if fps else video_rate(printed)
    if steady is not None:
        gen.close()
        gen, meta = start([*SQUARE_PIXELS, "-r", f"{steady.numerator}/{steady.denominator}"])
    rate = float(fps or steady or DEFAULT_FPS)
    try:
        counted, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
        total = int(counted) if steady is None else max(1, round(seconds * rate))
    except (OSError, RuntimeError, ValueError):
        total = max(1, round(float(meta.get("duration") or 0) * rate))
    w, h = meta["size"]

    def frames() -> Iterator[np.ndarray]:
        done = 0
        try:
            for buf in gen:
                yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
                done += 1
        except (OSError, RuntimeError) as exc:
            raise TrackError(
                f"{path}: unreadable after frame {done} ({_ffmpeg_reason(exc)})"
            ) from None
        finally:
            gen.close()

    return FrameSource(str(path), rate, total, frames())


def _ffmpeg_reason(exc: BaseException, keep: int = 300) -> str:
    """The end of an ffmpeg error, where it says why (its start is the version banner)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text if len(text) <= keep else "..." + text[-keep:]


# -- landmarks ---------------------------------------------------------------------------


class LandmarkTracker:
    """MediaPipe landmarks frame by frame, following one face: detection picks the face
    (``face``: index by size, 0 = largest) until one is followed; the landmarks are then
    looked for around the previous ones, and after a gap detection picks the face nearest
    where the followed one was last seen (sizes change as people move). Once the video
    has shown more than one face, that face must lie within ``REFIND_REACH`` of the
    followed one's size from where it was: a subject who steps out of the frame leaves a
    gap, where the nearest face was another person's, followed from then on."""

    def __init__(self, face: int | None = None) -> None:
        self.face = face
        self.box: tuple[float, float, float, float] | None = None
        self.last: tuple[float, float, float, float] | None = None  # kept through gaps
        self.most_faces = 0  # the most faces detection found in one frame
        #: quarter turns (``np.rot90``) that stand the followed face upright: a face lying
        #: sideways or upside down, in frames no rotation tag turned
        self.turn = 0

    def __call__(self, img: np.ndarray) -> np.ndarray | None:
        """``[478, 3]`` pixels, or None when no face is found."""
        from .build import detect

        if self.box is not None:
            try:
                return self._near(img, self.box)
            except ProtocolError:
                pass  # lost it: look over the whole frame
        h, w = img.shape[:2]
        try:
            faces = detect.detect_faces(img)
            self.most_faces = max(self.most_faces, len(faces))
            if self.last is not None and faces:
                face = min(faces, key=lambda f: _centre_distance(f.box, self.last))
                side = max(self.last[2] - self.last[0], self.last[3] - self.last[1])
                far = _centre_distance(face.box, self.last) > REFIND_REACH * side
                if far and self.most_faces > 1:  # someone else: the subject is away
                    return None
            else:
                face = detect.choose_face(faces, self.face, None, (w, h))
            self.turn = face.turn
            return self._near(img, face.box)
        except ProtocolError:
            self.box = None
            return None

    def _near(self, img: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """Landmarks of the face in ``box``, found on a window of the frame around it,
        scaled so the mesh's crop is at most ``MESH_CROP`` pixels (MediaPipe sees that size
        either way; ``face_landmarks`` pads what it is given by a crop's side all round,
        which on an HD frame costs more than MediaPipe itself)."""
        from PIL import Image

        from .build import detect

        h, w = img.shape[:2]
        side = max(box[2] - box[0], box[3] - box[1])
        reach = 0.6 * MESH_CROP_SIDES * side  # the crop reaches 0.5 of its side; a margin
        cx, cy = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
        x0, y0 = max(0, int(cx - reach)), max(0, int(cy - reach))
        x1, y1 = min(w, int(np.ceil(cx + reach))), min(h, int(np.ceil(cy + reach)))
        window = img[y0:y1, x0:x1]
        k = min(1.0, detect.MESH_CROP / (MESH_CROP_SIDES * side))
        if k < 1.0:
            size = (max(1, round(window.shape[1] * k)), max(1, round(window.shape[0] * k)))
            window = np.asarray(Image.fromarray(window).resize(size, Image.BILINEAR))
        shifted = tuple(k * v for v in (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0))
        lm = detect.face_landmarks(window, detect.Face(shifted, 1.0, self.turn)) / k
        lm[:, 0] += x0
        lm[:, 1] += y0
        (bx0, by0), (bx1, by1) = lm[:, :2].min(0), lm[:, :2].max(0)
        self.box = self.last = (float(bx0), float(by0), float(bx1), float(by1))
        self.turn = upright_turn(lm)  # a head that rolls on is followed round
        return lm


def upright_turn(landmarks: np.ndarray) -> int:
    """Quarter turns (``np.rot90``) that stand a face upright, from where its eyes lie
    from its mouth (MediaPipe's mesh: outer eye corners 33 and 263, lips 13 and 14)."""
    from .build.detect import turn_from_up

    up = landmarks[[33, 263], :2].mean(0) - landmarks[[13, 14], :2].mean(0)
    return turn_from_up(float(up[0]), float(up[1]))


def _centre_distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return float(np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2))


# -- the per-frame solver ------------------------------------------------------------------


def _rotvec_to_matrix(r: np.ndarray) -> np.ndarray:
    theta = float(np.linalg.norm(r))
    if theta < 1e-12:
        return np.eye(3)
    k = _skew(r / theta)
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def _matrix_to_rotvec(m: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(m).as_rotvec()


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def _rotation_jacobian(r: np.ndarray, rot: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """d(R(r) p)/dr ``[P, 3, 3]`` for rotation vector ``r`` (Gallego & Yezzi 2015)."""
    theta2 = float(r @ r)
    if theta2 < 1e-16:
        return _neg_skew(pts)
    m = (np.outer(r, r) + (rot.T - np.eye(3)) @ _skew(r)) / theta2
    cols = np.cross(pts[:, None, :], m.T[None]).transpose(0, 2, 1)  # [P, 3, k]: p x m[:, k]
    return -_rotate(rot, cols)


def _rotate(rot: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``rot @ v`` for ``v`` ``[..., 3, N]`` (elementwise: no BLAS call per tiny product)."""
    return np.stack([rot[i, 0] * v[..., 0, :] + rot[i, 1] * v[..., 1, :]
                     + rot[i, 2] * v[..., 2, :] for i in range(3)], axis=-2)  # fmt: skip


def _neg_skew(pts: np.ndarray) -> np.ndarray:
    """``-[p]x`` per point ``[P, 3, 3]``: d(R p)/dr at r = 0."""
    out = np.zeros((len(pts), 3, 3))
    out[:, 0, 1], out[:, 0, 2], out[:, 1, 2] = pts[:, 2], -pts[:, 1], pts[:, 0]
    out[:, 1, 0], out[:, 2, 0], out[:, 2, 1] = -pts[:, 2], pts[:, 1], -pts[:, 0]
    return out


def _turn(yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Posing's eye turn and its derivative by ``yaw``."""
    c, s = np.cos(yaw), np.sin(yaw)
    return eye_turn(yaw), np.array([[-s, -c, 0.0], [c, -s, 0.0], [0.0, 0.0, 0.0]])


def _lift(pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Posing's eye lift and its derivative by ``pitch``."""
    c, s = np.cos(pitch), np.sin(pitch)
    return eye_lift(pitch), np.array([[0.0, 0.0, 0.0], [0.0, -s, c], [0.0, -c, -s]])


@dataclass(frozen=True)
class _Basis:
    """The ICT head at the tracked landmarks, linear in identity and expression.

    ``landmarks`` ``[L]`` MediaPipe indices fitted as face surface (all but the irises);
    ``neutral`` ``[L, 3]``, ``identity`` ``[K, L, 3]``, ``shapes`` ``[S, L, 3]`` for the
    ``solved`` ARKit indices ``[S]`` (and both as ``[L, 3, K|S]``, for Jacobians);
    ``weight`` ``[L]`` correspondence weights; per eye (subject's left, right) the
    eyeball's vertices at rest and their identity deltas.
    """

    landmarks: np.ndarray
    solved: np.ndarray
    neutral: np.ndarray
    identity: np.ndarray
    shapes: np.ndarray
    identity_t: np.ndarray
    shapes_t: np.ndarray
    weight: np.ndarray
    eye_neutral: tuple[np.ndarray, np.ndarray]
    eye_identity: tuple[np.ndarray, np.ndarray]


@functools.cache
def _basis() -> _Basis:
    from .headmodel import PART_EYE_LEFT, PART_EYE_RIGHT

    model, corr = load_head_model(), load_correspondence()
    k = IDENTITY_COMPONENTS
    tri = model.triangles[corr.triangle]
    bary = corr.bary.astype(np.float64)
    weight = corr.weight.astype(np.float64)
    keep = np.setdiff1d(np.arange(len(corr.triangle)), IRIS)
    tri, bary = tri[keep], bary[keep]
    solved = np.array([i for i, n in enumerate(ARKIT_NAMES) if n not in UNSOLVED])
    ident = model.identity_deltas[:k].astype(np.float64)
    eyes = [np.flatnonzero(model.vertex_part == p) for p in (PART_EYE_LEFT, PART_EYE_RIGHT)]
    identity = np.einsum("lk,ilkc->ilc", bary, ident[:, tri])
    shapes = np.einsum("lk,elkc->elc", bary, model.arkit_deltas[solved][:, tri])
    gaze = np.isin(solved, _GAZE.ravel())
    shapes[gaze] *= GAZE_LIDS
    return _Basis(
        landmarks=keep,
        solved=solved,
        neutral=np.einsum("lk,lkc->lc", bary, model.neutral[tri].astype(np.float64)),
        identity=identity,
        shapes=shapes,
        identity_t=np.ascontiguousarray(identity.transpose(1, 2, 0)),
        shapes_t=np.ascontiguousarray(shapes.transpose(1, 2, 0)),
        weight=weight[keep],
        eye_neutral=tuple(model.neutral[e].astype(np.float64) for e in eyes),
        eye_identity=tuple(ident[:, e] for e in eyes),
    )


@dataclass(frozen=True)
class TrackingRig:
    """The subject as the per-frame fit sees it: identity and camera fixed.

    Attributes:
        identity: ``[IDENTITY_COMPONENTS]`` ICT identity coefficients.
        intrinsics: ``[4]`` fx, fy, cx, cy.
        base: ``[L, 3]`` the tracked landmarks on this identity at rest, head frame.
        eye_center: ``[2, 3]`` eyeball centres (subject's left, right).
        eye_front: ``[2, 3]`` where MediaPipe's iris centre sits at rest, minus the eyeball
            centre: ``IRIS_DEPTH`` of the way to the eyeball's front point.
    """

    identity: np.ndarray
    intrinsics: np.ndarray
    base: np.ndarray
    eye_center: np.ndarray
    eye_front: np.ndarray

    @classmethod
    def build(cls, identity: np.ndarray, intrinsics: np.ndarray) -> TrackingRig:
        from .avatar import sphere_center

        b = _basis()
        identity = np.asarray(identity, np.float64)
        centers, fronts = [], []
        for neutral, deltas in zip(b.eye_neutral, b.eye_identity, strict=True):
            pts = neutral + np.tensordot(identity, deltas, 1)
            c = sphere_center(pts)
            centers.append(c)
            # the face looks towards -Y; MediaPipe's iris sits IRIS_DEPTH of the way out
            fronts.append(IRIS_DEPTH * (pts[np.argmin(pts[:, 1])] - c))
        return cls(
            identity=identity,
            intrinsics=np.asarray(intrinsics, np.float64),
            base=b.neutral + np.tensordot(identity, b.identity, 1),
            eye_center=np.array(centers),
            eye_front=np.array(fronts),
        )


#: Per eye (subject's left, right): column of (out, in, up, down) in the 52 weights.
_GAZE = np.array([[index_of(f"eyeLook{d}{s}") for d in ("Out", "In", "Up", "Down")]
                  for s in ("Left", "Right")])  # fmt: skip
_OUTWARD = (1.0, -1.0)  # "out" turns the left eye towards +X, the right towards -X


def _linsolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch

    return torch.linalg.solve(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _gram(j: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``j.T @ j`` and ``j.T @ r``."""
    import torch

    jt, rt = torch.from_numpy(j), torch.from_numpy(r)
    return (jt.T @ jt).numpy(), (jt.T @ rt).numpy()


def _bounded_step(a: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``d`` minimising ``d.a.d / 2 + g.d`` within ``lo <= d <= hi`` (``lo <= 0 <= hi``):
    variables at a bound that the gradient pushes out stay there; the rest are solved
    for, and those that overshoot are fixed at their bound and the rest solved again."""
    fixed = ((lo >= 0) & (g > 0)) | ((hi <= 0) & (g < 0))
    d = np.zeros_like(g)
    for _ in range(len(g)):
        free = ~fixed
        rhs = -(g[free] + a[np.ix_(free, fixed)] @ d[fixed])
        d[free] = _linsolve(a[np.ix_(free, free)], rhs)
        over = free & ((d < lo) | (d > hi))
        if not over.any():
            break
        d[over] = np.clip(d[over], lo[over], hi[over])
        fixed |= over
    return d


def _d_uv_d_cam(cam: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """The pinhole projection's derivative ``[P, 2, 3]`` at camera-frame points ``[P, 3]``."""
    z = cam[:, 2]
    out = np.zeros((len(cam), 2, 3))
    out[:, 0, 0], out[:, 1, 1] = fx / z, fy / z
    out[:, 0, 2], out[:, 1, 2] = -fx * cam[:, 0] / z**2, -fy * cam[:, 1] / z**2
    return out


@dataclass(frozen=True)
class _Targets:
    """One frame's fit targets ``[P, 2]`` (face landmarks, then iris centres), their row
    weights ``[P, 1]`` (correspondence weights normalised by their sum and the eye distance,
    as the builder's fit) and the eye distance in pixels."""

    target: np.ndarray
    row_w: np.ndarray
    iod: float
    #: ``[2]`` per eye (as IRIS_CENTER), 0 open to 1 shut (``EYE_SHUT``): its iris's row
    #: weight is scaled by 1 - shut
    shut: np.ndarray

    def weigh(self, uv: np.ndarray) -> tuple[np.ndarray, float]:
        """Row weights for projections ``uv`` under a Huber loss on each point's error (so a
        landmark MediaPipe misplaces pulls linearly, not quadratically: iteratively
        reweighted), and the robust cost."""
        err = np.linalg.norm(uv - self.target, axis=1, keepdims=True) / self.iod
        huber = np.minimum(1.0, ROBUST_SCALE / np.maximum(err, 1e-12))
        rho = np.where(huber < 1.0, 2 * ROBUST_SCALE * err - ROBUST_SCALE**2, err**2)
        return self.row_w * np.sqrt(huber), float((self.row_w**2 * self.iod**2 * rho).sum())


def lid_opening(landmarks: np.ndarray) -> np.ndarray:
    """``[2]`` per eye (as IRIS_CENTER): MediaPipe's lid gap at the middle over the eye's
    width, from landmarks ``[478, 2+]``."""
    p = landmarks[:, :2]
    return np.array([np.linalg.norm(p[up] - p[low]) / max(np.linalg.norm(p[a] - p[b]), 1e-9)
                     for up, low, a, b in LIDS])  # fmt: skip


class FrameSolver:
    """Fits one frame's landmarks: weights ``[S]`` in [0, 1], rotation vector, translation.

    Levenberg-Marquardt on the normal equations (``S + 6`` unknowns), each step the
    minimiser of the damped quadratic model within the bounds (an active-set solve): a
    bounded least-squares fit, a few milliseconds a frame from a warm start.
    """

    def __init__(self, rig: TrackingRig, pose_only: bool = False) -> None:
        self.rig = rig
        self.basis = _basis()
        s = len(self.basis.solved)
        self.n = s + 6
        self.lower = np.concatenate([np.zeros(s), np.full(6, -np.inf)])
        self.upper = np.concatenate([np.full(s, 0.0 if pose_only else 1.0), np.full(6, np.inf)])
        where = {int(a): i for i, a in enumerate(self.basis.solved)}
        self.gaze_cols = np.array([[where[int(c)] for c in eye] for eye in _GAZE])
        # rows giving (left - right) eye yaw and pitch, radians, of the parameters
        couple = np.zeros((2, self.n))
        for e, sign in ((0, 1.0), (1, -1.0)):
            out, inward, up, down = self.gaze_cols[e]
            couple[0, out] += sign * GAZE_YAW * _OUTWARD[e]
            couple[0, inward] -= sign * GAZE_YAW * _OUTWARD[e]
            couple[1, up] += sign * GAZE_PITCH
            couple[1, down] -= sign * GAZE_PITCH
        self.prior_h = np.diag(np.r_[np.full(s, EXPRESSION_PRIOR), np.zeros(6)])
        self.prior_h += GAZE_COUPLING * couple.T @ couple
        mouth = [ARKIT_NAMES[int(k)].startswith(("jaw", "mouth")) for k in self.basis.solved]
        self.prior_g = np.r_[np.where(mouth, MOUTH_SPARSITY, 0.0), np.zeros(6)]

    def points(self, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Head-frame points ``[L + 2, 3]`` (face landmarks, then the iris centres of the
        subject's left and right eye) and the irises' derivatives ``[2, 3, S]``."""
        rig = self.rig
        face = rig.base + np.einsum("s,slc->lc", beta, self.basis.shapes)
        iris = np.zeros((2, 3))
        d_iris = np.zeros((2, 3, len(beta)))
        for e in range(2):
            cols = self.gaze_cols[e]
            out, inward, up, down = beta[cols]
            k_yaw = GAZE_YAW * _OUTWARD[e]
            turn, d_turn = _turn(k_yaw * (out - inward))
            lift, d_lift = _lift(GAZE_PITCH * (up - down))
            front = rig.eye_front[e]
            iris[e] = rig.eye_center[e] + turn @ lift @ front
            d_yaw, d_pitch = d_turn @ lift @ front, turn @ d_lift @ front
            d_iris[e, :, cols[0]], d_iris[e, :, cols[1]] = k_yaw * d_yaw, -k_yaw * d_yaw
            d_iris[e, :, cols[2]] = GAZE_PITCH * d_pitch
            d_iris[e, :, cols[3]] = -GAZE_PITCH * d_pitch
        return np.concatenate([face, iris]), d_iris

    def project(
        self, x: np.ndarray, jacobian: bool = True, subject: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels ``[L + 2, 2]`` at parameters ``x`` and their Jacobian ``[L + 2, 2, S + 6]``,
        with ``subject`` a further ``IDENTITY_COMPONENTS + 1`` columns: identity and log focal
        length (the irises' dependence on identity is left out)."""
        b, rig = self.basis, self.rig
        s = len(b.solved)
        beta, rvec, tvec = x[:s], x[s : s + 3], x[s + 3 :]
        rot = _rotvec_to_matrix(rvec)
        pts, d_iris = self.points(beta)
        cam = pts @ rot.T + tvec
        fx, fy, cx, cy = rig.intrinsics
        z = cam[:, 2]
        uv = np.stack([fx * cam[:, 0] / z + cx, fy * cam[:, 1] / z + cy], 1)
        if not jacobian:
            return uv, None
        duv = _d_uv_d_cam(cam, fx, fy)
        face = len(b.landmarks)
        k = IDENTITY_COMPONENTS + 1 if subject else 0
        d_cam = np.zeros((len(pts), 3, self.n + k))
        d_cam[:face, :, :s] = _rotate(rot, b.shapes_t)
        d_cam[face:, :, :s] = _rotate(rot, d_iris)
        d_cam[:, :, s : s + 3] = _rotation_jacobian(rvec, rot, pts)
        d_cam[:, :, s + 3 : s + 6] = np.eye(3)
        if subject:
            d_cam[:face, :, self.n : -1] = _rotate(rot, b.identity_t)
        jac = np.empty((len(pts), 2, d_cam.shape[2]))
        jac[:, 0] = duv[:, 0, 0, None] * d_cam[:, 0] + duv[:, 0, 2, None] * d_cam[:, 2]
        jac[:, 1] = duv[:, 1, 1, None] * d_cam[:, 1] + duv[:, 1, 2, None] * d_cam[:, 2]
        if subject:
            jac[:, :, -1] = uv - (cx, cy)  # d uv / d log f
        return uv, jac

    def rows(self, landmarks: np.ndarray) -> _Targets:
        target = np.concatenate([landmarks[self.basis.landmarks, :2],
                                 landmarks[list(IRIS_CENTER), :2]])  # fmt: skip
        iod = eye_distance(landmarks)
        shut = 1.0 - smoothstep(lid_opening(landmarks), *EYE_SHUT)
        w = np.concatenate([self.basis.weight, np.full(2, IRIS_WEIGHT)])
        total = w.sum()  # the same in every frame: a shut eye does not reweigh the rest
        w[-2:] *= 1.0 - shut
        return _Targets(target, (np.sqrt(w / total) / iod)[:, None], iod, shut)

    def offset_equations(
        self, landmarks: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per point (face landmarks, then the iris centres), the normal equations
        ``a`` ``[P, 3, 3]``, ``b`` ``[P, 3]`` of the head-frame offset that moves the point's
        projection onto its landmark, to first order: ``a = J.T J``, ``b = J.T r`` with ``J``
        ``[P, 2, 3]`` the projection's derivative by a head-frame move and ``r`` the image
        residual. One frame fixes only the two directions across the line of sight; frames
        seen from different sides fix the third."""
        s = len(self.basis.solved)
        rot = _rotvec_to_matrix(x[s : s + 3])
        cam = self.points(x[:s])[0] @ rot.T + x[s + 3 :]
        jac = _d_uv_d_cam(cam, *self.rig.intrinsics[:2]) @ rot
        res = self.rows(landmarks).target - self.project(x, jacobian=False)[0]
        return np.einsum("pki,pkj->pij", jac, jac), np.einsum("pki,pk->pi", jac, res)

    def solve(
        self, landmarks: np.ndarray, x0: np.ndarray, iterations: int = MAX_ITERATIONS
    ) -> tuple[np.ndarray, float]:
        """Parameters ``[S + 6]`` and the landmark RMS as a fraction of the eye distance."""
        with one_torch_thread():
            return self._fit(landmarks, x0, iterations)

    def _fit(
        self, landmarks: np.ndarray, x0: np.ndarray, iterations: int
    ) -> tuple[np.ndarray, float]:
        rows = self.rows(landmarks)
        prior, slope = self.prior_h, self.prior_g  # cost x.prior.x + slope.x
        if rows.shut.any():  # + GAZE_HOLD shut |gaze - gaze before|^2, per eye
            hold = np.zeros(self.n)
            for e in range(2):
                hold[self.gaze_cols[e]] = GAZE_HOLD * rows.shut[e]
            before = np.clip(x0, self.lower, self.upper)
            prior, slope = prior + np.diag(hold), slope - 2 * hold * before

        def linearise(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
            uv, jac = self.project(x)
            row_w, cost = rows.weigh(uv)
            r = ((uv - rows.target) * row_w).ravel()
            j = (jac * row_w[:, :, None]).reshape(-1, self.n)
            px = prior @ x
            h, g = _gram(j, r)
            return cost + float(x @ px) + float(slope @ x), h + prior, g + px + slope / 2

        x = np.clip(x0, self.lower, self.upper)
        cost, h, g = linearise(x)
        damping = 1e-3
        for _ in range(iterations):
            a = h + damping * np.diag(np.diag(h))
            step = _bounded_step(a, g, self.lower - x, self.upper - x)
            x_new = np.clip(x + step, self.lower, self.upper)
            new_cost, h_new, g_new = linearise(x_new)
            if new_cost < cost:
                converged = cost - new_cost < 1e-6 * cost
                x, cost, h, g = x_new, new_cost, h_new, g_new
                damping = max(damping / 4, 1e-7)
                if converged:
                    break
            else:
                damping *= 8
                if damping > 1e4:
                    break
        uv, _ = self.project(x, jacobian=False)
        face = len(self.basis.landmarks)
        rms = float(np.sqrt(((uv[:face] - rows.target[:face]) ** 2).sum(1).mean()) / rows.iod)
        return x, rms

    def initial(self, landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Parameters from the similarity alignment: neutral face, the rig's focal length."""
        from .build.align import align

        a = align(load_head_model(), landmarks, size)
        t = a.world_to_camera[:3, 3].copy()
        t[2] *= self.rig.intrinsics[0] / a.intrinsics[0]  # same image scale, this focal
        s = len(self.basis.solved)
        return np.concatenate([np.zeros(s), _matrix_to_rotvec(a.world_to_camera[:3, :3]), t])


def fit_subject(
    samples: list[np.ndarray], size: tuple[int, int], rounds: int = IDENTITY_ROUNDS
) -> TrackingRig:
    """Identity and focal length from a few frames' landmarks ``[478, 3]`` of a ``size``
    (width, height) video. From the similarity alignment, alternately: each frame's
    expression and pose (identity fixed); then identity, focal length and every frame's
    pose together (expressions fixed; a damped Gauss-Newton step, halved until the cost
    falls). Priors as the builder's fit: identity near 0, focal length near the one the
    alignment assumes (1.2x the longer side)."""
    from .build.align import align

    f0 = float(align(load_head_model(), samples[0], size).intrinsics[0])
    subject = np.concatenate([np.zeros(IDENTITY_COMPONENTS), [np.log(f0)]])  # identity, log f
    solver = _subject_solver(subject, size)
    xs = [solver.initial(lm, size) for lm in samples]
    k, n, s = IDENTITY_COMPONENTS + 1, solver.n, len(solver.basis.solved)
    rows = [solver.rows(lm) for lm in samples]
    scale = 1.0 / np.sqrt(len(samples))  # the data term is the mean over the frames
    prior = np.zeros(k + 6 * len(samples))
    prior[: k - 1], prior[k - 1] = IDENTITY_PRIOR, FOCAL_PRIOR
    centre = np.zeros_like(prior)
    centre[k - 1] = np.log(f0)

    def cost(solver: FrameSolver, xs: list[np.ndarray], unknowns: np.ndarray) -> float:
        out = float(prior @ (unknowns - centre) ** 2)
        for x, t in zip(xs, rows, strict=True):
            out += t.weigh(solver.project(x, False)[0])[1] * scale**2
        return out

    with one_torch_thread():
        for _ in range(rounds):
            xs = [
                solver._fit(lm, x, ROUND_ITERATIONS)[0] for lm, x in zip(samples, xs, strict=True)
            ]
            unknowns = np.concatenate([subject, *(x[s:n] for x in xs)])
            j = np.zeros((sum(2 * len(t.target) for t in rows), len(prior)))
            res = []
            for i, (x, t) in enumerate(zip(xs, rows, strict=True)):
                uv, jac = solver.project(x, subject=True)
                row_w = t.weigh(uv)[0]
                res.append(((uv - t.target) * row_w * scale).ravel())
                blk = (jac * row_w[:, :, None] * scale).reshape(-1, n + k)
                at = slice(i * len(blk), (i + 1) * len(blk))
                j[at, :k] = blk[:, n:]
                j[at, k + 6 * i : k + 6 * i + 6] = blk[:, s:n]
            h, g = _gram(j, np.concatenate(res))
            h += np.diag(prior)
            g += prior * (unknowns - centre)
            step = -_linsolve(h + 1e-3 * np.diag(np.diag(h)), g)
            before = cost(solver, xs, unknowns)
            for _ in range(6):
                new = unknowns + step
                trial = _subject_solver(new[:k], size)
                trial_xs = [np.concatenate([x[:s], new[k + 6 * i : k + 6 * i + 6]])
                            for i, x in enumerate(xs)]  # fmt: skip
                if cost(trial, trial_xs, new) < before:
                    subject, solver, xs = new[:k], trial, trial_xs
                    break
                step = step / 2
    return solver.rig


def calibrate_neutral(
    rig: TrackingRig, samples: list[np.ndarray], size: tuple[int, int]
) -> TrackingRig:
    """The rig with rest offsets from frames ``samples`` (landmarks ``[478, 3]``) in which
    the face is neutral, so that those frames read weights of 0.

    Without it, a neutral face reads a few tenths of several shapes at once (a rendered
    avatar: 2-3 in all, ``browDown*``, ``eyeWide*``, ``cheekSquint*``, the smiles), because
    MediaPipe places its points on a face a little differently from where the
    correspondence puts them on ICT's mesh, and a face's look (a photo's smile) moves them
    too. The weights' [0, 1] bounds then turn such an offset into a dead zone: a blink
    first has to undo the ``eyeWide`` it reads at rest. Each round fits every frame's head
    pose with the weights held at 0, then moves each point by the offset that best
    explains its misfit over all the frames (least squares,
    :meth:`FrameSolver.offset_equations`); the iris centres move the eyeballs' centres.
    Live Link Face's "calibrate" does the same job on the phone."""
    xs: list[np.ndarray | None] = [None] * len(samples)
    for _ in range(NEUTRAL_ROUNDS):
        solver = FrameSolver(rig, pose_only=True)
        a, b = 0.0, 0.0
        for i, lm in enumerate(samples):
            x0 = xs[i] if xs[i] is not None else solver.initial(lm, size)
            xs[i] = solver.solve(lm, x0)[0]
            a_i, b_i = solver.offset_equations(lm, xs[i])
            a, b = a + a_i, b + b_i
        # a ridge: frames from near the front leave the depth of each offset free
        ridge = NEUTRAL_RIDGE * np.trace(a, axis1=1, axis2=2)[:, None, None] / 3
        d = np.linalg.solve(a + ridge * np.eye(3), b[..., None])[..., 0]
        face = len(rig.base)
        rig = replace(rig, base=rig.base + d[:face], eye_center=rig.eye_center + d[face:])
    return rig


def _subject_solver(subject: np.ndarray, size: tuple[int, int]) -> FrameSolver:
    f = float(np.exp(subject[-1]))
    return FrameSolver(TrackingRig.build(subject[:-1], np.array([f, f, size[0] / 2, size[1] / 2])))


# -- angles --------------------------------------------------------------------------------

#: A frontal camera's world-to-camera rotation: on -Y, looking at the face, upright.
FRONTAL = orbit((0.0, 0.0, 0.0), 1.0)[:3, :3]


def head_angles_from_rotation(rot: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) ``[..., 3]`` of head rotations ``[..., 3, 3]``: the inverse of
    :func:`protocol.animation.head_rotation` (pitch within ±90°)."""
    rot = np.asarray(rot, np.float64)
    yaw = np.arctan2(-rot[..., 0, 1], rot[..., 1, 1])
    pitch = np.arcsin(np.clip(rot[..., 2, 1], -1.0, 1.0))
    roll = np.arctan2(rot[..., 2, 0], rot[..., 2, 2])
    return np.stack([yaw, pitch, roll], -1)


def eye_angles_from_curves(curves: np.ndarray) -> np.ndarray:
    """Per-frame eye (yaw, pitch, roll) ``[F, 2, 3]`` (subject's left, right eye) of the
    ``eyeLook*`` weights as posing turns the eyeballs, in the head angles' convention."""
    out = np.zeros((len(curves), 2, 3))
    for e in range(2):
        o, i, u, d = (curves[:, c].astype(np.float64) for c in _GAZE[e])
        out[:, e, 0] = GAZE_YAW * _OUTWARD[e] * (o - i)
        out[:, e, 1] = -GAZE_PITCH * (u - d)  # gaze up is the head's pitch up: negative
    return out


# -- smoothing and gaps ------------------------------------------------------------------------


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a), int(b) - 1) for a, b in zip(starts, stops, strict=True)]


def smooth_tracks(values: np.ndarray, tracked: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth ``values`` ``[F, ...]`` over time (``sigma`` frames) within each run of
    ``tracked`` frames (a run no longer than ``sigma`` takes its mean), then fill the others
    with the last tracked value (the first one before any)."""
    from scipy.ndimage import gaussian_filter1d

    out = np.array(values, np.float64)
    if sigma > 0:
        for a, b in _runs(tracked):
            if sigma >= b - a + 1:  # wider than the run: flat (--smooth 1e9 asked numpy
                out[a : b + 1] = out[a : b + 1].mean(axis=0)  # for a kernel of terabytes)
                continue
            out[a : b + 1] = gaussian_filter1d(out[a : b + 1], sigma, axis=0, mode="nearest")
    good = np.flatnonzero(tracked)
    before = np.searchsorted(good, np.arange(len(out)), "right") - 1
    return out[good[np.maximum(before, 0)]]


# -- tracking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackResult:
    """Attributes:
    animation: curves, fps, head and eye angles (see the module notes).
    gaps: inclusive frame ranges with no face (they hold the last pose).
    world_to_camera: ``[F, 4, 4]`` the fitted camera per frame, head frame (held in gaps).
    intrinsics: ``[4]`` the fitted fx, fy, cx, cy.
    identity: ``[IDENTITY_COMPONENTS]`` the fitted ICT identity coefficients.
    rms: ``[F]`` landmark residual per frame as a fraction of the eye distance (NaN in gaps).
    timings: ``landmarks_ms`` (MediaPipe) and ``fit_ms`` per frame, ``identity_s`` once.
    """

    animation: Animation
    gaps: tuple[tuple[int, int], ...]
    world_to_camera: np.ndarray
    intrinsics: np.ndarray
    identity: np.ndarray
    rms: np.ndarray
    timings: dict[str, float]

    def gaps_text(self) -> str:
        return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.gaps)


class _Fitter:
    """Fits frames in order, each warm-started from the one before (after a gap, from the
    similarity alignment), and keeps the parameters (None for gaps) and timings."""

    def __init__(self, rig: TrackingRig, size: tuple[int, int]) -> None:
        self.solver, self.size = FrameSolver(rig), size
        self.params: list[np.ndarray | None] = []
        self.rms: list[float] = []
        self.x: np.ndarray | None = None
        self.seconds = 0.0

    def add(self, lm: np.ndarray | None) -> None:
        if lm is None:
            self.params.append(None)
            self.rms.append(float("nan"))
            self.x = None
            return
        t0 = time.perf_counter()
        x0 = self.x if self.x is not None else self.solver.initial(lm, self.size)
        self.x, r = self.solver.solve(lm, x0)
        self.seconds += time.perf_counter() - t0
        self.params.append(self.x)
        self.rms.append(r)


def _spread(items: list, count: int) -> list:
    """At most ``count`` of ``items``, evenly spread from the first to the last."""
    picks = np.linspace(0, len(items) - 1, min(count, len(items))).round()
    return [items[int(i)] for i in np.unique(picks)]


def track(
    source: str | Path,
    fps: float | None = None,
    smooth: float = DEFAULT_SMOOTH,
    face: int | None = None,
    neutral: tuple[int, int] | None = None,
    progress: TrackProgress = lambda done, total: None,
) -> TrackResult:
    """Track a video file or a folder of images; see the module notes. ``neutral``: an
    inclusive range of frames in which the face is at rest; the identity is fitted on them
    and they calibrate the rig (:func:`calibrate_neutral`).

    Raises :class:`TrackError` for unreadable input, frames of different sizes, no face
    in any frame, or a neutral range outside the video or with no face in it.
    """
    if not (np.isfinite(smooth) and smooth >= 0):
        raise TrackError(f"smooth must be 0 or more seconds, got {smooth!r}")
    if neutral is not None and not 0 <= neutral[0] <= neutral[1]:
        raise TrackError(f"neutral frames must be a range A-B with 0 <= A <= B, got {neutral!r}")
    src = open_frames(source, fps)
    follow = LandmarkTracker(face)
    window = max(1, round(IDENTITY_WINDOW * src.fps))
    if neutral is not None:
        window = max(window, neutral[1] + 1)  # landmarks wait until the range has passed
    pending: list[np.ndarray | None] = []  # landmarks waiting for the identity
    fitter: _Fitter | None = None
    size: tuple[int, int] | None = None
    t_landmarks = t_identity = 0.0

    def start() -> _Fitter:
        nonlocal t_identity
        good = [p for p in pending if p is not None]
        if neutral is not None:
            if neutral[1] >= len(pending):
                raise TrackError(f"{src.name}: neutral frames {neutral[0]}-{neutral[1]} "
                                 f"are past its last frame ({len(pending) - 1})")  # fmt: skip
            good = [p for p in pending[neutral[0] : neutral[1] + 1] if p is not None]
            if not good:
                raise TrackError(
                    f"{src.name}: no face found in neutral frames {neutral[0]}-{neutral[1]}"
                )
        t0 = time.perf_counter()
        rig = fit_subject(_spread(good, IDENTITY_FRAMES), size)
        if neutral is not None:
            rig = calibrate_neutral(rig, _spread(good, NEUTRAL_FRAMES), size)
        t_identity = time.perf_counter() - t0
        out = _Fitter(rig, size)
        for lm in pending:
            out.add(lm)
        return out

    done = 0
    for img in src.frames:
        h, w = img.shape[:2]
        if size is None:
            size = (w, h)
        elif size != (w, h):
            raise TrackError(
                f"{src.name}: frame {done} is {w}x{h}, the first frame is {size[0]}x{size[1]}"
            )
        t0 = time.perf_counter()
        lm = follow(img)
        t_landmarks += time.perf_counter() - t0
        if fitter is not None:
            fitter.add(lm)
        else:
            pending.append(lm)
            if len(pending) >= window and any(p is not None for p in pending):
                fitter, pending = start(), []
        done += 1
        progress(done, max(done, src.total))
    if done == 0:
        raise TrackError(f"{src.name}: no frames")
    if fitter is None:
        if all(p is None for p in pending):
            if face is not None and 0 < follow.most_faces <= face:
                raise TrackError(
                    f"{src.name}: face {face} asked for, but no frame shows more than "
                    f"{follow.most_faces} face(s) (0 = largest)"
                )
            raise TrackError(f"{src.name}: no face found in any of its {done} frames")
        fitter = start()

    s = len(_basis().solved)
    tracked = np.array([p is not None for p in fitter.params])
    first = fitter.params[int(np.argmax(tracked))]
    stack = np.stack([p if p is not None else first for p in fitter.params])
    curves = np.zeros((done, len(ARKIT_NAMES)))
    curves[:, _basis().solved] = stack[:, :s]
    rots = np.stack([_rotvec_to_matrix(r) for r in stack[:, s : s + 3]])
    sigma = smooth * src.fps
    curves = np.clip(smooth_tracks(curves, tracked, sigma), 0.0, 1.0)
    angles = head_angles_from_rotation(FRONTAL.T @ rots)
    angles = smooth_tracks(np.unwrap(angles, axis=0), tracked, sigma)
    w2c = np.tile(np.eye(4), (done, 1, 1))
    w2c[:, :3, :3] = smooth_tracks(rots, tracked, 0.0)
    w2c[:, :3, 3] = smooth_tracks(stack[:, s + 3 :], tracked, 0.0)
    animation = Animation(
        curves=curves.astype(np.float32),
        fps=src.fps,
        head_angles=angles,
        eye_angles=eye_angles_from_curves(curves),
    )
    rig = fitter.solver.rig
    return TrackResult(
        animation=animation,
        gaps=tuple(_runs(~tracked)),
        world_to_camera=w2c,
        intrinsics=rig.intrinsics.copy(),
        identity=rig.identity.copy(),
        rms=np.array(fitter.rms),
        timings={
            "landmarks_ms": round(1000 * t_landmarks / done, 2),
            "fit_ms": round(1000 * fitter.seconds / max(1, int(tracked.sum())), 2),
            "identity_s": round(t_identity, 2),
        },
    )


# -- command line --------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``splatface track``: registered by the CLI."""
    from .cli import frame_rate  # the CLI is loaded by now: it is registering this

    sp = subparsers.add_parser(
        "track",
        help="track a face in a video or folder of frames into ARKit curves (Live Link Face CSV)",
        description="MediaPipe landmarks per frame, fitted with splatface's rig: 52 ARKit "
        "weights, head and eye angles, written as a Live Link Face CSV that --curves options "
        "and the Blender add-on read. Frames without a face hold the last pose and are "
        "reported.",
    )
    sp.add_argument("source", help="video file (any format ffmpeg reads) or a folder of images")
    sp.add_argument("--out", required=True, help="the CSV to write (Live Link Face layout)")
    sp.add_argument(
        "--fps",
        type=frame_rate,
        help=f"frame rate of a folder of images (default: {DEFAULT_FPS:g}, or a render "
        "folder's preview.mp4's); for a video, overrides the rate its file states; a number "
        "or a fraction such as 30000/1001",
    )
    sp.add_argument(
        "--smooth",
        type=float,
        default=DEFAULT_SMOOTH,
        help=f"temporal smoothing, seconds (Gaussian sigma; default: {DEFAULT_SMOOTH:g}; 0 = none)",
    )
    sp.add_argument(
        "--face",
        type=int,
        help="which face to follow when there are several (0 = largest, default), picked "
        "by size in the first frame showing it; after a gap, the face nearest where it was "
        f"(within {REFIND_REACH:g} of its size once the video has shown several faces: "
        "otherwise the gap goes on)",
    )
    sp.add_argument(
        "--neutral",
        metavar="A-B",
        help="frames (first is 0; a range A-B, inclusive, or one frame) in which the face is "
        "at rest: the subject is fitted on them and they calibrate the rig so that they read "
        "weights of 0, as Live Link Face's calibration does (default: none; the first "
        f"{IDENTITY_WINDOW:g} s fit the subject and a rest face may read some weight)",
    )
    sp.add_argument(
        "--json", action="store_true", help="print one JSON object on the last line instead"
    )
    sp.set_defaults(func=cmd_track)
    return sp


def parse_frame_range(text: str) -> tuple[int, int]:
    """``"A-B"`` or ``"A"`` → (A, B), inclusive; SystemExit naming the option otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
        raise SystemExit(
            f"splatface track: --neutral must be a frame A or a range A-B with A <= B "
            f"(frames count from 0), got {text!r}"
        )
    return int(m[1]), int(m[2] if m[2] is not None else m[1])


def cmd_track(args: argparse.Namespace) -> int:
    from .cli import Progress, emit, out_file

    out = out_file("track", Path(args.out))
    if out.suffix.lower() != ".csv":
        raise SystemExit(f"splatface track: --out must name a .csv file, got {out}")
    if args.face is not None and args.face < 0:
        raise SystemExit("splatface track: --face must be 0 or more (0 = largest)")
    neutral = None if args.neutral is None else parse_frame_range(args.neutral)
    bar = Progress(1.0, "tracking", not args.json)
    try:
        result = track(
            args.source,
            fps=args.fps,
            smooth=args.smooth,
            face=args.face,
            neutral=neutral,
            progress=lambda d, t: bar.update_to(d / t, f"{d}/{t} frames"),
        )
    except TrackError as exc:
        raise SystemExit(f"splatface track: {exc}") from None
    finally:
        bar.close()
    try:
        timecodes = save_livelink_csv(out, result.animation)
    except OSError as exc:
        raise SystemExit(f"splatface track: cannot write {out}: {exc}") from None
    anim = result.animation
    text = f"tracked {anim.frames} frames ({anim.fps:g} fps) of {args.source} into {out}"
    if neutral is not None:
        text += f"\ncalibrated on neutral frames {neutral[0]}-{neutral[1]}"
    if result.gaps:
        text += f"\nno face in frame(s) {result.gaps_text()}: the last pose is held there"
    read_back = timecodes_rate(timecodes)
    if read_back is not None and abs(read_back - anim.fps) > 1e-6:
        # Live Link Face timecodes state no rate: readers infer it (protocol.animation)
        text += (f"\nnote: readers of the CSV will take it as {read_back:g} fps (its timecodes "
                 f"cannot state {anim.fps:g} fps for this take): give --fps {anim.fps:g} to "
                 "render")  # fmt: skip
    record = {
        "out": str(out),
        "source": str(args.source),
        "frames": anim.frames,
        "fps": anim.fps,
        "fps_read_back": read_back,
        "gaps": [list(g) for g in result.gaps],
        "neutral": list(neutral) if neutral is not None else None,
        "timings": result.timings,
        "landmark_rms": round(float(np.nanmedian(result.rms)), 4),
    }
    emit(args, record, text)
    return 0
