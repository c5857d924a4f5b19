"""One Ray Tune trial: a short student run of the searched stage's distillation steps with the
trial's loss weights and temperature, on the cached teacher signal.

In Ray 2.60 a Tune trial is a driver function that builds and fits a `TorchTrainer` (Ray Train V2
has no `Tuner(trainer)`). With one worker the trainer runs in local mode, in the trial actor
itself, and the loop reports to Tune directly; with several, the trainer's reports reach Tune
through a `TuneReportCallback` in the trainer's `RunConfig(callbacks=...)`. The trial asks for its teacher signal exactly as a cascade
step does (`attach_teacher_signal`), so it is a cache hit when the driver warmed the cache, and a
teacher pass of the trial's own when it did not (counted either way).

The trainer validates once, at the end of a step, so the results Tune sees in between carry the
training task loss (response-token cross-entropy, the quantity `val_loss` measures, and the same
for every weighting) for ASHA, and NaN validation metrics until the trial's last step validates.
"""

from __future__ import annotations

import math
from dataclasses import replace

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from ckd_ray import storage
from ckd_ray.cascade.datasets import StepData
from ckd_ray.cascade.plan import PlannedStep
from ckd_ray.cascade.steps import EXPORT_FOLDER, prepare_step, teacher_uris
from ckd_ray.config.job import JobConfig
from ckd_ray.train.run import RUN_FOLDER, run_steps
from ckd_ray.tune.space import signal_step, stage_values, trial_step

TRIAL_STEP = "trial_step"
"""Optimizer steps the trial has run, over all its runs: ASHA's time attribute."""
TRAIN_TASK_LOSS = "train_task_loss"
"""ASHA's metric: mean task loss of the training batches since the previous report."""
VALIDATED = "validated"
OPTIMIZER_SECONDS = "optimizer_s"
"""Seconds the trial spent in optimizer steps (its wall time minus this is its overhead)."""
CACHE_HITS = "signal_cache_hits"
TEACHER_PASSES = "signal_teacher_passes"
PLACEMENT_GROUP_FILE = "placement_group.txt"


class TrialResults:
    """Turns each report of a trial's worker group (rank 0's metrics) into a Tune result.
    `offsets`: optimizer steps the trial ran before each of its steps (by step id); the last
    step's final report carries the validation."""

    def __init__(self, *, offsets: dict[str, int], stage_numbers: dict[str, int], last_step_id: str, cache_hits: int,
                 teacher_passes: int):
        self.offsets, self.stage_numbers, self.last_step_id = offsets, stage_numbers, last_step_id
        self.signal = {CACHE_HITS: cache_hits, TEACHER_PASSES: teacher_passes}
        self.optimizer_s, self.last_step = 0.0, {}

    def result(self, report: dict) -> dict:
        step_id = report["step_id"]
        if "step_time_s" in report:  # seconds in optimizer steps so far (the trial's compute)
            steps = int(report["step"]) - self.last_step.get(step_id, 0)
            self.optimizer_s += float(report["step_time_s"]) * steps
            self.last_step[step_id] = int(report["step"])
        validated = step_id == self.last_step_id and "val_loss" in report
        return {
            TRIAL_STEP: self.offsets[step_id] + int(report["step"]),
            "stage": self.stage_numbers[step_id],
            TRAIN_TASK_LOSS: float(report.get("loss_task", math.nan)),  # NaN when the task weight is 0: never stopped
            "train_loss": float(report.get("loss", math.nan)),
            "val_loss": float(report["val_loss"]) if validated else math.nan,
            "val_accuracy": float(report["val_accuracy"]) if validated else math.nan,
            VALIDATED: validated,
            OPTIMIZER_SECONDS: self.optimizer_s,
            **self.signal,
        }

    def report_to_tune(self, report: dict) -> None:
        """An in-process trial's reports (the loop's `on_report`, on the trial's own thread)."""
        ray.tune.report(self.result(report))


class TrialReportCallback(TuneReportCallback):
    """A multi-worker trial's reports: runs in the Train controller, not in the trial function."""

    def __init__(self, results: TrialResults):
        super().__init__()
        self.results = results

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [self.results.result(metrics[0])], checkpoint)


def runs_in_process(job: JobConfig) -> bool:
    """A one-worker trial trains in its Tune trial actor (Ray Train's local mode): Tune reuses
    the actor, so a trial pays no controller, worker start or imports. Several workers need a
    worker group of their own per trial."""
    return job.trainer.num_workers == 1


def run_trial(values: dict, *, job: JobConfig, runs: list[PlannedStep], roles: dict[str, str], val_datasets: dict,
              searched_terms: dict[int, set[str]], search_uri: str) -> None:
    """Tune's trial function. `values` maps "<stage>.<name>" to the trial's value; `runs` are the
    distillation steps to train in turn, each starting from the previous one's student, on one
    worker group (this process, for one worker: `runs_in_process`), each for `tune.max_steps_per_trial` optimizer steps with a report every
    `tune.grace_period` steps. Unlike a cascade step there are no restarts (a restart would replay
    reports Tune has already acted on, and a failed trial is a result of the search)."""
    from ckd_ray.cascade.session import quiet_data_progress

    quiet_data_progress()  # this process's Ray Data context: the trial's datasets inherit it
    settings = job.tune
    trial_uri = storage.join(search_uri, "trials", ray.tune.get_context().get_trial_id())
    trial_job = job.model_copy(update={"trainer": job.trainer.model_copy(
        update={"report_every": settings.grace_period, "checkpoint_every": settings.max_steps_per_trial})})
    data = StepData(job, trial_uri)
    learners = dict(roles)
    prepared, offsets, stage_numbers = [], {}, {}
    cache_hits = teacher_passes = steps_before = 0
    for n, planned in enumerate(runs):
        last = n == len(runs) - 1
        tuned = trial_step(planned, stage_values(values, planned.stage_index), job.loss)
        tuned = replace(tuned, step=tuned.step.model_copy(update={"max_steps": settings.max_steps_per_trial}))
        export_uri = storage.join(trial_uri, planned.step_id, EXPORT_FOLDER)
        step = prepare_step(
            job, planned, data, init_model_uri=learners[planned.learner], teacher_uri=teacher_uris(planned, roles),
            vocab_learner_uri=roles[planned.learner], export_uri=export_uri, checkpoint_prefix=f"{planned.step_id}/",
            log=print, signal_planned=signal_step(planned, searched_terms[planned.stage_index]), trained=tuned,
            trainer_job=trial_job, with_validation=last, val_dataset=val_datasets[planned.step_id] if last else None,
        )
        hit = step.teacher_pass.get("source") == "cache hit"
        cache_hits, teacher_passes = cache_hits + hit, teacher_passes + (not hit)
        offsets[planned.step_id], stage_numbers[planned.step_id] = steps_before, planned.stage_index + 1
        steps_before += step.train_step.plan.total_steps
        learners[planned.learner] = export_uri
        prepared.append(step)
    results = TrialResults(offsets=offsets, stage_numbers=stage_numbers, last_step_id=runs[-1].step_id,
                           cache_hits=cache_hits, teacher_passes=teacher_passes)
    train_steps = [step.train_step for step in prepared]
    if runs_in_process(job):
        run_steps(trial_job.trainer, train_steps, storage_uri=trial_uri, name=RUN_FOLDER, max_failures=0, keep_checkpoints=1,
                  loop_config={"on_report": results.report_to_tune}, in_process=True)
    else:
        run_steps(trial_job.trainer, train_steps, storage_uri=trial_uri, name=RUN_FOLDER, max_failures=0, keep_checkpoints=1,
                  callbacks=[TrialReportCallback(results)], worker_loop=trial_worker,
                  loop_config={"placement_group_uri": storage.join(trial_uri, PLACEMENT_GROUP_FILE)})
    for planned in runs:
        data.check_rejects(planned)


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

    def __init__(self, search_uri: str):
        self.search_uri = search_uri

    def on_trial_complete(self, iteration, trials, trial, **info):
        from ray import PlacementGroupID
        from ray.util import placement_group_table
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        uri = storage.join(self.search_uri, "trials", trial.trial_id, PLACEMENT_GROUP_FILE)
        if not storage.exists(uri):
            return
        group_id = storage.read_bytes(uri).decode()
        if placement_group_table().get(group_id, {}).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)  # an actor that died takes its controller along
