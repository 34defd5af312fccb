"""Decode image bytes into an 8-bit RGB array, safely and fast.

Large JPEGs are decoded at reduced scale in the DCT domain (Pillow ``draft``), which costs a third of a
full decode; the model never needs more than a few hundred pixels across the fundus.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retinagrade.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    MultiFrameImageError,
    UnsupportedFormatError,
)

#: Formats accepted from clients. MPO is what many cameras write for JPEGs with a preview frame.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP"})
DEFAULT_MAX_PIXELS = 64_000_000
#: Most memory one decode may take (see :func:`decoded_bytes`): a 24-megapixel colour PNG or TIFF fits, a
#: 7999 x 7999 PNG (448 MB decoded from a 186 KB file) does not. JPEGs are decoded at reduced scale and cost
#: far less than their pixel count suggests.
DEFAULT_MAX_DECODED_BYTES = 192 * 1024 * 1024

#: File signatures of the accepted formats: a file that starts like one but does not open is damaged (400),
#: not of an unsupported type (415).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

# Never hand half a picture to the model: a truncated file is an error, not a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodedImage:
    """An image as the pipeline sees it.

    Attributes:
        rgb: H x W x 3 uint8 array, EXIF orientation applied.
        original_size: (width, height) of the full-resolution image, EXIF orientation applied, before any
            reduced-scale decoding.
        format: the container format Pillow identified (``JPEG``, ``PNG``...).
    """

    rgb: np.ndarray
    original_size: tuple[int, int]
    format: str

    @property
    def scale(self) -> float:
        """Decoded width divided by stored width (1.0 unless a reduced-scale decode was used)."""
        return self.rgb.shape[1] / max(self.original_size[0], 1)


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / float grayscale: stretch the used range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        gray = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the colour of a fundus camera's background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> DecodedImage:
    """Decode image bytes.

    Args:
        data: the encoded file.
        max_pixels: refuse images whose header claims more pixels (decompression-bomb guard);
            checked before any pixel is decoded.
        min_side: if given, a JPEG may be decoded at a reduced scale (1/2, 1/4, 1/8) as long as its
            shorter side stays at least this long.

    Raises:
        EmptyImageError: no bytes.
        UnsupportedFormatError: not an image, or a format retinagrade does not accept.
        ImageTooLargeError: more pixels than ``max_pixels``.
        CorruptImageError: the file is truncated or damaged.
    """
    if not data:
        raise EmptyImageError("The file is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        claimed = claimed_format(data)
        if claimed is not None:
            raise CorruptImageError(
                f"The file starts like a {claimed} image but is damaged and cannot be read."
            ) from None
        raise UnsupportedFormatError(
            "The file is not an image in a supported format (JPEG, PNG, TIFF, BMP, WebP)."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"The image has more than {max_pixels:,} pixels.") from None
    except (OSError, ValueError, SyntaxError):
        raise CorruptImageError("The image file is damaged and cannot be read.") from None

    fmt = img.format or ""
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedFormatError(f"Image format {fmt or 'unknown'} is not supported (JPEG, PNG, TIFF, BMP, WebP).")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise CorruptImageError("The image has no pixels.")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"The image is {width}x{height} pixels; the limit is {max_pixels:,} pixels.")
    refuse_multi_frame(img)

    try:
        draft_for(img, min_side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            stored = img.size
            oriented: Image.Image = ImageOps.exif_transpose(img) or img
        if oriented.size != stored:
            # Rotated by its EXIF orientation: report the size in the frame of ``rgb``, or ``scale`` is wrong.
            width, height = height, width
        rgb = _to_rgb_uint8(oriented)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"The image has more than {max_pixels:,} pixels.") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise CorruptImageError("The image file is truncated or damaged and cannot be decoded.") from None
    except MemoryError:
        raise ImageTooLargeError("The image is too large to decode.") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise CorruptImageError("The image has no usable pixels.")
    return DecodedImage(rgb=rgb, original_size=(width, height), format=fmt)


def draft_for(img: Image.Image, min_side: int | None) -> None:
    """Ask a JPEG to decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps its shorter side >= ``min_side``."""
    if min_side is not None and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "YCbCr", "CMYK"):
        width, height = img.size
        factor = max(1, min(width, height) // max(min_side, 1))
        if factor >= 2:
            # draft() picks the smallest DCT scale whose size is still >= the requested size.
            img.draft(img.mode, (max(1, width // factor), max(1, height // factor)))


def claimed_format(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def refuse_multi_frame(img: Image.Image) -> None:
    """Refuse a multi-page TIFF: grading page 1 silently could grade the wrong photograph.

    MPO (a JPEG with a camera preview frame) is not refused: its first frame is the photograph by definition.

    Raises:
        MultiFrameImageError: the TIFF holds more than one page.
    """
    frames = int(getattr(img, "n_frames", 1))
    if img.format == "TIFF" and frames > 1:
        raise MultiFrameImageError(f"The TIFF holds {frames} pages; send each photograph as its own single-page image.")


def _pixel_bytes(mode: str) -> int:
    """Bytes one pixel of ``mode`` takes while it is decoded, before the RGB array.

    Pillow's buffer (multi-band images are stored 4 bytes a pixel) plus, for 16- and 32-bit greyscale, the two
    float32 working copies :func:`_to_rgb_uint8` makes to stretch it to 8 bits.
    """
    if mode.startswith("I;16"):
        return 2 + 8
    if mode in ("I", "F"):
        return 4 + 8
    if mode in ("1", "L", "P"):
        return 1
    return 4


def decoded_bytes(data: bytes, *, min_side: int | None = None) -> int:
    """The memory decoding ``data`` takes at its peak, from the header alone (no pixel is decoded).

    Pillow's pixel buffer at the size the decode will use (JPEGs at the reduced scale ``min_side`` allows,
    as :func:`decode_image` does) plus the RGB array made from it. A PNG cannot be decoded at reduced scale,
    so its cost follows its pixel count, whatever its file size. Returns 0 when the header cannot be read:
    :func:`decode_image` then refuses the file with the right error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            draft_for(img, min_side)
            width, height = img.size
            return width * height * (_pixel_bytes(img.mode) + 3)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError):
        return 0  # an unreadable header: decode_image refuses the file with the right error


def load_image(path: str | Path, **kwargs: int | None) -> DecodedImage:
    """Read and decode an image file; see :func:`decode_image` for the keyword arguments."""
    return decode_image(Path(path).read_bytes(), **kwargs)  # type: ignore[arg-type]
