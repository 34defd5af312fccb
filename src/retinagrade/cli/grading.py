"""``retinagrade grade`` and ``retinagrade serve``: grade photographs here or on a cluster, or serve them over HTTP.

``grade`` reads its options and hands the run to an engine: this process (:mod:`retinagrade.cli.local`) or a
Ray cluster (:mod:`retinagrade.cli.cluster`); then it prints what the run found.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, TextIO

import typer
from rich.console import Console
from rich.markup import escape

from retinagrade.cli.local import grade_local, patient_and_eye
from retinagrade.cli.shared import (
    EXIT_FILE_ERRORS,
    EXIT_OK,
    ModelOption,
    OperatingPointOption,
    SiteOption,
    err,
)
from retinagrade.cpus import available_cpus

if TYPE_CHECKING:
    from retinagrade.report import ResultRecord

#: The exit codes, as ``grade --help`` ends (the package's docstring says more).
GRADE_EPILOG: Final[str] = (
    "Exit codes: 0 all graded; 1 some files had errors; 2 usage (bad arguments, no images, the output "
    "exists or cannot be created); 3 the run failed (model, writing, a defect); 130 interrupted (Ctrl-C, SIGTERM; "
    "finished rows are kept)."
)


class Engine(StrEnum):
    """Where ``grade`` runs: in this process, or on a Ray cluster (docs/cluster.md)."""

    local = "local"
    ray = "ray"


def grade(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Results as they finish: .csv, .json, .jsonl, .parquet, a FHIR Bundle .fhir.json; ray: a folder.",
        ),
    ] = None,
    output_sr: Annotated[
        Path | None,
        typer.Option(help="Also write a DICOM SR for each DICOM input into this folder (<SR UID>.dcm)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output file.")] = False,
    model: ModelOption = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Processes reading and grading images (2; 1: threads); ray: model actors (1)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="ONNX Runtime threads per worker (CPUs / workers); ray: per actor (1).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
    pair_eyes: Annotated[
        bool,
        typer.Option(
            "--pair-eyes",
            help="Also decide per patient from both eyes, and add each eye's fellow-eye answer (paired_* "
            "columns): DICOM Patient ID and Image Laterality, else file names PATIENT_left / _right / _L / _R / "
            "_OD / _OS. Single-image answers do not change.",
        ),
    ] = False,
    engine: Annotated[Engine, typer.Option(help="local: this process; ray: a Ray cluster (the cluster extra).")] = (
        Engine.local
    ),
    address: Annotated[
        str | None, typer.Option(help="ray: cluster to join (auto, HOST:PORT); default $RAY_ADDRESS or a private one.")
    ] = None,
    write_csv: Annotated[bool, typer.Option("--csv", help="ray: also write results.csv in --output.")] = False,
    shard_rows: Annotated[int, typer.Option(min=1, help="ray: results per Parquet shard (a kill loses fewer).")] = 1000,
    block_size: Annotated[int, typer.Option(min=1, help="ray: images per prepare task.")] = 32,
    cpus_per_worker: Annotated[float | None, typer.Option(help="ray: CPUs reserved per model actor.")] = None,
    site: SiteOption = None,
    operating_point: OperatingPointOption = None,
) -> None:
    """Grade fundus photographs; rows are written as each image finishes.

    With ``--engine ray``, ``--output`` is a folder of Parquet shards that a second run resumes, and inputs
    may also be manifest CSVs and s3:// URIs (docs/cluster.md).
    """
    if engine is Engine.ray:
        from retinagrade.cli import cluster

        folder = cluster.output_folder(output, output_sr=output_sr, pair_eyes=pair_eyes, site=site)
        settings: dict[str, object] = {"model": model, "address": address, "workers": workers or 1}
        settings.update(operating_point=operating_point)
        settings.update(threads=threads or 1)
        settings.update(cpus_per_worker=cpus_per_worker, shard_rows=shard_rows, block_size=block_size)
        raise typer.Exit(cluster.run(paths, folder, quiet=quiet, console=err, write_csv=write_csv, **settings))
    workers = workers or 2
    # Workers x model threads = the CPUs: more threads than cores only queue for them.
    threads = threads or max(1, available_cpus() // workers)
    code, records, skipped_sr = grade_local(
        paths,
        output,
        output_sr=output_sr,
        overwrite=overwrite,
        model=model,
        workers=workers,
        threads=threads,
        quiet=quiet,
        pair_eyes=pair_eyes,
        site=site,
        operating_point=operating_point,
    )
    code = _summarise(code, records, skipped_sr, table=not quiet or output is None, to=output, referrals=pair_eyes)
    if code != EXIT_OK:
        raise typer.Exit(code)


def _summarise(
    code: int, records: list[ResultRecord], skipped_sr: list[str], *, table: bool, to: Path | None, referrals: bool
) -> int:
    """Print the results table, the referrals and what went wrong after a finished run; returns the exit code."""
    if code != EXIT_OK:
        return code
    if table:
        _print_table(records, sys.stdout if to is None else sys.stderr)
    if referrals:
        _print_referrals(records, sys.stdout)
    failed = sum(r.status == "error" for r in records)
    if failed:
        err.print(f"[yellow]{failed} of {len(records)} files could not be graded (status error).[/yellow]")
        code = EXIT_FILE_ERRORS
    if skipped_sr:
        err.print(f"[yellow]{len(skipped_sr)} DICOM files got no SR (their grades are in the results).[/yellow]")
        code = EXIT_FILE_ERRORS
    return code


def _note(record: ResultRecord) -> str:
    return record.error_message if record.status == "error" else ", ".join(record.reasons)


def _print_referrals(records: list[ResultRecord], stream: TextIO) -> None:
    from rich.table import Table

    from retinagrade.referral import TaggedOutcome, patient_referrals

    outcomes = []
    for index, record in enumerate(records):
        patient, eye = patient_and_eye(record)
        if patient is not None:
            urgency = record.urgency if record.status == "graded" else None
            outcomes.append(TaggedOutcome(index, patient, eye, record.referable, urgency))
    table = Table("patient", "decision", "urgency", "eyes", "reason")
    for referral in patient_referrals(outcomes):
        eyes = ", ".join(f"{e.eye or 'untagged'}: {e.status}" for e in referral.eyes)
        table.add_row(
            escape(referral.patient_id), referral.decision, referral.urgency or "", eyes, escape(referral.reason)
        )
    Console(file=stream).print(table)


def _print_table(records: list[ResultRecord], stream: TextIO) -> None:
    from rich.table import Table

    table = Table("image", "status", "grade", "referable", "confidence", "quality", "note")
    for r in records:
        table.add_row(
            escape(Path(r.image).name),
            r.status,
            f"{r.grade} {r.grade_name}" if r.grade is not None else "",
            "" if r.referable is None else str(r.referable).lower(),
            "" if r.confidence is None else str(round(r.confidence, 4)),
            "" if r.quality is None else str(round(r.quality, 4)),
            escape(_note(r)),
        )
    Console(file=stream).print(table)


def serve(
    host: Annotated[str, typer.Option(envvar="RETINAGRADE_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="RETINAGRADE_PORT")] = 8000,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
) -> None:
    """Run the REST service (settings from RETINAGRADE_* environment variables); /metrics on its own port."""
    from retinagrade.api.server import serve as serve_api

    serve_api(host, port, workers)
