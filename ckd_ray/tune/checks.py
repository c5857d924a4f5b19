"""Checks of a `tune:` section against the rest of the job, run by `run_tune` before Ray starts:
a searched term must have its teacher signal, every searched stage must distill, and a joint
search cannot train a teacher it also needs (its signal could not be cached once)."""

from __future__ import annotations

from ckd_ray.config.cascade import DISTILLATION_STEPS, effective_loss
from ckd_ray.config.checks import missing_signal
from ckd_ray.config.job import JobConfig
from ckd_ray.errors import Problem
from ckd_ray.tune.space import canonical, distilling_stages, plan_searches, split_key, tuned_loss


def check_tune(job: JobConfig) -> list[Problem]:
    tune = job.tune
    stages = job.cascade.resolved_stages()
    distilling = distilling_stages(job)
    problems: list[Problem] = []
    if not tune.space:
        return [Problem("tune.space", "is empty: nothing to search",
                        "add dimensions, e.g. `output: {low: 0.1, high: 2.0, log: true}` or `temperature: {choices: [1, 2]}`")]
    for key in tune.space:
        stage, dot, _ = key.rpartition(".")
        if dot and stage.isdigit() and int(stage) - 1 < len(stages) and int(stage) - 1 not in distilling:
            problems.append(Problem(f"tune.space.{key}", f"stage {stage} has no teacher or no distillation step (DPT/DFT), "
                                    "so its loss weights are never used", f"remove the key, or give stage {stage} a DPT/DFT step"))
    if not distilling:
        problems.append(Problem("cascade", "no stage distills: there is no loss to tune", "add a stage with a teacher and a DPT/DFT step"))
    searches = plan_searches(job)
    for search in searches:
        for stage_index in search.stage_indices:
            stage = stages[stage_index]
            # The largest signal a trial can need: every searched term on.
            values = {name: 1.0 for key in search.dims for s, name in [split_key(key)] if s == stage_index and name != "temperature"}
            for j, step in enumerate(stage.steps):
                if step.kind not in DISTILLATION_STEPS:
                    continue
                loss = tuned_loss(effective_loss(job.loss, stage, step), values, step.kind)
                for term in values:
                    message = missing_signal(term, loss, job.signal)
                    key = _space_key(job, stage_index, term)
                    problem = Problem(f"tune.space.{key}", f"is searched but {message[0].removeprefix('> 0 but ')}",
                                      message[1].replace("or set the weight to 0", "or do not search it")) if message else None
                    if problem and problem not in problems:
                        problems.append(problem)
                used = {term for term, weight in loss.weights.model_dump().items() if weight > 0}
                if len(used) > 1 and used <= set(values):
                    keys = ", ".join(_space_key(job, stage_index, term) for term in sorted(used))
                    problem = Problem("tune.space", f"searches every weight of stage {stage_index + 1}'s loss ({keys}): multiplying "
                                      "all of them by one factor only rescales the loss, so trials would differ in scale, "
                                      "not in the balance of the terms",
                                      "fix one weight (e.g. remove alpha from the space: it keeps its value in `loss.weights`) "
                                      "and search the others relative to it")
                    if problem not in problems:
                        problems.append(problem)
    if tune.mode == "joint":
        searched = {i for search in searches for i in search.stage_indices}
        learners = set()  # trained inside the trials (stages before the first searched one run once, before the search)
        for i, stage in enumerate(stages):
            if i < min(searched, default=0):
                continue
            if i in searched and set(stage.teacher_roles) & learners:
                problems.append(Problem("tune.mode", f"joint, but stage {i + 1}'s teacher {'+'.join(stage.teacher_roles)!r} is trained by an earlier "
                                        "stage, so every trial would need its own teacher pass",
                                        "use mode: per_stage (each stage is tuned from the previous stage's best)"))
            learners.add(stage.learner)
    return problems


def _space_key(job: JobConfig, stage_index: int, term: str) -> str:
    """The key of `tune.space` that searches `term` for the stage, as the user wrote it."""
    for key in job.tune.space:
        stage, _, name = key.rpartition(".")
        if canonical(name) == term and stage == str(stage_index + 1):
            return key
    return next(key for key in job.tune.space if "." not in key and canonical(key) == term)
