"""Image decoding without a server: formats, modes, EXIF orientation, size limits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.bundle import InputSpec
from serving.imaging import (
    ImageTooLargeError,
    UndecodableImageError,
    UnsupportedImageError,
    center_box,
    prepare_image,
)

RGB32 = InputSpec(shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, color_mode="RGB")
GRAY8 = InputSpec(shape=(1, 8, 8), mean=(0.5,), std=(0.25,), color_mode="L")
LIMIT = 4096 * 4096


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def solid(mode: str, size: tuple[int, int], color) -> Image.Image:
    return Image.new(mode, size, color)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width×height but carries (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_every_supported_format_decodes_to_the_input_size(fmt: str) -> None:
    data = encode(solid("RGB", (50, 40), (200, 30, 30)), fmt)
    out = prepare_image(data, RGB32, LIMIT)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # Lossy formats and GIF's palette move colours a little, never from red to something else.
    red, green, blue = out.reshape(-1, 3).mean(axis=0)
    assert red > 150 and green < 80 and blue < 80


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 257 * 100, (100, 100, 100)),
        ("I", 257 * 40, (40, 40, 40)),
        ("F", 0.5, (128, 128, 128)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent → white background
        ("LA", (0, 0), (255, 255, 255)),
        ("YCbCr", (76, 85, 255), (254, 0, 0)),
    ],
)
def test_mode_conversion_to_rgb(mode: str, color, expected) -> None:
    image = solid(mode, (16, 16), color)
    # TIFF keeps these modes losslessly; decode via the in-memory Image to test the mapping.
    from serving.imaging import to_color_mode

    out = np.asarray(to_color_mode(image, "RGB"))
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), expected, atol=2)


def test_palette_with_transparency_composites_on_white() -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    data = encode(image, "PNG", transparency=0)
    out = prepare_image(data, RGB32, LIMIT)
    assert (out == 255).all()


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    array = np.full((20, 20), 30000, dtype=np.uint16)
    data = encode(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = prepare_image(data, RGB32, LIMIT)
    assert abs(int(out.mean()) - round(30000 / 257)) <= 1


def test_cmyk_jpeg_decodes() -> None:
    data = encode(solid("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95)
    out = prepare_image(data, RGB32, LIMIT)
    red, green, blue = out.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [solid("RGB", (20, 20), c) for c in ((0, 0, 255), (255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = prepare_image(buf.getvalue(), RGB32, LIMIT)
    red, green, blue = out.reshape(-1, 3).mean(axis=0)
    assert blue > 200 and red < 30 and green < 30


def test_exif_orientation_is_applied() -> None:
    # Left half black, right half white; orientation 3 (rotate 180°) swaps the halves.
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:, 16:] = 255
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 3
    upright = prepare_image(encode(image, "PNG"), RGB32, LIMIT)
    rotated = prepare_image(encode(image, "PNG", exif=exif), RGB32, LIMIT)
    assert upright[:, :8].mean() < 10 and upright[:, -8:].mean() > 245
    assert rotated[:, :8].mean() > 245 and rotated[:, -8:].mean() < 10


def test_grayscale_model_gets_one_channel() -> None:
    data = encode(solid("RGB", (30, 30), (255, 255, 255)), "PNG")
    out = prepare_image(data, GRAY8, LIMIT)
    assert out.shape == (8, 8, 1) and (out == 255).all()


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000), (33, 31)])
def test_extreme_aspect_ratios_and_tiny_images(size: tuple[int, int]) -> None:
    out = prepare_image(encode(solid("RGB", size, (0, 128, 255)), "PNG"), RGB32, LIMIT)
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), (0, 128, 255), atol=1)


def test_resize_keeps_the_centre_crop() -> None:
    # A wide image: red left third, green middle, blue right third → centre crop is green.
    array = np.zeros((30, 90, 3), dtype=np.uint8)
    array[:, :30, 0] = 255
    array[:, 30:60, 1] = 255
    array[:, 60:, 2] = 255
    out = prepare_image(encode(Image.fromarray(array), "PNG"), RGB32, LIMIT)
    assert out[:, :, 1].mean() > 240 and out[:, :, 0].mean() < 15 and out[:, :, 2].mean() < 15
    assert center_box((90, 30), (32, 32)) == (30.0, 0.0, 60.0, 30.0)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = png_header_claiming(100_000, 100_000)
    with pytest.raises(ImageTooLargeError):
        prepare_image(data, RGB32, LIMIT)
    # Below Pillow's own bomb limit, our configured limit still applies.
    with pytest.raises(ImageTooLargeError, match="limit"):
        prepare_image(encode(solid("RGB", (300, 300), 0), "PNG"), RGB32, 300 * 299)


def test_truncated_and_garbage_inputs_are_undecodable() -> None:
    data = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG"
    )
    with pytest.raises(UndecodableImageError):
        prepare_image(data[: len(data) // 2], RGB32, LIMIT)
    with pytest.raises(UndecodableImageError):
        prepare_image(b"", RGB32, LIMIT)
    with pytest.raises(UndecodableImageError):
        prepare_image(b"hello, this is plain text", RGB32, LIMIT)
    jpeg = encode(solid("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(UndecodableImageError):
        prepare_image(jpeg[:200], RGB32, LIMIT)


def test_known_but_unsupported_formats_are_415_material() -> None:
    tiff = encode(solid("RGB", (8, 8), 0), "TIFF")
    with pytest.raises(UnsupportedImageError, match="TIFF"):
        prepare_image(tiff, RGB32, LIMIT)
    with pytest.raises(UnsupportedImageError, match="SVG"):
        prepare_image(b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', RGB32, LIMIT)
