"""Find faces (MediaPipe detectors, short and full range) and their 478 landmarks."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from protocol import errors
from protocol.errors import ProtocolError

DETECT_MAX_SIDE = 1920  # detectors run on a copy at most this big
MESH_CROP = 512  # landmarks are found on a square crop of this size around the face
MIN_FACE_PX = 24


@dataclass(frozen=True)
class Face:
    """A detected face. ``box`` is (x0, y0, x1, y1) in photo pixels."""

    box: tuple[float, float, float, float]
    score: float

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


def detect_faces(img: np.ndarray) -> list[Face]:
    """All faces, largest first (both detectors' boxes merged where they overlap)."""
    h, w = img.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = _resize(img, scale) if scale < 1 else img
    found: list[Face] = []
    with _lock:
        for key in ("short", "full"):
            result = _model(key).process(small)
            for det in result.detections or []:
                b = det.location_data.relative_bounding_box
                box = (b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h)
                box = (max(0.0, box[0]), max(0.0, box[1]), min(w, box[2]), min(h, box[3]))
                face = Face(box, float(det.score[0]))
                if face.area > 0 and all(_iou(face.box, f.box) < 0.4 for f in found):
                    found.append(face)
    return sorted(found, key=lambda f: -f.area)


def face_landmarks(img: np.ndarray, face: Face) -> np.ndarray:
    """478 landmarks ``[478, 3]`` in photo pixels (x right, y down, z away from camera,
    same scale as x) from a square crop around ``face``."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = face.box
    side = 2.2 * max(x1 - x0, y1 - y0)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    left, top = cx - side / 2, cy - side / 2
    # Crop with padding so faces at the border keep a centred crop.
    pad = int(np.ceil(side))
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    il, it = int(round(left)) + pad, int(round(top)) + pad
    crop = padded[it : it + int(side), il : il + int(side)]
    crop = _resize(crop, MESH_CROP / crop.shape[0])
    with _lock:
        result = _model("mesh").process(crop)
    if not result.multi_face_landmarks:
        raise ProtocolError(
            errors.NO_FACE,
            "a face was detected but its landmarks could not be found (too blurred, "
            "occluded or turned more than about 45 degrees?)",
        )
    lm = result.multi_face_landmarks[0].landmark
    k = int(side) / crop.shape[0]
    pts = np.array([[p.x, p.y, p.z] for p in lm]) * crop.shape[0] * k
    pts[:, 0] += il - pad
    pts[:, 1] += it - pad
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
    side = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
    if side < MIN_FACE_PX:
        raise ProtocolError(
            errors.FACE_TOO_SMALL,
            f"the face is {side:.0f} px across; at least {MIN_FACE_PX} px is needed",
        )
    return face


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
