"""Site profiles: written and read back, applied to the spec, refused for another model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retinagrade.errors import ModelError, SiteProfileError
from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.inference.postprocess import decide_grade
from retinagrade.inference.site_profile import SiteProfile, load_profiles
from retinagrade.preprocessing.pipeline import PreprocessConfig

SHA = "ab" * 32


def _spec(sha256: str = SHA) -> ModelSpec:
    return ModelSpec(
        name="m",
        version="1",
        model_file="m.onnx",
        sha256=sha256,
        preprocess=PreprocessConfig(),
        temperature=1.0,
        decision=Decision("expected_grade", (0.5, 1.5, 2.5, 3.5)),
        referable_threshold=0.5,
    )


def _profile(**overrides: object) -> SiteProfile:
    values: dict[str, object] = {
        "name": "clinic-a",
        "model_sha256": SHA,
        "created": "2026-12-01",
        "temperature": 2.0,
        "referable_threshold": 0.2,
        "decision_thresholds": (0.7, 1.6, 2.4, 3.3),
        "sample": {"n_graded": 130, "grade_counts": {"0": 80}},
        "metrics_after": {"referable": {"sensitivity": {"value": 0.95}}},
        "drift_reference": {"format": "x", "signals": {}},
    }
    values.update(overrides)
    return SiteProfile(**values)  # type: ignore[arg-type]


def test_profile_survives_a_round_trip_through_its_file(tmp_path: Path) -> None:
    profile = _profile()
    path = profile.save(tmp_path / "site.json")
    loaded = SiteProfile.load(path)
    assert loaded.path == path
    assert loaded.to_dict() == profile.to_dict()
    assert json.loads(path.read_text())["model"]["sha256"] == SHA


def test_apply_replaces_only_the_operating_point() -> None:
    spec = _spec()
    applied = _profile().apply(spec)
    assert applied.temperature == 2.0 and applied.referable_threshold == 0.2
    assert applied.decision.thresholds == (0.7, 1.6, 2.4, 3.3) and applied.decision.rule == "expected_grade"
    assert (applied.name, applied.sha256, applied.preprocess) == (spec.name, spec.sha256, spec.preprocess)
    assert spec.referable_threshold == 0.5  # the original is untouched
    # Without fitted cut-points the model's stay.
    assert _profile(decision_thresholds=None).apply(spec).decision == spec.decision


def test_applied_profile_changes_the_referral_decision() -> None:
    logits = np.array([2.0, 0.5, 0.8, 0.0, 0.0])  # P(referable) about 0.28 at T=1
    spec = _spec()
    assert not decide_grade(logits, 0.0, spec).referable
    assert decide_grade(logits, 0.0, _profile().apply(spec)).referable


def test_profile_for_another_model_is_refused() -> None:
    with pytest.raises(SiteProfileError, match="fitted for model") as caught:
        _profile().apply(_spec(sha256="cd" * 32))
    assert isinstance(caught.value, ModelError)  # start-up treats it like a mismatching model


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot be read"),
        ('{"format_version": 99}', "format 99"),
        ('{"format_version": 1, "name": "x"}', "incomplete or malformed"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_broken_profile_files_give_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "site.json"
    path.write_text(content)
    with pytest.raises(SiteProfileError, match=match):
        SiteProfile.load(path)
    with pytest.raises(SiteProfileError, match="does not exist"):
        SiteProfile.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "clinic a"},
        {"name": ""},
        {"temperature": 0.0},
        {"referable_threshold": 1.5},
        {"decision_thresholds": (1.0, 0.5, 2.0, 3.0)},
        {"decision_thresholds": (1.0, 2.0)},
    ],
)
def test_invalid_parameters_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(SiteProfileError):
        _profile(**overrides)


def test_load_profiles_keys_by_name_and_refuses_duplicates(tmp_path: Path) -> None:
    a = _profile().save(tmp_path / "a.json")
    b = _profile(name="clinic-b").save(tmp_path / "b.json")
    assert set(load_profiles([a, b], _spec())) == {"clinic-a", "clinic-b"}
    with pytest.raises(SiteProfileError, match="two site profiles"):
        load_profiles([a, _profile().save(tmp_path / "a2.json")], _spec())
    with pytest.raises(SiteProfileError, match="fitted for model"):
        load_profiles([a], _spec(sha256="00" * 32))


def test_public_card_leaves_out_the_drift_reference() -> None:
    card = _profile().public_card()
    assert card["name"] == "clinic-a" and "drift_reference" not in card
