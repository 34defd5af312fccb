"""Drift watch: PSI, references, the rolling window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retinagrade.monitoring.drift import (
    PSI_ALERT,
    DriftMonitor,
    Observation,
    build_reference,
    parse_reference,
    population_stability_index,
)


def _observations(rng: np.random.Generator, n: int, quality_mean: float = 0.8, ungradable: float = 0.1) -> list:
    items = []
    for _ in range(n):
        quality = float(np.clip(rng.normal(quality_mean, 0.08), 0, 1))
        if rng.random() < ungradable:
            items.append(Observation("ungradable", quality))
            continue
        p = float(rng.beta(1.5, 4.0))
        items.append(Observation("graded", quality, p, int(min(4, p * 5))))
    return items


def test_psi_is_zero_for_equal_distributions_and_grows_with_the_shift() -> None:
    reference = np.array([0.25, 0.25, 0.25, 0.25])
    assert population_stability_index(np.array([10, 10, 10, 10]), reference) == pytest.approx(0.0)
    small = population_stability_index(np.array([12, 10, 10, 8]), reference)
    large = population_stability_index(np.array([30, 5, 3, 2]), reference)
    assert 0 < small < 0.1 < PSI_ALERT < large
    # An empty bin costs a bounded amount thanks to the floor.
    assert math.isfinite(population_stability_index(np.array([0, 20, 10, 10]), reference))
    assert math.isnan(population_stability_index(np.zeros(4), reference))
    with pytest.raises(ValueError, match="different bins"):
        population_stability_index(np.ones(3), reference)


def test_reference_round_trips_and_covers_every_signal() -> None:
    document = build_reference(_observations(np.random.default_rng(0), 400))
    references = parse_reference(document)
    assert set(references) == {"p_referable", "quality", "ungradable", "not_fundus", "grade"}
    quality = references["quality"]
    assert quality.kind == "continuous" and len(quality.edges) == len(quality.fractions) - 1 == 9
    assert sum(quality.fractions) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="format"):
        parse_reference({"format": "other", "signals": {}})


def test_a_small_reference_gets_fewer_bins() -> None:
    document = build_reference(_observations(np.random.default_rng(0), 100))
    assert len(document["signals"]["quality"]["fractions"]) == 5


def test_window_like_the_reference_stays_quiet_and_a_shift_raises_the_psi() -> None:
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(build_reference(_observations(rng, 300)), window=300, min_count=100)
    monitor.extend(_observations(rng, 300))
    quiet = monitor.psi()
    assert max(quiet.values()) < 0.1, quiet
    # Another camera: lower quality scores and more ungradable photos. The window forgets the old images.
    monitor.extend(_observations(rng, 300, quality_mean=0.55, ungradable=0.35))
    shifted = monitor.psi()
    assert len(monitor) == 300
    assert shifted["quality"] > PSI_ALERT and shifted["ungradable"] > 0.1, shifted
    assert shifted["p_referable"] < 0.1  # the graded images' scores did not move


def test_too_few_images_give_no_psi() -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(build_reference(_observations(rng, 300)), min_count=100)
    monitor.extend(_observations(rng, 50))
    assert all(math.isnan(v) for v in monitor.psi().values())
    with pytest.raises(ValueError):
        DriftMonitor(build_reference(_observations(rng, 300)), window=0)
