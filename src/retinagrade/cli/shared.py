"""What the commands share: exit codes, the stderr console, the options several take, loading the model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer
from rich.console import Console
from rich.markup import escape

from retinagrade.errors import RetinagradeError

if TYPE_CHECKING:  # the pipeline (numpy, OpenCV, ONNX Runtime) loads only when a command needs it
    from retinagrade.inference.site_profile import SiteProfile
    from retinagrade.pipeline import GradingPipeline
    from retinagrade.report import ResultWriter

err = Console(stderr=True)

EXIT_OK: Final[int] = 0
EXIT_FILE_ERRORS: Final[int] = 1
EXIT_USAGE: Final[int] = 2
EXIT_RUN_FAILED: Final[int] = 3
EXIT_INTERRUPTED: Final[int] = 130

ModelOption = Annotated[
    Path | None,
    typer.Option(envvar="RETINAGRADE_MODEL", help="Model spec (.json) or ONNX file; default: the shipped model."),
]
OperatingPointOption = Annotated[
    str | None,
    typer.Option(
        "--operating-point",
        envvar="RETINAGRADE_OPERATING_POINT",
        help="Named operating point to refer at (balanced, sensitive, ...; `retinagrade model` lists them); "
        "default: the site profile's, else the model's default.",
    ),
]
SiteOption = Annotated[
    Path | None,
    typer.Option("--site", help="Site profile (.json from `retinagrade calibrate`): the site's operating point."),
]


class _NoProgress:
    """What ``--quiet`` shows: nothing (and rich's progress module, 50 ms of start-up, is never imported)."""

    def add_task(self, *_: object, **__: object) -> None:
        return None

    def advance(self, *_: object) -> None:
        return None


def progress_bar(quiet: bool = False) -> contextlib.AbstractContextManager[Any]:
    """The progress bar on stderr that grading shows (a rich ``Progress``), or nothing with ``quiet``."""
    if quiet:
        return contextlib.nullcontext(_NoProgress())
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar: contextlib.AbstractContextManager[Any] = Progress(*columns, console=err)
    return bar


def stop_before_grading(
    message: str, writer: ResultWriter | None, output: Path | None, code: int = EXIT_RUN_FAILED
) -> typer.Exit:
    """Say why the run stops before any image is graded, and remove the output file it had just opened (it
    holds only a header); raise the returned exit."""
    err.print(message)
    if writer is not None and output is not None:
        writer.close()
        output.unlink(missing_ok=True)
    return typer.Exit(code)


def load_pipeline(
    model: Path | None, threads: int, writer: ResultWriter | None, output: Path | None
) -> GradingPipeline:
    from retinagrade.pipeline import GradingPipeline

    try:
        return GradingPipeline.load(model, threads=threads)
    except RetinagradeError as exc:
        raise stop_before_grading(f"[red]Cannot load the model:[/red] {escape(exc.message)}", writer, output) from None


def with_site(
    pipeline: GradingPipeline, site: Path, writer: ResultWriter | None = None, output: Path | None = None
) -> tuple[GradingPipeline, SiteProfile]:
    """The pipeline read with the site profile's operating point; a profile for another model stops the run."""
    from retinagrade.inference.site_profile import SiteProfile

    try:
        profile = SiteProfile.load(site)
        return pipeline.with_spec(profile.apply(pipeline.spec)), profile
    except RetinagradeError as exc:
        message = f"[red]Cannot use the site profile:[/red] {escape(exc.message)}"
        raise stop_before_grading(message, writer, output) from None
