"""retinagrade: diabetic retinopathy grading from fundus photographs.

``from retinagrade import GradingPipeline`` is the library's entry point. It is imported on first use, so
that ``import retinagrade`` (the CLI's start, ``--version``) stays light: no ONNX Runtime, no OpenCV. So is
``__version__``: reading the installed distribution's metadata imports ``importlib.metadata`` and the email
package, tens of milliseconds that ``retinagrade grade`` would pay for a number it never prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagrade.pipeline import GradeResult, GradingPipeline

    __version__: str

__all__ = ["GradeResult", "GradingPipeline", "__version__"]

_LAZY = {"GradingPipeline", "GradeResult"}


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        # The installed distribution's version: pyproject.toml is its one source.
        return version("retinagrade")
    except PackageNotFoundError:  # a source tree on sys.path, never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = _installed_version()
        globals()["__version__"] = value
        return value
    if name in _LAZY:
        from retinagrade import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'retinagrade' has no attribute {name!r}")
