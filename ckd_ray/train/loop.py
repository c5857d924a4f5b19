"""The Ray Train worker of one training step: restore or build the DeepSpeed student, train on
this worker's data shard from the saved data position, report, checkpoint, validate.

`train_step` is the whole optimisation step; everything else here is wiring around it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from ckd_ray import storage
from ckd_ray.losses import FUSION_PREFIX, IGNORE_INDEX, FeatureProjection, StudentOutputs, TeacherSignalBatch, distillation_loss, task_loss
from ckd_ray.losses.config import LossConfig
from ckd_ray.models.builder import apply_freeze, load_model
from ckd_ray.observability.metrics import GpuSampler, StudentMetrics
from ckd_ray.train.batch import StudentBatch, student_batch
from ckd_ray.train.checkpoint import (
    MODEL_DIR,
    checkpoint_directory,
    TrainState,
    load_projection,
    read_state,
    restore_optimizer_state,
    resume_checkpoint,
    write_checkpoint,
)
from ckd_ray.train.engine import StudentWithProjection, build_engine, deepspeed_config
from ckd_ray.train.plan import STEP_SUMMARY_FILE, SignalDecoder, StepPlan  # noqa: F401 (the worker's side of the contract)

@dataclass
class WorkerSession:
    """What the worker loop asks of the runtime it runs in: Ray Train's worker context
    (`ray_train_session`), or this process alone for a one-worker run inside a Tune trial
    (Ray refuses `ray.train.*` calls in a Tune trial; see `ckd_ray.train.run`)."""

    rank: int
    device: torch.device
    checkpoint: object
    """The checkpoint to resume from (a `ray.train.Checkpoint`), or None."""
    dataset_shard: Callable[[str], object]
    """This worker's part of a named dataset: something with `iter_batches`."""
    report: Callable[..., None]
    """report(metrics, checkpoint_dir or None, checkpoint_dir_name or None); called alike by every worker."""


def ray_train_session() -> WorkerSession:
    def report(metrics: dict, directory: str | None = None, dir_name: str | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)

    return WorkerSession(rank=ray.train.get_context().get_world_rank(), device=ray.train.torch.get_device(),
                         checkpoint=ray.train.get_checkpoint(), dataset_shard=ray.train.get_dataset_shard, report=report)


def train_step(engine, batch: StudentBatch, signal: TeacherSignalBatch, loss: LossConfig, max_buckets: int = 1) -> dict[str, torch.Tensor]:
    """One micro-batch: student forward (in at most `max_buckets` groups of rows of similar
    length, `StudentBatch.forward`), weighted loss against the teacher signal, backward, and
    DeepSpeed's step (which averages gradients across workers and applies clipping, AdamW and the
    lr schedule at the end of each gradient-accumulation window). Returns each loss term."""
    weights = loss.weights
    outputs = batch.forward(
        engine,
        max_buckets,
        output_hidden_states=weights.feature > 0,
        output_attentions=weights.attention > 0,
        use_cache=False,
    )
    student = StudentOutputs(outputs.logits, outputs.hidden_states, outputs.attentions)
    total, terms = distillation_loss(
        weights,
        student,
        signal,
        target_ids_BL=batch.target_ids_BL,
        response_mask_BL=batch.response_mask_BL,
        visual_mask_BL=batch.visual_mask_BL,
        temperature=loss.temperature,
        kl_direction=loss.kl_direction,
        chunk_size=loss.chunk_size,
        projection=engine.module.projection,
        fusion=loss.fusion,
    )
    engine.backward(total)
    engine.step()
    return terms


def train_worker(config: dict, session: WorkerSession | None = None) -> None:
    """Ray Train entry point: trains `config["steps"]`, a list of (StepPlan, SignalDecoder | None),
    one after the other on this worker group, each from its own initial model, on its own dataset
    shard ("train-<i>") and validation rows (`config["validation"][i]`, an ObjectRef or None).
    The group, its process group and the imported libraries stay up across the steps; only the
    model and the DeepSpeed engine are rebuilt.

    After a restart (or in a resubmitted run) the latest checkpoint names the step it belongs
    to: earlier steps are done (their exports exist) and are skipped, that step resumes from its
    data position, a finished one is not trained again. `config["events"]` (a Ray queue, or
    None) receives rank 0's progress: ("started" | "progress" | "done", step_id, payload);
    `config["on_report"]` (a callable, or None) is called on rank 0 with each report's metrics,
    after `ray.train.report` (an in-process run has no trainer callbacks to see them)."""
    session = session or ray_train_session()
    steps: list[tuple[StepPlan, SignalDecoder | None]] = config["steps"]
    events = config.get("events")
    rank, device = session.rank, session.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    checkpoint, resume_state = session.checkpoint, None
    if checkpoint is not None:  # a damaged latest checkpoint falls back to the previous good one
        checkpoint, resume_state = resume_checkpoint(checkpoint, [plan.checkpoint_prefix for plan, _ in steps],
                                                     log=print if rank == 0 else lambda line: None)
    step_ids = [plan.step_id for plan, _ in steps]
    first = step_ids.index(resume_state.step_id) if resume_state is not None and resume_state.step_id in step_ids else 0
    upcoming = ShardPrefetch(session, f"train-{first}", steps[first][0])  # read while the engine builds
    for index in range(first, len(steps)):
        current = upcoming
        if index + 1 < len(steps):
            upcoming = ShardPrefetch(session, f"train-{index + 1}", steps[index + 1][0])
        plan, decode_signal = steps[index]
        resume = checkpoint if resume_state is not None and index == first and resume_state.step_id == plan.step_id else None
        emit = _emitter(events, plan.step_id, rank)
        run_one_step(plan, decode_signal, resume, current, session, emit, config["validation"][index], config.get("on_report"))


class ShardPrefetch:
    """Opens a step's shard and reads its first micro-batch on a helper thread, while the
    previous step trains (or the engine builds): the split coordinator (an actor, so a process
    start) and the first read and preprocessing tasks are then done when the step begins,
    instead of delaying its first batch by seconds. The pass it opens is the step's first
    epoch pass, whatever the epoch: every `iter_batches` pass over a shard starts at its
    beginning, and a resumed step drops the batches it trained on from it as from any other.
    A step whose teacher pass is still running (`plan.await_signal`) is opened once the pass
    has written its signal; `teacher_wait_s` is how long the step itself then waited for it."""

    def __init__(self, session: WorkerSession, name: str, plan: StepPlan):
        import threading

        self.shard = self.first_pass = self.error = None
        self.batch_size = plan.micro_batch_size
        self.await_signal = plan.await_signal
        self.signal_ready_at: float | None = None
        self.teacher_wait_s = 0.0
        self.thread = threading.Thread(target=self._open, args=(session, name), name=f"ckd-prefetch-{name}", daemon=True)
        self.thread.start()

    def _open(self, session: WorkerSession, name: str) -> None:
        try:
            if self.await_signal is not None:
                self.await_signal()
                self.signal_ready_at = time.perf_counter()
            self.shard = session.dataset_shard(name)
            batches = enumerate(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False))
            head = next(batches, None)
            self.first_pass = itertools.chain([head] if head is not None else [], batches)
        except BaseException as err:  # re-raised on the step's thread
            self.error = err

    def take(self):
        """(shard, its first pass): waits for the helper thread."""
        started = time.perf_counter()
        self.thread.join()
        if self.signal_ready_at is not None:
            self.teacher_wait_s = max(0.0, min(self.signal_ready_at, time.perf_counter()) - started)
        if self.error is not None:
            raise self.error
        return self.shard, self.first_pass


def _emitter(events, step_id: str, rank: int):
    def emit(kind: str, payload: dict) -> None:
        if events is not None and rank == 0:
            events.put((kind, step_id, {**payload, "at": time.time()}))  # an actor call; a few per optimizer step at most

    return emit


def run_one_step(plan: StepPlan, decode_signal: SignalDecoder | None, checkpoint, data: ShardPrefetch, session: WorkerSession,
                 emit, validation_rows=None, on_report=None) -> None:
    """One step on this worker: build (or restore) the student, train on the shard `data` opens,
    validate on `validation_rows` (an ObjectRef of numpy columns), write the final checkpoint
    and the export. Records its phases."""
    rank, device = session.rank, session.device
    phases = Phases()
    with phases.timed("engine_init"):
        engine, state = restore_or_build(plan, device, checkpoint)
    if state.step >= plan.total_steps and checkpoint is not None:
        emit("done", {"skipped": True})  # finished before a restart: its export was written before its final report
        return
    emit("started", {"resumed_from": state.step, "engine_init_s": phases.seconds["engine_init"]})
    pixel_dtype = torch.bfloat16 if plan.bf16 else torch.float32
    student_metrics = StudentMetrics(plan.job_name, plan.stage, plan.kind, worker=str(rank))
    report = Reporter(engine, plan, storage.download_dir(plan.init_model_uri), session, student_metrics, phases, on_report)
    gpu_sampler = GpuSampler(role="student", job=plan.job_name).start()

    engine.train()
    window = ReportWindow()
    wait_started = time.perf_counter()
    shard, first_pass = data.take()
    if data.await_signal is not None:  # waited for the teacher pass, then for the first batch
        phases.add("teacher_pass", data.teacher_wait_s)
    phases.add("first_batch_wait", time.perf_counter() - wait_started - data.teacher_wait_s)
    batches = micro_batches(shard, plan.micro_batch_size, state.epoch, state.batches_in_epoch, first_pass=first_pass)
    first_batch = True
    while state.step < plan.total_steps:
        epoch, index_in_epoch, batch, waited_s, last_in_epoch = next(batches)
        phases.add("first_batch_wait" if first_batch else "data_wait", waited_s)
        first_batch = False
        started = time.perf_counter()
        at_boundary = engine.is_gradient_accumulation_boundary()  # before step() advances it
        lr = engine.get_lr()[0]
        signal = decode_signal(batch, device=device) if decode_signal else TeacherSignalBatch()
        terms = train_step(engine, student_batch(batch, device, pixel_dtype), signal, plan.loss, plan.length_buckets)
        busy_s = time.perf_counter() - started
        phases.add("training", busy_s)
        window.add(terms, batch, busy_s=busy_s, waited_s=waited_s)
        state.epoch, state.batches_in_epoch = next_position(epoch, index_in_epoch, last_in_epoch=last_in_epoch)
        if not at_boundary:
            continue
        state.step += 1
        student_metrics.record_step(**window.close_step(), lr=lr)
        emit("progress", {"step": state.step, "loss": float(terms["total"]), "samples": int(len(batch["input_ids"])) * plan.num_workers * plan.grad_accum})
        if state.step == plan.total_steps:
            break
        if state.step % plan.report_every == 0 or state.step % plan.checkpoint_every == 0:
            checkpoint_now = state.step % plan.checkpoint_every == 0
            report(state, window.flush(state, lr), checkpoint=checkpoint_now)

    metrics = window.flush(state, lr)
    if plan.has_validation and validation_rows is not None:
        with phases.timed("validation"):
            metrics.update(validate(engine, ray.get(validation_rows), plan, device, pixel_dtype))
    report(state, metrics, checkpoint=True, final=True)
    gpu_sampler.stop()
    emit("done", {})  # the driver reads the step's summary next to its export


class Phases:
    """Seconds per phase of one step on this worker (rank 0's are the step's record)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)


def restore_or_build(plan: StepPlan, device: torch.device, checkpoint=None):
    """The DeepSpeed engine and train state: from `checkpoint` (the latest one Ray Train hands
    this run after a worker-group restart, or that a resubmitted job finds in the run folder),
    else fresh from the step's initial model."""
    fresh = TrainState(step_id=plan.step_id, num_workers=plan.num_workers, micro_batch_size=plan.micro_batch_size,
                       schedule=asdict(plan.optimizer))
    if checkpoint is None:
        return build_student(plan, device, None, fresh), fresh
    with checkpoint_directory(checkpoint) as directory:
        state = read_state(directory)
        changed = [
            f"{name} {getattr(state, name)} -> {getattr(fresh, name)}"
            for name in ("num_workers", "micro_batch_size", "schedule")
            if getattr(state, name) != getattr(fresh, name)
        ]
        if changed:
            raise ValueError(
                f"step {plan.label} cannot resume from {checkpoint.path}: it was written with other settings "
                f"({'; '.join(changed)}), and the data position counts micro-batches of each worker's shard while "
                "the lr schedule depends on the step count. Restore the trainer settings, or delete the step's "
                "output folder to start the step over"
            )
        if state.step >= plan.total_steps:
            return None, state  # finished: nothing to build
        state.resumed_from.append(state.step)
        return build_student(plan, device, Path(directory), state), state


def build_student(plan: StepPlan, device: torch.device, checkpoint_dir: Path | None, state: TrainState):
    """Loads the student (eager attention only when attention maps are distilled: SDPA does not
    return them), applies the step's freeze policy, adds the feature projection, wraps both in
    DeepSpeed and, when resuming, writes the checkpoint's optimizer state back."""
    weights = plan.loss.weights
    student = load_model(
        str(checkpoint_dir / MODEL_DIR) if checkpoint_dir else plan.init_model_uri,
        attn_implementation="eager" if weights.attention > 0 else "sdpa",
        dtype=torch.float32,  # with bf16 on, DeepSpeed casts the weights and keeps fp32 masters
        trust_remote_code=plan.trust_remote_code,
    )
    apply_freeze(student, plan.freeze_policy)
    projection = None
    if weights.feature > 0:
        torch.manual_seed(plan.seed)
        projection = FeatureProjection(plan.loss.feature_layers, student.config.text_config.hidden_size, plan.teacher_hidden_size)
        if checkpoint_dir:
            load_projection(projection, checkpoint_dir)
    module = StudentWithProjection(student, projection).to(device)
    ds_config = deepspeed_config(
        micro_batch_size=plan.micro_batch_size, grad_accum=plan.grad_accum, grad_clip=plan.grad_clip,
        zero_stage=plan.zero_stage, bf16=plan.bf16,
    )
    engine, _ = build_engine(module, plan.optimizer, ds_config, start_step=state.step)
    if checkpoint_dir and state.step > 0:
        restore_optimizer_state(engine, checkpoint_dir, state.step)
    return engine


def micro_batches(shard, batch_size: int, start_epoch: int, skip: int, first_pass=None) -> Iterator[tuple[int, int, dict, float, bool]]:
    """(epoch, index in the epoch, batch, seconds spent waiting for it, whether it is the epoch's
    last), epoch after epoch, from a data position on: the first `skip` micro-batches of
    `start_epoch` are read and dropped (they were trained on before the checkpoint). Shards are
    deterministic (ordered ingest, no locality-based assignment), so the dropped batches are
    exactly the ones trained on. Each batch is yielded once the next one is in hand, so the end
    of an epoch is known from the data itself, not from an estimate of its length.
    `first_pass`: an (index, batch) iterator of the shard already opened (`ShardPrefetch`),
    used for the first epoch read."""
    epoch = start_epoch
    while True:
        wait_started = time.perf_counter()
        if first_pass is not None:
            batches, first_pass = first_pass, None
        else:
            batches = enumerate(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False))
        current = next(batches, None)
        if current is None:
            raise RuntimeError("this worker's data shard is empty: the step has fewer samples than workers")
        waited = time.perf_counter() - wait_started
        while current is not None:
            wait_started = time.perf_counter()
            following = next(batches, None)
            waited += time.perf_counter() - wait_started
            index, batch = current
            if not (epoch == start_epoch and index < skip):
                yield epoch, index, batch, waited, following is None
                waited = 0.0
            current = following
        epoch += 1


def next_position(epoch: int, index: int, *, last_in_epoch: bool) -> tuple[int, int]:
    """The data position after training on micro-batch `index` of `epoch`; a finished epoch
    rolls over, so a resume does not read a whole epoch only to drop it."""
    if last_in_epoch:
        return epoch + 1, 0
    return epoch, index + 1


class Reporter:
    """Reports from every worker (`ray.train.report` is a barrier: all must call it alike) and,
    with `checkpoint`, has every worker take part in gathering the weights and optimizer state
    that rank 0 then uploads. The final report of a step first exports the student to
    `plan.export_uri` (so a finished checkpoint always has its export). Rank 0 writes one
    progress line per report to its log."""

    def __init__(self, engine, plan: StepPlan, processor_dir, session: WorkerSession, student_metrics: StudentMetrics,
                 phases: "Phases", on_report=None):
        self.engine, self.plan, self.processor_dir = engine, plan, processor_dir
        self.session, self.rank = session, session.rank
        self.student_metrics, self.phases = student_metrics, phases
        self.on_report = on_report if self.rank == 0 else None

    def __call__(self, state: TrainState, metrics: dict, *, checkpoint: bool, final: bool = False) -> None:
        started = time.perf_counter()
        state.history.append(metrics)
        if self.rank == 0:
            # Not print(): Ray Train routes print through its logger and echoes it, two lines a report.
            sys.stdout.write(progress_line(self.plan, metrics) + "\n")
            sys.stdout.flush()
        reported = {**metrics, "step_id": self.plan.step_id, "final": final}
        if not checkpoint:
            self.session.report(reported)
            self.phases.add("reports", time.perf_counter() - started)
            if self.on_report:
                self.on_report(reported)
            return
        with tempfile.TemporaryDirectory(prefix="ckd-checkpoint-") as directory:
            write_checkpoint(self.engine, state, directory, processor_dir=self.processor_dir, is_writer=self.rank == 0)
            written = time.perf_counter()
            self.phases.add("checkpoint", written - started)
            if final and self.rank == 0:
                summary = {"history": state.history, "phases": self.phases.seconds, "num_steps": state.step,
                           "resumed_from": state.resumed_from, "checkpoint": f"{self.plan.checkpoint_prefix}step-{state.step:07d}"}
                storage.upload_dir(Path(directory) / MODEL_DIR, self.plan.export_uri)
                # Last, after every file of the export: a pass waiting for this model as its
                # teacher starts when the summary is there (`ckd_ray.cascade.signal.ExportGate`).
                storage.write_bytes(storage.join(self.plan.export_uri, STEP_SUMMARY_FILE), json.dumps(summary, indent=1).encode())
                self.phases.add("export", time.perf_counter() - written)
                written = time.perf_counter()
            self.session.report(reported, directory if self.rank == 0 else None, f"{self.plan.checkpoint_prefix}step-{state.step:07d}")
        self.phases.add("checkpoint", time.perf_counter() - written)
        self.student_metrics.record_checkpoint(time.perf_counter() - started)
        if self.on_report:
            self.on_report(reported)


def progress_line(plan: StepPlan, metrics: dict) -> str:
    parts = [f"[{plan.label}] step {metrics['step']}/{plan.total_steps}"]
    if "loss" in metrics:
        terms = ", ".join(f"{name[5:]} {value:.4f}" for name, value in metrics.items() if name.startswith("loss_"))
        parts.append(f"loss {metrics['loss']:.4f} ({terms})")
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s, {metrics['step_time_s']:.2f} s/step "
                     f"({metrics['data_wait_s']:.2f} s data wait), lr {metrics['lr']:.2e}")
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}, val_accuracy {metrics['val_accuracy']:.3f}")
    return " | ".join(parts)


@torch.no_grad()
def validate(engine, columns: dict[str, np.ndarray], plan: StepPlan, device: torch.device, pixel_dtype: torch.dtype) -> dict[str, float]:
    """Task loss and next-token accuracy over the response tokens of the validation rows, both
    token-weighted means over all workers (worker r takes rows r, r + W, ...)."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss x tokens, correct tokens, tokens
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {name: values[rank::world] for name, values in columns.items()}
    num_rows = len(next(iter(mine.values()))) if mine else 0
    for start in range(0, num_rows, plan.micro_batch_size):
        batch = {name: values[start : start + plan.micro_batch_size] for name, values in mine.items()}
        inputs = student_batch(batch, device, pixel_dtype)
        logits_BLV = inputs.forward(engine, plan.length_buckets, use_cache=False).logits
        mask_BL = inputs.response_mask_BL & (inputs.target_ids_BL != IGNORE_INDEX)
        loss = task_loss(logits_BLV, inputs.target_ids_BL, inputs.response_mask_BL, chunk_size=plan.loss.chunk_size)
        correct = (logits_BLV[mask_BL].argmax(dim=-1) == inputs.target_ids_BL[mask_BL]).sum()
        num_tokens = mask_BL.sum()
        sums += torch.stack([loss.double() * num_tokens, correct.double(), num_tokens.double()]).cpu()
    loss_sum, correct, tokens = _all_reduce_sum(sums).tolist()  # host sync
    if tokens == 0:
        return {"val_tokens": 0.0}
    return {"val_loss": loss_sum / tokens, "val_accuracy": correct / tokens, "val_tokens": tokens}


@dataclass
class Tally:
    """Sums over micro-batches on this worker."""

    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    waited_s: float = 0.0
    term_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, terms: dict[str, torch.Tensor], *, samples: int, tokens: int, busy_s: float, waited_s: float) -> None:
        for name, value in terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0.0) + value.detach().double().cpu()
        self.micro_batches += 1
        self.samples += samples
        self.tokens += tokens
        self.busy_s += busy_s
        self.waited_s += waited_s


class ReportWindow:
    """What happened since the last report (`flush`, averaged over workers, for ray.train.report)
    and since the last optimizer step (`close_step`, this worker's, for Prometheus)."""

    def __init__(self):
        self.window, self.step, self.num_steps = Tally(), Tally(), 0

    def add(self, terms: dict[str, torch.Tensor], batch: dict, *, busy_s: float, waited_s: float) -> None:
        counts = dict(samples=len(batch["input_ids"]), tokens=int(np.asarray(batch["attention_mask"]).sum()),
                      busy_s=busy_s, waited_s=waited_s)
        self.window.add(terms, **counts)
        self.step.add(terms, **counts)

    def close_step(self) -> dict:
        """This worker's step time, data wait, tokens and mean loss terms of the optimizer step
        that just ended."""
        step, self.step = self.step, Tally()
        self.num_steps += 1
        means = {name: float(total) / step.micro_batches for name, total in step.term_sums.items()}
        return {
            "step_time_s": step.busy_s + step.waited_s,
            "data_wait_s": step.waited_s,
            "num_tokens": step.tokens,
            "loss_terms": {name: value for name, value in means.items() if not name.startswith(FUSION_PREFIX)},
            # `fusion_<term>/<role>`: a fused step's mean weight of each teacher in each term
            "fusion_weights": {tuple(name[len(FUSION_PREFIX):].split("/", 1)): value for name, value in means.items()
                               if name.startswith(FUSION_PREFIX)},
        }

    def flush(self, state: TrainState, lr: float) -> dict[str, float]:
        """The window's metrics over all workers (collective: every worker calls it), with the
        sample and token counts folded into `state`. Starts a new window."""
        window, num_steps = self.window, max(self.num_steps, 1)
        self.window, self.num_steps = Tally(), 0
        names = sorted(window.term_sums)
        counts = [window.micro_batches, window.samples, window.tokens, window.busy_s, window.waited_s]
        local = torch.stack([window.term_sums[name] for name in names] + [torch.tensor(float(c), dtype=torch.float64) for c in counts])
        summed = _all_reduce_sum(local).tolist()  # host sync, once per report
        micro_batches, samples, tokens, busy_s, waited_s = summed[len(names):]
        world = _world_size()
        state.samples_seen += int(samples)
        state.tokens_seen += int(tokens)
        # A fused step's teacher weights (`fusion_<term>/<role>`) keep their names: they are not loss terms.
        metrics = {("loss" if name == "total" else name if name.startswith(FUSION_PREFIX) else f"loss_{name}"): value / micro_batches
                   for name, value in zip(names, summed)}
        metrics.update(
            step=state.step,
            epoch=state.epoch,
            lr=lr,
            # training time of one worker: reports and checkpoints are not in it
            tokens_per_s=tokens / max((busy_s + waited_s) / world, 1e-9),
            step_time_s=(busy_s + waited_s) / world / num_steps,
            data_wait_s=waited_s / world / num_steps,
            samples_seen=state.samples_seen,
        )
        return metrics


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    on_device = values.to(device)  # NCCL reduces device tensors only
    dist.all_reduce(on_device)
    return on_device.cpu()
