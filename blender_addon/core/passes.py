"""Service passes → Blender render passes, and depth compositing of several avatars.

Service passes are OpenCV images (row 0 at the top, ``rgb`` linear premultiplied,
``depth`` camera z with +inf where empty, ``normal`` in camera space). Blender's render
result wants rows bottom-up, RGBA premultiplied ``Combined``, ``Depth`` with a large
finite value where empty (the 1e10 Cycles and EEVEE write) and ``Normal`` in world space
(as Cycles writes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: What Blender's own engines write into ``Depth`` where nothing was hit.
EMPTY_DEPTH = 1.0e10


@dataclass(frozen=True)
class Layer:
    """One avatar's passes for one frame (OpenCV image layout).

    Attributes:
        rgb: float32 ``[H, W, 3]`` linear, premultiplied.
        alpha: float32 ``[H, W]``.
        depth: float32 ``[H, W]`` camera z, metres, +inf where empty.
        normal: float32 ``[H, W, 3]`` camera space (OpenCV), 0 where empty.
    """

    rgb: np.ndarray
    alpha: np.ndarray
    depth: np.ndarray
    normal: np.ndarray

    @classmethod
    def from_render(cls, frames: dict[str, np.ndarray], index: int = 0) -> Layer:
        """Frame ``index`` of a ``Client.render`` reply holding the four passes."""
        missing = [p for p in ("rgb", "alpha", "depth") if p not in frames]
        if missing:
            raise ValueError(f"render reply lacks passes: {', '.join(missing)}")
        rgb, alpha, depth = (_native_view(frames[p][index]) for p in ("rgb", "alpha", "depth"))
        normal = frames.get("normal")
        return cls(
            rgb,
            alpha,
            depth,
            np.zeros_like(rgb) if normal is None else _native_view(normal[index]),
        )


def composite(layers: list[Layer]) -> Layer:
    """Layers composited front to back per pixel by depth (premultiplied "over").

    Each avatar is taken as a surface at its own depth per pixel: exact when avatars do
    not interpenetrate, which heads in one scene rarely do. Depth and normal come from
    the nearest layer with any coverage.
    """
    if not layers:
        raise ValueError("composite needs at least one layer")
    if len(layers) == 1:
        return layers[0]
    depth = np.stack([lay.depth for lay in layers])  # [K, H, W]
    order = np.argsort(depth, axis=0, kind="stable")
    rgb = np.stack([lay.rgb for lay in layers])
    alpha = np.stack([lay.alpha for lay in layers])
    normal = np.stack([lay.normal for lay in layers])
    take = np.take_along_axis
    rgb = take(rgb, order[..., None], axis=0)
    alpha = take(alpha, order, axis=0)
    depth = take(depth, order, axis=0)
    normal = take(normal, order[..., None], axis=0)
    out_rgb = np.zeros_like(rgb[0])
    out_alpha = np.zeros_like(alpha[0])
    for k in range(len(layers)):
        out_rgb += (1.0 - out_alpha)[..., None] * rgb[k]
        out_alpha += (1.0 - out_alpha) * alpha[k]
    return Layer(out_rgb, out_alpha, depth[0], normal[0])


def to_blender(
    layer: Layer, camera_to_world_rotation: np.ndarray, names: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Blender pass buffers, flattened, rows bottom-up.

    Args:
        layer: the composited frame.
        camera_to_world_rotation: float64 ``[3, 3]`` of the OpenCV camera (normals are
            rotated into world space).

        names: the passes wanted (all four when empty).

    Returns:
        ``Combined`` ``[H*W*4]``, ``Alpha`` ``[H*W]``, ``Depth`` ``[H*W]``,
        ``Normal`` ``[H*W*3]``, float32 (those in ``names``).
    """
    names = names or ("Combined", "Alpha", "Depth", "Normal")
    h, w = layer.alpha.shape
    rows = slice(None, None, -1)
    out = {}
    if "Combined" in names:
        combined = np.concatenate((layer.rgb[rows], layer.alpha[rows, :, None]), axis=2)
        out["Combined"] = _native(combined)
    if "Alpha" in names:
        out["Alpha"] = _native(layer.alpha[rows])
    if "Depth" in names:
        depth = _native(layer.depth[rows])
        np.copyto(depth, np.float32(EMPTY_DEPTH), where=np.isinf(depth))
        out["Depth"] = depth
    if "Normal" in names:
        rot = np.asarray(camera_to_world_rotation, np.float32)
        normal = (layer.normal.reshape(-1, 3) @ rot.T).reshape(h, w, 3)[rows]
        out["Normal"] = _native(normal)
    return out


def _native(x: np.ndarray) -> np.ndarray:
    """A flat, C-contiguous, native-order float32 copy.

    Arrays decoded from the wire carry an explicit little-endian dtype (buffer format
    ``<f``); Blender's ``foreach_set`` does not recognise that format and crashes, so
    every buffer handed to it is rebuilt with the native ``f``.
    """
    return np.ascontiguousarray(_native_view(x)).reshape(-1)


def _native_view(x: np.ndarray) -> np.ndarray:
    """``x`` as native float32: a view when it already is float32 in another spelling."""
    x = np.asarray(x)
    return x.view(np.float32) if x.dtype == np.float32 else x.astype(np.float32)
