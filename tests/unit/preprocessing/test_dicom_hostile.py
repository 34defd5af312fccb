"""Hostile and non-conformant DICOM headers (issue 20 B): each is a clear 4xx with a stable code, never a crash.

The instances are built here from a synthetic fundus JPEG wrapped as an Ophthalmic Photography instance, the
way a camera stores its photos, and then damaged byte by byte where pydicom's object model cannot go.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydicom", reason="needs the [dicom] extra (pydicom)")

from pydicom.encaps import encapsulate

from retinagrade.errors import InputError
from retinagrade.interop.photo import PhotoIdentity, to_bytes, wrap_jpeg
from retinagrade.preprocessing.decode import decode_image, decoded_bytes

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
UNDEFINED = b"\xff\xff\xff\xff"


@pytest.fixture
def camera_dicom(synthetic_fundus: Callable[..., np.ndarray]) -> bytes:
    """A camera's OP instance: a fundus JPEG, byte for byte, as encapsulated JPEG baseline pixel data."""
    buffer = io.BytesIO()
    Image.fromarray(synthetic_fundus(320, 240, 160, 120, 110)).save(buffer, "JPEG", quality=90)
    return to_bytes(wrap_jpeg(buffer.getvalue(), PhotoIdentity("PAT-0001", "Doe^John", "R")))


def before_pixels(data: bytes, extra: bytes) -> bytes:
    """``data`` with raw bytes inserted just before its Pixel Data element (where pydicom reads them last)."""
    at = data.index(PIXEL_DATA_TAG)
    return data[:at] + extra + data[at:]


def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    """An explicit-VR little-endian element with a 2-byte length, whatever the value holds."""
    return struct.pack("<HH", group, number) + vr + struct.pack("<H", len(value)) + value


def nested_sequences(depth: int) -> bytes:
    """Acquisition Context Sequence items nested ``depth`` deep (undefined lengths, as many writers use)."""
    opening = struct.pack("<HH", 0x0040, 0x0555) + b"SQ\x00\x00" + UNDEFINED + b"\xfe\xff\x00\xe0" + UNDEFINED
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return opening * depth + element(0x0008, 0x0100, b"SH", b"1 ") + closing * depth


def _refusal(data: bytes) -> tuple[str, int]:
    with pytest.raises(InputError) as caught:
        decode_image(data)
    return caught.value.code, caught.value.http_status


def test_the_undamaged_instance_decodes(camera_dicom: bytes) -> None:
    assert decode_image(camera_dicom).rgb.shape == (240, 320, 3)
    assert decode_image(before_pixels(camera_dicom, nested_sequences(5))).rgb.shape == (240, 320, 3)


@pytest.mark.parametrize("depth", [40, 250, 2000])
def test_sequences_nested_too_deep_are_a_damaged_file(camera_dicom: bytes, depth: int) -> None:
    # 250 deep exhausted Python's stack inside pydicom (RecursionError, a 500); 40 deep reads, but no
    # photograph nests like that and later readers recurse too.
    data = before_pixels(camera_dicom, nested_sequences(depth))
    assert _refusal(data) == ("corrupt_image", 400)
    assert decoded_bytes(data) == 0  # the cost estimate never raises: decode_image says why


@pytest.mark.parametrize(
    "damage",
    [
        # A 3-byte US, a 5-byte FD: pydicom's BytesLengthException when the value is read.
        lambda data: data.replace(b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x10\x00US\x03\x00", 1),
        lambda data: before_pixels(data, element(0x0018, 0x1050, b"FD", b"\x01\x02\x03\x04\x05 ")),
        # File Meta Information Group Length (UL) of 2 bytes.
        lambda data: data.replace(b"\x02\x00\x00\x00UL\x04\x00", b"\x02\x00\x00\x00UL\x02\x00", 1)[:-2],
        # Number of Frames that is not a number (a ValueError in int()).
        lambda data: before_pixels(data, element(0x0028, 0x0008, b"IS", b"abc ")),
        # Rows as text.
        lambda data: data.replace(b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x10\x00LO\x02\x00", 1),
    ],
    ids=["US-3-bytes", "FD-5-bytes", "meta-UL-2-bytes", "frames-not-a-number", "rows-as-text"],
)
def test_damaged_values_are_a_damaged_file(camera_dicom: bytes, damage: Callable[[bytes], bytes]) -> None:
    data = damage(camera_dicom)
    assert _refusal(data)[1] == 400
    decoded_bytes(data)


def test_a_deflated_file_is_refused_before_it_is_inflated(deflate_bomb: Callable[[int], bytes]) -> None:
    bomb = deflate_bomb(256)
    assert len(bomb) < 512 * 1024  # 256 MiB of header from a few hundred KB
    tracemalloc.start()
    try:
        assert _refusal(bomb) == ("dicom_unsupported_transfer_syntax", 415)
        assert decoded_bytes(bomb) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.0f} MiB allocated refusing a deflate bomb"


def _encoded(rgb: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt)
    return buffer.getvalue()


def test_a_frame_of_another_codec_than_the_transfer_syntax_names_is_refused(
    synthetic_fundus: Callable[..., np.ndarray],
) -> None:
    # A PNG inside an instance that says JPEG baseline: Pillow would read it (it reads anything), unchecked.
    rgb = synthetic_fundus(64, 48, 32, 24, 20)
    ds = wrap_jpeg(_encoded(rgb, "JPEG"), PhotoIdentity("PAT-0001"))
    ds.PixelData = encapsulate([_encoded(rgb, "PNG")])
    assert _refusal(to_bytes(ds)) == ("corrupt_image", 400)


def test_a_frame_larger_than_its_header_says_is_refused_before_decoding() -> None:
    # The bomb: a 7999 x 7999 PNG (448 MB decoded, from a small file) in an instance that claims 8 x 8,
    # so the decode budget, costed from Rows x Columns, saw 8 x 8. Alone, the same PNG is a 413.
    big = Image.new("L", (7999, 7999))
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    png = buffer.getvalue()
    ds = wrap_jpeg(_encoded(np.zeros((8, 8, 3), np.uint8), "JPEG"), PhotoIdentity("PAT-0001"))
    ds.PixelData = encapsulate([png])
    assert _refusal(to_bytes(ds)) == ("corrupt_image", 400)


@pytest.mark.parametrize("syntax", ["camera-jpeg", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"])
def test_a_frame_whose_own_header_disagrees_with_rows_and_columns_is_refused(
    synthetic_fundus: Callable[..., np.ndarray], syntax: str
) -> None:
    from retinagrade.interop.photo import pixels_to_dicom

    rgb = synthetic_fundus(64, 48, 32, 24, 20)
    if syntax == "camera-jpeg":
        ds = wrap_jpeg(_encoded(rgb, "JPEG"), PhotoIdentity("PAT-0001"))
    else:
        ds = pixels_to_dicom(rgb, PhotoIdentity("PAT-0001"), syntax)
    assert decode_image(to_bytes(ds)).rgb.shape == (48, 64, 3)
    ds.Rows, ds.Columns = 8, 8  # the frame is 64 x 48
    assert _refusal(to_bytes(ds)) == ("corrupt_image", 400)
