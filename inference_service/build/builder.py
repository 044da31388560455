"""Photo bytes → :class:`Avatar`, stage by stage, reporting progress and honouring cancel."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from protocol.arkit import ARKIT_NAMES
from protocol.camera import project

from ..avatar import FORMAT_VERSION, Avatar, BoundGaussians
from ..headmodel import HeadModel, load_correspondence, load_head_model
from ..images import decode_image, pixels_sha256
from . import detect
from .align import align
from .checks import photo_warnings
from .coin import fit_coin, photo_seen
from .diffusion import EnhanceModels
from .enhance import build_stage as enhance_stage
from .fit import fit_geometry
from .gaussians import (
    COUNTS,
    LID_GROWTH,
    fading_folds,
    lash_line,
    lid_growth,
    lid_layer,
    make_gaussians,
    open_and_closed_area,
)
from .hair import MIN_SHELL, HairShell, fit_hair, hair_gaussians
from .photometric import CROP_SIZE, bind, person_mask, photo_crop, resample
from .pseudoviews import Splats, make_pseudo_views, splats_labels
from .texture import bake_texture
from .views import View

log = logging.getLogger(__name__)

#: Hair Gaussians as a share of the preset's count (fewer where the hair is thin).
HAIR_SHARE = 0.25

#: The mouth's inside (teeth, gums, tongue, socket): their Gaussians may shrink, not grow.
INTERIOR_REGIONS = ("mouth_socket", "gums_tongue", "teeth")
#: Regions whose colours the builder draws (the mouth's inside; eyeballs): the
#: pseudo-views' warped, mirrored or invented pixels do not repaint them.
EYEBALL_REGIONS = ("eyeball_left", "eyeball_right")
DRAWN_REGIONS = (*INTERIOR_REGIONS, *EYEBALL_REGIONS)
#: Regions only the photo's own view shows (mouth, eyes): never textured like hair or skin.
INNER_REGIONS = (*DRAWN_REGIONS, "eye_sockets")

#: A Gaussian's footprint, in standard deviations of its largest scale.
FOOTPRINT_SIGMAS = 2.0
#: The face's skin more than THROAT_BELOW_CHIN (metres, at rest) below the chin: the
#: throat and the top of the chest, where a photo shows collars and ties. Fitted freely,
#: Grace Hopper's shrank and thinned along her tie's and collar's edges into cracks that
#: turned views saw through (coverage at ±30° 0.990/0.988); held opaque and shrinking to
#: no less than 1/THROAT_SHRINK of their size, 0.999/0.998, 0.1 dB lower at the photo.
THROAT_BELOW_CHIN = 0.01
THROAT_SHRINK = 1.25
#: How far the fit may grow a Gaussian's scales (the mouth's inside may not grow at all).
#: Unbounded, a few hundred grew to 1-3 cm, wide sheets whose edges turned views saw as a
#: haze beside the head: stray alpha 0.5-1.0 % of the outside at ±30° and ±60°, an orange
#: glow before Grace Hopper's glasses reaching 17 px out. At 3x, 0.1-0.5 % reaching 6-7 px
#: (coverage unchanged), at 0.1 dB of input-view PSNR; at 2x, 0.3 dB for a little less.
MAX_GROWTH = 3.0
#: What shows of a closed eye is the lid layer (``gaussians.lid_layer``, LID_LIFT in front
#: of the lid's own skin); anything the fit moved in front of it shows through. Free, the
#: fit lifted and grew Gaussians there: a black 4.7 mm lash Gaussian 1.5 mm off the
#: astronaut's left lid, pupil Gaussians up to 7 mm off Grace Hopper's eyeballs (and on
#: a closing lid, flat splats of 3x their size stand off the curved skin at their edges).
#: MediaPipe read such a closed eye as a third open. So the eyeballs' Gaussians and
#: those on the closing lids' skin (the lid layer's triangles) keep their offsets; the
#: eyeballs' keep their size (at 1.5x, one build of Grace Hopper read her gaze at
#: 0.68-0.88 over five clips, against 0.78-0.93) and the lids' may grow LID_SKIN_GROWTH x.
#: ``benchmarks/roundtrip.py`` (ten clips, two builds each): blinks 0.85/0.88 to
#: 0.955/0.955 (astronaut), 0.81/0.94 to 0.94/0.94 (Grace Hopper; her gaze 0.70-0.83 to
#: 0.74-0.92), at 0.1 dB of her input view's PSNR.
LID_SKIN_GROWTH = 1.5

#: Build fractions of the enhance stage, and where the COIN fit starts without and with
#: it: on a CPU the stage paints for minutes a view, and its bar stood still at 0.68.
ENHANCE_SPAN = (0.68, 0.80)
COIN_FROM = {False: ENHANCE_SPAN[0], True: ENHANCE_SPAN[1]}
COIN_TO = 0.94

#: ``progress(stage, fraction, message)``; may raise to cancel the build.
Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class BuildOptions:
    """What a build request may choose. ``face``: index, 0 = largest; ``face_box``:
    (x0, y0, x1, y1) pixels of the face to use; both ``None`` → the largest face."""

    name: str = ""
    preset: str = "default"
    face: int | None = None
    face_box: tuple[float, float, float, float] | None = None
    #: local diffusion weights for the optional ``enhance`` stage (None: off)
    enhance: EnhanceModels | None = None


def _preload() -> None:
    """What a build needs once per process after detection: the head model, its
    correspondence, and what torch's optimisers import on their first construction
    (``torch._dynamo``, 1.6 s). Loaded beside detection, a first build takes 1-2 s less
    on two cores; later builds find them loaded. A load that fails here is left for the
    build's own call to raise, with its error, to the client."""
    try:
        load_head_model()
        load_correspondence()
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    except Exception:
        log.debug("preloading failed; the build loads again", exc_info=True)


def build_avatar(
    image: bytes,
    options: BuildOptions,
    avatar_id: str,
    progress: Progress,
    on_faces: Callable[[list[dict]], None] = lambda faces: None,
) -> Avatar:
    """Build an avatar; ``on_faces`` hears every face found (largest first, with boxes)
    as soon as detection is done, so a client can offer a choice."""
    preload = threading.Thread(target=_preload, name="build-preload", daemon=True)
    preload.start()
    progress("decode", 0.02, "reading the photo")
    photo = decode_image(image)
    h, w = photo.shape[:2]

    progress("detect", 0.10, f"looking for faces in the {w}x{h} photo")
    faces = detect.detect_faces(
        photo,
        near=options.face_box,
        progress=lambda f, message: progress("detect", 0.10 + 0.15 * f, message),
    )
    on_faces([f.to_dict() for f in faces])
    progress("landmarks", 0.30, f"{len(faces)} face(s) found; finding landmarks")
    face, landmarks = detect.locate_face(photo, faces, options.face, options.face_box)

    used = faces.index(face)
    asked = options.face is not None or options.face_box is not None
    skipped = "" if asked or not used else f"face {used} used: the larger have no landmarks; "
    progress("align", 0.45, f"{skipped}placing the head model")
    preload.join()  # a failed load fails again here, with its error
    model = load_head_model()
    start = align(model, landmarks, (w, h))
    progress("fit", 0.50, "fitting head shape, expression, pose and focal length")
    fit = fit_geometry(model, load_correspondence(), landmarks, start)

    progress("hair", 0.55, "measuring hair from the person's silhouette")
    posed = fit.photo_vertices(model)
    head, _ = photo_crop(posed, fit.intrinsics, fit.world_to_camera, CROP_SIZE[options.preset])
    person = person_mask(photo, head)
    shell = fit_hair(model, posed, photo, person, fit.intrinsics, fit.world_to_camera)
    # an open mouth shows teeth and the mouth's inside; where the fitted lips do not open
    # as far, its colours would land on the lips and keep the rest mouth looking open
    mouth = detect.mouth_opening(landmarks, (h, w))
    surface = person & ~mouth
    eyes = detect.eye_openings(landmarks, (h, w))
    progress("gaussians", 0.60, f"placing Gaussians ({options.preset} preset)")
    texture = bake_texture(
        model, posed, photo, fit.intrinsics, fit.world_to_camera, surface, shell.colour,
        options.preset,
    )  # fmt: skip
    gaussians = make_gaussians(model, texture, options.preset)
    hair = hair_gaussians(
        model, posed, shell, int(HAIR_SHARE * COUNTS[options.preset]), photo,
        fit.intrinsics, fit.world_to_camera, np.random.default_rng(1),
    )  # fmt: skip
    gaussians = BoundGaussians.concat([gaussians, hair])

    rest = fit.rest_vertices(model)
    gaussians, coin_facts = coin_fit(
        gaussians, model, posed, rest, shell, photo, person, fit.intrinsics,
        fit.world_to_camera, options.preset, progress, mouth, eyes,
        enhance=enhance_stage(options.enhance, options.preset, progress, span=ENHANCE_SPAN),
        coin_from=COIN_FROM[options.enhance is not None],
    )  # fmt: skip

    # after the fit: at the photo's pose the lid layer and the lashes of a closed eye are
    # invisible, and they must not learn; the folds they cover fade as they appear
    closing = [lid_layer(model, rest, gaussians), lash_line(model, rest, gaussians)]
    gaussians = fading_folds(model, rest, BoundGaussians.concat([gaussians, *closing]))
    progress("finish", 0.945, "checking what the photo allowed")
    # the faces the user could choose instead: a doubtful box with no landmarks is none
    usable = [used]
    if len(faces) > 1 and not asked:
        try:
            usable = detect.choosable(photo, faces, used)
        except Exception:  # a warning's check must not fail a finished build
            log.exception("could not check the other faces for landmarks")
    warnings = photo_warnings(
        model, load_correspondence(), fit, (w, h), CROP_SIZE[options.preset] / head[2],
        usable, used, asked, more=len(faces) > detect.CHOOSABLE_TRIES,
    )  # fmt: skip
    told = f"; {len(warnings)} warning(s)" if warnings else ""
    progress("finish", 0.95, f"{len(gaussians)} Gaussians{told}")
    name = options.name or f"avatar-{avatar_id[:6]}"
    meta = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "builder": "coin-1",
        "preset": options.preset,
        "source": {"width": w, "height": h},
        "photo_sha256": pixels_sha256(photo),
        # the square (x0, y0, side) of the photo whose person mask the build used, so that
        # ``eval`` measures inside the same mask
        "photo_head_box": [float(v) for v in head],
        "faces": [f.to_dict() for f in faces],
        "face": used,
        "landmark_rms": round(fit.rms, 4),
        "landmark_rms_before_fit": round(fit.rms_initial, 4),
        "focal_px": round(float(fit.intrinsics[0]), 1),
        # the photo's camera in the head frame, so clients can render the input view
        "photo_camera": {
            "intrinsics": [float(v) for v in fit.intrinsics],
            "world_to_camera": [[float(v) for v in row] for row in fit.world_to_camera],
        },
        # what the photo showed and the rest pose no longer does
        "photo_expression": {
            ARKIT_NAMES[i]: round(float(v), 3) for i, v in enumerate(fit.expression) if v >= 0.05
        },
        "gaussians": len(gaussians),
        "coin_fit": coin_facts,
        # where the photo held the avatar back (see checks.py), for clients to show
        "warnings": warnings,
        "enhance": None if options.enhance is None else options.enhance.to_dict(),
    }
    return Avatar(
        id=avatar_id,
        name=name,
        vertices=rest.astype(np.float32),
        triangles=model.triangles,
        shape_deltas=model.arkit_deltas,
        vertex_part=model.vertex_part,
        gaussians=gaussians,
        photo_intrinsics=fit.intrinsics,
        photo_world_to_camera=fit.world_to_camera,
        meta=meta,
        texture=texture,
    )


def coin_fit(
    gaussians: BoundGaussians,
    model: HeadModel,
    posed: np.ndarray,  # [V, 3] the head as the photo shows it
    rest: np.ndarray,  # [V, 3] the rest mesh the avatar keeps
    shell: HairShell,
    photo: np.ndarray,
    person: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    preset: str,
    progress: Progress,
    mouth: np.ndarray | None = None,  # [H, W] bool: the photo's open mouth
    eyes: np.ndarray | None = None,  # [H, W] bool: the photo's open eyes
    enhance: Callable[[list[View]], list[View]] = lambda views: views,
    coin_from: float = COIN_FROM[False],
) -> tuple[BoundGaussians, dict]:
    """Pseudo-views of the initial head (stage "views"), then the COIN fit ("coin").
    ``enhance`` may repaint the views' low-confidence pixels in between."""
    frame = bind(gaussians, posed, rest, model.triangles)
    base, normal, quats, stretch = frame
    means = base + torch.tensor(gaussians.offset, dtype=torch.float64)[:, None] * normal
    region = model.triangle_region[gaussians.triangle]
    scalp = shell.scalp[model.triangles[gaussians.triangle]].all(axis=1)
    inner = tuple(model.region(n) for n in INNER_REGIONS)
    splats = Splats(
        means=means.numpy(), quats=quats.numpy(),
        scales=np.exp(gaussians.log_scale.astype(np.float64)) * stretch.numpy()[:, None],
        opacities=1 / (1 + np.exp(-gaussians.opacity_logit.astype(np.float64))),
        sh=gaussians.sh.astype(np.float64),
        labels=splats_labels(region, inner, scalp | (gaussians.offset >= MIN_SHELL)),
    )  # fmt: skip
    size = CROP_SIZE[preset]
    box, camera = photo_crop(base.numpy(), intrinsics, world_to_camera, size)
    progress("views", 0.62, "rendering pseudo-views around the head")
    views = make_pseudo_views(
        splats, photo, person, box, camera, size, preset,
        progress=lambda f, m: progress("views", 0.62 + 0.06 * f, m),
    )  # fmt: skip
    views = enhance(views)
    seen = photo_seen(splats.means, normal.numpy(), intrinsics, world_to_camera, person)
    drawn = np.isin(region, [model.region(n) for n in DRAWN_REGIONS])
    # the lips' inner faces, which the fitted mouth turns towards the photo where it shows
    # teeth: they keep the texture's lip colours (learning teeth, the lips of the rest
    # mouth would look parted)
    fixed = (region == model.region("face")) & _reaches(
        splats.means, splats.scales, mouth, intrinsics, world_to_camera
    )
    # the neck (and the clothing the photo puts on it), the throat and the head's skin
    # outside the face are opaque: the pseudo-views' fills must not thin them into holes
    # (leaving the face free keeps its outline where MediaPipe reads it in turned views)
    at_rest = np.einsum("nk,nkc->nc", gaussians.bary, rest[model.triangles[gaussians.triangle]])
    throat = (region == model.region("face")) & (
        at_rest[:, 2] < rest[model.landmarks68[8], 2] - THROAT_BELOW_CHIN
    )
    opaque = ((region == model.region("head_neck")) & ~scalp) | throat
    # the skin whose footprint reaches the photo's open eyes must not cover them: there
    # only the eyeballs, which turn, may show the iris
    clear = None
    if eyes is not None and eyes.any():
        lids = (region == model.region("face")) & _reaches(
            splats.means, splats.scales, eyes, intrinsics, world_to_camera
        )
        clear = (lids, resample((eyes * 255).astype(np.uint8), box, size) > 127)
    # the teeth and mouth keep their size: from the one view that shows them (the photo's,
    # they are drawn) they grew along its rays, where growing costs nothing, and when the
    # rest pose closed the lips a tooth stuck out of them as a needle turned views show;
    # the eyeballs keep theirs and their offsets, and the closing lids' skin its offsets
    # (see LID_SKIN_GROWTH); the rest may grow MAX_GROWTH x
    interior = np.isin(region, [model.region(n) for n in INTERIOR_REGIONS])
    eyeball = np.isin(region, [model.region(n) for n in EYEBALL_REGIONS])
    area, closed_area = open_and_closed_area(rest, model)
    lid_skin = lid_growth(area, closed_area, model)[gaussians.triangle] >= LID_GROWTH
    growth = np.where(interior | eyeball, 1.0, np.where(lid_skin, LID_SKIN_GROWTH, MAX_GROWTH))
    held = eyeball | lid_skin
    fitted, facts = fit_coin(
        gaussians, frame, views, preset, seen,
        progress=lambda f, m: progress("coin", coin_from + (COIN_TO - coin_from) * f, m),
        drawn=drawn,
        fixed=fixed, opaque=opaque, clear=clear, growth=growth,
        shrink=np.where(throat, THROAT_SHRINK, np.inf), drift=np.where(held, 0.0, np.inf),
    )  # fmt: skip
    facts.pop("compensation")
    return fitted, {**facts, "size": size}


def _reaches(
    means: np.ndarray, scales: np.ndarray, mask: np.ndarray | None, intrinsics, world_to_camera
) -> np.ndarray:
    """``[N]`` bool: Gaussians (``means``, ``scales`` ``[N, 3]``) whose footprint in the
    photo (FOOTPRINT_SIGMAS of their largest scale around the centre) reaches ``mask``."""
    if mask is None or not mask.any():
        return np.zeros(len(means), bool)
    from scipy import ndimage

    h, w = mask.shape
    uv, z = project(means, intrinsics, world_to_camera)
    radius = FOOTPRINT_SIGMAS * intrinsics[0] * scales.max(axis=1) / np.maximum(z, 1e-6)
    j, i = np.floor(np.nan_to_num(uv, nan=-1e9)).astype(np.int64).T
    inside = (j >= 0) & (j < w) & (i >= 0) & (i < h) & (z > 0)
    out = np.zeros(len(means), bool)
    if not inside.any():
        return out
    # distances only around the mask, as far as the widest footprint reaches: the same
    # answer, without a float64 distance map of a whole 80 MP photo (gigabytes)
    reach = int(np.ceil(np.nan_to_num(radius[inside], posinf=max(h, w)).max())) + 1
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(rows[0] - reach, 0), min(rows[-1] + reach + 1, h)
    x0, x1 = max(cols[0] - reach, 0), min(cols[-1] + reach + 1, w)
    near = inside & (i >= y0) & (i < y1) & (j >= x0) & (j < x1)
    distance = ndimage.distance_transform_edt(~mask[y0:y1, x0:x1])
    out[near] = distance[i[near] - y0, j[near] - x0] <= radius[near]
    return out
