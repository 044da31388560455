"""How well MediaPipe agrees with itself across views: the floor under ``eval``'s
landmark figure.

``splatface eval`` renders an avatar at ±30° yaw and reports the RMS distance between
MediaPipe's landmarks and our mesh's (through the stored correspondence, weighted as the
fits weigh them) over the inter-ocular distance. This runs the same measurement on the
ICT head itself, the head the correspondence was built from, rendered as
``tools/make_mediapipe_correspondence.py`` renders it (flat skin; and with brows, lips and
lash lines drawn around their landmark contours, so it looks more like a face), at rest
and in the pose the correspondence was built in. Whatever an avatar scores, a head whose
geometry is exactly the mesh's scores this.

Records: one per head variant with ``landmark_rms`` per yaw.
"""

from __future__ import annotations

import sys

import numpy as np
from _common import REPO, emit, machine

sys.path.insert(0, str(REPO / "tools"))

YAWS = (-30.0, -15.0, 0.0, 15.0, 30.0)
#: Features drawn on the skin: MediaPipe contour, sRGB colour, reach from the contour (m).
FEATURES = (("EYEBROW", (0.22, 0.15, 0.11), 0.004), ("LIPS", (0.62, 0.30, 0.30), 0.003),
            ("EYE", (0.08, 0.06, 0.05), 0.0012))  # fmt: skip


def painter(model, corr):
    """``paint`` for ``render_views``: brows, lips and lash lines drawn on the skin around
    their MediaPipe contours (through the correspondence, on the neutral head)."""
    import mediapipe as mp
    from scipy.spatial import cKDTree

    from inference_service.images import srgb_to_linear

    fm = mp.solutions.face_mesh
    marks = np.einsum("lk,lkc->lc", corr.bary, model.neutral[model.triangles[corr.triangle]])
    skin = [model.region("face"), model.region("head_neck")]

    def paint(tri: np.ndarray, bary: np.ndarray, albedo: np.ndarray) -> np.ndarray:
        rest = np.einsum("nk,nkc->nc", bary, model.neutral[model.triangles[tri]])
        on_skin = np.isin(model.triangle_region[tri], skin)
        for name, colour, reach in FEATURES:
            sides = ("",) if name == "LIPS" else ("LEFT_", "RIGHT_")
            edges = set().union(*(getattr(fm, f"FACEMESH_{s}{name}") for s in sides))
            steps = np.linspace(0, 1, 20)[:, None]
            line = np.concatenate([marks[a] + steps * (marks[b] - marks[a]) for a, b in edges])
            near = cKDTree(line).query(rest)[0] < reach
            albedo[near & on_skin] = srgb_to_linear(np.array(colour))
        return albedo

    return paint


def main() -> None:
    import make_mediapipe_correspondence as corr_tool

    from inference_service.evaluate import _landmark_agreement
    from inference_service.headmodel import load_correspondence, load_head_model
    from protocol.arkit import index_of

    model, corr = load_head_model(), load_correspondence()
    base = {"benchmark": "landmark_floor", "machine": machine()}
    for pose_name, pose in (("rest", {}), ("correspondence_pose", corr_tool.POSE)):
        vertices = model.neutral + sum(w * model.arkit_deltas[index_of(n)] for n, w in pose.items())
        for skin, paint in (("flat", None), ("drawn", painter(model, corr))):
            rms = {}
            views = corr_tool.render_views(model, vertices, np.random.default_rng(1), YAWS,
                                           paint=paint)  # fmt: skip
            for yaw, (image, _, cam) in zip(YAWS, views, strict=True):
                intrinsics = [cam.fx, cam.fy, cam.cx, cam.cy]
                found = _landmark_agreement(image, vertices, model.triangles, intrinsics,
                                            cam.world_to_camera)  # fmt: skip
                rms[f"{yaw:+.0f}"] = found.get("landmark_rms")
            emit({**base, "pose": pose_name, "skin": skin, "landmark_rms": rms})


if __name__ == "__main__":
    main()
