"""Decode image bytes into an 8-bit RGB array, safely and fast.

Large JPEGs are decoded at reduced scale in the DCT domain (Pillow ``draft``), which costs a third of a
full decode; the model never needs more than a few hundred pixels across the fundus.

The bytes are first sniffed by their magic number (:func:`sniff_format`). That decides two things Pillow
alone cannot: a DICOM file is sent to its own decoder, and a file that starts like a PNG or JPEG but that
Pillow cannot open is damaged (400), not of an unknown kind (415).

A container Pillow does not read has a decoder of its own, in the module of its optional extra
(:mod:`retinagrade.preprocessing.dicom`, the ``[dicom]`` extra). That module registers the decoder here
(:func:`register_decoder`) and decodes its frames with :func:`decode_image`; this module knows only its name
(:data:`DECODER_MODULES`) and imports it when the first such file arrives. Without the extra the file is
refused with a message that says how to enable it.
"""

from __future__ import annotations

import errno
import importlib
import io
import os
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retinagrade.constants import ACCEPTED_FORMAT_NAMES, PILLOW_FORMATS
from retinagrade.errors import (
    CorruptImageError,
    DicomSupportMissingError,
    EmptyImageError,
    FileMissingError,
    FileReadError,
    ImageTooLargeError,
    MultiFrameImageError,
    NotAFileError,
    UnsupportedFormatError,
)

DEFAULT_MAX_PIXELS = 64_000_000
#: Most memory one decode may take (see :func:`decoded_bytes`): a 24-megapixel colour PNG or TIFF fits, a
#: 7999 x 7999 PNG (448 MB decoded from a 186 KB file) does not. JPEGs are decoded at reduced scale and cost
#: far less than their pixel count suggests.
DEFAULT_MAX_DECODED_BYTES = 192 * 1024 * 1024

# Never hand half a picture to the model: a truncated file is an error, not a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Magic numbers of the formats retinagrade reads, by the Pillow name of the format.
_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_DICOM_PREAMBLE: Final[int] = 128
#: Pillow modes of 16-bit or float grayscale, which are stretched to 8 bits rather than clipped.
_WIDE_GRAY_MODES: Final[frozenset[str]] = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
#: Formats whose extra frames are previews of the first (the camera's JPEG with a thumbnail), not other pictures.
_PREVIEW_FRAME_FORMATS: Final[frozenset[str]] = frozenset({"MPO"})
_EMPTY_METADATA: Final[Mapping[str, str]] = MappingProxyType({})


@dataclass(frozen=True)
class DecodedImage:
    """An image as the pipeline sees it.

    Attributes:
        rgb: H x W x 3 uint8 array, EXIF orientation applied.
        original_size: (width, height) of the full-resolution image, EXIF orientation applied, before any
            reduced-scale decoding.
        format: the container format Pillow identified (``JPEG``, ``PNG``...).
        metadata: what the file says about the patient and the eye, keyed by DICOM keyword
            (:data:`~retinagrade.constants.METADATA_KEYS`); empty for camera JPEGs, which carry none. It
            reaches :attr:`GradeResult.metadata <retinagrade.pipeline.GradeResult.metadata>` and is never logged.
    """

    rgb: np.ndarray
    original_size: tuple[int, int]
    format: str
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY_METADATA)

    @property
    def scale(self) -> float:
        """Decoded width divided by stored width (1.0 unless a reduced-scale decode was used)."""
        return float(self.rgb.shape[1]) / max(self.original_size[0], 1)


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    return data[_DICOM_PREAMBLE : _DICOM_PREAMBLE + 4] == b"DICM"


class Decode(Protocol):
    """A container decoder: as :func:`decode_image`, for the files whose format it is registered for."""

    def __call__(self, data: bytes, *, max_pixels: int, min_side: int | None) -> DecodedImage: ...


class DecodedBytes(Protocol):
    """What decoding the file will take at its peak, from its header alone: as :func:`decoded_bytes`."""

    def __call__(self, data: bytes, *, min_side: int | None) -> int: ...


@dataclass(frozen=True)
class ContainerDecoder:
    """The decoder of one container format (:func:`sniff_format`'s name) that Pillow does not read."""

    decode: Decode
    decoded_bytes: DecodedBytes


#: The module that registers the decoder of each such format; imported when the first file of it arrives,
#: because it needs an optional extra (pydicom and its codecs: ``[dicom]``).
DECODER_MODULES: Final[Mapping[str, str]] = MappingProxyType({"DICOM": "retinagrade.preprocessing.dicom"})
_DECODERS: dict[str, ContainerDecoder] = {}


def register_decoder(fmt: str, decode: Decode, decoded_bytes: DecodedBytes) -> None:
    """Make ``decode`` the decoder of format ``fmt`` (called by the decoder's module as it is imported)."""
    _DECODERS[fmt] = ContainerDecoder(decode, decoded_bytes)


def container_decoder(fmt: str | None) -> ContainerDecoder | None:
    """The decoder of a sniffed format that Pillow does not read, its module imported first if need be; None for
    the formats Pillow reads.

    Raises:
        DicomSupportMissingError: the decoder's extra (pydicom) is not installed.
    """
    if fmt is None or fmt not in DECODER_MODULES:
        return None
    try:
        importlib.import_module(DECODER_MODULES[fmt])  # registers the decoder when first imported
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "pydicom":
            raise
        raise DicomSupportMissingError(
            "This is a DICOM file, and this installation cannot read DICOM: install retinagrade[dicom], or "
            "export the photograph from the camera or PACS as JPEG or PNG and send that."
        ) from None
    return _DECODERS[fmt]


def sniff_format(data: bytes) -> str | None:
    """The format the bytes announce by their magic number (Pillow's name, or ``DICOM``); None if unknown."""
    if is_dicom(data):
        return "DICOM"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _open(data: bytes, sniffed: str | None, max_pixels: int) -> Image.Image:
    """Open the container (header only, no pixels yet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if sniffed is not None:
            # It starts like an accepted format, so Pillow refused a damaged header (a PNG chunk with a bad CRC).
            raise CorruptImageError(f"The {sniffed} file is damaged and cannot be read.") from None
        raise UnsupportedFormatError(
            f"The file is not an image in a supported format ({ACCEPTED_FORMAT_NAMES})."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"The image has more than {max_pixels:,} pixels.") from None
    except (OSError, ValueError, SyntaxError):
        raise CorruptImageError("The image file is damaged and cannot be read.") from None


def _check_header(img: Image.Image, max_pixels: int) -> str:
    """Refuse by the header alone what must not be decoded; returns the format."""
    fmt = img.format or ""
    if fmt not in PILLOW_FORMATS:
        raise UnsupportedFormatError(f"Image format {fmt or 'unknown'} is not supported ({ACCEPTED_FORMAT_NAMES}).")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise CorruptImageError("The image has no pixels.")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"The image is {width}x{height} pixels; the limit is {max_pixels:,} pixels.")
    try:
        frames = int(getattr(img, "n_frames", 1))
    except (OSError, ValueError, SyntaxError, EOFError):
        raise CorruptImageError("The image file is damaged and cannot be read.") from None
    if frames > 1 and fmt not in _PREVIEW_FRAME_FORMATS:
        # Grading frame 1 of a multi-page TIFF silently could grade the wrong eye or the wrong visit.
        raise MultiFrameImageError(
            f"The {fmt} file holds {frames} pages; send each photograph as its own single-page image."
        )
    return fmt


def draft_for(img: Image.Image, min_side: int | None) -> None:
    """Ask a JPEG to decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps its shorter side >= ``min_side``."""
    if min_side is None or img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L", "YCbCr", "CMYK"):
        return
    width, height = img.size
    factor = max(1, min(width, height) // max(min_side, 1))
    if factor >= 2:
        img.draft(img.mode, (max(1, width // factor), max(1, height // factor)))


def _pixels(img: Image.Image) -> tuple[Image.Image, bool]:
    """Decode the pixels and apply the EXIF orientation; also says whether width and height swapped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img.load()
        stored = img.size
        oriented: Image.Image = ImageOps.exif_transpose(img) or img
    return oriented, oriented.size != stored


def _to_rgb(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 from any mode: wide grayscale stretched, transparency on black."""
    mode = img.mode
    if mode in _WIDE_GRAY_MODES:
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
        DicomSupportMissingError: a DICOM file, and the ``[dicom]`` extra is not installed; the DICOM
            decoder raises its own errors (:func:`retinagrade.preprocessing.dicom.decode_dicom`).
        UnsupportedFormatError: not an image, or a format retinagrade does not accept.
        MultiFrameImageError: a file of several pictures (multi-page TIFF, animated PNG or WebP).
        ImageTooLargeError: more pixels than ``max_pixels``.
        CorruptImageError: the file is truncated or damaged.
    """
    if not data:
        raise EmptyImageError("The file is empty.")
    sniffed = sniff_format(data)
    container = container_decoder(sniffed)
    if container is not None:
        return container.decode(data, max_pixels=max_pixels, min_side=min_side)
    img = _open(data, sniffed, max_pixels)
    fmt = _check_header(img, max_pixels)
    width, height = img.size
    try:
        draft_for(img, min_side)
        oriented, swapped = _pixels(img)
        rgb = _to_rgb(oriented)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"The image has more than {max_pixels:,} pixels.") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise CorruptImageError("The image file is truncated or damaged and cannot be decoded.") from None
    except MemoryError:
        raise ImageTooLargeError("The image is too large to decode.") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise CorruptImageError("The image has no usable pixels.")
    # Rotated by its EXIF orientation: report the size in the frame of ``rgb``, or ``scale`` is wrong.
    size = (height, width) if swapped else (width, height)
    return DecodedImage(rgb=rgb, original_size=size, format=fmt)


def _pixel_bytes(mode: str) -> int:
    """Bytes one pixel of ``mode`` takes while it is decoded, before the RGB array.

    Pillow's buffer (multi-band images are stored 4 bytes a pixel) plus, for 16- and 32-bit greyscale, the two
    float32 working copies :func:`_to_rgb` makes to stretch it to 8 bits.
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
    so its cost follows its pixel count, whatever its file size. A DICOM file is costed from its own header
    (:func:`retinagrade.preprocessing.dicom.decoded_bytes_dicom`). Returns 0 when the header cannot be read:
    :func:`decode_image` then refuses the file with the right error.
    """
    try:
        container = container_decoder(sniff_format(data))
    except (DicomSupportMissingError, ImportError):
        return 0  # no DICOM support: decode_image refuses the file, saying how to enable it
    if container is not None:
        return container.decoded_bytes(data, min_side=min_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            draft_for(img, min_side)
            width, height = img.size
            return width * height * (_pixel_bytes(img.mode) + 3)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError):
        return 0  # an unreadable header: decode_image refuses the file with the right error


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a regular file, refusing without blocking anything that is not one.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO never
    blocks the reader (opening a FIFO for reading waits for a writer) and a file swapped for a FIFO between
    a check and the open cannot either.

    Raises:
        FileMissingError: no such file, or a symbolic link whose target is gone.
        NotAFileError: a directory, FIFO, socket or device.
        FileReadError: any other reason the file cannot be read (permissions, a symbolic-link loop, I/O).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileMissingError("The file does not exist (or is a link to a file that does not).") from None
    except IsADirectoryError:
        raise NotAFileError("This is a folder, not an image file.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileReadError("The file is a symbolic link that points to itself (a loop).") from None
        raise FileReadError(f"The file cannot be read ({os.strerror(exc.errno or 0)}).") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFileError("This is not a regular file (a folder, pipe, socket or device), so it is not read.")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            return fh.read()
    except OSError as exc:
        raise FileReadError(f"The file cannot be read ({os.strerror(exc.errno or 0)}).") from None
    finally:
        if fd >= 0:
            os.close(fd)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> DecodedImage:
    """Read and decode an image file; see :func:`decode_image` for the keyword arguments."""
    return decode_image(read_image_file(path), max_pixels=max_pixels, min_side=min_side)
