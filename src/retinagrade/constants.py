"""Domain constants: the one place that names ICDR grades, statuses and the referable rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

#: ICDR (International Clinical Diabetic Retinopathy) severity scale, indexed by grade.
GRADE_NAMES: Final[tuple[str, ...]] = (
    "no DR",
    "mild NPDR",
    "moderate NPDR",
    "severe NPDR",
    "proliferative DR",
)
NUM_GRADES: Final[int] = len(GRADE_NAMES)

#: Grade 2 (moderate NPDR) or worse must be referred to an ophthalmologist.
REFERABLE_MIN_GRADE: Final[int] = 2
#: Grade 4 (proliferative DR) threatens sight soon: the referral is urgent.
URGENT_MIN_GRADE: Final[int] = 4

#: Why an eye was referred, the first that holds: its grade (2 or worse); with a grade 0-1, its estimated risk of
#: referable DR (calibrated P(grade >= 2)) at or over the operating point's threshold; diabetic macular oedema
#: (a model with a DME output) alone; ``none`` when it was not referred.
ReferralReason = Literal["grade", "risk", "dme", "none"]
REFERRAL_REASONS: Final[tuple[str, ...]] = ("grade", "risk", "dme", "none")

Status = Literal["graded", "ungradable", "not_fundus", "error"]
STATUSES: Final[tuple[str, ...]] = ("graded", "ungradable", "not_fundus", "error")


@dataclass(frozen=True)
class ImageFormat:
    """One accepted image format, as the decoder (Pillow), the file system and HTTP name it.

    Attributes:
        pillow: ``Image.format`` as Pillow reports it after opening the bytes.
        suffixes: file suffixes (lower case, with the dot) the CLI picks up when it walks a folder.
        mime_types: media types a client may send the raw body as.
    """

    pillow: str
    suffixes: tuple[str, ...]
    mime_types: tuple[str, ...]


#: Every format retinagrade decodes: the one table that decode, the HTTP uploads, the CLI's folder scan, the
#: label reader and the page's file picker follow. MPO is what many cameras write for a JPEG with a preview
#: frame; it arrives as a .jpg with type image/jpeg.
ACCEPTED_FORMATS: Final[tuple[ImageFormat, ...]] = (
    ImageFormat("JPEG", (".jpg", ".jpeg", ".jfif"), ("image/jpeg",)),
    ImageFormat("MPO", (), ()),
    ImageFormat("PNG", (".png",), ("image/png",)),
    ImageFormat("TIFF", (".tif", ".tiff"), ("image/tiff",)),
    ImageFormat("BMP", (".bmp",), ("image/bmp",)),
    ImageFormat("WEBP", (".webp",), ("image/webp",)),
    # Not a Pillow format: recognised by its preamble and read by preprocessing/dicom.py (the [dicom] extra).
    ImageFormat("DICOM", (".dcm",), ("application/dicom",)),
)
#: Pillow format names the decoder accepts.
PILLOW_FORMATS: Final[frozenset[str]] = frozenset(f.pillow for f in ACCEPTED_FORMATS if f.pillow != "DICOM")
#: File suffixes the CLI picks up when it walks a folder.
IMAGE_SUFFIXES: Final[frozenset[str]] = frozenset(s for f in ACCEPTED_FORMATS for s in f.suffixes)
#: Media types of a raw image body, in table order.
IMAGE_MIME_TYPES: Final[tuple[str, ...]] = tuple(dict.fromkeys(m for f in ACCEPTED_FORMATS for m in f.mime_types))
#: How the decoder's messages name the accepted formats ("JPEG, PNG, TIFF, BMP, WEBP").
ACCEPTED_FORMAT_NAMES: Final[str] = ", ".join(f.pillow for f in ACCEPTED_FORMATS if f.suffixes)

#: Keys of :attr:`DecodedImage.metadata <retinagrade.preprocessing.decode.DecodedImage.metadata>`: DICOM
#: keywords, so that a DICOM decoder fills them as they are and other sources map onto them.
METADATA_KEYS: Final[tuple[str, ...]] = (
    "ImageLaterality",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
)
