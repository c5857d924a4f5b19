"""`run_tune`: Ray Tune searches over the loss weights and temperature of a job's stages.

The teacher runs once per distillation step of a searched stage, not once per trial: before a
search the driver attaches the step's teacher signal as the cascade would (a teacher pool pass
written to the signal cache, or a hit), with every searched term's signal included, and
materializes the step's validation data. Each trial then asks for the same signal and gets a
cache hit (see `trial.py`). How many teacher passes and cache hits each side saw is recorded.

per_stage: stages run in cascade order; a searched stage is searched from the student the
previous stages produced, then (when a later stage follows) trained in full with its best values,
and that student starts the next stage. joint: one search whose trials run every distilling stage
in turn. Stages before the first search, and teacher preparation, run once as in the cascade.

Everything goes to `<storage.root>/<name>/tune/`: Tune's experiment folders, the steps trained in
full (with a manifest, so a rerun resumes them), `results.csv`/`results.md`, plots,
`tune_report.md` and `best_config.yaml`, a cascade config with each stage's best loss.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import yaml
from ray import tune

from ckd_ray import storage
from ckd_ray.cascade.datasets import StepData
from ckd_ray.cascade.manifest import Manifest
from ckd_ray.cascade.plan import PlannedStep, build_plan, teacher_roles_to_prepare
from ckd_ray.cascade.runner import CascadeResult, run_cascade
from ckd_ray.cascade.session import open_run
from ckd_ray.cascade.signal import attach_fused_signal, attach_teacher_signal
from ckd_ray.cascade.steps import prepare_segment, split_segments, teacher_uris
from ckd_ray.config.job import JobConfig
from ckd_ray.config.loader import validate_config
from ckd_ray.errors import ConfigError
from ckd_ray.tune.checks import check_tune
from ckd_ray.tune.space import Search, plan_searches, signal_step, split_key, with_values
from ckd_ray.tune.trial import (
    CACHE_HITS,
    OPTIMIZER_SECONDS,
    TEACHER_PASSES,
    TRAIN_TASK_LOSS,
    TRIAL_STEP,
    VALIDATED,
    ReleaseStoppedTrialRuns,
    run_trial,
    runs_in_process,
)

BEST_CONFIG = "best_config.yaml"


@dataclass
class SearchOutcome:
    """One finished search: a row per trial, the best trial's values, and the teacher signal
    accounting (passes = teacher pool runs, hits = signal cache reads)."""

    search: Search
    rows: list[dict]
    best_values: dict[str, float] | None
    best_metric: float | None
    signal: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("driver_teacher_passes", "driver_cache_hits", "trial_teacher_passes", "trial_cache_hits"), 0))

    def count(self, teacher_pass: dict) -> None:
        """Adds one driver-side signal attachment (before the search, or a full stage run)."""
        if teacher_pass:
            self.signal["driver_cache_hits" if teacher_pass["source"] == "cache hit" else "driver_teacher_passes"] += 1


@dataclass
class TuneOutcome:
    """Where a finished `ckd-ray tune` put its outputs, and what it found."""

    tune_uri: str
    report_uri: str
    best_config_uri: str
    searches: list[SearchOutcome]
    best_values: dict[int, dict[str, float]]
    """Stage index (0-based) -> best values by name ("output", "temperature")."""
    cascade: CascadeResult | None = None
    """The cascade run with the best config (`run_best`)."""
    untuned: CascadeResult | None = None
    """The same cascade with the configured weights (`run_best`), beside it in the report."""


def run_tune(job: JobConfig, *, run_best: bool = False, log=print, log_to_driver: bool = True) -> TuneOutcome:
    from ckd_ray.tune.report import write_tune_report

    problems = check_tune(job)
    if problems:
        raise ConfigError(problems, "tune")
    # The cascade's shared preparation runs: a quickstart with the same recipe made them.
    session = open_run(job, run=run_cascade, log=log, folder="tune", check_evaluation=False, log_to_driver=log_to_driver)
    job, tune_uri, manifest, data = session.job, session.run_uri, session.manifest, session.data
    searches = plan_searches(job)
    log(f"[tune] {job.name}: {job.tune.mode}, {len(searches)} search(es) of {job.tune.num_samples} trials, "
        f"{job.tune.max_steps_per_trial} steps per trial; outputs in {tune_uri}")
    # Teacher preparation: once, as in the cascade.
    _run_full_steps(job, [p for p in build_plan(job) if p.stage_index < 0], manifest.roles, manifest, data, tune_uri, "", log)
    prepared = {role: manifest.roles[role] for role in teacher_roles_to_prepare(job)}

    roles = dict(manifest.roles)  # the searched stages' students evolve here, not in the manifest
    best_values: dict[int, dict[str, float]] = {}
    outcomes: list[SearchOutcome] = []
    starts = {search.stage_indices[0]: search for search in searches}
    last_searched = max(search.stage_indices[-1] for search in searches)
    current = job
    for stage_index in range(last_searched + 1):
        if stage_index in starts:
            outcome = _search(current, starts[stage_index], roles, data, tune_uri, log)
            outcomes.append(outcome)
            if outcome.best_values is None:
                break
            for key, value in outcome.best_values.items():
                stage, name = split_key(key)
                best_values.setdefault(stage, {})[name] = value
            current = with_values(job, best_values)
        if job.tune.mode == "joint" or stage_index == last_searched:
            break
        digest = hashlib.sha256(json.dumps(best_values, sort_keys=True).encode()).hexdigest()[:8]
        stage_steps = [p for p in build_plan(current) if p.stage_index == stage_index]
        for teacher_pass in _run_full_steps(current, stage_steps, roles, manifest, data, tune_uri, f"-{digest}", log):
            if outcomes and stage_index in outcomes[-1].search.stage_indices:
                outcomes[-1].count(teacher_pass)

    best_raw = best_config(job, best_values, prepared)
    best_config_uri = storage.join(tune_uri, BEST_CONFIG)
    header = f"# Cascade config with the best loss weights and temperature found by `ckd-ray tune` for {job.name!r}.\n"
    storage.write_bytes(best_config_uri, (header + yaml.safe_dump(best_raw, sort_keys=False)).encode())
    report_uri = write_tune_report(tune_uri, job, outcomes, best_values, BEST_CONFIG)
    log(f"[tune] report: {report_uri}")
    failed = [o.search.name for o in outcomes if o.best_values is None]
    if failed:
        raise RuntimeError(f"no trial of {', '.join(failed)} finished with a validation metric: see {report_uri}")
    log(f"[tune] best config: {best_config_uri}")
    outcome = TuneOutcome(tune_uri, report_uri, best_config_uri, outcomes, best_values)
    if run_best:
        from ckd_ray.tune.report import append_comparison

        log(f"[tune] running the cascade with the best config ({best_raw['name']})")
        tuned = validate_config(best_raw, source=best_config_uri)
        outcome.cascade = run_cascade(tuned, log=log, log_to_driver=log_to_driver)
        # The same cascade with the configured (untuned) weights, so the report shows what tuning gave.
        untuned_raw = {**best_config(job, {}, prepared), "name": f"{job.name}-untuned"}
        untuned = validate_config(untuned_raw, source="the untuned config")
        log(f"[tune] running the same cascade with the untuned weights ({untuned.name}), to compare")
        outcome.untuned = run_cascade(untuned, log=log, log_to_driver=log_to_driver)
        append_comparison(report_uri, {"tuned": (tuned, outcome.cascade), "untuned": (untuned, outcome.untuned)})
    return outcome


def best_config(job: JobConfig, best_values: dict[int, dict[str, float]], prepared: dict[str, str] | None = None) -> dict:
    """The job as a cascade config with each tuned stage's loss set to its best values, under the
    name `<name>-tuned` (its own run folder: a manifest of the untuned job would not match).
    `prepared` (role -> checkpoint URI) names the teachers the search prepared: the config loads
    them from there, so its cascade distills from the teachers the values were searched with and
    does not train them again. Validated here, so a file that would not load is never written."""
    tuned = with_values(job, best_values).model_copy(update={"name": f"{job.name}-tuned"})
    raw = tuned.model_dump(mode="json", exclude_defaults=True, exclude={"tune"})
    raw["name"] = tuned.name
    raw["data"] = tuned.data.model_dump(mode="json", exclude_defaults=True)  # required even when all defaults
    for role, uri in (prepared or {}).items():
        spec = job.models[role].model_dump(mode="json", exclude_defaults=True, exclude={"preset", "path", "prepare"})
        raw.setdefault("models", {})[role] = {**spec, "path": uri}
    validate_config(raw, source="the best config")
    return raw


def _search(job: JobConfig, search: Search, roles: dict[str, str], data: StepData, tune_uri: str, log) -> SearchOutcome:
    from ray.tune.schedulers import ASHAScheduler

    settings = job.tune
    runs = [p for p in build_plan(job) if p.stage_index in search.stage_indices and p.distills]
    searched_terms = {i: search.terms(i) for i in search.stage_indices}
    outcome = SearchOutcome(search, [], None, None)
    val_datasets = {}
    for planned in runs:
        if job.teacher_pool.use_cache:
            attach = attach_fused_signal if len(planned.teachers) > 1 else attach_teacher_signal
            _, _, teacher_pass = attach(
                job, signal_step(planned, searched_terms[planned.stage_index]), teacher_uris(planned, roles), roles[planned.learner],
                data.train(planned)[0], data, log,
            )
            outcome.count(teacher_pass)
        # Preprocessed once here, not once per trial.
        val_datasets[planned.step_id] = data.validation(planned)
        data.check_rejects(planned)

    searches_uri = storage.join(tune_uri, "searches")
    search_uri = storage.join(searches_uri, search.folder)
    storage_path, storage_filesystem = _tune_storage(searches_uri)
    trainable = tune.with_parameters(run_trial, job=job, runs=runs, roles=dict(roles), val_datasets=val_datasets,
                                     searched_terms=searched_terms, search_uri=search_uri)
    in_process = runs_in_process(job)
    if in_process:  # the trial actor is the student worker: it holds the worker's resources
        trainer = job.trainer
        trainable = tune.with_resources(trainable, {"CPU": trainer.cpus_per_worker, **({"GPU": 1} if trainer.use_gpu else {}),
                                                    **trainer.resources})
    progress = TrialProgress(search.name, settings.metric, log, fail_after=min(3, settings.num_samples))
    tuner = tune.Tuner(
        trainable,
        param_space={key: _sampler(dim) for key, dim in search.dims.items()},
        tune_config=tune.TuneConfig(
            num_samples=settings.num_samples,
            search_alg=_searcher(settings, job.seed + search.stage_indices[0]),
            # ASHA compares trials at equal optimizer steps, on the training task loss: the
            # validation metric exists only at a trial's end (see trial.py).
            scheduler=ASHAScheduler(time_attr=TRIAL_STEP, metric=TRAIN_TASK_LOSS, mode="min",
                                    max_t=settings.max_steps_per_trial * len(runs), grace_period=settings.grace_period,
                                    reduction_factor=settings.reduction_factor,
                                    # A trial that reached its budget ends by itself (and its Train
                                    # run cleans up) instead of being stopped at its last report.
                                    stop_last_trials=False),
            max_concurrent_trials=settings.max_concurrent_trials,
            reuse_actors=in_process,  # imports, DeepSpeed and the process group stay warm from trial to trial
        ),
        run_config=tune.RunConfig(
            name=search.folder,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),  # a failing trial is a result, not the end
            verbose=0,
            callbacks=[progress, ReleaseStoppedTrialRuns(search_uri)],
            stop=progress,
        ),
    )
    log(f"[tune] {search.name}: searching {', '.join(search.dims)} over {len(runs)} step(s), {settings.num_samples} trials")
    grid = tuner.fit()
    outcome.rows = [_row(search, n + 1, result, settings.metric) for n, result in enumerate(grid)]
    for error in grid.errors:
        log(f"[tune] {search.name}: a trial failed: {_first_line(error)}")
    for row in outcome.rows:
        outcome.signal["trial_cache_hits"] += row.get(CACHE_HITS) or 0
        outcome.signal["trial_teacher_passes"] += row.get(TEACHER_PASSES) or 0
    finished = [row for row in outcome.rows if row["status"] == "finished" and math.isfinite(row[settings.metric])]
    if finished:
        sign = 1 if settings.metric_mode == "min" else -1
        best = min(finished, key=lambda row: sign * row[settings.metric])
        outcome.best_values, outcome.best_metric = dict(best["values"]), best[settings.metric]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in best["values"].items())
        log(f"[tune] {search.name}: best trial {best['trial']} ({shown}): {settings.metric} {best[settings.metric]:.4f}")
    return outcome


def _run_full_steps(job: JobConfig, planned_steps: list[PlannedStep], roles: dict[str, str], manifest: Manifest,
                    data: StepData, tune_uri: str, suffix: str, log) -> list[dict]:
    """Trains planned steps as the cascade does (full budget, teacher signal from the cache; one
    worker group for consecutive steps) and moves `roles[learner]` along. Steps the manifest
    holds as done (under `<step_id><suffix>`) are not redone. Returns the teacher passes."""
    from ckd_ray.train.run import run_steps

    pending = []
    for planned in planned_steps:
        record_id = f"{planned.step_id}{suffix}"
        if manifest.done(record_id):
            roles[planned.learner] = manifest.steps[record_id]["model_uri"]
            log(f"[tune] {record_id}: done in an earlier run, skipped")
        else:
            pending.append(planned)
    teacher_passes = []
    for segment in split_segments(pending):
        for planned in segment:
            log(f"[tune] {planned.step_id}{suffix}: {planned.teacher or 'no teacher'} -> {planned.learner}, {planned.kind} in full")
        prepared = prepare_segment(job, segment, data, roles, output_uri=tune_uri, log=log, suffix=suffix)
        name = f"train/{segment[0].step_id}{suffix}"
        results = run_steps(job.trainer, [step.train_step for step in prepared], storage_uri=tune_uri, name=name)
        for planned, step, result in zip(segment, prepared, results):
            data.check_rejects(planned)
            manifest.record(f"{planned.step_id}{suffix}", status="done", stage=planned.stage.label, step=planned.kind,
                            learner=planned.learner, teacher=planned.teacher, weights=planned.loss.weights.model_dump(),
                            temperature=planned.loss.temperature, model_uri=result.model_uri, metrics=result.metrics,
                            teacher_pass=step.teacher_pass)
            teacher_passes.append(step.teacher_pass)
    return teacher_passes


def _row(search: Search, number: int, result, metric: str) -> dict:
    """One trial of a Tune ResultGrid as a results-table row."""
    metrics = result.metrics or {}
    if result.error is not None:
        status = "failed"
    elif metrics.get(VALIDATED):
        status = "finished"
    else:
        status = "stopped early"
    return {
        "search": search.name,
        "trial": number,
        "trial_id": metrics.get("trial_id", ""),
        "status": status,
        "values": {key: float(result.config[key]) for key in search.dims if key in (result.config or {})},
        "steps": metrics.get(TRIAL_STEP, 0),
        metric: float(metrics.get(metric, math.nan)),
        **({"val_accuracy": float(metrics.get("val_accuracy", math.nan))} if metric != "val_accuracy" else {}),
        TRAIN_TASK_LOSS: float(metrics.get(TRAIN_TASK_LOSS, math.nan)),
        CACHE_HITS: metrics.get(CACHE_HITS),
        TEACHER_PASSES: metrics.get(TEACHER_PASSES),
        "seconds": float(metrics.get("time_total_s", math.nan)),
        OPTIMIZER_SECONDS: float(metrics.get(OPTIMIZER_SECONDS, math.nan)),
        "error": _first_line(result.error) if result.error is not None else "",
    }


def _first_line(error) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _sampler(dim):
    if dim.choices is not None:
        return tune.choice(list(dim.choices))
    return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)


def _searcher(settings, seed: int):
    """Optuna's TPE (seeded), or Tune's random search when optuna is not installed or not asked for.
    Random search is given the concurrency limit itself: Tune applies `max_concurrent_trials`
    only to a `Searcher` and silently ignores it for a generator passed in."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if settings.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=settings.metric, mode=settings.metric_mode, seed=seed)
        except ImportError:
            pass
    return BasicVariantGenerator(random_state=seed, max_concurrent=settings.max_concurrent_trials)


def _tune_storage(uri: str):
    """Tune's storage_path and filesystem: S3 through the same pyarrow filesystem as the rest."""
    if storage.is_s3(uri):
        filesystem, path = storage.arrow_filesystem(uri)
        return path, filesystem
    from pathlib import Path

    return str(Path(storage.parse(uri).path).resolve()), None


class TrialProgress(tune.Callback, tune.Stopper):
    """One line per trial result on the driver (Tune's own table is turned off); the first
    failure says why. As the search's stopper it ends a search whose first `fail_after` trials
    all failed before any trial reported."""

    def __init__(self, search_name: str, metric: str, log, fail_after: int = 3):
        self.search_name, self.metric, self.log = search_name, metric, log
        self.fail_after, self.failed, self.finished = fail_after, 0, False
        self.unreported, self.unreported_since, self.reasons_shown, self.stopping = [], {}, 0, False
        self.iteration = 0

    def __getstate__(self):
        # Tune pickles its callbacks and stopper into the experiment state; the console's log
        # function holds an open file, and a restored search logs with print.
        return {**self.__dict__, "log": None, "unreported": []}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.log = self.log or print

    def on_trial_result(self, iteration, trials, trial, result, **info):
        line = f"[tune {self.search_name}] {trial.trial_id} step {result[TRIAL_STEP]}: train task loss {result[TRAIN_TASK_LOSS]:.4f}"
        if result.get(VALIDATED):
            line += f", {self.metric} {result[self.metric]:.4f}"
        self.log(line)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        ending = "finished" if last.get(VALIDATED) else f"stopped early by ASHA at step {last.get(TRIAL_STEP, 0)}"
        self.log(f"[tune {self.search_name}] {trial.trial_id} {ending}")

    def on_trial_error(self, iteration, trials, trial, **info):
        # Tune stores the trial's error after this call: the line is written at the next step.
        self.failed += 1
        self.unreported.append(trial)

    def on_step_begin(self, iteration, trials, **info):
        self.iteration = max(self.iteration, iteration) if iteration < 10**9 else self.iteration
        for trial in list(self.unreported):
            reason = trial_error_line(trial)
            if reason is None and iteration - self.unreported_since.setdefault(trial.trial_id, iteration) < 50:
                continue
            self.unreported.remove(trial)
            if self.reasons_shown == 0 or not self.finished:
                self.log(f"[tune {self.search_name}] {trial.trial_id} failed: {reason or 'see the trial folder for error.txt'}")
                self.reasons_shown += 1
            else:
                self.log(f"[tune {self.search_name}] {trial.trial_id} failed (the search goes on)")

    def on_experiment_end(self, trials, **info):
        self.on_step_begin(10**9, trials)

    # Stopper: a search whose first trials all fail would fail the same way for every trial.
    def __call__(self, trial_id, result) -> bool:
        self.finished = True  # a trial reported: the setup works
        return False

    def stop_all(self) -> bool:
        if not self.finished and self.failed >= self.fail_after:
            self.on_step_begin(self.iteration, [])  # their reasons first, once Tune has stored them
            if self.unreported:
                return False
            if not self.stopping:
                self.log(f"[tune {self.search_name}] stopping the search: its first {self.failed} trials all failed "
                         "(the first failure above says what to fix)")
            self.stopping = True
            return True
        return False


def trial_error_line(trial) -> str | None:
    """The innermost error of a failed trial, as one line."""
    from ckd_ray.errors import describe_error

    try:
        error = trial.get_pickled_error() or trial.get_error()
    except Exception:  # an error that does not unpickle here
        error = None
    return describe_error(error) if error is not None else None
