"""Writes the Grafana dashboards in this folder from the panel lists below.

    python dashboards/generate.py          # rewrite the JSON files
    python dashboards/generate.py --check  # exit 1 if a JSON file differs from what it would write

Edit the panels here, not the JSON. Every query uses the names Prometheus scrapes from Ray (`ray_`
prefix; Counters end in `_total`) and the datasource uid of provisioning/datasources/. The tests
run every query against a real Prometheus fed by a Ray workload.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "ckd-prometheus"}
HERE = Path(__file__).resolve().parent

# Grafana's $__rate_interval is at least 4 scrape intervals, so rate() always has two samples.
RATE = "[$__rate_interval]"
JOB = 'job=~"$job"'
JOB_STAGE = 'job=~"$job",stage=~"$stage"'


@dataclass
class Panel:
    """One panel; `targets` are (PromQL, legend) pairs."""

    title: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    width: int = 12
    height: int = 8


def _variable_job() -> dict:
    query = 'label_values({__name__=~"ray_ckd_.*"}, job)'
    return {
        "name": "job", "label": "Job", "type": "query", "datasource": DATASOURCE,
        "query": query, "definition": query, "refresh": 2, "sort": 1,
        "includeAll": False, "multi": False, "current": {}, "hide": 0,
        "description": "The job's name (config `name`): the `job` label of every ckd metric.",
    }


def _variable_stage() -> dict:
    query = 'label_values({__name__=~"ray_ckd_.*",job=~"$job"}, stage)'
    return {
        "name": "stage", "label": "Stage", "type": "query", "datasource": DATASOURCE,
        "query": query, "definition": query, "refresh": 2, "sort": 1,
        "includeAll": True, "allValue": ".*", "multi": True, "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "description": "Cascade stage (ta1, teacher, ...).",
    }


def _variable_text(name: str, label: str, default: str, description: str) -> dict:
    return {
        "name": name, "label": label, "type": "textbox", "query": default, "hide": 0,
        "current": {"selected": False, "text": default, "value": default}, "description": description,
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True}
        for i, (expr, legend) in enumerate(panel.targets)
    ]
    options = {
        "timeseries": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                       "tooltip": {"mode": "multi", "sort": "desc"}},
        "stat": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "colorMode": "value", "graphMode": "none", "textMode": "auto"},
        "bargauge": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                     "displayMode": "basic", "orientation": "horizontal"},
        "state-timeline": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                           "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False}},
    }[panel.kind]
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": options, "targets": targets,
    }


def dashboard(uid: str, title: str, description: str, variables: list[dict], panels: list[Panel]) -> dict:
    """A provisioning-ready dashboard: panels laid out left to right, 24 columns a row."""
    laid_out, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        laid_out.append(_panel_json(panel, panel_id, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    return {
        "uid": uid, "title": title, "description": description, "tags": ["ckd_ray"],
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "timezone": "browser",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": variables}, "panels": laid_out,
    }


def _gpu_by(metric: str, role: str) -> str:
    # Processes sharing a GPU report the same device values: max per GPU, not sum.
    return f'max by (instance, gpu) ({metric}{{{JOB},role="{role}"}})'


def cluster_gpu() -> dict:
    teacher, student = 'Component=~"$teacher_component"', 'Component=~"$student_component"'
    panels = [
        Panel("GPU utilization by node", [
            ("avg by (instance, GpuIndex, GpuDeviceName) (ray_node_gpus_utilization)",
             "{{instance}} gpu {{GpuIndex}} {{GpuDeviceName}}")], unit="percent",
            description="Ray's node metrics: every GPU of the cluster, whatever runs on it. GPU only."),
        Panel("GPU memory used by node", [
            ("sum by (instance, GpuIndex) (ray_node_gram_used) * 1024 * 1024", "{{instance}} gpu {{GpuIndex}}")],
            unit="bytes", description="Ray's node metrics (reported in MiB). GPU only."),
        Panel("GPU utilization by role", [
            ("avg by (role) (max by (role, instance, gpu) (ray_ckd_gpu_utilization_percent{" + JOB + "}))",
             "{{role}}")], unit="percent",
            description="Mean over the GPUs of the teacher pool and of the student group of this job "
                        "(ckd GpuSampler in each actor). GPU only."),
        Panel("GPU memory used by role", [
            ("sum by (role) (max by (role, instance, gpu) (ray_ckd_gpu_memory_used_bytes{" + JOB + "}))",
             "{{role}}")], unit="bytes", description="Summed over the role's GPUs. GPU only."),
        Panel("GPU utilization per GPU and role", [
            ("max by (role, instance, gpu) (ray_ckd_gpu_utilization_percent{" + JOB + "})",
             "{{role}} {{instance}} gpu {{gpu}}")], unit="percent",
            description="One line per GPU, tagged with the role using it. GPU only.", width=24),
        Panel("GPU utilization by component: teacher pool vs student group", [
            (f"sum(ray_component_gpu_percentage{{{teacher}}})", "teacher pool"),
            (f"sum(ray_component_gpu_percentage{{{student}}})", "student group")], unit="percent",
            description="Ray's per-process GPU metrics, matched on the actor class name (variables "
                        "teacher_component, student_component); all jobs on the cluster. GPU only."),
        Panel("GPU memory by component: teacher pool vs student group", [
            (f"sum(ray_component_gpu_memory_mb{{{teacher}}}) * 1024 * 1024", "teacher pool"),
            (f"sum(ray_component_gpu_memory_mb{{{student}}}) * 1024 * 1024", "student group")], unit="bytes",
            description="Ray's per-process GPU memory (reported in MiB). GPU only."),
        Panel("CPU by component: teacher pool vs student group", [
            (f"sum(ray_component_cpu_percentage{{{teacher}}})", "teacher pool"),
            (f"sum(ray_component_cpu_percentage{{{student}}})", "student group")], unit="percent",
            description="Ray's per-process CPU use; 100 = one core."),
        Panel("Object store memory by node", [
            ("sum by (instance, Location) (ray_object_store_memory)", "{{instance}} {{Location}}")],
            unit="bytes", description="Teacher signal crosses the object store: spilling here slows the student."),
        Panel("Object store used", [
            ('sum(ray_object_store_memory) / sum(ray_resources{Name="object_store_memory"})', "used")],
            unit="percentunit", kind="stat", width=6),
    ]
    variables = [
        _variable_job(),
        _variable_text("teacher_component", "Teacher actor (regex)", ".*Teacher.*",
                       "Regex on Ray's Component label (the actor's process title) of teacher actors."),
        _variable_text("student_component", "Student worker (regex)", ".*RayTrainWorker.*",
                       "Regex on Ray's Component label of the student's Ray Train workers."),
    ]
    return dashboard("ckd-cluster-gpu", "CKD / Cluster GPUs",
                     "GPU use of the cluster by node and by role (teacher pool vs student group), object store.",
                     variables, panels)


def teacher_pool() -> dict:
    def rate(metric: str) -> str:
        return f"sum by (stage, step, pool) (rate({metric}{{{JOB_STAGE}}}{RATE}))"

    def quantile(q: float) -> str:
        return (f"histogram_quantile({q}, sum by (le, pool) "
                f"(rate(ray_ckd_teacher_batch_latency_seconds_bucket{{{JOB_STAGE}}}{RATE})))")

    legend = "{{stage}}/{{step}} {{pool}}"
    panels = [
        Panel("Samples/s", [(rate("ray_ckd_teacher_samples_total"), legend)], unit="short",
              description="Samples the teacher pool answers per second."),
        Panel("Batches/s", [(rate("ray_ckd_teacher_batches_total"), legend)], unit="short"),
        Panel("Batch latency quantiles", [
            (quantile(0.5), "p50 {{pool}}"), (quantile(0.95), "p95 {{pool}}"), (quantile(0.99), "p99 {{pool}}")],
            unit="s", description="Forward plus signal compression of one batch."),
        Panel("Mean batch latency", [(
            f"{rate('ray_ckd_teacher_batch_latency_seconds_sum')} / "
            f"{rate('ray_ckd_teacher_batch_latency_seconds_count')}", legend)], unit="s"),
        Panel("Actors alive", [
            (f"sum by (stage, step, pool) (ray_ckd_teacher_actors_alive{{{JOB_STAGE}}})", legend)],
            unit="short", description="Only the current stage's pool should be alive."),
        Panel("Signal shipped", [(rate("ray_ckd_teacher_signal_bytes_total"), legend)], unit="Bps",
              description="Compressed teacher signal put into the object store per second."),
        Panel("Signal per sample", [(
            f"{rate('ray_ckd_teacher_signal_bytes_total')} / {rate('ray_ckd_teacher_samples_total')}", legend)],
            unit="bytes", description="Top-k logits, Gram matrix, attention blocks, features, fact distributions."),
        Panel("Teacher GPU utilization", [(_gpu_by("ray_ckd_gpu_utilization_percent", "teacher"),
                                           "{{instance}} gpu {{gpu}}")], unit="percent",
              description="GPUs of the teacher actors of this job. GPU only."),
        Panel("Teacher GPU memory used", [(_gpu_by("ray_ckd_gpu_memory_used_bytes", "teacher"),
                                           "{{instance}} gpu {{gpu}}")], unit="bytes", description="GPU only."),
    ]
    return dashboard("ckd-teacher-pool", "CKD / Teacher pools",
                     "Throughput, latency, size and shipped signal of the teacher actor pools.",
                     [_variable_job(), _variable_stage()], panels)


def student() -> dict:
    def rate(metric: str, by: str = "stage, step") -> str:
        return f"sum by ({by}) (rate({metric}{{{JOB_STAGE}}}{RATE}))"

    def quantile(q: float) -> str:
        return (f"histogram_quantile({q}, sum by (le, stage, step) "
                f"(rate(ray_ckd_student_step_seconds_bucket{{{JOB_STAGE}}}{RATE})))")

    legend = "{{stage}}/{{step}}"
    per_worker = "stage, step, worker"
    panels = [
        Panel("Loss by term", [
            (f"avg by (stage, step, term) (ray_ckd_student_loss{{{JOB_STAGE}}})", "{{stage}}/{{step}} {{term}}")],
            unit="short", width=24, description="Last value of each loss term, averaged over the workers."),
        Panel("Tokens/s", [(rate("ray_ckd_student_tokens_total"), legend)], unit="short",
              description="Tokens trained on per second, all workers."),
        Panel("Steps/s per worker", [(rate("ray_ckd_student_steps_total", per_worker),
                                      "{{stage}}/{{step}} {{worker}}")], unit="short"),
        Panel("Step time quantiles", [(quantile(0.5), "p50 " + legend), (quantile(0.95), "p95 " + legend)],
              unit="s", description="Wall time of one step, data wait included."),
        Panel("Data-wait share", [(
            f"{rate('ray_ckd_student_data_wait_seconds_total', per_worker)} / "
            f"{rate('ray_ckd_student_step_seconds_total', per_worker)}", "{{stage}}/{{step}} {{worker}}")],
            unit="percentunit",
            description="Share of step time spent waiting for the next batch: near 0 when the teacher "
                        "pool keeps up, near 1 when the student starves."),
        Panel("Learning rate", [(f"max by (stage, step) (ray_ckd_student_lr{{{JOB_STAGE}}})", legend)],
              unit="short"),
        Panel("Fused teachers: mean weight per teacher", [
            (f"avg by (stage, step, term, teacher) (ray_ckd_student_fusion_weight{{{JOB_STAGE}}})",
             "{{stage}}/{{step}} {{term}} {{teacher}}")], unit="short",
            description="A fused step's (cascade.plan: fused) mean per-token weight of each teacher in each fused "
                        "term over the last optimizer step, averaged over the workers: which teacher taught what. "
                        "Empty for single-teacher steps."),
        Panel("Checkpoint time", [
            (f"max by (stage, step, worker) (ray_ckd_student_checkpoint_seconds{{{JOB_STAGE}}})",
             "{{stage}}/{{step}} {{worker}}")], unit="s", description="Time the last checkpoint took to save."),
        Panel("Student GPU utilization", [(_gpu_by("ray_ckd_gpu_utilization_percent", "student"),
                                           "{{instance}} gpu {{gpu}}")], unit="percent",
              description="GPUs of the student workers of this job. GPU only."),
        Panel("Student GPU memory used", [(_gpu_by("ray_ckd_gpu_memory_used_bytes", "student"),
                                           "{{instance}} gpu {{gpu}}")], unit="bytes", description="GPU only."),
    ]
    return dashboard("ckd-student", "CKD / Student",
                     "Loss terms, throughput, step time, data wait, learning rate and checkpoints of the student.",
                     [_variable_job(), _variable_stage()], panels)


def cascade() -> dict:
    by_step = "stage, step"
    rejected = f"sum by ({by_step}) (ray_ckd_data_rejected_total{{{JOB}}})"
    kept = f"sum by ({by_step}) (ray_ckd_data_samples_total{{{JOB}}})"
    panels = [
        Panel("Current step", [(f"max(ray_ckd_cascade_step_index{{{JOB}}}) + 1", "step")],
              kind="stat", width=6, height=5, description="1-based position of the step started last."),
        Panel("Planned steps", [(f"max(ray_ckd_cascade_steps_total{{{JOB}}})", "steps")],
              kind="stat", width=6, height=5),
        Panel("Steps completed", [(f"sum(ray_ckd_cascade_steps_completed_total{{{JOB}}})", "completed")],
              kind="stat", width=6, height=5, description="Finished by this run of the job (resumed steps are skipped)."),
        Panel("Progress", [(
            f"sum(ray_ckd_cascade_steps_completed_total{{{JOB}}}) / max(ray_ckd_cascade_steps_total{{{JOB}}})",
            "done")], unit="percentunit", kind="stat", width=6, height=5),
        Panel("Running step", [(f"max by ({by_step}) (ray_ckd_cascade_step_running{{{JOB}}})", "{{stage}}/{{step}}")],
              kind="state-timeline", width=24, description="1 while a step runs."),
        Panel("Step wall time", [(f"max by ({by_step}) (ray_ckd_cascade_step_seconds{{{JOB}}})", "{{stage}}/{{step}}")],
              unit="s", kind="bargauge"),
        Panel("Total loss per step", [(
            f'avg by ({by_step}) (ray_ckd_student_loss{{{JOB},term="total"}})', "{{stage}}/{{step}}")],
            unit="short", description="The weighted loss the student minimizes, across the cascade."),
        Panel("Records kept", [(kept, "{{stage}}/{{step}}")], unit="short"),
        Panel("Records rejected by reason", [(
            f"sum by ({by_step}, reason) (ray_ckd_data_rejected_total{{{JOB}}})", "{{stage}}/{{step}} {{reason}}")],
            unit="short", description="Skipped records; each is also in the step's rejects file."),
        Panel("Reject fraction", [(f"{rejected} / ({rejected} + {kept})", "{{stage}}/{{step}}")],
              unit="percentunit", description="The job fails when this exceeds the configured fraction."),
    ]
    return dashboard("ckd-cascade", "CKD / Cascade progress",
                     "Where a cascade job is in its plan of stages x steps, and what its data pipeline rejected.",
                     [_variable_job()], panels)


DASHBOARDS = {
    "ckd-cluster-gpu.json": cluster_gpu,
    "ckd-teacher-pool.json": teacher_pool,
    "ckd-student.json": student,
    "ckd-cascade.json": cascade,
}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = HERE / name, render(build)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
