"""Grading in this process (``retinagrade grade``, the local engine): the outputs opened first, then the model,
then every file through the batch engine into the writer as it finishes, closed however the run ends.

Ctrl-C and a scheduler's SIGTERM end a run the same way: every finished row is written and the output closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import typer
from rich.markup import escape

from retinagrade.cli.shared import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    err,
    load_pipeline,
    progress_bar,
    stop_before_grading,
    with_site,
)
from retinagrade.errors import RetinagradeError, failure_summary
from retinagrade.files import collect_images

if TYPE_CHECKING:  # the pipeline (numpy, OpenCV, ONNX Runtime) loads only when a command needs it
    from retinagrade.eyes import RawOutputs
    from retinagrade.inference.site_profile import SiteProfile
    from retinagrade.pipeline import GradingPipeline, Outcome
    from retinagrade.referral import Eye
    from retinagrade.report import ResultRecord, ResultWriter, RunContext


def grade_local(
    paths: list[Path],
    output: Path | None,
    *,
    output_sr: Path | None,
    overwrite: bool,
    model: Path | None,
    workers: int,
    threads: int,
    quiet: bool,
    pair_eyes: bool,
    site: Path | None,
    operating_point: str | None,
) -> tuple[int, list[ResultRecord], list[str]]:
    """Grade the images of ``paths`` into ``output`` (and an SR per DICOM input into ``output_sr``).

    Returns:
        The exit code so far, every record written, and the DICOM files that got no SR.
    """
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
    return code, records, skipped_sr


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
            load_pipeline(model, threads, writer, output), site, operating_point, writer, output, quiet
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
        pipeline, profile = with_site(pipeline, site, writer, output)
        if not quiet:
            err.print(f"Site profile: {profile.name} (referable threshold {profile.referable_threshold:.3f})")
    try:
        pipeline = pipeline.at_operating_point(operating_point)
    except RetinagradeError as exc:
        raise stop_before_grading(f"[red]{escape(exc.message)}[/red]", writer, output, EXIT_USAGE) from None
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

    pairing = _Pairing(pipeline, files) if pair_eyes else None

    def emit(path: Path, record: ResultRecord) -> None:
        if writer is not None:
            writer.write(record)
        if also is not None:
            also(path, record)
        records.append(record)

    try:
        try:
            with progress_bar(quiet) as progress:
                task = progress.add_task("grading", total=len(files))
                # Worker processes pay for their fork from the second image each; fewer are graded in threads.
                outcomes = pipeline.grade_paths(files, workers=workers, processes=len(files) >= 2 * workers)
                # closing(): an interrupt stops the engine's workers here, not at interpreter exit.
                with contextlib.closing(outcomes):
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
    except Exception as exc:
        # The documented exit code of a run that failed (3), not Python's 1; the rows written so far are kept.
        _say_why_the_run_failed(exc, len(records))
        return EXIT_RUN_FAILED
    return EXIT_OK


def _say_why_the_run_failed(exc: Exception, rows: int) -> None:
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(exc, BrokenProcessPool):
        err.print(
            f"[red]A worker process stopped without an answer (killed, or out of memory) after {rows} rows;"
            " the rows written are kept.[/red] Grade the rest again, with fewer --workers if memory is short."
        )
    elif isinstance(exc, OSError):
        err.print(f"[red]Writing the results failed after {rows} rows:[/red] {escape(str(exc))}")
    else:
        err.print(f"[red]The run failed unexpectedly after {rows} rows ({escape(failure_summary(exc))}).[/red]")


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
