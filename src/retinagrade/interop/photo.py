"""Wrap photographs as DICOM Ophthalmic Photography instances, as a fundus camera would store them.

A camera that speaks DICOM keeps its JPEG untouched and puts it in the instance as encapsulated JPEG baseline
pixel data; :func:`wrap_jpeg` does the same, so a maintainer can turn a folder of camera JPEGs into the OP
instances a PACS holds and check that both give the same grades. :func:`pixels_to_dicom` stores decoded
pixels in any other transfer syntax pydicom can encode (native, RLE, JPEG-LS, JPEG 2000), for tests and for
sites whose cameras write those.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from retinagrade.preprocessing.dicom import OPHTHALMIC_PHOTOGRAPHY_8BIT, OPHTHALMIC_PHOTOGRAPHY_16BIT

#: SNOMED CT codes of the eyes (the HL7 Eyecare target-site value set: 362502000 right, 362503005 left).
EYE_CODES: Final[dict[str, tuple[str, str]]] = {
    "R": ("362502000", "Entire right eye"),
    "L": ("362503005", "Entire left eye"),
}
ROOT_UID_PREFIX: Final = "1.2.826.0.1.3680043.8.498."  # pydicom's registered root, used by its generate_uid


@dataclass(frozen=True)
class PhotoIdentity:
    """Who and what a wrapped photograph belongs to (the attributes a PACS files it by)."""

    patient_id: str
    patient_name: str = ""
    laterality: Literal["R", "L"] | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str = ""
    instance_number: int = 1


def _base_dataset(identity: PhotoIdentity, sop_class: str, syntax: str) -> Dataset:
    now = datetime.now(UTC)
    ds = Dataset()
    # A Part 10 preamble even when a client serialises the dataset itself (dicomweb-client's STOW does).
    ds.preamble = b"\0" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = uid.UID(sop_class)
    ds.file_meta.TransferSyntaxUID = uid.UID(syntax)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = identity.sop_instance_uid or uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = identity.study_instance_uid or uid.generate_uid()
    ds.SeriesInstanceUID = identity.series_instance_uid or uid.generate_uid()
    ds.PatientID = identity.patient_id
    ds.PatientName = identity.patient_name
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.StudyID = ""
    ds.AccessionNumber = identity.accession_number
    ds.ReferringPhysicianName = ""
    ds.Modality = "OP"
    ds.SeriesNumber = 1
    ds.InstanceNumber = identity.instance_number
    ds.Manufacturer = ""
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientEyeMovementCommanded = "NO"
    ds.BurnedInAnnotation = "NO"
    ds.PixelRepresentation = 0
    if identity.laterality is not None:
        ds.ImageLaterality = identity.laterality
        code, meaning = EYE_CODES[identity.laterality]
        region = Dataset()
        region.CodeValue = code
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = meaning
        ds.AnatomicRegionSequence = Sequence([region])
    else:
        ds.ImageLaterality = "U"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def wrap_jpeg(jpeg: bytes, identity: PhotoIdentity) -> Dataset:
    """An OP 8-bit instance whose pixel data is ``jpeg``, byte for byte (encapsulated JPEG baseline).

    Raises:
        ValueError: the bytes are not a baseline JPEG Pillow can read the header of.
    """
    with Image.open(io.BytesIO(jpeg)) as img:
        if img.format not in ("JPEG", "MPO"):
            raise ValueError(f"expected a JPEG, got {img.format}")
        width, height = img.size
        mode = img.mode
    ds = _base_dataset(identity, OPHTHALMIC_PHOTOGRAPHY_8BIT, uid.JPEGBaseline8Bit)
    ds.Rows, ds.Columns = height, width
    if mode == "L":
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    else:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    return ds


def pixels_to_dicom(
    rgb: np.ndarray,
    identity: PhotoIdentity,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    *,
    bits: Literal[8, 16] = 8,
    planar: bool = False,
) -> Dataset:
    """An OP instance holding ``rgb`` (H x W x 3 uint8), optionally widened to 16 bits and compressed.

    Args:
        rgb: the picture.
        identity: patient, eye and instance identifiers.
        transfer_syntax: any syntax pydicom has an encoder for (native, RLE, JPEG-LS, JPEG 2000).
        bits: 16 stores each 8-bit value v as v * 257 in an OP 16-bit instance (the full 16-bit range).
        planar: store colour-by-plane (Planar Configuration 1); only for native syntaxes.
    """
    sop_class = OPHTHALMIC_PHOTOGRAPHY_16BIT if bits == 16 else OPHTHALMIC_PHOTOGRAPHY_8BIT
    ds = _base_dataset(identity, sop_class, uid.ExplicitVRLittleEndian)
    height, width = rgb.shape[:2]
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PlanarConfiguration = 1 if planar else 0
    pixels = rgb.astype(np.uint16) * 257 if bits == 16 else rgb
    if planar:
        ds.PixelData = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    if transfer_syntax != uid.ExplicitVRLittleEndian:
        if transfer_syntax == uid.ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = uid.UID(transfer_syntax)
        else:
            ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
    ds.LossyImageCompression = "00"
    return ds
