"""Rasterizer speed: forward and forward+backward, per backend, on a head-like scene.

Scene: N Gaussians sampled over the ICT head's surface (as the builder places them:
flat discs sized to their spacing, opacity 0.98), seen from 20° yaw, the head filling
the frame. Backends: ``cpu`` (numba), and in the same run the ``reference`` (numpy, no
backward) and ``torch`` (plain vectorised torch, autograd) where one run is predicted to
finish within a minute, and ``cuda`` (gsplat) when present. Ratios are against the
reference's forward time for the same scene; the cpu backend's forward+backward also
against the same compositing behind the projection's torch twin (``projection.py``,
autograd: what the cpu backend ran before it had a hand-written projection). Also: the
one-off numba compile time on a cold cache, and a warm start's load time from the cache.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from _common import REPO, emit, machine, timed

from inference_service.build.gaussians import THICKNESS, sample_surface
from inference_service.geometry import rotmat_to_quat, triangle_frames
from inference_service.headmodel import load_head_model
from kernels import Camera, has_cuda, rasterize
from kernels.cpu import RasterizeTiles
from kernels.projection import project
from kernels.torch_dense import rasterize_torch
from protocol.camera import framing_distance, intrinsics_from_fov, orbit

COUNTS = (10_000, 50_000, 100_000)
TANGENT_SIGMA = 0.6  # splat size (x spacing) of the scene: fixed, so runs stay comparable
SIZES = (512, 1024)
BUDGET_S = 60.0


def head_scene(n: int, size: int, seed: int = 0):
    model = load_head_model()
    rng = np.random.default_rng(seed)
    tri, bary, spacing = sample_surface(model, n, rng)
    frames, _ = triangle_frames(model.neutral, model.triangles)
    means = np.einsum("nk,nkc->nc", bary, model.neutral[model.triangles[tri]])
    sigma = TANGENT_SIGMA * spacing
    scales = np.stack([sigma, sigma, THICKNESS * sigma], 1)
    quats = rotmat_to_quat(frames[tri])
    opac = np.full(len(tri), 0.98)
    colors = rng.uniform(-1, 1, (len(tri), 1, 3))
    center = 0.5 * (model.neutral.min(0) + model.neutral.max(0))
    radius = float(np.linalg.norm(model.neutral - center, axis=1).max())
    cam = Camera.from_arrays(
        intrinsics_from_fov(size, size, 30),
        orbit(center, framing_distance(radius, 30, 0.95), 20, 5),
    )
    return (means, quats, scales, opac, colors), cam


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def forward_backward(fn, args, dtype=torch.float32):
    def run():
        ts = [torch.tensor(np.asarray(a), dtype=dtype, requires_grad=True) for a in args]
        rgb, alpha = fn(ts)
        (rgb.sum() + alpha.sum()).backward()

    return run


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    base = {"benchmark": "raster", "machine": machine()}
    emit({**base, **compile_times()})
    seconds_per_unit: dict[str, float] = {}  # backend → seconds per (Gaussian x pixel)
    for size in SIZES:
        for n in COUNTS:
            args, cam = head_scene(n, size)
            rec = {**base, "gaussians": len(args[0]), "width": size, "height": size}
            for r in measure_scene(args, cam, size, seconds_per_unit):
                emit({**rec, **r, "process_peak_rss_mb": peak_rss_mb()})
    emit({**base, **small_in_frame()})


def measure_scene(args, cam, size, seconds_per_unit) -> list[dict]:
    """Records for one scene; slow backends run once, and only when predicted (from the
    smaller scenes before) to finish within the budget."""
    work = len(args[0]) * size * size
    out = []

    def fits(backend: str) -> bool:
        return seconds_per_unit.get(backend, 0.0) * work < BUDGET_S

    def cpu_forward():
        return rasterize(*args, cam, size, size, ("rgb", "alpha"), backend="cpu")

    def cpu_pair(ts):
        o = rasterize(*ts, cam, size, size, ("rgb", "alpha"), backend="cpu")
        return o.rgb, o.alpha

    def torch_pair(ts):
        d = rasterize_torch(*ts, cam, size, size)
        return d["rgb"], d["alpha"]

    ref_ms = None
    if fits("reference"):
        t = time.perf_counter()
        rasterize(*args, cam, size, size, ("rgb", "alpha"), backend="reference")
        ref_ms = (time.perf_counter() - t) * 1000
        seconds_per_unit["reference"] = ref_ms / 1000 / work
        out.append({"backend": "reference", "forward_ms": round(ref_ms, 1),
                    "forward_backward_ms": None, "ratio_forward_vs_reference": 1.0})  # fmt: skip

    def cpu_pair_torch_projection(ts):
        means, quats, scales, opacities, colors = ts
        p = project(means, quats, scales, colors, cam, size, size)
        rgb, alpha, _, _ = RasterizeTiles.apply(
            p.means2d, p.conics, p.colors, opacities, p.depths, p.normals, p.radii, size,
            size, torch.zeros(3, dtype=means.dtype), False, False,
        )  # fmt: skip
        return rgb, alpha

    f, fb = timed(cpu_forward, 5), timed(forward_backward(cpu_pair, args), 5)
    twin = timed(forward_backward(cpu_pair_torch_projection, args), 5)
    out.append({"backend": "cpu", "forward_ms": f["median_ms"],
                "forward_backward_ms": fb["median_ms"], "forward_p90_ms": f["p90_ms"],
                "forward_backward_p90_ms": fb["p90_ms"],
                "forward_backward_torch_projection_ms": twin["median_ms"],
                "ratio_forward_backward_vs_torch_projection":
                    round(twin["median_ms"] / fb["median_ms"], 2),
                "ratio_forward_vs_reference": ratio(ref_ms, f["median_ms"]),
                "fps_forward": round(1000 / f["median_ms"], 1)})  # fmt: skip

    if fits("torch"):
        t = time.perf_counter()
        with torch.no_grad():
            torch_pair([torch.tensor(np.asarray(a), dtype=torch.float32) for a in args])
        fwd = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        forward_backward(torch_pair, args)()
        both = (time.perf_counter() - t) * 1000
        seconds_per_unit["torch"] = both / 1000 / work
        out.append({"backend": "torch", "forward_ms": round(fwd, 1),
                    "forward_backward_ms": round(both, 1),
                    "ratio_forward_vs_reference": ratio(ref_ms, fwd)})  # fmt: skip

    if has_cuda():
        out.append(cuda_record(args, cam, size, ref_ms))
    return out


def ratio(ref_ms, ms):
    return None if ref_ms is None else round(ref_ms / ms, 1)


def cuda_record(args, cam, size, ref_ms) -> dict:
    ts = [torch.tensor(np.asarray(a), dtype=torch.float32, device="cuda") for a in args]

    def fwd():
        rasterize(*ts, cam, size, size, ("rgb", "alpha"), backend="cuda")
        torch.cuda.synchronize()

    def fb():
        tg = [t.clone().requires_grad_(True) for t in ts]
        o = rasterize(*tg, cam, size, size, ("rgb", "alpha"), backend="cuda")
        (o.rgb.sum() + o.alpha.sum()).backward()
        torch.cuda.synchronize()

    f, b = timed(fwd, 20), timed(fb, 20)
    return {
        "backend": "cuda",
        "device": torch.cuda.get_device_name(),
        "forward_ms": f["median_ms"],
        "forward_backward_ms": b["median_ms"],
        "fps_forward": round(1000 / f["median_ms"], 1),
        "ratio_forward_vs_reference": ratio(ref_ms, f["median_ms"]),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def small_in_frame(n: int = 50_000, width: int = 1920, height: int = 1080) -> dict:
    """A head a fifth of a 1080p frame's height, as a scene frames it: the numpy path
    (inference: the service's renders), which composites only the box the Gaussians
    reach, against compositing every tile of the frame in float64 and converting, as it
    did before, in the same run."""
    from kernels.cpu import composite
    from kernels.cpu_projection import project_gaussians
    from kernels.sh import eval_sh

    args, head_cam = head_scene(n, height)
    fx = head_cam.fx * 0.2
    cam = Camera(fx, fx, width / 2, height / 2, head_cam.world_to_camera)
    passes = ("rgb", "alpha", "depth", "normal")

    def boxed():
        return rasterize(*args, cam, width, height, passes, backend="cpu")

    def whole_frame():
        means, quats, scales, opac, colors = (np.ascontiguousarray(a, np.float64) for a in args)
        m2d, con, z, nrm, rad = project_gaussians(
            means, quats, scales, np.ascontiguousarray(cam.world_to_camera, np.float64),
            cam.fx, cam.fy, cam.cx, cam.cy, cam.near, cam.far, width, height,
        )  # fmt: skip
        rgb = np.ascontiguousarray(eval_sh(colors, means - cam.position))
        (c, a, _, d, nm, _), _ = composite(m2d, con, rgb, opac, z, nrm, rad, width, height,
                                           np.zeros(3), True, True)  # fmt: skip
        return [x.astype(np.float32) for x in (c, a, d, nm)]

    new, old = boxed(), whole_frame()
    for name, ref in zip(passes, old, strict=True):  # the same image, or the figure is moot
        got = getattr(new, name)
        finite = np.isfinite(ref)
        assert np.array_equal(finite, np.isfinite(got)), name
        assert np.abs(got[finite] - ref[finite]).max() < 1e-4, name
    b, w = timed(boxed, 10), timed(whole_frame, 10)
    return {
        "case": "small_head_in_frame", "gaussians": n, "width": width, "height": height,
        "covered": round(float((new.alpha > 0).mean()), 4), "passes": list(passes),
        "forward_ms": b["median_ms"], "whole_frame_ms": w["median_ms"],
        "ratio_whole_frame_vs_box": round(w["median_ms"] / b["median_ms"], 2),
    }  # fmt: skip


def compile_times() -> dict:
    """Seconds for a first render in a fresh process: cold numba cache, then warm."""
    code = ("import time; t=time.perf_counter(); import kernels; kernels.warmup('cpu');"
            "print(time.perf_counter()-t)")  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        run = [sys.executable, "-c", code]
        runs = [
            float(subprocess.run(run, cwd=REPO, env=env, check=True, capture_output=True,
                                 text=True).stdout)
            for _ in range(2)
        ]  # fmt: skip
    return {"case": "first_render_in_new_process", "cold_cache_s": round(runs[0], 2),
            "warm_cache_s": round(runs[1], 2)}  # fmt: skip


if __name__ == "__main__":
    main()
