"""COIN fit (FaceCraft4D's Consistent–Inconsistent training) on the CPU rasterizer.

The photo's view is the consistent half: trusted fully, L1 in linear colour inside its
confidence (head silhouette and person). The pseudo-views are the inconsistent half:
their pixels are warped, mirrored or invented, so each view's render passes through a
learned colour compensation (3x3 matrix and bias, pulled towards identity) before it is
compared, and each pixel counts by its confidence. A view whose fill is a shade off then
costs the compensation, not the identity. Every Gaussian is fitted (the pseudo-views
supervise the back), but Gaussians the photo sees take only a tenth of the pseudo-views'
pull, so the face stays the photo's. The pseudo-views also hold the silhouette: their
alpha is pulled to 1 inside the initial head and 0 outside (no holes, no floaters).
Regularisers keep offsets, sizes, opacities and colours near their start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import kernels

from ..avatar import BoundGaussians
from .views import View


@dataclass(frozen=True)
class CoinSchedule:
    """Iterations, pseudo-views rendered per iteration (taken in turn), and the weight
    of their silhouette term (alpha pulled to 1 inside the initial head, 0 outside).
    Long fits need the heavier silhouette: with 0.5, the default preset's 300 steps let
    half-transparent haze grow around the head (on the astronaut, 1.0-1.6 % of the
    pixels beside a turned view's silhouette, against 0.5-0.7 % after 100 steps); with 2,
    0.3-0.8 % at the same input-view PSNR (30.15 dB). Held to their colours
    (``COLOUR_WEIGHT``), the Gaussians match the pseudo-views more by their reach, and
    at 2 the haze came back (astronaut up to 1.2 %, Grace Hopper 1.7 %, her -30 degree
    view 0.980 covered); at 4, 0.5-0.8 % and 0.3-1.0 %, covered 0.981-0.999."""

    iterations: int
    views_per_step: int
    alpha_weight: float = 0.5


#: ``default``: 300 steps reach 30.1 dB at the astronaut's input view (``splatface
#: eval``) where 100 reach 29.0 and 200 29.7, in 44 s instead of 20 s on two CPU cores.
SCHEDULES = {
    "fast": CoinSchedule(30, 1),
    "default": CoinSchedule(300, 2, alpha_weight=4.0),
    "high": CoinSchedule(300, 2, alpha_weight=4.0),
}
LR = {"sh": 0.04, "opacity": 0.05, "offset": 2e-4, "log_scale": 0.01, "compensation": 0.02}
PSEUDO_WEIGHT = 0.5  # all pseudo-views together, against the photo's 1
SEEN_PULL = 0.1  # share of the pseudo-views' gradient a photo-seen Gaussian takes
OFFSET_WEIGHT = 1e4  # per squared metre of offset from the start
SCALE_WEIGHT = 0.01  # per squared unit of log-scale change
OPACITY_WEIGHT = 0.01  # per squared change of opacity
COMPENSATION_WEIGHT = 0.01  # per squared deviation of a view's affine from identity
#: Per squared change of an SH coefficient. Adam takes full-size steps on any gradient,
#: however small, so a Gaussian that barely shows in any view (teeth and mouth behind the
#: lips, the far side of an eyeball, hair under hair) drifted for all 300 steps of the
#: default fit: colour coefficients moved by up to 13 (3.7 in linear colour), the open
#: mouth showed green and blue specks, the hair red and yellow ones. This weight holds
#: them near the texture's colour, and the input view gains too: astronaut 30.15 to
#: 30.48 dB, Grace Hopper 24.66 to 24.71 (with the silhouette weight 4 it asks for).
COLOUR_WEIGHT = 0.1
#: Per unit of mean alpha the ``clear`` Gaussians put on their pixels of the photo's view
#: (the photo's L1 is a few hundredths): enough to pull the lids' cover of the photo's
#: open eyes from ~0.8 to ~0.15 in 100 steps (to ~0.002 in the default preset's 300).
CLEAR_WEIGHT = 0.5
CLEAR_STEPS = 100  # a schedule shorter than this fades the clear Gaussians faster


def _damp(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, its gradient scaled by ``factor`` (broadcast over rows)."""
    return x * factor + (x * (1 - factor)).detach()


def photo_seen(
    means: np.ndarray,  # [N, 3] world
    normals: np.ndarray,  # [N, 3] world unit normals
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    person: np.ndarray,  # [H, W] bool, the photo's person mask
) -> np.ndarray:
    """``[N]`` bool: Gaussians the photo shows (facing it, first along their ray, on
    the person), whose colour the photo decides."""
    from .gaussians import COLOUR_FACING, _visible

    h, w = person.shape
    seen, uv = _visible(means, normals, intrinsics, world_to_camera, (w, h), COLOUR_FACING)
    j = np.clip(np.nan_to_num(uv[:, 0]).astype(np.int64), 0, w - 1)
    i = np.clip(np.nan_to_num(uv[:, 1]).astype(np.int64), 0, h - 1)
    return seen & person[i, j]


def fit_coin(
    gaussians: BoundGaussians,
    frame: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    views: list[View],
    preset: str,
    seen: np.ndarray,  # [N] bool: Gaussians the photo saw
    progress: Callable[[float, str], None] = lambda f, m: None,
    schedule: CoinSchedule | None = None,
    drawn: np.ndarray | None = None,  # [N] bool: learn from the photo only (eyeballs)
    fixed: np.ndarray | None = None,  # [N] bool: learn from no view (keep their start)
    opaque: np.ndarray | None = None,  # [N] bool: keep their start opacity
    clear: tuple[np.ndarray, np.ndarray] | None = None,  # [N] bool; [h, w] bool, photo's view
    growth: np.ndarray | None = None,  # [N] the factor each one's scales may grow by
    shrink: np.ndarray | None = None,  # [N] the factor its tangent scales may shrink by
    drift: np.ndarray | None = None,  # [N] metres each may move along its normal
) -> tuple[BoundGaussians, dict]:
    """Fit ``gaussians`` to ``views`` (the photo's first). ``frame``: what
    :func:`~.photometric.bind` returns for them. Returns the fitted Gaussians, the
    per-view compensations ``[V-1, 3, 4]`` in the facts under ``"compensation"``, and
    the photo's L1 before/after. ``progress`` may raise to cancel. ``drawn`` Gaussians
    take nothing from the pseudo-views: the eyeballs are drawn (iris, pupil) to turn with
    gaze, and a pseudo-view's warped or mirrored eye paints an iris where the photo's gaze
    had it. (Kept from the photo too, drawn eyes track worse: MediaPipe reads gaze from
    photographed irises better, measured 0.63-0.89 against 0.81-0.91.) ``fixed``
    Gaussians learn from no view: the photo shows something else where they are.
    ``opaque`` Gaussians keep their opacity (a surface: what they cover stays covered).
    ``clear`` (Gaussians, pixels of the photo's view) fades those Gaussians where they
    cover those pixels: their own alpha there is pulled towards 0 through their opacity
    alone (moved or shrunk, a lid would leave gaps when it closes). The lids' skin over
    the photo's open eyes: an iris learnt on a lid stays put when the eyeball turns, and
    MediaPipe then reads a third of the gaze. ``growth`` bounds how far each Gaussian's
    scales may grow (1: they may only shrink; by default they are free), ``shrink`` how
    far its two tangent scales may shrink (a surface's Gaussians shrunk apart leave gaps
    between them that turned views see through), ``drift`` how far (metres) each may move
    along its normal from its start offset, either way (by default it is free)."""
    schedule = schedule or SCHEDULES[preset]
    base, normal, quats, stretch = frame
    g = gaussians
    photo, pseudo = views[0], views[1:]
    sh = torch.tensor(g.sh.astype(np.float64), requires_grad=True)
    clearing = clear is not None and bool(clear[0].any()) and bool(clear[1].any())
    # opacity logits are ``scaled * reach``, Adam stepping ``scaled``: the clear Gaussians
    # of a schedule shorter than CLEAR_STEPS take longer steps, to fade in time
    reach = torch.ones(len(g), dtype=torch.float64)
    if clearing:
        reach[torch.from_numpy(clear[0])] = max(1.0, CLEAR_STEPS / schedule.iterations)
    logits = torch.tensor(g.opacity_logit.astype(np.float64))
    scaled = (logits / reach).requires_grad_(True)

    def opacity_logits() -> torch.Tensor:
        return scaled * reach

    offset = torch.tensor(g.offset.astype(np.float64), requires_grad=True)
    log_scale = torch.tensor(g.log_scale.astype(np.float64), requires_grad=True)
    start_offset, start_scale = offset.detach().clone(), log_scale.detach().clone()
    start_sh = sh.detach().clone()
    largest = None
    if growth is not None:
        largest = start_scale + torch.log(torch.as_tensor(growth, dtype=torch.float64))[:, None]
    smallest = None
    if shrink is not None:
        factor = torch.log(torch.as_tensor(shrink, dtype=torch.float64))
        smallest = start_scale[:, :2] - factor[:, None]
    nearest = farthest = None
    if drift is not None:
        bound = torch.as_tensor(drift, dtype=torch.float64)
        nearest, farthest = start_offset - bound, start_offset + bound
    start_opacity = torch.sigmoid(logits)
    comp = torch.zeros((len(pseudo), 3, 4), dtype=torch.float64)
    comp[:, :, :3] = torch.eye(3, dtype=torch.float64)
    identity = comp.clone()
    comp.requires_grad_(True)
    opt = torch.optim.Adam([
        {"params": [sh], "lr": LR["sh"]}, {"params": [scaled], "lr": LR["opacity"]},
        {"params": [offset], "lr": LR["offset"]}, {"params": [log_scale], "lr": LR["log_scale"]},
        {"params": [comp], "lr": LR["compensation"]},
    ])  # fmt: skip
    pull = np.where(seen, SEEN_PULL, 1.0)
    if drawn is not None:
        pull[drawn] = 0.0
    photo_pull = np.ones(len(pull))
    if fixed is not None:
        pull[fixed] = photo_pull[fixed] = 0.0
    pull, photo_pull = torch.tensor(pull), torch.tensor(photo_pull)
    see_through = torch.tensor(np.ones(len(pull)) if opaque is None else (~opaque).astype(float))

    targets = [(torch.tensor(v.image, dtype=torch.float64),
                torch.tensor(v.confidence, dtype=torch.float64)[..., None],
                torch.tensor(v.alpha > 0.5, dtype=torch.float64)) for v in views]  # fmt: skip

    def damped(f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(means, scales, opacities, SH) whose gradients reach the parameters scaled by
        ``f``: made once a step for all the views that share ``f``."""
        s, o = _damp(sh, f[:, None, None]), _damp(opacity_logits(), f * see_through)
        d, ls = _damp(offset, f), _damp(log_scale, f[:, None])
        return base + d[:, None] * normal, torch.exp(ls) * stretch[:, None], torch.sigmoid(o), s

    def render(view: View, params: tuple[torch.Tensor, ...]):
        means, scales, opacities, s = params
        w, h = view.size
        out = kernels.rasterize(means, quats, scales, opacities, s, view.camera, w, h,
                                ("rgb", "alpha"), backend="cpu")  # fmt: skip
        return out.rgb, out.alpha

    if clearing:
        who = torch.from_numpy(np.flatnonzero(clear[0]))
        where = torch.from_numpy(clear[1])
    clear_start = clear_end = None

    def cover() -> torch.Tensor:
        """Mean alpha of the ``clear`` Gaussians alone over their pixels."""
        o = _damp(opacity_logits()[who], photo_pull[who] * see_through[who])
        means = base[who] + offset[who].detach()[:, None] * normal[who]
        scales = torch.exp(log_scale[who].detach()) * stretch[who, None]
        w, h = photo.size
        out = kernels.rasterize(means, quats[who], scales, torch.sigmoid(o), sh[who].detach(),
                                photo.camera, w, h, ("alpha",), backend="cpu")  # fmt: skip
        return out.alpha[where].mean()

    def l1(rgb, target, weight):
        return (weight * (rgb - target).abs()).sum() / (3 * weight.sum().clamp(min=1.0))

    losses, pseudo_losses = [], []
    turn = 0
    for it in range(schedule.iterations):
        opt.zero_grad()
        rgb, _ = render(photo, damped(photo_pull))
        data = l1(rgb, targets[0][0], targets[0][1])
        reg = (
            OFFSET_WEIGHT * ((offset - start_offset) ** 2).mean()
            + SCALE_WEIGHT * ((log_scale - start_scale) ** 2).mean()
            + OPACITY_WEIGHT * ((torch.sigmoid(opacity_logits()) - start_opacity) ** 2).mean()
            + COMPENSATION_WEIGHT * ((comp - identity) ** 2).sum() / max(len(pseudo), 1)
            + COLOUR_WEIGHT * ((sh - start_sh) ** 2).mean()
        )
        loss = data + reg
        if clearing:
            covered = cover()
            loss = loss + CLEAR_WEIGHT * covered
            clear_end = float(covered.detach())
            clear_start = clear_start if clear_start is not None else clear_end
        side = torch.zeros((), dtype=torch.float64)
        count = min(schedule.views_per_step, len(pseudo))
        shared = damped(pull) if count else ()
        for _ in range(count):
            k = turn % len(pseudo)
            turn += 1
            rgb_k, alpha_k = render(pseudo[k], shared)
            image, conf, inside = targets[k + 1]
            compensated = rgb_k @ comp[k, :, :3].T + alpha_k[..., None] * comp[k, :, 3]
            side = side + l1(compensated, image, conf)
            side = side + schedule.alpha_weight * (alpha_k - inside).abs().mean()
        if count:
            loss = loss + PSEUDO_WEIGHT * side / count
            pseudo_losses.append(float(side.detach()) / count)
        loss.backward()
        opt.step()
        with torch.no_grad():
            if largest is not None:
                log_scale.clamp_(max=largest)
            if smallest is not None:
                log_scale[:, :2].clamp_(min=smallest)
            if nearest is not None:
                offset.clamp_(min=nearest, max=farthest)
        losses.append(float(data.detach()))
        progress((it + 1) / schedule.iterations,
                 f"COIN fit {it + 1}/{schedule.iterations}: photo L1 {losses[-1]:.4f}")  # fmt: skip
    fitted = BoundGaussians(
        triangle=g.triangle, bary=g.bary, rotation=g.rotation,
        offset=offset.detach().numpy().astype(np.float32),
        log_scale=log_scale.detach().numpy().astype(np.float32),
        opacity_logit=opacity_logits().detach().numpy().astype(np.float32),
        sh=sh.detach().numpy().astype(np.float32), appear=g.appear,
    )  # fmt: skip
    facts = {
        "iterations": schedule.iterations,
        "views": len(views),
        "l1_start": round(losses[0], 5),
        "l1_end": round(losses[-1], 5),
        "compensation": comp.detach().numpy(),
    }
    if clear_start is not None:
        facts["clear_start"], facts["clear_end"] = round(clear_start, 4), round(clear_end, 4)
    if pseudo_losses:
        facts["pseudo_start"] = round(pseudo_losses[0], 5)
        facts["pseudo_end"] = round(pseudo_losses[-1], 5)
    return fitted, facts
