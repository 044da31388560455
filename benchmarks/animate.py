"""Animation cost: posing against rasterizing, and a 120-frame clip end to end.

An avatar is built from the astronaut with the ``default`` preset (about 30k Gaussians)
and the ``high`` preset (about 60k); the ``high`` build is also cut to exactly 50k
Gaussians (a seeded random subset), the size the target is stated for. For each, on the
same frames of a clip (jaw, smile, blink, head turning), one record with:

- ``pose_ms``: ``pose`` (ARKit weights + head transform → world Gaussians), and
  ``rasterize_ms``: ``rasterize`` at 512x512 on the CPU backend, timed alternately frame
  by frame as a renderer calls them (so each sees the other's thread pools);
  ``pose_share_of_frame`` = pose / (pose + rasterize). The target is under 10 %.
- ``pose_all52_ms`` (and its share): the same with all 52 weights active, as live
  capture sends them; ``pose_vertices_all52_ms`` is the blendshape sum alone in it.
- ``pose_reference_ms``: the numpy reference of posing, for comparison.
- ``clip_fps``: the 120-frame clip rendered through ``render_frames``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
from _common import emit, machine, timed

SIZE = 512
FRAMES = 120
FRAME_SAMPLES = 20  # alternated pose/rasterize frames per measurement
SUBSET = 50_000


def clip(frames: int) -> tuple[np.ndarray, np.ndarray]:
    from inference_service.demo import demo_curves

    curves = demo_curves(frames)
    heads = np.tile(np.eye(4), (frames, 1, 1))
    for i, a in enumerate(np.radians(np.linspace(-20, 20, frames))):
        heads[i, :3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    return curves, heads


def all_weights(frames: int, seed: int = 0) -> np.ndarray:
    """Curves with every one of the 52 weights non-zero in every frame."""
    return np.random.default_rng(seed).uniform(0.01, 0.6, (frames, 52)).astype(np.float32)


def subset(av, count: int, seed: int = 0):
    """The avatar with ``count`` of its Gaussians (seeded random, order kept)."""
    g = av.gaussians
    keep = np.sort(np.random.default_rng(seed).choice(len(g), count, replace=False))
    return dataclasses.replace(av, gaussians=g.take(keep))


def main() -> None:
    import io

    import skimage.data
    from PIL import Image

    import kernels
    from inference_service import posing_kernels
    from inference_service.build.builder import BuildOptions, build_avatar

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    kernels.warmup("cpu")
    posing_kernels.warmup()
    for preset in ("default", "high"):
        av = build_avatar(buf.getvalue(), BuildOptions(preset=preset), "0123456789ab",
                          lambda s, f, m: None)  # fmt: skip
        if preset == "high" and len(av.gaussians) > SUBSET:
            emit({"benchmark": "animate", "machine": machine(), "preset": "high",
                  "subset_of": len(av.gaussians), **measure(subset(av, SUBSET))})  # fmt: skip
        emit({"benchmark": "animate", "machine": machine(), "preset": preset, **measure(av)})


def alternate(av, curves, heads, cam) -> tuple[float, float]:
    """Median ms of pose and of rasterize, called in turn frame by frame."""
    import kernels
    from inference_service.posing import pose

    pose_s, raster_s = [], []
    for k in range(3 + FRAME_SAMPLES):  # the first 3 warm up
        i = k % FRAMES
        t0 = time.perf_counter()
        p = pose(av, curves[i], heads[i])
        t1 = time.perf_counter()
        kernels.rasterize(p.means, p.quats, p.scales, p.opacities, p.sh, cam, SIZE, SIZE,
                          ("rgb", "alpha"))  # fmt: skip
        t2 = time.perf_counter()
        if k >= 3:
            pose_s.append(t1 - t0)
            raster_s.append(t2 - t1)
    return (round(1000 * statistics.median(pose_s), 3),
            round(1000 * statistics.median(raster_s), 3))  # fmt: skip


def measure(av) -> dict:
    import kernels
    from inference_service.posing import pose_reference, pose_vertices
    from inference_service.render import render_frames
    from protocol.camera import framing_distance, intrinsics_from_fov, orbit

    curves, heads = clip(FRAMES)
    dense = all_weights(FRAMES)
    intr = intrinsics_from_fov(SIZE, SIZE, 30)
    w2c = orbit(av.center, framing_distance(av.radius, 30, 0.9))
    cam = kernels.Camera.from_arrays(intr, w2c)

    p_ms, r_ms = alternate(av, curves, heads, cam)
    p52_ms, r52_ms = alternate(av, dense, heads, cam)
    frame = iter(range(10**9))

    def verts_all52():
        pose_vertices(av, dense[next(frame) % FRAMES])

    def reference():
        i = next(frame) % FRAMES
        pose_reference(av, curves[i], heads[i])

    v52_ms = timed(verts_all52, 20)["median_ms"]
    ref_ms = timed(reference, 5, warmup=1)["median_ms"]
    t = time.perf_counter()
    render_frames(av, intr[None], w2c[None], SIZE, SIZE, curves, heads, ("rgb", "alpha"))
    clip_s = time.perf_counter() - t
    return {"gaussians": len(av.gaussians), "width": SIZE, "height": SIZE,
            "pose_ms": p_ms, "rasterize_ms": r_ms,
            "pose_share_of_frame": round(p_ms / (p_ms + r_ms), 3),
            "pose_all52_ms": p52_ms,
            "pose_all52_share_of_frame": round(p52_ms / (p52_ms + r52_ms), 3),
            "pose_vertices_all52_ms": v52_ms, "pose_reference_ms": ref_ms,
            "clip_frames": FRAMES, "clip_s": round(clip_s, 2),
            "clip_fps": round(FRAMES / clip_s, 1)}  # fmt: skip


if __name__ == "__main__":
    main()
