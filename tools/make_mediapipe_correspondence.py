"""Dense MediaPipe → ICT correspondence, built once and stored with the head asset.

Renders the neutral ICT head (shaded skin, white eyes) with our own rasterizer at
several yaws, runs MediaPipe's face mesh on each render, casts every one of the 478
landmarks back onto the head through the render's depth pass, and snaps it to the
nearest point of a dense sample of the surface (a triangle and barycentric
coordinates) on the skin. A landmark's position is averaged over the views that saw it;
its weight falls with the spread between views (silhouette landmarks move with the view).

Run: ``python tools/make_mediapipe_correspondence.py`` → ``inference_service/assets/
mediapipe_ict.npz`` with ``triangle`` [478] int32, ``bary`` [478, 3] float32,
``weight`` [478] float32 in (0, 1], ``spread`` [478] float32 metres.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference_service.build.gaussians import THICKNESS, sample_surface  # noqa: E402
from inference_service.geometry import rotmat_to_quat, triangle_frames  # noqa: E402
from inference_service.headmodel import load_head_model  # noqa: E402
from inference_service.images import linear_to_srgb, srgb_to_linear  # noqa: E402
from kernels import Camera, rasterize  # noqa: E402
from protocol.camera import framing_distance, intrinsics_from_fov, orbit  # noqa: E402

YAWS = (-30.0, -15.0, 0.0, 15.0, 30.0)
SIZE = 512
SAMPLES = 150_000
TANGENT_SIGMA = 0.6  # splat size (x spacing) of the renders the committed asset was made from
SPREAD_SCALE = 0.008  # metres of spread across views at which a landmark's weight halves


def surface(model, rng):
    tri, bary, spacing = sample_surface(model, SAMPLES, rng)
    frames, _ = triangle_frames(model.neutral, model.triangles)
    points = np.einsum("nk,nkc->nc", bary, model.neutral[model.triangles[tri]])
    return tri, bary, spacing, points, frames[tri]


def render_views(model, rng):
    """Yield (image uint8 [H,W,3], depth [H,W], Camera) per yaw."""
    tri, _, spacing, points, frames = surface(model, rng)
    sigma = TANGENT_SIGMA * spacing
    scales = np.stack([sigma, sigma, THICKNESS * sigma], 1)
    quats = rotmat_to_quat(frames)
    region = np.array(model.region_names)[model.triangle_region[tri]]
    albedo = np.tile(srgb_to_linear(np.array([0.80, 0.62, 0.52])), (len(tri), 1))
    albedo[np.isin(region, ["eyeball_left", "eyeball_right"])] = srgb_to_linear(
        np.array([0.92, 0.90, 0.88])
    )
    albedo[np.isin(region, ["mouth_socket", "gums_tongue"])] = 0.05
    center = 0.5 * (model.neutral.min(0) + model.neutral.max(0)) + [0, 0, 0.05]
    radius = 0.7 * float(np.linalg.norm(model.neutral - center, axis=1).max())
    for yaw in YAWS:
        cam = Camera.from_arrays(
            intrinsics_from_fov(SIZE, SIZE, 30),
            orbit(center, framing_distance(radius, 30, 0.9), yaw, 0.0),
        )
        light = cam.position - points
        light /= np.linalg.norm(light, axis=1, keepdims=True)
        shade = 0.25 + 0.75 * np.abs((frames[:, :, 2] * light).sum(1))
        out = rasterize(points, quats, scales, np.full(len(tri), 0.98), albedo * shade[:, None],
                        cam, SIZE, SIZE, ("rgb", "depth"), background=np.full(3, 0.3))  # fmt: skip
        yield (linear_to_srgb(out.rgb) * 255 + 0.5).astype(np.uint8), out.depth, cam


def main() -> None:
    import mediapipe as mp
    from scipy.spatial import cKDTree

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("inference_service/assets/mediapipe_ict.npz"))
    args = ap.parse_args()
    model = load_head_model()
    rng = np.random.default_rng(0)
    tri, bary, _, points, _ = surface(model, rng)
    # Snap to skin only: the eye and lip contours must land on the lids and lips (which
    # move with blinks and mouth shapes), not on the eyeball or teeth seen between them.
    skin = np.isin(model.triangle_region[tri], [model.region("face"), model.region("head_neck")])
    tri, bary, points = tri[skin], bary[skin], points[skin]
    tree = cKDTree(points)

    hits = [[] for _ in range(478)]
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True)
    for image, depth, cam in render_views(model, np.random.default_rng(1)):
        result = mesh.process(image)
        if not result.multi_face_landmarks:
            print("no face found in a view; skipped")
            continue
        lm = result.multi_face_landmarks[0].landmark
        r, t = cam.world_to_camera[:3, :3], cam.world_to_camera[:3, 3]
        for i, p in enumerate(lm):
            u, v = p.x * SIZE, p.y * SIZE
            j, k = int(u), int(v)
            if not (0 <= j < SIZE and 0 <= k < SIZE) or not np.isfinite(depth[k, j]):
                continue
            z = float(depth[k, j])
            cam_pt = np.array([(u - cam.cx) / cam.fx * z, (v - cam.cy) / cam.fy * z, z])
            hits[i].append(r.T @ (cam_pt - t))

    out_tri = np.zeros(478, np.int32)
    out_bary = np.zeros((478, 3), np.float32)
    spread = np.zeros(478, np.float32)
    for i, h in enumerate(hits):
        if not h:
            raise SystemExit(f"landmark {i} was never seen; add views")
        h = np.array(h)
        mean = h.mean(0)
        spread[i] = float(np.linalg.norm(h - mean, axis=1).max())
        _, nearest = tree.query(mean)
        out_tri[i], out_bary[i] = tri[nearest], bary[nearest]
    weight = (1.0 / (1.0 + (spread / SPREAD_SCALE) ** 2)).astype(np.float32)
    np.savez_compressed(args.out, triangle=out_tri, bary=out_bary, weight=weight, spread=spread)
    print(f"wrote {args.out}: median spread {np.median(spread) * 1000:.1f} mm, "
          f"{(weight < 0.5).sum()} landmarks down-weighted")  # fmt: skip


if __name__ == "__main__":
    main()
