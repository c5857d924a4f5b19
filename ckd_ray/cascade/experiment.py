"""`ckd-ray experiment`: every plan of both papers on one benchmark and budget, one comparison
table (seed 001's Tables 1 and 3: method, stages, per-metric scores, average; seed 000's Table 2:
accuracy and knowledge preservation after each curriculum stage vs end-to-end).

Teachers are prepared once (TinyLLaVA recipe, in a run named by a digest of its config, so an
unchanged recipe is never trained twice) and shared by every plan and seed, so the rows differ
only in how the student learns. Every row runs in one Ray (joined once) and trains its whole plan
on one worker group. Cells are mean +- spread over seeds; the differences the papers claim, and
the ladder teacher > TA > student alone, get a paired bootstrap interval over seeds and test
samples and a verdict; the table says how many optimizer steps and distinct samples (per hop
level) each row's student had, and where the time went.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Literal

from pydantic import Field, PrivateAttr

from ckd_ray import storage
from ckd_ray.config.cascade import PLAN_NAMES, PlanName, plan_stages
from ckd_ray.section import Section
from ckd_ray.config.loader import deep_merge, read_yaml, validate_config
from ckd_ray.errors import ConfigError, Problem
from ckd_ray.evaluate.scoring import baseline_scores, headline
from ckd_ray.evaluate.stats import Difference, mean_spread, paired_bootstrap

TABLE_METRICS = ("grounded", "margin", "open_em", "yes_no_acc", "mc_acc", "hop0_acc", "hop1_acc", "hop2_acc")


class ExperimentRun(Section):
    """One row of the table: a plan and its overrides of the base config."""

    name: str
    """Row label and run-folder suffix."""
    plan: PlanName
    """The cascade plan of this row."""
    method: str = ""
    """Method name shown in the table (default: the plan)."""
    overrides: dict = {}
    """Deep-merged over the base config for this row only."""


class ExperimentConfig(Section):
    """A comparison of plans on the same data, models and budget, over one or more seeds."""

    kind: Literal["experiment"]
    """Marks the file as an experiment (not a job config)."""
    name: str
    """Experiment name: its folder under the base config's storage.root."""
    base: str
    """Job config every run starts from (path relative to this file)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """Seeds of the student's runs (a row's `seed`: with `cascade.disjoint_data` it draws the
    row's data pool, and it seeds whatever the student initializes); each runs every plan (cells:
    mean +- spread over seeds). The teachers are prepared once, with the first seed, and shared
    by every seed; every seed is scored on the same test samples."""
    overrides: dict = {}
    """Deep-merged over the base config for every run (e.g. the step budget)."""
    student_steps: int | None = Field(None, ge=1)
    """Budget rule: every row's student gets this many optimizer steps in all, split evenly over
    the plan's student steps (a plan of 6 student steps runs 40 per step at 240; one of 2 runs
    120). A row's TA steps (top-down) run the same per-step count. `trainer.epochs` still applies:
    with a step budget a step reads budget / epochs distinct samples and passes over them
    `epochs` times, so set it high enough for the smallest data set a step reads (the table's
    "student steps" column shows what each row ran). None: the base config's per-step budget for
    every step (rows then differ in student steps)."""
    runs: list[ExperimentRun] = Field(min_length=1)
    """The table's rows."""
    parallel_runs: int = Field(1, ge=1)
    """Runs (seed x row) trained side by side in the one Ray, in the order seeds x rows. Each
    run's workers then get `trainer.cpus_per_worker // parallel_runs` CPUs (at least 1), so the
    runs share the cores one run would have had; the teachers' preparation keeps the base
    config's (and its recipe). The cores stay busy either way (a student's worker spends about
    90% of its time in forward and backward), so the gain is what one run leaves idle: on 2
    cores the three-seed table took 37 min at 2 against about 47 one at a time (at ef891a1,
    before length groups and `warm_workers`). Their scores are those of 1-CPU workers, which may
    differ in the last digits from a 2-CPU run's where torch sums in another order."""
    warm_workers: bool = False
    """Each run trains in one of `parallel_runs` warm row workers (Ray actors shaped as the rows'
    one worker, `RowWorker`) that take the runs one after another, instead of in a worker group of
    its own: no group start per run (15 to 30 s on 2 cores), and the imports, DeepSpeed and the
    process group stay loaded. One-worker rows only; a worker that dies fails its run instead of
    restarting from its checkpoint (rerunning the command resumes at the step)."""
    share_top_down_ta: bool = False
    """Top-down rows: the TA distilled from the teacher (the plan's first stage, T->TA) is trained
    once, with the first seed, in a run of its own (`<name>-<row>-ta`), and every seed's student
    learns from it (TA->S), as the prepared teachers are shared. It saves the TA's training on
    every seed but the first (on 2 cores about 2.5 min each); the row's spread over seeds then
    leaves out the noise of the TA's own training."""
    _command_overrides: list[str] = PrivateAttr(default_factory=list)
    """`--set` overrides of the command line, applied to every run last (see `load_experiment`)."""

    @property
    def command_overrides(self) -> list[str]:
        return self._command_overrides


def load_experiment(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, dict]:
    """The experiment and its base job config (raw, validated per run). `overrides` (`--set
    a.b=c`, as for a job) apply to every run's config, the teachers' preparation included, after
    the run's own overrides: `--set trainer.max_steps=2` shrinks every row."""
    from pydantic import ValidationError

    from ckd_ray.config.loader import problems_from

    path = Path(path)
    raw = read_yaml(path)
    try:
        experiment = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc), str(path)) from None
    base = deep_merge(read_yaml(path.parent / experiment.base), experiment.overrides)
    if overrides:
        _apply(deep_merge(base, {}), overrides)  # a bad --set is named once, before the rows
        experiment._command_overrides = list(overrides)
    for run in experiment.runs:  # every row must be a valid job before anything runs
        validate_config(_run_config(base, experiment, run, 0, {"ta": "preset", "teacher": "preset"}), source=f"{path}: run {run.name}")
    return experiment, base


def _apply(raw: dict, overrides: list[str]) -> dict:
    from ckd_ray.config.loader import apply_override

    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def student_step_count(plan: str) -> int:
    """Training steps (PT, DPT, ...) in which a plan's student learns."""
    from ckd_ray.config.cascade import plan_stages

    return sum(len(stage.steps) for stage in plan_stages(plan) if stage.learner == "student")


def _run_config(base: dict, experiment: ExperimentConfig, run: ExperimentRun, seed: int, teachers: dict) -> dict:
    raw = deep_merge(base, run.overrides)
    if experiment.student_steps is not None:  # the budget rule, before `--set` (which may shrink it)
        count = student_step_count(run.plan)
        if experiment.student_steps % count:
            raise ConfigError([Problem("student_steps", f"{experiment.student_steps} does not split evenly over the "
                                       f"{count} student steps of row {run.name!r} ({run.plan})",
                                       "choose a multiple of every row's student step count (240 suits 2, 3, 5 and 6)")],
                              f"experiment {experiment.name}")
        raw["trainer"] = {**raw.get("trainer", {}), "max_steps": experiment.student_steps // count}
    if experiment.parallel_runs > 1:  # the runs side by side share the cores one run would have had
        from ckd_ray.train.config import TrainerConfig

        trainer = raw.get("trainer", {})
        cpus = trainer.get("cpus_per_worker", TrainerConfig.model_fields["cpus_per_worker"].default)
        raw["trainer"] = {**trainer, "cpus_per_worker": max(1, cpus // experiment.parallel_runs)}
    raw = _apply(raw, experiment.command_overrides)
    raw["name"] = f"{experiment.name}-{run.name}-s{seed}"
    raw["seed"] = seed
    # A row's own control is the table's student-alone row, not a second run inside every row.
    raw["cascade"] = {**raw.get("cascade", {}), "plan": run.plan, "prepare_teachers": False, "student_alone": False}
    raw["cascade"].pop("stages", None)
    models = dict(raw.get("models", {}))
    for role, uri in teachers.items():
        if uri != "preset":
            models[role] = {"path": uri}
    raw["models"] = models
    return raw


def _with_stages(raw: dict, stages: list) -> dict:
    cascade = {key: value for key, value in raw["cascade"].items() if key != "plan"}
    return {**raw, "cascade": {**cascade, "stages": [stage.model_dump(mode="json", exclude_defaults=True) for stage in stages]}}


def _shared_ta_config(base: dict, experiment: ExperimentConfig, run: ExperimentRun, teachers: dict) -> dict:
    """The run that distils a top-down row's TA once (`share_top_down_ta`): the plan's first stage
    (T->TA) with the first seed, at the row's per-step budget: what that seed's row would train."""
    raw = _with_stages(_run_config(base, experiment, run, experiment.seeds[0], teachers), plan_stages(run.plan)[:1])
    return {**raw, "name": f"{experiment.name}-{run.name}-ta"}


def _from_shared_ta(raw: dict, run: ExperimentRun, ta_uri: str) -> dict:
    """A top-down row's run from the shared distilled TA: the plan's second stage (TA->S) only."""
    raw = _with_stages(raw, plan_stages(run.plan)[1:])
    return {**raw, "models": {**raw["models"], "ta": {"path": ta_uri}}}


def _prepared_base(base: dict, experiment: ExperimentConfig) -> dict:
    """The job the TA and the teacher are prepared from, once for every seed (the rows differ only
    in how the student learns); each role's run is shared with any later run of the same recipe
    (`ckd_ray.cascade.prepared`)."""
    raw = _apply(deep_merge(base, {}), experiment.command_overrides)
    raw["seed"] = experiment.seeds[0]
    return raw


@dataclass
class _Row:
    """One row's results, one entry per seed."""

    scores: list[dict] = field(default_factory=list)
    records: list[list[dict]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    distinct: list[dict] = field(default_factory=list)
    """The student's distinct training samples over the plan: `captions`, `hop N` (instructions)."""
    seconds: list[dict] = field(default_factory=list)
    """Where each seed's run spent its time (`_recorded_seconds`)."""


def run_experiment(experiment: ExperimentConfig, base: dict, log=print) -> str:
    """Prepares the teachers once, runs every (seed, plan) cascade (each resumable through its
    own manifest), and writes `table.md` and `table.json` into `<storage.root>/<experiment
    name>/`: mean and spread over seeds, the paired bootstrap of the differences the papers
    claim and of the teacher > TA > student-alone ladder, the per-seed tables, and where the
    time went. Returns the table URI."""
    from ckd_ray.cascade.prepared import prepare_once
    from ckd_ray.cascade.runner import run_cascade
    from ckd_ray.cascade.session import check_model_folders, connect_ray, raise_storage_problems

    started = time.perf_counter()
    raw = _prepared_base(base, experiment)
    first = validate_config(raw)
    root = storage.join(first.storage.root, experiment.name)  # the runs' root, `--set storage.root` included
    raise_storage_problems(first)  # missing data or models: ConfigError before Ray starts
    check_model_folders(first)
    # One Ray for the whole experiment: every run_cascade below joins this one (connect_ray is a
    # no-op once connected), so rows pay no Ray start; each row trains its plan on one worker group.
    clock = time.perf_counter()
    connect_ray(first.ray, metrics_export_port=first.observability.metrics_export_port)
    times = {"ray_start": time.perf_counter() - clock}
    log(f"[experiment] the TA and the teacher, prepared once for seeds {experiment.seeds} (reused when an earlier run prepared them)")
    clock = time.perf_counter()
    prepared = prepare_once(raw, ("ta", "teacher"), log, run=run_cascade)
    recorded = [_recorded_seconds(done.manifest) for done in prepared.values()]
    times["teachers"] = {"wall": time.perf_counter() - clock, **{key: sum(r[key] for r in recorded) for key in recorded[0]}}
    teachers = {role: done.model_uri for role, done in prepared.items()}
    prepared_entries = {role: done.manifest.evaluations[done.evaluation_name] for role, done in prepared.items()}
    prepared_scores = {role: entry["scores"] for role, entry in prepared_entries.items()}
    prepared_records = {role: _read_records(entry["predictions_uri"]) for role, entry in prepared_entries.items()}
    rows: dict[str, _Row] = {run.name: _Row() for run in experiment.runs}
    stage_rows: dict[str, list[dict]] = {}
    catalogs: dict = {}  # one catalog pass per source for every row's planned reads
    side_by_side = experiment.parallel_runs > 1

    shared_tas: dict[str, tuple[str, dict]] = {}
    shared_lock = threading.Lock()
    rows_setup = _RowSetup(experiment, base, teachers, list(prepared.values()), side_by_side)
    # Each run on a warm row worker, or on this driver's thread (sharing its catalogs and log)
    workers = _row_workers(rows_setup) if experiment.warm_workers else _RowWorkers([RowWorker(rows_setup, catalogs, log)], remote=False)

    def shared_top_down_ta(run: ExperimentRun) -> tuple[str, dict | None]:
        """The row's TA distilled once (`share_top_down_ta`): its export, and the recorded seconds of
        its run for the one caller that ran it (None for the others)."""
        with shared_lock:  # the first top-down run trains it; the others wait for it
            if run.name in shared_tas:
                return shared_tas[run.name][0], None
            shared_tas[run.name] = workers.call("shared_ta", run)
            return shared_tas[run.name]

    def run_one(seed: int, run: ExperimentRun) -> dict:
        log(f"[experiment] seed {seed}: {run.name} ({run.plan})")
        clock = time.perf_counter()
        ta_uri, shared_ta_seconds = None, None
        if run.plan == "top_down" and experiment.share_top_down_ta:
            ta_uri, shared_ta_seconds = shared_top_down_ta(run)
        result = workers.call("run_row", seed, run, ta_uri)
        seconds = {"wall": time.perf_counter() - clock, **_add_seconds(result.pop("recorded"), shared_ta_seconds)}
        return {**result, "seconds": seconds}

    clock = time.perf_counter()
    work = [(seed, run) for seed in experiment.seeds for run in experiment.runs]
    done = run_side_by_side(work, run_one, experiment.parallel_runs, log)
    times["runs"] = time.perf_counter() - clock
    for seed, run in work:  # in table order, whichever finished first
        result, row = done[(seed, run.name)], rows[run.name]
        for key in ("scores", "records", "steps", "samples", "distinct", "seconds"):
            getattr(row, key).append(result[key])
        for label, scores in result["stages"].items():
            stage_rows.setdefault(label, []).append(scores)
    clock = time.perf_counter()
    comparisons = _comparisons(experiment, rows, prepared_records)
    times["statistics"] = time.perf_counter() - clock
    times["total"] = time.perf_counter() - started
    table = _table(experiment, rows, stage_rows, prepared_scores, comparisons, times)
    storage.write_bytes(storage.join(root, "table.md"), table.encode())
    storage.write_bytes(storage.join(root, "table.json"), json.dumps({
        "seeds": experiment.seeds, "teachers": {"runs": {role: done.job.run_uri for role, done in prepared.items()}, "scores": prepared_scores},
        "rows": {name: {"scores": r.scores, "student_steps": r.steps, "samples_seen": r.samples, "distinct_samples": r.distinct,
                        "seconds": r.seconds} for name, r in rows.items()},
        "stages": stage_rows, "comparisons": {name: {**asdict(c), "verdict": c.verdict} for name, c in comparisons.items()}, "seconds": times,
    }, indent=2).encode())
    log(table)
    return storage.join(root, "table.md")


@dataclass
class _RowSetup:
    """What every run of an experiment starts from: it runs one row of one seed, or the shared
    distilled TA, on the driver or in a warm row worker (`warm_workers`)."""

    experiment: ExperimentConfig
    base: dict
    teachers: dict[str, str]
    prepared: list
    side_by_side: bool
    in_process: bool = False

    def row_log(self, seed: int, run: ExperimentRun, log=print):
        return (lambda line: log(f"[{run.name} s{seed}] {line}")) if self.side_by_side else log

    def shared_ta(self, run: ExperimentRun, log=print) -> tuple[str, dict]:
        """Distils the row's TA once (`share_top_down_ta`): its export and its run's recorded seconds."""
        from ckd_ray.cascade.manifest import Manifest
        from ckd_ray.cascade.runner import run_cascade

        job = validate_config(_shared_ta_config(self.base, self.experiment, run, self.teachers))
        log(f"the TA distilled from the teacher once, with seed {self.experiment.seeds[0]}, for every seed: {job.run_uri}")
        run_cascade(job, log=log, progress=not self.side_by_side, in_process=self.in_process)
        manifest = Manifest.open(job.run_uri, job)
        return manifest.roles["ta"], _recorded_seconds(manifest)

    def run_row(self, seed: int, run: ExperimentRun, ta_uri: str | None, catalogs: dict, log=print) -> dict:
        """Runs one row of one seed (from the shared distilled TA `ta_uri`, if given); returns its
        student's scores and answers, budget, distinct samples and recorded seconds."""
        from ckd_ray.cascade.datasets import StepData, distinct_samples
        from ckd_ray.cascade.manifest import Manifest
        from ckd_ray.cascade.plan import build_plan
        from ckd_ray.cascade.prepared import copy_teacher_scores
        from ckd_ray.cascade.runner import run_cascade

        raw = _run_config(self.base, self.experiment, run, seed, self.teachers)
        if ta_uri is not None:
            raw = _from_shared_ta(raw, run, ta_uri)
        job = validate_config(raw)
        # The prepared roles' scores, but not the prepared TA's where the row's TA is the distilled one
        copy_teacher_scores(job, [done for done in self.prepared if not (ta_uri is not None and done.role == "ta")])
        # Side by side, one bar per run would overwrite the other's: the step lines show progress.
        run_cascade(job, log=self.row_log(seed, run, log), progress=not self.side_by_side, in_process=self.in_process)
        manifest = Manifest.open(job.run_uri, job)
        student = [e for name, e in manifest.evaluations.items() if name.endswith("(student)")][-1]
        plan = build_plan(job)
        reads = StepData(job, job.run_uri, catalogs).planned_reads(plan)
        stages = {}
        if run.plan in ("progressive", "end_to_end"):
            stages = {f"{run.name}: {name.removesuffix(' (student)')}": entry["scores"]
                      for name, entry in manifest.evaluations.items() if name.endswith("(student)")}
        return {"scores": student["scores"], "records": _read_records(student["predictions_uri"]),
                "steps": _student_total(manifest, "step"), "samples": _student_total(manifest, "samples_seen"),
                "distinct": distinct_samples([reads[p.step_id] for p in plan if p.learner == "student"]),
                "recorded": _recorded_seconds(manifest), "stages": stages}


class RowWorker:
    """Runs experiment rows one after another. As a warm row worker (`warm_workers`) it is a Ray
    actor holding one worker's CPUs (and GPU) whose setup trains each run in its own process
    (`run_cascade(in_process=True)`): no worker group starts per run, and torch, transformers,
    DeepSpeed and the process group stay loaded from run to run. Without, it runs on the driver."""

    def __init__(self, setup: _RowSetup, catalogs: dict | None = None, log=None):
        # `log` None: this process's print (a driver's print may not pickle: the CLI replaces it)
        self.setup, self.catalogs, self.log = setup, {} if catalogs is None else catalogs, log or print

    def run_row(self, seed: int, run: ExperimentRun, ta_uri: str | None) -> dict:
        return self.setup.run_row(seed, run, ta_uri, self.catalogs, self.log)

    def shared_ta(self, run: ExperimentRun) -> tuple[str, dict]:
        return self.setup.shared_ta(run, self.setup.row_log(self.setup.experiment.seeds[0], run, self.log))


class _RowWorkers:
    """Where runs go: `parallel_runs` warm row workers (`remote`: a call takes a free one and
    gives it back), or one `RowWorker` on the driver that every run thread calls directly."""

    def __init__(self, workers: list, remote: bool = True):
        self.remote, self.local = remote, workers[0]
        self.free: queue.Queue = queue.Queue()
        for worker in workers:
            self.free.put(worker)

    def call(self, method: str, *args):
        if not self.remote:
            return getattr(self.local, method)(*args)
        import ray

        actor = self.free.get()
        try:
            return ray.get(getattr(actor, method).remote(*args))
        finally:
            self.free.put(actor)


def _row_workers(setup: _RowSetup) -> _RowWorkers:
    """The warm row workers, each shaped as the rows' one worker (`trainer.cpus_per_worker`, a
    GPU with `trainer.use_gpu`). Refuses rows of several workers: a warm worker is one process."""
    import ray

    experiment = setup.experiment
    trainers = [validate_config(_run_config(setup.base, experiment, run, experiment.seeds[0], setup.teachers)).trainer
                for run in experiment.runs]
    several = sorted({trainer.num_workers for trainer in trainers if trainer.num_workers != 1})
    if several:
        raise ConfigError([Problem("warm_workers", f"the rows train on {several} workers; a warm row worker is one process",
                                   "set trainer.num_workers: 1, or warm_workers: false")], f"experiment {experiment.name}")
    trainer = trainers[0]
    actor = ray.remote(num_cpus=trainer.cpus_per_worker, num_gpus=1 if trainer.use_gpu else 0, max_restarts=0)(RowWorker)
    return _RowWorkers([actor.remote(replace(setup, in_process=True)) for _ in range(experiment.parallel_runs)])


def run_side_by_side(work: list[tuple], run_one, parallel: int, log=print) -> dict:
    """Calls `run_one(seed, run)` for every (seed, run) of `work`, `parallel` at a time, each on a
    thread of this driver (a run's driver mostly waits on its worker group, its teacher pass and
    its evaluations, all Ray's), starting them in `work`'s order; returns the results by
    (seed, run name). After a run fails no new run starts; the ones running finish (each is
    resumable, so their work is kept) and the first error is raised. The threads are daemons: on
    Ctrl-C the command ends at once and Ray's shutdown stops their workers."""
    results: dict = {}
    errors: list[BaseException] = []
    pending = list(work)
    lock = threading.Lock()
    total = len(work)

    def worker() -> None:
        while True:
            with lock:
                if errors or not pending:
                    return
                seed, run = pending.pop(0)
            clock = time.perf_counter()
            try:
                result = run_one(seed, run)
            except BaseException as err:  # raised on the caller's thread below
                with lock:
                    errors.append(err)
                return
            with lock:
                results[(seed, run.name)] = result
                finished = len(results)
            if parallel > 1:
                log(f"[experiment] seed {seed}: {run.name} done in {time.perf_counter() - clock:.0f} s ({finished}/{total} runs)")

    if parallel <= 1:
        worker()
    else:
        threads = [threading.Thread(target=worker, name=f"ckd-experiment-{i}", daemon=True) for i in range(min(parallel, total))]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # join with a timeout, so Ctrl-C reaches this thread
                thread.join(timeout=0.5)
    if errors:
        raise errors[0]
    return results


def _read_records(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _student_total(manifest, metric: str) -> int:
    """Sum over the student's steps of a step's final metric (`step`: optimizer steps;
    `samples_seen`): plans differ in how many steps they run, so the table shows each row's
    training budget next to its scores."""
    return int(sum(entry.get("metrics", {}).get(metric, 0) for entry in manifest.steps.values() if entry.get("learner") == "student"))


def _add_seconds(recorded: dict[str, float], more: dict[str, float] | None) -> dict[str, float]:
    return recorded if more is None else {key: value + more[key] for key, value in recorded.items()}


def _recorded_seconds(manifest) -> dict[str, float]:
    """Where a run's recorded time went, over all its steps and evaluations (recorded when they
    ran, so a run resumed or found finished still shows what it cost): `teacher_passes`,
    `worker_start` (the group's start), `training` (the rest of the steps' time: data, engine,
    optimizer steps, checkpoints, validation), `evaluation`; and `worker_groups` started."""
    steps = manifest.steps.values()
    passes = sum(entry.get("phases", {}).get("teacher_pass", 0.0) for entry in steps)
    start = sum(entry.get("phases", {}).get("worker_start", 0.0) for entry in steps)
    total = sum(entry.get("seconds") or 0.0 for entry in steps)
    return {"teacher_passes": passes, "worker_start": start, "training": max(0.0, total - passes - start),
            "evaluation": sum(entry.get("seconds", 0.0) for entry in manifest.evaluations.values()),
            "worker_groups": sum(1 for entry in steps if "worker_start" in entry.get("phases", {}))}


# The differences the papers claim (seed 001: CKD over LLaVA-KD, bottom-up over top-down; seed 000:
# the progressive curriculum over end-to-end), as (A, B, claim) by plan; then the ladder a cascade
# presumes, by prepared role (one model for every seed) and plan (the student alone is the
# student_only row).
CLAIMS = (
    ("bottom_up", "single_teacher", "LLaVA-CKD beats LLaVA-KD (seed 001, Table 1)"),
    ("bottom_up", "top_down", "bottom-up beats top-down (seed 001, Table 3)"),
    ("progressive", "end_to_end", "the progressive curriculum beats end-to-end (seed 000, Table 2)"),
    ("fused", "bottom_up", "TA and teacher fused per token beat LLaVA-CKD"),
    ("fused", "single_teacher", "TA and teacher fused per token beat LLaVA-KD"),
    ("teacher", "ta", "the prepared teacher beats the prepared TA"),
    ("ta", "student_only", "the prepared TA beats the student alone"),
    ("teacher", "student_only", "the prepared teacher beats the student alone"),
    # Distillation itself: the distilled students against the same student trained alone.
    ("single_teacher", "student_only", "LLaVA-KD's student beats the student alone"),
    ("bottom_up", "student_only", "LLaVA-CKD's student beats the student alone"),
)


@dataclass(frozen=True)
class Comparison:
    """A claim's difference over seeds and test samples, and each seed's own interval."""

    overall: Difference
    per_seed: tuple[Difference, ...]

    @property
    def verdict(self) -> str:
        return verdict(self.overall)


def verdict(difference: Difference) -> str:
    """`holds` (the interval is above 0), `reversed` (below 0) or `not separable` (it holds 0)."""
    if difference.low > 0:
        return "holds"
    return "reversed" if difference.high < 0 else "not separable"


def _comparisons(experiment: ExperimentConfig, rows: dict[str, _Row], teachers: dict[str, list[dict]] | None = None) -> dict[str, Comparison]:
    records: dict[str, list[list[dict]]] = {}
    for run in experiment.runs:
        records.setdefault(run.plan, rows[run.name].records)  # the first row of a plan is its method's row
    for role, answers in (teachers or {}).items():
        records[role] = [answers] * len(experiment.seeds)  # one prepared model for every seed
    out = {}
    for a, b, claim in CLAIMS:
        if records.get(a) and records.get(b):
            out[claim] = Comparison(paired_bootstrap(records[a], records[b]),
                                    tuple(paired_bootstrap([x], [y]) for x, y in zip(records[a], records[b])))
    return out


STAGES = {"student_only": "-", "single_teacher": "T->S", "bottom_up": "TA->S, T->S", "top_down": "T->TA, TA->S",
          "progressive": "T->S (hop 0, <=1, all)", "end_to_end": "T->S (all hops)", "fused": "TA+T->S (fused)"}


def _table(experiment: ExperimentConfig, rows: dict[str, _Row], stage_rows: dict, prepared: dict,
           comparisons: dict[str, Comparison] | None = None, times: dict | None = None) -> str:
    seeds = experiment.seeds
    teacher = prepared.get("teacher", {})
    first = next((r.records[0] for r in rows.values() if r.records), [])
    baselines = baseline_scores(first)  # the rows answered the same test samples
    levels = sorted({key for r in rows.values() for d in r.distinct for key in d if key != "captions"})
    budget = ["student steps", "samples seen", "distinct captions", *(f"distinct {level}" for level in levels)]
    header = "| method | stages | " + " | ".join(budget) + " | " + " | ".join(TABLE_METRICS) + " | preservation |"
    rule = "|---|---|" + "---:|" * (len(budget) + len(TABLE_METRICS) + 1)
    no_budget = " | ".join("-" for _ in budget)
    spread = " +- sample standard deviation over seeds" if len(seeds) > 1 else ""
    lines = [f"# {experiment.name}", "", f"Seeds: {seeds}; scores on the benchmark's test split, mean{spread}; "
             "student steps and samples seen: the student's optimizer steps and training samples over the whole plan; "
             "distinct: the different training samples among them (captions; instructions per hop level), as planned; "
             "preservation: the student's headline over the prepared teacher's. `grounded` (the headline): accuracy above the "
             "question-only answerer per question type, as a share of what it left, averaged over types (0: no better than "
             "reading the question); `margin`: accuracy minus question-only accuracy."
             + (f" Top-down: the TA distilled from the teacher once, with seed {seeds[0]}, and every seed's student learns "
                "from it (`share_top_down_ta`), so its spread leaves out the TA's own training noise."
                if experiment.share_top_down_ta and any(run.plan == "top_down" for run in experiment.runs) else ""),
             "", header, rule]
    for name, scores in baselines.items():
        cells = " | ".join(f"{scores.get(m, 0):.3f}" for m in TABLE_METRICS)
        lines.append(f"| baseline: {name.replace('_', '-')} | - | {no_budget} | {cells} | - |")
    for role, label in (("teacher", "Teacher (prepared)"), ("ta", "TA (prepared)")):
        if role in prepared:
            cells = " | ".join(f"{prepared[role].get(m, 0):.3f}" for m in TABLE_METRICS)
            lines.append(f"| {label} | - | {no_budget} | {cells} | {_preservation(headline(prepared[role]), teacher)} |")
    for run in experiment.runs:
        row = rows[run.name]
        cells = " | ".join(_cell([s.get(m, 0.0) for s in row.scores]) for m in TABLE_METRICS)
        mean_headline = mean(headline(s) for s in row.scores) if row.scores else 0.0
        counts = [row.steps, row.samples, [d.get("captions", 0) for d in row.distinct],
                  *([d.get(level, 0) for d in row.distinct] for level in levels)]
        budget_cells = " | ".join(f"{mean(values):,.0f}" if values else "-" for values in counts)
        lines.append(f"| {run.method or run.plan} | {STAGES[run.plan]} | {budget_cells} | {cells} | {_preservation(mean_headline, teacher)} |")
    if comparisons:
        lines += ["", "## The papers' claims, and the ladder a cascade presumes (paired bootstrap)", "",
                  "Difference in the headline `grounded` (A - B), mean over seeds; interval: 95% paired bootstrap (the same "
                  "resampled test samples for both rows and every seed); P(A <= B): share of draws in which A does not win; "
                  "per seed: each seed's difference and its own 95% interval; verdict: holds (interval above 0), reversed "
                  "(below 0), not separable (it holds 0). The prepared teacher and TA are one model each, shared by every seed.", "",
                  "| claim | A - B | 95% interval | P(A <= B) | per seed | seeds above 0 | verdict |", "|---|---:|---|---:|---|---:|---|"]
        for claim, c in comparisons.items():
            d = c.overall
            per_seed = "; ".join(f"{x.observed:+.3f} [{x.low:+.3f}, {x.high:+.3f}]" for x in c.per_seed)
            above = sum(1 for x in c.per_seed if x.low > 0)
            lines.append(f"| {claim} | {d.observed:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] | {d.p_not_better:.3f} | {per_seed} | "
                         f"{above}/{len(c.per_seed)} | {c.verdict} |")
    if stage_rows:
        lines += ["", "## Progressive curriculum (seed 000, Table 2 shape)", "", "| after | accuracy | grounded | preservation |", "|---|---|---|---|"]
        for name, scores in stage_rows.items():
            headlines = [headline(s) for s in scores]
            lines.append(f"| {name} | {_cell([s['accuracy'] for s in scores])} | {_cell(headlines)} | {_preservation(mean(headlines), teacher)} |")
    if times:
        lines += _time_lines(experiment, rows, times)
    if len(seeds) > 1:
        for k, seed in enumerate(seeds):
            lines += ["", f"## Seed {seed}", "", "| method | " + " | ".join(TABLE_METRICS) + " |", "|---|" + "---:|" * len(TABLE_METRICS)]
            for run in experiment.runs:
                scores = rows[run.name].scores
                if k < len(scores):
                    lines.append(f"| {run.method or run.plan} | " + " | ".join(f"{scores[k].get(m, 0.0):.3f}" for m in TABLE_METRICS) + " |")
    return "\n".join(lines) + "\n"


TIME_PARTS = ("teacher_passes", "worker_start", "training", "evaluation", "worker_groups")


def _time_lines(experiment: ExperimentConfig, rows: dict[str, _Row], times: dict) -> list[str]:
    """Where the experiment's time went: this command's wall time per part, and the seconds each
    run recorded when it trained (a run found finished costs this command little, but its
    recorded seconds are what it cost when it ran)."""
    def row(label: str, wall: float, recorded: list[dict]) -> str:
        parts = [sum(r.get(part, 0.0) for r in recorded) for part in TIME_PARTS]
        return f"| {label} | {wall:,.0f} | " + " | ".join(f"{p:,.0f}" for p in parts) + " |"

    teachers = times["teachers"]
    lines = ["", "## Where the time went", "",
             f"This command: {times['total']:,.0f} s in all (Ray started once: {times['ray_start']:.0f} s; statistics "
             f"{times['statistics']:.0f} s). Recorded: seconds each run logged when its steps and evaluations ran, summed "
             f"over seeds; training is everything of a step but its teacher pass and the worker group's start."
             + (f" The runs took {times['runs']:,.0f} s, {experiment.parallel_runs} side by side (`parallel_runs`): their wall "
                f"times below overlap." if experiment.parallel_runs > 1 and "runs" in times else "")
             + (" Each run trained in one of the warm row workers (`warm_workers`): its worker start is the step's wait for "
                "its first event, not a group's start; a row's worker groups are the segments it trained."
                if experiment.warm_workers else "")
             + (" Top-down's recorded seconds include its shared TA run once (`share_top_down_ta`)."
                if experiment.share_top_down_ta else ""), "",
             "| part | wall, this command (s) | " + " | ".join(f"recorded {p.replace('_', ' ')}" + ("" if p == "worker_groups" else " (s)")
                                                        for p in TIME_PARTS) + " |",
             "|---|---:|" + "---:|" * len(TIME_PARTS),
             row("teacher preparation (once)", teachers["wall"], [teachers])]
    for run in experiment.runs:
        seconds = rows[run.name].seconds
        lines.append(row(f"{run.method or run.plan} ({len(seconds)} seeds)", sum(s["wall"] for s in seconds), seconds))
    return lines


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    m, s = mean_spread(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} +- {s:.3f}"


def _preservation(score: float, teacher: dict) -> str:
    """Seed 000's knowledge preservation (student / teacher headline); "-" where the teacher scores 0."""
    return f"{score / headline(teacher):.3f}" if teacher and headline(teacher) else "-"


def experiment_problems(path: str | Path) -> list[Problem]:
    try:
        load_experiment(path)
    except ConfigError as exc:
        return exc.problems
    return []


__all__ = ["ExperimentConfig", "ExperimentRun", "PLAN_NAMES", "load_experiment", "run_experiment"]
