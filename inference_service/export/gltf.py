"""A minimal glTF 2.0 binary (``.glb``) writer for one morphable mesh (numpy only).

The file holds one scene with one node carrying one mesh with one triangle primitive:
``POSITION`` and smooth ``NORMAL`` (float32 VEC3), ``indices`` (UNSIGNED_INT), and one
morph target per shape with ``POSITION`` deltas. The shapes' names go into
``mesh.extras.targetNames`` (Blender's importer and three.js name shape keys / morph
targets from it) and the mesh's default ``weights`` are all zero.

Axes: the service's canonical frame is metres, +Z up, face towards -Y, subject's left at
+X; glTF is +Y up with the front towards +Z. Points and deltas are written as
``(x, y, z)_gltf = (x, z, -y)_ours`` (a rotation, so winding and handedness are kept);
``(x, y, z)_ours = (x, -z, y)_gltf`` goes back. Units stay metres.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import numpy as np

from ..geometry import vertex_normals

GLB_MAGIC = 0x46546C67  # b"glTF"
CHUNK_JSON = 0x4E4F534A  # b"JSON"
CHUNK_BIN = 0x004E4942  # b"BIN\0"

FLOAT = 5126
UNSIGNED_INT = 5125
ARRAY_BUFFER = 34962
ELEMENT_ARRAY_BUFFER = 34963
TRIANGLES = 4

#: Rows are glTF axes, columns ours: ``p_gltf = OURS_TO_GLTF @ p_ours``.
OURS_TO_GLTF = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)


def to_gltf_axes(points: np.ndarray) -> np.ndarray:
    """Points or vectors ``[..., 3]`` in the canonical frame → glTF axes (same dtype)."""
    p = np.asarray(points)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1)


def from_gltf_axes(points: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_gltf_axes`."""
    p = np.asarray(points)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], axis=-1)


def mesh_glb(
    vertices: np.ndarray,
    triangles: np.ndarray,
    morph_deltas: np.ndarray,
    morph_names: Sequence[str],
    name: str = "head",
) -> bytes:
    """A ``.glb`` of the mesh ``vertices [V, 3]`` / ``triangles [T, 3]`` (canonical frame,
    metres, counter-clockwise seen from outside) with morph targets ``morph_deltas
    [M, V, 3]`` named ``morph_names``. Raises ``ValueError`` for inconsistent input."""
    v = np.asarray(vertices)
    t = np.asarray(triangles)
    d = np.asarray(morph_deltas)
    names = [str(n) for n in morph_names]
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"vertices must be [V, 3] with V > 0, got {v.shape}")
    if t.ndim != 2 or t.shape[1] != 3 or len(t) == 0:
        raise ValueError(f"triangles must be [T, 3] with T > 0, got {t.shape}")
    if t.min() < 0 or t.max() >= len(v):
        raise ValueError("triangle index out of range")
    if d.ndim != 3 or d.shape[1:] != v.shape:
        raise ValueError(f"morph_deltas must be [M, {len(v)}, 3], got {d.shape}")
    if len(names) != len(d):
        raise ValueError(f"{len(d)} morph targets but {len(names)} names")
    if not (np.isfinite(v).all() and np.isfinite(d).all()):
        raise ValueError("vertices or morph deltas have NaN or inf")

    pos = np.ascontiguousarray(to_gltf_axes(v.astype(np.float32)), "<f4")
    nrm = np.ascontiguousarray(vertex_normals(pos, t), "<f4")
    idx = np.ascontiguousarray(t, "<u4").reshape(-1)
    targets = [np.ascontiguousarray(to_gltf_axes(x.astype(np.float32)), "<f4") for x in d]

    blob = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []

    def add(arr: np.ndarray, kind: str, component: int, target: int, bounds: bool) -> int:
        while len(blob) % 4:  # every view starts 4-byte aligned
            blob.append(0)
        data = arr.tobytes()
        views.append(
            {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data), "target": target}
        )
        blob.extend(data)
        acc = {
            "bufferView": len(views) - 1,
            "componentType": component,
            "count": int(len(arr)),
            "type": kind,
        }
        if bounds:
            flat = arr.reshape(len(arr), -1)
            acc["min"] = [_num(x) for x in flat.min(axis=0)]
            acc["max"] = [_num(x) for x in flat.max(axis=0)]
        accessors.append(acc)
        return len(accessors) - 1

    primitive: dict = {
        "attributes": {
            "POSITION": add(pos, "VEC3", FLOAT, ARRAY_BUFFER, True),
            "NORMAL": add(nrm, "VEC3", FLOAT, ARRAY_BUFFER, False),
        },
        "indices": add(idx, "SCALAR", UNSIGNED_INT, ELEMENT_ARRAY_BUFFER, True),
        "mode": TRIANGLES,
    }
    mesh: dict = {"name": name, "primitives": [primitive]}
    if targets:  # glTF forbids an empty targets array
        primitive["targets"] = [
            {"POSITION": add(x, "VEC3", FLOAT, ARRAY_BUFFER, True)} for x in targets
        ]
        mesh["weights"] = [0.0] * len(targets)
        mesh["extras"] = {"targetNames": names}
    while len(blob) % 4:
        blob.append(0)

    doc = {
        "asset": {"version": "2.0", "generator": "splatface"},
        "scene": 0,
        "scenes": [{"name": name, "nodes": [0]}],
        "nodes": [{"name": name, "mesh": 0}],
        "meshes": [mesh],
        "buffers": [{"byteLength": len(blob)}],
        "bufferViews": views,
        "accessors": accessors,
    }
    js = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    js += b" " * (-len(js) % 4)  # the JSON chunk is padded with spaces
    total = 12 + 8 + len(js) + 8 + len(blob)
    return b"".join(
        [
            struct.pack("<III", GLB_MAGIC, 2, total),
            struct.pack("<II", len(js), CHUNK_JSON),
            js,
            struct.pack("<II", len(blob), CHUNK_BIN),
            bytes(blob),
        ]
    )


def _num(x) -> int | float:
    """A JSON number that reads back as exactly the same float32 (or int)."""
    if isinstance(x, np.integer):
        return int(x)
    return float(np.float32(x))
