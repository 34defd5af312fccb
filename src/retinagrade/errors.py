"""Domain errors. Each carries a stable ``code`` and the HTTP status a front door should answer with.

The message is written for the person who sent the input; it never contains internal details.
"""

from __future__ import annotations


class RetinagradeError(Exception):
    """Base class for every error retinagrade raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class MultiFrameImageError(InputError):
    """A multi-page image: which page is the photograph is not ours to guess."""

    code = "multi_frame_not_supported"
    http_status = 422


class ModelError(RetinagradeError):
    """The model file or its spec is missing, corrupt or inconsistent (a deployment fault)."""

    code = "model_invalid"
    http_status = 500
