"""Pieces of the training recipe: partial-label loss, travelling operating point, camera artefacts, sampling."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")

from retinagrade.training.augment import fundus_artefacts  # noqa: E402
from retinagrade.training.decisions import travelling_operating_point  # noqa: E402
from retinagrade.training.train import (  # noqa: E402
    TrainConfig,
    _epoch_draws,
    _loss,
    fit_temperature_partial,
    referable_truth,
)


def test_partial_label_loss_is_cross_entropy_for_exact_grades_and_mass_on_the_range_otherwise() -> None:
    cfg = TrainConfig(label_smoothing=0.0, regression_weight=0.0)
    logits = torch.tensor([[2.0, 0.5, 0.1, -1.0, 0.3], [0.0, 1.0, 1.0, 1.0, -2.0]])
    exact = _loss(logits[:1], torch.zeros(1, 1), torch.tensor([2]), torch.tensor([2]), cfg)
    assert torch.isclose(exact, torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2])))
    ranged = _loss(logits[1:], torch.zeros(1, 1), torch.tensor([1]), torch.tensor([3]), cfg)
    assert torch.isclose(ranged, -torch.log(logits[1].softmax(0)[1:4].sum()))


def test_regression_is_penalised_only_outside_the_range() -> None:
    cfg = TrainConfig(label_smoothing=0.0, regression_weight=1.0)
    logits = torch.zeros(1, 5)
    inside = _loss(logits, torch.tensor([[2.5]]), torch.tensor([1]), torch.tensor([3]), cfg)
    outside = _loss(logits, torch.tensor([[4.0]]), torch.tensor([1]), torch.tensor([3]), cfg)
    ce = -torch.log(torch.tensor(3 / 5))
    assert torch.isclose(inside, ce) and torch.isclose(outside, ce + 0.5)


def test_travelling_threshold_keeps_the_worst_source_at_the_target() -> None:
    rng = np.random.default_rng(0)
    sources = np.array(["a"] * 200 + ["b"] * 200)
    truth = np.concatenate([rng.integers(0, 2, 200), rng.integers(-1, 2, 200)])
    score = np.clip(truth * 0.3 + rng.uniform(0, 0.7, 400) - (sources == "b") * 0.2, 0, 1)
    point = travelling_operating_point(score, truth, sources, 0.9)
    for name in ("a", "b"):
        positives = (sources == name) & (truth == 1)
        assert (score[positives] >= point["threshold"]).mean() >= 0.9
    # and it is the highest such threshold: the source that binds sits exactly at the target
    binding = min(point["per_source_max_threshold"], key=point["per_source_max_threshold"].get)
    positives = (sources == binding) & (truth == 1)
    assert (score[positives] > point["threshold"]).mean() < 0.9


def test_referable_truth_is_unknown_for_a_range_straddling_grade_2() -> None:
    assert referable_truth(np.array([0, 1, 2, 4, 1]), np.array([0, 1, 2, 4, 3])).tolist() == [0, 0, 1, 1, -1]


def test_partial_temperature_matches_plain_nll_on_exact_labels() -> None:
    from retinagrade.training.metrics import fit_temperature

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (300, 5))
    grades = rng.integers(0, 5, 300)
    assert fit_temperature_partial(logits, grades, grades) == pytest.approx(fit_temperature(logits, grades), rel=1e-3)


def test_camera_artefacts_keep_shape_and_are_reproducible() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    a = fundus_artefacts(photo, np.random.default_rng(5))
    b = fundus_artefacts(photo, np.random.default_rng(5))
    assert a.shape == photo.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    changed = [not np.array_equal(fundus_artefacts(photo, np.random.default_rng(s)), photo) for s in range(20)]
    assert sum(changed) >= 15


def test_source_balance_equalises_the_share_of_each_source() -> None:
    sources = ["big"] * 900 + ["small"] * 100
    cfg = TrainConfig(source_balance=1.0)
    draws = _epoch_draws(cfg, np.arange(1000), sources, np.random.default_rng(0))
    share = np.mean([sources[i] == "small" for i in draws])
    assert len(draws) == 1000 and 0.45 < share < 0.55
    uniform = _epoch_draws(TrainConfig(), np.arange(1000), sources, np.random.default_rng(0))
    assert sorted(uniform.tolist()) == list(range(1000))
