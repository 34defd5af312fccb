"""The model on locally labelled photos: ``evaluate`` (a labelled set, or training's held-out predictions),
``validate`` (a site's report) and ``calibrate`` (a site's profile). Each grades the photos through the batch
engine and hands the outcomes to :mod:`retinagrade.training` (the ``[site]`` or ``[train]`` extra).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from retinagrade.cli.shared import (
    EXIT_USAGE,
    ModelOption,
    OperatingPointOption,
    SiteOption,
    err,
    load_pipeline,
    progress_bar,
    with_site,
)
from retinagrade.errors import RetinagradeError

if TYPE_CHECKING:
    from retinagrade.inference.site_profile import SiteProfile
    from retinagrade.pipeline import GradingPipeline
    from retinagrade.training.validate_report import ValidationReport


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
    _print_report(report, profile)
    err.print(
        f"Graded {len(samples)} photos in {grading_s:.1f} s, report in {report.seconds:.1f} s: "
        f"{report.files['html']}, {report.files['markdown']}"
    )


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
        from retinagrade.training.calibrate import calibrate_site, profile_warnings
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
    _print_profile(profile)
    for warning in profile_warnings(profile, min_sensitivity, conservative):
        err.print(f"[yellow]{warning}[/yellow]")
    err.print(f"Wrote {out}")


def _print_report(report: ValidationReport, profile: SiteProfile | None) -> None:
    """The report's headline numbers with their intervals (stdout)."""
    from retinagrade.training.report import format_estimate

    referable = report.metrics["referable"]
    Console().print(
        f"Site profile: {profile.name if profile else 'none (global operating point)'}\n"
        f"Sensitivity {format_estimate(referable['sensitivity'])}, specificity "
        f"{format_estimate(referable['specificity'])}, referable AUC {format_estimate(referable['auc'])}, "
        f"QWK {format_estimate(report.metrics['qwk'])}"
    )


def _print_profile(profile: SiteProfile) -> None:
    """The profile's headline numbers against the model's own (stdout), and how its threshold was chosen."""
    from rich.table import Table

    from retinagrade.training.calibrate import summary_rows

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
    with progress_bar() as progress:
        task = progress.add_task("grading", total=len(samples))
        for _, outcome in pipeline.grade_paths([s.path for s in samples], workers=workers):
            outcomes.append(outcome)
            progress.advance(task)
    return outcomes, time.perf_counter() - start


def _site_pipeline(model: Path | None, threads: int, site: Path | None) -> tuple[GradingPipeline, SiteProfile | None]:
    """The pipeline, with the site profile's operating point applied when one is given."""
    pipeline = load_pipeline(model, threads, None, None)
    if site is None:
        return pipeline, None
    return with_site(pipeline, site)
