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
#: is mostly guessed, and the pitch alone past which it is. Read back by the fit from
#: renders of a built head (the astronaut's), yaw 30°, 40°, 45° read 31°, 40°, 43°; but
#: up or down 40° reads 32-33°, and past 45° the turn is under-read (50° reads 37°, 60°
#: 30°: MediaPipe's landmarks flatten there too), where the fit is loose instead.
TURNED_DEG = 35.0
PITCHED_DEG = 30.0
#: Landmark rms (share of the eye-corner distance) past which the fitted shape is off.
#: The astronaut fits within 0.022, Grace Hopper 0.029; renders of a head turned 40°
#: 0.054, 50° 0.082, 60° 0.066; a real 45° turned head 0.133.
LOOSE_RMS = 0.06
#: The preset enlarging the photo's head more than this makes a soft avatar.
MAX_ENLARGE = 2.0
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


def head_in_photo(
    model: HeadModel,
    corr: Correspondence,
    posed: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
) -> np.ndarray:
    """``[N, 2]`` photo pixels of the fitted head's vertices above the chin (in front of
    the camera): the head a photo must hold whole, the neck aside."""
    tri = model.triangles[corr.triangle[CHIN_LANDMARK]]
    chin = float(corr.bary[CHIN_LANDMARK] @ posed[tri][:, 2])
    regions = [model.region("face"), model.region("head_neck")]
    points = posed[np.unique(model.triangles[np.isin(model.triangle_region, regions)])]
    uv, z = project(points[points[:, 2] >= chin], intrinsics, world_to_camera)
    return uv[z > 0]


def cut_edges(uv: np.ndarray, size: tuple[int, int]) -> list[str]:
    """The photo's edges (of :data:`EDGES`) past which points ``uv`` ``[N, 2]`` lie."""
    w, h = size
    past = {
        "top": uv[:, 1] < 0,
        "bottom": uv[:, 1] > h,
        "left": uv[:, 0] < 0,
        "right": uv[:, 0] > w,
    }
    return [edge for edge in EDGES if past[edge].any()]


def listed(words: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def photo_warnings(
    model: HeadModel,
    corr: Correspondence,
    fit: GeometryFit,
    size: tuple[int, int],
    enlarge: float,
    faces: list[int],
    used: int,
    asked: bool,
    more: bool = False,
) -> list[dict[str, str]]:
    """The warnings of a build whose geometry ``fit`` came from a photo of ``size`` (w, h)
    holding the faces it could use, ``faces`` (their indices among those detected; a
    doubtful box between them is none, so the indices may skip; ``more``: and perhaps
    more, not all looked at); it used face ``used`` (``asked``: the request chose it);
    ``enlarge``: how much the preset's crop enlarges the photo's head."""
    out: list[dict[str, str]] = []

    def warn(code: str, message: str) -> None:
        out.append({"code": code, "message": message})

    posed = fit.photo_vertices(model)
    off, yaw, pitch = view_angles(fit.world_to_camera, posed.mean(0))
    if off > TURNED_DEG or abs(pitch) > PITCHED_DEG:
        warn("turned", f"the head is turned {off:.0f}° from the camera (yaw {yaw:.0f}°, pitch "
                       f"{pitch:.0f}°): its far side is guessed; a photo facing the camera "
                       "builds better")  # fmt: skip
    if fit.rms > LOOSE_RMS:
        warn("loose_fit", f"the head model fits the face's landmarks loosely (rms {fit.rms:.3f} "
                          f"of the eye-corner distance; a clear portrait fits within 0.03): the "
                          "avatar's shape may be off; a head turned far from the camera (past "
                          "about 45° its turn is under-read) or a partly hidden face does "
                          "this")  # fmt: skip
    head = head_in_photo(model, corr, posed, fit.intrinsics, fit.world_to_camera)
    edges = cut_edges(head, size)
    if edges:
        many = len(edges) > 1
        warn("cut", f"the photo's {listed(edges)} edge{'s cut' if many else ' cuts'} off the "
                    f"head: what lies past {'them' if many else 'it'} is guessed; a photo with "
                    "room round the head builds better")  # fmt: skip
    if enlarge > MAX_ENLARGE and len(head):
        tall = float(np.ptp(head[:, 1]))
        warn("small", f"the head is {tall:.0f} px from crown to chin in the photo, which the "
                      f"preset enlarges {enlarge:.1f}x: the avatar will look soft; a larger or "
                      "sharper photo of the face builds better")  # fmt: skip
    others = [str(i) for i in faces if i != used]
    if others and not asked:
        rest = (f"the others are faces {listed(others)}" if len(others) > 1
                else f"the other is face {others[0]}")  # fmt: skip
        warn("faces", f"{len(faces)}{' or more' * more} faces found; this avatar is face "
                      f"{used} (0 = largest), {rest}: choose another with --face or "
                      "--face-box, or the Blender panel's face buttons")  # fmt: skip
    return out
