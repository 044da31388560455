"""Find faces (MediaPipe detectors, short and full range) and their 478 landmarks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol import errors
from protocol.errors import ProtocolError

DETECT_MAX_SIDE = 1920  # detectors run on a copy at most this big
#: MediaPipe's detectors see a face down to about 1/20 of the picture they are given. Where
#: the whole photo shows none, squares of half its side, then a quarter..., no smaller
#: than this, overlapping by half, are searched: a 64 px face is 1/10 of the smallest.
TILE_MIN_SIDE = 640
TILE_INPUT = 320  # a square reaches the detectors this big (they see 128-192 px)
SURE_SCORE = 0.8  # a face this sure in the whole view ends the search
PROGRESS_SECONDS = 0.25  # the square search reports (and a build checks its cancel) this often
MESH_CROP = 512  # landmarks are found on a square crop of this size around the face
MIN_FACE_PX = 24
#: Without a face asked for, this many detections are tried, largest first, until one
#: has landmarks of its own (a false box, say a patch of clothing, gives way to the next).
FACE_TRIES = 4
#: A box's own landmarks span at least this share of its side (a real detection's span
#: 1.05-1.15 of it): a doubtful box around a shirt finds the face inside it, far smaller.
OWN_EXTENT = 0.5
#: A build with several faces checks this many, largest first, for ones it could use.
CHOOSABLE_TRIES = 8


@dataclass(frozen=True)
class Face:
    """A detected face. ``box`` is (x0, y0, x1, y1) in photo pixels."""

    box: tuple[float, float, float, float]
    score: float
    #: quarter turns (counter-clockwise, as ``np.rot90``) that stand the face upright: a
    #: photo turned sideways without EXIF saying so
    turn: int = 0

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 1) for v in self.box], "score": round(self.score, 3)}


_lock = threading.Lock()
_models: dict[str, object] = {}


def _model(key: str):
    """MediaPipe graphs are created once per process; callers hold ``_lock``."""
    # MediaPipe's C++ side logs warnings that mean nothing to users.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import mediapipe as mp

    if key not in _models:
        if key == "mesh":
            _models[key] = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=0.3,
            )
        else:
            _models[key] = mp.solutions.face_detection.FaceDetection(
                model_selection=0 if key == "short" else 1, min_detection_confidence=0.5
            )
    return _models[key]


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_faces(
    img: np.ndarray,
    near: list[float] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> list[Face]:
    """All faces, largest first (both detectors' boxes merged where they overlap).

    The whole photo is searched first. Where it shows no face with a score of at least
    :data:`SURE_SCORE`, overlapping squares of it are searched, of half its side, then a
    quarter..., down to :data:`TILE_MIN_SIDE`, until one does; the doubtful faces of the
    coarser views are then dropped if a sure one was found (at a whole 8k photo's scale, a
    shirt can pass for a 400 px face). ``near``: a box (x0, y0, x1, y1) the caller expects
    a face in, searched on its own as well. ``progress(fraction, message)`` hears the
    square search, at most every :data:`PROGRESS_SECONDS`; a build's raises to cancel it
    (a photo 4,000,000 px wide searched 25,000 squares for 3 minutes, and its cancel
    waited for them all).

    Squares larger than 20 times the photo's short side are not searched: a face is no
    larger than that side, so it would be under the 1/20 the detectors see.
    """
    h, w = img.shape[:2]
    found: list[Face] = []
    with _lock:
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = _resize(img, scale) if scale < 1 else img
        _detect(small, (0, 0, w, h), (w, h), found)
        if near is not None and np.all(np.isfinite(near)):
            x0, y0, x1, y1 = (float(v) for v in near)
            side = 3.0 * max(x1 - x0, y1 - y0, MIN_FACE_PX)
            cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
            left, top = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
            crop = img[top : int(cy + side / 2), left : int(cx + side / 2)]
            ch, cw = crop.shape[:2]
            if min(ch, cw) >= MIN_FACE_PX:
                k = min(1.0, TILE_INPUT / max(ch, cw))
                view = _resize(crop, k) if k < 1 else crop
                _detect(view, (left, top, left + cw, top + ch), (w, h), found)
        side = max(h, w) / 2
        while side > 20 * min(h, w):
            side /= 2
        sides = [side / 2**i for i in range(64) if side / 2**i >= TILE_MIN_SIDE]
        total = sum(_squares(h, s) * _squares(w, s) for s in sides)
        done, told = 0, float("-inf")  # the first square reports
        searched = False
        for side in sides:
            if any(f.score >= SURE_SCORE for f in found):
                break
            k = TILE_INPUT / side  # one copy of the photo per level, squares cut from it
            level = _resize(img, k)
            t = int(round(side * k))
            for y in _starts(level.shape[0], t):
                for x in _starts(level.shape[1], t):
                    if progress is not None and time.monotonic() - told >= PROGRESS_SECONDS:
                        progress(min(1.0, done / total), f"searching squares of {side:.0f} px for "
                                 f"small faces ({done} of at most {total})")  # fmt: skip
                        told = time.monotonic()
                    tile = level[y : y + t, x : x + t]
                    rect = (x / k, y / k, (x + tile.shape[1]) / k, (y + tile.shape[0]) / k)
                    _detect(tile, rect, (w, h), found, inner=True)
                    done += 1
            searched = True
        if searched and any(f.score >= SURE_SCORE for f in found):
            found = [f for f in found if f.score >= SURE_SCORE]
        if not any(f.score >= SURE_SCORE for f in found):
            found = _search_turned(small, scale, (w, h), found)
    return sorted(found, key=lambda f: -f.area)


#: A face found in the photo turned replaces the upright reading of it when this much surer
#: (an upside-down face can pass upright at 0.6, its key points read as if upright).
TURNED_MARGIN = 0.1


def _search_turned(
    small: np.ndarray, scale: float, size: tuple[int, int], found: list[Face]
) -> list[Face]:
    """``found`` with sure faces lying sideways or upside down (a photo turned without EXIF
    to say so) added, or put in place of their doubtful upright readings. ``small``: the
    ``size`` (w, h) photo scaled by ``scale``, as the detectors see it whole."""
    w, h = size
    found = list(found)
    for turn in (1, 3, 2):
        view = np.ascontiguousarray(np.rot90(small, turn))
        vh, vw = view.shape[:2]
        turned: list[Face] = []
        _detect(view, (0, 0, vw, vh), (vw, vh), turned)
        for f in turned:
            if f.score < SURE_SCORE:  # noise turned can pass for a doubtful face
                continue
            face = Face(_unturn_box(tuple(v / scale for v in f.box), turn, w, h), f.score,
                        (turn + f.turn) % 4)  # fmt: skip
            same = [g for g in found if _iou(g.box, face.box) >= 0.4]
            if not same:
                found.append(face)
            elif all(face.score >= g.score + TURNED_MARGIN for g in same):
                found = [g for g in found if g not in same] + [face]
    return found


def _unturn_box(box, turn: int, w: int, h: int) -> tuple[float, float, float, float]:
    """A box found in ``np.rot90(photo, turn)`` as a box of the ``w`` x ``h`` photo."""
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0], [x1, y1]], float)
    for k in range(turn % 4, 0, -1):  # undo one quarter turn: (x, y) -> (width - y, x)
        width = w if (k - 1) % 2 == 0 else h  # of the view with one turn less
        corners = np.stack([width - corners[:, 1], corners[:, 0]], axis=1)
    lo, hi = corners.min(0), corners.max(0)
    return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def _starts(length: int, side: int) -> list[int]:
    """Offsets of squares of ``side`` along ``length``, overlapping by half, the last
    flush with the end."""
    if side >= length:
        return [0]
    count = int(np.ceil((length - side) / (side / 2))) + 1
    return [int(round(v)) for v in np.linspace(0, length - side, count)]


def _squares(length: int, side: float) -> int:
    """How many squares of ``side`` a photo's ``length`` is searched in (about: the
    level's rounding may differ by a pixel)."""
    return len(_starts(round(length * TILE_INPUT / side), TILE_INPUT))


def _detect(
    view: np.ndarray,
    rect: tuple[float, float, float, float],
    size: tuple[int, int],
    found: list[Face],
    inner: bool = False,
) -> None:
    """Both detectors on ``view``, the part ``rect`` (x0, y0, x1, y1, photo pixels) of a
    photo of ``size`` (w, h) at any scale, adding to ``found`` the faces it does not hold
    yet. ``inner``: drop boxes touching the view's edges inside the photo (an overlapping
    neighbour sees them whole). Callers hold ``_lock``."""
    w, h = size
    x0, y0, x1, y1 = rect
    rw, rh = x1 - x0, y1 - y0
    for key in ("short", "full"):
        for det in _model(key).process(np.ascontiguousarray(view)).detections or []:
            b = det.location_data.relative_bounding_box
            box = (x0 + b.xmin * rw, y0 + b.ymin * rh,
                   x0 + (b.xmin + b.width) * rw, y0 + (b.ymin + b.height) * rh)  # fmt: skip
            cut = ((box[0] <= x0 and x0 > 0) or (box[1] <= y0 and y0 > 0)
                   or (box[2] >= x1 and x1 < w - 1) or (box[3] >= y1 and y1 < h - 1))  # fmt: skip
            if inner and cut:
                continue
            box = (max(0.0, box[0]), max(0.0, box[1]), min(w, box[2]), min(h, box[3]))
            face = Face(box, float(det.score[0]), _upright_turn(det, view.shape))
            if face.area > 0 and all(_iou(face.box, f.box) < 0.4 for f in found):
                found.append(face)


def _upright_turn(det, shape: tuple[int, ...]) -> int:
    """Quarter turns (``np.rot90``) that stand a detection upright, from its key points:
    where the eyes lie from the mouth."""
    kp = det.location_data.relative_keypoints
    if len(kp) < 4:
        return 0
    h, w = shape[:2]
    up_x = ((kp[0].x + kp[1].x) / 2 - kp[3].x) * w  # 0, 1: the eyes; 3: the mouth
    up_y = ((kp[0].y + kp[1].y) / 2 - kp[3].y) * h
    return turn_from_up(up_x, up_y)


def turn_from_up(up_x: float, up_y: float) -> int:
    """Quarter turns (``np.rot90``) that stand a face upright whose top points along
    (``up_x``, ``up_y``) in image pixels (y down): from the mouth towards the eyes."""
    if abs(up_x) > abs(up_y):
        return 1 if up_x > 0 else 3  # the head's top points right: a quarter turn left
    return 2 if up_y > 0 else 0


def face_landmarks(img: np.ndarray, face: Face) -> np.ndarray:
    """478 landmarks ``[478, 3]`` in photo pixels (x right, y down, z away from camera,
    same scale as x) from a square crop around ``face``."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = face.box
    side = 2.2 * max(x1 - x0, y1 - y0)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    left, top = cx - side / 2, cy - side / 2
    # Crop, padding past the photo's border by its edge pixels, so faces at the border
    # keep a centred crop (only the crop is padded: a close-up in an 8k photo is large).
    il, it, n = int(round(left)), int(round(top)), int(side)
    inside = img[max(it, 0) : max(0, min(it + n, h)), max(il, 0) : max(0, min(il + n, w))]
    by, bx = min(max(-it, 0), n), min(max(-il, 0), n)
    ih, iw = inside.shape[:2]
    crop = np.pad(inside, ((by, n - by - ih), (bx, n - bx - iw), (0, 0)), mode="edge")
    crop = _resize(crop, MESH_CROP / crop.shape[0])
    # the face mesh wants a face near upright: one lying sideways or upside down (a photo
    # turned without EXIF saying so) is read turned as its detection's key points say
    for turn in dict.fromkeys((face.turn, 0)):
        with _lock:
            result = _model("mesh").process(np.ascontiguousarray(np.rot90(crop, turn)))
        if result.multi_face_landmarks:
            break
    else:
        raise ProtocolError(
            errors.NO_FACE,
            "a face was detected but its landmarks could not be found (too blurred, "
            "occluded or turned more than about 45 degrees?)",
        )
    lm = result.multi_face_landmarks[0].landmark
    pts = np.array([[p.x, p.y, p.z] for p in lm]) * crop.shape[0]
    for _ in range(turn):  # back into the unturned (square) crop
        pts[:, :2] = np.stack([crop.shape[0] - pts[:, 1], pts[:, 0]], axis=1)
    k = int(side) / crop.shape[0]
    pts *= k
    pts[:, 0] += il
    pts[:, 1] += it
    return pts


def choose_face(
    faces: list[Face], index: int | None, box: list[float] | None, size: tuple[int, int]
) -> Face:
    """The requested face (by index, by overlap with ``box``) or the largest."""
    w, h = size
    if not faces:
        raise ProtocolError(
            errors.NO_FACE,
            f"no face found in the {w}x{h} image; use a photo where one face is clearly "
            "visible, roughly frontal (up to about 45 degrees turned)",
        )
    if box is not None:
        best = max(faces, key=lambda f: _iou(f.box, box))
        if _iou(best.box, box) <= 0:
            raise ProtocolError(
                errors.NO_FACE,
                f"no detected face overlaps the box {box}",
                {"faces": [f.to_dict() for f in faces]},
            )
        face = best
    elif index is not None:
        if index >= len(faces):
            raise ProtocolError(
                errors.BAD_REQUEST,
                f"face {index} asked for but {len(faces)} face(s) found (0 = largest)",
                {"faces": [f.to_dict() for f in faces]},
            )
        face = faces[index]
    else:
        face = faces[0]
    side = _side(face)
    if side < MIN_FACE_PX:
        raise ProtocolError(
            errors.FACE_TOO_SMALL,
            f"the face is {np.floor(side):.0f} px across; at least {MIN_FACE_PX} px is needed",
        )
    return face


def locate_face(
    img: np.ndarray, faces: list[Face], index: int | None, box: list[float] | None
) -> tuple[Face, np.ndarray]:
    """The face to build and its landmarks (see :func:`face_landmarks`).

    The face mesh searches a crop of twice the box, so a false box beside or around a real
    face can return the real face's landmarks: landmarks count as the box's own only where
    their centre lies in it and they span at least :data:`OWN_EXTENT` of it. A face asked
    for (``index``, ``box``) must pass; otherwise the first of the :data:`FACE_TRIES`
    largest that does is used, and failing all, the error of the largest one that is not
    a false box (whose landmarks are another face's) is raised: a blurred face's "too
    blurred", not the box around it that holds it."""
    h, w = img.shape[:2]
    face = choose_face(faces, index, box, (w, h))
    asked = index is not None or box is not None
    tries = [face] if asked else [f for f in faces[:FACE_TRIES] if _side(f) >= MIN_FACE_PX]
    failed: list[ProtocolError] = []
    for face in tries:
        try:
            return face, own_landmarks(img, face, faces)
        except ProtocolError as e:
            failed.append(e)
    raise next((e for e in failed if not e.details.get("false_box")), failed[0])


def own_landmarks(img: np.ndarray, face: Face, faces: list[Face]) -> np.ndarray:
    """``face``'s landmarks (:func:`face_landmarks`) if they are its own (see
    :func:`locate_face`); ProtocolError ``no_face`` naming why not (``faces``: the
    detections, for the error's details)."""
    h, w = img.shape[:2]
    landmarks = face_landmarks(img, face)
    # boxes are clipped to the photo; a face cut by its border centres outside it
    cx, cy = np.clip(landmarks[:, :2].mean(axis=0), 0, (w, h))
    x0, y0, x1, y1 = face.box
    if not (x0 <= cx <= x1 and y0 <= cy <= y1):
        raise ProtocolError(
            errors.NO_FACE,
            f"the face at {face.to_dict()['box']} has no landmarks of its own: the "
            f"ones found lie around ({cx:.0f}, {cy:.0f}), outside it",
            {"faces": [f.to_dict() for f in faces], "false_box": True},
        )
    extent = float((landmarks[:, :2].max(axis=0) - landmarks[:, :2].min(axis=0)).max())
    if extent < OWN_EXTENT * _side(face):
        raise ProtocolError(
            errors.NO_FACE,
            f"the face at {face.to_dict()['box']} has no landmarks of its own: the "
            f"face found inside it is {extent:.0f} px across, the box "
            f"{_side(face):.0f} px (a false box around a smaller face)",
            {"faces": [f.to_dict() for f in faces], "false_box": True},
        )
    return landmarks


def choosable(
    img: np.ndarray, faces: list[Face], used: int, limit: int = CHOOSABLE_TRIES
) -> list[int]:
    """Indices of the faces, of the ``limit`` largest, that have landmarks of their own:
    those a build asked for them could use (a doubtful box on clothing has none).
    ``used``: the face the build has landmarks for already."""
    out = []
    for i, face in enumerate(faces[:limit]):
        if i != used:
            if _side(face) < MIN_FACE_PX:
                continue
            try:
                own_landmarks(img, face, faces)
            except ProtocolError:
                continue
        out.append(i)
    return out


def _side(face: Face) -> float:
    return max(face.box[2] - face.box[0], face.box[3] - face.box[1])


#: MediaPipe face-mesh indices of the inner lip contour, in order around the mouth.
INNER_LIPS = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415,
              308, 324, 318, 402, 317, 14, 87, 178, 88, 95)  # fmt: skip
#: MediaPipe face-mesh indices of the lid margins, in order around each eye (subject's
#: left, right): the opening where the eyeball shows.
EYE_CONTOURS = (
    (362, 382, 381, 380, 374, 373, 390, 249, 263, 466, 388, 387, 386, 385, 384, 398),
    (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
)


def _inside(landmarks: np.ndarray, contours: tuple[tuple[int, ...], ...], shape) -> np.ndarray:
    """``[H, W]`` bool: pixels whose centres (+0.5) lie inside any of ``contours``."""
    from skimage.draw import polygon

    mask = np.zeros(shape, bool)
    for contour in contours:
        x, y = landmarks[list(contour), :2].T - 0.5
        rows, cols = polygon(y, x, shape)
        mask[rows, cols] = True
    return mask


def mouth_opening(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool: the photo's pixels whose centres lie inside the inner lip contour
    of ``landmarks`` (``[478, 2+]`` photo pixels, centres at +0.5), where an open mouth
    shows teeth and its inside rather than the face's surface. Empty when the lips are
    closed."""
    return _inside(landmarks, (INNER_LIPS,), shape)


def eye_openings(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool: the photo's pixels inside either eye's lid margins (as
    :func:`mouth_opening`), where the eyeballs show rather than the lids."""
    return _inside(landmarks, EYE_CONTOURS, shape)
