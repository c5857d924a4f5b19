"""The Grafana dashboards without a Prometheus: generated from dashboards/generate.py, wired to the
provisioned datasource, every metric they name is one we or Ray export, and every query parses
(promtool). tests/test_observability_prometheus.py runs the same queries against real data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ckd_ray.observability import ALL_METRICS, exported_name

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))

# Ray's own metrics the dashboards use (Ray 2.60 names; the GPU ones exist only on GPU nodes).
RAY_METRICS = {
    "ray_node_gpus_utilization", "ray_node_gram_used", "ray_component_gpu_percentage",
    "ray_component_gpu_memory_mb", "ray_component_cpu_percentage", "ray_object_store_memory", "ray_resources",
}


def _ours() -> set[str]:
    names = set()
    for spec in ALL_METRICS:
        base = exported_name(spec)
        names |= {base + s for s in ("_bucket", "_sum", "_count")} if spec.kind == "histogram" else {base}
    return names


def _exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _concrete(expr: str, dashboard: dict) -> str:
    """The query with Grafana's variables replaced by plausible values."""
    values = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
    for variable in dashboard["templating"]["list"]:
        values[variable["name"]] = variable["query"] if variable["type"] == "textbox" else "ckd-test"
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def test_dashboards_are_generated_from_generate_py():
    result = subprocess.run([sys.executable, str(DASHBOARDS / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in DASHBOARD_FILES} == {
        "ckd-cluster-gpu.json", "ckd-teacher-pool.json", "ckd-student.json", "ckd-cascade.json"}


def test_provisioning_declares_the_datasource_the_panels_use():
    (datasource,) = yaml.safe_load((DASHBOARDS / "provisioning/datasources/ckd-prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["name"] == "Prometheus"
    providers = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/ckd.yaml").read_text())["providers"]
    assert all(p["type"] == "file" and p["options"]["path"] for p in providers)
    uids = set()
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == datasource["uid"], (path.name, panel["title"])
            assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"])
    assert len(uids) == len(DASHBOARD_FILES)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_layout_and_job_variable(path):
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["type"] == "query" and variables["job"]["query"].startswith("label_values(")
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert len({p["title"] for p in panels}) == len(panels), "titles name panels in the GPU-only list"
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        used = set(re.findall(r"\$\{?(\w+)", " ".join(t["expr"] for t in panel["targets"])))
        assert used <= set(variables) | {"__rate_interval", "__interval", "__range"}, (panel["title"], used)
        for target in panel["targets"]:  # every selector of our metrics is narrowed to the chosen job
            for name, labels in re.findall(r"(ray_ckd_\w+)(\{[^}]*\})?", target["expr"]):
                assert 'job=~"$job"' in labels, f"{panel['title']}: {name} without the $job filter"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboards_name_only_exported_metrics(path):
    known = _ours() | RAY_METRICS
    for expr in _exprs(json.loads(path.read_text())):
        names = set(re.findall(r"\b(ray_\w+)", expr))
        assert names and names <= known, f"unknown metric(s) {names - known} in {expr}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian's prometheus package ships it)")
def test_every_query_parses(tmp_path):
    """promtool checks PromQL syntax offline when the queries are written as recording rules."""
    rules = []
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text())
        rules += [{"record": f"ckd:check:{len(rules) + i}", "expr": _concrete(e, dashboard)}
                  for i, e in enumerate(_exprs(dashboard))]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_readme_lists_every_metric():
    readme = (DASHBOARDS / "README.md").read_text()
    listed = set(re.findall(r"^\| `(ray_ckd_\w+)` \|", readme, flags=re.MULTILINE))
    assert listed == {exported_name(spec) for spec in ALL_METRICS}
