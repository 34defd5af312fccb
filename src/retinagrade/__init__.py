"""retinagrade: diabetic retinopathy grading from fundus photographs.

``from retinagrade import GradingPipeline`` is the library's entry point. It is imported on first use, so
that ``import retinagrade`` (the CLI's start, ``--version``) stays light: no ONNX Runtime, no OpenCV.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagrade.pipeline import GradeResult, GradingPipeline

__all__ = ["GradeResult", "GradingPipeline", "__version__"]

try:
    # The installed distribution's version: pyproject.toml is its one source.
    __version__ = version("retinagrade")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

_LAZY = {"GradingPipeline", "GradeResult"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from retinagrade import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'retinagrade' has no attribute {name!r}")
