"""``retinagrade dicomweb``: grade a PACS's fundus photographs over DICOMweb and store an SR for each
(:mod:`retinagrade.interop.dicomweb`, the ``[dicom]`` extra)."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from retinagrade.cli.shared import ModelOption, err
from retinagrade.errors import RetinagradeError


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
    from retinagrade.pipeline import GradingPipeline

    _configure_logging()
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


def _configure_logging() -> None:
    """One INFO line per pass and per instance, from retinagrade alone."""
    from retinagrade.api.logging import silence_identifying_loggers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The libraries log every request with its UIDs; retinagrade logs its own, shorter lines. pydicom and
    # highdicom quote header values (names, birth dates) even in their warnings: they are silenced.
    for noisy in ("dicomweb_client", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_identifying_loggers()
