"""What a build tells its user about the photo: where the avatar will fall short of it.

A build succeeds on a photo it can only half use (a head turned away, cut by the border,
a few pixels across), and its result then looks wrong without saying why. These checks
read the fitted head against the photo and name each such cause, with what would help.
Each warning is ``{"code": ..., "message": ...}``; the codes are :data:`CODES`.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.camera import project

from ..headmodel import Correspondence, HeadModel
from .fit import GeometryFit

#: Every warning code, in the order a build reports them.
CODES = ("turned", "loose_fit", "cut", "small", "faces")

#: Degrees between the face's forward direction and the camera past which the far side
#: is mostly guessed. Renders of a built head: 2° at the front, 31° at 30°, 43° at 45°
#: read back by the fit; its landmark rms there 0.019, 0.038 and 0.073.
TURNED_DEG = 35.0
#: Landmark rms (share of the eye-corner distance) past which the fitted shape is off.
#: The astronaut fits within 0.022, Grace Hopper 0.029; a real 45° turned head 0.133.
LOOSE_RMS = 0.06
#: A head whose box is under this share of the preset's crop is magnified past 2x.
SMALL_SHARE = 0.5
#: MediaPipe's chin landmark: the head above it is what a photo must hold whole.
CHIN_LANDMARK = 152
EDGES = ("top", "bottom", "left", "right")


def view_angles(world_to_camera: np.ndarray, center: np.ndarray) -> tuple[float, float, float]:
    """(off, yaw, pitch) in degrees: the camera's direction from ``center`` in the head
    frame (the face looks down -Y, +Z up), as ``orbit`` measures it, and its angle off
    the face's forward direction."""
    rot, t = world_to_camera[:3, :3], world_to_camera[:3, 3]
    d = -rot.T @ t - center
    d = d / np.linalg.norm(d)
    yaw = math.degrees(math.atan2(d[0], -d[1]))
    pitch = math.degrees(math.atan2(d[2], math.hypot(d[0], d[1])))
    off = math.degrees(math.acos(float(np.clip(-d[1], -1.0, 1.0))))
    return off, yaw, pitch


def cut_edges(
    model: HeadModel,
    corr: Correspondence,
    posed: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    size: tuple[int, int],
) -> list[str]:
    """The photo's edges (of :data:`EDGES`) that cut the fitted head above the chin."""
    tri = model.triangles[corr.triangle[CHIN_LANDMARK]]
    chin = float(corr.bary[CHIN_LANDMARK] @ posed[tri][:, 2])
    regions = [model.region("face"), model.region("head_neck")]
    points = posed[np.unique(model.triangles[np.isin(model.triangle_region, regions)])]
    uv, z = project(points[points[:, 2] >= chin], intrinsics, world_to_camera)
    uv = uv[z > 0]
    w, h = size
    past = {
        "top": uv[:, 1] < 0,
        "bottom": uv[:, 1] > h,
        "left": uv[:, 0] < 0,
        "right": uv[:, 0] > w,
    }
    return [edge for edge in EDGES if past[edge].any()]


def photo_warnings(
    model: HeadModel,
    corr: Correspondence,
    fit: GeometryFit,
    size: tuple[int, int],
    head_side: float,
    crop: int,
    faces: int,
    used: int,
    asked: bool,
) -> list[dict[str, str]]:
    """The warnings of a build whose geometry ``fit`` came from a photo of ``size`` (w, h)
    holding ``faces`` faces, of which it used ``used`` (``asked``: the request chose it);
    ``head_side``: pixels across the head's box in the photo; ``crop``: the preset's."""
    out: list[dict[str, str]] = []

    def warn(code: str, message: str) -> None:
        out.append({"code": code, "message": message})

    posed = fit.photo_vertices(model)
    off, yaw, pitch = view_angles(fit.world_to_camera, posed.mean(0))
    if off > TURNED_DEG:
        warn("turned", f"the head is turned {off:.0f}° from the camera (yaw {yaw:.0f}°, pitch "
                       f"{pitch:.0f}°): its far side is guessed; a photo facing the camera "
                       "builds better")  # fmt: skip
    if fit.rms > LOOSE_RMS:
        warn("loose_fit", f"the head model fits the face's landmarks loosely (rms {fit.rms:.3f} "
                          f"of the eye-corner distance; a clear portrait fits within 0.03): the "
                          "avatar's shape may be off")  # fmt: skip
    edges = cut_edges(model, corr, posed, fit.intrinsics, fit.world_to_camera, size)
    if edges:
        many = len(edges) > 1
        warn("cut", f"the photo's {' and '.join(edges)} edge{'s cut' if many else ' cuts'} off "
                    f"the head: what lies past {'them' if many else 'it'} (hair, skull, face) "
                    "is guessed; a photo with room round the head builds better")  # fmt: skip
    if head_side < SMALL_SHARE * crop:
        warn("small", f"the head is {head_side:.0f} px across in the photo and the preset "
                      f"samples it at {crop} px: the avatar will look soft; a larger or "
                      "sharper photo of the face builds better")  # fmt: skip
    if faces > 1 and not asked:
        warn("faces", f"{faces} faces found; this avatar is face {used} (0 = largest): "
                      "choose another with --face or --face-box, or the Blender panel's "
                      "face buttons")  # fmt: skip
    return out
