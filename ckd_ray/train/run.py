"""Runs one training step of a cascade stage on a Ray Train worker group and exports the student.

The cascade runner calls `run_step` once per step. Everything under `output_uri` belongs to the
step: `train/` (Ray Train's run folder: checkpoints and its snapshot of them) and `model/` (the
exported student). Calling `run_step` again with the same `output_uri` (a resubmitted job)
resumes from the latest checkpoint in `train/`; a step whose final checkpoint is there is not
trained again, only validated and exported.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ckd_ray import storage
from ckd_ray.cascade.config import DISTILLATION_STEPS, STEP_FREEZE, StageConfig, StepConfig, effective_loss
from ckd_ray.config.job import JobConfig
from ckd_ray.models.presets import PRESETS
from ckd_ray.train.checkpoint import MODEL_DIR, STATE_FILE, TrainState
from ckd_ray.train.engine import OptimizerPlan, warmup_steps_for
from ckd_ray.train.loop import SignalDecoder, StepPlan, train_worker

RUN_FOLDER = "train"
EXPORT_FOLDER = "model"


@dataclass
class StepResult:
    """What a finished training step hands back to the cascade runner."""

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
    """Trains the learner of `stage` for `step` on `train_dataset` (rows of the data pipeline,
    plus the teacher's `sig_` columns for DPT/DFT) starting from the Hugging Face directory
    `init_model_uri`, validates on `val_dataset`, and exports the student to `<output_uri>/model`.

    `num_train_samples` sizes the lr schedule; without it the dataset is counted, which runs
    its pipeline (teacher stage included) once. `decode_signal` turns a batch's `sig_` columns
    into the losses' TeacherSignalBatch; the default is `ckd_ray.teachers.decode_signal` with
    `job.signal`.
    """
    if num_train_samples is None:
        num_train_samples = train_dataset.count()
    plan = plan_step(job, stage, step, init_model_uri=init_model_uri, num_train_samples=num_train_samples,
                     has_validation=val_dataset is not None)
    if step.kind not in DISTILLATION_STEPS:
        decode_signal = None  # PT, FT, SFT: the task loss needs no teacher
    elif decode_signal is None:
        decode_signal = default_signal_decoder(job, plan.loss.attention_layers)

    trainer = build_trainer(job, train_worker, {"plan": plan, "decode_signal": decode_signal}, output_uri=output_uri,
                            train_dataset=train_dataset, val_dataset=val_dataset,
                            max_failures=job.trainer.max_failures, keep_checkpoints=job.trainer.keep_checkpoints)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"step {plan.label} finished without a checkpoint in {output_uri}")
    checkpoint_uri = storage.join(output_uri, RUN_FOLDER, Path(result.checkpoint.path).name)
    state = TrainState.from_json(storage.read_bytes(storage.join(checkpoint_uri, STATE_FILE)).decode())
    model_uri = export_student(result.checkpoint, storage.join(output_uri, EXPORT_FOLDER))
    return StepResult(model_uri=model_uri, metrics=state.history[-1], history=state.history, checkpoint_uri=checkpoint_uri,
                      num_steps=state.step, resumed_from=state.resumed_from)


def build_trainer(
    job: JobConfig,
    worker_loop,
    loop_config: dict,
    *,
    output_uri: str,
    train_dataset,
    val_dataset=None,
    max_failures: int,
    keep_checkpoints: int,
    callbacks: list | None = None,
):
    """The Ray Train `TorchTrainer` of one step, shaped by `job.trainer`: its worker group, run
    folder `<output_uri>/train` (local or S3, through the system's storage settings), and
    order-preserving ingest of `train_dataset` / `val_dataset`. The cascade's `run_step` and
    Ray Tune's trial runs both build their trainers here, so a trial trains exactly as a step does."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer_config = job.trainer
    storage_path, storage_filesystem = _run_storage(output_uri)
    resources = {"CPU": trainer_config.cpus_per_worker, **({"GPU": 1} if trainer_config.use_gpu else {}), **trainer_config.resources}
    return TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=trainer_config.num_workers, use_gpu=trainer_config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RUN_FOLDER,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks or [],
        ),
        datasets={"train": train_dataset, **({"val": val_dataset} if val_dataset is not None else {})},
        dataset_config=DataConfig(execution_options=_ordered_ingest(), enable_shard_locality=False),
    )


def plan_step(
    job: JobConfig,
    stage: StageConfig,
    step: StepConfig,
    *,
    init_model_uri: str,
    num_train_samples: int,
    has_validation: bool = False,
) -> StepPlan:
    """Resolves a step's settings: step overrides over `job.trainer`, the effective loss, the
    freeze policy, and the number of optimizer steps from the data size."""
    trainer = job.trainer
    loss = effective_loss(job.loss, stage, step)
    samples_per_worker = num_train_samples // trainer.num_workers  # equal shards drop the remainder
    batches_per_epoch = math.ceil(samples_per_worker / trainer.micro_batch_size)
    epochs = step.epochs or trainer.epochs
    total_steps = math.floor(epochs * batches_per_epoch) // trainer.grad_accum
    max_steps = step.max_steps or trainer.max_steps
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    label = f"{stage.label}/{step.kind}"
    if total_steps < 1:
        raise ValueError(
            f"step {label} has no optimizer step: {num_train_samples} samples over {trainer.num_workers} workers, "
            f"micro-batch {trainer.micro_batch_size}, grad_accum {trainer.grad_accum}, {epochs} epochs; "
            "add data, or lower trainer.grad_accum / trainer.micro_batch_size"
        )
    learner = job.models[stage.learner]
    return StepPlan(
        label=label,
        job_name=job.name,
        stage=stage.label,
        kind=step.kind,
        init_model_uri=init_model_uri,
        trust_remote_code=learner.trust_remote_code,
        freeze_policy=STEP_FREEZE[step.kind],
        loss=loss,
        optimizer=OptimizerPlan(
            lr=step.lr or trainer.lr[step.kind],
            weight_decay=trainer.weight_decay,
            total_steps=total_steps,
            warmup_steps=warmup_steps_for(total_steps, trainer.warmup_ratio),
        ),
        micro_batch_size=trainer.micro_batch_size,
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
    )


def default_signal_decoder(job: JobConfig, attention_layers: dict[int, int]) -> SignalDecoder:
    from ckd_ray.teachers.signal import decode_signal

    return partial(decode_signal, spec=job.signal, attention_layers=dict(attention_layers))


def export_student(checkpoint, export_uri: str) -> str:
    """Copies a checkpoint's student (config.json, model.safetensors, tokenizer and processor
    files) to `export_uri`: a Hugging Face directory that plain `transformers` loads. The feature
    projection and the optimizer state stay behind in the checkpoint. `checkpoint` is the
    `ray.train.Checkpoint` a run reported; it is read through Ray's storage filesystem."""
    from ray.train import Checkpoint

    model = Checkpoint(path=f"{checkpoint.path}/{MODEL_DIR}", filesystem=checkpoint.filesystem)
    with tempfile.TemporaryDirectory(prefix="ckd-export-") as local:
        model.to_directory(local)
        storage.upload_dir(local, export_uri)
    return export_uri


def _teacher_hidden_size(job: JobConfig, stage: StageConfig) -> int:
    """Hidden width of the stage's teacher, from its preset or its directory's config.json."""
    if stage.teacher is None:
        raise ValueError(f"stage {stage.label} has the feature loss on but no teacher")
    spec = job.models[stage.teacher]
    if spec.preset:
        return PRESETS[spec.preset].text.hidden_size
    config = json.loads(storage.read_bytes(storage.join(spec.path, "config.json")))
    return config.get("text_config", config)["hidden_size"]


def _run_storage(output_uri: str):
    """RunConfig's storage_path and filesystem: S3 goes through the same pyarrow filesystem (and
    endpoint settings) as the rest of the system."""
    if storage.is_s3(output_uri):
        filesystem, path = storage.arrow_filesystem(output_uri)
        return path, filesystem
    return storage.parse(output_uri).path, None


def _ordered_ingest():
    """Ray Train's ingest options with order preserved: with locality-based assignment off too,
    each worker's shard holds the same rows in the same order on every run, which is what
    resuming at a data position (and replaying the same loss curve) relies on."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options
