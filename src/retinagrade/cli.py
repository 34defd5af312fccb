"""The ``retinagrade`` command line: grade, evaluate, train, export, serve."""

from __future__ import annotations

import csv
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from retinagrade.constants import IMAGE_SUFFIXES, NUM_GRADES
from retinagrade.errors import InputError, RetinagradeError

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


CSV_COLUMNS = [
    "image",
    "status",
    "grade",
    "grade_name",
    "referable",
    "confidence",
    *[f"p{k}" for k in range(NUM_GRADES)],
    "quality",
]

ModelOption = Annotated[
    Path | None,
    typer.Option(envvar="RETINAGRADE_MODEL", help="Model spec (.json) or ONNX file; default: the shipped model."),
]


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, and image files found recursively in folders, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found


def _row(image: str, result: Any) -> dict[str, Any]:
    """One output record; ``result`` is a GradeResult or an exception."""
    from retinagrade.pipeline import GradeResult

    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
    row["image"] = image
    if not isinstance(result, GradeResult):
        row.update(status="error", referable="false")
        code = result.code if isinstance(result, RetinagradeError) else "read_error"
        message = result.message if isinstance(result, RetinagradeError) else str(result)
        row["error"] = {"code": code, "message": message}
        return row
    row["status"] = result.status
    row["quality"] = round(result.quality.score, 4)
    row["quality_reasons"] = list(result.quality.reasons)
    decision = result.decision
    if decision is None:
        row["referable"] = "false"
        return row
    row.update(
        grade=decision.grade,
        grade_name=decision.grade_name,
        referable=str(decision.referable).lower(),
        confidence=round(decision.confidence, 4),
    )
    for k, p in enumerate(decision.probabilities):
        row[f"p{k}"] = round(p, 4)
    return row


def _write(rows: list[dict[str, Any]], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".json":
        output.write_text(json.dumps(rows, indent=2))
        return
    with output.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _read(path: Path) -> bytes | Exception:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


def grade_files(
    pipeline: Any, files: list[Path], workers: int, chunk: int = 8, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Grade files with ``workers`` threads preparing images while the model runs batches."""
    rows: list[dict[str, Any]] = []
    task = progress.add_task("grading", total=len(files)) if progress else None

    def prep(path: Path) -> Any:
        data = _read(path)
        if isinstance(data, Exception):
            return data
        try:
            return pipeline.prepare(data)
        except InputError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
        pending = pool.map(prep, chunks[0]) if chunks else iter(())
        for n, part in enumerate(chunks):
            prepared = list(pending)
            if n + 1 < len(chunks):
                pending = pool.map(prep, chunks[n + 1])
            good = [p for p in prepared if not isinstance(p, Exception)]
            outputs = iter(pipeline.infer(good))
            for path, item in zip(part, prepared, strict=True):
                result = item if isinstance(item, Exception) else pipeline.finish(item, next(outputs))
                rows.append(_row(str(path), result))
            if progress is not None and task is not None:
                progress.advance(task, len(part))
    return rows


@app.command()
def grade(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write results to .csv or .json.")] = None,
    model: ModelOption = None,
    workers: Annotated[int, typer.Option(help="Threads preparing images.")] = 2,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads.")] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
) -> None:
    """Grade fundus photographs. Exits 1 if any file could not be read or decoded."""
    from retinagrade.pipeline import GradingPipeline

    files = collect_images(paths)
    if not files:
        err.print("[red]No image files found.[/red]")
        raise typer.Exit(2)
    try:
        pipeline = GradingPipeline.load(model, threads=threads)
    except RetinagradeError as exc:
        err.print(f"[red]Cannot load the model:[/red] {exc.message}")
        raise typer.Exit(3) from None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=quiet) as progress:
        rows = grade_files(pipeline, files, workers, progress=progress)
    if output is not None:
        _write(rows, output)
    if not quiet or output is None:
        from rich.table import Table

        table = Table("image", "status", "grade", "referable", "confidence", "quality", "note")
        for r in rows:
            note = (
                r.get("error", {}).get("message", "")
                if r["status"] == "error"
                else ", ".join(r.get("quality_reasons", []))
            )
            table.add_row(
                Path(r["image"]).name,
                r["status"],
                f"{r['grade']} {r['grade_name']}".strip(),
                r["referable"],
                str(r["confidence"]),
                str(r["quality"]),
                note,
            )
        Console(file=sys.stdout if output is None else sys.stderr).print(table)
    failed = sum(r["status"] == "error" for r in rows)
    if failed:
        err.print(f"[yellow]{failed} of {len(rows)} files could not be graded (status error).[/yellow]")
        raise typer.Exit(1)


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
    labels: Annotated[list[Path], typer.Option(help="Label CSV(s) to train on (any supported layout).")],
    out: Annotated[Path, typer.Option(help="Run folder for model, spec, config and reports.")] = Path("runs/latest"),
    arch: str = "tf_efficientnet_lite0",
    input_size: int = 224,
    frozen_stages: Annotated[int, typer.Option(help="Stages frozen (and cached) on CPU; 0 trains everything.")] = 6,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Augment on the fly (GPU); no feature cache.")] = False,
    views: int = 8,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 1e-3,
    folds: int = 5,
    seed: int = 0,
    device: str = "cpu",
    threads: int = 2,
    pretrained_weights: Annotated[str | None, typer.Option(help="timm-layout state dict (e.g. B3 weights).")] = None,
    cache_dir: Path = Path("cache"),
    no_final: Annotated[bool, typer.Option("--no-final", help="Cross-validate only.")] = False,
    source_ablation: Annotated[bool, typer.Option(help="Also cross-validate with each source alone.")] = False,
    cross_source: Annotated[bool, typer.Option(help="Also train on each source alone and test on the others.")] = False,
    oversample: Annotated[list[str], typer.Option(help="SOURCE=K: sample a source's images K times as often.")] = [],  # noqa: B006
) -> None:
    """Cross-validate, calibrate and choose the operating point out of fold, train on all data, export ONNX."""
    from retinagrade.training.train import TrainConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = TrainConfig(
        labels=[str(p) for p in labels],
        out_dir=str(out),
        cache_dir=str(cache_dir),
        arch=arch,
        input_size=input_size,
        frozen_stages=frozen_stages,
        cache_features=not no_cache,
        views=views,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        folds=folds,
        seed=seed,
        device=device,
        threads=threads,
        pretrained_weights=pretrained_weights,
        train_final=not no_final,
        source_ablation=source_ablation,
        cross_source=cross_source,
        oversample={name: int(k) for name, k in (item.split("=", 1) for item in oversample)},
    )
    summary = run(cfg)
    cv = summary.get("cv", {})
    err.print(json.dumps({k: v for k, v in cv.items() if k == "decision"}, indent=2, default=float))


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
    ood_limit: Annotated[
        float | None, typer.Option(help="Embedding distance above which a photo is refused as unfamiliar.")
    ] = None,
) -> None:
    """Export a trained run to ONNX with its spec, check ONNX-vs-PyTorch parity, install it and write the card."""
    from retinagrade.training.export import export_run

    report = export_run(run_dir, out, gate, parity_images=parity_image, ood_limit=ood_limit)
    Console().print_json(json.dumps(report))


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="RETINAGRADE_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="RETINAGRADE_PORT")] = 8000,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
) -> None:
    """Run the REST service (settings from RETINAGRADE_* environment variables); /metrics on its own port."""
    from retinagrade.api.server import serve as serve_api

    serve_api(host, port, workers)


if __name__ == "__main__":
    app()
