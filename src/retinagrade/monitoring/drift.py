"""Drift watch: does what the service sees still look like what the operating point was fitted on?

A new camera, a dirty lens, a different population or a changed capture protocol moves the distributions of
the pipeline's own outputs before anyone notices the grades are off. The service keeps a rolling window of
the last images it answered and compares, per signal, the window's distribution with a reference recorded
when the operating point was fitted (the site's calibration sample, or the model's validation data), by the
population stability index

    PSI = sum_b (w_b - r_b) * ln(w_b / r_b)

over bins ``b`` of the reference (quantile bins for continuous signals, categories for the others), with both
shares floored at :data:`PSI_FLOOR` so that an empty bin does not make it infinite. The usual reading
(Siddiqi, "Credit Risk Scorecards", 2006): below 0.1 no shift, 0.1-0.25 a moderate shift, above 0.25 a
shift that needs investigation, :data:`PSI_ALERT`.

Signals: ``p_referable`` (calibrated P(grade >= 2) of graded images), ``quality`` (the gate's score of every
decoded image), ``ungradable`` and ``not_fundus`` (the share of answers with that status) and ``grade`` (the
mix of reported grades). Plain numpy, no state outside the monitor object.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from retinagrade.constants import NUM_GRADES

if TYPE_CHECKING:
    from retinagrade.pipeline import GradeResult

REFERENCE_FORMAT = "retinagrade-drift-reference/1"
SIGNALS: tuple[str, ...] = ("p_referable", "quality", "ungradable", "not_fundus", "grade")
#: Smallest share a bin is given, for both distributions, so that an empty bin costs a bounded amount.
PSI_FLOOR = 1e-3
#: The conventional level of a shift that needs investigating; the Prometheus alert uses the same number.
PSI_ALERT = 0.25
DEFAULT_WINDOW = 500
#: Fewer observations than this in the window (per signal) give no PSI (NaN): the noise would dominate.
DEFAULT_MIN_COUNT = 100

SignalKind = Literal["continuous", "categorical"]


@dataclass(frozen=True)
class Observation:
    """What the drift watch keeps of one answered image.

    Attributes:
        status: ``graded``, ``ungradable`` or ``not_fundus``.
        quality: the gate's gradability score, for any decoded image.
        p_referable: calibrated P(referable), for a graded image.
        grade: the reported grade, for a graded image.
    """

    status: str
    quality: float | None
    p_referable: float | None = None
    grade: int | None = None

    @classmethod
    def of(cls, result: GradeResult) -> Observation:
        decision = result.decision
        return cls(
            status=result.status,
            quality=result.quality.score,
            p_referable=None if decision is None else decision.p_referable,
            grade=None if decision is None else decision.grade,
        )


@dataclass(frozen=True)
class SignalReference:
    """One signal's reference distribution: bin edges (continuous only) and the share in each bin."""

    kind: SignalKind
    fractions: tuple[float, ...]
    n: int
    edges: tuple[float, ...] = ()

    def bin_counts(self, values: np.ndarray) -> np.ndarray:
        """Counts of ``values`` in this reference's bins."""
        if self.kind == "continuous":
            index = np.searchsorted(np.asarray(self.edges), values, side="right")
        else:
            index = values.astype(np.int64)
        return np.bincount(index, minlength=len(self.fractions))[: len(self.fractions)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "edges": list(self.edges), "fractions": list(self.fractions), "n": self.n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignalReference:
        kind = data["kind"]
        if kind not in ("continuous", "categorical"):
            raise ValueError(f"unknown signal kind {kind!r}")
        fractions = tuple(float(f) for f in data["fractions"])
        edges = tuple(float(e) for e in data.get("edges", ()))
        if kind == "continuous" and len(edges) != len(fractions) - 1:
            raise ValueError("a continuous signal needs one edge fewer than bins")
        if not fractions or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
            raise ValueError("bin fractions must be non-negative and sum to 1")
        return cls(kind=kind, fractions=fractions, n=int(data["n"]), edges=edges)


def population_stability_index(observed: np.ndarray, expected: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """PSI between two distributions over the same bins (counts or shares; each is normalised).

    Returns:
        PSI >= 0; NaN when either distribution is empty.
    """
    obs = np.asarray(observed, dtype=np.float64)
    exp = np.asarray(expected, dtype=np.float64)
    if obs.shape != exp.shape:
        raise ValueError(f"distributions over different bins: {obs.shape} vs {exp.shape}")
    if obs.sum() <= 0 or exp.sum() <= 0:
        return math.nan
    w = np.maximum(obs / obs.sum(), floor)
    r = np.maximum(exp / exp.sum(), floor)
    return float(np.sum((w - r) * np.log(w / r)))


def _signal_values(observations: Iterable[Observation], signal: str) -> np.ndarray:
    """The values one signal takes over ``observations`` (images it does not apply to are left out)."""
    if signal == "p_referable":
        return np.array([o.p_referable for o in observations if o.p_referable is not None], dtype=np.float64)
    if signal == "quality":
        return np.array([o.quality for o in observations if o.quality is not None], dtype=np.float64)
    if signal == "grade":
        return np.array([o.grade for o in observations if o.grade is not None], dtype=np.int64)
    if signal in ("ungradable", "not_fundus"):
        return np.array([o.status == signal for o in observations], dtype=np.int64)
    raise ValueError(f"unknown drift signal {signal!r}")


def _continuous_reference(values: np.ndarray) -> SignalReference:
    # Quantile bins hold equal shares of the reference; fewer bins for a small reference, since the PSI of
    # two samples of the same distribution grows with (bins - 1) / n.
    n_bins = int(np.clip(len(values) // 20, 3, 10))
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return SignalReference(
        "continuous", tuple(float(c) for c in counts / counts.sum()), len(values), tuple(float(e) for e in edges)
    )


def build_reference(observations: Iterable[Observation], min_count: int = 20) -> dict[str, Any]:
    """The reference document of the signals over a sample (a site's calibration sample, a validation set).

    Signals with fewer than ``min_count`` observations (e.g. P(referable) when almost nothing was graded) are
    left out rather than stored with a meaningless shape.
    """
    items = list(observations)
    signals: dict[str, Any] = {}
    for signal in SIGNALS:
        values = _signal_values(items, signal)
        if len(values) < min_count:
            continue
        if signal in ("p_referable", "quality"):
            reference = _continuous_reference(values)
        else:
            categories = NUM_GRADES if signal == "grade" else 2
            counts = np.bincount(values, minlength=categories)
            reference = SignalReference("categorical", tuple(float(c) for c in counts / counts.sum()), len(values))
        signals[signal] = reference.to_dict()
    return {"format": REFERENCE_FORMAT, "n_images": len(items), "signals": signals}


def parse_reference(data: Mapping[str, Any]) -> dict[str, SignalReference]:
    """Signal references from a document written by :func:`build_reference`."""
    if data.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"drift reference format {data.get('format')!r} is not {REFERENCE_FORMAT!r}")
    return {name: SignalReference.from_dict(item) for name, item in dict(data["signals"]).items() if name in SIGNALS}


class DriftMonitor:
    """A rolling window of the last answers and each signal's PSI against the reference. Thread-safe."""

    def __init__(
        self, reference: Mapping[str, Any], window: int = DEFAULT_WINDOW, min_count: int = DEFAULT_MIN_COUNT
    ) -> None:
        if window < 1 or min_count < 1:
            raise ValueError("window and min_count must be positive")
        self.references = parse_reference(reference)
        self.min_count = min_count
        self._window: deque[Observation] = deque(maxlen=window)
        self._lock = threading.Lock()

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(self.references)

    def observe(self, observation: Observation) -> None:
        with self._lock:
            self._window.append(observation)

    def extend(self, observations: Iterable[Observation]) -> None:
        with self._lock:
            self._window.extend(observations)

    def __len__(self) -> int:
        return len(self._window)

    def psi(self) -> dict[str, float]:
        """PSI per signal over the current window; NaN for a signal with fewer than ``min_count`` values."""
        with self._lock:
            items = list(self._window)
        result: dict[str, float] = {}
        for signal, reference in self.references.items():
            values = _signal_values(items, signal)
            if len(values) < self.min_count:
                result[signal] = math.nan
                continue
            result[signal] = population_stability_index(
                reference.bin_counts(values), np.asarray(reference.fractions, dtype=np.float64)
            )
        return result
