"""Blender camera → protocol camera (OpenCV intrinsics and world-to-camera).

Blender cameras look down −Z with +Y up; OpenCV cameras look down +Z with +Y down, so
OpenCV's camera-to-world is Blender's with the Y and Z columns negated.

Intrinsics follow Blender's own view plane (``BKE_camera_params_compute_viewplane``):

- the sensor size is ``sensor_height`` for fit VERTICAL, else ``sensor_width`` (AUTO
  uses the width, applied to the longer side);
- the fit is resolved by pixel-aspect-corrected size: AUTO is HORIZONTAL when
  ``pixel_aspect_x * width >= pixel_aspect_y * height``;
- ``view_px`` is ``width`` (horizontal fit) or ``height * pa_y / pa_x`` (vertical), so
  ``fx = lens / sensor * view_px`` and ``fy = fx * pa_x / pa_y``;
- shift moves the principal point by ``shift * view_px`` (``/ (pa_y / pa_x)`` in y, as
  shift is measured in x pixels): ``cx = W/2 - shift_x * view_px``,
  ``cy = H/2 + shift_y * view_px * pa_x / pa_y`` (OpenCV rows grow downwards).

Pixel centres are at +0.5, as in ``protocol.camera``: the frame spans [0, W] x [0, H]
and Blender's normalised view coordinates (0..1, origin bottom left) map to
``u = x * W``, ``v = (1 - y) * H``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")
_BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class BlenderCamera:
    """What the conversion needs from a Blender camera and the scene's render settings.

    Attributes:
        matrix_world: float64 ``[4, 4]`` camera-to-world (scale is ignored).
        lens: focal length, mm.
        sensor_width, sensor_height: mm.
        sensor_fit: ``AUTO``, ``HORIZONTAL`` or ``VERTICAL``.
        shift_x, shift_y: in units of the larger view dimension, as Blender's.
        resolution_x, resolution_y: pixels before ``resolution_percentage``.
        resolution_percentage: 1-100 (Blender allows more; any positive value works).
        pixel_aspect_x, pixel_aspect_y: Blender's pixel aspect.
        clip_start, clip_end: the camera's clip range, scene units (None: the service's).
    """

    matrix_world: np.ndarray
    lens: float
    sensor_width: float = 36.0
    sensor_height: float = 24.0
    sensor_fit: str = "AUTO"
    shift_x: float = 0.0
    shift_y: float = 0.0
    resolution_x: int = 1920
    resolution_y: int = 1080
    resolution_percentage: int = 100
    pixel_aspect_x: float = 1.0
    pixel_aspect_y: float = 1.0
    clip_start: float | None = None
    clip_end: float | None = None


@dataclass(frozen=True)
class ProtocolCamera:
    """A camera as the service takes it.

    Attributes:
        intrinsics: float64 ``[4]`` (fx, fy, cx, cy), pixels, centres at +0.5.
        world_to_camera: float64 ``[4, 4]``, OpenCV axes.
        width, height: output size in pixels.
        near, far: what lies nearer or farther along the view axis is not drawn (scene
            units; None: the service's defaults, 0.01 and 100).
    """

    intrinsics: np.ndarray
    world_to_camera: np.ndarray
    width: int
    height: int
    near: float | None = None
    far: float | None = None


#: The clip range the protocol takes (``protocol/SPEC.md``: render's near and far).
NEAR_RANGE, FAR_RANGE = (1e-4, 1e3), (1e-3, 1e5)


def clip_range(start: float | None, end: float | None) -> tuple[float | None, float | None]:
    """A Blender clip range as the protocol's ``near``/``far``: held inside the ranges the
    protocol takes (a 10 km ``clip_end`` draws all a head can be seen at anyway)."""
    near = None if start is None else float(np.clip(start, *NEAR_RANGE))
    far = None if end is None else float(np.clip(end, *FAR_RANGE))
    if near is not None and far is not None and far <= near:
        far = min(FAR_RANGE[1], max(near * 1.001, FAR_RANGE[0]))
    return near, far


def render_size(resolution_x: int, resolution_y: int, percentage: float) -> tuple[int, int]:
    """Pixel size Blender renders at (it truncates ``resolution * percentage / 100``)."""
    return (
        max(1, int(resolution_x * percentage / 100)),
        max(1, int(resolution_y * percentage / 100)),
    )


def render_region(
    width: int, height: int, min_x: float, max_x: float, min_y: float, max_y: float
) -> tuple[int, int, int, int]:
    """(x, y, w, h) in pixels of a render region (Ctrl+B) given as shares of the frame, cut
    as Blender cuts it: share times size in single precision, truncated (in double,
    0.9 × 120 is 107.99..., a row fewer than Blender's 108); ``y`` counts rows from the
    bottom, as Blender does."""
    f = np.float32

    def cut(share: float, size: int) -> int:
        return int(f(share) * f(size))

    x0, x1 = cut(min_x, width), cut(max_x, width)
    y0, y1 = cut(min_y, height), cut(max_y, height)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def crop(camera: ProtocolCamera, x: int, y: int, w: int, h: int) -> ProtocolCamera:
    """The camera that sees only the part (x, y, w, h) of ``camera``'s frame, ``y`` from
    the bottom (:func:`render_region`): the same view, its principal point moved."""
    fx, fy, cx, cy = camera.intrinsics
    top = camera.height - (y + h)  # the protocol's rows run downwards
    k = np.array([fx, fy, cx - x, cy - top])
    return replace(camera, intrinsics=k, width=w, height=h)


def blender_to_opencv_world_to_camera(matrix_world: np.ndarray) -> np.ndarray:
    """World-to-camera ``[4, 4]`` (OpenCV axes) of a Blender camera-to-world matrix. Its
    scale (and any shear a parent's uneven scale adds) is dropped: the nearest rotation
    is kept, as the service takes cameras as rotations. ValueError for a camera scaled to
    nothing or mirrored (a negative scale)."""
    m = np.asarray(matrix_world, np.float64).reshape(4, 4)
    rot = m[:3, :3]
    if np.any(np.linalg.norm(rot, axis=0) < 1e-12):
        raise ValueError("camera matrix_world has a zero scale axis")
    if np.linalg.det(rot) <= 0:
        raise ValueError("the camera is mirrored (a negative scale): the service renders no mirror")
    u, _, vt = np.linalg.svd(rot)
    cam_to_world = np.eye(4)
    cam_to_world[:3, :3] = u @ vt
    cam_to_world[:3, 3] = m[:3, 3]
    return np.linalg.inv(cam_to_world @ _BLENDER_TO_OPENCV)


def opencv_to_blender_matrix_world(world_to_camera: np.ndarray) -> np.ndarray:
    """The inverse conversion: a Blender camera-to-world ``[4, 4]``."""
    return np.linalg.inv(np.asarray(world_to_camera, np.float64)) @ _BLENDER_TO_OPENCV


def intrinsics(cam: BlenderCamera) -> tuple[np.ndarray, int, int]:
    """(fx, fy, cx, cy) and the output width and height of ``cam`` (see module notes)."""
    if cam.sensor_fit not in SENSOR_FITS:
        raise ValueError(f"sensor_fit must be one of {SENSOR_FITS}, got {cam.sensor_fit!r}")
    if not (cam.lens > 0 and cam.sensor_width > 0 and cam.sensor_height > 0):
        raise ValueError("lens and sensor size must be positive")
    if not (cam.pixel_aspect_x > 0 and cam.pixel_aspect_y > 0):
        raise ValueError("pixel aspect must be positive")
    width, height = render_size(cam.resolution_x, cam.resolution_y, cam.resolution_percentage)
    ycor = cam.pixel_aspect_y / cam.pixel_aspect_x
    fit = cam.sensor_fit
    sensor = cam.sensor_height if fit == "VERTICAL" else cam.sensor_width
    if fit == "AUTO":
        wide = cam.pixel_aspect_x * width >= cam.pixel_aspect_y * height
        fit = "HORIZONTAL" if wide else "VERTICAL"
    view_px = width if fit == "HORIZONTAL" else ycor * height
    fx = cam.lens / sensor * view_px
    fy = fx / ycor
    cx = width / 2 - cam.shift_x * view_px
    cy = height / 2 + cam.shift_y * view_px / ycor
    return np.array([fx, fy, cx, cy]), width, height


def convert(cam: BlenderCamera) -> ProtocolCamera:
    """The protocol camera of a Blender camera."""
    k, width, height = intrinsics(cam)
    w2c = blender_to_opencv_world_to_camera(cam.matrix_world)
    return ProtocolCamera(k, w2c, width, height, *clip_range(cam.clip_start, cam.clip_end))


def from_projection(
    view_matrix: np.ndarray, window_matrix: np.ndarray, width: int, height: int
) -> ProtocolCamera:
    """The protocol camera of a 3D View (``region_data.view_matrix``/``window_matrix``).

    Blender's perspective projection maps view-space (x, y, z) to NDC
    ``x' = P00 * x / -z - P02`` (likewise y), NDC spanning the ``width`` x ``height``
    pixels, so ``fx = P00 * W / 2``, ``cx = (1 - P02) * W / 2``, ``fy = P11 * H / 2``,
    ``cy = (1 + P12) * H / 2`` (OpenCV rows grow downwards). Orthographic views raise.
    """
    p = np.asarray(window_matrix, np.float64).reshape(4, 4)
    if abs(p[3, 3]) > 1e-9 or abs(p[3, 2] + 1.0) > 1e-6:
        raise ValueError("only perspective views can be rendered (the view is orthographic)")
    k = np.array(
        [
            p[0, 0] * width / 2,
            p[1, 1] * height / 2,
            (1.0 - p[0, 2]) * width / 2,
            (1.0 + p[1, 2]) * height / 2,
        ]
    )
    w2c = _BLENDER_TO_OPENCV @ np.asarray(view_matrix, np.float64).reshape(4, 4)
    # the view's clip range: z_ndc = (P22 z + P23) / -z is -1 at -near and +1 at -far
    near, far = clip_range(p[2, 3] / (p[2, 2] - 1.0), p[2, 3] / (p[2, 2] + 1.0))
    return ProtocolCamera(k, w2c, int(width), int(height), near, far)
