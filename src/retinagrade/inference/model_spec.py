"""The model spec: the JSON file shipped beside the ONNX model that says how to feed and read it.

Everything a front door needs to use the model comes from here (preprocessing, grade names, calibration,
decision rule, referable operating point, out-of-distribution statistics), so nothing is retyped.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from retinagrade.constants import GRADE_NAMES, REFERABLE_MIN_GRADE
from retinagrade.errors import ModelError, UnknownOperatingPointError
from retinagrade.files import sha256_file
from retinagrade.preprocessing.pipeline import PreprocessConfig

SPEC_FORMAT_VERSION = 1
DECISION_RULES = ("argmax", "expected_grade", "regression")
#: The network's outputs, by ONNX output name (declared once; training exports them, serving reads them).
OUTPUT_NAMES = ("logits", "regression", "cam", "embedding")
#: Channels of the ``cam`` output: one class-activation map per grade logit, then the regression (severity).
CAM_CHANNELS = (*(f"grade{k}" for k in range(len(GRADE_NAMES))), "regression")
#: Optional output of models with a macular-oedema head (0.3.0 on): N x 1 DME logit, appended after
#: :data:`OUTPUT_NAMES`; its class-activation map is appended to the ``cam`` channels under the same name.
#: Models without it (0.2.0) declare neither and still load.
DME_OUTPUT = "dme"
_OUTPUT_DESCRIPTIONS = {
    "logits": "N x 5 grade logits (divide by calibration.temperature before softmax)",
    "regression": "N x 1 grade as a number",
    "cam": "N x C x h x w class-activation maps, channels named by cam_channels; spatial mean = output",
    "embedding": "N x C pooled features",
    DME_OUTPUT: "N x 1 diabetic macular oedema logit (uncalibrated)",
}


def write_gate_checksums(spec_path: Path) -> dict[str, str]:
    """List the spec's gate file and the detector file it names with their sha256 in ``gate_files``.

    Called by whoever writes a gate or a spec (``retinagrade fit-gate``, the export), so the two cannot be
    shipped out of step. Returns the checksums written.
    """
    data = json.loads(spec_path.read_text(encoding="utf-8"))
    gate_name = data.get("gate_file")
    if not gate_name:
        raise ModelError(f"model spec {spec_path.name} names no gate file")
    base = spec_path.parent
    files = [str(gate_name)]
    gate = json.loads((base / gate_name).read_text(encoding="utf-8"))
    if isinstance(gate.get("detector"), dict):
        files.append(str(Path(gate_name).parent / gate["detector"]["file"]))
    data["gate_files"] = {name: sha256_file(base / name) for name in files}
    spec_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return dict(data["gate_files"])


@dataclass(frozen=True)
class Decision:
    """How a grade is read from the outputs.

    ``argmax`` takes the most probable calibrated grade; ``expected_grade`` cuts the probability-weighted
    mean grade at ``thresholds``; ``regression`` cuts the regression output at ``thresholds``.
    """

    rule: str = "argmax"
    thresholds: tuple[float, ...] = (0.5, 1.5, 2.5, 3.5)

    def __post_init__(self) -> None:
        if self.rule not in DECISION_RULES:
            raise ModelError(f"unknown decision rule {self.rule!r}")
        if len(self.thresholds) != len(GRADE_NAMES) - 1 or any(b <= a for a, b in itertools.pairwise(self.thresholds)):
            raise ModelError(f"decision thresholds must be {len(GRADE_NAMES) - 1} increasing numbers")


#: Operating-point names appear in HTTP headers, CSV cells and metric labels: keep them plain.
OPERATING_POINT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
#: The name a spec without named operating points gives its one threshold.
LEGACY_POINT = "default"


@dataclass(frozen=True)
class OperatingPoint:
    """A named referral threshold on the calibrated P(grade >= 2).

    An eye is referred when its grade is referable or, with a grade 0-1, when its P(referable) reaches
    ``threshold``. Because P(referable) is calibrated, a threshold means the same risk on every camera; what
    differs between cameras is how well the model ranks, so each point carries its held-out sensitivity and
    specificity per source (in the spec's ``operating_points`` section, for people; not read here).

    Attributes:
        name: 1-16 lower-case letters, digits, ``_`` or ``-`` (``balanced``, ``sensitive``, ``site``): it is a
            DICOM code value in the SR, an HTTP header value and a CSV cell.
        threshold: the risk at or above which a grade 0-1 eye is referred.
        description: what the point trades, in one sentence.
    """

    name: str
    threshold: float
    description: str = ""

    def __post_init__(self) -> None:
        if not OPERATING_POINT_NAME.match(self.name):
            raise ValueError(f"operating point name {self.name!r} must be 1-16 lower-case letters, digits, _ or -")
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"operating point {self.name}: threshold must lie in [0, 1], got {self.threshold!r}")


def _operating_points(data: dict[str, Any]) -> tuple[dict[str, OperatingPoint], str]:
    """The named points of a spec and the default's name; a spec without them has one, ``default``."""
    section = data.get("operating_points")
    if section is None:
        threshold = float(data["referable"]["threshold"])
        return {LEGACY_POINT: OperatingPoint(LEGACY_POINT, threshold, "the model's one referable threshold")}, (
            LEGACY_POINT
        )
    points = {
        str(name): OperatingPoint(str(name), float(point["threshold"]), str(point.get("description", "")))
        for name, point in dict(section["points"]).items()
    }
    default = str(section["default"])
    if default not in points:
        raise ValueError(f"the default operating point {default!r} is not among {sorted(points)}")
    return points, default


@dataclass(frozen=True)
class DmeRule:
    """How the DME output becomes an answer: Platt scaling of its logit, then a threshold of its own.

    ``p_dme = sigmoid(scale * logit + bias)``; oedema is reported (and referred) when ``p_dme >= threshold``.
    """

    scale: float
    bias: float
    threshold: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and math.isfinite(self.bias) and 0.0 < self.threshold < 1.0):
            raise ValueError(f"DME rule needs a finite scale and bias and a threshold in (0, 1), got {self!r}")

    def probability(self, logit: float) -> float:
        z = self.scale * float(logit) + self.bias
        return float(1.0 / (1.0 + math.exp(-z))) if z >= 0 else float(math.exp(z) / (1.0 + math.exp(z)))


def dme_rule_of(section: Any) -> DmeRule | None:
    """The DME rule of a spec's (or a LOSO report's) ``dme`` section; None without one."""
    if not section:
        return None
    calibration = section["calibration"]
    return DmeRule(float(calibration["scale"]), float(calibration["bias"]), float(section["threshold"]))


def _fellow_eye(section: Any) -> FellowEyeRule | None:
    if section is None:
        return None
    weight, threshold = float(section["weight"]), float(section["referable_threshold"])
    if not 0.0 <= weight < 1.0 or not 0.0 < threshold < 1.0:
        raise ValueError(f"fellow_eye weight must be in [0, 1) and its threshold in (0, 1), got {section!r}")
    return FellowEyeRule(weight=weight, referable_threshold=threshold)


@dataclass(frozen=True)
class FellowEyeRule:
    """How an eye's answer takes in the other eye of the same patient (:func:`retinagrade.eyes.fuse_logits`).

    ``weight`` moves an eye's logits toward the mean of its fellow eye's; ``referable_threshold`` is the
    operating point of the fused P(referable), chosen like the single-image one on held-out predictions.
    """

    weight: float
    referable_threshold: float


@dataclass(frozen=True)
class ModelSpec:
    """Parsed model spec. ``path`` is the spec file; the ONNX file lies beside it.

    ``referable_threshold`` is the threshold of the operating point in use, ``operating_point`` its name;
    :meth:`with_operating_point` switches to another of ``operating_points`` (a site profile may add its own,
    :meth:`retinagrade.inference.site_profile.SiteProfile.apply`).
    """

    name: str
    version: str
    model_file: str
    sha256: str
    preprocess: PreprocessConfig
    temperature: float
    decision: Decision
    referable_threshold: float
    grade_names: tuple[str, ...] = GRADE_NAMES
    referable_min_grade: int = REFERABLE_MIN_GRADE
    ood: dict[str, Any] = field(default_factory=dict)
    gate_file: str | None = None
    gate_files: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    outputs: tuple[str, ...] = OUTPUT_NAMES
    cam_channels: tuple[str, ...] = CAM_CHANNELS
    fellow_eye: FellowEyeRule | None = None
    operating_point: str = LEGACY_POINT
    operating_points: Mapping[str, OperatingPoint] = field(default_factory=lambda: MappingProxyType({}))
    dme: DmeRule | None = None

    @property
    def default_operating_point(self) -> str:
        """The point the spec names as its default (the one an answer gets when nobody chose)."""
        section = self.raw.get("operating_points")
        if isinstance(section, dict) and section.get("default") in self.operating_points:
            return str(section["default"])
        return self.operating_point

    def with_operating_point(self, name: str | None) -> ModelSpec:
        """The spec read at the named operating point (None or empty: unchanged).

        Raises:
            UnknownOperatingPointError: the spec has no point of that name.
        """
        if not name:
            return self
        key = name.strip().lower()
        point = self.operating_points.get(key)
        if point is None:
            known = ", ".join(self.operating_points) or "none"
            raise UnknownOperatingPointError(f"No operating point named {name[:32]!r} (points: {known}).")
        return replace(self, operating_point=point.name, referable_threshold=point.threshold)

    def with_added_point(self, point: OperatingPoint) -> ModelSpec:
        """The spec with one more named point (a site's own), made the one in use."""
        points = {**self.operating_points, point.name: point}
        return replace(
            self,
            operating_points=MappingProxyType(points),
            operating_point=point.name,
            referable_threshold=point.threshold,
        )

    @property
    def severity_channel(self) -> int:
        """Index of the regression (severity) map in the ``cam`` output."""
        return self.cam_channels.index("regression")

    @property
    def model_path(self) -> Path:
        base = self.path.parent if self.path is not None else Path(".")
        return base / self.model_file

    @property
    def gate_path(self) -> Path | None:
        if self.gate_file is None:
            return None
        base = self.path.parent if self.path is not None else Path(".")
        return base / self.gate_file

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> ModelSpec:
        try:
            if data.get("format_version") != SPEC_FORMAT_VERSION:
                raise ModelError(f"model spec format {data.get('format_version')} is not {SPEC_FORMAT_VERSION}")
            decision = Decision(
                rule=data["decision"]["rule"], thresholds=tuple(float(t) for t in data["decision"]["thresholds"])
            )
            points, default = _operating_points(data)
            grade_names = tuple(data.get("grade_names", GRADE_NAMES))
            if grade_names != GRADE_NAMES:
                raise ModelError("the model's grade names do not match the ICDR grades this release knows")
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                model_file=str(data["model_file"]),
                sha256=str(data["sha256"]),
                preprocess=PreprocessConfig.from_dict(data["preprocess"]),
                temperature=float(data["calibration"]["temperature"]),
                decision=decision,
                referable_threshold=points[default].threshold,
                grade_names=grade_names,
                referable_min_grade=int(data["referable"].get("min_grade", REFERABLE_MIN_GRADE)),
                ood=dict(data.get("ood", {})),
                gate_file=data.get("gate_file"),
                gate_files={str(k): str(v) for k, v in dict(data.get("gate_files", {})).items()},
                raw=data,
                path=path,
                outputs=tuple(data.get("output_names", OUTPUT_NAMES)),
                cam_channels=tuple(data.get("cam_channels", CAM_CHANNELS)),
                fellow_eye=_fellow_eye(data.get("fellow_eye")),
                operating_point=default,
                operating_points=MappingProxyType(points),
                dme=dme_rule_of(data.get("dme")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model spec is incomplete or malformed: {exc!r}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The JSON form :meth:`from_dict` reads: typed fields win over the same keys in ``raw``.

        ``raw`` carries what only people read (training record, metrics, licence); nested sections the typed
        fields live in (calibration, decision, referable) keep their other keys.
        """
        data: dict[str, Any] = json.loads(json.dumps(self.raw, default=str))
        data.update(
            {
                "format_version": SPEC_FORMAT_VERSION,
                "name": self.name,
                "version": self.version,
                "model_file": self.model_file,
                "sha256": self.sha256,
                "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "size": self.preprocess.input_size},
                "output_names": list(self.outputs),
                "outputs": {n: _OUTPUT_DESCRIPTIONS.get(n, "") for n in self.outputs},
                "cam_channels": list(self.cam_channels),
                "preprocess": self.preprocess.to_dict(),
                "grade_names": list(self.grade_names),
                "ood": dict(self.ood),
            }
        )
        data["calibration"] = {**data.get("calibration", {}), "temperature": self.temperature}
        data["decision"] = {
            **data.get("decision", {}),
            "rule": self.decision.rule,
            "thresholds": list(self.decision.thresholds),
        }
        default = self.default_operating_point
        if self.operating_points and set(self.operating_points) != {LEGACY_POINT}:
            found = data.get("operating_points")
            section: dict[str, Any] = found if isinstance(found, dict) else {}
            old_points = section.get("points", {})
            data["operating_points"] = {
                **section,
                "default": default,
                "points": {
                    name: {
                        **(old_points.get(name, {}) if isinstance(old_points, dict) else {}),
                        "threshold": point.threshold,
                        "description": point.description,
                    }
                    for name, point in self.operating_points.items()
                },
            }
        default_threshold = (
            self.operating_points[default].threshold if default in self.operating_points else self.referable_threshold
        )
        data["referable"] = {
            **data.get("referable", {}),
            "min_grade": self.referable_min_grade,
            "threshold": default_threshold,
        }
        if self.gate_file is not None:
            data["gate_file"] = self.gate_file
        else:
            data.pop("gate_file", None)
        if self.gate_files:
            data["gate_files"] = dict(self.gate_files)
        else:
            data.pop("gate_files", None)
        if self.dme is not None:
            section = data.get("dme", {})
            data["dme"] = {
                **section,
                "calibration": {
                    **section.get("calibration", {}),
                    "method": "platt",
                    "scale": self.dme.scale,
                    "bias": self.dme.bias,
                },
                "threshold": self.dme.threshold,
            }
        else:
            data.pop("dme", None)
        if self.fellow_eye is not None:
            data["fellow_eye"] = {
                **data.get("fellow_eye", {}),
                "weight": self.fellow_eye.weight,
                "referable_threshold": self.fellow_eye.referable_threshold,
            }
        else:
            data.pop("fellow_eye", None)
        return data

    @classmethod
    def load(cls, path: str | Path, verify_checksum: bool = True) -> ModelSpec:
        """Read a spec (``*.json``) or find the spec beside an ONNX file, and check the model's checksum."""
        path = Path(path)
        if path.suffix == ".onnx":
            path = path.with_suffix(".json")
        if not path.is_file():
            raise ModelError(f"model spec {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"model spec {path} cannot be read: {exc}") from exc
        spec = cls.from_dict(data, path=path)
        if not spec.model_path.is_file():
            raise ModelError(f"model file {spec.model_path} named by {path.name} does not exist")
        if verify_checksum and sha256_file(spec.model_path) != spec.sha256:
            raise ModelError(f"model file {spec.model_path} does not match the sha256 in {path.name}")
        if verify_checksum:
            spec.verify_gate_files()
        return spec

    def verify_gate_files(self) -> None:
        """Check every gate file the spec lists (``gate.json``, the detector) against its sha256.

        An edited gate changes results while every answer reports the model's sha256, so a gate file that
        is not the one the spec was written with is refused like a wrong model file.

        Raises:
            ModelError: a listed file is missing or differs, or the spec's ``gate_file`` is not listed.
        """
        base = self.path.parent if self.path is not None else Path(".")
        if self.gate_file is not None and self.gate_files and self.gate_file not in self.gate_files:
            raise ModelError(f"gate file {self.gate_file} is not listed with a checksum in the model spec")
        for name, digest in self.gate_files.items():
            file = base / name
            if not file.is_file():
                raise ModelError(f"gate file {name} listed in the model spec does not exist")
            if sha256_file(file) != digest:
                raise ModelError(f"gate file {name} does not match the sha256 in the model spec")

    def public_card(self) -> dict[str, Any]:
        """What the service may show about the model (no paths)."""
        keys = (
            "name",
            "version",
            "sha256",
            "architecture",
            "intended_use",
            "training",
            "metrics",
            "referable",
            "operating_points",
            "decision",
            "calibration",
            "fellow_eye",
            "dme",
            "preprocess",
            "grade_names",
            "limitations",
            "license",
        )
        return {k: self.raw[k] for k in keys if k in self.raw}
