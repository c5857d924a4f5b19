"""`run_cascade`: runs a job's plan on Ray, one step at a time.

For every step: build the step's datasets (Ray Data), attach the teacher signal (a teacher pool
pass written to the signal cache, or a cache hit), train the learner (Ray Train + DeepSpeed),
record the step in the manifest, and after each stage evaluate the learner. The manifest makes a
resubmitted job skip finished steps and resume an unfinished one from its last checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from ckd_ray import storage
from ckd_ray.cascade.datasets import StepData
from ckd_ray.cascade.manifest import Manifest
from ckd_ray.cascade.plan import PlannedStep, build_plan
from ckd_ray.cascade.session import open_run
from ckd_ray.cascade.steps import TeacherPasses, prepare_segment, split_segments
from ckd_ray.config.job import JobConfig
from ckd_ray.evaluate import evaluate_models, knowledge_preservation
from ckd_ray.evaluate.scoring import baseline_scores, describe_scores
from ckd_ray.train.run import RUN_FOLDER


@dataclass
class CascadeResult:
    """Where a finished job's outputs are."""

    run_uri: str
    manifest_uri: str
    report_uri: str
    student_uri: str
    seconds: float


def run_cascade(job: JobConfig, *, log=print, progress: bool = True, log_to_driver: bool = True,
                in_process: bool = False) -> CascadeResult:
    """Runs the job's plan; returns where its outputs are. Consecutive steps share one worker
    group (see `ckd_ray.cascade.steps.split_segments`); `progress` shows a bar per step;
    `log_to_driver` as in `connect_ray`. `in_process` (one worker) trains in this process
    instead of a worker group (`run_steps`): no group to start, but no restart of a failed
    worker either (a rerun resumes at the step)."""
    from ckd_ray.observability.metrics import CascadeMetrics
    from ckd_ray.report import write_report
    from ckd_ray.report.markdown import command_share

    start = time.perf_counter()
    # With share_prepared_teachers, the teachers are prepared in runs of their own (or found
    # there) and this job starts from them.
    session = open_run(job, run=run_cascade, log=log, copy_scores=True, log_to_driver=log_to_driver)
    job, run_uri, manifest, data, ray_started = session.job, session.run_uri, session.manifest, session.data, session.ray_started
    plan = build_plan(job)
    metrics = CascadeMetrics(job.name)
    log(f"[cascade] {job.name}: {len(plan)} steps, outputs in {run_uri}")
    histories: dict[str, list[dict]] = {}
    trained_now: list[str] = []  # the steps this command trains (a resumed run skips the others)
    # One worker group for the whole plan when passes can wait for their teacher beside it (the
    # cache holds what they write); a streamed teacher needs its model before the group starts.
    for segment in split_segments(plan, one_group=job.teacher_pool.use_cache):
        pending = []
        for planned in segment:
            if manifest.done(planned.step_id):
                log(f"[cascade] {_label(plan, planned)}: done in an earlier run, skipped")
                histories[planned.step_id] = manifest.steps[planned.step_id].get("history", [])
            else:
                pending.append(planned)
        if pending:
            _train_segment(job, plan, segment, pending, manifest, data, histories, metrics, log, progress, in_process)
            trained_now += [planned.step_id for planned in pending]
    command = {"seconds": time.perf_counter() - ray_started, "steps": trained_now}
    report_uri = write_report(run_uri, manifest, histories, metrics_note=_metrics_note(job), command=command)
    seconds = time.perf_counter() - start
    share = command_share(manifest.steps, command)
    log(f"[cascade] finished in {seconds:.0f} s" + (f" (compute share {100 * share:.0f}% of Ray start to report)" if share else "")
        + f"; report: {report_uri}")
    return CascadeResult(run_uri, manifest.uri, report_uri, manifest.roles["student"], seconds)


def _label(plan: list[PlannedStep], planned: PlannedStep) -> str:
    return f"step {planned.index + 1}/{len(plan)} {planned.step_id}"


def _train_segment(job: JobConfig, plan, segment: list[PlannedStep], pending: list[PlannedStep], manifest: Manifest, data: StepData, histories, metrics,
                   log, progress: bool, in_process: bool = False) -> None:
    """Prepares the segment's steps on the driver (data plans, and the teacher passes whose
    teachers exist), then trains them on one worker group, recording each step in the manifest
    as the group reports it. The passes of teachers the group trains itself (and, with
    `teacher_pool.overlap_training`, every pass) run beside it (`TeacherPasses`): a step's
    workers wait for its own pass only. The stages that end in the segment are evaluated after
    it: on a small machine an evaluation beside the training group only takes its cores, and
    each step's phases stay its own."""
    from ckd_ray.train.run import read_step_result, run_steps

    run_uri = job.run_uri
    # Named after the segment's first step, pending or not: a resubmission finds the same folder.
    segment_name = f"{RUN_FOLDER}/{segment[0].step_id}"
    passes: list = []  # the teacher passes to run while the group trains
    steps = prepare_segment(job, pending, data, dict(manifest.roles), output_uri=run_uri, log=log, deferred=passes)
    prepared = {planned.step_id: step for planned, step in zip(pending, steps)}
    by_id = {planned.step_id: planned for planned in pending}
    clock = {"last": None}
    bars = {}
    started_at: dict[str, float] = {}

    def on_event(kind: str, step_id: str, payload: dict) -> None:
        if kind == "group_started":
            clock["last"] = time.time()
            return
        planned = by_id[step_id]
        step = prepared[step_id]
        if kind == "started":
            started_at[step_id] = payload.get("at", time.time())
            metrics.step_started(planned.stage.label, planned.kind, planned.index, len(plan))
            log(f"[cascade] {_label(plan, planned)}: {' + '.join(planned.teachers) or 'no teacher'} -> {planned.learner}, {planned.kind}")
            if manifest.steps.get(step_id, {}).get("status") == "running":
                log("[cascade]   resuming: an earlier run stopped in this step; training continues from its last checkpoint")
            if "worker_start_s" in payload:
                step.driver_phases["worker_start"] = max(0.0, payload["worker_start_s"] - payload.get("engine_init_s", 0.0))
            manifest.record(step_id, status="running", **_describe(planned))
            bars[step_id] = StepProgress(step.train_step.plan.total_steps, planned.kind, payload.get("resumed_from", 0), progress)
        elif kind == "progress" and step_id in bars:
            bars[step_id].update(payload)
        elif kind == "done":
            if step_id in bars:
                bars.pop(step_id).close()
            result = read_step_result(step.train_step.plan, run_uri, segment_name)
            beside = training_beside_passes(passes, started_at.get(step_id), payload.get("at", time.time()),
                                            result.phases.get("training", 0.0))
            _record_done(job, plan, planned, step, payload, result, manifest, data, histories, metrics, clock, log, beside)

    steps = [prepared[p.step_id].train_step for p in pending]
    teacher_passes = TeacherPasses(passes, job.teacher_pool.concurrent_passes)
    try:
        results = run_steps(job.trainer, steps, storage_uri=run_uri, name=segment_name, on_event=on_event, in_process=in_process)
    except BaseException:
        teacher_passes.stop()  # passes still waiting for a teacher the group will not export
        if teacher_passes.errors:  # workers that waited for a failed pass stop with its error: name the pass's own
            raise teacher_passes.errors[0] from None
        raise
    teacher_passes.join()
    for planned, result in zip(pending, results):  # steps whose events were lost (a restart) are recorded here
        if not manifest.done(planned.step_id):
            _record_done(job, plan, planned, prepared[planned.step_id], {}, result, manifest, data, histories, metrics, clock, log)
    _evaluate_stages(job, manifest, [planned for planned in segment if _last_of_stage(plan, planned)], data, log)


def training_beside_passes(passes: list, started: float | None, finished: float, training_s: float) -> float:
    """Of a step's `training_s`, the seconds spent while a deferred teacher pass ran beside the
    group (they share its cores or GPUs): the step's training prorated by the share of its time
    on the group ([started, finished], wall clock) that some pass overlapped."""
    if started is None or finished <= started or not training_s:
        return 0.0
    spans = sorted((max(p.started_at, started), min(p.ended_at or finished, finished))
                   for p in passes if p.started_at is not None)
    covered, reach = 0.0, started
    for begin, end in spans:  # the union of the passes' spans within the step's
        begin = max(begin, reach)
        if end > begin:
            covered, reach = covered + end - begin, end
    return round(training_s * covered / (finished - started), 3)


def _record_done(job, plan, planned, step, payload, result, manifest, data, histories, metrics, clock, log,
                 beside_pass_s: float = 0.0) -> None:
    finished_at = payload.get("at", time.time())
    worker_s = finished_at - clock["last"] if clock["last"] else sum(result.phases.values())
    clock["last"] = finished_at
    phases = {**step.driver_phases, **result.phases}
    seconds = round(sum(v for k, v in step.driver_phases.items() if k != "worker_start") + worker_s, 2)
    phases["other"] = max(0.0, seconds - sum(phases.values()))
    data.check_rejects(planned)
    manifest.roles[planned.learner] = result.model_uri
    histories[planned.step_id] = result.history
    manifest.record(planned.step_id, status="done", **_describe(planned), model_uri=result.model_uri, metrics=result.metrics,
                    history=result.history, teacher_pass=step.teacher_pass, teacher_uri=step.teacher_uri, seconds=seconds,
                    phases={k: round(v, 3) for k, v in phases.items()}, training_beside_pass_s=beside_pass_s)
    metrics.step_finished(planned.stage.label, planned.kind, seconds)
    share = phases.get("training", 0.0) / seconds if seconds else 0.0
    log(f"[cascade]   {planned.step_id}: {result.num_steps} optimizer steps in {seconds:.1f} s "
        f"(compute share {100 * share:.0f}%), val_loss {result.metrics.get('val_loss', float('nan')):.4f}")


class StepProgress:
    """A progress bar of one step's optimizer steps (loss, samples/s, ETA) on the console."""

    def __init__(self, total: int, kind: str, initial: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=f"  {kind}", unit="step", disable=not enabled, leave=False,
                        dynamic_ncols=True)
        self.samples, self.started = 0, time.perf_counter()

    def update(self, payload: dict) -> None:
        self.samples += payload.get("samples", 0)
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"loss {payload['loss']:.4f}, {rate:.0f} samples/s", refresh=False)
        self.bar.update(payload["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _describe(planned: PlannedStep) -> dict:
    return {"stage": planned.stage.label, "step": planned.kind, "learner": planned.learner, "teacher": "+".join(planned.teachers) or None,
            "weights": planned.loss.weights.model_dump(), "temperature": planned.loss.temperature,
            "hop_levels": planned.stage.hop_levels}


def _last_of_stage(plan: list[PlannedStep], planned: PlannedStep) -> bool:
    following = plan[planned.index + 1 :]
    return not following or following[0].stage is not planned.stage


def _evaluate_stages(job: JobConfig, manifest: Manifest, ended: list[PlannedStep], data, log) -> None:
    """Scores the learner of each stage in `ended` (its last step) on the held-out split; a
    distillation stage also scores its teacher (for knowledge preservation). The models not
    scored yet are scored together (each evaluation is its own one-CPU task, so a segment's
    evaluations run side by side), then each stage's entry is filled in order."""
    if not ended:
        return
    rows = data.evaluation_rows()  # read once per job
    wanted = []
    for planned in ended:
        # The models of that step: later steps of the same worker group may have moved the roles on.
        step = manifest.steps[planned.step_id]
        wanted.append((f"{planned.stage.label} ({planned.learner})", step["model_uri"]))
        if planned.teacher:
            wanted.append((f"teacher {planned.teacher} of {planned.stage.label}", step.get("teacher_uri") or manifest.roles[planned.teacher]))
    scored = {entry["model_uri"] for entry in manifest.evaluations.values()}
    todo = list(dict((uri, name) for name, uri in wanted if uri not in scored).items())
    if todo:
        started = time.perf_counter()
        results = evaluate_models([uri for uri, _ in todo], rows, job.evaluation, use_gpu=job.trainer.use_gpu)
        share = (time.perf_counter() - started) / len(todo)  # they ran side by side: each is charged its share of the wall time
        for (uri, name), result in zip(todo, results):
            _record_scores(job, manifest, name, uri, result, share)
        if not manifest.baselines:
            manifest.baselines = baseline_scores(results[0]["records"])
    for planned in ended:
        step = manifest.steps[planned.step_id]
        name = f"{planned.stage.label} ({planned.learner})"
        entry = _scores_of(manifest, name, step["model_uri"])
        if planned.teacher:
            teacher_uri = step.get("teacher_uri") or manifest.roles[planned.teacher]
            teacher = _scores_of(manifest, f"teacher {planned.teacher} of {planned.stage.label}", teacher_uri)
            entry["knowledge_preservation"] = knowledge_preservation(entry["scores"], teacher["scores"])
            entry["teacher"] = teacher["model_uri"]
        log(f"[cascade] eval {name}: {describe_scores(entry['scores'])}")
    manifest.save()


def _scores_of(manifest: Manifest, name: str, model_uri: str) -> dict:
    """The manifest's evaluation entry of `model_uri`, filed under `name` (an entry of the same
    model under another name is shared: a checkpoint is scored once)."""
    for entry in manifest.evaluations.values():
        if entry["model_uri"] == model_uri:
            return entry
    raise KeyError(f"no evaluation of {model_uri} in the manifest")


def _record_scores(job: JobConfig, manifest: Manifest, name: str, model_uri: str, result: dict, seconds: float) -> None:
    # Every answer next to its reference, so a score can be checked (e.g. a model that always says "no").
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    predictions_uri = storage.join(job.run_uri, "evaluations", f"{slug}.jsonl")
    storage.write_bytes(predictions_uri, "".join(json.dumps(record) + "\n" for record in result["records"]).encode())
    manifest.evaluations[name] = {"scores": result["scores"], "model_uri": model_uri, "predictions_uri": predictions_uri,
                                  "seconds": round(seconds, 2)}


def _metrics_note(job: JobConfig) -> str:
    return (
        f"Metrics of this run carry the label `job=\"{job.name}\"` (Prometheus names start with `ray_ckd_`). "
        "Open the Grafana dashboards in `dashboards/` (student, teacher pool, cascade progress, cluster GPU) "
        f"and pick job `{job.name}`; see the README section on observability."
    )
