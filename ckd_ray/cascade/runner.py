"""`run_cascade`: runs a job's plan on Ray, one step at a time.

For every step: build the step's datasets (Ray Data), attach the teacher signal (a teacher pool
pass written to the signal cache, or a cache hit), train the learner (Ray Train + DeepSpeed),
record the step in the manifest, and after each stage evaluate the learner. The manifest makes a
resubmitted job skip finished steps and resume an unfinished one from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from functools import partial

from ckd_ray import storage
from ckd_ray.cascade.datasets import StepData
from ckd_ray.cascade.manifest import Manifest
from ckd_ray.cascade.plan import PlannedStep, build_plan
from ckd_ray.cascade.signal import attach_teacher_signal
from ckd_ray.config.job import JobConfig, RayConfig
from ckd_ray.evaluate import evaluate_model, knowledge_preservation
from ckd_ray.teachers.signal import decode_signal


@dataclass
class CascadeResult:
    """Where a finished job's outputs are."""

    run_uri: str
    manifest_uri: str
    report_uri: str
    student_uri: str
    seconds: float


def connect_ray(settings: RayConfig, *, metrics_export_port: int | None = None) -> None:
    """Joins the cluster named by the config or RAY_ADDRESS (set inside `ray job submit`), or
    starts a local Ray sized by `ray.num_cpus`."""
    import ray

    if ray.is_initialized():
        return
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs = {"num_cpus": settings.num_cpus}
    if settings.object_store_memory_mb:
        kwargs["object_store_memory"] = settings.object_store_memory_mb * 2**20
    if metrics_export_port:
        kwargs["_metrics_export_port"] = metrics_export_port
    ray.init(**kwargs)


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars interleave with the step lines of a cascade; the
    runner prints one line per step and per report instead."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def run_cascade(job: JobConfig, *, log=print) -> CascadeResult:
    from ckd_ray.observability.metrics import CascadeMetrics
    from ckd_ray.report import write_report
    from ckd_ray.train.run import run_step

    start = time.perf_counter()
    connect_ray(job.ray, metrics_export_port=job.observability.metrics_export_port)
    quiet_data_progress()
    run_uri = job.run_uri
    manifest = Manifest.open(run_uri, job)
    plan = build_plan(job)
    data = StepData(job, run_uri)
    metrics = CascadeMetrics(job.name)
    log(f"[cascade] {job.name}: {len(plan)} steps, outputs in {run_uri}")
    _initial_checkpoints(job, manifest, data.processor_uri, run_uri, log, roles={p.learner for p in plan} | {p.teacher for p in plan if p.teacher} | {"student"})
    histories: dict[str, list[dict]] = {}
    for planned in plan:
        label = f"step {planned.index + 1}/{len(plan)} {planned.step_id}"
        if manifest.done(planned.step_id):
            log(f"[cascade] {label}: done in an earlier run, skipped")
            histories[planned.step_id] = manifest.steps[planned.step_id].get("history", [])
            continue
        metrics.step_started(planned.stage.label, planned.kind, planned.index, len(plan))
        step_start = time.perf_counter()
        log(f"[cascade] {label}: {planned.teacher or 'no teacher'} -> {planned.learner}, {planned.kind}")
        if manifest.steps.get(planned.step_id, {}).get("status") == "running":
            log(f"[cascade]   resuming: an earlier run stopped in this step; training continues from its last checkpoint")
        manifest.record(planned.step_id, status="running", **_describe(planned))
        train_dataset = data.train(planned)
        teacher_pass, decoder = {}, None
        if planned.distills:
            train_dataset, spec, teacher_pass = attach_teacher_signal(
                job, planned, manifest.roles[planned.teacher], manifest.roles[planned.learner], train_dataset, data, log
            )
            decoder = partial(decode_signal, spec=spec, attention_layers=dict(planned.loss.attention_layers))
        result = run_step(
            job, planned.stage, planned.step,
            init_model_uri=manifest.roles[planned.learner],
            train_dataset=train_dataset,
            val_dataset=data.validation(planned),
            output_uri=storage.join(run_uri, "steps", planned.step_id),
            num_train_samples=teacher_pass.get("samples"),
            decode_signal=decoder,
        )
        data.check_rejects(planned)
        manifest.roles[planned.learner] = result.model_uri
        seconds = round(time.perf_counter() - step_start, 2)
        histories[planned.step_id] = result.history
        manifest.record(planned.step_id, status="done", model_uri=result.model_uri, metrics=result.metrics,
                        history=result.history, teacher_pass=teacher_pass, seconds=seconds)
        metrics.step_finished(planned.stage.label, planned.kind, seconds)
        if _last_of_stage(plan, planned):
            _evaluate(job, manifest, planned, data, log)
    report_uri = write_report(run_uri, manifest, histories, metrics_note=_metrics_note(job))
    seconds = time.perf_counter() - start
    log(f"[cascade] finished in {seconds:.0f} s; report: {report_uri}")
    return CascadeResult(run_uri, manifest.uri, report_uri, manifest.roles["student"], seconds)


def _describe(planned: PlannedStep) -> dict:
    return {"stage": planned.stage.label, "step": planned.kind, "learner": planned.learner, "teacher": planned.teacher,
            "weights": planned.loss.weights.model_dump(), "temperature": planned.loss.temperature,
            "hop_levels": planned.stage.hop_levels}


def _last_of_stage(plan: list[PlannedStep], planned: PlannedStep) -> bool:
    following = plan[planned.index + 1 :]
    return not following or following[0].stage is not planned.stage


def _initial_checkpoints(job: JobConfig, manifest: Manifest, processor_uri: str, run_uri: str, log, roles=None) -> None:
    """Every role the plan uses starts from a model directory: presets are built (seeded) and
    saved into the run folder once; given paths are used as they are."""
    from ckd_ray.models import build_preset, save_model

    for offset, (role, spec) in enumerate(sorted(job.models.items())):
        if role in manifest.roles or (roles is not None and role not in roles):
            continue
        if spec.path:
            manifest.roles[role] = spec.path
            continue
        uri = storage.join(run_uri, "models", f"{role}-init")
        with tempfile.TemporaryDirectory() as tmp:
            model = build_preset(spec.preset, seed=job.seed * 1000 + offset)
            save_model(model, tmp, storage.download_dir(processor_uri))
            storage.upload_dir(tmp, uri)
        manifest.roles[role] = uri
        log(f"[cascade] built {spec.preset} for role {role!r} -> {uri}")
    manifest.save()


def _evaluate(job: JobConfig, manifest: Manifest, planned: PlannedStep, data, log) -> None:
    """Scores the stage's learner on the held-out split; a distillation stage also scores its
    teacher (for knowledge preservation). A checkpoint already scored is not scored again."""
    rows = data.evaluation_rows()
    name = f"{planned.stage.label} ({planned.learner})"
    entry = _scores_of(job, manifest, name, manifest.roles[planned.learner], rows)
    if planned.teacher:
        teacher = _scores_of(job, manifest, f"teacher {planned.teacher} of {planned.stage.label}", manifest.roles[planned.teacher], rows)
        entry["knowledge_preservation"] = knowledge_preservation(entry["scores"], teacher["scores"])
        entry["teacher"] = teacher["model_uri"]
    manifest.save()
    scores = entry["scores"]
    log(f"[cascade] eval {name}: average {scores['average']:.3f}, accuracy {scores['accuracy']:.3f} on {int(scores['num_samples'])} samples")


def _scores_of(job: JobConfig, manifest: Manifest, name: str, model_uri: str, rows) -> dict:
    """The manifest's evaluation entry of `model_uri` (scored now unless it already was)."""
    for entry in manifest.evaluations.values():
        if entry["model_uri"] == model_uri:
            return entry
    result = evaluate_model(model_uri, rows, job.evaluation, use_gpu=job.trainer.use_gpu)
    # Every answer next to its reference, so a score can be checked (e.g. a model that always says "no").
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    predictions_uri = storage.join(job.run_uri, "evaluations", f"{slug}.jsonl")
    storage.write_bytes(predictions_uri, "".join(json.dumps(record) + "\n" for record in result["records"]).encode())
    manifest.evaluations[name] = {"scores": result["scores"], "model_uri": model_uri, "predictions_uri": predictions_uri}
    return manifest.evaluations[name]


def _metrics_note(job: JobConfig) -> str:
    return (
        f"Metrics of this run carry the label `job=\"{job.name}\"` (Prometheus names start with `ray_ckd_`). "
        "Open the Grafana dashboards in `dashboards/` (student, teacher pool, cascade progress, cluster GPU) "
        f"and pick job `{job.name}`; see the README section on observability."
    )
