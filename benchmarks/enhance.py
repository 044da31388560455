"""The ``enhance`` stage's cost: per painted view, and a whole build with it on and off.

Without arguments it measures the plumbing with the tiny random models of
``tests/tiny_diffusion.py`` on the CPU, working at 64 px with 2 steps so the models cost
little (loading, resizing, the pipeline's fixed costs), and on its own the depth warping
of every finished view into the next (``carry_s``): seven pseudo-views of a synthetic
sphere head around a photo view, then the astronaut built with the ``fast`` preset with
the stage off and on in the same run. Given real weights
(``--models MODEL_DIR[,CONTROLNET_DIR]``) it measures those too, on CUDA in float16 when
present, at the stage's default settings (512 px, the preset's steps).

    .venv/bin/python benchmarks/enhance.py [--models DIR[,DIR]] [--no-build]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit, machine

#: The pseudo-views of the synthetic run: every 45° round the head.
YAWS = (0.0, 45.0, -45.0, 90.0, -90.0, 135.0, -135.0, 180.0)


def device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def time_views(models, settings, size: int) -> dict:
    """Load (cold, then cached) and paint the synthetic views, timing each one."""
    from inference_service.build import diffusion
    from inference_service.build.enhance import carry, enhance_views, visit_order
    from inference_service.build.views import SOURCE_GENERATED
    from tests.tiny_diffusion import sphere_views

    views = sphere_views(size, YAWS)
    t = time.perf_counter()
    diffusion.load(models, settings.device)
    load_s = time.perf_counter() - t
    starts: list[float] = []

    def progress(fraction: float, message: str) -> None:
        if "° from front" in message:
            starts.append(time.perf_counter())

    t = time.perf_counter()
    out = enhance_views(views, models, settings, seed=0, progress=progress)
    end = time.perf_counter()
    total = end - t
    t = time.perf_counter()
    for k, i in enumerate(visit_order(views)):
        carry([views[0], *(out[j] for j in visit_order(views)[:k])], views[i], settings)
    carry_s = time.perf_counter() - t
    per_view = [b - a for a, b in zip(starts, [*starts[1:], end], strict=True)]
    painted = sum(int((v.source == SOURCE_GENERATED).any()) for v in out[1:])
    return {
        "view_px": size,
        "work_px": settings.size,
        "steps": settings.steps,
        "views": len(views) - 1,
        "views_painted": painted,
        "load_cold_s": round(load_s, 2),
        "stage_s": round(total, 2),
        "per_view_s": round(total / len(per_view), 3),
        "slowest_view_s": round(max(per_view), 3),
        "carry_s": round(carry_s, 3),
    }


def time_builds(models, settings=None) -> dict:
    """The astronaut, ``fast`` preset, stage off then on, in this process. ``settings``:
    the stage's settings instead of the preset's (the tiny models paint at 64 px with 2
    steps: at the preset's 512 px they would time the random model, not the plumbing)."""
    from inference_service.build import builder
    from inference_service.build.enhance import EnhanceSettings

    original = EnhanceSettings.__dict__["for_preset"]
    if settings is not None:
        chosen = settings
        EnhanceSettings.for_preset = classmethod(lambda cls, preset, **overrides: chosen)
    try:
        return _builds(builder, models)
    finally:
        EnhanceSettings.for_preset = original


def _builds(builder, models) -> dict:
    import io

    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    out = {}
    warm = builder.BuildOptions(name="astronaut", preset="fast")  # compiles the kernels
    builder.build_avatar(buf.getvalue(), warm, "bench-warm", lambda *a: None)
    for label, enhance in (("off", None), ("on", models)):
        options = builder.BuildOptions(name="astronaut", preset="fast", enhance=enhance)
        t = time.perf_counter()
        builder.build_avatar(buf.getvalue(), options, f"bench-{label}", lambda *a: None)
        out[f"build_{label}_s"] = round(time.perf_counter() - t, 2)
    out["overhead_s"] = round(out["build_on_s"] - out["build_off_s"], 2)
    return out


def main() -> None:
    from inference_service.build.diffusion import EnhanceModels
    from inference_service.build.enhance import EnhanceSettings
    from tests.tiny_diffusion import make_tiny_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="real weights: MODEL_DIR[,CONTROLNET_DIR]")
    parser.add_argument("--no-build", action="store_true", help="skip the whole builds")
    args = parser.parse_args()
    base = {"benchmark": "enhance", "machine": machine(), "device": device()}
    with tempfile.TemporaryDirectory() as tmp:
        model, controlnet = make_tiny_models(Path(tmp))
        tiny = EnhanceModels(model, controlnet)
        settings = EnhanceSettings(steps=2, size=64, device="cpu")
        record = {**base, "models": "tiny (random, CPU)", **time_views(tiny, settings, 128)}
        if not args.no_build:
            record.update(time_builds(tiny, settings))
        emit(record)
    if args.models:
        real = EnhanceModels.parse(args.models)
        settings = EnhanceSettings.for_preset("fast")
        record = {**base, "models": real.to_dict(), **time_views(real, settings, 256)}
        if not args.no_build:
            record.update(time_builds(real))
        emit(record)


if __name__ == "__main__":
    main()
