"""The decision layer fitted on held-out predictions: grade bands, the rule choice, named operating points."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from retinagrade.training.decisions import (
    MIN_BAND_WIDTH,
    POINT_TARGETS,
    band_widths,
    choose_grade_rule,
    choose_operating_point,
    fit_cut_points,
    fit_decision_layer,
    referred,
)
from retinagrade.training.metrics import quadratic_weighted_kappa


def _source(rng: np.random.Generator, n: int, counts: list[float], sharpness: float, bias: float) -> tuple:
    """Grades drawn with these shares, and logits that favour the true grade by ``sharpness``."""
    grades = rng.choice(5, size=n, p=np.array(counts) / sum(counts))
    logits = rng.normal(0, 1, (n, 5))
    logits[np.arange(n), grades] += sharpness
    logits[:, 2:] += bias
    return grades, logits


def test_cut_points_keep_grade_4_recall_and_the_middle_grades_floors() -> None:
    from retinagrade.training.decisions import RECALL_FLOORS

    rng = np.random.default_rng(5)
    grades = np.repeat([0, 1, 2, 3, 4], [800, 150, 300, 60, 90])
    # Proliferative eyes score close to severe ones: the kappa-optimal last cut leaves 28% of them at grade 3.
    score = np.clip(np.where(grades == 4, 3.4, grades) + rng.normal(0, 0.55, len(grades)), 0, 4)
    free = fit_cut_points(score, grades)
    kept = fit_cut_points(score, grades, min_top_recall=0.8, recall_floors=RECALL_FLOORS)

    def recall(cuts: tuple[float, ...], k: int) -> float:
        return float((np.searchsorted(np.array(cuts), score[grades == k], side="right") == k).mean())

    assert recall(free, 4) < 0.75 and recall(kept, 4) >= 0.8 - 1 / 90
    for k, floor in RECALL_FLOORS.items():
        assert recall(kept, k) >= floor - 0.02, (k, recall(kept, k))


def test_each_sources_grade_4_recall_is_kept_within_one_image_and_cuts_round_down() -> None:
    rng = np.random.default_rng(3)
    # source "small": 18 proliferative eyes scored lower than the large source's; pooled, the small one loses most
    grades = np.r_[np.repeat([0, 1, 2, 3, 4], [500, 100, 200, 60, 200]), np.repeat([0, 2, 3, 4], [100, 30, 10, 18])]
    sources = np.array(["large"] * 1060 + ["small"] * 158)
    score = np.clip(grades + rng.normal(0, 0.5, len(grades)) - 0.6 * ((sources == "small") & (grades == 4)), 0, 4)
    top = score[(sources == "small") & (grades == 4)]
    keep = {"large": 0.5, "small": 10 / 18}
    cuts = fit_cut_points(score, grades, top_recall_by_source=(sources, keep))
    assert (top >= cuts[-1]).sum() >= 10 - 1
    assert cuts[-1] == round(cuts[-1], 4)


def test_cut_points_keep_every_band_at_least_the_set_width() -> None:
    # Grade 2 is rare and its scores overlap grade 1's: free cut-points squeeze its band to almost nothing.
    rng = np.random.default_rng(0)
    grades = np.repeat([0, 1, 2, 3, 4], [600, 200, 30, 80, 90])
    score = np.clip(grades + rng.normal(0, 0.6, len(grades)) - (grades == 2) * 0.7, 0, 4)
    cuts = fit_cut_points(score, grades, MIN_BAND_WIDTH)
    assert all(b > a for a, b in itertools.pairwise(cuts))
    assert min(band_widths(cuts)) >= MIN_BAND_WIDTH - 1e-9
    # ...and they do at least as well as plain rounding of the score
    rounded = quadratic_weighted_kappa(grades, np.clip(np.rint(score), 0, 4).astype(int))
    assert quadratic_weighted_kappa(grades, np.searchsorted(np.array(cuts), score, side="right")) >= rounded


def test_the_cut_point_rule_is_kept_only_if_it_wins_on_every_source() -> None:
    rng = np.random.default_rng(1)
    ga, la = _source(rng, 800, [50, 10, 25, 7, 8], 2.0, 0.0)
    gb, lb = _source(rng, 300, [70, 6, 15, 4, 5], 0.7, 0.0)
    grades = np.concatenate([ga, gb])
    probs = np.exp(np.concatenate([la, lb]))
    probs /= probs.sum(1, keepdims=True)
    sources = np.array(["a"] * 800 + ["b"] * 300)
    rule = choose_grade_rule(probs, grades, sources)
    per_source = rule["qwk_by_rule"]
    urgent = rule["grade4_recall_by_rule"]
    wins = all(per_source["expected_grade"][s] > per_source["argmax"][s] for s in ("a", "b"))
    # one proliferative photo of slack per source: no more may lose its urgency to grade 3
    n4 = {s: int(((sources == s) & (grades == 4)).sum()) for s in ("a", "b")}
    keeps = all(urgent["expected_grade"][s] >= urgent["argmax"][s] - 1 / n4[s] - 1e-9 for s in ("a", "b"))
    assert rule["rule"] == ("expected_grade" if wins and keeps else "argmax")
    assert min(rule["band_widths"]) >= MIN_BAND_WIDTH - 1e-9
    assert set(per_source["argmax"]) == {"a", "b", "pooled"}


def test_a_most_probable_grade_that_empties_the_mild_band_loses_to_cut_points_that_fill_it() -> None:
    from retinagrade.training.decisions import RECALL_FLOORS

    rng = np.random.default_rng(7)
    # Mild eyes whose probabilities never make grade 1 the most probable: argmax says "mild" to nobody
    grades = np.repeat([0, 1, 2, 3, 4], [600, 150, 250, 60, 80])
    templates = np.array(
        [
            [0.80, 0.12, 0.05, 0.02, 0.01],
            [0.50, 0.30, 0.15, 0.03, 0.02],  # mild: grade 1 a strong second, never first
            [0.10, 0.15, 0.60, 0.10, 0.05],
            [0.03, 0.05, 0.22, 0.55, 0.15],
            [0.02, 0.03, 0.10, 0.25, 0.60],
        ]
    )
    probs = templates[grades] * np.exp(rng.normal(0, 0.05, (len(grades), 5)))
    probs /= probs.sum(axis=1, keepdims=True)
    sources = np.array(["a", "b"] * (len(grades) // 2))
    rule = choose_grade_rule(probs, grades, sources)
    argmax_mild = float((probs.argmax(axis=1)[grades == 1] == 1).mean())
    assert argmax_mild < RECALL_FLOORS[1]
    assert rule["rule"] == "expected_grade", rule["why"]
    # the comparison is kappa less the floors' shortfall (argmax misses the mild floor on both sources)
    for name in ("a", "b"):
        part = sources == name
        mild = float((probs.argmax(axis=1)[part & (grades == 1)] == 1).mean())
        penalised = rule["qwk_by_rule"]["argmax"][name] - 10.0 * (RECALL_FLOORS[1] - mild)
        assert rule["qwk_less_floor_penalty_by_rule"]["argmax"][name] == pytest.approx(penalised, abs=1e-9)


def test_the_balanced_point_serves_the_most_sources_and_names_the_rest() -> None:
    rng = np.random.default_rng(2)
    # Two well-ranked sources and one the model ranks poorly (no threshold gives it 0.85 and 0.825).
    parts = [("good1", 600, 2.5), ("good2", 400, 2.5), ("poor", 400, 0.4)]
    grades, p_ref, sources = [], [], []
    for name, n, sep in parts:
        truth = rng.random(n) < 0.3
        score = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + sep * (truth - 0.5) * 2 - 1.0)))
        grades.append(np.where(truth, 2, 0))
        p_ref.append(score)
        sources += [name] * n
    truth = np.concatenate(grades) >= 2
    p = np.concatenate(p_ref)
    src = np.array(sources)
    # Predicted grades 0 everywhere: the referral is the risk alone.
    predicted = np.zeros(len(p), int)
    balanced = choose_operating_point(predicted, p, truth.astype(int), src, POINT_TARGETS[0])
    assert balanced["served"] == ["good1", "good2"] and balanced["not_served"] == ["poor"]
    for name in balanced["served"]:
        row = balanced["per_source"][name]
        assert row["sensitivity"] >= 0.85 and row["specificity"] >= 0.825
    sensitive = choose_operating_point(predicted, p, truth.astype(int), src, POINT_TARGETS[1])
    assert sensitive["threshold"] < balanced["threshold"]
    for name in ("good1", "good2", "poor"):
        assert sensitive["per_source"][name]["sensitivity"] >= 0.90
    # it is the highest such threshold: one step up, some source falls below the target
    refer = referred(predicted, p, sensitive["threshold"] + 0.01)
    assert min(refer[(src == n) & truth].mean() for n in ("good1", "good2", "poor")) < 0.90


def test_a_referable_grade_counts_as_referred_at_every_threshold() -> None:
    assert referred(np.array([2, 0, 4, 1]), np.array([0.0, 0.9, 0.0, 0.1]), 0.5).tolist() == [True, True, True, False]


def test_the_whole_layer_is_fitted_on_pooled_held_out_predictions_with_a_default_point() -> None:
    rng = np.random.default_rng(3)
    ga, la = _source(rng, 500, [50, 10, 25, 7, 8], 2.5, 0.0)
    gb, lb = _source(rng, 300, [60, 10, 20, 5, 5], 1.5, -0.5)
    # A coarse source: no DR, PDR, and NPDR as a grade range 1-3
    gc = rng.choice([0, 4, -1], size=200, p=[0.7, 0.1, 0.2])
    lc = rng.normal(0, 1, (200, 5))
    lc[gc == 4, 4] += 3
    lc[gc == 0, 0] += 3
    logits = np.concatenate([la, lb, lc])
    low = np.concatenate([ga, gb, np.where(gc == -1, 1, gc)])
    high = np.concatenate([ga, gb, np.where(gc == -1, 3, gc)])
    sources = np.array(["a"] * 500 + ["b"] * 300 + ["coarse"] * 200)
    layer = fit_decision_layer(logits, np.zeros(len(low)), low, high, sources, ["a", "b"])
    assert 0.05 < layer["temperature"] < 20
    assert layer["operating_points"]["default"] == "balanced"
    assert set(layer["operating_points"]["points"]) == {"balanced", "sensitive"}
    assert layer["referable_threshold"] == layer["operating_points"]["points"]["balanced"]["threshold"]
    # the coarse source's NPDR images have no referable truth and are not counted
    coarse = layer["operating_points"]["points"]["balanced"]["per_source"]["coarse"]
    assert coarse["positives"] + coarse["negatives"] == int((gc != -1).sum())
    with pytest.raises(ValueError, match="default operating point"):
        fit_decision_layer(logits, np.zeros(len(low)), low, high, sources, ["a", "b"], default="lenient")


def test_the_dme_threshold_keeps_every_sources_calm_eyes_under_the_flag_rate() -> None:
    from retinagrade.training.decisions import fit_dme_rule

    rng = np.random.default_rng(4)
    # mexico-512: labelled (60 oedema, 400 none); two other sources: grade 0-1 eyes without a label, one camera
    # whose healthy eyes score higher (the threshold must hold there too).
    n_mx, n_a, n_b = 460, 500, 300
    dme = np.concatenate([np.r_[np.ones(60), np.zeros(400)], np.full(n_a + n_b, np.nan)])
    logit = np.concatenate([rng.normal(2.0, 1.0, 60), rng.normal(-1.0, 1.0, 400), rng.normal(-1.5, 1, n_a)])
    logit = np.concatenate([logit, rng.normal(0.0, 1.0, n_b)])
    high = np.concatenate([np.zeros(n_mx), np.ones(n_a), np.zeros(n_b)]).astype(int)
    sources = np.array(["mexico-512"] * n_mx + ["a"] * n_a + ["b"] * n_b)
    groups = np.arange(len(sources)).astype(str)
    rule = fit_dme_rule(logit, dme, high, sources, groups)
    assert rule is not None
    assert all(rate <= 0.10 + 1e-9 for rate in rule["flag_rate_grade_0_1"].values())
    # the camera that scores healthy eyes higher sets the threshold
    assert max(rule["per_source_limit"], key=rule["per_source_limit"].get) == "b"
    assert rule["fit_on"]["auc"]["value"] > 0.9 and 0 < rule["fit_on"]["sensitivity"] <= 1
    # without labelled photos of both kinds there is nothing to fit
    assert fit_dme_rule(logit, np.full(len(logit), np.nan), high, sources, groups) is None


def test_oedema_referrals_add_to_the_dr_referrals_and_cost_specificity_per_source() -> None:
    from retinagrade.training.decisions import dme_probability, with_oedema_referrals

    rule = {"calibration": {"scale": 1.0, "bias": 0.0}, "threshold": 0.5}
    # source a: 2 referable eyes (one referred for DR, one only for oedema), 3 not (one flagged for oedema)
    referred = np.array([True, False, False, False, False, True, False])
    logit_dme = np.array([-3.0, 2.0, 1.0, -1.0, -2.0, -1.0, -1.0])
    low = np.array([2, 3, 0, 0, 1, 4, 0])
    high = np.array([2, 3, 0, 0, 1, 4, 0])
    sources = np.array(["a"] * 5 + ["b"] * 2)
    np.testing.assert_allclose(dme_probability(np.array([0.0]), rule), [0.5])
    table = with_oedema_referrals(referred, logit_dme, rule, low, high, sources)
    assert table["a"] == {"sensitivity": 1.0, "specificity": 2 / 3, "specificity_dr_only": 1.0}
    assert table["b"] == {"sensitivity": 1.0, "specificity": 1.0, "specificity_dr_only": 1.0}
    # a grade range straddling grade 2 (NPDR = 1-3) is neither referable nor not: it counts nowhere
    ranged = with_oedema_referrals(referred, logit_dme, rule, low, np.array([2, 3, 0, 3, 1, 4, 0]), sources)
    assert ranged["a"]["specificity"] == 0.5


def test_a_head_that_learned_dr_matches_the_risk_overall_and_loses_among_the_eyes_with_dr() -> None:
    from retinagrade.training.decisions import dme_against_referable_risk

    rng = np.random.default_rng(2)
    # 300 healthy eyes (no oedema), 200 with DR of which 80 have oedema; the risk sees DR and some oedema,
    # the "head" sees DR only
    dr = np.r_[np.zeros(300), np.ones(200)].astype(bool)
    dme = np.r_[np.zeros(300), np.ones(80), np.zeros(120)]
    risk = 2.0 * dr + 1.0 * dme + rng.normal(0, 0.5, 500)
    head = 2.0 * dr + rng.normal(0, 0.5, 500)
    high = np.where(dr, 3, 0)
    sources = np.array(["mexico-512"] * 500)
    groups = np.arange(500).astype(str)
    result = dme_against_referable_risk(head, risk, dme, high, sources, groups)
    assert result["all"]["n"] == 500 and result["eyes_with_dr"] == {**result["eyes_with_dr"], "n": 200, "dme": 80}
    assert result["all"]["dme_head"]["value"] > 0.8
    assert abs(result["eyes_with_dr"]["dme_head"]["value"] - 0.5) < 0.12
    assert result["eyes_with_dr"]["referable_risk"]["value"] > 0.8


def test_a_processed_source_shapes_the_grade_rule_but_not_the_temperature_or_the_points() -> None:
    rng = np.random.default_rng(4)
    ga, la = _source(rng, 500, [50, 10, 25, 7, 8], 2.5, 0.0)
    # A processed derivative the model ranks poorly and whose logits are far too sharp: were it counted, it
    # would flatten the temperature and drag the sensitive point down.
    gp, lp = _source(rng, 800, [40, 15, 30, 8, 7], 0.3, 0.0)
    lp = lp * 4.0
    logits = np.concatenate([la, lp])
    grades = np.concatenate([ga, gp])
    sources = np.array(["camera"] * 500 + ["processed"] * 800)
    args = (logits, np.zeros(len(grades)), grades, grades, sources, ["camera", "processed"])
    alone = fit_decision_layer(la, np.zeros(500), ga, ga, sources[:500], ["camera"])
    pooled = fit_decision_layer(*args)
    narrowed = fit_decision_layer(*args, point_sources=["camera"])
    assert narrowed["point_sources"] == ["camera"] and pooled["point_sources"] == ["camera", "processed"]
    assert narrowed["temperature"] == pytest.approx(alone["temperature"])
    assert abs(pooled["temperature"] - alone["temperature"]) > 0.5
    for name in ("balanced", "sensitive"):
        points = narrowed["operating_points"]["points"][name]
        assert set(points["per_source"]) == {"camera"}
        assert points["threshold"] == pytest.approx(alone["operating_points"]["points"][name]["threshold"])
    assert "camera (temperature" in narrowed["chosen_on"] and "camera, processed (grade rule)" in narrowed["chosen_on"]
    # a list naming no held-out source falls back to all of them
    assert fit_decision_layer(*args, point_sources=["elsewhere"])["point_sources"] == ["camera", "processed"]
