"""``retinagrade grade --engine ray``: the CLI's front door onto :func:`retinagrade.cluster.engine.grade_archive`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from retinagrade.cli.shared import EXIT_USAGE, err
from retinagrade.cluster import RAY_MISSING
from retinagrade.errors import RetinagradeError


def output_folder(output: Path | None, *, output_sr: Path | None, pair_eyes: bool, site: Path | None) -> Path:
    """The ray engine's output folder; what the ray engine cannot do stops the command with a usage error."""
    if output is None or output_sr is not None or pair_eyes:
        err.print(
            "[red]--engine ray needs --output FOLDER (results are written there in shards) and takes neither "
            "--output-sr nor --pair-eyes.[/red]"
        )
        raise typer.Exit(EXIT_USAGE)
    if site is not None:
        err.print("[red]--site is not supported with --engine ray yet; grade with the local engine.[/red]")
        raise typer.Exit(EXIT_USAGE)
    _refuse_file_like_folder(output)
    return output


def _refuse_file_like_folder(output: Path) -> None:
    """Refuse a Ray ``--output`` named like a results file (``results.csv``): it would become a folder of shards."""
    from retinagrade.report import format_for

    if output.is_dir():
        return
    try:
        format_for(output)
    except ValueError:
        return  # not a results file's name: a folder it is
    folder = output.parent / output.name.split(".")[0]
    csv_file = folder / "results.csv"
    err.print(
        f"[red]--output {escape(str(output))} names a file; it must be a folder for the ray engine (it holds "
        f"Parquet shards). Use --output {escape(str(folder))}/ --csv (the CSV is then {escape(str(csv_file))}).[/red]"
    )
    raise typer.Exit(EXIT_USAGE)


def run(
    paths: Sequence[Path],
    output: Path,
    *,
    quiet: bool,
    console: Console,
    **settings: Any,
) -> int:
    """Grade on the cluster and print the summary; return the exit code the local engine would give.

    Args:
        paths: files, folders, manifest CSVs, URIs.
        output: the output folder (resumed when it holds shards).
        quiet: print only errors.
        console: where messages go (stderr).
        settings: fields of :class:`~retinagrade.cluster.engine.ClusterOptions`.

    Returns:
        The local engine's exit codes: 0 all graded, 1 some images had status ``error``, 2 usage (bad
        arguments, nothing to grade, Ray not installed, the output folder held by another run), 3 the run
        failed (the model cannot be loaded or differs between nodes).
    """
    try:
        from retinagrade.cluster.engine import ClusterOptions, grade_archive
        from retinagrade.cluster.shards import OutputBusyError
    except ImportError:
        console.print(f"[red]{RAY_MISSING}[/red]")
        return 2
    options = ClusterOptions(**settings)
    if output.exists() and not output.is_dir():
        console.print(f"[red]--output {output} must be a folder for the ray engine (it holds shards).[/red]")
        return 2
    try:
        report = grade_archive([str(p) for p in paths], output, options)
    except RetinagradeError as exc:
        console.print(f"[red]{escape(exc.message)}[/red]")
        return 3
    except (ImportError, OutputBusyError, ValueError) as exc:  # no Ray; a busy folder; a bad manifest or pool
        console.print(f"[red]{escape(str(exc))}[/red]")
        return 2
    summary = report.summary
    if not quiet:
        run_info = summary["this_run"]
        table = Table("", "images")
        for status, count in summary["by_status"].items():
            table.add_row(f"status {status}", str(count))
        for grade, count in summary["by_grade"].items():
            table.add_row(f"grade {grade}", str(count))
        for code, count in summary["errors_by_code"].items():
            table.add_row(f"error {code}", str(count))
        Console(file=sys.stderr).print(table)
        console.print(
            f"{run_info['graded']} graded now, {run_info['already_done']} already done, "
            f"in {run_info['seconds']} s; results: {', '.join(str(p) for p in report.results)}"
        )
    failed = summary["by_status"].get("error", 0)
    if failed:
        console.print(f"[yellow]{failed} of {summary['images']} files could not be graded (status error).[/yellow]")
        return 1
    return 0
