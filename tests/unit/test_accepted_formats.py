"""One table of accepted formats (constants.ACCEPTED_FORMATS): the decoder, HTTP, the CLI and the page agree."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from retinagrade.api.uploads import RAW_TYPES
from retinagrade.constants import ACCEPTED_FORMATS, IMAGE_MIME_TYPES, IMAGE_SUFFIXES, PILLOW_FORMATS
from retinagrade.preprocessing.decode import decode_image

PAGE = Path(__file__).resolve().parents[2] / "src" / "retinagrade" / "api" / "static" / "index.html"


def test_the_page_file_picker_accepts_exactly_the_table() -> None:
    # Except DICOM: a browser cannot show a DICOM file, and the page shows every photo it sends.
    (accept,) = re.findall(r'accept="([^"]+)"', PAGE.read_text())
    shown = [f for f in ACCEPTED_FORMATS if f.pillow != "DICOM"]
    assert set(accept.split(",")) == {m for f in shown for m in f.mime_types} | {s for f in shown for s in f.suffixes}
    assert {"application/dicom", ".dcm"} <= set(IMAGE_MIME_TYPES) | IMAGE_SUFFIXES


def test_raw_uploads_take_the_table_media_types() -> None:
    assert set(RAW_TYPES) == {*IMAGE_MIME_TYPES, "application/octet-stream"}


@pytest.mark.parametrize("fmt", sorted(PILLOW_FORMATS - {"MPO"}))
def test_the_decoder_reads_every_format_of_the_table(fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 80, 40)).save(buf, format=fmt)
    assert decode_image(buf.getvalue()).format == fmt


def test_every_suffix_belongs_to_one_format() -> None:
    suffixes = [s for f in ACCEPTED_FORMATS for s in f.suffixes]
    assert len(suffixes) == len(set(suffixes)) and all(s == s.lower() and s.startswith(".") for s in suffixes)
