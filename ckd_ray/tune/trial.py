"""One Ray Tune trial: a short student run of the searched stage's distillation steps with the
trial's loss weights and temperature, on the cached teacher signal.

In Ray 2.60 a Tune trial is a driver function that builds and fits a `TorchTrainer` (Ray Train V2
has no `Tuner(trainer)`); the trainer's reports reach Tune through a `TuneReportCallback` in the
trainer's `RunConfig(callbacks=...)`. The trial asks for its teacher signal exactly as a cascade
step does (`attach_teacher_signal`), so it is a cache hit when the driver warmed the cache, and a
teacher pass of the trial's own when it did not (counted either way).

The trainer validates once, at the end of a step, so the results Tune sees in between carry the
training task loss (response-token cross-entropy, the quantity `val_loss` measures, and the same
for every weighting) for ASHA, and NaN validation metrics until the trial's last step validates.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from ckd_ray import storage
from ckd_ray.cascade.datasets import StepData
from ckd_ray.cascade.plan import PlannedStep
from ckd_ray.cascade.signal import attach_teacher_signal
from ckd_ray.config.job import JobConfig
from ckd_ray.teachers import SignalCache, decode_signal
from ckd_ray.train.checkpoint import MODEL_DIR
from ckd_ray.tune.space import signal_step, stage_values, trial_step

TRIAL_STEP = "trial_step"
"""Optimizer steps the trial has run, over all its runs: ASHA's time attribute."""
TRAIN_TASK_LOSS = "train_task_loss"
"""ASHA's metric: mean task loss of the training batches since the previous report."""
VALIDATED = "validated"
CACHE_HITS = "signal_cache_hits"
TEACHER_PASSES = "signal_teacher_passes"
RUN_FOLDER = "train"
PLACEMENT_GROUP_FILE = "placement_group.txt"


class TrialReportCallback(TuneReportCallback):
    """Turns each report of a trial's training run (rank 0's metrics) into a Tune result. Runs in
    the Train controller, not in the trial function."""

    def __init__(self, *, step_offset: int, stage_number: int, last_run: bool, cache_hits: int, teacher_passes: int):
        super().__init__()
        self.step_offset = step_offset
        self.stage_number = stage_number
        self.last_run = last_run
        self.signal = {CACHE_HITS: cache_hits, TEACHER_PASSES: teacher_passes}

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0]
        validated = self.last_run and "val_loss" in report
        result = {
            TRIAL_STEP: self.step_offset + int(report["step"]),
            "stage": self.stage_number,
            TRAIN_TASK_LOSS: float(report.get("loss_task", math.nan)),  # NaN when the task weight is 0: never stopped
            "train_loss": float(report.get("loss", math.nan)),
            "val_loss": float(report["val_loss"]) if validated else math.nan,
            "val_accuracy": float(report["val_accuracy"]) if validated else math.nan,
            VALIDATED: validated,
            **self.signal,
        }
        super().after_report(run_context, [result], checkpoint)


def run_trial(values: dict, *, job: JobConfig, runs: list[PlannedStep], roles: dict[str, str], val_datasets: dict,
              searched_terms: dict[int, set[str]], search_uri: str) -> None:
    """Tune's trial function. `values` maps "<stage>.<name>" to the trial's value; `runs` are the
    distillation steps to train in turn, each starting from the previous one's student."""
    from ckd_ray.cascade.runner import quiet_data_progress

    quiet_data_progress()  # this process's Ray Data context: the trial's datasets inherit it
    trial_uri = storage.join(search_uri, "trials", ray.tune.get_context().get_trial_id())
    data = StepData(job, trial_uri)
    roles = dict(roles)
    step_offset = cache_hits = teacher_passes = 0
    for n, planned in enumerate(runs):
        last_run = n == len(runs) - 1
        train_dataset, spec, teacher_pass = attach_teacher_signal(
            job, signal_step(planned, searched_terms[planned.stage_index]), roles[planned.teacher], roles[planned.learner],
            data.train(planned), data, print,
        )
        hit = teacher_pass["source"] == "cache hit"
        cache_hits, teacher_passes = cache_hits + hit, teacher_passes + (not hit)
        tuned = trial_step(planned, stage_values(values, planned.stage_index), job.loss)
        callback = TrialReportCallback(step_offset=step_offset, stage_number=planned.stage_index + 1, last_run=last_run,
                                       cache_hits=cache_hits, teacher_passes=teacher_passes)
        checkpoint_uri, num_steps = fit_trial_run(
            job, tuned,
            init_model_uri=roles[planned.learner],
            train_dataset=train_dataset,
            val_dataset=val_datasets[planned.step_id] if last_run else None,
            num_train_samples=_num_train_samples(job, data, planned, teacher_pass),
            decode_signal=partial(decode_signal, spec=spec, attention_layers=dict(tuned.loss.attention_layers)),
            output_uri=storage.join(trial_uri, planned.step_id),
            callback=callback,
        )
        data.check_rejects(planned)
        roles[planned.learner] = storage.join(checkpoint_uri, MODEL_DIR)
        step_offset += num_steps


def fit_trial_run(job: JobConfig, planned: PlannedStep, *, init_model_uri: str, train_dataset, val_dataset,
                  num_train_samples: int, decode_signal, output_uri: str, callback) -> tuple[str, int]:
    """Trains one step for `tune.max_steps_per_trial` optimizer steps on a Ray Train worker group
    shaped like the cascade's, reporting every `tune.grace_period` steps through `callback`.
    Returns the final checkpoint's URI and the steps run.

    Unlike a cascade step there are no restarts (a restart would replay reports Tune has already
    acted on, and a failed trial is a result of the search) and no intermediate checkpoints."""
    from ckd_ray.train.run import build_trainer, plan_step

    tune, trainer_config = job.tune, job.trainer
    trial_job = job.model_copy(update={"trainer": trainer_config.model_copy(
        update={"report_every": tune.grace_period, "checkpoint_every": tune.max_steps_per_trial})})
    plan = plan_step(trial_job, planned.stage, planned.step.model_copy(update={"max_steps": tune.max_steps_per_trial}),
                     init_model_uri=init_model_uri, num_train_samples=num_train_samples, has_validation=val_dataset is not None)
    loop_config = {"plan": plan, "decode_signal": decode_signal,
                   "placement_group_uri": storage.join(output_uri, PLACEMENT_GROUP_FILE)}
    trainer = build_trainer(job, trial_worker, loop_config, output_uri=output_uri, train_dataset=train_dataset,
                            val_dataset=val_dataset, max_failures=0, keep_checkpoints=1, callbacks=[callback])
    result = trainer.fit()
    return storage.join(output_uri, RUN_FOLDER, Path(result.checkpoint.path).name), plan.total_steps


def trial_worker(config: dict) -> None:
    """Ray Train entry point of a trial run: the cascade's `train_worker`, after rank 0 has
    recorded the worker group's placement group for `ReleaseStoppedTrialRuns`."""
    import ray
    import ray.train

    from ckd_ray.train.loop import train_worker

    group = ray.util.get_current_placement_group()
    if group is not None and ray.train.get_context().get_world_rank() == 0:
        storage.write_bytes(config["placement_group_uri"], group.id.hex().encode())
    train_worker(config)


class ReleaseStoppedTrialRuns(ray.tune.Callback):
    """Removes the worker-group placement group of a trial run that Tune ended mid-training.

    When ASHA stops a trial, Tune ends the trial's actor, and with it the Train controller that
    would have removed its placement group. Placement groups live as long as the job, so each
    stopped trial would keep its workers' CPUs/GPUs reserved until the driver exits (a few
    stopped trials starve a small cluster). Ray Train's own cleaner actor needs the State API,
    which is not there when Ray runs without its dashboard. Runs that finish remove theirs."""

    def __init__(self, search_uri: str, step_ids: list[str]):
        self.search_uri, self.step_ids = search_uri, step_ids

    def on_trial_complete(self, iteration, trials, trial, **info):
        from ray import PlacementGroupID
        from ray.util import placement_group_table
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        for step_id in self.step_ids:
            uri = storage.join(self.search_uri, "trials", trial.trial_id, step_id, PLACEMENT_GROUP_FILE)
            if not storage.exists(uri):
                continue
            group_id = storage.read_bytes(uri).decode()
            if placement_group_table().get(group_id, {}).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)  # an actor that died takes its controller along


def _num_train_samples(job: JobConfig, data: StepData, planned: PlannedStep, teacher_pass: dict) -> int:
    """Rows of the step's training data without counting them through the pipeline (which would
    run a streamed teacher twice): the cache entry's row count, else the step's sample limit."""
    if "samples" in teacher_pass:
        return teacher_pass["samples"]
    if "key" in teacher_pass:
        return SignalCache(job.signal_cache_uri).lookup(teacher_pass["key"])["num_rows"]
    trainer = job.trainer
    return data.samples_needed(planned) or job.tune.max_steps_per_trial * trainer.micro_batch_size * trainer.num_workers * trainer.grad_accum
