"""The ``retinagrade`` command line: grade, evaluate, train, export, serve.

Exit codes of ``retinagrade grade`` (also in ``--help`` and the README):

- 0: every file was graded (or refused by the quality gate, which is a result, not an error);
- 1: the run finished, and some files could not be read or decoded (their rows have ``status=error``), or
  (``--output-sr``) some DICOM files could not get an SR (no valid UIDs to reference; their rows are written);
- 2: usage: bad arguments, no image files found, or the output file exists (``--overwrite``) or cannot be
  created; nothing was graded;
- 3: the run itself failed: the model could not be loaded, or writing the output failed midway;
- 130: interrupted (Ctrl-C, or SIGTERM from a scheduler or ``kill``); every row finished before it is in the
  output, and the output is complete (a JSON array or FHIR Bundle closed).

One module per command group, each a thin door onto the library: :mod:`.grading` (grade, serve; the engines in
:mod:`.local` and :mod:`.cluster`), :mod:`.validation` (evaluate, validate, calibrate), :mod:`.training`
(train, loso-report, ensemble-loso, loso-compare, fellow-eye, export, sources), :mod:`.gate` (fit-gate),
:mod:`.dicomweb`; :mod:`.shared` holds what they share. This module makes the app and lists its commands in
``--help``'s order.
"""

from __future__ import annotations

from typing import Annotated

import typer

from retinagrade.cli import dicomweb, gate, grading, training, validation
from retinagrade.cli.shared import EXIT_FILE_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE

__all__ = ["EXIT_FILE_ERRORS", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUN_FAILED", "EXIT_USAGE", "app"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Diabetic retinopathy grading of fundus photos.")


def _print_version(value: bool) -> None:
    if value:
        from retinagrade import __version__

        typer.echo(f"retinagrade {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Diabetic retinopathy grading of fundus photos."""


app.command(epilog=grading.GRADE_EPILOG)(grading.grade)
app.command()(validation.evaluate)
app.command()(training.train)
app.command("loso-report")(training.loso_report_command)
app.command("ensemble-loso")(training.ensemble_loso)
app.command("loso-compare")(training.loso_compare)
app.command("fellow-eye")(training.fellow_eye_command)
app.command()(training.export)
app.command()(validation.validate)
app.command()(validation.calibrate)
app.command("fit-gate")(gate.fit_gate)
app.command()(grading.serve)
app.command()(dicomweb.dicomweb)

sources = typer.Typer(no_args_is_help=True, help="Fetched training sources (see ../shared/data/sources).")
sources.command("prepare")(training.sources_prepare)
sources.command("list")(training.sources_list)
app.add_typer(sources, name="sources")
