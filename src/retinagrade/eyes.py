"""Both eyes of a patient: whose eye a photo is, from its file name, and the fellow-eye rule.

File names: ``<patient>_<eye>[_<anything>]``.

Eye tokens (any case, ``_`` or ``-`` before them): ``left`` / ``right``, ``L`` / ``R``, ``OS`` / ``OD`` (oculus
sinister / dexter) and ``OI`` (ojo izquierdo, Spanish-language clinics). The first such token after a non-empty
patient part wins, so ``1221_OD_f_2`` is patient ``1221``, right eye, and ``p7_left`` is patient ``p7``, left eye.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from retinagrade.inference.postprocess import GradeDecision, decide_grade
from retinagrade.referral import Eye

if TYPE_CHECKING:
    from retinagrade.inference.model_spec import ModelSpec

#: An image's raw model outputs: its grade logits and regression output.
RawOutputs = tuple[np.ndarray, float]

_TOKENS: Final[dict[str, Eye]] = {
    "left": "left",
    "l": "left",
    "os": "left",
    "oi": "left",
    "right": "right",
    "r": "right",
    "od": "right",
}
_EYE_IN_NAME: Final = re.compile(
    r"(?P<patient>.+?)[_-](?P<eye>" + "|".join(sorted(_TOKENS, key=len, reverse=True)) + r")(?:[_-].*)?",
    re.IGNORECASE,
)


def eye_from_name(stem: str) -> tuple[str, Eye] | None:
    """(patient, eye) named by a file stem, or None when the name does not say."""
    found = _EYE_IN_NAME.fullmatch(stem)
    if found is None:
        return None
    return found["patient"], _TOKENS[found["eye"].lower()]


def fellow(eye: Eye) -> Eye:
    """The other eye."""
    return "right" if eye == "left" else "left"


def fuse_logits(own: np.ndarray, fellows: np.ndarray, weight: float) -> np.ndarray:
    """An eye's logits moved toward its fellow eye's: ``(1 - weight) * own + weight * mean(fellows)``.

    ``fellows`` holds the logits of the other eye's graded images (one row each); with none, ``own`` comes
    back unchanged, so an image without a graded fellow eye keeps its single-image answer.
    """
    own = np.asarray(own, dtype=np.float64)
    fellows = np.asarray(fellows, dtype=np.float64).reshape(-1, own.shape[-1])
    if len(fellows) == 0 or weight == 0.0:
        return own
    return np.asarray((1.0 - weight) * own + weight * fellows.mean(axis=0), dtype=np.float64)


@dataclass(frozen=True)
class PairedAnswer:
    """One eye's answer from both eyes of its patient (the model's fellow-eye rule).

    Attributes:
        decision: the grade decision of the fused outputs, at the fellow-eye operating point.
        fellows: the keys (batch indices, file names) of the other eye's graded images it used.
    """

    decision: GradeDecision
    fellows: tuple[Hashable, ...]


def paired_answers(
    items: Sequence[tuple[Hashable, tuple[str, Eye] | None, RawOutputs | None]], spec: ModelSpec
) -> dict[Hashable, PairedAnswer]:
    """Fellow-eye answers for every graded image whose patient has a graded image of the other eye.

    ``items`` are (key, (patient, eye) or None, the raw outputs or None when not graded). Images without a
    tag, without outputs or without a graded fellow eye get no paired answer: their single-image answer is the
    answer. The single-image answers themselves are never changed. Empty when the spec has no fellow-eye rule.
    """
    rule = spec.fellow_eye
    if rule is None:
        return {}
    by_eye: dict[tuple[str, Eye], list[tuple[Hashable, RawOutputs]]] = defaultdict(list)
    for key, tag, outputs in items:
        if tag is not None and outputs is not None:
            by_eye[tag].append((key, outputs))
    paired_spec = dataclasses.replace(spec, referable_threshold=rule.referable_threshold, operating_point="fellow-eye")
    answers: dict[Hashable, PairedAnswer] = {}
    for (patient, eye), images in by_eye.items():
        others = by_eye.get((patient, fellow(eye)), [])
        if not others:
            continue
        other_logits = np.stack([logits for _, (logits, _) in others])
        other_regression = float(np.mean([regression for _, (_, regression) in others]))
        for key, (own_logits, own_regression) in images:
            logits = fuse_logits(own_logits, other_logits, rule.weight)
            regression = (1.0 - rule.weight) * own_regression + rule.weight * other_regression
            answers[key] = PairedAnswer(decide_grade(logits, regression, paired_spec), tuple(k for k, _ in others))
    return answers
