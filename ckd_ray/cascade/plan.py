"""A job's plan flattened into the ordered steps the runner executes."""

from __future__ import annotations

from dataclasses import dataclass

from ckd_ray.config.cascade import CAPTION_STEPS, DISTILLATION_STEPS, StageConfig, StepConfig, effective_loss
from ckd_ray.config.job import JobConfig
from ckd_ray.losses.config import LossConfig


@dataclass(frozen=True)
class PlannedStep:
    """One training step of the plan. `step_id` is stable across resubmissions of the same config
    (it names the step's output folder and its manifest entry)."""

    index: int
    step_id: str
    stage_index: int  # -1 for teacher preparation
    stage: StageConfig
    step: StepConfig
    learner: str
    teacher: str | None
    loss: LossConfig
    teachers: tuple[str, ...] = ()
    """The roles that teach the step: (teacher,), several for a fused stage, () for none."""

    @property
    def kind(self) -> str:
        return self.step.kind

    @property
    def distills(self) -> bool:
        return self.step.kind in DISTILLATION_STEPS

    @property
    def data_kind(self) -> str:
        """`caption` (PT, DPT) or `instruct` (FT, SFT, DFT) data."""
        return "caption" if self.step.kind in CAPTION_STEPS else "instruct"


def teacher_roles_to_prepare(job: JobConfig) -> list[str]:
    """Teacher roles that need training before they teach (presets, and folders marked
    `prepare: true`, e.g. freshly composed ones): they are trained first with the TinyLLaVA recipe. A role that is itself a learner earlier (top-down TA) is not prepared:
    its distilled checkpoint teaches."""
    if not job.cascade.prepare_teachers:
        return []
    learned: set[str] = set()
    roles: list[str] = []
    for stage in job.cascade.resolved_stages():
        for teacher in stage.teacher_roles:
            if teacher not in roles and teacher not in learned and job.models[teacher].needs_preparation:
                roles.append(teacher)
        learned.add(stage.learner)
    # A top-down TA learns from the teacher before it teaches, so it starts from a prepared one too.
    for stage in job.cascade.resolved_stages():
        if stage.teacher_roles and stage.learner != "student" and stage.learner not in roles and job.models[stage.learner].needs_preparation:
            roles.append(stage.learner)
    return roles


def build_plan(job: JobConfig) -> list[PlannedStep]:
    steps: list[PlannedStep] = []

    def add(stage_index: int, stage: StageConfig, step: StepConfig, label: str) -> None:
        steps.append(PlannedStep(
            index=len(steps),
            step_id=f"{len(steps):02d}-{label}-{step.kind}".replace("->", "_to_"),
            stage_index=stage_index,
            stage=stage,
            step=step,
            learner=stage.learner,
            teacher=stage.teacher,
            loss=effective_loss(job.loss, stage, step),
            teachers=tuple(stage.teacher_roles),
        ))

    for role in teacher_roles_to_prepare(job):
        prep = StageConfig(name=f"prepare-{role}", learner=role, teacher=None, steps=job.cascade.prep_steps(role))
        for step in prep.steps:
            add(-1, prep, step, prep.label)
    stages = job.cascade.resolved_stages()
    for i, stage in enumerate(stages):
        for step in stage.steps:
            add(i, stage, step, f"s{i + 1}-{stage.label}")
    for i, control in enumerate(job.cascade.control_stages(job.trainer.lr), start=len(stages)):
        for step in control.steps:
            add(i, control, step, control.label)  # after the stages: tune searches never reach it
    return steps
