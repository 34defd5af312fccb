"""The gate's fit and validation code on small synthetic measurements (no images, no backbone: seconds).

The real fit is ``retinagrade fit-gate`` on ../shared/data; this checks that the pieces fit together, that the
validation really holds out what it says it holds out, and that the thresholds follow their definitions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from retinagrade.preprocessing.quality import GateParams
from retinagrade.preprocessing.quality_features import FEATURE_NAMES
from retinagrade.training.gate.fit import (
    MODEL_FEATURES,
    choose_detector_threshold,
    detector_data,
    detector_weights,
    fit,
    fundus_source_groups,
    held_out_logits,
    score_refused,
)
from retinagrade.training.gate.measure import ImageRecord, MeasuredSet
from retinagrade.training.gate.report import evaluate, render_report

D = 6


def _quality(rng: np.random.Generator, n: int, reject: np.ndarray | None = None, diameter: float = 500.0) -> np.ndarray:
    """Fundus-like quality features; Reject photos are blurred (low sharpness)."""
    q = np.full((n, len(FEATURE_NAMES)), 0.5) + rng.normal(0, 0.01, (n, len(FEATURE_NAMES)))
    j = {name: FEATURE_NAMES.index(name) for name in FEATURE_NAMES}
    q[:, j["found"]] = 1.0
    q[:, j["min_side"]] = 500.0
    q[:, j["fundus_diameter"]] = diameter
    q[:, j["corner_dark_fraction"]] = 1.0
    q[:, j["green_fraction"]] = 0.0
    q[:, j["visible_fraction"]] = 0.98
    q[:, j["saturated_fraction"]] = 0.01
    q[:, j["sharpness"]] = 0.38 + rng.normal(0, 0.02, n)
    if reject is not None:
        q[reject, j["sharpness"]] -= 0.1
    return q


def _set(
    rng: np.random.Generator, dataset: str, n: int, label: int, kinds: list[str] | None = None, eyeq: bool = False
) -> MeasuredSet:
    reject = rng.random(n) < 0.2 if eyeq else None
    records = [
        ImageRecord(
            dataset=dataset,
            image=f"images/{dataset}_{i}.jpg",
            label=label,
            kind=(kinds[i % len(kinds)] if kinds else "fundus"),
            source=(f"src-{kinds[i % len(kinds)]}" if kinds else dataset),
            quality=("Reject" if reject is not None and reject[i] else "Good") if eyeq else "",
            patient=f"{dataset}:{i // 2}",
        )
        for i in range(n)
    ]
    views = 2 if label == 1 else 3
    view_image = np.repeat(np.arange(n), views)
    centre = 1.0 if label == 1 else -1.0
    detector = rng.normal(centre, 0.7, (n * views, D)).astype(np.float32)
    quality = _quality(rng, n, reject)
    small = np.arange(n) if eyeq else np.arange(0)
    q224 = quality[small].copy()
    q224[:, FEATURE_NAMES.index("sharpness")] -= 0.06
    q224[:, FEATURE_NAMES.index("fundus_diameter")] = 220.0
    return MeasuredSet(records, quality, q224, small, view_image, np.tile(np.arange(views), n), detector)


@pytest.fixture(scope="module")
def sets() -> dict[str, MeasuredSet]:
    rng = np.random.default_rng(0)
    return {
        "aptos2019-224": _set(rng, "aptos2019-224", 120, 1),
        "eyepacs-eyeq-256": _set(rng, "eyepacs-eyeq-256", 150, 1, eyeq=True),
        "eyepacs-768": _set(rng, "eyepacs-768", 120, 1, eyeq=True),
        "mexico-512": _set(rng, "mexico-512", 110, 1),
        "non-fundus-2": _set(rng, "non-fundus-2", 60, 0, kinds=["oct", "dermoscopy", "portrait"]),
    }


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "fundus-detector.onnx"
    path.write_bytes(b"stand-in: only its checksum is read by the fit")
    return path


def test_weights_make_every_kind_and_every_folder_weigh_the_same(sets: dict[str, MeasuredSet]) -> None:
    data = detector_data(sets)
    w = detector_weights(data, np.ones(len(data.y), bool))
    per_kind = [w[(data.y == 0) & (data.kind == k)].sum() for k in np.unique(data.kind[data.y == 0])]
    per_folder = [w[(data.y == 1) & (data.dataset == d)].sum() for d in np.unique(data.dataset[data.y == 1])]
    assert np.allclose(per_kind, per_kind[0]) and np.allclose(per_folder, per_folder[0])
    assert sum(per_kind) == pytest.approx(sum(per_folder))


def test_held_out_logits_come_from_a_head_that_never_saw_the_group(sets: dict[str, MeasuredSet]) -> None:
    data = detector_data(sets)
    oct_mask = (data.y == 0) & (data.kind == "oct")
    # Move the held-out kind far onto the fundus side: a head that saw it would learn it is negative.
    data.x[oct_mask] = 3.0
    held = held_out_logits(data, {"oct": oct_mask})["oct"]
    assert (held > 0).mean() > 0.9


def test_detector_threshold_respects_the_fundus_refusal_budget(sets: dict[str, MeasuredSet]) -> None:
    data = detector_data(sets)
    logits = np.where(data.y == 1, np.linspace(-2, 6, len(data.y)), np.nan)
    p = choose_detector_threshold(logits, data, 0.01)
    cut = np.log(p / (1 - p))
    sent = (data.aug == 0) & (data.y == 1)
    for name in np.unique(data.dataset[sent]):
        m = sent & (data.dataset == name)
        assert (logits[m] < cut - 1e-9).mean() <= 0.01


def test_fit_evaluate_and_render(sets: dict[str, MeasuredSet], detector_file: Path) -> None:
    fitted = fit(sets, detector_file, keep=0.95)
    params = fitted.params
    assert isinstance(params, GateParams) and params.detector is not None
    assert params.features == MODEL_FEATURES
    assert params.calibration is not None
    # The calibration is the paired drift between the camera photos and their 224 px derivatives.
    assert params.calibration.offset("sharpness", 220.0) == pytest.approx(-0.06, abs=0.005)
    assert set(fundus_source_groups(fitted.detector)) >= {"APTOS", "Mexico"}
    results = evaluate(fitted)
    assert {r["group"] for r in results["loko"]} == {"oct", "dermoscopy", "portrait"}
    assert all(r["n"] == 20 for r in results["loko"])
    assert results["gradability"]["eyeq_auc"] > 0.8
    text = render_report(params, results, "retinagrade fit-gate", 1.0)
    assert "Leave-one-negative-kind-out" in text and "| oct |" in text
    round_trip = GateParams.from_dict(params.to_dict())
    assert round_trip == params


def test_refusals_by_grade_apply_the_override_where_the_model_read_the_photo(
    sets: dict[str, MeasuredSet], detector_file: Path
) -> None:
    fitted = fit(sets, detector_file, keep=0.95)
    # Without hard rules the blurred EyeQ Rejects are refused by the score alone: the refusals the model may outrank.
    fitted.params = replace(fitted.params, ungradable_rules=(), threshold=0.5)
    refused = score_refused(fitted)
    eyeq = [i for name, i in refused if name == "eyepacs-eyeq-256"]
    assert len(eyeq) >= 4
    confident, doubtful = eyeq[: len(eyeq) // 2], eyeq[len(eyeq) // 2 :]
    fitted.p_referable = {("eyepacs-eyeq-256", i): 0.95 for i in confident}
    fitted.p_referable |= {("eyepacs-eyeq-256", i): 0.5 for i in doubtful}
    n = len(sets["eyepacs-eyeq-256"].records)
    grades: dict[str, list[int | None]] = {"eyepacs-eyeq-256": [4 if i in confident else 0 for i in range(n)]}
    results = evaluate(fitted, grades=grades)
    rows = {(r["folder"], r["grade"]): r for r in results["by_grade"]}
    sick, healthy = rows[("eyepacs-eyeq-256", 4)], rows[("eyepacs-eyeq-256", 0)]
    assert (sick["n"], sick["refused_gate"], sick["refused"], sick["warned"]) == (
        len(confident),
        len(confident),
        0,
        len(confident),
    )
    assert healthy["refused"] == healthy["refused_gate"] >= len(doubtful) and healthy["warned"] == 0
    assert rows[("aptos2019-224", None)]["warned"] == 0  # no grades, no model reading: unchanged
    text = render_report(fitted.params, results, "retinagrade fit-gate", 1.0)
    assert "## Refusals by true grade" in text
    assert (
        f"| eyepacs-eyeq-256 | 4 | {len(confident)} | {len(confident)} (100.0 %) | 0 (0.0 %) | {len(confident)} |"
        in text
    )
