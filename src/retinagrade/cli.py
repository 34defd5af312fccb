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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, TextIO, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from retinagrade.errors import RetinagradeError, failure_summary
from retinagrade.files import collect_images

if TYPE_CHECKING:  # the pipeline (numpy, OpenCV, ONNX Runtime) loads only when a command needs it
    from retinagrade.eyes import RawOutputs
    from retinagrade.inference.site_profile import SiteProfile
    from retinagrade.pipeline import GradingPipeline, Outcome
    from retinagrade.referral import Eye
    from retinagrade.report import ResultRecord, ResultWriter, RunContext

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Diabetic retinopathy grading of fundus photos.")
err = Console(stderr=True)


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


EXIT_OK: Final[int] = 0
EXIT_FILE_ERRORS: Final[int] = 1
EXIT_USAGE: Final[int] = 2
EXIT_RUN_FAILED: Final[int] = 3
EXIT_INTERRUPTED: Final[int] = 130


class Engine(StrEnum):
    """Where ``grade`` runs: in this process, or on a Ray cluster (docs/cluster.md)."""

    local = "local"
    ray = "ray"


ModelOption = Annotated[
    Path | None,
    typer.Option(envvar="RETINAGRADE_MODEL", help="Model spec (.json) or ONNX file; default: the shipped model."),
]


def _note(record: ResultRecord) -> str:
    return record.error_message if record.status == "error" else ", ".join(record.reasons)


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


@app.command(
    epilog="Exit codes: 0 all graded; 1 some files had errors; 2 usage (bad arguments, no images, the output "
    "exists or cannot be created); 3 the run failed (model, writing, a defect); 130 interrupted (Ctrl-C, SIGTERM; "
    "finished rows are kept)."
)
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
        int | None, typer.Option(min=1, help="Threads reading and preparing images (2); ray: model actors (1).")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads (2); ray: per actor (1).")] = None,
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
        from retinagrade.cluster import command

        settings: dict[str, object] = {"model": model, "address": address, "workers": workers or 1}
        settings.update(operating_point=operating_point)
        settings.update(threads=threads or 1)
        settings.update(cpus_per_worker=cpus_per_worker, shard_rows=shard_rows, block_size=block_size)
        raise typer.Exit(command.run(paths, output, quiet=quiet, console=err, write_csv=write_csv, **settings))
    workers = workers or 2
    threads = threads or 2
    files = collect_images(paths)
    if not files:
        err.print("[red]No image files found.[/red]")
        raise typer.Exit(EXIT_USAGE)
    context = _run_context(model)
    skipped_sr: list[str] = []
    write_sr = _sr_writer(output_sr, context, skipped_sr)
    writer = _open_output(output, overwrite, context)
    records: list[ResultRecord] = []
    with _on_sigterm(_interrupt):
        code = _run_local(
            files,
            writer,
            output,
            records,
            model=model,
            threads=threads,
            site=site,
            operating_point=operating_point,
            workers=workers,
            quiet=quiet,
            also=write_sr,
            pair_eyes=pair_eyes,
        )
    code = _summarise(code, records, skipped_sr, table=not quiet or output is None, to=output, referrals=pair_eyes)
    if code != EXIT_OK:
        raise typer.Exit(code)


def _run_local(
    files: list[Path],
    writer: ResultWriter | None,
    output: Path | None,
    records: list[ResultRecord],
    *,
    model: Path | None,
    threads: int,
    site: Path | None,
    operating_point: str | None,
    workers: int,
    quiet: bool,
    also: Callable[[Path, ResultRecord], None] | None,
    pair_eyes: bool,
) -> int:
    """Load the model (and the site profile and operating point), grade ``files`` into ``writer`` and ``records``,
    close the output; returns the exit code so far. Ctrl-C or SIGTERM while the model loads closes the output as
    an empty result."""
    try:
        pipeline, profile = _decision_layer(
            _load_pipeline(model, threads, writer, output), site, operating_point, writer, output, quiet
        )
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted before grading started.[/yellow]")
        return _close_output(writer, EXIT_INTERRUPTED)
    code = EXIT_RUN_FAILED
    try:
        code = _grade_into(
            pipeline,
            files,
            writer,
            records,
            workers=workers,
            quiet=quiet,
            also=also,
            site=profile.name if profile else "",
            pair_eyes=pair_eyes,
        )
    finally:
        code = _close_output(writer, code)
    return code


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _on_sigterm(handler: Callable[[int, Any], object] | int) -> Iterator[None]:
    """Handle SIGTERM with ``handler`` inside the block (main thread only; elsewhere signals cannot be set).

    A scheduler's SIGTERM (or ``kill``) then ends a run as Ctrl-C does: every finished row is written and the
    output closed (a JSON array, a FHIR Bundle), where the default action left a cut-off array or a 0-byte file.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _close_output(writer: ResultWriter | None, code: int) -> int:
    """Close the output (a SIGTERM meanwhile is ignored: the file is being completed); the exit code after it."""
    if writer is None:
        return code
    try:
        with _on_sigterm(signal.SIG_IGN):
            writer.close()
    except OSError as exc:
        err.print(f"[red]Finishing the results failed:[/red] {escape(str(exc))}")
        return EXIT_RUN_FAILED
    except Exception as exc:
        # A defect, not the input's fault: its type and place only (the message may quote a file's header).
        err.print(f"[red]Finishing the results failed unexpectedly ({escape(failure_summary(exc))}).[/red]")
        return EXIT_RUN_FAILED
    return code


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


def _run_context(model: Path | None) -> RunContext:
    """The model's identity for reports that state it (FHIR, SR); empty when its spec cannot be read (loading
    the model says why)."""
    from retinagrade.inference.model_spec import ModelSpec
    from retinagrade.pipeline import DEFAULT_MODEL
    from retinagrade.report import RunContext

    try:
        spec = ModelSpec.load(model or DEFAULT_MODEL, verify_checksum=False)
    except (RetinagradeError, OSError, ValueError):
        return RunContext()
    return RunContext(spec.name, spec.version, spec.sha256, str(spec.raw.get("intended_use", "")))


def _sr_writer(
    folder: Path | None, context: RunContext, skipped: list[str]
) -> Callable[[Path, ResultRecord], None] | None:
    """A function writing the SR of a DICOM input into ``folder`` (``--output-sr``); None without a folder.

    A file whose SR cannot be made is named on stderr and in ``skipped``; its grade row is written all the same.
    """
    if folder is None:
        return None
    try:
        from retinagrade.interop.dicom_sr import SourceNotReferenceableError, report_for_file, sr_bytes
        from retinagrade.interop.findings import AlgorithmInfo
    except ImportError:
        err.print("[red]--output-sr needs the [dicom] extra: pip install 'retinagrade[dicom]'[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err.print(f"[red]Cannot create {escape(str(folder))}:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    algorithm = AlgorithmInfo(context.model_name, context.model_version, context.model_sha256, context.intended_use)

    def write(path: Path, record: ResultRecord) -> None:
        # The site profile that set the operating point is part of the algorithm's identity (TID 4019).
        try:
            sr = report_for_file(path, record, dataclasses.replace(algorithm, site_profile=record.site))
        except SourceNotReferenceableError as exc:
            skipped.append(record.image)
            err.print(f"[yellow]No SR for {escape(record.image)}: {escape(str(exc))}.[/yellow]")
            return
        if sr is not None:
            # Named by the SR's UID, which is derived from the photo's: a re-run rewrites the same report.
            (folder / f"{sr.SOPInstanceUID}.dcm").write_bytes(sr_bytes(sr))

    return write


def _open_output(output: Path | None, overwrite: bool, context: RunContext) -> ResultWriter | None:
    """The output's writer, created now: a path that cannot be written stops the command before any work."""
    from retinagrade.report import open_writer, printable_name

    if output is None:
        return None
    try:
        return open_writer(output, overwrite=overwrite, context=context)
    except FileExistsError:
        err.print(f"[red]{escape(printable_name(output))} exists; pass --overwrite to replace it.[/red]")
    except (OSError, ValueError) as exc:
        err.print(f"[red]Cannot write {escape(printable_name(output))}:[/red] {escape(str(exc))}")
    raise typer.Exit(EXIT_USAGE)


def _load_pipeline(
    model: Path | None, threads: int, writer: ResultWriter | None, output: Path | None
) -> GradingPipeline:
    from retinagrade.pipeline import GradingPipeline

    try:
        return GradingPipeline.load(model, threads=threads)
    except RetinagradeError as exc:
        err.print(f"[red]Cannot load the model:[/red] {escape(exc.message)}")
        if writer is not None and output is not None:
            writer.close()
            output.unlink(missing_ok=True)  # created a moment ago, and holds only a header
        raise typer.Exit(EXIT_RUN_FAILED) from None


def _decision_layer(
    pipeline: GradingPipeline,
    site: Path | None,
    operating_point: str | None,
    writer: ResultWriter | None,
    output: Path | None,
    quiet: bool,
) -> tuple[GradingPipeline, SiteProfile | None]:
    """The pipeline with the site profile and the named operating point applied (the point wins over the
    site's own); an unknown point stops the run before any image is read."""
    profile = None
    if site is not None:
        pipeline, profile = _with_site(pipeline, site, writer, output)
        if not quiet:
            err.print(f"Site profile: {profile.name} (referable threshold {profile.referable_threshold:.3f})")
    try:
        pipeline = pipeline.at_operating_point(operating_point)
    except RetinagradeError as exc:
        err.print(f"[red]{escape(exc.message)}[/red]")
        if writer is not None and output is not None:
            writer.close()
            output.unlink(missing_ok=True)  # created a moment ago, and holds only a header
        raise typer.Exit(EXIT_USAGE) from None
    if not quiet:
        err.print(
            f"Operating point: {pipeline.spec.operating_point} "
            f"(refer at grade 2+ or P(referable) >= {pipeline.spec.referable_threshold:.3f})"
        )
    return pipeline, profile


def _grade_into(
    pipeline: GradingPipeline,
    files: list[Path],
    writer: ResultWriter | None,
    records: list[ResultRecord],
    *,
    workers: int,
    quiet: bool,
    also: Callable[[Path, ResultRecord], None] | None = None,
    site: str = "",
    pair_eyes: bool = False,
) -> int:
    """Grade ``files``, writing and collecting each record as it finishes; returns the exit code so far.

    ``also`` is called with each file and its record as it finishes (``--output-sr``). With ``pair_eyes``
    a record waits until every file its name ties to the same patient has finished (files whose name names
    no patient, such as DICOM files tagged inside, wait until the end), then gets its fellow-eye answer; an
    interrupted run still writes every record that finished, paired with what finished.
    """
    from retinagrade.report import to_record

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    pairing = _Pairing(pipeline, files) if pair_eyes else None

    def emit(path: Path, record: ResultRecord) -> None:
        if writer is not None:
            writer.write(record)
        if also is not None:
            also(path, record)
        records.append(record)

    try:
        try:
            with Progress(*columns, console=err, disable=quiet) as progress:
                task = progress.add_task("grading", total=len(files))
                # closing(): an interrupt stops the engine's worker threads here, not at interpreter exit.
                with contextlib.closing(pipeline.grade_paths(files, workers=workers)) as outcomes:
                    for path, outcome in outcomes:
                        record = to_record(path, outcome, site=site)
                        if pairing is None:
                            emit(path, record)
                        else:
                            for ready in pairing.add(path, record, outcome):
                                emit(*ready)
                        progress.advance(task)
        finally:
            if pairing is not None:
                for ready in pairing.flush():
                    emit(*ready)
    except KeyboardInterrupt:
        err.print(f"[yellow]Interrupted after {len(records)} of {len(files)} files.[/yellow]")
        return EXIT_INTERRUPTED
    except OSError as exc:
        err.print(f"[red]Writing the results failed after {len(records)} rows:[/red] {escape(str(exc))}")
        return EXIT_RUN_FAILED
    except Exception as exc:
        # The documented exit code of a run that failed (3), not Python's 1; the rows written so far are kept.
        err.print(f"[red]The run failed unexpectedly after {len(records)} rows ({escape(failure_summary(exc))}).[/red]")
        return EXIT_RUN_FAILED
    return EXIT_OK


class _Pairing:
    """Holds records until their patient's files have all finished, then adds the fellow-eye answers."""

    def __init__(self, pipeline: GradingPipeline, files: list[Path]) -> None:
        from retinagrade.eyes import eye_from_name

        self._spec = pipeline.spec
        self._left: dict[str | None, int] = {}
        for file in files:
            named = eye_from_name(file.stem)
            patient = named[0] if named else None
            self._left[patient] = self._left.get(patient, 0) + 1
        self._held: dict[str | None, list[tuple[Path, ResultRecord, RawOutputs | None]]] = {}

    def add(self, path: Path, record: ResultRecord, outcome: Outcome) -> list[tuple[Path, ResultRecord]]:
        from retinagrade.eyes import eye_from_name

        named = eye_from_name(path.stem)
        patient = named[0] if named else None
        raw = None if isinstance(outcome, RetinagradeError) else outcome.raw
        self._held.setdefault(patient, []).append((path, record, raw))
        self._left[patient] -= 1
        if patient is None or self._left[patient] > 0:
            return []
        return self._pair(self._held.pop(patient))

    def flush(self) -> list[tuple[Path, ResultRecord]]:
        held = [item for items in self._held.values() for item in items]
        self._held.clear()
        return self._pair(held)

    def _pair(self, held: list[tuple[Path, ResultRecord, RawOutputs | None]]) -> list[tuple[Path, ResultRecord]]:
        from retinagrade.eyes import paired_answers
        from retinagrade.report import with_pairing

        items = []
        for index, (_, record, raw) in enumerate(held):
            patient, eye = patient_and_eye(record)
            items.append((index, (patient, eye) if patient is not None and eye is not None else None, raw))
        answers = paired_answers(items, self._spec)
        out = []
        for index, (path, record, _) in enumerate(held):
            answer = answers.get(index)
            fellows = [held[cast(int, k)][1].image for k in answer.fellows] if answer else []
            out.append((path, with_pairing(record, answer, fellows)))
        return out


def patient_and_eye(record: ResultRecord) -> tuple[str | None, Eye | None]:
    """Whose eye an image is: the DICOM header's Patient ID and laterality, else the file name
    (:func:`retinagrade.eyes.eye_from_name`: ``PATIENT_left``, ``_R``, ``_OD``, ``_OS``...)."""
    from retinagrade.eyes import eye_from_name

    meta = record.metadata
    patient = meta.get("PatientID") or None
    eye: Eye | None = {"L": "left", "R": "right"}.get(meta.get("ImageLaterality", ""))  # type: ignore[assignment]
    named = eye_from_name(Path(record.image).stem)
    if named is not None:
        patient = patient or named[0]
        eye = eye or named[1]
    return patient, eye


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


@app.command()
def evaluate(
    data: Annotated[list[Path], typer.Option(help="Label CSV(s): image,grade / EyePACS / APTOS layouts.")] = [],  # noqa: B006
    predictions: Annotated[
        Path | None, typer.Option(help="Score an out-of-fold predictions CSV from training instead.")
    ] = None,
    model: ModelOption = None,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and metrics.md.")] = Path("reports/evaluation"),
    workers: int = 2,
    threads: int = 2,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for confidence intervals.")] = 1000,
) -> None:
    """QWK, accuracy, per-grade recall, confusion matrix, referable AUC/sensitivity/specificity with CIs, ECE."""
    try:
        from retinagrade.training.evaluate import evaluate_model, evaluate_oof
    except ImportError as exc:
        err.print(f"[red]evaluate needs the [train] extra (pip install 'retinagrade[train]'): {exc}[/red]")
        raise typer.Exit(2) from None

    if predictions is not None:
        result = evaluate_oof(predictions, out, n_boot=bootstrap)
    elif data:
        result = evaluate_model(data, model, out, workers=workers, threads=threads, n_boot=bootstrap)
    else:
        err.print("[red]Give --data label files or --predictions.[/red]")
        raise typer.Exit(2)
    Console().print(result["markdown"])
    err.print(f"Wrote {out}/metrics.json and {out}/metrics.md")


@app.command()
def train(
    labels: Annotated[list[Path] | None, typer.Option(help="Label CSV(s) to train on (any supported layout).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML/JSON training config (TrainConfig fields); options given here win.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for model, spec, config and reports.")] = None,
    arch: Annotated[str | None, typer.Option(help="Backbone (see the backbone registry).")] = None,
    input_size: int | None = None,
    frozen_stages: Annotated[
        int | None, typer.Option(help="Stages frozen (and cached) on CPU; 0 trains everything.")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Augment on the fly (GPU); no feature cache.")] = False,
    cache_stages: Annotated[
        int | None, typer.Option(help="Stages the cached stem runs; frozen stages beyond run once on the cache.")
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this exported model (ONNX or spec) instead of ImageNet.")
    ] = None,
    heads_only: Annotated[
        bool, typer.Option("--heads-only", help="Train only the linear heads on cached embeddings.")
    ] = False,
    views: Annotated[int | None, typer.Option(help="Cached views augmented on the prepared image.")] = None,
    artefact_views: Annotated[
        int | None, typer.Option(help="Cached views with camera artefacts applied to the raw photo.")
    ] = None,
    train_views: Annotated[str | None, typer.Option(help="Views training draws: all, standard or artefact.")] = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation folds; 0 or 1 skips CV.")] = None,
    seed: int | None = None,
    device: str | None = None,
    threads: int | None = None,
    pretrained_weights: Annotated[str | None, typer.Option(help="timm-layout state dict (e.g. B3 weights).")] = None,
    cache_dir: Path | None = None,
    no_final: Annotated[bool, typer.Option("--no-final", help="Evaluate only; no final fit and export.")] = False,
    cross_source: Annotated[bool, typer.Option(help="Also train on each source alone and test on the others.")] = False,
    oversample: Annotated[
        list[str] | None, typer.Option(help="SOURCE=K: sample a source's images K times as often.")
    ] = None,
    source_balance: Annotated[
        float | None, typer.Option(help="0 uniform over images .. 1 every source an equal share of each epoch.")
    ] = None,
    loso: Annotated[
        list[str] | None, typer.Option(help="Hold out this source (repeatable): leave-one-source-out evaluation.")
    ] = None,
    min_sensitivity: Annotated[float | None, typer.Option(help="Sensitivity target of the operating point.")] = None,
    dme_fold: Annotated[
        list[int] | None,
        typer.Option(help="Run only this DME cross-validation fold (repeatable): no CV, LOSO or final fit."),
    ] = None,
    cache_only: Annotated[
        bool, typer.Option("--cache-only", help="Build the prepared-image and feature caches, then stop.")
    ] = False,
    set_field: Annotated[
        list[str] | None,
        typer.Option("--set", help="FIELD=VALUE (YAML) for any training config field, e.g. --set flip_tta=true."),
    ] = None,
) -> None:
    """Cross-validate and/or leave sources out, calibrate and choose the operating point on held-out predictions,
    train on all data, export ONNX. Runs under ``torchrun`` as DistributedDataParallel (rank 0 writes)."""
    from retinagrade.training.train import TrainConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    given: dict[str, object] = {
        "labels": [str(p) for p in labels] if labels else None,
        "out_dir": str(out) if out is not None else None,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "arch": arch,
        "input_size": input_size,
        "frozen_stages": frozen_stages,
        "cache_features": False if no_cache else None,
        "cache_stages": cache_stages,
        "init_from": str(init_from) if init_from is not None else None,
        "heads_only": True if heads_only else None,
        "views": views,
        "artefact_views": artefact_views,
        "train_views": train_views,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "folds": folds,
        "seed": seed,
        "device": device,
        "threads": threads,
        "pretrained_weights": pretrained_weights,
        "train_final": False if no_final else None,
        "cross_source": True if cross_source else None,
        "oversample": {name: int(k) for name, k in (item.split("=", 1) for item in oversample)} if oversample else None,
        "source_balance": source_balance,
        "loso": list(loso) if loso else None,
        "min_sensitivity": min_sensitivity,
        "run_dme_folds": list(dme_fold) if dme_fold else None,
    }
    if dme_fold or cache_only:
        # One DME fold (one process each, like --loso SOURCE) or only the caches: nothing else runs.
        given.update({"folds": 0, "loso": [], "train_final": False})
    elif loso:
        # --loso SOURCE is one held-out fit (one process each): the config's DME folds are their own jobs.
        given["dme_folds"] = 0
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        overrides.update(_config_settings(set_field or []))
        cfg = TrainConfig.from_file(config, **overrides) if config is not None else TrainConfig(**overrides)  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError) as exc:
        err.print(f"[red]bad training config: {exc}[/red]")
        raise typer.Exit(2) from exc
    if not cfg.labels:
        err.print("[red]no label files: pass --labels or a --config that lists them[/red]")
        raise typer.Exit(2)
    if cache_only:
        cfg.dme_folds = 0
    summary = run(cfg)
    err.print(json.dumps({"decision": summary.get("decision")}, indent=2, default=float))


@app.command("loso-report")
def loso_report_command(
    runs: Annotated[list[Path], typer.Argument(help="LOSO run folders (train --loso SOURCE --no-final) to join.")],
    out: Annotated[Path, typer.Option(help="Folder for loso.json, loso.md and loso_predictions.csv.")] = Path(
        "runs/loso"
    ),
    write_spec: Annotated[
        Path | None,
        typer.Option(help="Write the fitted decision layer into this model spec (its ONNX file stays as it is)."),
    ] = None,
) -> None:
    """Join separate leave-one-source-out runs, fit the decision layer on them and report every source.

    Runs that hold out the same source are averaged (an ensemble of their tails). With ``--write-spec`` the
    spec's temperature, grade rule, operating points and fellow-eye rule are replaced by the fitted ones.
    """
    from retinagrade.training.loso_runs import report_runs, write_layer_into_spec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = report_runs(runs, out)
    except (OSError, ValueError, KeyError) as exc:
        err.print(f"[red]cannot join the LOSO runs: {exc}[/red]")
        raise typer.Exit(2) from exc
    err.print(f"wrote {out / 'loso.md'}")
    if write_spec is not None:
        spec = write_layer_into_spec(write_spec, report, out / "loso_predictions.csv")
        err.print(f"wrote the decision layer into {write_spec} (default operating point {spec.operating_point})")


def _config_settings(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs (values read as YAML) for a training config; unknown fields are refused."""
    import yaml

    from retinagrade.training.train import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with a training config field")
        settings[name.strip()] = yaml.safe_load(value)
    return settings


@app.command("ensemble-loso")
def ensemble_loso(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or their loso_logits.npz) of the same inputs.")],
    out: Annotated[Path, typer.Option(help="Folder for the averaged loso_logits.npz and ensemble.json.")],
) -> None:
    """Score an ensemble on leave-one-source-out without a new fit: average the runs' held-out logits (each image
    over the runs that held it out) and give the referable AUC per held-out source, ensemble and members."""
    import numpy as np

    from retinagrade.training.ensemble import average_held_out, referable_auc_by_source

    try:
        members = {str(r): referable_auc_by_source(average_held_out([r])) for r in runs}
        arrays = average_held_out(list(runs))
        combined = referable_auc_by_source(arrays)
    except (OSError, KeyError, ValueError) as exc:
        err.print(f"[red]Cannot average the held-out logits:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = dict(arrays)
    np.savez(out / "loso_logits.npz", **saved)
    report = {"runs": [str(r) for r in runs], "ensemble": combined, "members": members}
    (out / "ensemble.json").write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report, indent=2))


@app.command("fellow-eye")
def fellow_eye_command(
    predictions: Annotated[
        Path, typer.Argument(help="Held-out predictions: loso_predictions.csv of a train run, or the benchmark's.")
    ],
    model: Annotated[
        Path | None, typer.Option(help="Spec whose temperature the probabilities use (default: the run's spec).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write fellow_eye.json and fellow_eye.md here.")] = None,
    min_sensitivity: Annotated[float, typer.Option(help="Sensitivity target of the fused operating point.")] = 0.90,
    write_spec: Annotated[
        bool, typer.Option(help="Write the chosen rule (or its absence) into --model's spec (a train run's spec).")
    ] = False,
) -> None:
    """Measure fellow-eye fusion on held-out predictions (image- and patient-level AUC per source, weight chosen
    leave-one-source-out); with --write-spec, set the spec's fellow-eye rule as ``retinagrade train`` does."""
    import json

    from retinagrade.inference.model_spec import ModelSpec
    from retinagrade.training import fellow_eye

    spec_path = model or predictions.parent / "retinagrade-dr.json"
    try:
        spec = ModelSpec.load(spec_path, verify_checksum=False)
        paired = fellow_eye.Paired.read(predictions)
    except (RetinagradeError, OSError, KeyError, ValueError) as exc:
        err.print(f"[red]Cannot read the predictions or the spec:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    report = fellow_eye.measure(paired, spec.temperature)
    sys.stdout.write(fellow_eye.format_markdown(report))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fellow_eye.json").write_text(json.dumps(report, indent=2, default=float))
        (out / "fellow_eye.md").write_text(fellow_eye.format_markdown(report))
    if write_spec:
        calib = list((spec.raw.get("training", {}).get("config", {}) or {}).get("calibration_sources") or [])
        rule = fellow_eye.choose_rule(paired, spec.temperature, calib, min_sensitivity)
        data = spec.to_dict()
        if rule is None:
            data.pop("fellow_eye", None)
        else:
            data["fellow_eye"] = rule
        spec_path.write_text(json.dumps(data, indent=2, default=float) + "\n")
        err.print(f"fellow-eye rule: {'none (fusion did not raise held-out AUC)' if rule is None else rule['weight']}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A training run folder (holds final.pt and train_config.json).")],
    out: Annotated[
        Path, typer.Option(help="Folder to write <name>.onnx, <name>.json, gate.json and README.md.")
    ] = Path("models"),
    gate: Annotated[Path, typer.Option(help="Quality-gate parameters to ship beside the model.")] = Path(
        "models/gate.json"
    ),
    parity_image: Annotated[list[Path], typer.Option(help="Real photos for the ONNX-vs-PyTorch check.")] = [],  # noqa: B006
    with_run: Annotated[
        list[Path] | None, typer.Option(help="Another run of the same frozen stem: its tail joins an ensemble.")
    ] = None,
) -> None:
    """Export a trained run to ONNX with its spec, check ONNX-vs-PyTorch parity, install it and write the card."""
    from retinagrade.training.export import export_run

    try:
        report = export_run(run_dir, out, gate, parity_images=parity_image, with_runs=with_run)
    except ValueError as exc:
        err.print(f"[red]Cannot export:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    Console().print_json(json.dumps(report))


def _local_sample(labels: list[Path]) -> list[Any]:
    """The labelled photos of the label files (image,grade CSV, or the EyePACS / APTOS layouts)."""
    from retinagrade.training.data import read_labels

    try:
        return [sample for path in labels for sample in read_labels(path)]
    except (OSError, ValueError) as exc:
        err.print(f"[red]Cannot read the labels:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None


def _grade_sample(pipeline: GradingPipeline, samples: list[Any], workers: int) -> tuple[list[Any], float]:
    """Every labelled photo's outcome, in order, through the batch engine, with a progress bar."""
    import time

    start = time.perf_counter()
    outcomes: list[Any] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("grading", total=len(samples))
        for _, outcome in pipeline.grade_paths([s.path for s in samples], workers=workers):
            outcomes.append(outcome)
            progress.advance(task)
    return outcomes, time.perf_counter() - start


def _with_site(
    pipeline: GradingPipeline, site: Path, writer: ResultWriter | None = None, output: Path | None = None
) -> tuple[GradingPipeline, SiteProfile]:
    """The pipeline read with the site profile's operating point; a profile for another model stops the run."""
    from retinagrade.inference.site_profile import SiteProfile

    try:
        profile = SiteProfile.load(site)
        return pipeline.with_spec(profile.apply(pipeline.spec)), profile
    except RetinagradeError as exc:
        err.print(f"[red]Cannot use the site profile:[/red] {escape(exc.message)}")
        if writer is not None and output is not None:
            writer.close()
            output.unlink(missing_ok=True)  # created a moment ago, and holds only a header
        raise typer.Exit(EXIT_RUN_FAILED) from None


def _site_pipeline(model: Path | None, threads: int, site: Path | None) -> tuple[GradingPipeline, SiteProfile | None]:
    """The pipeline, with the site profile's operating point applied when one is given."""
    pipeline = _load_pipeline(model, threads, None, None)
    if site is None:
        return pipeline, None
    return _with_site(pipeline, site)


@app.command()
def validate(
    labels: Annotated[
        list[Path], typer.Option(help="Label CSV(s): image,grade (paths relative to the CSV), EyePACS or APTOS.")
    ],
    out: Annotated[Path, typer.Option(help="Report folder (report.md, report.html, PNGs, metrics.json).")] = Path(
        "report"
    ),
    site: SiteOption = None,
    operating_point: OperatingPointOption = None,
    model: ModelOption = None,
    workers: Annotated[int, typer.Option(help="Threads preparing images.")] = 2,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads.")] = 2,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the kappa and AUC intervals.")] = 1000,
) -> None:
    """Grade locally labelled photos and write a report: sensitivity, specificity, QWK, AUC, pictures."""
    try:
        from retinagrade.training.validate_report import write_validation_report
    except ImportError as exc:
        err.print(f"[red]validate needs the [site] extra (pip install 'retinagrade[site]'): {exc}[/red]")
        raise typer.Exit(2) from None
    samples = _local_sample(labels)
    pipeline, profile = _site_pipeline(model, threads, site)
    try:
        pipeline = pipeline.at_operating_point(operating_point)
    except RetinagradeError as exc:
        err.print(f"[red]{escape(exc.message)}[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    outcomes, grading_s = _grade_sample(pipeline, samples, workers)
    try:
        report = write_validation_report(
            samples,
            outcomes,
            pipeline.spec,
            out,
            site=profile,
            labels=labels,
            n_boot=bootstrap,
            grading_seconds=grading_s,
        )
    except ValueError as exc:
        err.print(f"[red]No report:[/red] {exc}")
        raise typer.Exit(1) from None
    from retinagrade.training.report import format_estimate

    referable = report.metrics["referable"]
    Console().print(
        f"Site profile: {profile.name if profile else 'none (global operating point)'}\n"
        f"Sensitivity {format_estimate(referable['sensitivity'])}, specificity "
        f"{format_estimate(referable['specificity'])}, referable AUC {format_estimate(referable['auc'])}, "
        f"QWK {format_estimate(report.metrics['qwk'])}"
    )
    err.print(
        f"Graded {len(samples)} photos in {grading_s:.1f} s, report in {report.seconds:.1f} s: "
        f"{report.files['html']}, {report.files['markdown']}"
    )


@app.command()
def calibrate(
    labels: Annotated[list[Path], typer.Option(help="Label CSV(s) of locally graded photos (any supported layout).")],
    out: Annotated[Path, typer.Option(help="Site profile to write (.json).")] = Path("site.json"),
    min_sensitivity: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Sensitivity target of the site's threshold (point estimate).")
    ] = 0.90,
    conservative: Annotated[
        bool,
        typer.Option(
            "--conservative",
            help="Hold the LOWER 95% confidence limit of sensitivity to the target (refers many more healthy eyes).",
        ),
    ] = False,
    name: Annotated[str | None, typer.Option(help="Site name (default: the label file's folder name).")] = None,
    model: ModelOption = None,
    workers: Annotated[int, typer.Option(help="Threads preparing images.")] = 2,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads.")] = 2,
    folds: Annotated[int, typer.Option(min=2, max=20, help="Cross-validation folds within the sample.")] = 5,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the kappa and AUC intervals.")] = 1000,
) -> None:
    """Fit the site's temperature, referable threshold and cut-points on local photos; write a site profile."""

    try:
        from retinagrade.training.calibrate import calibrate_site, summary_rows
        from retinagrade.training.validate_report import graded_arrays, observation
    except ImportError as exc:
        err.print(f"[red]calibrate needs the [site] extra (pip install 'retinagrade[site]'): {exc}[/red]")
        raise typer.Exit(2) from None
    site_name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", labels[0].resolve().parent.name).strip("-._") or "site"
    samples = _local_sample(labels)
    pipeline, _ = _site_pipeline(model, threads, None)
    outcomes, _ = _grade_sample(pipeline, samples, workers)
    arrays = graded_arrays(samples, outcomes)
    try:
        profile = calibrate_site(
            arrays.grades,
            arrays.probs,
            arrays.groups,
            pipeline.spec,
            name=site_name,
            reported_grades=arrays.reported,
            observations=[o for o in map(observation, outcomes) if o is not None],
            n_images=len(samples),
            min_sensitivity=min_sensitivity,
            conservative=conservative,
            n_folds=folds,
            n_boot=bootstrap,
        )
    except RetinagradeError as exc:
        err.print(f"[red]Cannot calibrate:[/red] {exc.message}")
        raise typer.Exit(2) from None
    profile.save(out)
    from rich.table import Table

    table = Table("", "model's operating point", "site profile (cross-validated)", title=f"site {profile.name}")
    for row in summary_rows(profile):
        table.add_row(*row)
    Console().print(table)
    fit = profile.fit["referable_threshold"]
    err.print(
        f"Threshold {profile.referable_threshold:.3f} ({fit['rule']}): sensitivity on the sample "
        f"{fit['sample_sensitivity']:.3f} (95% CI {fit['sample_sensitivity_lower_bound']:.3f}-"
        f"{fit['sample_sensitivity_upper_bound']:.3f}); grade rule: {profile.fit['grade_rule']['used']}."
    )
    for warning in profile.fit.get("warnings", []):
        err.print(f"[yellow]Warning: {warning}.[/yellow]")
    if not fit["bound_met"]:
        err.print(
            f"[yellow]The sample cannot show sensitivity >= {min_sensitivity:.2f} "
            + ("at 95% confidence " if conservative else "")
            + f"({profile.sample['n_referable']} referable photos, even when every one is referred). The threshold "
            "refers every referable photo of the sample; grade more referable cases to tighten it.[/yellow]"
        )
    if not 0.06 < profile.temperature < 19.0:
        err.print(
            f"[yellow]The fitted temperature {profile.temperature:.3f} sits at the end of its search range: the "
            "model is (almost) always right or always wrong on these photos. Are they part of its training "
            "data?[/yellow]"
        )
    specificity = (profile.metrics_after.get("referable") or {}).get("specificity") or {}
    if specificity.get("value") is not None and specificity["value"] < 0.5:
        err.print(
            f"[yellow]At this site the model reaches the sensitivity target only by referring most healthy eyes "
            f"(cross-validated specificity {specificity['value']:.2f}): its ranking of this camera's photos is too "
            "weak (see the referable AUC). Do not deploy this model here on this profile alone.[/yellow]"
        )
    err.print(f"Wrote {out}")


@app.command("fit-gate")
def fit_gate(
    data: Annotated[
        Path, typer.Option(envvar="RETINAGRADE_DATA", help="The shared data folder (fundus and non-fundus sets).")
    ] = Path("../shared/data"),
    models: Annotated[Path, typer.Option(help="Folder of the model spec; gate.json and the detector go here.")] = Path(
        "models"
    ),
    spec: Annotated[
        Path, typer.Option(help="Model spec whose preprocessing the gate sees; its gate checksums are updated.")
    ] = Path("models/retinagrade-dr.json"),
    report: Annotated[Path, typer.Option(help="Markdown report of the validation.")] = Path("docs/gate-report.md"),
    cache: Annotated[Path, typer.Option(help="Feature cache folder (git-ignored).")] = Path("runs/gate-cache"),
    keep: Annotated[float, typer.Option(help="Share of Good/Usable photos kept gradable out of fold.")] = 0.97,
    workers: Annotated[int, typer.Option(help="Processes measuring images.")] = 2,
) -> None:
    """Measure every image, fit the not-a-fundus detector and the gradability score, validate, write the gate."""
    from retinagrade.training.gate.build import fit_gate as run_fit_gate

    if not data.is_dir():
        err.print(f"[red]data folder {data} does not exist[/red] (pass --data or set RETINAGRADE_DATA)")
        raise typer.Exit(2)
    command = "retinagrade fit-gate" + (f" --keep {keep}" if keep != 0.97 else "")
    results = run_fit_gate(
        data, models, report, cache, spec=spec, keep=keep, workers=workers, command=command, progress=err.print
    )
    Console().print_json(json.dumps(results["summary"]))


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="RETINAGRADE_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="RETINAGRADE_PORT")] = 8000,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
) -> None:
    """Run the REST service (settings from RETINAGRADE_* environment variables); /metrics on its own port."""
    from retinagrade.api.server import serve as serve_api

    serve_api(host, port, workers)


@app.command()
def dicomweb(
    url: Annotated[str, typer.Option(help="DICOMweb base URL, e.g. http://pacs:8042/dicom-web.")],
    watch: Annotated[
        float | None, typer.Option(help="Run a pass every SECONDS until stopped; default: one pass.")
    ] = None,
    auth: Annotated[
        str | None, typer.Option(envvar="RETINAGRADE_DICOMWEB_AUTH", help="HTTP basic credentials USER:PASSWORD.")
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="RETINAGRADE_DICOMWEB_TOKEN", help="Bearer token.")] = None,
    model: ModelOption = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads.")] = 2,
    retries: Annotated[int, typer.Option(help="Retries per request on network errors and 5xx answers.")] = 4,
    backoff: Annotated[float, typer.Option(help="First retry delay in seconds; doubles each retry.")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each HTTP answer.")] = 60.0,
) -> None:
    """Grade the PACS's Ophthalmic Photography instances that have no retinagrade SR yet and store one SR each.

    Prints one JSON summary per pass. Exits 1 if an instance failed, 4 if the PACS could not be reached.
    """
    try:
        from dicomweb_client.api import DICOMwebClient

        from retinagrade.interop.dicomweb import PacsGrader, PacsUnavailableError, make_session
        from retinagrade.interop.findings import AlgorithmInfo
    except ImportError as exc:
        err.print(f"[red]dicomweb needs the [dicom] extra (pip install 'retinagrade[dicom]'): {exc.name}[/red]")
        raise typer.Exit(2) from None
    from retinagrade.api.logging import silence_identifying_loggers
    from retinagrade.pipeline import GradingPipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The libraries log every request with its UIDs; retinagrade logs its own, shorter lines. pydicom and
    # highdicom quote header values (names, birth dates) even in their warnings: they are silenced.
    for noisy in ("dicomweb_client", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_identifying_loggers()
    try:
        pipeline = GradingPipeline.load(model, threads=threads)
    except RetinagradeError as exc:
        err.print(f"[red]Cannot load the model:[/red] {exc.message}")
        raise typer.Exit(3) from None
    spec = pipeline.spec
    algorithm = AlgorithmInfo(spec.name, spec.version, spec.sha256, str(spec.raw.get("intended_use", "")))
    client = DICOMwebClient(url, session=make_session(auth, token), timeout=timeout)
    grader = PacsGrader(client, pipeline.grade, algorithm, retries=retries, backoff_s=backoff)
    import requests

    try:
        if watch is not None:
            for summary in grader.watch(watch):
                typer.echo(json.dumps(summary.as_dict()))
            return
        summary = grader.run_once()
    except PacsUnavailableError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(4) from None
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no answer"
        err.print(f"[red]The PACS refused the request (HTTP {status}); check --url and --auth.[/red]")
        raise typer.Exit(4) from None
    typer.echo(json.dumps(summary.as_dict()))
    if summary.failed:
        raise typer.Exit(1)


sources_app = typer.Typer(no_args_is_help=True, help="Fetched training sources (see ../shared/data/sources).")
app.add_typer(sources_app, name="sources")


@sources_app.command("prepare")
def sources_prepare(
    name: Annotated[str, typer.Argument(help="mexico-dme, odir-400 or eyepacs-400.")],
    repo: Annotated[Path, typer.Option(help="Checkout of the source's repository at the named commit.")],
    out: Annotated[Path, typer.Option(help="Folder of prepared sources (git-ignored).")] = Path("data/external"),
    labels: Annotated[
        Path | None, typer.Option(help="Label CSV (odir-400, eyepacs-400); default ../shared/data/sources/.")
    ] = None,
    mexico_512: Annotated[
        Path | None, typer.Option(help="mexico-512/labels.csv (mexico-dme); default ../shared/data/mexico-512/.")
    ] = None,
) -> None:
    """Copy a fetched source's named photos into OUT/NAME/images and write its labels.csv and provenance.json."""
    from retinagrade.training.sources import DataSourceError, prepare_source

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = prepare_source(name, repo, out, labels=labels, mexico_512=mexico_512)
    except DataSourceError as exc:
        err.print(f"[red]{exc.message}[/red] ({exc.code})")
        raise typer.Exit(EXIT_USAGE) from None
    typer.echo(json.dumps(report.to_dict(), indent=2))
    err.print(f"Wrote {out / name}/labels.csv: {report.images} images, {report.groups} split groups")


@sources_app.command("list")
def sources_list() -> None:
    """The fetched sources this release can prepare, with repository and commit."""
    from retinagrade.training.sources import EXTERNAL_SOURCES

    for source in EXTERNAL_SOURCES.values():
        typer.echo(f"{source.name}\t{source.repository}@{source.commit}\t{source.what}")


if __name__ == "__main__":
    app()
