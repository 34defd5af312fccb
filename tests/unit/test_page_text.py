"""The screening page words what the service says: every reason code and urgency has its sentence."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from retinagrade.preprocessing import quality
from retinagrade.referral import Urgency

APP_JS = Path(__file__).resolve().parents[2] / "src" / "retinagrade" / "api" / "static" / "app.js"


def _object_keys(name: str) -> set[str]:
    """Keys of ``const NAME = { ... };`` in app.js."""
    match = re.search(rf"const {name} = \{{(.*?)\}};", APP_JS.read_text(), re.S)
    assert match, f"no object {name} in app.js"
    body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', match.group(1))  # sentences may hold colons and commas
    return set(re.findall(r"(?:^|[{,])\s*(\w+)\s*:", body))


def test_every_reason_code_has_a_sentence_on_the_page() -> None:
    codes = {value for key, value in vars(quality).items() if key.startswith("REASON_") and isinstance(value, str)}
    assert len(codes) >= 10
    missing = codes - _object_keys("REASONS")
    assert not missing, f"app.js REASONS lacks {sorted(missing)}"


def test_the_page_has_no_reason_the_service_never_sends() -> None:
    codes = {value for key, value in vars(quality).items() if key.startswith("REASON_") and isinstance(value, str)}
    assert _object_keys("REASONS") <= codes


def test_every_graded_urgency_has_an_action_on_the_page() -> None:
    graded = set(typing.get_args(Urgency)) - {"retake"}
    assert graded == _object_keys("URGENCY_ACTIONS")


def test_the_page_keeps_no_clinical_rule_or_fallback_of_its_own() -> None:
    text = APP_JS.read_text()
    assert "FALLBACK_GRADE_NAMES" not in text and "?? 2" not in text
    assert "grade === 4" not in text


def test_every_error_a_client_can_get_has_a_sentence_on_the_page() -> None:
    from retinagrade import errors
    from retinagrade.api import errors as api_errors  # noqa: F401  (its classes join the hierarchy)

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    # File-reading errors come only from the CLI and evaluation, which read paths; HTTP never does.
    http = {c.code for c in subclasses(errors.RetinagradeError) if not issubclass(c, errors.FileReadError)}
    # model_invalid is a deployment fault (the generic 500 sentence); not_explainable comes from /v1/explain,
    # which the page never calls; client_closed_request is logged when the client has gone, so nobody reads it.
    missing = http - _object_keys("ERRORS") - {"model_invalid", "not_explainable", "client_closed_request"}
    assert not missing, f"app.js ERRORS lacks {sorted(missing)}"
