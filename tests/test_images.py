"""Photo decoding: every awkward format converts, every bad file gets a typed error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference_service.images import decode_image, linear_to_srgb, srgb_to_linear
from protocol import errors
from protocol.errors import ProtocolError


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = (np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(30, 40, 3)


@pytest.mark.parametrize(
    "data",
    [
        save(Image.fromarray(RGB), "PNG"),
        save(Image.fromarray(RGB), "JPEG", quality=95),
        save(Image.fromarray(RGB), "WEBP", lossless=True),
        save(Image.fromarray(RGB), "TIFF"),
        save(Image.fromarray(RGB), "BMP"),
    ],
    ids=["png", "jpeg", "webp", "tiff", "bmp"],
)
def test_common_formats(data):
    out = decode_image(data)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - RGB).mean() < 3


def test_grayscale_and_16bit_become_grey_rgb():
    g = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))
    out = decode_image(save(Image.fromarray(g, "L"), "PNG"))
    assert out.shape == (30, 40, 3) and np.array_equal(out[..., 0], out[..., 2])
    g16 = g.astype(np.uint16) * 257
    out16 = decode_image(save(Image.fromarray(g16), "PNG"))
    assert out16.shape == (30, 40, 3)
    assert np.abs(out16[..., 0].astype(int) - g).max() <= 1


def test_a_large_16bit_grey_photo_decodes_without_float_copies_of_it_whole():
    """An 8944 px square 16-bit grey PNG (172 KiB) peaked at 2.45 GB: it was scaled to 8
    bits in float64 copies of the whole photo. Scaled in strips, the peak is about the
    16-bit pixels and the RGB result, and the values are those of the whole-photo sum."""
    import tracemalloc

    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 65536, (1500, 1400), dtype=np.uint16)
    data = save(Image.fromarray(g16), "PNG")
    tracemalloc.start()
    try:
        out = decode_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.clip(g16.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    assert peak < g16.nbytes + out.nbytes + 2 * g16.size + (8 << 20), peak / 2**20


@pytest.mark.parametrize("maxval", [1000, 65535])
def test_dark_16bit_pgm_stays_dark(maxval):
    # Pillow opens a 16-bit PGM in mode I; values all under 256 are still 16-bit, not 8
    g = np.tile(np.linspace(0, maxval * 0.003, 40), (30, 1)).astype(">u2")
    out = decode_image(f"P5 40 30 {maxval}\n".encode() + g.tobytes())
    assert out.shape == (30, 40, 3) and out.max() <= 1
    bright = (g.astype(float) * 64).astype(">u2")
    out = decode_image(f"P5 40 30 {maxval}\n".encode() + bright.tobytes())
    expect = np.clip(bright / maxval * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(out[..., 0].astype(int) - expect).max() <= 1


def test_rgba_is_composited_on_grey():
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 39]) == (128, 128, 128)


def test_cmyk_and_palette():
    cmyk = Image.fromarray(RGB).convert("CMYK")
    out = decode_image(save(cmyk, "JPEG", quality=95))
    assert out.shape == (30, 40, 3) and np.abs(out.astype(int) - RGB).mean() < 12
    pal = Image.fromarray(RGB).convert("P")
    assert decode_image(save(pal, "PNG")).shape == (30, 40, 3)


def test_exif_orientation_is_applied():
    im = Image.fromarray(RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = decode_image(save(im, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 30, 3)
    expect = np.rot90(RGB, k=-1)
    assert np.abs(out.astype(int) - expect).mean() < 3


@pytest.mark.parametrize(
    "data, code, words",
    [
        (b"", errors.BAD_IMAGE, "empty"),
        (b"hello, I am not a picture", errors.BAD_IMAGE, "not a readable image"),
        (save(Image.fromarray(RGB), "PNG")[:200], errors.BAD_IMAGE, "truncated"),
        (save(Image.fromarray(RGB[:8, :8]), "PNG"), errors.BAD_IMAGE, "smaller than"),
    ],
    ids=["empty", "text", "truncated", "tiny"],
)
def test_bad_files(data, code, words):
    with pytest.raises(ProtocolError) as e:
        decode_image(data)
    assert e.value.code == code and words in e.value.message


def test_a_corrupt_stream_is_refused_not_built_from():
    """One byte flipped late in a PNG's image data (Pillow's decoder refuses it); the
    decoder's error was taken for a bad EXIF block and the rows after it came out black."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 200, 3), np.uint8)
    data = bytearray(save(Image.fromarray(noise), "PNG"))
    at = data.find(b"IDAT") + 4
    data[at + int(0.75 * (len(data) - at))] ^= 0xFF
    with pytest.raises(ProtocolError) as e:
        decode_image(bytes(data))
    assert e.value.code == errors.BAD_IMAGE and "corrupt" in e.value.message


def test_an_unreadable_tiff_says_what_it_may_be():
    """Pillow names neither a cut TIFF nor a float RGB one: the message says both."""
    rgb_float = np.random.default_rng(0).random((20, 30, 3)).astype(np.float32)
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb_float)
    for data in (buf.getvalue(), save(Image.fromarray(RGB), "TIFF")[:100]):
        with pytest.raises(ProtocolError) as e:
            decode_image(data)
        assert e.value.code == errors.BAD_IMAGE
        assert "truncated or corrupt" in e.value.message
        assert "8 or 16 bits per channel" in e.value.message


def test_decompression_bomb_refused_before_decoding():
    bomb = save(Image.new("1", (9000, 9000)), "PNG")  # 81 MP in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ProtocolError) as e:
        decode_image(bomb)
    assert e.value.code == errors.TOO_LARGE and "81 MP" in e.value.message


def test_a_bomb_past_pillows_own_limit_is_too_large_too():
    bomb = save(Image.new("1", (15000, 15000)), "PNG")  # 225 MP: Pillow itself refuses it
    with pytest.raises(ProtocolError) as e:
        decode_image(bomb)
    assert e.value.code == errors.TOO_LARGE


def test_an_odd_exif_tag_does_not_lose_the_orientation():
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"
    data = bytearray(save(Image.fromarray(RGB), "JPEG", exif=exif.tobytes(), quality=95))
    data[data.find(b"\x01\x0f\x00\x02") + 1] = 0x25  # Make renumbered as a LONG tag, still text
    out = decode_image(bytes(data))  # Pillow cannot rewrite this EXIF block
    assert out.shape == (40, 30, 3)
    assert np.abs(out.astype(int) - np.rot90(RGB, k=-1)).mean() < 3


def test_key_colour_transparency_and_float_images():
    rgb = RGB.copy()
    rgb[:, :20] = 0  # black is the transparent key colour
    out = decode_image(save(Image.fromarray(rgb), "PNG", transparency=(0, 0, 0)))
    assert tuple(out[0, 0]) == (128, 128, 128) and tuple(out[0, 39]) == tuple(rgb[0, 39])
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))  # float images hold 0..1
    out = decode_image(save(Image.fromarray(ramp, "F"), "TIFF"))
    assert np.abs(out[..., 0].astype(int) - np.round(ramp * 255)).max() <= 1
    ramp[0, 0] = 1.02  # one highlight past white: still a 0..1 image, not a 0..255 one
    out = decode_image(save(Image.fromarray(ramp, "F"), "TIFF"))
    assert np.abs(out[1:, :, 0].astype(int) - np.round(ramp[1:] * 255)).max() <= 1


def test_an_embedded_colour_profile_is_converted_to_srgb():
    """A phone photo in Display P3 (Blender's own P3 profile, shipped with bpy)."""
    import importlib.util

    from PIL import ImageCms

    bpy_dir = Path(importlib.util.find_spec("bpy").submodule_search_locations[0])
    p3 = next(bpy_dir.glob("*/datafiles/colormanagement/icc/srgb_p3d65_display.icc"))
    red = np.full((30, 40, 3), (220, 30, 30), np.uint8)
    srgb, p3_profile = ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(str(p3))
    in_p3 = ImageCms.profileToProfile(Image.fromarray(red), srgb, p3_profile)
    assert np.abs(np.asarray(in_p3).astype(int) - red).max() > 10  # other numbers in P3
    data = save(in_p3, "PNG", icc_profile=p3.read_bytes())
    assert np.abs(decode_image(data).astype(int) - red).max() <= 3
    # a palette image's colours are in its profile's space too
    data = save(in_p3.quantize(16), "PNG", icc_profile=p3.read_bytes())
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert np.abs(decode_image(data).astype(int) - red).max() <= 3


def test_srgb_round_trip():
    c = np.linspace(0, 1, 50)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(c)), c, atol=1e-12)
