"""Make the project's trimmed ICT-FaceKit asset from ``shared/assets/ict-facekit``.

Run once by a developer (``python tools/make_head_asset.py SRC.npz``); the output is
committed at ``inference_service/assets/ict_head.npz`` with ICT's MIT licence beside it.

What changes from the source:
- vertices 0–24590 only (face, head and neck, mouth socket, eye sockets, gums and tongue,
  teeth, eyeballs); lacrimal fluid, eye blend/occlusion and eyelashes are dropped because
  they are thin transparent cards that do not splat well;
- polygons triangulated, each triangle labelled with its region;
- canonical frame: metres, right-handed, +Z up, face towards -Y, subject's left at +X
  (ICT: centimetres, +Y up, face towards +Z), i.e. (x, y, z)_ours = (x, -z, y)_ICT / 100;
- deltas stored as float16 (as in the source).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

KEEP = 24591
# (name, first vertex, last vertex) inclusive, from the ICT-FaceKit documentation.
REGIONS = (
    ("face", 0, 9408),
    ("head_neck", 9409, 11247),
    ("mouth_socket", 11248, 13293),
    ("eye_sockets", 13294, 14061),
    ("gums_tongue", 14062, 17038),
    ("teeth", 17039, 21450),
    ("eyeball_left", 21451, 23020),
    ("eyeball_right", 23021, 24590),
)


def to_canonical(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], axis=-1) / 100.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="ict_facekit.npz from shared/assets/ict-facekit")
    ap.add_argument("--out", type=Path, default=Path("inference_service/assets/ict_head.npz"))
    args = ap.parse_args()
    d = np.load(args.src, allow_pickle=False)

    faces, face_uvs = d["faces"], d["face_uvs"]
    inside = np.all((faces < KEEP) | (faces == -1), axis=1)
    faces, face_uvs = faces[inside], face_uvs[inside]
    tris, tri_uvs = [], []
    for a, b, c in ((0, 1, 2), (0, 2, 3)):
        ok = faces[:, c] >= 0
        tris.append(faces[ok][:, [a, b, c]])
        tri_uvs.append(face_uvs[ok][:, [a, b, c]])
    triangles = np.concatenate(tris).astype(np.int32)
    triangle_uvs = np.concatenate(tri_uvs).astype(np.int32)

    vertex_region = np.zeros(KEEP, np.uint8)
    for i, (_, lo, hi) in enumerate(REGIONS):
        vertex_region[lo : hi + 1] = i
    # Seam polygons between the face and the parts behind it take the later region.
    region = vertex_region[triangles].max(axis=1)

    np.savez_compressed(
        args.out,
        neutral=to_canonical(d["neutral"][:KEEP]).astype(np.float32),
        triangles=triangles,
        triangle_uvs=triangle_uvs,
        uvs=d["uvs"].astype(np.float32),
        triangle_region=region,
        region_names=np.array([r[0] for r in REGIONS]),
        landmarks68=d["landmarks68"].astype(np.int32),
        identity_deltas=to_canonical(d["identity_deltas"][:, :KEEP]).astype(np.float16),
        expression_deltas=to_canonical(d["expression_deltas"][:, :KEEP]).astype(np.float16),
        expression_names=d["expression_names"],
    )
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), "
        f"{KEEP} vertices, {len(triangles)} triangles"
    )


if __name__ == "__main__":
    main()
