"""Evaluation metrics for ICDR grading: agreement, calibration, referable operating point, intervals.

Used by ``retinagrade evaluate``, by training (out-of-fold metrics, temperature scaling, threshold
selection) and by the model card. Plain numpy in, plain numbers out; no torch.

Conventions:
    * a grade is an integer in ``[0, NUM_GRADES)``; an image is referable when its grade is at least
      ``REFERABLE_MIN_GRADE``;
    * a score is called referable when ``score >= threshold``;
    * a continuous grade score ``s`` maps to the grade ``#{thresholds t : s >= t}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_curve

from retinagrade.constants import GRADE_NAMES, NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.inference import postprocess

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: The APTOS-style starting cut-points on an expected-grade score: halfway between neighbouring grades.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(g + 0.5 for g in range(NUM_GRADES - 1))

#: Equal-width probability bins of the calibration errors (Guo et al. 2017 use 15).
ECE_BINS = 15


# --------------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------------


def _as_grades(values: npt.ArrayLike, num_classes: int, name: str) -> IntArray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if (
        array.size
        and not np.issubdtype(array.dtype, np.integer)
        and not (np.all(np.isfinite(array)) and np.all(array == np.round(array)))
    ):
        raise ValueError(f"{name} must hold whole grades")
    grades = array.astype(np.int64)
    if grades.size and (grades.min() < 0 or grades.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got {grades.min()}..{grades.max()}")
    return grades


def _as_scores(values: npt.ArrayLike, name: str) -> FloatArray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} must be finite")
    return scores


def _as_binary(values: npt.ArrayLike, name: str) -> BoolArray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name} must hold booleans or 0/1")
    return array.astype(bool)


def _as_probs(values: npt.ArrayLike, name: str = "probs") -> FloatArray:
    probs = np.asarray(values, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"{name} must be (n_images, n_classes), got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0.0:
        raise ValueError(f"{name} must be finite and non-negative")
    if probs.size and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(f"rows of {name} must sum to 1")
    return probs


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}")
    return next(iter(lengths.values()))


# --------------------------------------------------------------------------------------------------------
# Grade agreement
# --------------------------------------------------------------------------------------------------------


def is_referable(grades: npt.ArrayLike) -> BoolArray:
    """Whether each ICDR grade must be referred (grade >= ``REFERABLE_MIN_GRADE``)."""
    return np.asarray(grades) >= REFERABLE_MIN_GRADE


def referable_probability(probs: npt.ArrayLike) -> FloatArray:
    """P(referable) per image: the summed probability of the referable grades.

    Args:
        probs: per-grade probabilities, shape ``(n_images, NUM_GRADES)``.
    """
    array = _as_probs(probs)
    if array.shape[1] != NUM_GRADES:
        raise ValueError(f"probs must have {NUM_GRADES} columns, got {array.shape[1]}")
    return array[:, REFERABLE_MIN_GRADE:].sum(axis=1)


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int = NUM_GRADES) -> IntArray:
    """Counts of (true grade, predicted grade) pairs; rows are true grades, columns predicted grades."""
    true = _as_grades(y_true, num_classes, "y_true")
    pred = _as_grades(y_pred, num_classes, "y_pred")
    _same_length(y_true=true, y_pred=pred)
    counts = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _quadratic_weights(num_classes: int) -> FloatArray:
    grades = np.arange(num_classes, dtype=np.float64)
    return (grades[:, None] - grades[None, :]) ** 2


def _kappa_from_confusion(confusion: npt.NDArray[Any], weights: FloatArray) -> float:
    n = confusion.sum()
    if n == 0:
        return math.nan
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / n
    expected_disagreement = float((weights * expected).sum())
    if expected_disagreement == 0.0:
        # Both raters used one and the same grade throughout: kappa is undefined (as in scikit-learn).
        return math.nan
    return 1.0 - float((weights * confusion).sum()) / expected_disagreement


def quadratic_weighted_kappa(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int = NUM_GRADES) -> float:
    """Cohen's kappa with quadratic weights, the usual agreement measure for ICDR grading.

    Args:
        y_true: reference grades.
        y_pred: predicted grades.
        num_classes: number of ordinal grades.

    Returns:
        Kappa in [-1, 1]; NaN when it is undefined (no images, or every true and predicted grade is the
        same single grade).
    """
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    return _kappa_from_confusion(confusion, _quadratic_weights(num_classes))


# --------------------------------------------------------------------------------------------------------
# Cut-points on a continuous grade score
# --------------------------------------------------------------------------------------------------------


def _check_thresholds(thresholds: Sequence[float]) -> FloatArray:
    cuts = np.asarray(thresholds, dtype=np.float64)
    if cuts.ndim != 1 or cuts.size == 0:
        raise ValueError("thresholds must be a non-empty sequence")
    if not np.all(np.isfinite(cuts)) or np.any(np.diff(cuts) <= 0):
        raise ValueError(f"thresholds must be finite and strictly increasing, got {tuple(cuts)}")
    return cuts


def apply_thresholds(scores: npt.ArrayLike, thresholds: Sequence[float]) -> IntArray:
    """Map a continuous grade score to grades: the grade is the number of thresholds the score reaches.

    Args:
        scores: expected grade or regression output per image.
        thresholds: strictly increasing cut-points, one fewer than the number of grades.

    Returns:
        Integer grades in ``[0, len(thresholds)]``.
    """
    cuts = _check_thresholds(thresholds)
    values = _as_scores(scores, "scores")
    return np.asarray(postprocess.grade_from_score(values, cuts), dtype=np.int64)


def _best_cut(
    scores: FloatArray,
    y_true: IntArray,
    grades: IntArray,
    cuts: FloatArray,
    k: int,
    weights: FloatArray,
) -> float | None:
    """Exact line search on cut ``k`` (between grades k and k+1) with the other cuts held fixed.

    Only images whose score lies between the neighbouring cuts can change grade, and they move one at a
    time from k+1 to k as the cut rises, so kappa for every distinct position follows from cumulative sums.

    Returns:
        A new value for the cut when it raises kappa, else None.
    """
    lower = cuts[k - 1] if k > 0 else -np.inf
    upper = cuts[k + 1] if k + 1 < len(cuts) else np.inf
    movable = (scores >= lower) & (scores < upper)
    if not np.any(movable):
        return None
    order = np.argsort(scores[movable], kind="stable")
    s = scores[movable][order]
    y = y_true[movable][order]
    m = len(s)
    n = len(scores)
    num_classes = weights.shape[0]

    # Position j: the j lowest movable images are graded k, the rest k + 1. Start from position 0.
    base = (
        np.bincount(y_true * num_classes + grades, minlength=num_classes**2)
        .reshape(num_classes, num_classes)
        .astype(np.float64)
    )
    now_k = np.bincount(y[grades[movable][order] == k], minlength=num_classes).astype(np.float64)
    base[:, k] -= now_k
    base[:, k + 1] += now_k
    row = base.sum(axis=1)
    col0 = base.sum(axis=0)

    observed = float((weights * base).sum()) + np.concatenate(([0.0], np.cumsum(weights[y, k] - weights[y, k + 1])))
    step = row @ (weights[:, k] - weights[:, k + 1])
    expected = (float(row @ weights @ col0) + step * np.arange(m + 1)) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(expected > 0, 1.0 - observed / expected, -np.inf)

    # A cut can only fall between two different scores (or beyond the ends).
    valid = np.ones(m + 1, dtype=bool)
    valid[1:m] = s[1:] > s[:-1]
    valid[0] = s[0] > lower  # the cut must stay strictly above its lower neighbour
    kappa = np.where(valid, kappa, -np.inf)

    current = int(np.searchsorted(s, cuts[k], side="left"))
    best = float(kappa.max())
    if not best > kappa[current] + 1e-12:
        return None
    candidates = np.flatnonzero(kappa >= best - 1e-12)
    j = int(candidates[np.argmin(np.abs(candidates - current))])
    left = s[j - 1] if j > 0 else (lower if np.isfinite(lower) else s[0] - 1.0)
    right = s[j] if j < m else (upper if np.isfinite(upper) else s[-1] + 1.0)
    return float((left + right) / 2.0)


def optimise_thresholds(
    scores: npt.ArrayLike,
    y_true: npt.ArrayLike,
    initial: Sequence[float] = DEFAULT_THRESHOLDS,
    max_rounds: int = 100,
) -> tuple[float, ...]:
    """Cut-points on a continuous grade score that maximise quadratic weighted kappa.

    Coordinate ascent, as in the APTOS 2019 winning solutions, but each step is an exact line search over
    every distinct position of one cut, so the result is deterministic and no cut can be moved alone to
    raise kappa. Cuts stay strictly increasing. Fit on out-of-fold scores, not on the test set.

    Args:
        scores: expected grade or regression output per image.
        y_true: reference grades.
        initial: starting cut-points; their count fixes the number of grades (``len(initial) + 1``).
        max_rounds: upper bound on sweeps over all cuts.

    Returns:
        The optimised cut-points, strictly increasing.
    """
    cuts = _check_thresholds(initial).copy()
    num_classes = len(cuts) + 1
    values = _as_scores(scores, "scores")
    truth = _as_grades(y_true, num_classes, "y_true")
    if _same_length(scores=values, y_true=truth) == 0:
        raise ValueError("no images to fit thresholds on")
    weights = _quadratic_weights(num_classes)

    for _ in range(max_rounds):
        moved = False
        for k in range(len(cuts)):
            grades = np.searchsorted(cuts, values, side="right").astype(np.int64)
            new_cut = _best_cut(values, truth, grades, cuts, k, weights)
            if new_cut is not None:
                cuts[k] = new_cut
                moved = True
        if not moved:
            break
    return tuple(float(c) for c in cuts)


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """Row-wise softmax of ``logits / temperature``.

    Args:
        logits: shape ``(n_images, n_classes)``.
        temperature: positive; above 1 softens, below 1 sharpens.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return np.asarray(postprocess.softmax(np.asarray(logits), temperature), dtype=np.float64)


def fit_temperature(logits: npt.ArrayLike, y_true: npt.ArrayLike, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature that minimises the negative log-likelihood of ``softmax(logits / T)`` (Guo et al. 2017).

    Args:
        logits: held-out (e.g. out-of-fold) logits, shape ``(n_images, n_classes)``.
        y_true: reference grades.
        bounds: search interval for the temperature.

    Returns:
        The fitted temperature. A value at either bound means the optimum may lie beyond it.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be a finite (n_images, n_classes) array, got shape {z.shape}")
    truth = _as_grades(y_true, z.shape[1], "y_true")
    if _same_length(logits=z, y_true=truth) == 0:
        raise ValueError("no images to fit a temperature on")
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    rows = np.arange(len(truth))

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, truth].mean())

    # Searching log T keeps the resolution relative across the interval.
    result = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def _binned_gap(confidence: FloatArray, outcome: FloatArray, n_bins: int) -> float:
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    n = len(confidence)
    if n == 0:
        return math.nan
    # Equal-width bins (lo, hi]; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    confidence_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    outcome_sum = np.bincount(bins, weights=outcome, minlength=n_bins)
    return float(np.abs(outcome_sum - confidence_sum).sum() / n)


def expected_calibration_error(probs: npt.ArrayLike, y_true: npt.ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: the binned gap between confidence and accuracy.

    Args:
        probs: per-class probabilities, shape ``(n_images, n_classes)``.
        y_true: reference grades.
        n_bins: number of equal-width confidence bins on [0, 1].

    Returns:
        ECE in [0, 1]; NaN for no images.
    """
    p = _as_probs(probs)
    truth = _as_grades(y_true, p.shape[1], "y_true")
    _same_length(probs=p, y_true=truth)
    correct = (p.argmax(axis=1) == truth).astype(np.float64)
    return _binned_gap(p.max(axis=1), correct, n_bins)


def referable_calibration_error(
    p_referable: npt.ArrayLike, referable_true: npt.ArrayLike, n_bins: int = ECE_BINS
) -> float:
    """Expected calibration error of P(referable): binned gap between predicted and observed referral rate.

    Args:
        p_referable: predicted probability that each image is referable.
        referable_true: whether each image is referable by its reference grade.
        n_bins: number of equal-width probability bins on [0, 1].

    Returns:
        ECE in [0, 1]; NaN for no images.
    """
    p = _as_scores(p_referable, "p_referable")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("p_referable must lie in [0, 1]")
    truth = _as_binary(referable_true, "referable_true")
    _same_length(p_referable=p, referable_true=truth)
    return _binned_gap(p, truth.astype(np.float64), n_bins)


# --------------------------------------------------------------------------------------------------------
# Referable operating point
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on the referable score and what it achieves on the data it was chosen on.

    Attributes:
        threshold: an image is referred when its score is at least this.
        sensitivity: share of referable images referred.
        specificity: share of non-referable images not referred.
        min_sensitivity: the sensitivity that was asked for.
        constraint_met: whether ``sensitivity >= min_sensitivity`` was reached without referring every
            image; when False the threshold maximises Youden's J instead.
        method: ``"max_specificity"`` or ``"youden"``.
    """

    threshold: float
    sensitivity: float
    specificity: float
    min_sensitivity: float
    constraint_met: bool
    method: Literal["max_specificity", "youden"]


def choose_operating_point(
    scores: npt.ArrayLike, referable_true: npt.ArrayLike, min_sensitivity: float = 0.90
) -> OperatingPoint:
    """The referable threshold with the highest specificity among those reaching ``min_sensitivity``.

    Referring every image always reaches any sensitivity, so it does not count as meeting the target: when
    only that point reaches it, the model cannot deliver the target at a useful threshold, and the
    threshold maximising Youden's J (sensitivity + specificity - 1) is returned with
    ``constraint_met=False``. Ties in specificity go to the higher sensitivity.

    Args:
        scores: referable score per image (e.g. P(referable)); higher means more likely referable.
        referable_true: whether each image is referable by its reference grade.
        min_sensitivity: target sensitivity in [0, 1].

    Returns:
        The chosen operating point.
    """
    if not 0.0 <= min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must lie in [0, 1], got {min_sensitivity}")
    values = _as_scores(scores, "scores")
    truth = _as_binary(referable_true, "referable_true")
    _same_length(scores=values, referable_true=truth)
    if truth.all() or not truth.any():
        raise ValueError("choosing an operating point needs both referable and non-referable images")

    fpr, tpr, thresholds = roc_curve(truth, values, drop_intermediate=False)
    # The first point (threshold +inf) refers nobody; every other threshold is an observed score.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    specificity = 1.0 - fpr
    useful = (tpr >= min_sensitivity) & (specificity > 0.0)
    if useful.any():
        # lexsort sorts by its last key first: specificity, then sensitivity.
        i = int(np.flatnonzero(useful)[np.lexsort((tpr[useful], specificity[useful]))[-1]])
        method: Literal["max_specificity", "youden"] = "max_specificity"
    else:
        i = int(np.lexsort((tpr, tpr - fpr))[-1])
        method = "youden"
    return OperatingPoint(
        threshold=float(thresholds[i]),
        sensitivity=float(tpr[i]),
        specificity=float(specificity[i]),
        min_sensitivity=float(min_sensitivity),
        constraint_met=method == "max_specificity",
        method=method,
    )


# --------------------------------------------------------------------------------------------------------
# Confidence intervals
# --------------------------------------------------------------------------------------------------------


def wilson_interval(successes: int, total: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a proportion such as sensitivity or specificity.

    Args:
        successes: e.g. referable images referred.
        total: e.g. referable images; must be positive.
        alpha: one minus the confidence level.

    Returns:
        (lower, upper).
    """
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total > 0, got {successes}/{total}")
    z = float(norm.ppf(1.0 - alpha / 2.0))
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # At 0 or all successes the bound is exactly 0 or 1; rounding alone would leave 1 - 1e-16.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: npt.ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: npt.ArrayLike | None = None,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of a metric, resampling images or whole groups of images.

    Images of one patient (or one duplicate group) are not independent; passing ``groups`` resamples
    groups with replacement and keeps each group's images together, which widens the interval honestly.

    Args:
        metric_fn: computes the metric from the arrays, indexed alike along the first axis. It should
            return NaN when a resample leaves the metric undefined (e.g. an AUC with one class); such
            resamples are dropped.
        *arrays: the metric's inputs, all the same length.
        n_boot: number of resamples.
        seed: seed of the resampling generator.
        alpha: one minus the confidence level.
        groups: optional group label per image (patient id, duplicate group).

    Returns:
        (point estimate on all data, lower bound, upper bound); the bounds are NaN when no resample gave a
        finite value.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    data = [np.asarray(a) for a in arrays]
    n = _same_length(**{f"array{i}": a for i, a in enumerate(data)})
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one image")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    point = float(metric_fn(*data))
    rng = np.random.default_rng(seed)

    if groups is None:
        draws = (rng.integers(0, n, size=n) for _ in range(n_boot))
    else:
        group_labels = np.asarray(groups)
        if len(group_labels) != n:
            raise ValueError(f"groups has length {len(group_labels)}, expected {n}")
        _, group_index = np.unique(group_labels, return_inverse=True)
        members = np.argsort(group_index, kind="stable")
        sizes = np.bincount(group_index)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        n_groups = len(sizes)

        def group_draw() -> IntArray:
            chosen = rng.integers(0, n_groups, size=n_groups)
            lengths = sizes[chosen]
            # Offsets 0..len-1 within each chosen group, added to that group's start in `members`.
            offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            return np.asarray(members[np.repeat(starts[chosen], lengths) + offsets], dtype=np.int64)

        draws = (group_draw() for _ in range(n_boot))

    replicates = np.array([float(metric_fn(*(a[idx] for a in data))) for idx in draws])
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return point, math.nan, math.nan
    low, high = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(low), float(high)


# --------------------------------------------------------------------------------------------------------
# Everything `retinagrade evaluate` reports
# --------------------------------------------------------------------------------------------------------


def _auc_or_nan(referable_true: npt.NDArray[Any], scores: npt.NDArray[Any]) -> float:
    positives = np.asarray(referable_true, dtype=bool)
    if positives.all() or not positives.any():
        return math.nan
    # ROC AUC in its Mann-Whitney form, equal to roc_auc_score (ties count one half): the bootstrap calls this
    # a thousand times per report, and roc_auc_score's input checks cost thirty times the arithmetic.
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _estimate(value: float, low: float, high: float) -> dict[str, float | None]:
    return {"value": _finite_or_none(value), "ci_low": _finite_or_none(low), "ci_high": _finite_or_none(high)}


def _proportion(successes: int, total: int, alpha: float) -> dict[str, float | None] | None:
    if total == 0:
        return None
    low, high = wilson_interval(successes, total, alpha)
    return _estimate(successes / total, low, high)


def evaluate_predictions(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    predicted_grade: npt.ArrayLike,
    referable_score: npt.ArrayLike,
    referable_threshold: float,
    groups: npt.ArrayLike | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    referred: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """All evaluation metrics for one set of graded images, as a JSON-ready dict.

    Args:
        y_true: reference ICDR grades.
        probs: calibrated per-grade probabilities, shape ``(n_images, NUM_GRADES)``.
        predicted_grade: the grade the product reports (argmax or thresholded expected grade).
        referable_score: the score the referral decision thresholds, usually P(referable).
        referable_threshold: an image is referred when its score is at least this.
        groups: optional patient / duplicate-group label per image; bootstrap intervals then resample
            groups.
        n_boot: bootstrap resamples for the kappa and AUC intervals.
        alpha: one minus the confidence level of every interval.
        seed: seed of the bootstrap.
        referred: the referral decision per image when it is more than ``score >= referable_threshold``
            (the product refers a referable grade as well, :func:`retinagrade.training.decisions.referred`).

    Returns:
        A dict of plain Python values. Interval-bearing metrics are ``{"value", "ci_low", "ci_high"}``;
        metrics that are undefined on this data (recall of an absent grade, AUC with one referable class,
        sensitivity without referable images) are None, with a note in ``"notes"``.
    """
    truth = _as_grades(y_true, NUM_GRADES, "y_true")
    pred = _as_grades(predicted_grade, NUM_GRADES, "predicted_grade")
    p = _as_probs(probs)
    if p.shape[1] != NUM_GRADES:
        raise ValueError(f"probs must have {NUM_GRADES} columns, got {p.shape[1]}")
    score = _as_scores(referable_score, "referable_score")
    n = _same_length(y_true=truth, probs=p, predicted_grade=pred, referable_score=score)
    if n == 0:
        raise ValueError("no images to evaluate")
    group_labels = None if groups is None else np.asarray(groups)
    if group_labels is not None and len(group_labels) != n:
        raise ValueError(f"groups has length {len(group_labels)}, expected {n}")
    notes: list[str] = []

    confusion = confusion_matrix(truth, pred)
    support = confusion.sum(axis=1)
    predicted_counts = confusion.sum(axis=0)
    per_grade = []
    for grade, name in enumerate(GRADE_NAMES):
        hits = int(confusion[grade, grade])
        per_grade.append(
            {
                "grade": grade,
                "name": name,
                "support": int(support[grade]),
                "predicted": int(predicted_counts[grade]),
                "recall": hits / int(support[grade]) if support[grade] else None,
                "precision": hits / int(predicted_counts[grade]) if predicted_counts[grade] else None,
            }
        )
    absent = [GRADE_NAMES[g] for g in range(NUM_GRADES) if support[g] == 0]
    if absent:
        notes.append(f"no reference images of grade(s) {', '.join(absent)}: their recall is undefined")

    qwk = bootstrap_ci(
        quadratic_weighted_kappa, truth, pred, n_boot=n_boot, seed=seed, alpha=alpha, groups=group_labels
    )
    if not math.isfinite(qwk[0]):
        notes.append("quadratic weighted kappa is undefined: one grade only in both reference and prediction")

    referable_true = is_referable(truth)
    refer = score >= referable_threshold if referred is None else _as_binary(referred, "referred")
    tp = int(np.sum(referable_true & refer))
    fn = int(np.sum(referable_true & ~refer))
    tn = int(np.sum(~referable_true & ~refer))
    fp = int(np.sum(~referable_true & refer))
    if referable_true.all() or not referable_true.any():
        auc: dict[str, float | None] | None = None
        notes.append("referable AUC is undefined: the reference holds only one referable class")
    else:
        auc = _estimate(
            *bootstrap_ci(
                _auc_or_nan, referable_true, score, n_boot=n_boot, seed=seed, alpha=alpha, groups=group_labels
            )
        )

    return {
        "n_images": n,
        "n_groups": None if group_labels is None else len(np.unique(group_labels)),
        "ci_level": 1.0 - alpha,
        "ci_method": {
            "qwk_auc": f"percentile bootstrap, {n_boot} resamples of "
            + ("groups" if group_labels is not None else "images"),
            "sensitivity_specificity": "Wilson score",
        },
        "grade_names": list(GRADE_NAMES),
        "qwk": _estimate(*qwk),
        "accuracy": float(np.mean(truth == pred)),
        "per_grade": per_grade,
        "confusion_matrix": confusion.tolist(),
        "ece_bins": ECE_BINS,
        "top_label_ece": expected_calibration_error(p, truth),
        "referable": {
            "min_grade": REFERABLE_MIN_GRADE,
            "threshold": float(referable_threshold),
            "auc": auc,
            "sensitivity": _proportion(tp, tp + fn, alpha),
            "specificity": _proportion(tn, tn + fp, alpha),
            "counts": {"tp": tp, "fn": fn, "tn": tn, "fp": fp, "positives": tp + fn, "negatives": tn + fp},
            "ece": referable_calibration_error(referable_probability(p), referable_true),
        },
        "notes": notes,
    }
