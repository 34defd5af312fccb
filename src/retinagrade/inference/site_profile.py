"""Site profiles: a clinic's own operating point for the model, fitted on its locally graded photos.

A model's global threshold is chosen on the training sources; a new camera or population moves the score
distribution (issue 12: specificity 0.67 on one camera, sensitivity 0.45 on another). ``retinagrade
calibrate`` fits a temperature, the referable threshold and optionally the grade cut-points on a site's
photos and writes them here, together with the evidence (sample, metrics before and after, the drift
reference). Serving applies a profile by replacing those fields of the :class:`ModelSpec`; nothing else
about the model changes, and a profile fitted for another model (another sha256) is refused.

Plain JSON, no training dependencies: the serving path reads profiles.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinagrade.constants import NUM_GRADES
from retinagrade.errors import SiteProfileError
from retinagrade.inference.model_spec import DECISION_RULES, Decision, ModelSpec, OperatingPoint

PROFILE_FORMAT_VERSION = 1
#: The name of a site's own operating point in every answer graded with its profile.
SITE_POINT = "site"
#: Site names appear in HTTP headers, metric labels and CSV cells: keep them plain.
SITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SiteProfile:
    """A fitted site profile.

    Attributes:
        name: the site's name (letters, digits, ``_ . -``); every answer graded with it carries it.
        model_sha256: the ONNX model the profile was fitted for; any other model is refused.
        created: ISO date the profile was fitted.
        temperature: softmax temperature replacing the spec's.
        referable_threshold: P(referable) at or above which an eye is referred at this site.
        decision_thresholds: cut-points of the grade rule's score, or None to keep the spec's.
        decision_rule: the site's own grade rule (``expected_grade`` with its cut-points), or None for the
            model's.
        min_sensitivity: the sensitivity target the threshold was chosen for.
        sample: what the profile was fitted on (images, graded images, counts per grade, referable count).
        fit: how the parameters were chosen (rule, confidence bound, whether the bound was met, folds).
        metrics_before: the model's global operating point on the local sample.
        metrics_after: the site's operating point, cross-validated within the sample.
        drift_reference: distributions of the monitored signals on the local sample
            (see :mod:`retinagrade.monitoring.drift`); empty when none was recorded.
        path: where the profile was read from, if anywhere.
    """

    name: str
    model_sha256: str
    created: str
    temperature: float
    referable_threshold: float
    decision_thresholds: tuple[float, ...] | None = None
    decision_rule: str | None = None
    min_sensitivity: float = 0.90
    sample: Mapping[str, Any] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)
    metrics_before: Mapping[str, Any] = field(default_factory=dict)
    metrics_after: Mapping[str, Any] = field(default_factory=dict)
    drift_reference: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if not SITE_NAME_PATTERN.match(self.name):
            raise SiteProfileError(
                f"site name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                "or digit"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SiteProfileError(f"site profile {self.name}: temperature must be positive")
        if not 0.0 <= self.referable_threshold <= 1.0:
            raise SiteProfileError(f"site profile {self.name}: referable threshold must lie in [0, 1]")
        cuts = self.decision_thresholds
        if cuts is not None and (
            len(cuts) != NUM_GRADES - 1
            or not all(math.isfinite(c) for c in cuts)
            or any(b <= a for a, b in itertools.pairwise(cuts))
        ):
            raise SiteProfileError(
                f"site profile {self.name}: decision thresholds must be {NUM_GRADES - 1} increasing numbers"
            )
        if self.decision_rule is not None and (self.decision_rule not in DECISION_RULES or cuts is None):
            raise SiteProfileError(
                f"site profile {self.name}: decision rule must be one of {', '.join(DECISION_RULES)}, with its "
                "thresholds"
            )

    # -- reading and writing ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path | None = None) -> SiteProfile:
        """Parse a profile document; a wrong format or missing field is a :class:`SiteProfileError`."""
        where = f"site profile {path}" if path is not None else "site profile"
        if data.get("format_version") != PROFILE_FORMAT_VERSION:
            raise SiteProfileError(f"{where}: format {data.get('format_version')} is not {PROFILE_FORMAT_VERSION}")
        try:
            params = data["parameters"]
            cuts = params.get("decision_thresholds")
            return cls(
                name=str(data["name"]),
                model_sha256=str(data["model"]["sha256"]),
                created=str(data["created"]),
                temperature=float(params["temperature"]),
                referable_threshold=float(params["referable_threshold"]),
                decision_thresholds=None if cuts is None else tuple(float(c) for c in cuts),
                decision_rule=None if params.get("decision_rule") is None else str(params["decision_rule"]),
                min_sensitivity=float(params.get("min_sensitivity", 0.90)),
                sample=dict(data.get("sample", {})),
                fit=dict(data.get("fit", {})),
                metrics_before=dict(data.get("metrics_before", {})),
                metrics_after=dict(data.get("metrics_after", {})),
                drift_reference=dict(data.get("drift_reference", {})),
                path=path,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SiteProfileError(f"{where} is incomplete or malformed: {exc!r}") from exc

    @classmethod
    def load(cls, path: str | Path) -> SiteProfile:
        """Read a profile written by ``retinagrade calibrate``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SiteProfileError(f"site profile {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SiteProfileError(f"site profile {path} cannot be read: {exc}") from exc
        if not isinstance(data, dict):
            raise SiteProfileError(f"site profile {path} is not a JSON object")
        return cls.from_dict(data, path=path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`from_dict` reads back."""
        return {
            "format_version": PROFILE_FORMAT_VERSION,
            "name": self.name,
            "created": self.created,
            "model": {"sha256": self.model_sha256},
            "parameters": {
                "temperature": self.temperature,
                "referable_threshold": self.referable_threshold,
                "decision_thresholds": None if self.decision_thresholds is None else list(self.decision_thresholds),
                "decision_rule": self.decision_rule,
                "min_sensitivity": self.min_sensitivity,
            },
            "sample": dict(self.sample),
            "fit": dict(self.fit),
            "metrics_before": dict(self.metrics_before),
            "metrics_after": dict(self.metrics_after),
            "drift_reference": dict(self.drift_reference),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    # -- use --------------------------------------------------------------------------------------------
    def check_model(self, spec: ModelSpec) -> None:
        """Refuse a model the profile was not fitted for: its operating point means nothing elsewhere."""
        if spec.sha256 != self.model_sha256:
            raise SiteProfileError(
                f"site profile {self.name!r} was fitted for model sha256 {self.model_sha256[:12]}..., but the "
                f"loaded model {spec.name} {spec.version} is {spec.sha256[:12]}...; run `retinagrade calibrate` "
                "again with this model"
            )

    def apply(self, spec: ModelSpec) -> ModelSpec:
        """The spec with this site's temperature, (if fitted) grade rule, and its threshold as the point ``site``.

        The model's named points stay available (a request may still ask for ``sensitive``); they then read the
        site's calibrated probabilities, which is what a threshold on a calibrated risk means.

        Raises:
            SiteProfileError: the profile belongs to another model.
        """
        self.check_model(spec)
        decision = spec.decision
        if self.decision_rule is not None:
            decision = Decision(self.decision_rule, self.decision_thresholds or decision.thresholds)
        elif self.decision_thresholds is not None:
            decision = dataclasses.replace(decision, thresholds=self.decision_thresholds)
        point = OperatingPoint(
            SITE_POINT,
            self.referable_threshold,
            f"site profile {self.name}: fitted on its own graded photos for sensitivity >= {self.min_sensitivity:.2f}",
        )
        return dataclasses.replace(spec, temperature=self.temperature, decision=decision).with_added_point(point)

    def public_card(self) -> dict[str, Any]:
        """What the service may show about the profile (no paths; the drift reference is left out)."""
        card = self.to_dict()
        card.pop("drift_reference")
        return card


def load_profiles(paths: list[Path], spec: ModelSpec) -> dict[str, SiteProfile]:
    """Load several profiles for one model, keyed by name; duplicate names and foreign models are refused."""
    profiles: dict[str, SiteProfile] = {}
    for path in paths:
        profile = SiteProfile.load(path)
        profile.check_model(spec)
        if profile.name in profiles:
            raise SiteProfileError(
                f"two site profiles are named {profile.name!r} ({profiles[profile.name].path}, {path})"
            )
        profiles[profile.name] = profile
    return profiles
