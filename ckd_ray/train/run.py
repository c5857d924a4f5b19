"""Runs planned training steps on one Ray Train worker group and exports each step's student.

`run_steps` trains a list of steps, one after the other, on a single `TorchTrainer`: the worker
group, its process group and the imported libraries start once for the list, not once per step
(on a 2-core machine a worker-group start costs 10-20 s, about what 40 optimizer steps of the
tiny cascade cost). Each step is resolved beforehand into a `StepPlan` (the cascade side does
that: `ckd_ray.cascade.steps`), so this package knows nothing of stages or plans.

Outputs: each step exports its student to `plan.export_uri`; checkpoints go to the group's run
folder `<storage_uri>/<name>/<plan.checkpoint_prefix>step-NNNNNNN`. Running the same list
again on the same run folder (a resubmitted job) resumes from the latest checkpoint: finished
steps are skipped, the interrupted one continues from its data position.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ckd_ray import storage
from ckd_ray.errors import require_ray
from ckd_ray.train.config import TrainerConfig
from ckd_ray.train.plan import STEP_SUMMARY_FILE, SignalDecoder, StepPlan

RUN_FOLDER = "train"


@dataclass
class TrainStep:
    """One step as the worker group runs it: the resolved plan and its data."""

    plan: StepPlan
    train_dataset: object
    """A `ray.data.Dataset` of pipeline rows (plus `sig_*` columns when the step distills)."""
    val_dataset: object = None
    """Validation rows: an ObjectRef of numpy columns (`StepData.validation`), or a Dataset
    (read into such columns here)."""
    decode_signal: SignalDecoder | None = None
    """Turns a batch's `sig_*` columns into the losses' TeacherSignalBatch (distillation steps)."""


@dataclass
class StepResult:
    """What a finished training step hands back."""

    model_uri: str
    """The exported student: a Hugging Face directory that loads with `transformers` alone."""
    metrics: dict[str, float]
    """The final report: loss terms of the last window and, with validation data, val_loss and val_accuracy."""
    history: list[dict[str, float]]
    """Every report of the step, oldest first (reports lost to a restart are replayed, not repeated)."""
    checkpoint_uri: str
    """The final checkpoint (model, optimizer state, data position)."""
    num_steps: int
    """Optimizer steps the step ran."""
    resumed_from: list[int] = field(default_factory=list)
    """The step each worker-group restart or resubmission resumed from (empty: ran straight through)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase on rank 0: engine_init, first_batch_wait, training, data_wait, reports,
    checkpoint, validation, export (worker_start is added by the caller that measured it)."""


# Event handler: (kind, step_id, payload) with kind "group_started", "started", "progress", "done".
EventHandler = Callable[[str, str, dict], None]


def run_steps(
    trainer_config: TrainerConfig,
    steps: list[TrainStep],
    *,
    storage_uri: str,
    name: str = RUN_FOLDER,
    max_failures: int | None = None,
    keep_checkpoints: int | None = None,
    callbacks: list | None = None,
    on_event: EventHandler | None = None,
    worker_loop=None,
    loop_config: dict | None = None,
    in_process: bool = False,
) -> list[StepResult]:
    """Trains `steps` in order on one worker group shaped by `trainer_config`; returns a result
    per step. `on_event` is called on this thread as rank 0 starts a step, finishes an optimizer
    step and finishes a step (the Train run itself runs on a helper thread meanwhile), so a
    caller can keep its manifest and progress bar current while the group trains. `worker_loop`
    wraps `ckd_ray.train.loop.train_worker` (the default) where a caller needs more on the workers (Tune); `loop_config` adds to
    its config.

    `in_process` (one worker only) runs the loop in this process instead (on a helper thread
    while this one relays `on_event`'s events; on this thread without it): no controller, no
    worker actor, no restarts, and no trainer callbacks (the loop's `on_report` sees each
    report). A one-worker Tune trial uses it, so that its trial actor, which Tune reuses from
    trial to trial with its imports warm, is the worker. Ray Train's own local mode
    (`num_workers=0`) cannot serve here: Ray refuses `ray.train.*` calls inside a Tune trial."""
    if in_process and trainer_config.num_workers != 1:
        raise ValueError(f"an in-process run has one worker; trainer.num_workers is {trainer_config.num_workers}")
    require_ray("run_steps")
    if worker_loop is None:  # the workers' loop: torch, DeepSpeed and Ray Train load here, not when planning
        from ckd_ray.train.loop import train_worker as worker_loop
    from ray.util.queue import Queue

    events = Queue(actor_options={"num_cpus": 0}) if on_event else None
    validation = [_validation_ref(step.val_dataset) for step in steps]
    loop_config = {**(loop_config or {}), "steps": [(step.plan, step.decode_signal) for step in steps], "events": events,
                   "validation": validation}
    datasets = {f"train-{index}": step.train_dataset for index, step in enumerate(steps)}
    if in_process:
        session = _in_process_session(datasets, storage.join(storage_uri, name), trainer_config.use_gpu)
        if on_event is None:  # on this thread: a Tune trial's reports must come from the trial's own thread
            worker_loop(loop_config, session)
            return [read_step_result(step.plan, storage_uri, name) for step in steps]
        train = partial(worker_loop, loop_config, session)
    else:
        train = build_trainer(
            trainer_config, worker_loop, loop_config, storage_uri=storage_uri, name=name, datasets=datasets,
            max_failures=trainer_config.max_failures if max_failures is None else max_failures,
            keep_checkpoints=trainer_config.keep_checkpoints if keep_checkpoints is None else keep_checkpoints,
            callbacks=callbacks,
        ).fit
    started = time.perf_counter()
    outcome: dict = {}

    def fit() -> None:  # the loop (in process) or the Train run, on a helper thread while this one relays events
        try:
            outcome["result"] = train()
        except BaseException as err:  # re-raised on the caller's thread
            outcome["error"] = err

    runner = threading.Thread(target=fit, name="ckd-train-fit", daemon=True)
    runner.start()
    if on_event:
        on_event("group_started", "", {})
        first_event = True
        while runner.is_alive() or not events.empty():
            try:
                kind, step_id, payload = events.get(timeout=0.5)
            except queue.Empty:  # ray.util.queue.Empty subclasses it
                continue
            if first_event:
                payload = {**payload, "worker_start_s": time.perf_counter() - started}
                first_event = False
            on_event(kind, step_id, payload)
    runner.join()
    if events is not None:
        events.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return [read_step_result(step.plan, storage_uri, name) for step in steps]


def _in_process_session(datasets: dict, run_uri: str, use_gpu: bool):
    """The worker session of an in-process run: rank 0 of a process group of one (DeepSpeed
    needs a group; it is made once per process and kept, since a reused Tune trial actor trains
    trial after trial in it), the datasets themselves in their planned order, and checkpoints
    copied to the run folder as Ray Train would."""
    import os
    import socket

    import torch
    import torch.distributed as dist

    from ckd_ray.train.loop import WorkerSession

    # What a launcher would set for rank 0 of one; DeepSpeed checks LOCAL_RANK.
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    if not dist.is_initialized():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    for dataset in datasets.values():
        dataset.context.execution_options.preserve_order = True  # what Ray Train's ordered ingest gives its shards

    def report(metrics: dict, directory: str | None = None, dir_name: str | None = None) -> None:
        if directory:
            storage.upload_dir(directory, storage.join(run_uri, dir_name))

    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    return WorkerSession(rank=0, device=device, checkpoint=None, dataset_shard=datasets.__getitem__, report=report)


def _validation_ref(val):
    """Validation rows go to the workers through the object store, not as a Ray Train dataset:
    a few hundred rows do not need a streaming split (and its coordinator's start) per step."""
    import ray

    if val is None or isinstance(val, ray.ObjectRef):
        return val
    from ckd_ray.data.pipeline import stack_columns

    return ray.put(stack_columns(val))


def read_step_result(plan: StepPlan, storage_uri: str, name: str = RUN_FOLDER) -> StepResult:
    """A finished step's result, from the summary written next to its export."""
    summary = json.loads(storage.read_bytes(storage.join(plan.export_uri, STEP_SUMMARY_FILE)))
    history = summary["history"]
    return StepResult(
        model_uri=plan.export_uri,
        metrics=history[-1],
        history=history,
        checkpoint_uri=storage.join(storage_uri, name, summary["checkpoint"]),
        num_steps=summary["num_steps"],
        resumed_from=summary["resumed_from"],
        phases=summary["phases"],
    )


def build_trainer(
    trainer_config: TrainerConfig,
    worker_loop,
    loop_config: dict,
    *,
    storage_uri: str,
    name: str,
    datasets: dict,
    max_failures: int,
    keep_checkpoints: int,
    callbacks: list | None = None,
):
    """The Ray Train `TorchTrainer` of a worker group shaped by `trainer_config`: its run folder
    `<storage_uri>/<name>` (local or S3, through the system's storage settings) and
    order-preserving ingest of `datasets`."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ckd_ray.train.entry import pack, run_packed

    storage_path, storage_filesystem = _run_storage(storage_uri)
    resources = {"CPU": trainer_config.cpus_per_worker, **({"GPU": 1} if trainer_config.use_gpu else {}), **trainer_config.resources}
    return TorchTrainer(
        run_packed,
        train_loop_config=pack(worker_loop, loop_config),
        scaling_config=ScalingConfig(
            num_workers=trainer_config.num_workers, use_gpu=trainer_config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=_ordered_ingest(), enable_shard_locality=False),
    )


def _run_storage(uri: str):
    """RunConfig's storage_path and filesystem: S3 goes through the same pyarrow filesystem (and
    endpoint settings) as the rest of the system."""
    if storage.is_s3(uri):
        filesystem, path = storage.arrow_filesystem(uri)
        return path, filesystem
    return storage.parse(uri).path, None


def _ordered_ingest():
    """Ray Train's ingest options with order preserved: with locality-based assignment off too,
    each worker's shard holds the same rows in the same order on every run, which is what
    resuming at a data position (and replaying the same loss curve) relies on."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options
