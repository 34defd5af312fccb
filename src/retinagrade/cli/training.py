"""The training commands: ``train``, ``loso-report``, ``ensemble-loso``, ``loso-compare``, ``fellow-eye``,
``export`` and ``sources prepare`` / ``sources list``. Each calls :mod:`retinagrade.training` (the ``[train]``
extra), imported when the command runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from retinagrade.cli.shared import EXIT_USAGE, err
from retinagrade.errors import RetinagradeError

if TYPE_CHECKING:
    from retinagrade.training.train import TrainConfig


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
    from retinagrade.training.train import run

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
    cfg = _train_config(given, config, set_field or [], dme_fold, cache_only, loso)
    summary = run(cfg)
    err.print(json.dumps({"decision": summary.get("decision")}, indent=2, default=float))


def _train_config(
    given: dict[str, object],
    config: Path | None,
    set_field: list[str],
    dme_fold: list[int] | None,
    cache_only: bool,
    loso: list[str] | None,
) -> TrainConfig:
    """The training config: the file's (or the defaults), overridden by the options given and by ``--set``."""
    from retinagrade.training.train import TrainConfig

    if dme_fold or cache_only:
        # One DME fold (one process each, like --loso SOURCE) or only the caches: nothing else runs.
        given.update({"folds": 0, "loso": [], "train_final": False})
    elif loso:
        # --loso SOURCE is one held-out fit (one process each): the config's DME folds are their own jobs.
        given["dme_folds"] = 0
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        overrides.update(_config_settings(set_field))
        cfg = TrainConfig.from_file(config, **overrides) if config is not None else TrainConfig(**overrides)  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError) as exc:
        err.print(f"[red]bad training config: {exc}[/red]")
        raise typer.Exit(2) from exc
    if not cfg.labels:
        err.print("[red]no label files: pass --labels or a --config that lists them[/red]")
        raise typer.Exit(2)
    if cache_only:
        cfg.dme_folds = 0
    return cfg


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


def loso_report_command(
    runs: Annotated[list[Path], typer.Argument(help="LOSO run folders (train --loso SOURCE --no-final) to join.")],
    out: Annotated[Path, typer.Option(help="Folder for loso.json, loso.md and loso_predictions.csv.")] = Path(
        "runs/loso"
    ),
    write_spec: Annotated[
        Path | None,
        typer.Option(help="Write the fitted decision layer into this model spec (its ONNX file stays as it is)."),
    ] = None,
    calibration_source: Annotated[
        list[str] | None,
        typer.Option(
            help="A camera source whose held-out predictions set the temperature and operating points "
            "(repeat it; default: the runs' calibration_sources). Every held-out source is reported."
        ),
    ] = None,
) -> None:
    """Join separate leave-one-source-out runs, fit the decision layer on them and report every source.

    Runs that hold out the same source are averaged (an ensemble of their tails). With ``--write-spec`` the
    spec's temperature, grade rule, operating points and fellow-eye rule are replaced by the fitted ones.
    """
    from retinagrade.training.loso_runs import report_runs, write_layer_into_spec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = report_runs(runs, out, calibration_source)
    except (OSError, ValueError, KeyError) as exc:
        err.print(f"[red]cannot join the LOSO runs: {exc}[/red]")
        raise typer.Exit(2) from exc
    err.print(f"wrote {out / 'loso.md'}")
    if write_spec is not None:
        spec = write_layer_into_spec(write_spec, report, out / "loso_predictions.csv")
        err.print(f"wrote the decision layer into {write_spec} (default operating point {spec.operating_point})")


def ensemble_loso(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or their loso_logits.npz) of the same inputs.")],
    out: Annotated[Path, typer.Option(help="Folder for the averaged loso_logits.npz and ensemble.json.")],
) -> None:
    """Score an ensemble on leave-one-source-out without a new fit: average the runs' held-out logits (each image
    over the runs that held it out) and give the referable AUC per held-out source, ensemble and members."""
    from retinagrade.training.ensemble import score_runs, write_scores

    try:
        arrays, report = score_runs(list(runs))
    except (OSError, KeyError, ValueError) as exc:
        err.print(f"[red]Cannot average the held-out logits:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    write_scores(out, arrays, report)
    typer.echo(json.dumps(report, indent=2))


def loso_compare(
    a: Annotated[list[Path], typer.Option("--a", help="Recipe A's LOSO run folders (one per held-out source).")],
    b: Annotated[list[Path], typer.Option("--b", help="Recipe B's LOSO run folders, the baseline.")],
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of patients.")] = 2000,
) -> None:
    """Paired referable-AUC difference of two recipes (A minus B) per held-out source, on the images both held
    out, with a patient-grouped bootstrap interval: is a new recipe better on the sources it never saw?"""
    from retinagrade.training.ensemble import compare_recipes

    try:
        report = compare_recipes(list(a), list(b), n_boot=n_boot)
    except (OSError, KeyError, ValueError) as exc:
        err.print(f"[red]Cannot compare the held-out logits:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    typer.echo(json.dumps(report, indent=2))


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
        fellow_eye.write_report(report, out)
    if write_spec:
        rule = fellow_eye.write_rule_into_spec(spec_path, spec, paired, min_sensitivity)
        err.print(f"fellow-eye rule: {'none (fusion did not raise held-out AUC)' if rule is None else rule['weight']}")


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


def sources_list() -> None:
    """The fetched sources this release can prepare, with repository and commit."""
    from retinagrade.training.sources import EXTERNAL_SOURCES

    for source in EXTERNAL_SOURCES.values():
        typer.echo(f"{source.name}\t{source.repository}@{source.commit}\t{source.what}")
