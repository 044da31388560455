"""A minimal glTF 2.0 binary (``.glb``) writer for one morphable mesh (numpy only).

The file holds one scene with one node carrying one mesh with one triangle primitive:
``POSITION`` and smooth ``NORMAL`` (float32 VEC3), ``indices`` (UNSIGNED_INT), and one
morph target per shape with ``POSITION`` deltas. The shapes' names go into
``mesh.extras.targetNames`` (Blender's importer and three.js name shape keys / morph
targets from it) and the mesh's default ``weights`` are all zero.

With a texture (``texcoords`` per triangle corner and a PNG), the primitive also has
``TEXCOORD_0`` and a material whose ``baseColorTexture`` is the PNG, embedded through a
bufferView. A vertex whose corners carry different UVs (a UV seam) becomes several glTF
vertices: the first ``V`` keep the input's order, the copies follow, each with its
original's position, normal and morph deltas; ``meshes[0].extras.sourceVertices`` lists
the input vertex of each copy (glTF vertex ``V + i`` copies ``sourceVertices[i]``).
UVs are glTF's: origin at the image's top-left corner, v downwards.

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
LINEAR = 9729
LINEAR_MIPMAP_LINEAR = 9987
CLAMP_TO_EDGE = 33071
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
    texcoords: np.ndarray | None = None,
    png: bytes | None = None,
) -> bytes:
    """A ``.glb`` of the mesh ``vertices [V, 3]`` / ``triangles [T, 3]`` (canonical frame,
    metres, counter-clockwise seen from outside) with morph targets ``morph_deltas
    [M, V, 3]`` named ``morph_names``; textured when given ``texcoords [T, 3, 2]`` (each
    triangle corner's UV, glTF's convention) and the ``png`` image's bytes. Raises
    ``ValueError`` for inconsistent input."""
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
    if (texcoords is None) != (png is None):
        raise ValueError("texcoords and png come together")
    if texcoords is not None:
        texcoords = np.asarray(texcoords)
        if texcoords.shape != (len(t), 3, 2) or not np.isfinite(texcoords).all():
            raise ValueError(f"texcoords must be finite [{len(t)}, 3, 2], got {texcoords.shape}")
        source, t, uv = split_seams(len(v), t, texcoords)
    else:
        source, uv = np.arange(len(v)), None

    pos = np.ascontiguousarray(to_gltf_axes(v.astype(np.float32)), "<f4")
    nrm = np.ascontiguousarray(vertex_normals(pos, np.asarray(triangles))[source], "<f4")
    pos = pos[source]
    idx = np.ascontiguousarray(t, "<u4").reshape(-1)
    targets = [np.ascontiguousarray(to_gltf_axes(x.astype(np.float32))[source], "<f4") for x in d]

    blob = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []

    def view(data: bytes, target: int | None) -> int:
        while len(blob) % 4:  # every view starts 4-byte aligned
            blob.append(0)
        views.append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)})
        if target is not None:
            views[-1]["target"] = target
        blob.extend(data)
        return len(views) - 1

    def add(arr: np.ndarray, kind: str, component: int, target: int, bounds: bool) -> int:
        view(arr.tobytes(), target)
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
    extras: dict = {}
    if targets:  # glTF forbids an empty targets array
        primitive["targets"] = [
            {"POSITION": add(x, "VEC3", FLOAT, ARRAY_BUFFER, True)} for x in targets
        ]
        mesh["weights"] = [0.0] * len(targets)
        extras["targetNames"] = names
    textured: dict = {}
    if uv is not None and png is not None:
        primitive["attributes"]["TEXCOORD_0"] = add(
            np.ascontiguousarray(uv, "<f4"), "VEC2", FLOAT, ARRAY_BUFFER, False
        )
        primitive["material"] = 0
        extras["sourceVertices"] = [int(i) for i in source[len(v) :]]
        textured = {
            "materials": [{
                "name": f"{name}_colour",
                "pbrMetallicRoughness": {
                    "baseColorTexture": {"index": 0},
                    "metallicFactor": 0.0,
                    "roughnessFactor": 1.0,
                },
            }],
            "textures": [{"sampler": 0, "source": 0}],
            "samplers": [{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR,
                          "wrapS": CLAMP_TO_EDGE, "wrapT": CLAMP_TO_EDGE}],
            "images": [{"bufferView": view(png, None), "mimeType": "image/png"}],
        }  # fmt: skip
    if extras:
        mesh["extras"] = extras
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
        **textured,
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


def split_seams(
    count: int, triangles: np.ndarray, texcoords: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One glTF vertex per distinct (vertex, UV) pair of the mesh's ``count`` vertices.

    Args:
        triangles: ``[T, 3]`` vertex indices.
        texcoords: ``[T, 3, 2]`` each corner's UV.
    Returns:
        source ``[V']`` the input vertex of each output vertex (the first ``count`` are
        ``0 .. count-1``, each with the UV of its first corner in triangle order; seam
        copies follow in order of first appearance), triangles ``[T, 3]`` into the
        output vertices, uv ``[V', 2]`` float32 (0 for vertices no triangle uses).
    """
    vid = np.asarray(triangles, np.int64).reshape(-1)
    uv = np.ascontiguousarray(texcoords, np.float32).reshape(-1, 2)
    key = np.column_stack([vid, uv.view(np.int32).astype(np.int64)])
    pairs, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    # per vertex, its pair that appears first keeps the vertex's own index
    order = np.lexsort((first, pairs[:, 0]))
    primary = np.zeros(len(pairs), bool)
    primary[order[np.r_[True, pairs[order[1:], 0] != pairs[order[:-1], 0]]]] = True
    copies = np.flatnonzero(~primary)
    copies = copies[np.argsort(first[copies], kind="stable")]
    index = pairs[:, 0].copy()
    index[copies] = count + np.arange(len(copies))
    source = np.concatenate([np.arange(count), pairs[copies, 0]])
    out_uv = np.zeros((len(source), 2), np.float32)
    out_uv[index] = uv[first]
    return source, index[inverse.reshape(-1)].reshape(-1, 3), out_uv


def _num(x) -> int | float:
    """A JSON number that reads back as exactly the same float32 (or int)."""
    if isinstance(x, np.integer):
        return int(x)
    return float(np.float32(x))
