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


def pixels_sha256(photo: np.ndarray) -> str:
    """SHA-256 of a decoded photo's pixels and shape: the same for the same picture in
    any file format or with other metadata, so ``eval`` can tell it was built from it."""
    import hashlib

    digest = hashlib.sha256(str(photo.shape).encode())
    digest.update(np.ascontiguousarray(photo).tobytes())
    return digest.hexdigest()


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
            white = _declared_white(im)
            im.load()  # a corrupt stream fails here, not inside _upright's EXIF guard
            im = _upright(im)
            im = _to_srgb(im)
    except ProtocolError:
        raise
    except Image.DecompressionBombError as exc:
        raise ProtocolError(errors.TOO_LARGE, f"image is too large to decode: {exc}") from None
    except UnidentifiedImageError:  # its text names a BytesIO object, nothing of use
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            raise ProtocolError(
                errors.BAD_IMAGE,
                "a TIFF that cannot be read: truncated or corrupt, or of a kind Pillow "
                "does not read (such as floating-point colour: save it with 8 or 16 bits "
                "per channel)",
            ) from None
        raise ProtocolError(
            errors.BAD_IMAGE, "not a readable image (PNG, JPEG, WebP, TIFF, BMP...)"
        ) from None
    except Exception as exc:  # decoders raise OSError, ValueError, RuntimeError, struct.error...
        raise ProtocolError(errors.BAD_IMAGE, f"the image is truncated or corrupt: {exc}") from None
    if min(im.size) < MIN_SIDE:
        raise ProtocolError(
            errors.BAD_IMAGE, f"image is {im.size[0]}x{im.size[1]}, smaller than {MIN_SIDE} px"
        )
    return _to_rgb8(im, white)


_ORIENTATION = {2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
                4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
                6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,),
                8: (Image.Transpose.ROTATE_90,)}  # fmt: skip


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says; where Pillow cannot rewrite an odd
    EXIF block, the orientation tag alone is applied."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed tag elsewhere in the EXIF block
        try:
            orientation = int(im.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - no usable EXIF at all: as stored
            orientation = 1
        for step in _ORIENTATION.get(orientation, ()):
            im = im.transpose(step)
        return im


def _to_srgb(im: Image.Image) -> Image.Image:
    """``im`` converted from its embedded colour profile (a phone's Display P3, Adobe RGB,
    a CMYK press profile) to sRGB; as it is without one, or if the profile is unusable."""
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("P", "PA"):  # a palette's colours are in the profile's space
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out = "RGBA" if im.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode=out)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im


def _to_rgb8(im: Image.Image, white: float | None = None) -> np.ndarray:
    """8-bit RGB; a grey ``I``/``F`` image is scaled so that ``white`` (as its file
    declares, else guessed from its values) becomes 255."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im)  # uint16, int32 or float32: scaled in strips below (an 8944 px
        # square 16-bit PNG of 172 KiB peaked at 2.45 GB in float64 copies of it whole)
        if white is not None:
            top = white
        elif mode == "F" and np.quantile(a, 0.99) <= 1.0:  # 0..1, maybe with highlights
            top = 1.0
        else:
            top = 65535.0 if a.max() > 255 else 255.0
        g = np.empty(a.shape, np.uint8)
        for r in range(0, len(a), 256):
            part = a[r : r + 256].astype(np.float64)
            g[r : r + 256] = np.clip(part / top * 255.0 + 0.5, 0, 255)
        return np.repeat(g[..., None], 3, axis=2)
    if "A" in mode or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        out = np.empty(rgba.shape[:2] + (3,), np.uint8)
        for r in range(0, len(rgba), 256):  # composited on mid-grey in strips: no 8k float copies
            part = rgba[r : r + 256].astype(np.float32)
            alpha = part[..., 3:] / 255.0
            out[r : r + 256] = np.clip(part[..., :3] * alpha + 128.0 * (1 - alpha) + 0.5, 0, 255)
        return out
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _declared_white(im: Image.Image) -> float | None:
    """The value that stands for white in a grey integer image, where its file declares
    it: a dark 16-bit photo whose values all stay under 256 is still 16-bit. Pillow opens
    16-bit PNGs and TIFFs as ``I;16`` and scales every PGM to 16 bits in mode ``I``.
    Read before any transform: a transformed copy has no ``format``."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PPM"):
        return 65535.0
    return None


_SRGB_KNEE = 0.0031308  # linear value where the sRGB curve turns from line to power


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, np.float64), 0.0, 1.0)
    return np.where(c <= _SRGB_KNEE, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055)


def linear_to_srgb_slope(c: np.ndarray) -> np.ndarray:
    """The derivative of :func:`linear_to_srgb` at ``c`` (in [0, 1])."""
    c = np.asarray(c, np.float64)
    return np.where(c <= _SRGB_KNEE, 12.92, 1.055 / 2.4 * np.maximum(c, _SRGB_KNEE) ** (-1.4 / 2.4))
