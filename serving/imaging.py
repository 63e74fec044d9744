"""Image bytes → the uint8 H×W×C array a bundle's segment 1 expects (before normalisation).

Decoding is defensive: the pixel count is checked from the header before any pixel data is
decoded, and so is the memory decoding will take (`plan_decode`); PNG chunk and JPEG scan
counts are bounded; truncated files are refused rather than padded; a large image is shrunk by
an integer factor right after decoding (JPEG: already while decoding) so every later step works
on a small one; and every Pillow mode is mapped to RGB (or L) explicitly so 16-bit, float,
palette, alpha and CMYK images all mean what they show. Normalisation (mean/std on the 0..1
scale) is the runtime's `preprocess`, shared with benchmarks.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from core.bundle import InputSpec
from serving import image_structure

logger = logging.getLogger(__name__)

# Far above what real files have (libpng writes 8 KiB data chunks: ~1 300 in 10 MB; progressive
# JPEG scripts use about 10 scans), far below what makes decoding slow. Counting 4 096 chunk
# headers takes about 2 ms of Python, on the event loop while a raw body streams in.
MAX_PNG_CHUNKS = 4096
MAX_JPEG_SCANS = 100
# PNG text chunks are metadata the classifier never reads; Pillow would inflate up to 64 MiB of
# them while opening a file, outside any budget. 8 MiB still takes any real XMP or comment.
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 8 * 1024 * 1024)
# A large image is shrunk by an integer factor until it is at most this many times the model's
# input side, then resized exactly (the same gap Pillow's `reducing_gap` uses below).
REDUCING_GAP = 3
# Bytes per pixel that decoding an image of each mode may hold at its peak, measured on 4096²
# and 1300² images with margin (tests/test_serving_decode_memory.py checks them against the
# process's peak memory). Pillow stores every multi-band mode in 4 bytes a pixel. An image
# `_shrink` reduces pays for the conversion before reducing (palette → RGBA → premultiplied,
# 16-bit → 32-bit); one that stays full size pays for the colour conversion, the EXIF rotation
# copy and compositing on white instead. libwebp decodes through buffers of its own.
_SHRUNK_PEAK = {
    "1": 2, "L": 2, "P": 11, "PA": 11, "LA": 10, "La": 10, "RGB": 6, "RGBX": 6, "RGBA": 10,
    "RGBa": 10, "CMYK": 6, "YCbCr": 6, "LAB": 6, "HSV": 6, "I": 10, "F": 10, "I;16": 8,
}  # fmt: skip
_FULL_PEAK = {
    "1": 8, "L": 8, "P": 18, "PA": 18, "LA": 16, "La": 16, "RGB": 12, "RGBX": 12, "RGBA": 16,
    "RGBa": 16, "CMYK": 12, "YCbCr": 12, "LAB": 12, "HSV": 12, "I": 20, "F": 20, "I;16": 14,
}  # fmt: skip
_OTHER_MODE_PEAK = 24
_WEBP_DECODER_PEAK = 16
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

# Formats the server decodes; Pillow is told to try only these parsers.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# Well-known image containers we recognise but do not decode: these get 415, not 400.
_OTHER_SIGNATURES = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"qoif", "QOI"),
)
_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An upload that cannot be classified; subclasses say which HTTP status fits."""


class UndecodableImageError(ImageError):
    """Not an image, a corrupt one, or a truncated one (400)."""


class UnsupportedImageError(ImageError):
    """A real image in a format or mode the server does not decode (415)."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed, or a decompression bomb (413)."""


def sniff_unsupported_format(data: bytes) -> str | None:
    """Name of a recognised but unsupported image format, else None."""
    head = data[:32]
    for signature, name in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis"):
        return "HEIF/AVIF"
    stripped = head.lstrip()
    if stripped.startswith((b"<svg", b"<?xml")):
        return "SVG"
    return None


def structure_check() -> image_structure.StructureCheck:
    """A streaming check of the PNG chunk and JPEG scan limits, for a body still arriving."""
    return image_structure.StructureCheck(MAX_PNG_CHUNKS, MAX_JPEG_SCANS)


def check_structure(data: bytes) -> None:
    """Refuse a PNG with more than MAX_PNG_CHUNKS chunks or a JPEG with more than
    MAX_JPEG_SCANS scans before Pillow spends time on them (UndecodableImageError)."""
    problem = structure_check().feed(data)
    if problem is not None:
        raise UndecodableImageError(problem)


def _too_large(exc: Exception, max_pixels: int) -> ImageTooLargeError:
    """Pillow's bomb error quotes Pillow's limit; the client needs the server's."""
    found = _BOMB_PIXELS.search(str(exc))
    pixels = f"{found.group(1)} pixels" if found else "too many pixels"
    return ImageTooLargeError(f"image has {pixels}; the limit is {max_pixels}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; raise before any pixel data is decoded if it is too big, and
    refuse files whose structure would make decoding slow or which are visibly truncated."""
    if not data:
        raise UndecodableImageError("empty image body")
    check_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception only under `-W error`; either way: too big.
        raise _too_large(exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        other = sniff_unsupported_format(data)
        if other is not None:
            raise UnsupportedImageError(
                f"unsupported image format {other} (supported: {', '.join(SUPPORTED_FORMATS)})"
            ) from exc
        raise UndecodableImageError(
            f"could not decode image (supported: {', '.join(SUPPORTED_FORMATS)})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise UndecodableImageError(f"could not decode image: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise UndecodableImageError(f"image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if image.format == "JPEG":
        sampling = [(h, v) for _, h, v, _ in getattr(image, "layer", ())]
        if image_structure.jpeg_too_short(data, image.size, sampling):
            raise UndecodableImageError(
                f"truncated JPEG: {len(data)} bytes cannot hold the {width}×{height} "
                "pixels its header declares"
            )
    return image


def _draft(image: Image.Image, target: tuple[int, int]) -> None:
    """JPEG only: decode at a DCT scale ≥ the target (1/2, 1/4 or 1/8), much faster and
    smaller. Square request: an EXIF rotation may still swap width and height afterwards."""
    if image.format == "JPEG":
        side = max(target)
        image.draft(image.mode, (side, side))  # a second call is a no-op


def plan_decode(image: Image.Image, spec: InputSpec) -> int:
    """Set up downscaled decoding where the format allows it (JPEG) and return the most memory,
    in bytes, that `decode_image` will hold for this image: the budget to reserve before it."""
    target = (spec.shape[2], spec.shape[1])
    _draft(image, target)
    width, height = image.size
    table = _SHRUNK_PEAK if _shrink_factor(image.size, target) >= 2 else _FULL_PEAK
    mode = "I;16" if image.mode.startswith("I;16") else image.mode
    per_pixel = table.get(mode, _OTHER_MODE_PEAK)
    if image.format == "WEBP":
        per_pixel += _WEBP_DECODER_PEAK
    return width * height * per_pixel


def _load(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Decode pixel data (first frame of animations); corrupt or truncated data → 400."""
    try:
        _draft(image, target)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise UndecodableImageError(f"could not decode image: {exc}") from exc
    return image


# Modes Image.reduce cannot average, and the mode each is averaged in instead. Alpha is
# premultiplied first, so transparent pixels do not bleed their colour into visible ones.
_REDUCE_AS = {"1": "L", "P": "RGBA", "PA": "RGBA", "RGBA": "RGBa", "LA": "La"}


def _shrink_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    return min(size) // (max(target) * REDUCING_GAP)


def _shrink(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Box-average by the largest integer factor that keeps the short side ≥ REDUCING_GAP × the
    target's long side (no-op for images already that small)."""
    factor = _shrink_factor(image.size, target)
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    for _ in range(2):  # P → RGBA → RGBa
        wanted = _REDUCE_AS.get(image.mode)
        if wanted is None:
            break
        image = image.convert(wanted)
    return image.reduce(factor)


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag so the network sees what a photo viewer shows."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
            return image  # upright already: skip exif_transpose's full copy
        return ImageOps.exif_transpose(image) or image
    except Exception as exc:  # noqa: BLE001 - a malformed EXIF block must not lose the image
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return image


def _integer_to_l(image: Image.Image, sixteen_bit: bool) -> Image.Image:
    """16/32-bit integer or float greyscale → 8-bit L, scaling the value range, not clipping.
    float32 and in place: exact for 16-bit values, and a third of float64's memory."""
    values = np.asarray(image).astype(np.float32)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        peak = float(finite.max()) if finite.size else 0.0
        if peak <= 1.0:
            values *= 255.0
        np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    elif sixteen_bit or float(values.max(initial=0)) > 255.0:
        # 16-bit data (I;16*, or I holding a 16-bit PNG) spans 0..65535; 8-bit data stays.
        values /= 257.0
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def to_color_mode(image: Image.Image, color_mode: str, sixteen_bit: bool = False) -> Image.Image:
    """Any Pillow mode → "RGB" or "L"; transparency is composited on white. `sixteen_bit`: the
    image's integer values came from a 16-bit file (scaled by 1/257 whatever their range)."""
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
    elif mode in ("RGBa", "La"):
        image = image.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode.startswith("I") or mode == "F":
        image = _integer_to_l(image, sixteen_bit or mode.startswith("I;16"))
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("RGB", "RGBA", "L", "LA"):
        try:
            image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
        except (ValueError, OSError) as exc:
            raise UnsupportedImageError(f"unsupported image mode {mode}") from exc
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(image.convert("RGBA"), mask=image.getchannel("A"))
        image = background
    return image.convert(color_mode) if image.mode != color_mode else image


def center_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The largest centred box of the target's aspect ratio inside an image of `size`."""
    width, height = size
    target_w, target_h = target
    if width * target_h > height * target_w:  # too wide: trim left and right
        box_w = height * target_w / target_h
        left = (width - box_w) / 2
        return (left, 0.0, left + box_w, float(height))
    box_h = width * target_h / target_w
    top = (height - box_h) / 2
    return (0.0, top, float(width), top + box_h)


def prepare_image(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Encoded image → uint8 H×W×C at the manifest's input size and colour mode.

    Resizing keeps the aspect ratio: the centred crop of the target's aspect ratio is resized
    (bilinear, antialiased) to H×W, the usual evaluation transform. Raises ImageTooLargeError,
    UndecodableImageError or UnsupportedImageError.
    """
    return decode_image(open_image(data, max_pixels), spec)


def decode_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """The pixel half of `prepare_image`, for an image `open_image` has already checked."""
    channels, height, width = spec.shape
    image = _load(image, (width, height))
    sixteen_bit = image.mode.startswith("I;16")
    image = _shrink(image, (width, height))
    image = _orient(image)
    image = to_color_mode(image, spec.color_mode, sixteen_bit)
    if image.size != (width, height):
        image = image.resize(
            (width, height),
            Image.Resampling.BILINEAR,
            box=center_box(image.size, (width, height)),
            reducing_gap=3.0,
        )
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape != (height, width, channels):
        raise UnsupportedImageError(
            f"decoded image has shape {array.shape}, model expects {(height, width, channels)}"
        )
    return np.ascontiguousarray(array)
