"""Decode user photos of any common format into 8-bit sRGB ``[H, W, 3]``."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from protocol import errors
from protocol.errors import ProtocolError

MAX_PIXELS = 80_000_000  # an 8k x 10k photo; anything larger is refused before decoding
MIN_SIDE = 16


def decode_image(data: bytes | memoryview, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes → ``[H, W, 3]`` uint8 sRGB, upright as its EXIF orientation says.

    Grayscale, palette, 16-bit, CMYK and images with alpha (composited on mid-grey) are
    converted. Raises :class:`ProtocolError`: ``bad_image`` (empty, not an image,
    truncated or corrupt, too small) or ``too_large`` (over ``max_pixels``, such as a
    decompression bomb), without decoding the pixels of an oversized image.
    """
    data = bytes(data)
    if not data:
        raise ProtocolError(errors.BAD_IMAGE, "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ProtocolError(
                    errors.TOO_LARGE,
                    f"image is {w}x{h} = {w * h / 1e6:.0f} MP, limit {max_pixels / 1e6:.0f} MP",
                )
            im = ImageOps.exif_transpose(im)
            im.load()
    except ProtocolError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ProtocolError(
            errors.BAD_IMAGE, f"not a readable image (PNG, JPEG, WebP, TIFF, BMP...): {exc}"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ProtocolError(errors.BAD_IMAGE, f"the image is truncated or corrupt: {exc}") from None
    if min(im.size) < MIN_SIDE:
        raise ProtocolError(
            errors.BAD_IMAGE, f"image is {im.size[0]}x{im.size[1]}, smaller than {MIN_SIDE} px"
        )
    return _to_rgb8(im)


def _to_rgb8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if "A" in mode or (mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 128.0 * (1 - alpha)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055)
