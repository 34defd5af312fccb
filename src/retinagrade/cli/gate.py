"""``retinagrade fit-gate``: fit and validate the quality gate (:mod:`retinagrade.training.gate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from retinagrade.cli.shared import err


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
