"""Dense MediaPipe → ICT correspondence, built once and stored with the head asset.

Renders the ICT head (shaded skin, white eyes and teeth, dark mouth) with our own
rasterizer at several yaws, with the jaw part open and the eyes open so that the upper
and lower lips and lids are apart. MediaPipe's face mesh runs on each render; each of
the 478 landmarks is snapped, in the image, to the nearest visible point of a dense
sample of the skin (a triangle and barycentric coordinates), so a lid or lip contour
lands on the lid or lip MediaPipe drew it on, never on the eyeball or teeth behind. A
landmark's position is averaged over the views that saw it and snapped to the skin again;
its weight falls with the spread between views (silhouette landmarks move with the view).
Triangles and barycentric coordinates carry over to the neutral head unchanged.

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

from inference_service.avatar import sphere_center  # noqa: E402
from inference_service.build.gaussians import THICKNESS, _eye_colours, sample_surface  # noqa: E402
from inference_service.geometry import rotmat_to_quat, triangle_frames  # noqa: E402
from inference_service.headmodel import load_head_model  # noqa: E402
from inference_service.images import linear_to_srgb, srgb_to_linear  # noqa: E402
from kernels import Camera, rasterize  # noqa: E402
from protocol.arkit import index_of  # noqa: E402
from protocol.camera import framing_distance, intrinsics_from_fov, orbit, project  # noqa: E402

YAWS = (-30.0, -15.0, 0.0, 15.0, 30.0)
SIZE = 512
SAMPLES = 150_000
TANGENT_SIGMA = 0.6  # splat size (x spacing) of the renders
SPREAD_SCALE = 0.008  # metres of spread across views at which a landmark's weight halves
#: The pose rendered: lips and lids apart, so inner-lip and lid contours are unambiguous.
POSE = {"jawOpen": 0.35}
VISIBLE_TOLERANCE = 0.004  # metres behind the rendered depth that still counts as seen


def posed_vertices(model) -> np.ndarray:
    return model.neutral + sum(w * model.arkit_deltas[index_of(n)] for n, w in POSE.items())


def surface(model, vertices, rng):
    """A dense sample of the head: triangle, bary, spacing, points and triangle frames."""
    tri, bary, spacing = sample_surface(model, SAMPLES, rng)
    frames, _ = triangle_frames(vertices, model.triangles)
    points = np.einsum("nk,nkc->nc", bary, vertices[model.triangles[tri]])
    return tri, bary, spacing, points, frames[tri]


def render_views(model, vertices, rng, yaws=YAWS, paint=None):
    """Yield (image uint8 [H,W,3], depth [H,W], Camera) per yaw; ``paint(tri, bary,
    albedo)`` may draw on the samples' linear albedo ``[N, 3]`` (returning it)."""
    tri, bary, spacing, points, frames = surface(model, vertices, rng)
    sigma = TANGENT_SIGMA * spacing
    scales = np.stack([sigma, sigma, THICKNESS * sigma], 1)
    quats = rotmat_to_quat(frames)
    region = np.array(model.region_names)[model.triangle_region[tri]]
    albedo = np.tile(srgb_to_linear(np.array([0.80, 0.62, 0.52])), (len(tri), 1))
    white = srgb_to_linear(np.array([0.92, 0.90, 0.88]))
    albedo[region == "teeth"] = white
    albedo[np.isin(region, ["mouth_socket", "gums_tongue"])] = 0.05
    if paint is not None:
        albedo = paint(tri, bary, albedo)
    for side in ("eyeball_left", "eyeball_right"):  # with iris and pupil, as MediaPipe expects
        eye = region == side
        ball = vertices[np.unique(model.triangles[model.triangle_region == model.region(side)])]
        albedo[eye] = _eye_colours(points[eye], sphere_center(ball), np.zeros(eye.sum(), bool),
                                   albedo[eye])  # fmt: skip
    # framed on the face, so the eyes and lips are large enough for MediaPipe's contours
    face = vertices[np.unique(model.triangles[model.triangle_region == model.region("face")])]
    center = 0.5 * (face.min(0) + face.max(0))
    radius = 0.5 * float((face.max(0) - face.min(0))[[0, 2]].max())
    for yaw in yaws:
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


def visible_in(points, depth, cam) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``[N, 2]`` of ``points`` and whether each is seen (not hidden)."""
    uv, z = project(points, [cam.fx, cam.fy, cam.cx, cam.cy], cam.world_to_camera)
    j, i = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    inside = (z > 0) & (j >= 0) & (j < SIZE) & (i >= 0) & (i < SIZE)
    seen = np.zeros(len(points), bool)
    seen[inside] = z[inside] <= depth[i[inside], j[inside]] + VISIBLE_TOLERANCE
    return uv, seen


def main() -> None:
    import mediapipe as mp
    from scipy.spatial import cKDTree

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("inference_service/assets/mediapipe_ict.npz"))
    args = ap.parse_args()
    model = load_head_model()
    vertices = posed_vertices(model)
    tri, bary, _, points, _ = surface(model, vertices, np.random.default_rng(0))
    # Snap to skin only: the eye and lip contours must land on the lids and lips (which
    # move with blinks and mouth shapes), not on the eyeball or teeth seen between them.
    skin = np.isin(model.triangle_region[tri], [model.region("face"), model.region("head_neck")])
    tri, bary, points = tri[skin], bary[skin], points[skin]

    hits = [[] for _ in range(478)]
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True)
    for image, depth, cam in render_views(model, vertices, np.random.default_rng(1)):
        result = mesh.process(image)
        if not result.multi_face_landmarks:
            print("no face found in a view; skipped")
            continue
        uv, seen = visible_in(points, depth, cam)
        candidates = np.flatnonzero(seen)
        tree2d = cKDTree(uv[candidates])
        lm = result.multi_face_landmarks[0].landmark
        found = np.array([[p.x * SIZE, p.y * SIZE] for p in lm])
        gap, nearest = tree2d.query(found)
        for i in np.flatnonzero(gap < 12.0):  # pixels; farther means off the visible head
            hits[i].append(points[candidates[nearest[i]]])

    tree = cKDTree(points)
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
