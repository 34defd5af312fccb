"""Reading images out of requests: a multipart field, or the raw body with an ``image/*`` type.

The media type is checked before a byte of the body is read. The body then streams in under the rules of
:mod:`retinagrade.api.intake` (size, deadline, memory budget); here each file, multipart part or raw body
alike, is also held to the per-image limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from retinagrade.api.errors import FieldValidationError, RequestTooLargeError, UnsupportedMediaTypeError
from retinagrade.api.schemas import Eye
from retinagrade.constants import IMAGE_MIME_TYPES
from retinagrade.errors import ImageTooLargeError, InputError

#: Media types of a raw image body: the accepted formats' (constants.ACCEPTED_FORMATS), and "any bytes".
RAW_TYPES = (*IMAGE_MIME_TYPES, "application/octet-stream")
_EYES: dict[str, Eye] = {
    "left": "left",
    "l": "left",
    "os": "left",
    "right": "right",
    "r": "right",
    "od": "right",
}
MAX_PATIENT_ID = 128
#: A patient id is an identifier (MRN, DICOM PatientID), not a name: printable ASCII only. Control characters
#: would forge log lines and CSV cells; anything beyond ASCII may be bytes that were not UTF-8, which the
#: multipart parser silently turns into Latin-1 text (the id would no longer match the patient's).
PATIENT_ID = re.compile(r"[\x20-\x7e]*")

#: OpenAPI description of a one-image body (the routes read the request themselves to accept both forms).
SINGLE_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image, as the multipart field `file` or as the raw body with an image/* type "
        "(or application/dicom: a DICOM photograph, with the [dicom] extra).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "site": {"type": "string", "description": "Site profile (as X-Retinagrade-Site)."},
                        "operating_point": {
                            "type": "string",
                            "description": "Named operating point (as X-Retinagrade-Operating-Point).",
                        },
                    },
                },
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_TYPES},
        },
    }
}

BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Repeated `files` parts; optional `eye` (left/right) and `patient_id` parts, one per "
        "file in the same order (an empty value leaves that file untagged).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "eye": {"type": "array", "items": {"type": "string", "enum": ["left", "right", ""]}},
                        "patient_id": {
                            "type": "array",
                            "items": {"type": "string", "maxLength": MAX_PATIENT_ID, "pattern": "^[\\x20-\\x7e]*$"},
                        },
                        "site": {"type": "string", "description": "Site profile (as X-Retinagrade-Site)."},
                        "operating_point": {
                            "type": "string",
                            "description": "Named operating point (as X-Retinagrade-Operating-Point).",
                        },
                    },
                },
            }
        },
    }
}


@dataclass(frozen=True)
class BatchUpload:
    images: list[bytes | InputError]
    filenames: list[str | None]
    eyes: list[Eye | None]
    patient_ids: list[str | None]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _missing(field: str, message: str) -> FieldValidationError:
    return FieldValidationError(message, details=[{"loc": ["body", field], "message": message, "type": "missing"}])


async def _read_file(upload: UploadFile, max_bytes: int) -> bytes | InputError:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        return ImageTooLargeError(f"The file is larger than the limit of {max_bytes:,} bytes.")
    return data


async def read_image(request: Request, max_bytes: int) -> bytes:
    """The one image of a request.

    Raises:
        UnsupportedMediaTypeError: neither multipart nor an image body.
        FieldValidationError: multipart without exactly one file in the field ``file``.
        ImageTooLargeError: the file is larger than ``max_bytes``.
    """
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        async with request.form(max_files=4, max_fields=16) as form:
            parts = form.getlist("file")
            if not parts:
                raise _missing("file", "The multipart field `file` with the image is missing.")
            if len(parts) > 1 or not isinstance(parts[0], UploadFile):
                raise FieldValidationError(
                    "The field `file` must hold exactly one file (use /v1/grade/batch for several).",
                    details=[{"loc": ["body", "file"], "message": "expected one file", "type": "value_error"}],
                )
            data = await _read_file(parts[0], max_bytes)
        if isinstance(data, InputError):
            raise data
        return data
    if media_type.startswith("image/") or media_type in RAW_TYPES:
        data = await request.body()
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"The image is larger than the limit of {max_bytes:,} bytes.")
        return data
    raise UnsupportedMediaTypeError(
        "Send the image as multipart/form-data (field `file`) or as a raw image/* or application/dicom body."
    )


def _patient_id(value: str, index: int) -> str | None:
    value = value.strip()
    if len(value) > MAX_PATIENT_ID:
        raise FieldValidationError(
            f"patient_id #{index + 1} is longer than {MAX_PATIENT_ID} characters.",
            details=[{"loc": ["body", "patient_id", index], "message": "too long", "type": "string_too_long"}],
        )
    if not PATIENT_ID.fullmatch(value):
        raise FieldValidationError(
            f"patient_id #{index + 1} holds a control character or a character outside printable ASCII "
            "(or bytes that are not UTF-8); send the identifier as plain ASCII text.",
            details=[
                {
                    "loc": ["body", "patient_id", index],
                    "message": "printable ASCII only",
                    "type": "string_pattern_mismatch",
                }
            ],
        )
    return value or None


async def _batch_form(request: Request, max_images: int) -> FormData:
    """The parsed multipart body; more files than ``max_images`` is 413 like any other over-size batch."""
    try:
        # One file over the limit still parses, so the count below can say how many files there were.
        return await request.form(max_files=max_images + 1, max_fields=4 * max_images + 8)
    except HTTPException as exc:
        # Starlette reports its own file limit as a 400; only its message tells it from a malformed body.
        if exc.status_code == 400 and "Too many files" in str(exc.detail):
            raise RequestTooLargeError(f"A batch holds at most {max_images} images; this one has more.") from None
        raise


async def form_field(request: Request, name: str) -> str | None:
    """A text field of a multipart body that was already read (Starlette keeps the parsed form)."""
    if _media_type(request) != "multipart/form-data":
        return None
    value = (await request.form()).get(name)
    return value.strip() or None if isinstance(value, str) else None


def _eye(value: str, index: int) -> Eye | None:
    value = value.strip().lower()
    if not value:
        return None
    if value not in _EYES:
        raise FieldValidationError(
            f"eye #{index + 1} is {value[:20]!r}; use left or right.",
            details=[{"loc": ["body", "eye", index], "message": "expected left or right", "type": "enum"}],
        )
    return _EYES[value]


async def read_batch(request: Request, max_bytes: int, max_images: int) -> BatchUpload:
    """The images of a batch request with their optional eye and patient tags.

    Raises:
        UnsupportedMediaTypeError: not multipart.
        FieldValidationError: no files, tags not one per file, or a malformed tag.
        RequestTooLargeError: more files than ``max_images``.
    """
    if _media_type(request) != "multipart/form-data":
        raise UnsupportedMediaTypeError("Send the images as multipart/form-data (repeated field `files`).")
    form = await _batch_form(request, max_images)
    try:
        parts = form.getlist("files")
        eyes_raw = form.getlist("eye")
        patients_raw = form.getlist("patient_id")
        if not parts:
            raise _missing("files", "The multipart field `files` with the images is missing.")
        if len(parts) > max_images:
            raise RequestTooLargeError(f"A batch holds at most {max_images} images; this one has {len(parts)}.")
        if any(not isinstance(p, UploadFile) for p in (*parts,)):
            raise FieldValidationError(
                "Every `files` part must be a file upload.",
                details=[{"loc": ["body", "files"], "message": "expected files", "type": "value_error"}],
            )
        for name, values in (("eye", eyes_raw), ("patient_id", patients_raw)):
            if values and len(values) != len(parts):
                raise FieldValidationError(
                    f"Give one `{name}` per file ({len(parts)}), or none; got {len(values)}.",
                    details=[{"loc": ["body", name], "message": "one per file", "type": "value_error"}],
                )
            if any(not isinstance(v, str) for v in values):
                raise FieldValidationError(
                    f"`{name}` must be text.",
                    details=[{"loc": ["body", name], "message": "expected text", "type": "value_error"}],
                )
        eyes = [_eye(str(v), i) for i, v in enumerate(eyes_raw)] or [None] * len(parts)
        patient_ids = [_patient_id(str(v), i) for i, v in enumerate(patients_raw)] or [None] * len(parts)
        uploads = [p for p in parts if isinstance(p, UploadFile)]
        images = [await _read_file(p, max_bytes) for p in uploads]
        filenames = [p.filename for p in uploads]
    finally:
        await form.close()
    return BatchUpload(images=images, filenames=filenames, eyes=eyes, patient_ids=patient_ids)
