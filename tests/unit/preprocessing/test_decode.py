"""Decoding client uploads: every accepted format and colour mode, orientation, reduced scale, bad input."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from retinagrade.errors import RetinagradeError
from retinagrade.preprocessing.decode import decode_image, is_dicom, read_image_file, sniff_format


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def fundus_pil(synthetic_fundus) -> Image.Image:
    return Image.fromarray(synthetic_fundus(160, 120, 80, 60, 55))


@pytest.mark.parametrize(
    ("fmt", "kwargs", "tolerance"),
    [
        ("JPEG", {"quality": 95}, 6.0),
        ("PNG", {}, 0.0),
        ("TIFF", {}, 0.0),
        ("BMP", {}, 0.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("WEBP", {"quality": 90}, 8.0),
    ],
)
def test_round_trip_keeps_pixels(fundus_pil, fmt, kwargs, tolerance):
    decoded = decode_image(_encode(fundus_pil, fmt, **kwargs))
    original = np.asarray(fundus_pil)
    assert decoded.format == fmt
    assert decoded.rgb.dtype == np.uint8
    assert decoded.rgb.shape == original.shape
    assert decoded.original_size == (160, 120)
    assert decoded.scale == 1.0
    assert np.abs(decoded.rgb.astype(int) - original).mean() <= tolerance


def test_exif_orientation_is_applied(fundus_pil):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 degrees anticlockwise: display turns it clockwise
    decoded = decode_image(_encode(fundus_pil, "JPEG", quality=95, exif=exif.tobytes()))
    expected = np.asarray(fundus_pil.transpose(Image.Transpose.ROTATE_270))
    assert decoded.rgb.shape == (160, 120, 3)
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 6
    # The reported size and scale describe the image as displayed, in the same frame as ``rgb``.
    assert decoded.original_size == (120, 160)
    assert decoded.scale == 1.0


def test_grayscale_becomes_three_equal_channels():
    gray = Image.fromarray(np.tile(np.arange(0, 250, 2, dtype=np.uint8), (40, 1)), mode="L")
    decoded = decode_image(_encode(gray, "PNG"))
    assert decoded.rgb.shape == (40, 125, 3)
    assert np.array_equal(decoded.rgb[..., 0], np.asarray(gray))
    assert np.array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])


def test_transparent_pixels_become_black():
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent
    rgba[5:15, 10:20] = (200, 80, 40, 255)
    decoded = decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert decoded.rgb[0, 0].tolist() == [0, 0, 0]
    assert decoded.rgb[10, 15].tolist() == [200, 80, 40]


def test_palette_image(fundus_pil):
    decoded = decode_image(_encode(fundus_pil.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    assert decoded.rgb.shape == (120, 160, 3)
    assert np.abs(decoded.rgb.astype(int) - np.asarray(fundus_pil)).mean() < 6


def test_palette_transparency_becomes_black():
    img = Image.new("P", (10, 10), 1)
    img.putpalette([255, 255, 255, 200, 80, 40] + [0] * 762)
    img.paste(0, (0, 0, 5, 10))
    decoded = decode_image(_encode(img, "PNG", transparency=0))
    assert decoded.rgb[5, 2].tolist() == [0, 0, 0]
    assert decoded.rgb[5, 7].tolist() == [200, 80, 40]


def test_cmyk_jpeg_keeps_its_colours():
    red = Image.new("RGB", (64, 48), (210, 60, 30))
    decoded = decode_image(_encode(red.convert("CMYK"), "JPEG", quality=95))
    assert decoded.rgb.shape == (48, 64, 3)
    assert np.abs(decoded.rgb.astype(int) - [210, 60, 30]).max() < 12


def _gray16_ramp() -> np.ndarray:
    # A 12-bit camera's range stored in 16 bits: every value above 255, none near 65535.
    return np.tile(np.linspace(1000, 4000, 64).astype(np.uint16), (16, 1))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_stretched_not_clipped(fmt):
    ramp = _gray16_ramp()
    decoded = decode_image(_encode(Image.fromarray(ramp), fmt))
    gray = decoded.rgb[..., 1].astype(int)
    assert decoded.rgb.shape == (16, 64, 3)
    assert gray[0, 0] == 0
    assert gray[0, -1] == 255
    assert np.all(np.diff(gray[0]) >= 0)
    assert len(np.unique(gray)) == 64  # a gradient, not a white sheet


def test_reduced_scale_jpeg_decode():
    big = Image.new("RGB", (4000, 3000), (180, 70, 30))
    data = _encode(big, "JPEG", quality=80)
    decoded = decode_image(data, min_side=448)
    height, width = decoded.rgb.shape[:2]
    assert 448 <= min(height, width) < 3000
    assert width / height == pytest.approx(4 / 3, rel=0.01)
    assert decoded.original_size == (4000, 3000)
    assert decoded.scale == pytest.approx(width / 4000)
    assert decode_image(data, min_side=5000).rgb.shape == (3000, 4000, 3)


def test_reduced_scale_respects_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.new("RGB", (1600, 1200), (180, 70, 30)), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, min_side=300)
    height, width = decoded.rgb.shape[:2]
    assert height > width >= 300
    assert decoded.original_size == (1200, 1600)
    assert decoded.scale == pytest.approx(width / 1200)


# -- Bad input ---------------------------------------------------------------------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR chunk (valid CRC) for an 8-bit RGB image, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 16)
    idat_chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat_chunk


def _gif() -> bytes:
    return _encode(Image.new("P", (8, 8), 0), "GIF")


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    data = _encode(noisy, "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_INPUTS = {
    "empty": (b"", "empty_file"),
    "random bytes": (np.random.default_rng(1).bytes(4096), "unsupported_format"),
    "text": (b"grade: 2\nthis is not an image\n" * 20, "unsupported_format"),
    "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "unsupported_format"),
    "gif": (_gif(), "unsupported_format"),
    "truncated jpeg": (_truncated_jpeg(), "corrupt_image"),
    "png claiming 30000x30000": (_png_header_claiming(30000, 30000), "image_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_its_error_code(name):
    data, code = BAD_INPUTS[name]
    with pytest.raises(RetinagradeError) as raised:
        decode_image(data)
    assert raised.value.code == code
    assert raised.value.http_status in (400, 413, 415)


def test_pixel_limit_is_checked_before_decoding():
    # A header that claims only 16 million pixels passes Pillow's own guard, so max_pixels must catch it.
    with pytest.raises(RetinagradeError) as raised:
        decode_image(_png_header_claiming(4000, 4000), max_pixels=1_000_000)
    assert raised.value.code == "image_too_large"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_files_raise_only_retinagrade_errors(fundus_pil):
    """Flipped bytes and cuts in every accepted format: a client's bad upload is never a 500."""
    rng = np.random.default_rng(7)
    for fmt in ("JPEG", "PNG", "TIFF", "BMP", "WEBP"):
        data = bytearray(_encode(fundus_pil, fmt))
        for trial in range(25):
            damaged = bytearray(data)
            if trial % 2:
                damaged = damaged[: int(rng.integers(1, len(damaged)))]
            else:
                for pos in rng.integers(0, min(len(damaged), 200), 4):
                    damaged[pos] = int(rng.integers(0, 256))
            try:
                decoded = decode_image(bytes(damaged))
            except RetinagradeError:
                continue
            assert decoded.rgb.ndim == 3
            assert decoded.rgb.shape[2] == 3


def test_decoded_bytes_follow_the_pixels_not_the_file_size():
    from retinagrade.preprocessing.decode import decoded_bytes

    png = _encode(Image.new("RGB", (4000, 3000)), "PNG")
    assert len(png) < 200_000
    assert decoded_bytes(png) == 4000 * 3000 * (4 + 3)  # Pillow's 4-byte pixels plus the RGB array
    grey = _encode(Image.new("L", (1000, 1000)), "PNG")
    assert decoded_bytes(grey) == 1000 * 1000 * (1 + 3)
    assert decoded_bytes(b"not an image") == 0


def test_decoded_bytes_of_a_jpeg_count_its_reduced_scale():
    from retinagrade.preprocessing.decode import decoded_bytes

    jpeg = _encode(Image.new("RGB", (4000, 3000), (120, 40, 10)), "JPEG", quality=80)
    full = decoded_bytes(jpeg)
    assert decoded_bytes(jpeg, min_side=500) * 16 <= full  # decoded at 1/4 scale or smaller
    assert decode_image(jpeg, min_side=500).rgb.size * 16 <= 4000 * 3000 * 3


def test_a_damaged_file_of_an_accepted_type_is_corrupt_not_unsupported():
    data = bytearray(_encode(Image.new("RGB", (32, 32)), "PNG"))
    data[29] ^= 0xFF  # IHDR CRC
    with pytest.raises(RetinagradeError) as info:
        decode_image(bytes(data))
    assert info.value.code == "corrupt_image" and "PNG" in info.value.message


def test_a_multi_page_tiff_is_refused(fundus_pil):
    buf = io.BytesIO()
    fundus_pil.save(buf, "TIFF", save_all=True, append_images=[fundus_pil, fundus_pil])
    with pytest.raises(RetinagradeError) as info:
        decode_image(buf.getvalue())
    assert info.value.code == "multi_frame_not_supported" and info.value.http_status == 422
    assert "3 pages" in info.value.message


# -- Magic-byte dispatch, multi-frame files, reading files ---------------------------------------------


def test_dicom_is_recognised_and_sent_to_the_dicom_decoder():
    # A DICOM preamble on garbage: the DICOM decoder's clear 4xx (tests/unit/preprocessing/test_dicom.py has
    # the real cases), or, without the [dicom] extra, the 415 that says how to enable it.
    data = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 64
    assert is_dicom(data) and sniff_format(data) == "DICOM"
    with pytest.raises(RetinagradeError) as raised:
        decode_image(data)
    assert (raised.value.code, raised.value.http_status) in {("corrupt_image", 400), ("dicom_support_missing", 415)}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "WEBP"])
def test_magic_numbers_name_every_accepted_format(fundus_pil, fmt):
    assert sniff_format(_encode(fundus_pil, fmt)) == fmt


def test_decoded_images_carry_an_empty_metadata_mapping(fundus_pil):
    assert dict(decode_image(_encode(fundus_pil, "PNG")).metadata) == {}


def test_reading_refuses_what_is_not_a_regular_file_without_blocking(tmp_path, fundus_pil):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(fundus_pil, "PNG"))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    assert read_image_file(good) == good.read_bytes()
    expected = {
        "pipe.jpg": "not_a_file",
        "folder.jpg": "not_a_file",
        "broken.jpg": "file_not_found",
        "missing.jpg": "file_not_found",
        "loop.jpg": "unreadable_file",
    }
    for name, code in expected.items():
        with pytest.raises(RetinagradeError) as raised:
            read_image_file(tmp_path / name)
        assert raised.value.code == code, name
