"""Image bytes → the uint8 H×W×C array a bundle's segment 1 expects (before normalisation).

Decoding is defensive: the pixel count is checked from the header before any pixel data is
decoded, truncated files are refused rather than padded, and every Pillow mode is mapped to
RGB (or L) explicitly so 16-bit, float, palette, alpha and CMYK images all mean what they show.
Normalisation (mean/std on the 0..1 scale) is the runtime's `preprocess`, shared with benchmarks.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.bundle import InputSpec

logger = logging.getLogger(__name__)

# Formats the server decodes; Pillow is told to try only these parsers.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
SUPPORTED_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif")
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


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; raise before any pixel data is decoded if it is too big."""
    if not data:
        raise UndecodableImageError("empty image body")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception only under `-W error`; either way: too big.
        raise ImageTooLargeError(f"image too large: {exc}") from exc
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
    return image


def _load(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Decode pixel data (first frame of animations); corrupt or truncated data → 400."""
    try:
        if image.format == "JPEG":
            # DCT-domain downscaling: decode a big photo at ≥ the target size, much faster.
            # Square request: an EXIF rotation may still swap width and height afterwards.
            side = max(target)
            image.draft(image.mode, (side, side))
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise UndecodableImageError(f"could not decode image: {exc}") from exc
    return image


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag so the network sees what a photo viewer shows."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
            return image  # upright already: skip exif_transpose's full copy
        return ImageOps.exif_transpose(image) or image
    except Exception as exc:  # noqa: BLE001 - a malformed EXIF block must not lose the image
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return image


def _integer_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale → 8-bit L, scaling the value range, not clipping."""
    array = np.asarray(image)
    if image.mode == "F":
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        peak = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0
        values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        values = array.astype(np.float64)
        # 16-bit data (I;16*, or I holding a 16-bit PNG) spans 0..65535; 8-bit data stays.
        if image.mode.startswith("I;16") or float(values.max(initial=0)) > 255.0:
            values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_color_mode(image: Image.Image, color_mode: str) -> Image.Image:
    """Any Pillow mode → "RGB" or "L"; transparency is composited on white."""
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
    elif mode in ("RGBa", "La"):
        image = image.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode.startswith("I") or mode == "F":
        image = _integer_to_l(image)
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
    image = _orient(image)
    image = to_color_mode(image, spec.color_mode)
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
