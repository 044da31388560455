"""The rigged bundle: an avatar others can animate without splatface.

``bundle.json`` (manifest), ``head.glb`` (rest mesh + the 52 ARKit morph targets, and
the avatar's colour texture when it has one),
``gaussians.npz`` (the Gaussians bound to the mesh's triangles) and ``rest.ply`` (the rest
pose as a standard INRIA splat file). ``docs/rigged-bundle.md`` documents every array and
the posing procedure; it is the one description of the formula (``posing.pose`` is the
implementation the tests hold it to).
"""

from __future__ import annotations

import io
import json
import re
import zipfile

import numpy as np

from kernels.sh import degree_of
from protocol.animation import head_pivot
from protocol.arkit import ARKIT_NAMES

from ..avatar import Avatar
from ..posing import GAZE_PITCH, GAZE_YAW, pose
from ..store import bounding_sphere
from .gltf import OURS_TO_GLTF, mesh_glb, split_seams
from .ply import ply_bytes

FORMAT = "splatface-rigged-bundle"
VERSION = 1
SPEC = "docs/rigged-bundle.md"

#: The files of a bundle, in the order the zip holds them.
FILES = ("bundle.json", "head.glb", "gaussians.npz", "rest.ply")

#: ``gaussians.npz``: array name → dtype (shapes in the spec).
GAUSSIAN_ARRAYS = {
    "triangle": np.int32,
    "bary": np.float32,
    "offset": np.float32,
    "rotation": np.float32,
    "log_scale": np.float32,
    "opacity_logit": np.float32,
    "sh": np.float32,
    "appear": np.float32,
}

_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same avatar gives the same bytes


def manifest(avatar: Avatar) -> dict:
    """The JSON-able content of ``bundle.json``."""
    k = avatar.gaussians.sh.shape[1]
    degree = degree_of(k)
    return {
        "format": FORMAT,
        "version": VERSION,
        "spec": SPEC,
        "avatar": {"id": avatar.id, "name": avatar.name, "created": avatar.meta.get("created")},
        "files": {
            "head.glb": "rest mesh (glTF 2.0 axes) with 52 ARKit morph targets"
            + (" and its colour texture" if avatar.texture is not None else ""),
            "gaussians.npz": "Gaussians bound to head.glb's triangles (triangle-local)",
            "rest.ply": "rest pose, INRIA 3DGS layout, canonical frame",
        },
        "counts": {
            "vertices": int(len(avatar.vertices)),
            "triangles": int(len(avatar.triangles)),
            "gaussians": int(len(avatar.gaussians)),
            "morph_targets": len(ARKIT_NAMES),
        },
        "arkit_names": list(ARKIT_NAMES),
        "units": "metres",
        "frame": {"handedness": "right", "up": "+Z", "front": "-Y", "subject_left": "+X"},
        "gltf_axes": {
            "gltf_from_canonical": OURS_TO_GLTF.astype(int).tolist(),
            "canonical_from_gltf": OURS_TO_GLTF.T.astype(int).tolist(),
            "rule": "(x, y, z)_gltf = (x, z, -y)_canonical; (x, y, z)_canonical = (x, -z, y)_gltf",
        },
        "quaternion_order": "wxyz",
        "sh_degree": degree,
        "sh_bases": int(k),
        "gaussian_arrays": {n: np.dtype(t).name for n, t in GAUSSIAN_ARRAYS.items()},
        "gaze": gaze(avatar),
        "head_motion": {
            # where splatface turns the head for a take's recorded angles (posing step 5)
            "pivot": [float(v) for v in head_pivot(**bounding_sphere(avatar))],
            "angles": "radians; R = Rz(yaw) Rx(pitch) Ry(-roll); H = [[R, pivot - R pivot]]",
        },
    }


def gaze(avatar: Avatar) -> dict:
    """The eye rig the morph targets cannot hold: eyeballs turn rigidly for gaze. Each
    eye's vertices are head.glb's: the avatar's and their copies at UV seams."""
    source = glb_vertices(avatar)
    eyes = [
        {
            "side": side,
            "center": [float(x) for x in center],
            "vertices": [int(i) for i in np.flatnonzero(np.isin(source, ids))],
        }
        for side, (ids, center) in zip(("left", "right"), avatar.eyes, strict=False)
    ]
    return {
        "yaw_at_weight_1": float(GAZE_YAW),
        "pitch_at_weight_1": float(GAZE_PITCH),
        "eyes": eyes,
    }


def glb_vertices(avatar: Avatar) -> np.ndarray:
    """``[V']`` the avatar vertex behind each of head.glb's vertices (V' > V where a
    texture's UV seams split vertices)."""
    if avatar.texture is None:
        return np.arange(len(avatar.vertices))
    return split_seams(len(avatar.vertices), avatar.triangles, avatar.texture.corner_uvs())[0]


def texture_png(avatar: Avatar) -> bytes | None:
    """The avatar's texture as PNG bytes (None without one)."""
    if avatar.texture is None:
        return None
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(avatar.texture.image).save(buf, format="PNG")
    return buf.getvalue()


def gaussians_npz(avatar: Avatar) -> bytes:
    """``gaussians.npz``: plain arrays (``np.load(..., allow_pickle=False)`` reads them)."""
    g = avatar.gaussians
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, dtype in GAUSSIAN_ARRAYS.items():
            arr = np.ascontiguousarray(getattr(g, name), dtype)
            npy = io.BytesIO()
            np.lib.format.write_array(npy, arr, allow_pickle=False)
            zf.writestr(_info(name + ".npy", zipfile.ZIP_STORED), npy.getvalue())
    return buf.getvalue()


def bundle_files(avatar: Avatar) -> dict[str, bytes]:
    """The bundle's files by name, in :data:`FILES` order."""
    avatar.validate()
    files = {
        "bundle.json": _json(manifest(avatar)),
        "head.glb": mesh_glb(
            avatar.vertices,
            avatar.triangles,
            avatar.shape_deltas,
            ARKIT_NAMES,
            name="head",
            texcoords=None if avatar.texture is None else avatar.texture.corner_uvs(),
            png=texture_png(avatar),
        ),
        "gaussians.npz": gaussians_npz(avatar),
        "rest.ply": ply_bytes(pose(avatar)),
    }
    assert tuple(files) == FILES
    return files


def bundle_zip(avatar: Avatar) -> bytes:
    """The bundle as one zip (deflated, fixed order and timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in bundle_files(avatar).items():
            zf.writestr(_info(name, zipfile.ZIP_DEFLATED), data)
    return buf.getvalue()


def _json(obj) -> bytes:
    """Indented JSON with lists of numbers kept on one line each."""
    text = json.dumps(obj, indent=2)

    def flat(m: re.Match) -> str:  # strings (names may hold brackets) stay as they are
        return m.group(0) if m.group(1) is None else "[" + " ".join(m.group(1).split()) + "]"

    text = re.sub(r'"(?:[^"\\]|\\.)*"|\[([^\[\]{}"]*)\]', flat, text)
    return (text + "\n").encode("utf-8")


def _info(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info
