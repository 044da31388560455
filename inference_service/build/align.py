"""Place the ICT head in the photo: a similarity fit to MediaPipe landmarks → a camera."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..headmodel import MEDIAPIPE_TO_68, HeadModel, eye_distance

MIN_DISTANCE = 0.8  # metres: the assumed camera is never closer than this to the head


@dataclass(frozen=True)
class Alignment:
    """The photo's camera in the canonical head frame.

    Attributes:
        intrinsics: ``[4]`` (fx, fy, cx, cy) pixels.
        world_to_camera: ``[4, 4]`` OpenCV convention.
        rms: landmark residual, as a fraction of the inter-ocular distance.
    """

    intrinsics: np.ndarray
    world_to_camera: np.ndarray
    rms: float


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ≈ s R src + t`` (Umeyama 1991); R is proper."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    r = u @ sign @ vt
    s = float(np.trace(np.diag(d) @ sign) / (a**2).sum(axis=1).mean())
    return s, r, mu_d - s * r @ mu_s


def align(model: HeadModel, landmarks: np.ndarray, size: tuple[int, int]) -> Alignment:
    """Fit the neutral head to ``landmarks`` ``[478, 3]`` (photo pixels) of a ``size``
    (width, height) photo. Weak perspective: the fitted scale fixes the camera distance
    for an assumed focal length of 1.2x the longer side (at least ``MIN_DISTANCE``)."""
    mp_idx = np.array(list(MEDIAPIPE_TO_68))
    model_pts = model.neutral[model.landmarks68[list(MEDIAPIPE_TO_68.values())]].astype(np.float64)
    image_pts = landmarks[mp_idx].astype(np.float64)
    s, r, t = umeyama(model_pts, image_pts)

    w, h = size
    f = max(1.2 * max(w, h), s * MIN_DISTANCE)
    cx, cy = w / 2, h / 2
    distance = f / s
    w2c = np.eye(4)
    w2c[:3, :3] = r
    w2c[:3, 3] = [(t[0] - cx) / s, (t[1] - cy) / s, distance]

    fitted = s * model_pts @ r.T + t
    eyes = eye_distance(landmarks)
    rms = float(np.sqrt(((fitted[:, :2] - image_pts[:, :2]) ** 2).sum(1).mean()) / eyes)
    return Alignment(np.array([f, f, cx, cy]), w2c, rms)
