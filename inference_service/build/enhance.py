"""The optional ``enhance`` stage: paint what the photo never saw with a diffusion model.

Pseudo-views fill unseen parts of the head (back, top, behind the ears, under the chin)
by mirroring and inpainting, at low confidence. When the user has Stable Diffusion
inpainting weights on disk (and a depth ControlNet), this stage repaints those
low-confidence pixels, after FaceCraft4D: views are visited in order of distance from the
front; before each one is painted, every finished view is warped into it through the
head's depth and kept, so the diffusion model only paints what is still unseen, and the
views agree where they overlap. The COIN fit treats painted pixels like any pseudo-view
pixel it cannot fully trust: compensated per view, weighted by their lower confidence.

Example::

    views = enhance_views(views, EnhanceModels(Path("sd-inpaint"), Path("cn-depth")),
                          EnhanceSettings.for_preset("default"), seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..images import linear_to_srgb, srgb_to_linear
from . import diffusion
from .diffusion import EnhanceModels
from .views import SOURCE_GENERATED, SOURCE_VIEW, View, warp

#: ``progress(fraction, message)``; may raise to cancel (it is also called per step).
Progress = Callable[[float, str], None]

#: Denoising steps per build preset: more steps, finer detail, proportionally slower.
STEPS = {"fast": 12, "default": 25, "high": 40}


@dataclass(frozen=True)
class EnhanceSettings:
    """How the stage paints. Defaults suit Stable Diffusion 1.5 inpainting at 512 px.

    Attributes:
        threshold: pixels inside the head with confidence below it are repainted: the
            pseudo-views' inpainted fill (0.15) and photo or mirror pixels seen at grazing
            angles; well-seen mirrored detail (up to 0.5) stays.
        generated_confidence: confidence given to painted pixels (above the inpainted
            fill, below mirrored detail), and the most a pixel copied from another view
            keeps (a copy adds agreement, not information).
        steps: denoising steps per view.
        guidance: classifier-free guidance scale (how strongly the prompt steers).
        control_scale: weight of the depth ControlNet's residuals.
        size: the longer side in pixels the model works at (a multiple of 8); views are
            resized to it and back, and only masked pixels are pasted.
        tolerance: metres; how far behind a finished view's surface a point still counts
            as seen by it (:func:`views.warp`).
        prompt, negative_prompt: text given to the model; a phrase naming the side of the
            head a view looks at is appended to ``prompt``.
        device: ``cuda`` or ``cpu``; ``None`` picks CUDA (float16) when present.
    """

    threshold: float = 0.3
    generated_confidence: float = 0.25
    steps: int = 25
    guidance: float = 7.5
    control_scale: float = 1.0
    size: int = 512
    tolerance: float = 0.01
    prompt: str = "a photo of a person's head, natural skin and hair, soft even light, detailed"
    negative_prompt: str = "blurry, deformed, text, watermark, hat, extra ears, cartoon"
    device: str | None = None

    @classmethod
    def for_preset(cls, preset: str, **overrides: Any) -> EnhanceSettings:
        """Settings for a build preset (``fast`` paints with fewer steps)."""
        return replace(cls(steps=STEPS.get(preset, STEPS["default"])), **overrides)


def _silent(fraction: float, message: str) -> None:
    pass


def view_angle(view: View) -> float:
    """Degrees between the view's direction and the front (0 for the photo)."""
    yaw, pitch = math.radians(view.yaw or 0.0), math.radians(view.pitch or 0.0)
    return math.degrees(math.acos(max(-1.0, min(1.0, math.cos(yaw) * math.cos(pitch)))))


def visit_order(views: list[View]) -> list[int]:
    """Indices of the pseudo-views (all but ``views[0]``, the photo's) from the front
    outwards, so each view is painted next to finished ones that constrain it."""
    return sorted(
        range(1, len(views)),
        key=lambda i: (round(view_angle(views[i]), 3), views[i].yaw or 0.0, views[i].pitch or 0.0),
    )


def side_phrase(view: View) -> str:
    """Words for the part of the head a view looks at, appended to the prompt."""
    yaw, pitch = abs(view.yaw or 0.0), view.pitch or 0.0
    if pitch >= 50:
        return "top of the head seen from above, hair"
    if pitch <= -50:
        return "seen from below, under the chin and neck"
    if yaw >= 135:
        return "back of the head, hair, nape of the neck"
    if yaw >= 60:
        return "side view, profile, ear and hair"
    return "front view, face"


def inside(view: View) -> np.ndarray:
    """``[H, W]`` bool: pixels the head covers."""
    return np.isfinite(view.depth) & (view.depth > 0) & (view.alpha > 0.5)


def _finished(view: View, threshold: float) -> np.ndarray:
    """``[H, W]`` bool: pixels of a finished view worth carrying into the next ones."""
    settled = (view.confidence >= threshold) | np.isin(view.source, (SOURCE_GENERATED, SOURCE_VIEW))
    return inside(view) & settled


def carry(finished: list[View], view: View, settings: EnhanceSettings) -> tuple[View, np.ndarray]:
    """Warp every finished view into ``view`` and keep their pixels where ``view`` is
    unsure. Where several finished views see a pixel, the one most confident there wins.

    Returns the view with the carried pixels (``SOURCE_VIEW``) and the ``[H, W]`` mask of
    pixels still to paint: inside the head, under ``threshold``, carried from nowhere.
    """
    unsure = inside(view) & (view.confidence < settings.threshold)
    image, confidence = view.image.copy(), view.confidence.copy()
    source = view.source.copy()
    best = np.full(view.confidence.shape, -1.0, np.float32)
    for done in finished:
        if not unsure.any():
            break
        values = np.concatenate(
            [
                done.image,
                done.confidence[..., None],
                _finished(done, settings.threshold)[..., None].astype(np.float32),
            ],
            axis=-1,
        )
        warped, valid = warp(
            values, done.depth, done.camera, view.depth, view.camera, settings.tolerance
        )
        # every bilinear tap on finished pixels: no colour bleeds in from unsettled ones
        take = unsure & valid & (warped[..., 4] > 0.999) & (warped[..., 3] > best)
        image[take] = warped[take, :3]
        best[take] = warped[take, 3]
        source[take] = SOURCE_VIEW
    carried = best >= 0
    confidence[carried] = np.minimum(best[carried], settings.generated_confidence)
    return view.with_pixels(image, confidence, source), unsure & ~carried


def depth_condition(depth: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1] from camera z ``[H, W]``: near is bright, the
    head's far side dim (0.2), empty pixels black, as the depth maps (MiDaS-style
    relative inverse depth) that depth ControlNets are trained on."""
    out = np.zeros(depth.shape, np.float32)
    hit = np.isfinite(depth) & (depth > 0)
    if hit.any():
        near, far = float(depth[hit].min()), float(depth[hit].max())
        out[hit] = 0.2 + 0.8 * (far - depth[hit]) / max(far - near, 1e-6)
    return np.repeat(out[..., None], 3, axis=-1)


def working_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``size``, both multiples of 8 (the VAE's
    downsampling), keeping the aspect ratio as closely as that allows."""
    scale = size / max(width, height)
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``[H, W, C]`` float32 with bilinear filtering (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    if image.shape[:2] == (height, width):
        return image.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None]
    shrink = height < image.shape[0] or width < image.shape[1]
    t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False,
                      antialias=shrink)  # fmt: skip
    return t[0].permute(1, 2, 0).numpy()


def paint(
    pipe: Any,
    view: View,
    mask: np.ndarray,  # [H, W] bool: the pixels to paint
    settings: EnhanceSettings,
    seed: int,
    on_step: Callable[[int], None] = lambda step: None,
) -> np.ndarray:
    """Run the inpainting pipeline on one view; returns ``[H, W, 3]`` linear RGB of the
    painted picture at the view's size (callers paste it only inside ``mask``)."""
    import torch

    h, w = mask.shape
    ww, wh = working_size(w, h, settings.size)
    srgb = linear_to_srgb(view.image).astype(np.float32)
    # The model's mask is the view's mask resized with any coverage counting, so it
    # covers every pixel that will be pasted.
    model_mask = _resize(mask[..., None].astype(np.float32), ww, wh) > 0.0
    kwargs: dict[str, Any] = {}
    if getattr(pipe, "controlnet", None) is not None:
        kwargs["control_image"] = _resize(depth_condition(view.depth), ww, wh)[None]
        kwargs["controlnet_conditioning_scale"] = settings.control_scale

    def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        on_step(step + 1)
        return tensors

    out = pipe(
        prompt=f"{settings.prompt}, {side_phrase(view)}",
        negative_prompt=settings.negative_prompt,
        image=np.clip(_resize(srgb, ww, wh), 0.0, 1.0)[None],
        mask_image=model_mask.astype(np.float32)[None],
        height=wh,
        width=ww,
        strength=1.0,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        callback_on_step_end=step_end,
        **kwargs,
    )
    picture = np.asarray(out.images[0], np.float32)
    return srgb_to_linear(_resize(picture, w, h)).astype(np.float32)


def enhance_views(
    views: list[View],
    models: EnhanceModels,
    settings: EnhanceSettings | None = None,
    seed: int = 0,
    progress: Progress = _silent,
) -> list[View]:
    """Repaint the pseudo-views' low-confidence pixels with the diffusion model.

    Args:
        views: ``views[0]`` is the photo's view (returned unchanged); the rest are
            pseudo-views with ``yaw``/``pitch``.
        models: the local weight folders (loaded once and cached; see
            :func:`diffusion.load`).
        settings: :class:`EnhanceSettings` (default: the ``default`` preset's).
        seed: the same seed, views and weights give the same pixels; view ``i`` uses
            ``seed + i``, so its noise does not depend on the order of the others.
        progress: called before each view and after each denoising step; raising from it
            cancels the stage.

    Returns:
        The views in the given order. In each pseudo-view, pixels that were confident or
        outside the head are unchanged; unsure pixels seen by a finished view are copied
        from it (``SOURCE_VIEW``), the rest are painted (``SOURCE_GENERATED``, confidence
        ``settings.generated_confidence``).
    """
    settings = settings or EnhanceSettings()
    out = list(views)
    order = visit_order(views)
    if not order:
        return out
    progress(0.0, "loading the diffusion model")
    pipe = diffusion.load(models, settings.device)
    finished = [views[0]]
    for k, i in enumerate(order):
        base = k / len(order)

        def on_step(step: int, base: float = base, k: int = k) -> None:
            progress(
                base + step / (settings.steps * len(order)),
                f"painting view {k + 1}/{len(order)}: step {step}/{settings.steps}",
            )

        view = views[i]
        progress(base, f"painting view {k + 1}/{len(order)} ({view_angle(view):.0f}° from front)")
        view, mask = carry(finished, view, settings)
        if mask.any():
            picture = paint(pipe, view, mask, settings, seed + i, on_step)
            image, confidence = view.image.copy(), view.confidence.copy()
            source = view.source.copy()
            image[mask] = picture[mask]
            confidence[mask] = settings.generated_confidence
            source[mask] = SOURCE_GENERATED
            view = view.with_pixels(image, confidence, source)
        out[i] = view
        finished.append(view)
    progress(1.0, f"painted {len(order)} views")
    return out


def build_stage(
    models: EnhanceModels | None,
    preset: str,
    progress: Callable[[str, float, str], None],
    span: tuple[float, float],
    seed: int = 0,
) -> Callable[[list[View]], list[View]]:
    """The stage as the builder calls it between pseudo-views and the COIN fit: views in,
    views out, reporting as stage ``enhance`` at build fractions across ``span``; the
    identity when ``models`` is None."""
    if models is None:
        return lambda views: views
    settings = EnhanceSettings.for_preset(preset)
    lo, hi = span
    return lambda views: enhance_views(
        views, models, settings, seed,
        progress=lambda f, m: progress("enhance", lo + (hi - lo) * f, m),
    )  # fmt: skip
