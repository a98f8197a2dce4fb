"""rayjob.yaml is a RayJob KubeRay's own CRD schema accepts, and it runs what cluster.yaml runs:
the same node types (as Ray's KubeRay autoscaler derives them), token auth, the pinned image and
the project's real command line. No Kubernetes and no Ray cluster: pure file checks."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "rayjob.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# KubeRay's RayJob v1 schema (tests/data/kuberay/README.md says where from).
SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayjob_v1_schema.json.gz"
# Where docker/Dockerfile puts the project in the image.
IMAGE_PROJECT_DIR = "/home/ray/crossdet_ray"
# KubeRay rejects token auth below this Ray (ray-operator/controllers/ray/utils/validation.go).
KUBERAY_TOKEN_AUTH_MIN_RAY = Version("2.52.0")
# KubeRay's limit on a RayJob's name (MaxRayClusterNameLength - 6, utils/constant.go).
KUBERAY_MAX_RAYJOB_NAME = 47


# -- the files ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def documents():
    return list(yaml.safe_load_all(MANIFEST.read_text()))


def _one(documents, kind):
    found = [d for d in documents if d and d.get("kind") == kind]
    assert len(found) == 1, f"rayjob.yaml should hold one {kind}, holds {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rayjob(documents):
    return _one(documents, "RayJob")


@pytest.fixture(scope="module")
def cluster_spec(rayjob):
    return rayjob["spec"]["rayClusterSpec"]


@pytest.fixture(scope="module")
def cluster_yaml():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def pins():
    """constraints.txt's pins for an x86_64 machine (the GPU nodes'), by name."""
    environment = {"platform_machine": "x86_64"}
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                (spec,) = requirement.specifier
                found[requirement.name] = spec.version
    return found


def _pod_specs(rayjob):
    """Every pod template of the RayJob: (what, pod spec)."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]
    yield "submitter", rayjob["spec"]["submitterPodTemplate"]["spec"]


def _containers(rayjob):
    for what, pod in _pod_specs(rayjob):
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield what, container


# -- the CRD schema, meant as Kubernetes means it ----------------------------------------------------
def _as_kubernetes_validates(node, root=True):
    """A copy of a CRD's OpenAPI v3 schema that plain JSON Schema validates as the API server does:
    - an object schema with `properties` and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields: true` is closed: the API server prunes unknown
      fields, and kubectl's default `--validate=strict` turns them into errors;
    - `x-kubernetes-int-or-string: true` means an integer or a string (controller-gen writes the
      anyOf too; added where missing); `nullable: true` allows null.
    The root's `metadata` stays open (the API server checks ObjectMeta itself)."""
    if isinstance(node, list):
        return [_as_kubernetes_validates(item, False) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _as_kubernetes_validates(value, False) if key != "properties" else value
            for key, value in node.items()}
    if "properties" in node:
        node["properties"] = {name: _as_kubernetes_validates(sub, False)
                              for name, sub in node["properties"].items()}
        if ("additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if root:
        node["properties"]["metadata"] = {"type": "object"}
    return node


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: a `set` holds no item twice, a `map` no two items with the same
    `x-kubernetes-list-map-keys` (ports: containerPort and protocol, protocol defaulting to TCP)."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    elif list_type == "map":
        names = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {name: sub.get("default")
                    for name, sub in schema.get("items", {}).get("properties", {}).items()}
        keys = [json.dumps([item.get(n, defaults.get(n)) for n in names]) for item in instance]
    else:
        return  # atomic
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate items in a list-type {list_type}: {duplicates}")


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value):
    return not isinstance(value, int) or -2**31 <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value):
    return not isinstance(value, int) or -2**63 <= value < 2**63


@pytest.fixture(scope="module")
def crd_schema():
    return json.loads(gzip.decompress(SCHEMA.read_bytes()))


@pytest.fixture(scope="module")
def validator(crd_schema):
    # OpenAPI v3.0's schema object is JSON Schema draft 4 with extensions.
    cls = jsonschema.validators.extend(jsonschema.Draft4Validator,
                                       {"x-kubernetes-list-type": _list_type})
    return cls(_as_kubernetes_validates(crd_schema), format_checker=_FORMATS)


def _errors(validator, document):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def test_the_vendored_schema_is_kuberays_rayjob_v1(crd_schema):
    spec = crd_schema["properties"]["spec"]["properties"]
    assert {"entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes",
            "ttlSecondsAfterFinished", "submitterPodTemplate"} <= set(spec)
    assert spec["rayClusterSpec"]["properties"]["authOptions"]["properties"]["mode"]["enum"] \
        == ["disabled", "token"]
    assert SCHEMA.stat().st_size < 150_000


def test_rayjob_is_valid_under_the_crd_schema(validator, rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert _errors(validator, rayjob) == []
    name = rayjob["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert len(name) <= KUBERAY_MAX_RAYJOB_NAME


def _worker(document, name):
    return next(g for g in document["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                if g["groupName"] == name)


def _misspell_autoscaling(d):
    spec = d["spec"]["rayClusterSpec"]
    spec["enableInTreeAutoScaling"] = spec.pop("enableInTreeAutoscaling")


def _misspell_max_replicas(d):
    group = _worker(d, "gpu-small")
    group["maxReplica"] = group.pop("maxReplicas")


def _num_cpus_as_integer(d):  # the classic KubeRay mistake: rayStartParams are strings
    d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _ttl_as_string(d):
    d["spec"]["ttlSecondsAfterFinished"] = "600"


def _gpu_limit_not_int_or_string(d):
    _worker(d, "gpu-large")["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] = 1.5


def _bad_quantity(d):
    _worker(d, "gpu-large")["template"]["spec"]["containers"][0]["resources"]["requests"][
        "memory"] = "56 GB"


def _auth_mode_typo(d):
    d["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"


def _two_containers_one_name(d):
    containers = _worker(d, "gpu-small")["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))


def _replicas_over_int32(d):
    _worker(d, "gpu-small")["maxReplicas"] = 2**31


def _worker_without_group_name(d):
    del _worker(d, "gpu-large")["groupName"]


BROKEN = [
    (_misspell_autoscaling, "'enableInTreeAutoScaling' was unexpected"),
    (_misspell_max_replicas, "'maxReplica' was unexpected"),
    (_num_cpus_as_integer, "0 is not of type 'string'"),
    (_ttl_as_string, "'600' is not of type 'integer'"),
    (_gpu_limit_not_int_or_string, "1.5 is not valid under any of the given schemas"),
    (_bad_quantity, "'56 GB' does not match"),
    (_auth_mode_typo, "'tokens' is not one of ['disabled', 'token']"),
    (_two_containers_one_name, "duplicate items in a list-type map"),
    (_replicas_over_int32, "2147483648 is not a 'int32'"),
    (_worker_without_group_name, "'groupName' is a required property"),
]


@pytest.mark.parametrize(("break_it", "error"), BROKEN,
                         ids=[f.__name__.strip("_") for f, _ in BROKEN])
def test_the_schema_check_bites(validator, rayjob, break_it, error):
    broken = copy.deepcopy(rayjob)
    break_it(broken)
    errors = _errors(validator, broken)
    assert any(error in e for e in errors), errors


def test_quantities_are_int_or_string(validator, rayjob):
    """`x-kubernetes-int-or-string` quantities take both forms (nvidia.com/gpu: 1 and "1")."""
    both = copy.deepcopy(rayjob)
    limits = _worker(both, "gpu-small")["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"], limits["cpu"] = "1", 8
    assert _errors(validator, both) == []


def test_no_field_the_schema_check_cannot_judge(crd_schema, rayjob):
    """The CEL rules (`x-kubernetes-validations`) are not evaluated here: the RayJob sets none of
    the fields they guard (deletionStrategy, managedBy, gcsFaultToleranceOptions)."""
    guarded = []

    def walk(node, path):
        if "x-kubernetes-validations" in node:
            guarded.append(path)
        for name, sub in node.get("properties", {}).items():
            walk(sub, path + (name,))
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + ("[]",))

    walk(crd_schema, ())
    assert guarded

    def present(document, path):
        if not path:
            return True
        if path[0] == "[]":
            return isinstance(document, list) and any(present(i, path[1:]) for i in document)
        return isinstance(document, dict) and path[0] in document \
            and present(document[path[0]], path[1:])

    assert [p for p in guarded if present(rayjob, p)] == []


# -- what the cluster does -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_node_types(rayjob):
    """The autoscaling config Ray's KubeRay autoscaler derives from this RayCluster spec (the code
    the sidecar runs each update: ray/autoscaler/_private/kuberay/autoscaling_config.py)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cluster = {"metadata": {"name": rayjob["metadata"]["name"], "namespace": "default"},
               "spec": copy.deepcopy(rayjob["spec"]["rayClusterSpec"])}
    return _derive_autoscaling_config_from_ray_cr(cluster)


def test_the_head_trains_nothing_and_keeps_the_dashboard_inside(cluster_spec, ray_node_types):
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert ray_node_types["available_node_types"]["headgroup"]["resources"].get("CPU") == 0
    assert "GPU" not in ray_node_types["available_node_types"]["headgroup"]["resources"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert "headService" not in head  # no LoadBalancer/NodePort Service by another way


def _cluster_yaml_gpu_types(cluster_yaml):
    """cluster.yaml's GPU worker types by their `gpu_memory_<N>gb` resource."""
    types = {}
    for node in cluster_yaml["available_node_types"].values():
        memory = [r for r in node["resources"] if re.fullmatch(r"gpu_memory_\d+gb", r)]
        if node["resources"].get("GPU", 0) > 0:
            (resource,) = memory
            types[resource] = node
    return types


def test_gpu_groups_are_cluster_yamls_node_types_from_zero(cluster_spec, cluster_yaml,
                                                           ray_node_types):
    expected = _cluster_yaml_gpu_types(cluster_yaml)
    groups = cluster_spec["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"gpu-small", "gpu-large"}
    seen = set()
    for group in groups:
        assert group["replicas"] == 0 and group["minReplicas"] == 0
        assert group["maxReplicas"] > 0
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
        assert {"cpu", "memory"} <= set(resources["requests"])
        # What Ray will believe the node has, read as Ray's autoscaler reads the group.
        ray_type = ray_node_types["available_node_types"][group["groupName"]]
        (memory,) = [r for r in ray_type["resources"] if re.fullmatch(r"gpu_memory_\d+gb", r)]
        assert memory in expected, f"{group['groupName']}: {memory} is no cluster.yaml type"
        seen.add(memory)
        like = expected[memory]
        for resource in ("CPU", "GPU", memory):
            assert ray_type["resources"][resource] == like["resources"][resource], resource
        assert (ray_type["min_workers"], ray_type["max_workers"]) \
            == (like.get("min_workers", 0), like["max_workers"])
        # The stated memory is true: the pods run on cluster.yaml's instance type of that size.
        assert group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] \
            == like["node_config"]["InstanceType"]
    assert seen == set(expected)


def test_in_tree_autoscaling_and_the_node_types_the_driver_reads(documents, cluster_spec,
                                                                 ray_node_types):
    """KubeRay's autoscaler adds the GPU pods; the driver's `--gpus-per-trial auto` plans for
    the node types in the head's ~/ray_bootstrap_config.yaml (Ray 2.60's KubeRay autoscaler
    reports no cluster config to the GCS), which must be those the autoscaler derives."""
    from crossdet_ray.tune.cluster import (
        BOOTSTRAP_CONFIG,
        node_types_from_autoscaling_config,
    )

    assert cluster_spec["enableInTreeAutoscaling"] is True
    config_map = _one(documents, "ConfigMap")
    mounted = yaml.safe_load(config_map["data"]["ray_bootstrap_config.yaml"])
    assert node_types_from_autoscaling_config(mounted) \
        == node_types_from_autoscaling_config(ray_node_types)
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"]
                if m["mountPath"] == "/home/ray/" + BOOTSTRAP_CONFIG.name]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert mount["subPath"] in config_map["data"]


def test_token_auth_on_every_container(rayjob, cluster_spec):
    """KubeRay's authOptions: it sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on every container
    (and its autoscaler and submitter), but skips a container that sets either itself."""
    auth = cluster_spec["authOptions"]
    assert auth["mode"] == "token"
    assert not auth.get("enableK8sTokenAuth")  # KubeRay refuses it for a RayJob
    assert Version(cluster_spec["rayVersion"]) >= KUBERAY_TOKEN_AUTH_MIN_RAY
    env_lists = [(what, c.get("env", [])) for what, c in _containers(rayjob)]
    env_lists.append(("autoscaler", cluster_spec.get("autoscalerOptions", {}).get("env", [])))
    for what, env in env_lists:
        names = {e["name"] for e in env}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, what


def test_every_pod_runs_as_the_service_account(documents, rayjob):
    account = _one(documents, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::")
    for what, pod in _pod_specs(rayjob):
        assert pod.get("serviceAccountName") == account["metadata"]["name"], what
        assert pod.get("automountServiceAccountToken", True), what
    kinds = [d["kind"] for d in documents if d]
    assert kinds.index("ServiceAccount") < kinds.index("RayJob")  # applied before the head


def test_the_run_ends_with_its_cluster(rayjob):
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] > 0


# -- the image -----------------------------------------------------------------------------------
def test_one_image_pinned_to_constraints_ray(rayjob, cluster_spec, pins):
    images = {c["image"] for _, c in _containers(rayjob)}
    assert len(images) == 1, images
    (image,) = images
    assert "autoscalerOptions" not in cluster_spec or "image" not in cluster_spec[
        "autoscalerOptions"]  # the sidecar runs the head's image
    match = re.fullmatch(r"[^:]+:ray(\d+\.\d+\.\d+)-\S+", image)
    assert match and match.group(1) == pins["ray"], image
    assert cluster_spec["rayVersion"] == pins["ray"]


def test_dockerfile_builds_on_the_pinned_ray(pins):
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert match and match.group(1) == pins["ray"], base
    # One list of pins: installs use constraints.txt, no version is written here.
    install = " ".join(re.findall(r"^RUN python -m pip install (.*)$", text, re.MULTILINE))
    assert "-c constraints.txt torch torchvision" in install and "-e ." in install
    assert "==" not in text
    assert f"WORKDIR {IMAGE_PROJECT_DIR}" in text


# -- the command ---------------------------------------------------------------------------------
def test_entrypoint_is_the_projects_command(rayjob):
    from crossdet_ray.cli import build_parser

    entrypoint = rayjob["spec"]["entrypoint"]
    # KubeRay splices it unquoted into the submitter's `bash -c`: nothing the shell reads.
    assert not re.search(r"""[;&|<>`$'"\\(){}*?]""", entrypoint), entrypoint
    python, script, *argv = shlex.split(entrypoint)
    assert python == "python"
    assert script.startswith(IMAGE_PROJECT_DIR + "/")
    assert (ROOT / script[len(IMAGE_PROJECT_DIR) + 1:]) == ROOT / "experiments/all_backbones.py"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # argparse printed which flag the CLI lacks
        pytest.fail(f"the CLI refuses the entrypoint's flags: {argv}")
    assert args.autoscaling
    assert args.data.startswith("s3://") and args.log_dir.startswith("s3://")
    assert args.gpus_per_trial == "auto"
    assert args.address is None  # joins the cluster it runs on
