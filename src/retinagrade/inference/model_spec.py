"""The model spec: the JSON file shipped beside the ONNX model that says how to feed and read it.

Everything a front door needs to use the model comes from here (preprocessing, grade names, calibration,
decision rule, referable operating point, out-of-distribution statistics), so nothing is retyped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinagrade.constants import GRADE_NAMES, REFERABLE_MIN_GRADE
from retinagrade.errors import ModelError
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Decision:
    """How a grade is read from the outputs.

    ``argmax`` takes the most probable calibrated grade; ``expected_grade`` cuts the probability-weighted
    mean grade at ``thresholds``; ``regression`` cuts the regression output at ``thresholds``.
    """

    rule: str = "argmax"
    thresholds: tuple[float, ...] = (0.5, 1.5, 2.5, 3.5)


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
    """Parsed model spec. ``path`` is the spec file; the ONNX file lies beside it."""

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
            if decision.rule not in DECISION_RULES:
                raise ModelError(f"unknown decision rule {decision.rule!r}")
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
                referable_threshold=float(data["referable"]["threshold"]),
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
        data["referable"] = {
            **data.get("referable", {}),
            "min_grade": self.referable_min_grade,
            "threshold": self.referable_threshold,
        }
        if self.gate_file is not None:
            data["gate_file"] = self.gate_file
        else:
            data.pop("gate_file", None)
        if self.gate_files:
            data["gate_files"] = dict(self.gate_files)
        else:
            data.pop("gate_files", None)
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
            "decision",
            "calibration",
            "fellow_eye",
            "preprocess",
            "grade_names",
            "limitations",
            "license",
        )
        return {k: self.raw[k] for k in keys if k in self.raw}
