"""Animation cost: posing against rasterizing, and a 120-frame clip end to end.

An avatar is built once from the astronaut (``high`` preset, about 60k Gaussians, and
``default``, about 30k). Per frame: ``pose`` (ARKit weights + head transform → world
Gaussians) and ``rasterize`` at 512x512 on the CPU backend, timed separately on the
same frames; then a 120-frame clip (jaw, smile, blink, head turning) rendered through
``render_frames`` for frames per second. The target is posing under 10 % of a frame.
"""

from __future__ import annotations

import time

import numpy as np
from _common import emit, machine, timed

SIZE = 512
FRAMES = 120


def clip(frames: int) -> tuple[np.ndarray, np.ndarray]:
    from inference_service.demo import demo_curves

    curves = demo_curves(frames)
    heads = np.tile(np.eye(4), (frames, 1, 1))
    for i, a in enumerate(np.radians(np.linspace(-20, 20, frames))):
        heads[i, :3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    return curves, heads


def main() -> None:
    import io

    import skimage.data
    from PIL import Image

    import kernels
    from inference_service.build.builder import BuildOptions, build_avatar

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    kernels.warmup("cpu")
    for preset in ("default", "high"):
        av = build_avatar(buf.getvalue(), BuildOptions(preset=preset), "0123456789ab",
                          lambda s, f, m: None)  # fmt: skip
        emit({"benchmark": "animate", "machine": machine(), "preset": preset, **measure(av)})


def measure(av) -> dict:
    import kernels
    from inference_service.posing import pose
    from inference_service.render import render_frames
    from protocol.camera import framing_distance, intrinsics_from_fov, orbit

    curves, heads = clip(FRAMES)
    intr = intrinsics_from_fov(SIZE, SIZE, 30)
    w2c = orbit(av.center, framing_distance(av.radius, 30, 0.9))
    cam = kernels.Camera.from_arrays(intr, w2c)
    frame = iter(range(10**9))

    def pose_one():
        i = next(frame) % FRAMES
        return pose(av, curves[i], heads[i])

    posed = pose_one()

    def raster_one():
        kernels.rasterize(posed.means, posed.quats, posed.scales, posed.opacities, posed.sh,
                          cam, SIZE, SIZE, ("rgb", "alpha"))  # fmt: skip

    p_ms, r_ms = timed(pose_one, 20)["median_ms"], timed(raster_one, 10)["median_ms"]
    t = time.perf_counter()
    render_frames(av, intr[None], w2c[None], SIZE, SIZE, curves, heads, ("rgb", "alpha"))
    clip_s = time.perf_counter() - t
    return {"gaussians": len(av.gaussians), "width": SIZE, "height": SIZE, "pose_ms": p_ms,
            "rasterize_ms": r_ms, "pose_share_of_frame": round(p_ms / (p_ms + r_ms), 3),
            "clip_frames": FRAMES, "clip_s": round(clip_s, 2),
            "clip_fps": round(FRAMES / clip_s, 1)}  # fmt: skip


if __name__ == "__main__":
    main()
