"""Domain errors. Each carries a stable ``code`` and the HTTP status a front door should answer with.

The message is written for the person who sent the input; it never contains internal details.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


class RetinagradeError(Exception):
    """Base class for every error retinagrade raises on purpose.

    ``metadata``: what the input said about patient and eye before it failed (a DICOM header read fine, its
    pixels did not), keyed like ``DecodedImage.metadata``; empty for most errors. Never logged or rendered.
    """

    code: str = "internal_error"
    http_status: int = 500
    metadata: Mapping[str, str] = MappingProxyType({})

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PreparationFailedError(RetinagradeError):
    """Preparing one image failed in a way no input check foresaw (a defect, logged where it happened).

    Every batch door (the CLI's engines, ``/v1/grade/batch``) gives that image this error and grades the others.
    """

    code = "internal_error"
    http_status = 500


def failure_summary(exc: BaseException) -> str:
    """An unforeseen exception as a log line may show it: its type and where it was raised, not its message.

    A third-party reader's message may quote the file it read (a patient's name, a birth date, a UID).
    """
    frames = exc.__traceback__
    while frames is not None and frames.tb_next is not None:
        frames = frames.tb_next
    if frames is None:
        return type(exc).__name__
    code = frames.tb_frame.f_code
    return f"{type(exc).__name__} in {code.co_name} ({'/'.join(code.co_filename.split('/')[-2:])}:{frames.tb_lineno})"


class InputError(RetinagradeError):
    """The client sent something that cannot be graded as an image."""

    code = "invalid_input"
    http_status = 400


class EmptyImageError(InputError):
    code = "empty_file"
    http_status = 400


class UnsupportedFormatError(InputError):
    code = "unsupported_format"
    http_status = 415


class CorruptImageError(InputError):
    code = "corrupt_image"
    http_status = 400


class ImageTooLargeError(InputError):
    code = "image_too_large"
    http_status = 413


class ModelError(RetinagradeError):
    """The model file or its spec is missing, corrupt or inconsistent (a deployment fault)."""

    code = "model_invalid"
    http_status = 500


class MultiFrameImageError(InputError):
    """A file of several pictures (multi-page TIFF, animated PNG or WebP): which one is the photograph is not
    ours to guess. 422, not 415: the format is accepted, this content of it is not (code and status agreed
    with the ``harden`` branch, which made the same change)."""

    code = "multi_frame_not_supported"
    http_status = 422


class FileReadError(InputError):
    """A path that could not be read as a file (the CLI and evaluation read files; HTTP never does)."""

    code = "unreadable_file"
    http_status = 400


class FileMissingError(FileReadError):
    """No such file, or a symbolic link whose target is gone."""

    code = "file_not_found"


class NotAFileError(FileReadError):
    """A directory, FIFO, socket or device: reading it would fail or block, so it is refused unread."""

    code = "not_a_file"


# -- DICOM input (``retinagrade.preprocessing.dicom``; the ``[dicom]`` extra) --------------------------------


class DicomSupportMissingError(UnsupportedFormatError):
    """A DICOM file arrived but this installation cannot read DICOM (pydicom or a codec plugin is missing)."""

    code = "dicom_support_missing"
    http_status = 415


class DicomUnsupportedTransferSyntaxError(UnsupportedFormatError):
    """The pixel data is encoded in a transfer syntax retinagrade does not decode (video, JPIP...)."""

    code = "dicom_unsupported_transfer_syntax"
    http_status = 415


class DicomNoPixelDataError(InputError):
    """A well-formed DICOM object without an image in it (a report, a presentation state...)."""

    code = "dicom_no_pixel_data"
    http_status = 422


class DicomNotPhotographError(InputError):
    """A DICOM image that is not a colour photograph (CT, MR, ultrasound...): never graded as a fundus."""

    code = "dicom_not_photograph"
    http_status = 422


class DicomMultiFrameError(MultiFrameImageError):
    """More than one frame in an instance; each photograph must be its own instance to get its own result.

    The same code as any other file of several pictures (a multi-page TIFF): a client handles one case.
    """


class SiteProfileError(ModelError):
    """A site profile is missing, malformed, or was fitted for another model (a deployment fault)."""

    code = "site_profile_invalid"
    http_status = 500


class UnknownSiteError(InputError):
    """A request named a site profile the service was not started with."""

    code = "unknown_site"
    http_status = 400


class UnknownOperatingPointError(InputError):
    """A request or setting named an operating point the model (or the site) does not have."""

    code = "unknown_operating_point"
    http_status = 400


class UnknownEvidenceError(InputError):
    """An explanation of a head the model does not have (``evidence=dme`` on a model without DME)."""

    code = "unknown_evidence"
    http_status = 400


class CalibrationSampleError(RetinagradeError):
    """The local sample is too small (or too one-sided) to fit a site's operating point honestly."""

    code = "calibration_sample_too_small"
    http_status = 422
