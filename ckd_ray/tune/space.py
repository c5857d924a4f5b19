"""The searches a job's `tune:` section asks for, and how a trial's values become stage losses.

Inside the search every key is `<stage number>.<name>` ("1.output", "2.temperature"), with the
seed-000 names alpha..epsilon already turned into loss-term names; a bare key of the config
applies to every stage that distills.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ckd_ray.config.cascade import DISTILLATION_STEPS, StageConfig, default_weights, effective_loss
from ckd_ray.cascade.plan import PlannedStep
from ckd_ray.config.job import JobConfig
from ckd_ray.losses.config import GREEK_ALIASES, LossConfig
from ckd_ray.config.tune import SearchDimension

TEMPERATURE = "temperature"
FUSION_TEMPERATURE = "fusion_temperature"
"""tau of a fused stage's confidence and entropy rules (`loss.fusion.temperature`)."""


@dataclass(frozen=True)
class Search:
    """One Ray Tune search: the stages its trials train (0-based, in order) and its dimensions."""

    name: str
    """"stage 1", "stage 2", ... (per_stage) or "joint"."""
    stage_indices: tuple[int, ...]
    dims: dict[str, SearchDimension]
    """Keyed "<stage number>.<name>"."""

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "")

    def label(self, key: str) -> str:
        """A key as results tables show it: the bare name when the search has one stage."""
        return split_key(key)[1] if len(self.stage_indices) == 1 else key

    def terms(self, stage_index: int) -> set[str]:
        """The loss terms searched for one stage (the temperature is not a term)."""
        return {name for stage, name in map(split_key, self.dims)
                if stage == stage_index and name not in (TEMPERATURE, FUSION_TEMPERATURE)}


def canonical(name: str) -> str:
    return GREEK_ALIASES.get(name, name)


def split_key(key: str) -> tuple[int, str]:
    """"2.output" -> (1, "output")."""
    stage, _, name = key.partition(".")
    return int(stage) - 1, name


def distilling_stages(job: JobConfig) -> list[int]:
    """Stages with a teacher and at least one distillation step: their loss weights matter."""
    return [i for i, stage in enumerate(job.cascade.resolved_stages())
            if stage.teacher_roles and any(step.kind in DISTILLATION_STEPS for step in stage.steps)]


def stage_dims(job: JobConfig, stage_index: int) -> dict[str, SearchDimension]:
    """The dimensions of one stage: bare keys, overridden by keys prefixed with its number."""
    dims: dict[str, SearchDimension] = {}
    for prefixed in (False, True):
        for key, dim in job.tune.space.items():
            stage, dot, name = key.rpartition(".")
            if bool(dot) == prefixed and (not prefixed or int(stage) == stage_index + 1):
                dims[f"{stage_index + 1}.{canonical(name)}"] = dim
    return dims


def plan_searches(job: JobConfig) -> list[Search]:
    """per_stage: one search per distilling stage that has dimensions, in cascade order; joint: one
    search whose trials run every distilling stage in turn (those without dimensions at their
    configured loss)."""
    distilling = distilling_stages(job)
    if job.tune.mode == "joint":
        dims = {key: dim for i in distilling for key, dim in stage_dims(job, i).items()}
        return [Search("joint", tuple(distilling), dims)] if dims else []
    return [Search(f"stage {i + 1}", (i,), stage_dims(job, i)) for i in distilling if stage_dims(job, i)]


def stage_values(values: dict[str, float], stage_index: int) -> dict[str, float]:
    """A trial's values for one stage, keyed by bare name."""
    return {name: float(value) for (stage, name), value in ((split_key(k), v) for k, v in values.items()) if stage == stage_index}


def tuned_loss(loss: LossConfig, values: dict[str, float], kind: str = "DFT") -> LossConfig:
    weights = (loss.weights or default_weights(kind)).model_copy(
        update={name: value for name, value in values.items() if name not in (TEMPERATURE, FUSION_TEMPERATURE)}
    )
    update = {"weights": weights}
    if TEMPERATURE in values:
        update[TEMPERATURE] = values[TEMPERATURE]
    if FUSION_TEMPERATURE in values:
        update["fusion"] = loss.fusion.model_copy(update={"temperature": values[FUSION_TEMPERATURE]})
    return loss.model_copy(update=update)


def tuned_stage(job_loss: LossConfig, stage: StageConfig, values: dict[str, float]) -> StageConfig:
    """The stage with `values` written into its loss (and into the loss of any distillation step
    that overrides the stage's, which would otherwise win)."""
    if not values:
        return stage
    steps = [step.model_copy(update={"loss": tuned_loss(step.loss, values, step.kind)})
             if step.loss is not None and step.kind in DISTILLATION_STEPS else step
             for step in stage.steps]
    return stage.model_copy(update={"loss": tuned_loss(stage.loss or job_loss, values), "steps": steps})


def with_values(job: JobConfig, values_by_stage: dict[int, dict[str, float]]) -> JobConfig:
    """The job with each listed stage's loss set to its values; a named plan is written out as
    its stages (a plan's stages have no loss of their own to set)."""
    stages = [tuned_stage(job.loss, stage, values_by_stage.get(i, {})) for i, stage in enumerate(job.cascade.resolved_stages())]
    return job.model_copy(update={"cascade": job.cascade.model_copy(update={"plan": None, "stages": stages})})


def signal_step(planned: PlannedStep, searched_terms: set[str]) -> PlannedStep:
    """The step as the teacher signal sees it: every searched term on. Trials whose values turn a
    term off or on then still share one signal spec, hence one cache entry."""
    weights = planned.loss.weights.model_copy(
        update={term: max(getattr(planned.loss.weights, term), 1.0) for term in searched_terms}
    )
    return replace(planned, loss=planned.loss.model_copy(update={"weights": weights}))


def trial_step(planned: PlannedStep, values: dict[str, float], job_loss: LossConfig) -> PlannedStep:
    """The planned step with a trial's values in its stage and loss."""
    stage = tuned_stage(job_loss, planned.stage, values)
    step = next(s for s, original in zip(stage.steps, planned.stage.steps) if original is planned.step)
    return replace(planned, stage=stage, step=step, loss=effective_loss(job_loss, stage, step))
