"""Decode a DICOM photograph into the :class:`~retinagrade.preprocessing.decode.DecodedImage` the pipeline grades.

Fundus cameras store their photos as Ophthalmic Photography (OP) instances, mostly with the camera's own JPEG
as the pixel data (encapsulated JPEG baseline). Such a frame is handed, byte for byte, to the same JPEG decoder
that reads ``.jpeg`` files, with the same reduced-scale DCT decode, so a photo gets exactly the grade its JPEG
gets. Every other encoding (JPEG lossless, JPEG-LS, JPEG 2000, RLE, native little endian) is decoded by pydicom
and its pylibjpeg / openjpeg / CharLS plugins (the ``[dicom]`` extra) and brought to 8-bit RGB here: YBR is
converted to RGB, planar configuration is undone by pydicom, and 12- or 16-bit samples are scaled from their
stored bit depth (``BitsStored``) to 8 bits, so a dark photo stays dark for the quality gate.

Multi-frame instances are refused (:class:`~retinagrade.errors.DicomMultiFrameError`): a multi-frame OP is a
stereo pair or a sequence, every front door answers one result per input, and guessing which frame a result
belongs to would put a grade on the wrong picture. Split such an instance into single-frame instances.

Only photographs are accepted (OP 8/16-bit, VL Photographic, Secondary Capture); a CT or MR slice is refused
before its pixels are decoded rather than graded as if it were a fundus.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, convert_color_space

from retinagrade.constants import METADATA_KEYS
from retinagrade.errors import (
    CorruptImageError,
    DicomMultiFrameError,
    DicomNoPixelDataError,
    DicomNotPhotographError,
    DicomSupportMissingError,
    DicomUnsupportedTransferSyntaxError,
    EmptyImageError,
    ImageTooLargeError,
    InputError,
)
from retinagrade.preprocessing.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, register_decoder

UNDEFINED_LENGTH: Final = 0xFFFFFFFF
#: Deepest nesting of sequences a header may have. A photograph's header nests 2 or 3 deep (a code inside a
#: sequence item inside a sequence); pydicom reads nesting by recursion, and a few hundred levels exhaust
#: Python's stack (a RecursionError, which was a 500).
MAX_SEQUENCE_DEPTH: Final = 16

OPHTHALMIC_PHOTOGRAPHY_8BIT: Final = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPHTHALMIC_PHOTOGRAPHY_16BIT: Final = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
VL_PHOTOGRAPHIC: Final = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE: Final = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SECONDARY_CAPTURE: Final = "1.2.840.10008.5.1.4.1.1.7.4"

#: SOP classes whose images are photographs retinagrade may grade.
PHOTOGRAPH_SOP_CLASSES: Final[Mapping[str, str]] = {
    OPHTHALMIC_PHOTOGRAPHY_8BIT: "Ophthalmic Photography 8 Bit Image",
    OPHTHALMIC_PHOTOGRAPHY_16BIT: "Ophthalmic Photography 16 Bit Image",
    VL_PHOTOGRAPHIC: "VL Photographic Image",
    SECONDARY_CAPTURE: "Secondary Capture Image",
    MULTIFRAME_TRUE_COLOR_SECONDARY_CAPTURE: "Multi-frame True Color Secondary Capture Image",
}

#: Transfer syntaxes whose pixel data retinagrade decodes.
SUPPORTED_TRANSFER_SYNTAXES: Final[frozenset[str]] = frozenset(
    {
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.RLELossless,
    }
)

#: Transfer syntaxes whose frames are JPEG (ISO 10918) or JPEG-LS (ISO 14495) codestreams, and those whose frames
#: are JPEG 2000: the frame's own header (SOF / SIZ) says its size, checked against Rows and Columns.
_JPEG_SYNTAXES: Final = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1})
_JPEG_LS_SYNTAXES: Final = frozenset({uid.JPEGLSLossless, uid.JPEGLSNearLossless})
_JPEG_2000_SYNTAXES: Final = frozenset({uid.JPEG2000Lossless, uid.JPEG2000})
#: Start-of-frame markers of ISO 10918 (all processes) and of JPEG-LS (SOF55).
_JPEG_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_LS_SOF: Final = frozenset({0xF7})
_JP2_SIGNATURE: Final = b"\x00\x00\x00\x0cjP  \r\n\x87\n"

_ENCAPSULATED_SYNTAXES: Final = _JPEG_SYNTAXES | _JPEG_LS_SYNTAXES | _JPEG_2000_SYNTAXES | {uid.RLELossless}

#: Encapsulated JPEG whose frame the ordinary JPEG decoder reads (8-bit DCT, what cameras write).
_PILLOW_JPEG: Final = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit})
_PILLOW_PHOTOMETRIC: Final = frozenset({"YBR_FULL_422", "YBR_FULL", "MONOCHROME2"})


def read_dataset(data: bytes, *, stop_before_pixels: bool = False) -> Dataset:
    """Parse a DICOM Part 10 file, reading every element (nested ones too) so a damaged one fails here.

    Raises:
        EmptyImageError: no bytes.
        CorruptImageError: not parseable as DICOM (truncated, damaged, no file meta, sequences nested deeper
            than :data:`MAX_SEQUENCE_DEPTH`).
    """
    if not data:
        raise EmptyImageError("The file is empty.")
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _refuse_deflated(data)
            ds = pydicom.dcmread(stream, stop_before_pixels=stop_before_pixels)
            if _has_short_element(ds):
                raise CorruptImageError("The DICOM file is truncated and cannot be read.")
            _read_every_value(ds)
    except InputError:
        raise
    except InvalidDicomError:
        raise CorruptImageError("The file is not a readable DICOM file.") from None
    except Exception:
        # pydicom parses hostile bytes with recursion (RecursionError for sequences nested hundreds deep),
        # struct unpacking (struct.error) and a converter per VR (BytesLengthException, ValueError...): whatever
        # it raises while reading, the file is damaged. Nothing of the file is echoed (it may name the patient).
        raise CorruptImageError("The DICOM file is truncated or damaged and cannot be read.") from None
    # pydicom reads a truncated file without raising: it drops an encapsulated element cut short (and stops
    # there) or warns that the end came before a delimiter. Either way half a picture must not be graded.
    cut_short = not stop_before_pixels and stream.tell() < len(data)
    if cut_short or any("End of file" in str(w.message) for w in caught):
        raise CorruptImageError("The DICOM file is truncated and cannot be read.")
    return ds


def _refuse_deflated(data: bytes) -> None:
    """Refuse a deflated dataset from its file meta alone, before pydicom inflates it.

    pydicom inflates a Deflated Explicit VR Little Endian dataset whole and unbounded: 522 KB became 1 GB of
    memory, outside every decode budget. Deflate is for non-image objects (PS3.5 A.5); no camera stores a
    photograph that way, so it is refused (415) rather than inflated under a bound.

    Raises:
        DicomUnsupportedTransferSyntaxError: the dataset is deflated.
    """
    stream = io.BytesIO(data)
    read_preamble(stream, False)
    # The same reader dcmread uses (with its implicit-VR fallback), so both see the same transfer syntax.
    syntax = _read_file_meta_info(stream).get("TransferSyntaxUID")
    if syntax == uid.DeflatedExplicitVRLittleEndian:
        raise DicomUnsupportedTransferSyntaxError(
            "Deflated DICOM (Deflated Explicit VR Little Endian) is not accepted; send the photograph uncompressed "
            "or with JPEG, JPEG-LS, JPEG 2000 or RLE pixel data."
        )


def _read_every_value(ds: Dataset) -> None:
    """Parse every element's value, the file meta's and in sequence items too, refusing nesting deeper than a
    photograph has.

    Values are parsed lazily: parsing them all here turns a damaged file into one error now, instead of a crash
    in whichever reader (the decoder, the SR writer) touches the bad value first, and pydicom's warnings about
    them (which quote the value) are caught here rather than printed later. The walk is iterative, so no depth
    of nesting can exhaust the stack here.
    """
    pending: list[tuple[Dataset, int]] = [(ds, 0)]
    if getattr(ds, "file_meta", None) is not None:
        pending.append((ds.file_meta, 0))
    while pending:
        dataset, depth = pending.pop()
        for element in dataset:
            value = element.value
            if element.VR == "SQ" and value:
                if depth >= MAX_SEQUENCE_DEPTH:
                    raise CorruptImageError(
                        f"The DICOM header nests sequences more than {MAX_SEQUENCE_DEPTH} deep; it is damaged."
                    )
                pending.extend((item, depth + 1) for item in value)


def _has_short_element(ds: Dataset) -> bool:
    """Whether an element holds fewer bytes than its header declares (pydicom keeps a value cut by EOF)."""
    for dataset in (ds.file_meta, ds):
        for tag in list(dataset.keys()):
            raw = dataset.get_item(tag)
            if (
                isinstance(raw, RawDataElement)
                and raw.length != UNDEFINED_LENGTH
                and raw.value is not None
                and len(raw.value) < raw.length
            ):
                return True
    return False


def laterality(ds: Dataset) -> str | None:
    """``"R"`` or ``"L"`` from Image Laterality, else the series' Laterality; ``None`` when neither says."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def dicom_metadata(ds: Dataset) -> dict[str, str]:
    """The identifiers of the instance, keyed by DICOM keyword; absent or empty ones are left out."""
    # constants.METADATA_KEYS is the one list; laterality is read from either of its two attributes below.
    meta = {key: str(ds.get(key, "") or "").strip() for key in METADATA_KEYS if key != "ImageLaterality"}
    side = laterality(ds)
    if side is not None:
        meta["ImageLaterality"] = side
    return {key: value for key, value in meta.items() if value}


def _number(ds: Dataset, keyword: str, default: int) -> int:
    """An integer attribute (US, IS), ``default`` when absent or empty.

    Raises:
        CorruptImageError: the value is not one integer (text, several values).
    """
    value = ds.get(keyword, default)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError, OverflowError):
        raise CorruptImageError(f"The DICOM header's {keyword} is not a number; the file is damaged.") from None


def is_valid_uid(value: str) -> bool:
    """A DICOM UID (PS3.5 9.1), checked without building pydicom's ``UID``, which warns quoting the value."""
    return 0 < len(value) <= 64 and uid.RE_VALID_UID.match(value) is not None


def _uid_name(value: str) -> str:
    """A UID's registered name for a message; a value that is no UID is not echoed."""
    return uid.UID(value).name if is_valid_uid(value) else "not a valid UID"


def _check_photograph(ds: Dataset) -> str:
    """The transfer syntax UID, after refusing what is not a gradable single-frame photograph."""
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if not sop_class:
        raise CorruptImageError("The DICOM file names no SOP class: it is damaged or not a DICOM object.")
    if sop_class not in PHOTOGRAPH_SOP_CLASSES:
        modality = str(ds.get("Modality", "") or "")
        modality = modality if modality.isascii() and modality.replace("_", "").isalnum() else "unknown"
        raise DicomNotPhotographError(
            f"The DICOM object's SOP class is {_uid_name(sop_class)} (modality {modality[:16]}), not a photograph; "
            "retinagrade grades Ophthalmic Photography, VL Photographic and Secondary Capture images."
        )
    if "PixelData" not in ds:
        raise DicomNoPixelDataError("The DICOM object has no pixel data (no image to grade).")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        name = _uid_name(syntax) if syntax else "none given"
        raise DicomUnsupportedTransferSyntaxError(
            f"The pixel data's transfer syntax ({name}) is not supported; send JPEG, JPEG-LS, JPEG 2000, RLE "
            "or uncompressed little-endian pixel data."
        )
    frames = _number(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise DicomMultiFrameError(
            f"The instance holds {frames} frames; send each photograph as its own single-frame instance."
        )
    return syntax


def _to_uint8(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    if arr.dtype == np.uint8 and bits_stored == 8:
        return arr
    values = arr.astype(np.float32)
    if signed:
        values += float(2 ** (bits_stored - 1))
    top = float(2**bits_stored - 1)
    scaled: np.ndarray = np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    return scaled


def _decode_with_pydicom(ds: Dataset, syntax: str) -> np.ndarray:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomUnsupportedTransferSyntaxError(
            f"The pixel data's transfer syntax ({uid.UID(syntax).name}) is not supported."
        ) from None
    if not decoder.is_available:
        raise DicomSupportMissingError(
            f"Decoding {uid.UID(syntax).name} needs a codec plugin that is not installed: install retinagrade[dicom]."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options: dict[str, Any] = {"as_rgb": True}  # YBR -> RGB inside the decoder
            arr, info = decoder.as_array(ds, index=0, **options)
            return _as_rgb8(ds, arr, info)
    except InputError:
        raise
    except MemoryError:
        raise ImageTooLargeError("The DICOM image is too large to decode.") from None
    except Exception:
        # The codecs (libjpeg, OpenJPEG, CharLS, RLE) and the colour lookups meet whatever the pixel data and
        # the header's pixel attributes hold; any failure there is damaged input, never a server error.
        raise CorruptImageError("The DICOM pixel data is truncated or damaged and cannot be decoded.") from None


def _as_rgb8(ds: Dataset, arr: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
    """The decoder's samples as H x W x 3 uint8 RGB."""
    photometric = str(info.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    bits_stored = int(info.get("bits_stored", ds.get("BitsStored", 8)) or 8)
    signed = int(info.get("pixel_representation", 0) or 0) == 1
    if photometric == "PALETTE COLOR":
        # The lookup table maps each stored value to 8- or 16-bit RGB.
        rgb = apply_color_lut(arr, ds)
        bits = 16 if rgb.dtype != np.uint8 else 8
        return _to_uint8(rgb, bits, signed=False)
    if photometric.startswith("YBR") and arr.ndim == 3:
        arr = convert_color_space(arr, photometric, "RGB")
    arr = _to_uint8(arr, bits_stored, signed)
    if arr.ndim == 2:
        if photometric == "MONOCHROME1":
            arr = 255 - arr
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImageError("The DICOM image does not have 1 or 3 samples per pixel.")
    return np.ascontiguousarray(arr)


def _jpeg_frame_size(frame: bytes, sof_markers: frozenset[int]) -> tuple[int, int] | None:
    """(width, height) from a JPEG or JPEG-LS codestream's start-of-frame segment; None if it has none."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    offset = 2
    while offset + 4 <= len(frame):
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            offset += 2
            continue
        length = int.from_bytes(frame[offset + 2 : offset + 4], "big")
        if marker in sof_markers:
            segment = frame[offset + 4 : offset + 9]
            if len(segment) < 5:
                return None
            return int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big")
        if marker in (0xD9, 0xDA) or length < 2:  # end of image or start of scan before any frame header
            return None
        offset += 2 + length
    return None


def _jpeg_2000_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 codestream's SIZ segment (inside a JP2 file too); None if it has none."""
    offset = 0
    if frame.startswith(_JP2_SIGNATURE):
        offset = len(_JP2_SIGNATURE)
        while offset + 8 <= len(frame):
            length = int.from_bytes(frame[offset : offset + 4], "big")
            kind = frame[offset + 4 : offset + 8]
            header = 8
            if length == 1:
                length, header = int.from_bytes(frame[offset + 8 : offset + 16], "big"), 16
            if kind == b"jp2c":
                offset += header
                break
            if length < header:
                return None
            offset += length
        else:
            return None
    siz = frame[offset : offset + 24]
    if len(siz) < 24 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    width = int.from_bytes(siz[8:12], "big") - int.from_bytes(siz[16:20], "big")
    height = int.from_bytes(siz[12:16], "big") - int.from_bytes(siz[20:24], "big")
    return width, height


def _check_frame(frame: bytes, syntax: str, columns: int, rows: int) -> None:
    """Refuse a frame that is not the codec its transfer syntax names, or whose own header gives another size.

    The decode budget and the pixel limit are costed from Rows x Columns; a codec decodes the size its own
    header declares. A 7999 x 7999 PNG in an instance claiming 8 x 8 was decoded (448 MB) and graded.

    Raises:
        CorruptImageError: the frame is of another codec, has no readable size, or disagrees with the header.
    """
    if syntax in _JPEG_SYNTAXES:
        size, codec = _jpeg_frame_size(frame, _JPEG_SOF), "JPEG"
    elif syntax in _JPEG_LS_SYNTAXES:
        size, codec = _jpeg_frame_size(frame, _JPEG_LS_SOF), "JPEG-LS"
    elif syntax in _JPEG_2000_SYNTAXES:
        size, codec = _jpeg_2000_frame_size(frame), "JPEG 2000"
    else:
        return  # native and RLE pixel data have no header of their own: Rows x Columns is their size
    if size is None:
        raise CorruptImageError(
            f"The DICOM pixel data is not the {codec} image its transfer syntax ({uid.UID(syntax).name}) names."
        )
    if size != (columns, rows):
        raise CorruptImageError(
            f"The DICOM image's frame is {size[0]}x{size[1]} pixels, but its header says {columns}x{rows}; "
            "the file is damaged."
        )


def _first_frame(ds: Dataset) -> bytes:
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # the fragments' item tags and lengths are the file's own: any failure is damage
        raise CorruptImageError("The DICOM pixel data is truncated or damaged and cannot be decoded.") from None


def decode_dicom(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> DecodedImage:
    """Decode a single-frame DICOM photograph to 8-bit RGB with its identifiers as metadata.

    Args:
        data: a DICOM Part 10 file.
        max_pixels: refuse images with more pixels (checked from Rows x Columns before decoding).
        min_side: as for :func:`~retinagrade.preprocessing.decode.decode_image`: an encapsulated JPEG frame may
            be decoded at reduced scale as long as its shorter side stays at least this long.

    Raises:
        CorruptImageError: truncated or damaged file or pixel data (400).
        ImageTooLargeError: more than ``max_pixels`` pixels (413).
        DicomUnsupportedTransferSyntaxError: pixel data in a syntax retinagrade does not decode (415).
        DicomSupportMissingError: the codec plugin for the syntax is not installed (415).
        DicomNotPhotographError: a CT, MR or other non-photograph object (422).
        DicomNoPixelDataError: no pixel data (422).
        DicomMultiFrameError: more than one frame (422).
    """
    ds = read_dataset(data)
    metadata = dicom_metadata(ds)
    try:
        return _decode_photograph(ds, metadata, max_pixels=max_pixels, min_side=min_side)
    except InputError as exc:
        # The header was read: the error still says whose photo and which eye (e.g. for a patient's referral).
        exc.metadata = MappingProxyType(metadata)
        raise


def _decode_photograph(
    ds: Dataset, metadata: Mapping[str, str], *, max_pixels: int, min_side: int | None
) -> DecodedImage:
    syntax = _check_photograph(ds)
    rows, columns = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    if rows <= 0 or columns <= 0:
        raise CorruptImageError("The DICOM image has no pixels.")
    if rows * columns > max_pixels:
        raise ImageTooLargeError(f"The image is {columns}x{rows} pixels; the limit is {max_pixels:,} pixels.")
    frame = _first_frame(ds) if syntax in _ENCAPSULATED_SYNTAXES else b""
    _check_frame(frame, syntax, columns, rows)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if syntax in _PILLOW_JPEG and _number(ds, "BitsStored", 8) == 8 and photometric in _PILLOW_PHOTOMETRIC:
        try:
            decoded = decode_image(frame, max_pixels=max_pixels, min_side=min_side)
        except InputError as exc:
            raise CorruptImageError(f"The DICOM image's JPEG frame cannot be decoded: {exc.message}") from None
        return dataclasses.replace(decoded, format="DICOM", metadata=metadata)
    rgb = _decode_with_pydicom(ds, syntax)
    return DecodedImage(rgb=rgb, original_size=(rgb.shape[1], rgb.shape[0]), format="DICOM", metadata=metadata)


def decoded_bytes_dicom(data: bytes, *, min_side: int | None = None) -> int:
    """The memory decoding a DICOM photograph takes at its peak, from its header alone (no pixel is decoded).

    An encapsulated camera JPEG is decoded as a JPEG file is: at the reduced DCT scale ``min_side`` allows,
    into Pillow's 4-byte pixels, then 3-byte RGB. Anything else is decoded whole by pydicom (``BitsAllocated``
    per sample), plus the float32 working copy that scales deeper samples to 8 bits, plus the RGB array.
    Returns 0 when the header cannot be read: :func:`decode_dicom` then refuses the file with the right error.
    """
    try:
        ds = read_dataset(data, stop_before_pixels=True)
        rows, columns = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
        samples = _number(ds, "SamplesPerPixel", 1) or 1
        bits = _number(ds, "BitsAllocated", 8) or 8
        stored = _number(ds, "BitsStored", bits) or bits
        frames = max(1, _number(ds, "NumberOfFrames", 1))
    except InputError:
        return 0
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if syntax in _PILLOW_JPEG and stored == 8 and photometric in _PILLOW_PHOTOMETRIC:
        factor = max(1, min(rows, columns) // max(min_side or 1, 1)) if min_side else 1
        scale = next(s for s in (8, 4, 2, 1) if s <= factor)
        return (rows // scale) * (columns // scale) * (4 + 3)
    per_pixel = samples * max(bits // 8, 1) * frames + (samples * 4 if stored != 8 else 0) + 3
    return rows * columns * per_pixel


register_decoder("DICOM", decode_dicom, decoded_bytes_dicom)
