"""The real thing: a Ray cluster of its own exports our metrics, Debian's Prometheus scrapes it
through Ray's service-discovery file (with cluster/prometheus.yml's settings), and every query of
every dashboard in dashboards/ must return series for the job a workload ran.

The workload is the `metrics_workload` fixture: any Ray driver program works (it runs with
RAY_ADDRESS pointing at the test's cluster), so a short cascade run can replace the default one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from ckd_ray.observability import ALL_METRICS, exported_name

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_FILES = sorted((ROOT / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")

# Panels that only return series where the cluster has GPUs (Ray's GPU node/component metrics, and
# our NVML sampler, which reports nothing without a GPU). Everything else must return series on CPU.
GPU_ONLY_PANELS = {
    "ckd-cluster-gpu.json": {
        "GPU utilization by node",
        "GPU memory used by node",
        "GPU utilization by role",
        "GPU memory used by role",
        "GPU utilization per GPU and role",
        "GPU utilization by component: teacher pool vs student group",
        "GPU memory by component: teacher pool vs student group",
    },
    "ckd-teacher-pool.json": {"Teacher GPU utilization", "Teacher GPU memory used"},
    "ckd-student.json": {"Student GPU utilization", "Student GPU memory used"},
    "ckd-cascade.json": set(),
}
GPU_METRICS = {"ckd_gpu_utilization_percent", "ckd_gpu_memory_used_bytes"}
# The GPU-only panels the project's NVML sampler feeds: on CPU the default workload's sampler reads
# the NVML stand-in (tests/nvml_standin/pynvml.py), so these are queried too. Ray's own GPU node and
# component metrics come from Ray's agent, which the stand-in does not reach: those four panels stay
# unqueried without a GPU.
NVML_STANDIN_PANELS = {
    "ckd-cluster-gpu.json": {"GPU utilization by role", "GPU memory used by role", "GPU utilization per GPU and role"},
    "ckd-teacher-pool.json": {"Teacher GPU utilization", "Teacher GPU memory used"},
    "ckd-student.json": {"Student GPU utilization", "Student GPU memory used"},
    "ckd-cascade.json": set(),
}
NVML_STANDIN_DIR = Path(__file__).resolve().parent / "nvml_standin"
# Two stand-in GPUs: the teacher actors see GPU 0, the student workers GPU 1.
NVML_STANDIN_DEVICES = [{"utilization": 37, "memory_used": 3 * 1024**3}, {"utilization": 81, "memory_used": 5 * 1024**3}]

SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval, with margin

# A local Ray with its Prometheus endpoint on a port of our choosing; it lives until stdin closes.
# Metrics are reported every second (Ray's default is 10 s) to keep the test short.
RAY_CLUSTER_SOURCE = """
import json, sys, ray
ctx = ray.init(
    address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]),
    _metrics_export_port=int(sys.argv[2]), _temp_dir=sys.argv[3], log_to_driver=False,
    _system_config={"metrics_report_interval_ms": 1000},
)
print(json.dumps({"address": ctx.address_info["gcs_address"], "session_dir": ctx.address_info["session_dir"]}), flush=True)
sys.stdin.read()
ray.shutdown()
"""

# The default workload: two cascade steps, each with a teacher pool of 2 actors, 2 student workers
# (named like Ray Train's worker actor, so the by-component panels match them) and a preprocessing
# task, recording fixed amounts through every recorder of ckd_ray.observability.
WORKLOAD_SOURCE = """
import os, sys, time, ray
from ckd_ray.observability import CascadeMetrics, DataMetrics, GpuSampler, StudentMetrics, TeacherPoolMetrics

JOB, ROUNDS, SAMPLES, TOKENS = sys.argv[1], 25, 8, 256
# With the NVML stand-in (CKD_NVML_STANDIN set), the actors import it in place of pynvml.
standin = {name: os.environ[name] for name in ("PYTHONPATH", "CKD_NVML_STANDIN") if "CKD_NVML_STANDIN" in os.environ}
ray.init(runtime_env={"env_vars": standin} if standin else None)

def see_gpu(index):  # what Ray sets for an actor with num_gpus=1 on that GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)

@ray.remote(num_cpus=0.5)
class TeacherActor:
    def __init__(self, stage, step):
        self.metrics = TeacherPoolMetrics(JOB, stage, step, pool=stage)
        self.metrics.actor_started()
        see_gpu(0)
        self.gpu = GpuSampler("teacher", JOB, interval_s=1.0).start()

    def forward(self, num_samples):
        start = time.perf_counter()
        time.sleep(0.05)
        self.metrics.record_batch(num_samples, time.perf_counter() - start, signal_bytes=num_samples * 4096)
        return num_samples

    def stop(self):
        self.metrics.actor_stopped()
        self.gpu.stop()

@ray.remote(num_cpus=0.5)
class RayTrainWorker:
    def __init__(self, stage, step, rank):
        self.metrics = StudentMetrics(JOB, stage, step, worker=str(rank))
        see_gpu(1)
        self.gpu = GpuSampler("student", JOB, interval_s=1.0).start()

    def train_step(self, i):
        time.sleep(0.02)  # waiting for data
        time.sleep(0.06)  # computing
        task, output = 2.0 / (1 + i), 1.0 / (1 + i)
        self.metrics.record_step(0.08, 0.02, TOKENS, {"task": task, "output": output, "total": task + output}, lr=1e-3,
                                 fusion_weights={("output", "ta"): 0.25, ("output", "teacher"): 0.75})

    def checkpoint(self):
        self.metrics.record_checkpoint(0.25)

@ray.remote(num_cpus=0.5)
def preprocess(stage, step):
    data = DataMetrics(JOB, stage, step)
    data.record_samples(200)
    data.record_rejects(3, "missing_image")
    data.record_rejects(1, "no_response")

plan = [("ta", "dft"), ("teacher", "dft")]
cascade = CascadeMetrics(JOB)
for index, (stage, step) in enumerate(plan):
    started = time.perf_counter()
    cascade.step_started(stage, step, index, len(plan))
    ray.get(preprocess.remote(stage, step))
    teachers = [TeacherActor.remote(stage, step) for _ in range(2)]
    students = [RayTrainWorker.remote(stage, step, rank) for rank in range(2)]
    for i in range(ROUNDS):
        ray.get([t.forward.remote(SAMPLES) for t in teachers] + [s.train_step.remote(i) for s in students])
    ray.get([s.checkpoint.remote() for s in students])
    time.sleep(3)  # gauges of this step are scraped before its pool stops
    ray.get([t.stop.remote() for t in teachers])
    cascade.step_finished(stage, step, time.perf_counter() - started)
time.sleep(3)  # two report intervals: the last increments reach the metrics agent before exit
"""


@dataclass
class MetricsWorkload:
    """A Ray driver program the dashboards are checked against."""

    argv: list[str]
    """Command line; it runs with RAY_ADDRESS set to the test's cluster."""
    job: str
    """The `job` label its metrics carry."""
    expected: dict[str, float] = field(default_factory=dict)
    """PromQL -> exact value once the workload has finished (empty for workloads with no fixed totals)."""
    uses_gpus: bool = False
    """Whether it runs on GPUs, so that the GPU-only panels must return series too."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to its environment (the NVML stand-in's)."""
    timeout_s: float = 120.0


@pytest.fixture(scope="module")
def metrics_workload() -> MetricsWorkload:
    """The default workload. To check the dashboards against a real run instead, return e.g.
    MetricsWorkload([sys.executable, "jobs/cascade_job.py", "configs/<tiny>.yaml"], job="<its name>")."""
    job = "metrics-smoke"
    sel = f'job="{job}"'
    steps, actors, rounds, samples, tokens = 2, 2, 25, 8, 256
    return MetricsWorkload(
        argv=[sys.executable, "-c", WORKLOAD_SOURCE, job],
        job=job,
        expected={
            f"sum(ray_ckd_teacher_samples_total{{{sel}}})": steps * actors * rounds * samples,
            f"sum(ray_ckd_teacher_batches_total{{{sel}}})": steps * actors * rounds,
            f"sum(ray_ckd_teacher_batch_latency_seconds_count{{{sel}}})": steps * actors * rounds,
            f"sum(ray_ckd_teacher_signal_bytes_total{{{sel}}})": steps * actors * rounds * samples * 4096,
            f"max_over_time(sum by (pool) (ray_ckd_teacher_actors_alive{{{sel},pool=\"ta\"}})[5m:1s])": actors,
            f"sum(ray_ckd_student_steps_total{{{sel}}})": steps * actors * rounds,
            f"sum(ray_ckd_student_step_seconds_count{{{sel}}})": steps * actors * rounds,
            f"sum(ray_ckd_student_tokens_total{{{sel}}})": steps * actors * rounds * tokens,
            f"sum(ray_ckd_student_data_wait_seconds_total{{{sel}}})": steps * actors * rounds * 0.02,
            f"sum(ray_ckd_student_step_seconds_total{{{sel}}})": steps * actors * rounds * 0.08,
            f"max(max_over_time(ray_ckd_student_lr{{{sel}}}[5m]))": 1e-3,
            f"max(max_over_time(ray_ckd_student_fusion_weight{{{sel},term=\"output\",teacher=\"teacher\"}}[5m]))": 0.75,
            # A gauge is scraped at its last value: the loss falls, so its minimum is the final step's.
            f"min(min_over_time(ray_ckd_student_loss{{{sel},term=\"total\"}}[5m]))": 3.0 / rounds,
            f"max(max_over_time(ray_ckd_student_checkpoint_seconds{{{sel}}}[5m]))": 0.25,
            f"sum(ray_ckd_data_samples_total{{{sel}}})": steps * 200,
            f"sum(ray_ckd_data_rejected_total{{{sel},reason=\"missing_image\"}})": steps * 3,
            f"sum(ray_ckd_data_rejected_total{{{sel},reason=\"no_response\"}})": steps * 1,
            f"sum(ray_ckd_cascade_steps_completed_total{{{sel}}})": steps,
            f"max(max_over_time(ray_ckd_cascade_steps_total{{{sel}}}[5m]))": steps,
            f"max(max_over_time(ray_ckd_cascade_step_index{{{sel}}}[5m]))": steps - 1,
            # The NVML stand-in's fixed readings, through the sampler, Ray's export and the scrape.
            f"max(max_over_time(ray_ckd_gpu_utilization_percent{{{sel},role=\"teacher\",gpu=\"0\"}}[5m]))": 37,
            f"max(max_over_time(ray_ckd_gpu_utilization_percent{{{sel},role=\"student\",gpu=\"1\"}}[5m]))": 81,
            f"max(max_over_time(ray_ckd_gpu_memory_used_bytes{{{sel},role=\"student\",gpu=\"1\"}}[5m]))": 5 * 1024**3,
        },
        env={"CKD_NVML_STANDIN": json.dumps(NVML_STANDIN_DEVICES),
             "PYTHONPATH": os.pathsep.join([str(NVML_STANDIN_DIR), str(ROOT)])},
    )


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        # Ray resolves 127.0.0.1 to the machine's address unless told the cluster is single-machine:
        # this keeps the whole cluster, and so every scrape, on loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    )
    return env


class Prometheus:
    """A small client of Prometheus' HTTP API."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:  # bad queries answer 400 with a JSON error body
            return json.load(error)

    def query(self, expr: str, **params) -> list[dict]:
        answer = self.get("/api/v1/query", query=expr, **params)
        if answer.get("status") != "success":
            raise AssertionError(f"{expr}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        answer = self.get("/api/v1/query_range", query=expr, start=start, end=end, step=SCRAPE_INTERVAL_S)
        if answer.get("status") != "success":
            raise AssertionError(f"{expr}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]["result"]


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _prometheus_config(session_dir: str) -> dict:
    """cluster/prometheus.yml, pointed at this cluster's service-discovery file, scraping every second."""
    config = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_INTERVAL_S}s", evaluation_interval=f"{SCRAPE_INTERVAL_S}s")
    (ray_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    ray_job["file_sd_configs"] = [
        {"files": [str(Path(session_dir) / "prom_metrics_service_discovery.json")], "refresh_interval": "1s"}
    ]
    # Belt and braces: whatever address Ray writes, the test only ever scrapes loopback.
    ray_job["relabel_configs"] = [
        {"source_labels": ["__address__"], "regex": r".*:(\d+)", "target_label": "__address__",
         "replacement": "127.0.0.1:$1"}
    ]
    return config


@dataclass
class ScrapedRun:
    prometheus: Prometheus
    workload: MetricsWorkload
    start: float
    end: float


@pytest.fixture(scope="module")
def scraped_run(metrics_workload, free_ports):
    """Ray cluster + Prometheus scraping it + the workload run to completion; yields the time span."""
    if PROMETHEUS is None:
        pytest.skip("the `prometheus` binary is not installed (scripts/install-prometheus.sh installs it)")
    missing = [name for name in ("aiohttp", "grpc", "opentelemetry") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"Ray's metrics agent needs ray[default] (missing {missing}): install the project's dependencies")
    temp_dir = Path(tempfile.mkdtemp(prefix="ckdprom-", dir="/tmp"))  # short: Ray's socket paths must fit
    dashboard_port, export_port, autoscaler_metrics_port, dashboard_metrics_port, port = free_ports(5)
    processes: list[subprocess.Popen] = []
    logs = []
    try:
        cluster_log = open(temp_dir / "ray-cluster.log", "w")
        logs.append(cluster_log)
        cluster = subprocess.Popen(
            [sys.executable, "-c", RAY_CLUSTER_SOURCE, str(dashboard_port), str(export_port), str(temp_dir / "ray")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=cluster_log, text=True,
            env=_subprocess_env(AUTOSCALER_METRIC_PORT=str(autoscaler_metrics_port), DASHBOARD_METRIC_PORT=str(dashboard_metrics_port)),
        )
        processes.append(cluster)
        ready_to_read, _, _ = select.select([cluster.stdout], [], [], 120)  # slow on a loaded 2-core machine
        line = cluster.stdout.readline() if ready_to_read else ""
        if not line:
            pytest.fail(f"the Ray cluster did not start:\n{(temp_dir / 'ray-cluster.log').read_text()[-3000:]}")
        info = json.loads(line)

        config_path = temp_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(_prometheus_config(info["session_dir"])))
        prometheus_log = open(temp_dir / "prometheus.log", "w")
        logs.append(prometheus_log)
        processes.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={temp_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=prometheus_log, stderr=subprocess.STDOUT,
        ))
        prometheus = Prometheus(f"http://127.0.0.1:{port}")

        def ready():
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        _wait(ready, 30, "Prometheus to be ready")
        # Ray's node metrics prove the whole path (service discovery, relabelling, scrape) works.
        _wait(lambda: prometheus.query("ray_node_cpu_count"), 45, "the first scrape of Ray's metrics endpoint")

        start = time.time()
        workload = subprocess.run(
            metrics_workload.argv, cwd=ROOT, env={**_subprocess_env(RAY_ADDRESS=info["address"]), **metrics_workload.env},
            capture_output=True, text=True, timeout=metrics_workload.timeout_s,
        )
        assert workload.returncode == 0, f"workload failed:\n{workload.stdout[-3000:]}\n{workload.stderr[-5000:]}"

        # Ray reports every second and Prometheus scrapes every second: give the last values a few
        # seconds to arrive (test_workload_values_reach_prometheus reports any that never do).
        deadline = time.monotonic() + 30
        time.sleep(3)
        while _mismatches(prometheus, metrics_workload.expected) and time.monotonic() < deadline:
            time.sleep(1)
        yield ScrapedRun(prometheus, metrics_workload, start, time.time())
    finally:
        for process in reversed(processes):
            if process.stdin:
                process.stdin.close()  # the Ray cluster shuts itself down
            else:
                process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _mismatches(prometheus: Prometheus, expected: dict[str, float]) -> list[str]:
    """Queries of `expected` whose single result is not the expected value."""
    mismatches = []
    for expr, want in expected.items():
        result = prometheus.query(expr)
        got = [float(series["value"][1]) for series in result]
        if len(got) != 1 or not math.isclose(got[0], want, rel_tol=1e-6):
            mismatches.append(f"{expr}: got {got}, want {want}")
    return mismatches


@pytest.mark.slow
@pytest.mark.ray
def test_workload_values_reach_prometheus(scraped_run):
    """What the recorders recorded inside Ray actors and tasks is what Prometheus holds."""
    mismatches = _mismatches(scraped_run.prometheus, scraped_run.workload.expected)
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.slow
@pytest.mark.ray
def test_every_metric_is_exported_under_its_documented_name(scraped_run):
    """Counters are not suffixed twice, histograms come with buckets, and the job label survives the
    scrape (honor_labels), rather than turning into exported_job."""
    run = scraped_run
    missing = []
    for spec in ALL_METRICS:
        if spec.name in GPU_METRICS and not (run.workload.uses_gpus or "CKD_NVML_STANDIN" in run.workload.env):
            continue
        name = exported_name(spec) + ("_bucket" if spec.kind == "histogram" else "")
        if not run.prometheus.query_range(f'{name}{{job="{run.workload.job}"}}', run.start, run.end):
            missing.append(name)
    assert not missing, f"not scraped with job={run.workload.job!r}: {missing}"
    assert not run.prometheus.query('count({__name__=~"ray_ckd_.*", exported_job!=""})')


def _substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):  # $job before $j...
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert not re.search(r"\$\{?[A-Za-z_]", expr), f"unsubstituted variable in {expr}"
    return expr


def _dashboard_variables(run: ScrapedRun, dashboard: dict) -> dict[str, str]:
    """Concrete values for the dashboard's variables, as Grafana would pick them for the run's job."""
    values = {"__rate_interval": RATE_INTERVAL, "__interval": f"{SCRAPE_INTERVAL_S}s", "__range": "5m"}
    for variable in dashboard["templating"]["list"]:
        name = variable["name"]
        if variable["type"] == "textbox":
            values[name] = variable["query"]
        elif variable.get("includeAll"):
            values[name] = variable["allValue"]
        elif name == "job":
            values[name] = run.workload.job
        else:
            raise AssertionError(f"no test value for variable {name}")
        if variable["type"] == "query":  # label_values(selector, label) must offer the value chosen
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"])
            selector, label = _substitute(match[1], values | {name: ".*"}), match[2]
            answer = run.prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
            assert answer["status"] == "success", answer
            if name == "job":
                assert run.workload.job in answer["data"], f"{variable['query']} offers {answer['data']}"
            else:
                assert answer["data"], f"{variable['query']} offers nothing"
    return values


def test_gpu_only_panel_list_matches_the_panels_described_so():
    assert set(GPU_ONLY_PANELS) == {path.name for path in DASHBOARD_FILES} == set(NVML_STANDIN_PANELS)
    for name, panels in NVML_STANDIN_PANELS.items():  # the stand-in answers the sampler's panels, all GPU only
        assert panels <= GPU_ONLY_PANELS[name], name
        for panel in json.loads((ROOT / "dashboards" / name).read_text())["panels"]:
            if panel["title"] in panels:
                assert all("ray_ckd_gpu_" in target["expr"] for target in panel["targets"]), panel["title"]
    for path in DASHBOARD_FILES:
        panels = json.loads(path.read_text())["panels"]
        described = {panel["title"] for panel in panels if "GPU only" in panel["description"]}
        assert GPU_ONLY_PANELS[path.name] == described, path.name


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_dashboard_query_returns_series(scraped_run, path):
    """Grafana's range query of every panel target, over the time the workload ran."""
    run = scraped_run
    dashboard = json.loads(path.read_text())
    variables = _dashboard_variables(run, dashboard)
    failures, checked = [], 0
    for panel in dashboard["panels"]:
        answered = run.workload.uses_gpus or ("CKD_NVML_STANDIN" in run.workload.env and panel["title"] in NVML_STANDIN_PANELS[path.name])
        if panel["title"] in GPU_ONLY_PANELS[path.name] and not answered:
            continue
        for target in panel["targets"]:
            expr = _substitute(target["expr"], variables)
            try:
                series = run.prometheus.query_range(expr, run.start, run.end)
            except AssertionError as error:
                failures.append(f"{panel['title']!r}: error {error}")
                continue
            checked += 1
            if not series:
                failures.append(f"{panel['title']!r}: no series for {expr}")
    assert checked > 0
    assert not failures, "\n".join(failures)
