"""One planned step, end to end: its budget, its data, its teacher signal, its resolved
`StepPlan`, and the worker-group run that trains it. The cascade runner and both Tune paths
(trials and the stages trained in full between searches) go through here, so a trial trains
exactly as a cascade step does.

Consecutive steps train on one worker group (`split_segments`): the cascade trains its whole
plan on one group, and a pass whose teacher the group has yet to train runs beside it once that
teacher is exported; Tune's stages start a new group where a step's teacher is a model the group
itself has just trained.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import partial

from ckd_ray import storage
from ckd_ray.config.cascade import CONTROL_ROLE, DISTILLATION_STEPS, STEP_FREEZE, StageConfig, StepConfig, effective_loss
from ckd_ray.config.job import JobConfig
from ckd_ray.models.presets import PRESETS
from ckd_ray.train.plan import OptimizerPlan, SignalDecoder, StepPlan, warmup_steps_for
from ckd_ray.train.run import StepResult, TrainStep, run_steps

EXPORT_FOLDER = "model"


def step_budget(job: JobConfig, step: StepConfig) -> tuple[int | None, float]:
    """(max optimizer steps or None, epochs) of a step: its own settings over `job.trainer`."""
    return step.max_steps or job.trainer.max_steps, step.epochs or job.trainer.epochs


def samples_per_optimizer_step(job: JobConfig) -> int:
    trainer = job.trainer
    return trainer.micro_batch_size * trainer.num_workers * trainer.grad_accum


def samples_needed(job: JobConfig, step: StepConfig) -> int | None:
    """Samples a step's optimizer steps consume (None: no step budget, the data decides):
    `epochs` passes over N samples give epochs * N / per_step optimizer steps."""
    max_steps, epochs = step_budget(job, step)
    if max_steps is None:
        return None
    return math.ceil(max_steps * samples_per_optimizer_step(job) / epochs)


def passes_for_budget(job: JobConfig, step: StepConfig, num_train_samples: int) -> float:
    """Epochs over `num_train_samples` that give a step exactly its `max_steps` optimizer steps
    (`cascade.disjoint_data`: a step's samples are its share of a pool, so its budget, not
    budget / epochs, sets how often it passes over them)."""
    trainer = job.trainer
    max_steps, epochs = step_budget(job, step)
    batches_per_epoch = math.ceil(num_train_samples // trainer.num_workers / trainer.micro_batch_size)
    if max_steps is None or batches_per_epoch < 1:
        return epochs  # plan_step names what is missing
    return (max_steps * trainer.grad_accum + 0.5) / batches_per_epoch  # + 0.5: floor() in plan_step must not lose a step


def plan_step(
    job: JobConfig,
    stage: StageConfig,
    step: StepConfig,
    *,
    init_model_uri: str,
    num_train_samples: int,
    export_uri: str,
    step_id: str | None = None,
    checkpoint_prefix: str = "",
    has_validation: bool = False,
    await_signal=None,
) -> StepPlan:
    """Resolves a step's settings: step overrides over `job.trainer`, the effective loss, the
    freeze policy, and the number of optimizer steps from the data size."""
    trainer = job.trainer
    loss = effective_loss(job.loss, stage, step)
    samples_per_worker = num_train_samples // trainer.num_workers  # equal shards drop the remainder
    batches_per_epoch = math.ceil(samples_per_worker / trainer.micro_batch_size)
    max_steps, epochs = step_budget(job, step)
    total_steps = math.floor(epochs * batches_per_epoch) // trainer.grad_accum
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    label = f"{stage.label}/{step.kind}"
    if total_steps < 1:
        raise ValueError(
            f"step {label} has no optimizer step: {num_train_samples} samples over {trainer.num_workers} workers, "
            f"micro-batch {trainer.micro_batch_size}, grad_accum {trainer.grad_accum}, {epochs} epochs; "
            "add data, or lower trainer.grad_accum / trainer.micro_batch_size"
        )
    learner = job.models["student" if stage.learner == CONTROL_ROLE else stage.learner]
    return StepPlan(
        step_id=step_id or label,
        label=label,
        export_uri=export_uri,
        checkpoint_prefix=checkpoint_prefix,
        job_name=job.name,
        stage=stage.label,
        kind=step.kind,
        init_model_uri=init_model_uri,
        trust_remote_code=learner.trust_remote_code,
        freeze_policy=step.freeze or STEP_FREEZE[step.kind],
        loss=loss,
        optimizer=OptimizerPlan(
            lr=step.lr or trainer.lr[step.kind],
            weight_decay=trainer.weight_decay,
            total_steps=total_steps,
            warmup_steps=warmup_steps_for(total_steps, trainer.warmup_ratio),
        ),
        micro_batch_size=trainer.micro_batch_size,
        length_buckets=trainer.length_buckets,
        grad_accum=trainer.grad_accum,
        grad_clip=trainer.grad_clip,
        zero_stage=trainer.zero_stage,
        bf16=trainer.uses_bf16,
        num_workers=trainer.num_workers,
        batches_per_epoch=batches_per_epoch,
        report_every=trainer.report_every,
        checkpoint_every=trainer.checkpoint_every,
        seed=job.seed,
        teacher_hidden_size=_teacher_hidden_size(job, stage) if loss.weights.feature > 0 else None,
        has_validation=has_validation,
        await_signal=await_signal,
    )


def default_signal_decoder(job: JobConfig, attention_layers: dict[int, int], spec=None) -> SignalDecoder:
    """`ckd_ray.teachers.decode_signal` for `spec` (default: the job's whole signal)."""
    from ckd_ray.teachers.signal import decode_signal

    return partial(decode_signal, spec=spec or job.signal, attention_layers=dict(attention_layers))


def fused_signal_decoder(job: JobConfig, attention_layers: dict[int, int], spec, roles) -> SignalDecoder:
    """`ckd_ray.teachers.decode_fused_signal`: a step with several teachers, `roles` in order."""
    from ckd_ray.teachers.signal import decode_fused_signal

    return partial(decode_fused_signal, spec=spec or job.signal, attention_layers=dict(attention_layers), roles=list(roles))


def teacher_uris(planned, roles: dict[str, str]):
    """The model that teaches a step (its role's current checkpoint in `roles`), by role for a
    step with several teachers; None for a step without one."""
    if len(planned.teachers) > 1:
        return {role: roles[role] for role in planned.teachers}
    return roles[planned.teacher] if planned.teacher else None


def run_step(
    job: JobConfig,
    stage: StageConfig,
    step: StepConfig,
    *,
    init_model_uri: str,
    train_dataset,
    val_dataset=None,
    output_uri: str,
    num_train_samples: int | None = None,
    decode_signal: SignalDecoder | None = None,
) -> StepResult:
    """Trains one step on its own worker group: the student goes to `<output_uri>/model`,
    checkpoints to `<output_uri>/train/step-NNNNNNN`; the same call again resumes. Without
    `num_train_samples` the step budget sizes the schedule, and only a step without a budget
    counts `train_dataset`."""
    if num_train_samples is None:
        num_train_samples = samples_needed(job, step) or train_dataset.count()
    plan = plan_step(job, stage, step, init_model_uri=init_model_uri, num_train_samples=num_train_samples,
                     export_uri=storage.join(output_uri, EXPORT_FOLDER), has_validation=val_dataset is not None)
    if step.kind not in DISTILLATION_STEPS:
        decode_signal = None  # PT, FT, SFT: the task loss needs no teacher
    elif decode_signal is None:
        decode_signal = default_signal_decoder(job, plan.loss.attention_layers)
    (result,) = run_steps(job.trainer, [TrainStep(plan, train_dataset, val_dataset, decode_signal)], storage_uri=output_uri)
    return result


@dataclass
class PreparedStep:
    """A planned step ready for a worker group: its TrainStep, and what the driver spent on it."""

    planned: object
    """The cascade's PlannedStep."""
    train_step: TrainStep
    teacher_pass: dict
    driver_phases: dict[str, float] = field(default_factory=dict)
    """data_planning and teacher_pass seconds, spent on the driver before the group starts."""
    teacher_uri: str | dict | None = None
    """The model that taught the step (distillation steps); by role for several teachers."""


def prepare_step(job: JobConfig, planned, data, *, init_model_uri: str, teacher_uri: str | None, vocab_learner_uri: str,
                 export_uri: str, checkpoint_prefix: str, log, signal_planned=None, trained=None, trainer_job=None,
                 with_validation: bool = True, val_dataset=None) -> PreparedStep:
    """Builds a step's datasets (from `planned`: sources, curriculum, sample budget) and attaches
    its teacher signal (a cache hit, or one pool pass; with the cache off, the pool streams into
    training), then resolves its StepPlan. Tune varies the parts separately:
    `signal_planned` is the step whose active terms choose the signal (every searched term),
    `trained` the step whose loss and budget the worker group trains with (a trial's values), under
    `trainer_job`'s trainer settings; each defaults to `planned` / `job`. `vocab_learner_uri`: an
    existing folder of the learner, for the tokenizer check (the learner's `init_model_uri` may
    be a model the group has yet to train)."""
    return _attach_signal(_plan_data(
        job, planned, data, init_model_uri=init_model_uri, teacher_uri=teacher_uri, vocab_learner_uri=vocab_learner_uri,
        export_uri=export_uri, checkpoint_prefix=checkpoint_prefix, log=log, signal_planned=signal_planned,
        trained=trained, trainer_job=trainer_job, with_validation=with_validation, val_dataset=val_dataset,
    ))


@dataclass
class _StepDraft:
    """A step whose datasets are planned and whose teacher signal is still to attach."""

    job: JobConfig
    planned: object
    data: object
    train_dataset: object
    num_rows: int
    val_dataset: object
    phases: dict[str, float]
    options: dict


def _plan_data(job: JobConfig, planned, data, *, with_validation: bool, val_dataset, **options) -> _StepDraft:
    started = time.perf_counter()
    train_dataset, num_rows = data.train(planned)
    if with_validation and val_dataset is None:
        val_dataset = data.validation(planned)
    return _StepDraft(job, planned, data, train_dataset, num_rows, val_dataset,
                      {"data_planning": time.perf_counter() - started}, options)


def _attach_signal(draft: _StepDraft, deferred: list | None = None) -> PreparedStep:
    """The teacher signal (distillation steps) and the resolved StepPlan; reads nothing of
    `draft.data` but its fingerprint, so drafts of one segment can attach concurrently. With
    `deferred`, a pass still to run is appended there instead (see `attach_teacher_signal`)
    and the plan waits for its signal on the workers."""
    from functools import partial

    from ckd_ray.cascade.signal import attach_teacher_signal
    from ckd_ray.teachers.cache import SignalCache

    job, planned, options = draft.job, draft.planned, draft.options
    train_dataset, num_rows, phases = draft.train_dataset, draft.num_rows, dict(draft.phases)
    teacher_pass, decoder, await_signal = {}, None, None
    trained = options["trained"] or planned
    if planned.distills:
        from ckd_ray.cascade.signal import attach_fused_signal

        started, waiting = time.perf_counter(), len(deferred) if deferred is not None else 0
        signal_planned = options["signal_planned"] or planned
        common = (options["vocab_learner_uri"], train_dataset, draft.data, options["log"])
        if len(planned.teachers) > 1:
            train_dataset, spec, teacher_pass = attach_fused_signal(
                job, signal_planned, options["teacher_uri"], *common, deferred=deferred,
                ticket_uris=options.get("ticket_uris"), ready=options.get("teacher_ready"))
            decoder = fused_signal_decoder(job, trained.loss.attention_layers, spec, planned.teachers)
        else:
            train_dataset, spec, teacher_pass = attach_teacher_signal(
                job, signal_planned, options["teacher_uri"], *common, deferred=deferred,
                ticket_uri=(options.get("ticket_uris") or {}).get(planned.teacher), ready=(options.get("teacher_ready") or {}).get(planned.teacher),
            )
            decoder = default_signal_decoder(job, trained.loss.attention_layers, spec)
        if deferred is not None and len(deferred) > waiting:
            # The passes run while the group trains: its planned row count sizes the schedule (a
            # pass writes the same rows; rejected records only end the epoch a little earlier).
            tickets = [options["ticket_uris"][role] for role in planned.teachers]
            await_signal = partial(_wait_for_tickets, SignalCache(job.signal_cache_uri), tickets)
        else:
            phases["teacher_pass"] = time.perf_counter() - started
            num_rows = _pass_samples(teacher_pass, num_rows)
    step = trained.step
    if job.cascade.disjoint_data:  # the step's share of its pool: its budget sets the passes over it
        step = step.model_copy(update={"epochs": passes_for_budget(job, step, num_rows)})
    plan = plan_step(options["trainer_job"] or job, trained.stage, step, init_model_uri=options["init_model_uri"],
                     num_train_samples=num_rows, export_uri=options["export_uri"], step_id=planned.step_id,
                     checkpoint_prefix=options["checkpoint_prefix"], has_validation=draft.val_dataset is not None,
                     await_signal=await_signal)
    return PreparedStep(planned, TrainStep(plan, train_dataset, draft.val_dataset, decoder), teacher_pass, phases,
                        options["teacher_uri"] if planned.distills else None)


def _wait_for_tickets(cache, ticket_uris: list[str]) -> None:
    for ticket_uri in ticket_uris:
        cache.wait_for_ticket(ticket_uri)


def _pass_samples(teacher_pass: dict, planned_rows: int) -> int:
    """The rows a step's pass (or, fused, its first teacher's pass) wrote; the planned count if unknown."""
    first = next(iter(teacher_pass["teachers"].values())) if "teachers" in teacher_pass else teacher_pass
    return first.get("samples", planned_rows)


def prepare_segment(job: JobConfig, segment: list, data, roles: dict[str, str], *, output_uri: str, log,
                    suffix: str = "", deferred: list | None = None) -> list[PreparedStep]:
    """Prepares a segment's steps. Each step starts from `roles[learner]` and moves it to its own
    export, `<output_uri>/steps/<step_id><suffix>/model`, so the next step of the learner starts
    from a model the group has yet to train (`roles` is updated in place). The datasets are
    planned in order on this thread.

    A pass whose teacher the segment itself trains (a TA prepared, then teaching, in one group)
    cannot run before the group: it is appended to `deferred` (required then), to run beside
    the group once that teacher's export is written (`export_ready`). The other passes
    run here, `teacher_pool.concurrent_passes` at a time (they do not depend on each other, and
    one pass alone leaves cores, or a teacher's GPUs, idle), or, with
    `teacher_pool.overlap_training`, go to `deferred` as well."""
    from ckd_ray.cascade.signal import export_ready

    existing = dict(roles)
    trained_here: dict[str, str] = {}  # role -> the export of its latest step in this segment
    drafts = []
    for planned in segment:
        record_id = f"{planned.step_id}{suffix}"
        export_uri = storage.join(output_uri, "steps", record_id, EXPORT_FOLDER)
        teacher_ready = {}
        for role in planned.teachers if planned.distills else ():
            if role in trained_here:
                if deferred is None:
                    raise ValueError(f"step {planned.step_id} learns from {role!r}, trained earlier in the same worker group: "
                                     "its pass must run beside the group (pass `deferred`)")
                teacher_ready[role] = export_ready(trained_here[role])
        signal_file = lambda role: "teacher_signal.json" if len(planned.teachers) == 1 else f"teacher_signal-{role}.json"
        drafts.append(_plan_data(
            job, planned, data, with_validation=True, val_dataset=None, init_model_uri=roles[planned.learner],
            teacher_uri=teacher_uris(planned, roles),
            vocab_learner_uri=existing[planned.learner], export_uri=export_uri, checkpoint_prefix=f"{record_id}/", log=log,
            signal_planned=None, trained=None, trainer_job=None, teacher_ready=teacher_ready,
            ticket_uris={role: storage.join(output_uri, "steps", record_id, signal_file(role)) for role in planned.teachers},
        ))
        roles[planned.learner] = export_uri
        trained_here[planned.learner] = export_uri
    later = [i for i, draft in enumerate(drafts)
             if draft.options["teacher_ready"] or (deferred is not None and job.teacher_pool.overlap_training)]
    prepared: dict[int, PreparedStep] = {i: _attach_signal(drafts[i], deferred) for i in later}
    now = [i for i in range(len(drafts)) if i not in prepared]
    passes = sum(1 for i in now if drafts[i].planned.distills)
    if passes <= 1 or job.teacher_pool.concurrent_passes <= 1:
        prepared.update({i: _attach_signal(drafts[i]) for i in now})
        return [prepared[i] for i in range(len(drafts))]
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(passes, job.teacher_pool.concurrent_passes), thread_name_prefix="teacher-pass") as pool:
        ran = dict(zip(now, pool.map(_attach_signal, [drafts[i] for i in now])))
    # The passes overlapped: each step is charged its share of their wall time, so the steps'
    # phases add up to the run's wall clock (the pass's own seconds stay in `teacher_pass`).
    wall, own = time.perf_counter() - started, sum(step.driver_phases.get("teacher_pass", 0.0) for step in ran.values())
    for step in ran.values():
        if own > wall and "teacher_pass" in step.driver_phases:
            step.driver_phases["teacher_pass"] *= wall / own
    prepared.update(ran)
    return [prepared[i] for i in range(len(drafts))]


class TeacherPasses:
    """Runs deferred teacher passes (`prepare_segment(..., deferred=...)`) on background threads,
    `concurrent` at a time, while the worker group trains: each thread takes the first pass in
    step order whose teacher is ready (`DeferredPass.ready`), so a pass waiting for its teacher
    to be trained holds no thread another pass could use. A step's workers wait for its signal
    (`StepPlan.await_signal`), the others train meanwhile. Every pass runs even if one fails: a
    failed pass records its error in its ticket, so the workers waiting for it stop with that
    error instead of waiting forever. The threads are daemons (an interrupted driver does not
    wait for them); `stop()` (the group failed) ends them once their current pass is done."""

    def __init__(self, passes: list, concurrent: int, poll_s: float = 0.5):
        import threading

        self.errors: list[BaseException] = []
        self.stopped = threading.Event()
        self._queue = list(passes)
        self._lock = threading.Lock()
        self._poll_s = poll_s
        self._threads = [threading.Thread(target=self._work, name=f"teacher-pass-{i}", daemon=True)
                         for i in range(min(max(1, concurrent), len(passes)))]
        for thread in self._threads:
            thread.start()

    def _take(self):
        """The next pass to run, None when none is left (or the group stopped)."""
        while not self.stopped.is_set():
            with self._lock:
                if not self._queue:
                    return None
                for index, run in enumerate(self._queue):
                    ready = getattr(run, "ready", None)
                    if ready is None or ready():
                        return self._queue.pop(index)
            self.stopped.wait(self._poll_s)
        return None

    def _work(self) -> None:
        while (run := self._take()) is not None:
            try:
                run()
            except BaseException as err:  # raised by `join`, on the driver's thread
                with self._lock:
                    self.errors.append(err)

    def stop(self) -> None:
        self.stopped.set()

    def join(self) -> None:
        """Waits for every pass; raises the first pass's error."""
        for thread in self._threads:
            thread.join()
        if self.errors:
            raise self.errors[0]


def split_segments(plan: list, *, one_group: bool = False) -> list[list]:
    """Consecutive planned steps that can share a worker group. `one_group` (the caller runs the
    passes of teachers trained in the group beside it, `prepare_segment(..., deferred=...)`):
    the whole plan. Otherwise a step whose teacher was trained earlier in the same run of steps
    starts a new group (its teacher pass needs that model first)."""
    if one_group:
        return [list(plan)] if plan else []
    segments: list[list] = []
    trained: set[str] = set()
    for planned in plan:
        if not segments or any(role in trained for role in planned.teachers):
            segments.append([])
            trained = set()
        segments[-1].append(planned)
        trained.add(planned.learner)
    return segments


def _teacher_hidden_size(job: JobConfig, stage: StageConfig) -> int:
    """Hidden width of the stage's teacher, from its preset or its directory's config.json."""
    if stage.teacher is None:
        raise ValueError(f"stage {stage.label} has the feature loss on but no teacher")
    spec = job.models[stage.teacher]
    if spec.preset:
        return PRESETS[spec.preset].text.hidden_size
    config = json.loads(storage.read_bytes(storage.join(spec.path, "config.json")))
    return config.get("text_config", config)["hidden_size"]


__all__ = ["EXPORT_FOLDER", "PreparedStep", "TeacherPasses", "default_signal_decoder", "passes_for_budget", "plan_step", "prepare_segment", "prepare_step", "run_step",
           "samples_needed", "split_segments", "step_budget", "teacher_uris"]
