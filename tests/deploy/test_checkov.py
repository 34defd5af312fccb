"""checkov on deploy/terraform: no failed check, and every skipped one says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TERRAFORM_DIR, find_tool


def _checkov() -> str:
    """$CHECKOV, else checkov beside this interpreter or on PATH, else the Makefile's own venv for it."""
    candidates = [
        os.environ.get("CHECKOV"),
        find_tool("checkov"),
        str(Path(sys.prefix) / "checkov" / "bin" / "checkov"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("checkov not installed (make setup-dev puts it in .venv/checkov; or set CHECKOV=/path/to/checkov)")


def test_terraform_passes_checkov_with_every_skip_justified() -> None:
    result = subprocess.run(
        [_checkov(), "-d", str(TERRAFORM_DIR), "--framework", "terraform", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100, summary  # it really read the files
    for check in report["results"]["skipped_checks"]:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason.split()) >= 8, f"{check['check_id']} on {check['resource']}: say why it is skipped"
