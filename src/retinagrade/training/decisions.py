"""The decision layer, fitted on held-out predictions: calibration, the grade rule and named operating points.

Everything here is chosen on predictions of sources the model did not train on (leave-one-source-out), pooled
over every held-out source, and judged per source, because a rule that wins on a pooled number can lose on
every camera but the largest one.

- **Calibration**: one temperature on the pooled held-out logits (partial-label NLL, so coarse labels such as
  "NPDR" count for what they say).
- **Grade rule**: the most probable grade, or the expected grade cut at points that are monotone and keep
  every band at least :data:`MIN_BAND_WIDTH` wide, fitted on the pooled five-grade sources. The cut-point
  rule is kept only if it beats the most probable grade on *each* five-grade source's own QWK; free
  cut-points fitted to one small source collapse a band (0.2.0's grade-2 band was 0.03 wide).
- **Operating points**: an eye is referred when its grade is 2 or worse, or when its calibrated P(referable)
  reaches a point's threshold. ``sensitive`` is the highest threshold with sensitivity >= 0.90 on every
  held-out source; ``balanced`` (the default) the threshold that meets the pivotal endpoints of the first
  autonomous DR system (sensitivity >= 0.85, specificity >= 0.825) on as many held-out sources as possible,
  and names the ones it cannot serve.

Pure numpy on arrays; :func:`fit_decision_layer` returns a JSON-ready dict that the spec and the card read.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from retinagrade.constants import NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.inference.model_spec import Decision
from retinagrade.inference.postprocess import grade_rule, softmax
from retinagrade.training import metrics as M

#: Narrowest band of the expected-grade scale a cut-point rule may give any grade.
MIN_BAND_WIDTH: Final[float] = 0.3
#: Least share of each middle grade's photos a cut-point rule must report as that grade (pooled held-out):
#: a band a grade almost never falls into is a grade the product never says. The issue's floors on unseen
#: cameras are 0.02 / 0.40 / 0.25 for grades 1 / 2 / 3; these keep a margin over them.
RECALL_FLOORS: Final[dict[int, float]] = {1: 0.05, 2: 0.45, 3: 0.30}
#: Kappa given up per unit of recall below a floor, in the cut-point search (the floors nearly bind).
FLOOR_PENALTY: Final[float] = 10.0
#: Step of the cut-point search on the expected-grade scale.
CUT_STEP: Final[float] = 0.01
DEFAULT_POINT: Final[str] = "balanced"
#: The highest risk threshold a point may have: an eye more likely referable than not (calibrated P >= 0.5) is
#: always referred, so no answer shows a risk over one half beside "not referred". Where the grades alone
#: already meet a point's targets, its threshold is this, not 1 (which would switch the risk referral off).
MAX_RISK_THRESHOLD: Final[float] = 0.5


@dataclass(frozen=True)
class PointTarget:
    """What a named operating point asks of each held-out source.

    ``min_specificity`` None: the point wants only the sensitivity, at the highest threshold that keeps it on
    every source. Otherwise the threshold serves as many sources as possible with both.
    """

    name: str
    min_sensitivity: float
    min_specificity: float | None
    description: str


#: The named points every model ships: a screening default and a sensitive one.
POINT_TARGETS: Final[tuple[PointTarget, ...]] = (
    PointTarget(
        "balanced",
        0.85,
        0.825,
        "default: sensitivity >= 0.85 and specificity >= 0.825 (the pivotal endpoints of the first autonomous DR "
        "system) on as many held-out camera sources as one threshold allows",
    ),
    PointTarget(
        "sensitive",
        0.90,
        None,
        "sensitivity >= 0.90 on every held-out camera source, at the cost of more healthy eyes referred",
    ),
)


# -- calibration ------------------------------------------------------------------------------------------


def fit_temperature_partial(logits: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """Temperature minimising the partial-label NLL (-log P(allowed grades)); equals NLL for exact labels."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax, logsumexp

    z = np.asarray(logits, np.float64)
    k = np.arange(z.shape[1])[None, :]
    allowed = (k >= low[:, None]) & (k <= high[:, None])

    def nll(log_t: float) -> float:
        lp = log_softmax(z / np.exp(log_t), axis=1)
        return float(-logsumexp(np.where(allowed, lp, -np.inf), axis=1).mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


# -- referral ---------------------------------------------------------------------------------------------


def referred(grades: np.ndarray, p_referable: np.ndarray, threshold: float) -> np.ndarray:
    """The referral rule of :func:`retinagrade.inference.postprocess.decide_grade`, vectorised."""
    return (np.asarray(grades) >= REFERABLE_MIN_GRADE) | (np.asarray(p_referable) >= threshold)


def referable_truth(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """1 referable, 0 not, -1 unknown (a grade range straddling the referable grade, e.g. NPDR = 1-3)."""
    truth = np.full(len(low), -1)
    truth[np.asarray(low) >= REFERABLE_MIN_GRADE] = 1
    truth[np.asarray(high) < REFERABLE_MIN_GRADE] = 0
    return truth


def _rates(refer: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None]:
    pos, neg = truth == 1, truth == 0
    sensitivity = float(refer[pos].mean()) if pos.any() else None
    specificity = float((~refer[neg]).mean()) if neg.any() else None
    return sensitivity, specificity


# -- grade rule -------------------------------------------------------------------------------------------


def fit_cut_points(
    score: np.ndarray,
    grades: np.ndarray,
    min_width: float = MIN_BAND_WIDTH,
    step: float = CUT_STEP,
    min_top_recall: float | None = None,
    recall_floors: dict[int, float] | None = None,
    top_recall_by_source: tuple[np.ndarray, Mapping[str, float | None]] | None = None,
) -> tuple[float, ...]:
    """Cut-points on a 0-4 score maximising QWK, monotone, every band (the end ones within [0, 4]) >= ``min_width``.

    Coordinate ascent from the plain rounding points (0.5, 1.5, 2.5, 3.5) over a grid of ``step``: each cut
    moves within the room its neighbours leave, until no move improves the kappa. ``min_top_recall`` keeps the
    share of grade-4 images that land in grade 4 at least that high (the last cut may not rise above it): a
    kappa-optimal rule would otherwise pull proliferative eyes into grade 3 and take their urgency away.
    ``recall_floors`` (grade -> least recall) are soft: the search maximises kappa minus
    :data:`FLOOR_PENALTY` times the recall missing below each floor. ``top_recall_by_source`` (each image's
    source, and each source's grade-4 recall to keep) bounds the last cut on every source too, losing at most one
    of its grade-4 images: the test :func:`choose_grade_rule` applies, so the search stays inside it.
    """
    score = np.asarray(score, dtype=np.float64)
    grades = np.asarray(grades, dtype=np.int64)
    top = float(NUM_GRADES - 1)
    cuts = [k + 0.5 for k in range(NUM_GRADES - 1)]
    bound = _last_cut_ceiling(score, grades, min_width, min_top_recall, top_recall_by_source)
    ceiling = top - min_width if bound is None else bound
    if bound is not None:
        # Start inside the constraints: the last cut at most the ceiling, the others pushed down behind it.
        cuts[-1] = min(cuts[-1], ceiling)
        for k in range(len(cuts) - 2, -1, -1):
            cuts[k] = min(cuts[k], cuts[k + 1] - min_width)

    floors = recall_floors or {}
    support = {k: grades == k for k in floors}

    def kappa(c: Sequence[float]) -> float:
        predicted = np.searchsorted(np.asarray(c), score, side="right")
        shortfall = sum(
            max(0.0, floor - float((predicted[support[k]] == k).mean()))
            for k, floor in floors.items()
            if support[k].any()
        )
        return M.quadratic_weighted_kappa(grades, predicted) - FLOOR_PENALTY * shortfall

    best = kappa(cuts)
    for _ in range(20):
        moved = False
        for k in range(len(cuts)):
            low = (cuts[k - 1] if k else 0.0) + min_width
            high = (cuts[k + 1] - min_width) if k + 1 < len(cuts) else ceiling
            # The grid, and the bound itself (a grid point past it would break the ceiling).
            for value in np.append(np.arange(low, high, step), high) if high >= low else ():
                trial = [*cuts[:k], float(value), *cuts[k + 1 :]]
                q = kappa(trial)
                if q > best + 1e-12:
                    best, cuts, moved = q, trial, True
        if not moved:
            break
    return tuple(round(c, 4) for c in cuts)


def _last_cut_ceiling(
    score: np.ndarray,
    grades: np.ndarray,
    min_width: float,
    min_top_recall: float | None,
    top_recall_by_source: tuple[np.ndarray, Mapping[str, float | None]] | None,
) -> float | None:
    """The highest last cut that keeps the grade-4 recalls asked for (None when none is asked)."""
    if min_top_recall is None and top_recall_by_source is None:
        return None
    top = float(NUM_GRADES - 1)
    ceiling = top - min_width
    top_scores = np.sort(score[grades == NUM_GRADES - 1])
    if min_top_recall is not None and len(top_scores):
        # The highest last cut that keeps ceil(min_top_recall * n) grade-4 images at or above it.
        keep = int(np.ceil(min_top_recall * len(top_scores) - 1e-9))
        if keep > 0:
            ceiling = min(ceiling, float(top_scores[len(top_scores) - keep]))
    if top_recall_by_source is not None:
        names, recalls = top_recall_by_source
        for name, recall in recalls.items():
            own = np.sort(score[(grades == NUM_GRADES - 1) & (np.asarray(names) == name)])
            keep = int(np.ceil((recall or 0.0) * len(own) - 1e-9)) - 1  # one image of slack, as the test allows
            if keep > 0:
                ceiling = min(ceiling, float(own[len(own) - keep]))
    if ceiling < (NUM_GRADES - 1) * min_width:
        ceiling = top - min_width  # no rule with bands this wide keeps that recall: the constraint yields
    # Cut-points are written with 4 decimals: round down, or a cut rounded up past a kept image would lose it.
    return float(np.floor(ceiling * 1e4) / 1e4)


def band_widths(cuts: Sequence[float]) -> list[float]:
    """Width of each grade's band on the 0-4 expected-grade scale."""
    edges = [0.0, *cuts, float(NUM_GRADES - 1)]
    return [round(b - a, 4) for a, b in itertools.pairwise(edges)]


def choose_grade_rule(
    probs: np.ndarray, grades: np.ndarray, sources: np.ndarray, min_width: float = MIN_BAND_WIDTH
) -> dict[str, Any]:
    """The most probable grade, or width-constrained cut-points on the expected grade if they win on every source
    (kappa less :data:`FLOOR_PENALTY` times the recall missing below :data:`RECALL_FLOORS`, the fit's objective).

    Args:
        probs: calibrated probabilities of the exactly graded held-out images of the five-grade sources.
        grades: their reference grades.
        sources: their source names.
    """
    expected = probs @ np.arange(NUM_GRADES, dtype=np.float64)
    top = NUM_GRADES - 1
    argmax_top = _top_recall(probs.argmax(axis=1), grades)
    argmax_by_source = {n: _top_recall(probs.argmax(axis=1)[sources == n], grades[sources == n]) for n in set(sources)}
    cuts = fit_cut_points(
        expected,
        grades,
        min_width,
        min_top_recall=argmax_top,
        recall_floors=RECALL_FLOORS,
        top_recall_by_source=(sources, argmax_by_source),
    )
    candidates = {
        "argmax": Decision("argmax"),
        "expected_grade": Decision("expected_grade", cuts),
    }
    names = sorted(set(sources.tolist()))
    per_source: dict[str, dict[str, float]] = {}
    scored: dict[str, dict[str, float]] = {}
    top_recall: dict[str, dict[str, float | None]] = {}
    for rule, decision in candidates.items():
        pred = grade_rule(probs, np.zeros(len(probs)), decision)
        per_source[rule] = {
            name: float(M.quadratic_weighted_kappa(grades[sources == name], pred[sources == name])) for name in names
        }
        # The cut-points' own objective: kappa less the recall missing below the floors (a rule that leaves a
        # grade's band empty on a source does not win there on kappa alone).
        scored[rule] = {
            name: per_source[rule][name]
            - FLOOR_PENALTY * _floor_shortfall(pred[sources == name], grades[sources == name])
            for name in names
        }
        per_source[rule]["pooled"] = float(M.quadratic_weighted_kappa(grades, pred))
        top_recall[rule] = {name: _top_recall(pred[sources == name], grades[sources == name]) for name in names}

    def keeps_urgency(name: str) -> bool:
        # No more than one proliferative photo of the source lost to grade 3 (its referral stops being urgent).
        new, old = top_recall["expected_grade"][name], top_recall["argmax"][name]
        n_top = int((grades[sources == name] == top).sum())
        return new is None or old is None or new >= old - 1.0 / max(n_top, 1) - 1e-9

    losers = [n for n in names if scored["expected_grade"][n] <= scored["argmax"][n] or not keeps_urgency(n)]
    rule = "argmax" if losers else "expected_grade"
    return {
        "rule": rule,
        "thresholds": list(candidates[rule].thresholds),
        "min_band_width": min_width,
        "expected_grade_cut_points": list(cuts),
        "band_widths": band_widths(cuts),
        "qwk_by_rule": per_source,
        "qwk_less_floor_penalty_by_rule": scored,
        "recall_floors": {str(k): v for k, v in RECALL_FLOORS.items()},
        "grade4_recall_by_rule": top_recall,
        "why": (
            f"the cut-point rule beats the most probable grade on every five-grade source ({', '.join(names)}) "
            "on kappa less the recall missing below the floors of grades 1-3, and keeps its grade-4 recall"
            if not losers
            else "the cut-point rule does not beat the most probable grade (kappa, or grade-4 recall) on "
            + ", ".join(losers)
        ),
    }


def _floor_shortfall(predicted: np.ndarray, grades: np.ndarray) -> float:
    """Recall missing below :data:`RECALL_FLOORS`, summed over the grades present."""
    return sum(
        max(0.0, floor - float((predicted[grades == k] == k).mean()))
        for k, floor in RECALL_FLOORS.items()
        if (grades == k).any()
    )


def _top_recall(predicted: np.ndarray, grades: np.ndarray) -> float | None:
    """Share of grade-4 images predicted grade 4 (None without any)."""
    top = grades == NUM_GRADES - 1
    return float((np.asarray(predicted)[top] == NUM_GRADES - 1).mean()) if top.any() else None


# -- operating points -------------------------------------------------------------------------------------


def _candidate_thresholds(p_referable: np.ndarray) -> np.ndarray:
    """Risk thresholds a point may take: the held-out risks and a grid, never above :data:`MAX_RISK_THRESHOLD`."""
    values = np.unique(np.round(np.asarray(p_referable, dtype=np.float64), 4))
    grid = np.linspace(0.0, MAX_RISK_THRESHOLD, 101)
    return np.unique(np.concatenate([values[values <= MAX_RISK_THRESHOLD], grid]))


def _per_source(
    grades: np.ndarray, p_referable: np.ndarray, truth: np.ndarray, sources: np.ndarray, threshold: float
) -> dict[str, dict[str, float | None]]:
    refer = referred(grades, p_referable, threshold)
    table: dict[str, dict[str, float | None]] = {}
    for name in sorted(set(sources.tolist())):
        part = sources == name
        sensitivity, specificity = _rates(refer[part], truth[part])
        table[name] = {
            "sensitivity": sensitivity,
            "specificity": specificity,
            "positives": int((truth[part] == 1).sum()),
            "negatives": int((truth[part] == 0).sum()),
        }
    return table


def _serves(row: Mapping[str, float | None], target: PointTarget) -> bool:
    sensitivity, specificity = row["sensitivity"], row["specificity"]
    if sensitivity is None or sensitivity < target.min_sensitivity:
        return False
    return target.min_specificity is None or specificity is None or specificity >= target.min_specificity


def _rate_curves(
    grades: np.ndarray, p_referable: np.ndarray, truth: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Sensitivity and specificity of :func:`referred` at every threshold at once (None without that class)."""

    def referred_share(mask: np.ndarray) -> np.ndarray | None:
        if not mask.any():
            return None
        by_grade = grades[mask] >= REFERABLE_MIN_GRADE
        scores = np.sort(p_referable[mask][~by_grade])
        # Images referred at threshold t: those with a referable grade, plus the others with p >= t.
        at_or_above = len(scores) - np.searchsorted(scores, thresholds, side="left")
        return np.asarray((by_grade.sum() + at_or_above) / mask.sum(), dtype=np.float64)

    referred_pos = referred_share(truth == 1)
    referred_neg = referred_share(truth == 0)
    return referred_pos, None if referred_neg is None else 1.0 - referred_neg


def _margin(row: Mapping[str, float | None], min_sensitivity: float, min_specificity: float) -> float:
    """How far a source is inside a point's targets (the smaller of the two margins)."""
    sensitivity, specificity = row["sensitivity"], row["specificity"]
    return min(
        (sensitivity if sensitivity is not None else 0.0) - min_sensitivity,
        (specificity if specificity is not None else 1.0) - min_specificity,
    )


def choose_operating_point(
    grades: np.ndarray, p_referable: np.ndarray, truth: np.ndarray, sources: np.ndarray, target: PointTarget
) -> dict[str, Any]:
    """The threshold of one named point on pooled held-out predictions (rule of :class:`PointTarget`).

    Only images with a known referable truth count; a source with no referable image cannot set a
    sensitivity and counts by its specificity alone.
    """
    known = truth >= 0
    grades, p_referable, truth, sources = grades[known], p_referable[known], truth[known], sources[known]
    names = sorted(set(sources.tolist()))
    thresholds = _candidate_thresholds(p_referable)
    curves = {
        n: _rate_curves(grades[sources == n], p_referable[sources == n], truth[sources == n], thresholds) for n in names
    }
    count = np.zeros(len(thresholds))
    worst = np.full(len(thresholds), np.inf)
    every_sensitive = np.ones(len(thresholds), bool)
    for sensitivity, specificity in curves.values():
        sens_ok = np.ones(len(thresholds), bool) if sensitivity is None else sensitivity >= target.min_sensitivity
        if sensitivity is not None:
            every_sensitive &= sens_ok
        if target.min_specificity is None or sensitivity is None:
            continue
        spec_ok = True if specificity is None else specificity >= target.min_specificity
        served = sens_ok & spec_ok
        margin = np.minimum(
            sensitivity - target.min_sensitivity,
            (1.0 if specificity is None else specificity) - target.min_specificity,
        )
        count += served
        worst = np.where(served, np.minimum(worst, margin), worst)
    if target.min_specificity is None:
        # The highest threshold that keeps every source's sensitivity at the target.
        chosen = float(thresholds[every_sensitive].max()) if every_sensitive.any() else float(thresholds[0])
    else:
        # Most sources served; then the most central threshold (the largest worst margin among them).
        worst = np.where(count > 0, worst, -1.0)
        order = np.lexsort((worst, count))
        chosen = float(thresholds[order[-1]])
    table = _per_source(grades, p_referable, truth, sources, chosen)
    served_names = [n for n in names if _serves(table[n], target)]
    return {
        "threshold": round(chosen, 4),
        "description": target.description,
        "target": {"min_sensitivity": target.min_sensitivity, "min_specificity": target.min_specificity},
        "served": served_names,
        "not_served": [n for n in names if n not in served_names],
        "per_source": table,
    }


def travelling_operating_point(
    p_referable: np.ndarray, truth: np.ndarray, sources: np.ndarray, min_sensitivity: float
) -> dict[str, Any]:
    """The highest threshold at which every source's sensitivity reaches ``min_sensitivity`` (unknowns ignored).

    Each source (a held-out camera set) gets the highest threshold that keeps its own sensitivity at the target;
    the lowest of those keeps the worst source at the target, and is the most specific such threshold.
    """
    per_source: dict[str, float] = {}
    for name in sorted(set(sources)):
        keep = (sources == name) & (truth >= 0)
        positives = np.sort(p_referable[keep & (truth == 1)])[::-1]
        if len(positives) == 0:
            continue
        need = int(np.ceil(min_sensitivity * len(positives)))
        per_source[name] = float(positives[need - 1])
    threshold = min(per_source.values())
    known = truth >= 0
    referred = p_referable >= threshold
    return {
        "threshold": threshold,
        "per_source_max_threshold": per_source,
        "pooled_sensitivity": float(referred[known & (truth == 1)].mean()),
        "pooled_specificity": float((~referred[known & (truth == 0)]).mean()),
    }


# -- the whole layer --------------------------------------------------------------------------------------


def fit_decision_layer(
    logits: np.ndarray,
    regression: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    sources: np.ndarray,
    five_grade: Sequence[str],
    targets: Sequence[PointTarget] = POINT_TARGETS,
    default: str = DEFAULT_POINT,
    min_width: float = MIN_BAND_WIDTH,
    point_sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Temperature, grade rule and named operating points from pooled held-out predictions.

    Args:
        logits, regression: held-out model outputs of every image that counts.
        low, high: each image's grade bounds (equal for an exact grade).
        sources: each image's source name.
        five_grade: the sources whose exact grades choose the grade rule.
        point_sources: the sources whose held-out predictions set the temperature and the operating points:
            photos like the product's input (camera colours). A processed derivative (contrast-equalised,
            grade 0 under-sampled) would move both towards images nobody sends. None or none present: all.
    """
    low, high, sources = np.asarray(low), np.asarray(high), np.asarray(sources)
    held = sorted(set(sources.tolist()))
    calibrating = [name for name in held if point_sources is None or name in point_sources] or held
    on_points = np.isin(sources, calibrating)
    temperature = fit_temperature_partial(logits[on_points], low[on_points], high[on_points])
    probs = softmax(logits, temperature)
    exact = (low == high) & np.isin(sources, list(five_grade))
    rule = choose_grade_rule(probs[exact], low[exact], sources[exact], min_width)
    decision = Decision(rule["rule"], tuple(rule["thresholds"]))
    grades = grade_rule(probs, regression, decision)[on_points]
    p_referable = probs[on_points, REFERABLE_MIN_GRADE:].sum(axis=1)
    truth = referable_truth(low[on_points], high[on_points])
    points = {t.name: choose_operating_point(grades, p_referable, truth, sources[on_points], t) for t in targets}
    if default not in points:
        raise ValueError(f"the default operating point {default!r} is not among {sorted(points)}")
    return {
        "temperature": temperature,
        **rule,
        "referable_threshold": points[default]["threshold"],
        "operating_points": {"default": default, "points": points},
        "point_sources": calibrating,
        "chosen_on": f"pooled leave-one-source-out predictions of {', '.join(calibrating)} (temperature, "
        f"operating points) and of {', '.join(five_grade)} (grade rule)",
    }


def decision_of(layer: Mapping[str, Any]) -> Decision:
    """The grade rule of a fitted layer as the spec holds it."""
    return Decision(str(layer["rule"]), tuple(float(t) for t in layer["thresholds"]))


def apply_layer(
    logits: np.ndarray, regression: np.ndarray, layer: Mapping[str, Any], point: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, grade, P(referable), referred) of held-out outputs under a fitted layer at a named point."""
    probs = softmax(logits, float(layer["temperature"]))
    grades = grade_rule(probs, regression, decision_of(layer))
    p_referable = probs[:, REFERABLE_MIN_GRADE:].sum(axis=1)
    name = point or layer["operating_points"]["default"]
    threshold = float(layer["operating_points"]["points"][name]["threshold"])
    return probs, grades, p_referable, referred(grades, p_referable, threshold)


# -- macular oedema ---------------------------------------------------------------------------------------

#: The held-out source whose photos carry DME labels from one collection batch (the honest DME test set).
DME_SOURCE: Final[str] = "mexico-512"
#: Most grade 0-1 eyes without oedema that a DME threshold may flag, on every held-out source.
DME_MAX_FLAG_RATE: Final[float] = 0.10


def dme_probability(logit_dme: np.ndarray, rule: Mapping[str, Any]) -> np.ndarray:
    """Calibrated ``p_dme`` of DME logits under a fitted rule (:func:`fit_dme_rule`'s ``calibration``)."""
    calibration = rule["calibration"]
    z = float(calibration["scale"]) * np.asarray(logit_dme, np.float64) + float(calibration["bias"])
    return 1.0 / (1.0 + np.exp(-z))


def with_oedema_referrals(
    referred_for_dr: np.ndarray,
    logit_dme: np.ndarray,
    rule: Mapping[str, Any],
    low: np.ndarray,
    high: np.ndarray,
    sources: np.ndarray,
) -> dict[str, dict[str, float | None]]:
    """Referable-DR sensitivity and specificity per source when oedema referrals count too, as the product refers.

    ``referred_for_dr`` is the grade-and-risk referral at one operating point; an eye is referred when that fires
    or ``p_dme`` reaches the rule's threshold. ``specificity_dr_only`` is the same eyes without oedema referrals:
    the difference is what the DME output costs healthy eyes on each source.
    """
    truth = referable_truth(low, high)
    flagged = dme_probability(logit_dme, rule) >= float(rule["threshold"])
    both = np.asarray(referred_for_dr, bool) | flagged
    table: dict[str, dict[str, float | None]] = {}
    for name in sorted(set(np.asarray(sources).tolist())):
        part = np.asarray(sources) == name
        sensitivity, specificity = _rates(both[part], truth[part])
        _, dr_only = _rates(np.asarray(referred_for_dr, bool)[part], truth[part])
        table[name] = {"sensitivity": sensitivity, "specificity": specificity, "specificity_dr_only": dr_only}
    return table


def dme_against_referable_risk(
    logit_dme: np.ndarray,
    p_referable: np.ndarray,
    dme_true: np.ndarray,
    high: np.ndarray,
    sources: np.ndarray,
    groups: np.ndarray,
    source: str = DME_SOURCE,
) -> dict[str, Any]:
    """Does the oedema head see oedema, or only the retinopathy that comes with it?

    On ``source``'s labelled held-out photos, the DME AUC of the head's logit and of the referable-DR risk,
    over all photos and over the eyes with some DR (grade bound above 0): where oedema only comes with DR, a
    head that learned DR would match the risk's AUC on all photos and lose among the eyes with DR.
    """
    dme_true = np.asarray(dme_true, dtype=np.float64)
    labelled = (np.asarray(sources) == source) & np.isfinite(dme_true)
    subsets = {"all": labelled, "eyes_with_dr": labelled & (np.asarray(high) >= 1)}
    result: dict[str, Any] = {"source": source}
    for name, part in subsets.items():
        y = dme_true[part] == 1
        row: dict[str, Any] = {"n": int(part.sum()), "dme": int(y.sum())}
        for score_name, score in (("dme_head", logit_dme), ("referable_risk", p_referable)):
            value, low, high_ci = M.bootstrap_ci(
                M._auc_or_nan, y, np.asarray(score)[part], n_boot=500, seed=0, groups=np.asarray(groups)[part]
            )
            row[score_name] = {"value": value, "ci_low": low, "ci_high": high_ci}
        result[name] = row
    return result


def fit_platt(logit: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(scale, bias) of ``sigmoid(scale * logit + bias)`` minimising the log-loss of binary ``truth``."""
    from scipy.optimize import minimize

    x = np.asarray(logit, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)

    def loss(params: np.ndarray) -> float:
        z = params[0] * x + params[1]
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    result = minimize(loss, np.array([1.0, 0.0]), method="L-BFGS-B")
    return float(result.x[0]), float(result.x[1])


def fit_dme_rule(
    logit_dme: np.ndarray,
    dme_true: np.ndarray,
    high: np.ndarray,
    sources: np.ndarray,
    groups: np.ndarray,
    fit_on: str = DME_SOURCE,
    max_flag_rate: float = DME_MAX_FLAG_RATE,
) -> dict[str, Any] | None:
    """Calibration and threshold of the DME output from held-out predictions; None without labelled ones.

    ``p_dme`` is Platt-scaled on the labelled held-out photos of ``fit_on``. The threshold is the lowest (most
    sensitive) at which, on every held-out source, at most ``max_flag_rate`` of the eyes graded 0-1 and not
    labelled DME are flagged: oedema referrals must not flood a camera's healthy eyes. Sensitivity and AUC are
    measured on ``fit_on``'s labelled photos, with group-bootstrap intervals.

    Args:
        logit_dme: held-out DME logits of every image that counts.
        dme_true: 1 oedema, 0 none, NaN unknown.
        high: upper grade bound (grade 0-1 eyes are those whose bound is at most 1); sources, groups: per image.
    """
    dme_true = np.asarray(dme_true, dtype=np.float64)
    labelled = (sources == fit_on) & np.isfinite(dme_true)
    if labelled.sum() < 20 or len(set(dme_true[labelled].tolist())) < 2:
        return None
    scale, bias = fit_platt(logit_dme[labelled], dme_true[labelled])
    p_dme = dme_probability(logit_dme, {"calibration": {"scale": scale, "bias": bias}})
    calm = (np.asarray(high) <= 1) & (dme_true != 1)
    names = sorted(set(sources[calm].tolist()))
    # Per source, the flag-rate quantile of its calm eyes' p_dme; the highest of them keeps every source under it.
    limits = {n: float(np.quantile(p_dme[calm & (sources == n)], 1.0 - max_flag_rate)) for n in names}
    threshold = float(min(max(limits.values()), 0.999)) if limits else 0.5
    flagged = p_dme >= threshold
    y = dme_true[labelled] == 1
    auc = M.bootstrap_ci(M._auc_or_nan, y, p_dme[labelled], n_boot=1000, seed=0, groups=groups[labelled])
    hits, positives = int(flagged[labelled][y].sum()), int(y.sum())
    passes, negatives = int((~flagged[labelled][~y]).sum()), int((~y).sum())
    return {
        "calibration": {"method": "platt", "scale": scale, "bias": bias, "fitted_on": fit_on},
        "threshold": round(threshold, 4),
        "rule": f"lowest threshold at which at most {max_flag_rate:.0%} of every held-out source's grade 0-1 eyes "
        "without a DME label are flagged",
        "fit_on": {
            "source": fit_on,
            "positives": positives,
            "negatives": negatives,
            "auc": {"value": auc[0], "ci_low": auc[1], "ci_high": auc[2]},
            "sensitivity": hits / positives if positives else None,
            "specificity": passes / negatives if negatives else None,
        },
        "flag_rate_grade_0_1": {n: float(flagged[calm & (sources == n)].mean()) for n in names},
        "per_source_limit": limits,
    }
