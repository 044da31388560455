"""``splatface eval``: how good is an avatar? A contact sheet and numbers.

Views: the input photo's (posed with the photo's expression), ±30° and ±60° yaw, the
right profile, the back and the top, rendered by the service. Metrics (JSON):
- ``input_view``: PSNR and SSIM (sRGB) against the photo inside the head mask (the
  render's silhouette where MediaPipe's person segmentation sees the person, segmented
  around the build's own square of the photo, ``head_box``: the same mask), the render
  laid over the photo: a pixel the avatar covers by alpha takes that much of its colour
  and the rest from the photo, so the silhouette's soft edge is judged by what it
  covers (the same as comparing the premultiplied render with the photo times alpha).
  ``psnr_db_on_grey`` lays it over the contact sheet's flat grey instead, which also
  charges the edge for the grey. A photo over 4096 px (a render's largest side) is
  measured scaled down to it, ``scale`` saying by how much;
- per novel view, ``coverage`` (share of the silhouette's interior, 3 px in from its
  edge, with alpha ≥ 0.98: 1.0 means no holes) and ``stray`` (share of pixels more than
  3 px outside the silhouette with alpha ≥ 0.02; both 3 px counted in steps to the four
  neighbours, so 2 px on a diagonal), split into what is not connected to
  the silhouette (``floaters``: blobs in the air) and the rest, the silhouette's own
  soft edge reaching further than 3 px (``stray_reach_px``: the 99th percentile of the
  stray pixels' distance from the silhouette); the silhouette is the render's own
  alpha > 0.5;
- at ±30°: whether MediaPipe finds the face, and the RMS distance between its landmarks
  and our posed mesh's (through the stored correspondence), over the inter-ocular
  distance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protocol import Client
from protocol.arkit import index_of
from protocol.camera import framing_distance, intrinsics_from_fov, orbit, project
from protocol.messages import MAX_SIZE

from .images import pixels_sha256, srgb_to_linear

VIEWS = (("+30", 30, 0), ("-30", -30, 0), ("+60", 60, 0), ("-60", -60, 0), ("profile", -90, 0),
         ("back", 180, 0), ("top", 0, 70))  # fmt: skip
FOV = 30.0
HALO = 3  # pixels in from / out from the silhouette


def _srgb8(rgb: np.ndarray, alpha: np.ndarray, bg: float | np.ndarray = 0.15) -> np.ndarray:
    """The premultiplied linear ``rgb`` over ``bg`` (linear: a grey level or an
    ``[H, W, 3]`` image) as 8-bit sRGB."""
    from .cli import linear_to_srgb8

    return linear_to_srgb8(np.clip(rgb + (1 - alpha[..., None]) * bg, 0, 1))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    diff = a.astype(float) - b.astype(float)
    return round(float(10 * np.log10(255**2 / max(np.mean(diff**2), 1e-12))), 2)


def _weights(meta: dict[str, Any]) -> np.ndarray:
    w = np.zeros(52, np.float32)
    for name, value in meta.get("photo_expression", {}).items():
        w[index_of(name)] = value
    return w


def _silhouette_stats(alpha: np.ndarray) -> dict[str, float]:
    """``coverage`` and ``stray`` (see the module notes); ``floaters``, the share of the
    outside in blobs of alpha >= 0.02 that do not touch the silhouette (stray alpha that
    is not the silhouette's own soft edge); ``stray_reach_px``, how far out the stray
    pixels reach from the silhouette (99th percentile, 0 without any)."""
    from scipy import ndimage

    sil = alpha > 0.5
    inner = ndimage.binary_erosion(sil, iterations=HALO)
    outer = ~ndimage.binary_dilation(sil, iterations=HALO)
    seen = alpha >= 0.02
    stray = seen & outer
    blobs, _ = ndimage.label(seen)
    detached = stray & ~np.isin(blobs, np.unique(blobs[sil]))
    reach = ndimage.distance_transform_edt(~sil)[stray] if stray.any() else np.zeros(1)

    def share(mask: np.ndarray) -> float:
        return round(float(mask[outer].mean()) if outer.any() else 0.0, 5)

    return {
        "coverage": round(float((alpha[inner] >= 0.98).mean()) if inner.any() else 0.0, 4),
        "stray": share(stray),
        "floaters": share(detached),
        "stray_reach_px": round(float(np.percentile(reach, 99)), 1),
    }


def _landmark_agreement(img: np.ndarray, verts: np.ndarray, tris: np.ndarray, intr, w2c):
    """MediaPipe on a render vs our mesh's landmarks in the same view (rest pose)."""
    from .build import detect
    from .headmodel import eye_distance, load_correspondence, load_head_model

    faces = detect.detect_faces(img)
    if not faces:
        return {"face_found": False}
    try:
        lm = detect.face_landmarks(img, faces[0])
    except Exception:  # noqa: BLE001 - "not found" is the measurement
        return {"face_found": False}
    corr, model = load_correspondence(), load_head_model()
    if len(verts) != len(model.neutral):
        return {"face_found": True}
    ours = np.einsum("lk,lkc->lc", corr.bary, verts[tris[corr.triangle]])
    uv, _ = project(ours, intr, w2c)
    iod = eye_distance(lm)
    rms = float(np.sqrt((((uv - lm[:, :2]) ** 2).sum(1) * corr.weight).sum() / corr.weight.sum()))
    return {"face_found": True, "landmark_rms": round(rms / iod, 4)}


def _square_around(mask: np.ndarray) -> tuple[float, float, float] | None:
    """The square (x0, y0, side) centred on ``mask``'s pixels and holding them; None if
    it has none."""
    ys, xs = np.nonzero(mask)
    if not xs.size:
        return None
    side = float(max(np.ptp(xs), np.ptp(ys)) + 1)
    return (0.5 * (xs.min() + xs.max() + 1 - side), 0.5 * (ys.min() + ys.max() + 1 - side), side)


def evaluate(client: Client, avatar_id: str, photo: np.ndarray, out: Path,
             size: int = 384, timeout: float = 600.0) -> dict[str, Any]:  # fmt: skip
    """Render the views, measure, write ``contact_sheet.png`` and ``metrics.json``.
    ``timeout``: seconds to wait for each render."""
    import json

    from skimage.metrics import structural_similarity

    from protocol.files import atomic_write

    from .build.photometric import person_mask
    from .cli import save_png

    reply = client.get(avatar_id, mesh=True, rig=False)
    header, verts, tris = reply.header, reply.arrays["vertices"], reply.arrays["triangles"]
    meta, info = header["meta"], header["avatar"]
    cam = meta.get("photo_camera")
    if cam is None:
        raise ValueError(f"avatar {avatar_id} has no photo camera (built by an older builder)")
    h, w = photo.shape[:2]
    if [w, h] != [meta["source"]["width"], meta["source"]["height"]]:
        raise ValueError(f"the photo is {w}x{h}; the avatar was built from a "
                         f"{meta['source']['width']}x{meta['source']['height']} photo")  # fmt: skip
    built_from = meta.get("photo_sha256")
    if built_from is not None and built_from != pixels_sha256(photo):
        raise ValueError(f"this {w}x{h} photo is not the one avatar {avatar_id} was built from")
    intr, w2c = np.array(cam["intrinsics"]), np.array(cam["world_to_camera"])
    box = meta.get("photo_head_box")
    scale = min(1.0, MAX_SIZE / max(w, h))
    if scale < 1:  # a photo over a render's largest side: measured at that side
        from PIL import Image

        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        intr = intr * np.array([sw / w, sh / h, sw / w, sh / h])  # pixel edges at 0: scale
        box = None if box is None else [v * scale for v in box]
        w, h = sw, sh
        photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.LANCZOS))
    r = client.render(avatar_id, intr, w2c, w, h, curves=_weights(meta)[None],
                      passes=("rgb", "alpha"), timeout=timeout)  # fmt: skip
    rgb, alpha = r["rgb"][0], r["alpha"][0]
    # older avatars have no head box: the rendered head's own square
    head = tuple(box) if box is not None else _square_around(alpha > 0.5)
    mask = (alpha > 0.5) & person_mask(photo, head)
    if not mask.any():
        raise ValueError(
            "nothing to measure: MediaPipe finds no person where the avatar's head lies "
            "in the photo"
        )
    fit_on_photo = _srgb8(rgb, alpha, srgb_to_linear(photo / 255.0))
    ssim_map = structural_similarity(photo, fit_on_photo, channel_axis=2, full=True)[1]
    metrics: dict[str, Any] = {
        "avatar_id": avatar_id,
        "input_view": {
            "psnr_db": _psnr(fit_on_photo[mask], photo[mask]),
            "psnr_db_on_grey": _psnr(_srgb8(rgb, alpha)[mask], photo[mask]),
            "ssim": round(float(ssim_map.mean(axis=2)[mask].mean()), 4),
            "mask_pixels": int(mask.sum()),
            "head_box": None if head is None else [round(v, 2) for v in head],
            "scale": round(scale, 5),
        },  # fmt: skip
        "views": {},
    }
    tiles = [_square(photo, size, head), _square(fit_on_photo, size, head)]
    labels = ["input", "fit"]
    distance = framing_distance(float(info["radius"]), FOV, fill=0.9)
    for name, yaw, pitch in VIEWS:
        vi, vw = intrinsics_from_fov(size, size, FOV), orbit(info["center"], distance, yaw, pitch)
        rv = client.render(avatar_id, vi, vw, size, size, passes=("rgb", "alpha"), timeout=timeout)
        img = _srgb8(rv["rgb"][0], rv["alpha"][0])
        stats = _silhouette_stats(rv["alpha"][0])
        if name in ("+30", "-30"):
            stats.update(_landmark_agreement(img, verts, tris, vi, vw))
        metrics["views"][name] = stats
        tiles.append(img)
        labels.append(name)
    sheet = _sheet(tiles, labels, columns=5)
    out.mkdir(parents=True, exist_ok=True)
    save_png(out / "contact_sheet.png", sheet)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False).encode())
    metrics["files"] = [str(out / "contact_sheet.png"), str(out / "metrics.json")]
    return metrics


def _square(img: np.ndarray, size: int, head: tuple[float, float, float] | None) -> np.ndarray:
    """The photo's centre square at ``size``; where the ``head``'s square box is under half
    of that, a square twice the head's box around it instead (a small face in a large
    photo)."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    if head is not None and 2 * head[2] < side:
        side = int(round(2 * head[2]))
        x0 = int(np.clip(round(head[0] + head[2] / 2 - side / 2), 0, w - side))
        y0 = int(np.clip(round(head[1] + head[2] / 2 - side / 2), 0, h - side))
    return np.asarray(Image.fromarray(img[y0 : y0 + side, x0 : x0 + side]).resize((size, size)))


def _sheet(tiles: list[np.ndarray], labels: list[str], columns: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    s = tiles[0].shape[0]
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * s, rows * s), (38, 38, 38))
    draw = ImageDraw.Draw(sheet)
    for k, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x, y = (k % columns) * s, (k // columns) * s
        sheet.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 6, y + 4), label, fill=(255, 255, 255))
    return np.asarray(sheet)
