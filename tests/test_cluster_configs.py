"""The cluster configs in cluster/: the Ray autoscaler config against the schema Ray ships, the
KubeRay manifests against the required fields of the ray.io/v1 CRDs (no Kubernetes validator
is installed offline, so those fields are checked here by hand), and the Prometheus config with
promtool where Debian's prometheus package provides it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
ROLE_RESOURCES = {"teacher": "teacher_gpu", "student": "student_gpu"}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml")),
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


def test_autoscaler_config_matches_rays_schema():
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # without importing Ray
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    config = _load("autoscaler-aws.yaml")
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_autoscaler_has_a_gpu_node_type_per_role():
    config = _load("autoscaler-aws.yaml")
    node_types = config["available_node_types"]
    for role, resource in ROLE_RESOURCES.items():
        (name,) = [n for n, t in node_types.items() if resource in t["resources"]]
        node_type = node_types[name]
        # One custom resource slot per GPU, so `{resource: 1}` next to num_gpus=1 places one actor per GPU.
        assert node_type["resources"][resource] == node_type["resources"]["GPU"] > 0, name
        assert node_type["labels"] == {"ckd-role": role}
        assert node_type["min_workers"] == 0, f"{name} should scale to zero between stages"
        assert node_type["max_workers"] <= config["max_workers"]
    head = node_types[config["head_node_type"]]
    assert not set(ROLE_RESOURCES.values()) & set(head["resources"]), "nothing GPU-bound belongs on the head"


def test_autoscaler_head_points_ray_dashboard_at_prometheus_and_grafana():
    config = _load("autoscaler-aws.yaml")
    start = " ".join(config["head_start_ray_commands"])
    for variable in ("RAY_GRAFANA_HOST=http://127.0.0.1:3000", "RAY_PROMETHEUS_HOST=http://127.0.0.1:9090",
                     "RAY_GRAFANA_IFRAME_HOST=", "--metrics-export-port=8080"):
        assert variable in start
    assert "--metrics-export-port=8080" in " ".join(config["worker_start_ray_commands"])
    init = " ".join(config["available_node_types"][config["head_node_type"]]["initialization_commands"])
    assert "cluster/prometheus.yml" in init and "dashboards/provisioning" in init
    assert "-v /tmp/ray:/tmp/ray" in config["docker"]["head_run_options"], "Prometheus reads Ray's discovery file"


def _check_cluster_spec(spec: dict, where: str) -> list[str]:
    """Required fields of RayCluster v1 (spec.headGroupSpec.template; each worker group's groupName,
    minReplicas, maxReplicas and template) and our own layout rules."""
    problems = []

    def containers(template: dict, name: str) -> list[dict]:
        pod = template.get("spec", {})
        if not pod.get("containers"):
            problems.append(f"{where}.{name}: template.spec.containers is required")
            return []
        for container in pod["containers"]:
            if not container.get("name") or not container.get("image"):
                problems.append(f"{where}.{name}: every container needs name and image")
            for port in container.get("ports", []):
                if not isinstance(port.get("containerPort"), int):
                    problems.append(f"{where}.{name}: containerPort must be an integer")
        return pod["containers"]

    head = spec.get("headGroupSpec")
    if not head or "template" not in head:
        return [f"{where}.headGroupSpec.template is required"]
    head_containers = containers(head["template"], "headGroupSpec")
    env = {e["name"]: e.get("value") for c in head_containers for e in c.get("env", [])}
    for name in ("RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"):
        if not env.get(name):
            problems.append(f"{where}: the head container needs {name}")
    groups = {g.get("groupName"): g for g in spec.get("workerGroupSpecs", [])}
    for role, resource in ROLE_RESOURCES.items():
        matching = [g for g in groups.values() if resource in g.get("rayStartParams", {}).get("resources", "")]
        if len(matching) != 1:
            problems.append(f"{where}: want one worker group with the {resource} resource, got {len(matching)}")
    for name, group in groups.items():
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            if key not in group:
                problems.append(f"{where}.workerGroupSpecs[{name}].{key} is required")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            problems.append(f"{where}.{name}: want minReplicas <= replicas <= maxReplicas")
        params = group.get("rayStartParams", {})
        if any(not isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.{name}: rayStartParams values must be strings")
        if "resources" not in params:
            problems.append(f"{where}.{name}: a GPU group needs its custom resource in rayStartParams")
            continue
        # KubeRay passes `resources` to `ray start --resources`, as a quoted JSON string.
        custom = json.loads(json.loads(params["resources"]))
        gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers(group.get("template", {}), name)]
        if list(custom.values()) != gpus:
            problems.append(f"{where}.{name}: custom resource {custom} should equal its GPUs {gpus}")
        if params.get("metrics-export-port") != "8080":
            problems.append(f"{where}.{name}: a fixed metrics-export-port lets the PodMonitor find it")
    return problems


def test_raycluster_manifest():
    manifest = _load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    problems = _check_cluster_spec(manifest["spec"], "spec")
    assert not problems, "\n".join(problems)


def test_rayjob_manifest_runs_a_cascade_on_the_same_cluster_layout():
    manifest = _load("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/cascade_job.py"] and entry[2].startswith("configs/") and entry[2].endswith(".yaml")
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
    assert spec["shutdownAfterJobFinishes"] is True
    assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])
    problems = _check_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
    assert not problems, "\n".join(problems)
    assert spec["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"], "keep the two cluster specs in step"


def test_podmonitor_keeps_the_job_label():
    monitor = _load("kuberay/podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True


def test_prometheus_config_uses_rays_service_discovery():
    config = _load("prometheus.yml")
    (ray_job,) = config["scrape_configs"]
    assert ray_job["honor_labels"] is True
    assert ray_job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian's prometheus package ships it)")
def test_promtool_accepts_prometheus_config():
    result = subprocess.run(["promtool", "check", "config", str(CLUSTER / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
