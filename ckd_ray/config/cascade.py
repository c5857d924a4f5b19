"""The cascade plan: stages (who teaches whom) and the steps each stage runs."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from ckd_ray.section import Section
from ckd_ray.losses.config import LossConfig
from ckd_ray.train.config import StepKind

# Freeze policy of each step type (seed 001): the vision tower is always frozen.
FreezePolicy = Literal["connector", "connector+llm"]
STEP_FREEZE: dict[str, FreezePolicy] = {"PT": "connector", "FT": "connector+llm", "DPT": "connector", "SFT": "connector+llm", "DFT": "connector+llm"}
DISTILLATION_STEPS = ("DPT", "DFT")
CAPTION_STEPS = ("PT", "DPT")
# The student-alone control: the learner role it trains (a copy of the student's initial
# checkpoint) and the step each student step becomes without a teacher.
CONTROL_ROLE = "student_alone"
ALONE_KIND = {"DPT": "PT", "DFT": "FT"}


def _bare_step_names(value: Any) -> Any:
    """YAML steps may be bare names: "DPT" is `{kind: DPT}`."""
    if isinstance(value, list):
        return [{"kind": v} if isinstance(v, str) else v for v in value]
    return value


class StepConfig(Section):
    """One training step of a stage. In YAML a bare step name ("DPT") means all defaults."""

    kind: StepKind
    """PT / FT (teacher preparation, task loss), DPT / DFT (distillation), SFT (task loss)."""
    lr: float | None = Field(None, gt=0.0)
    """Overrides trainer.lr for this step."""
    epochs: float | None = Field(None, gt=0.0)
    """Overrides trainer.epochs for this step."""
    max_steps: int | None = Field(None, ge=1)
    """Overrides trainer.max_steps for this step."""
    freeze: FreezePolicy | None = None
    """What trains: "connector" or "connector+llm" (the vision tower never does). Default: the
    step type's policy (seed 001: PT and DPT train the connector, the rest connector + LLM). A
    teacher trained from a random LLM needs "connector+llm" in PT: a frozen random LLM cannot
    learn to caption."""
    loss: LossConfig | None = None
    """Overrides the stage's loss for this step."""


class StageConfig(Section):
    """A stage: `teacher` distills into `learner` through `steps`. No teacher = plain training."""

    name: str | None = None
    """Label in the manifest and report (default: '<teacher>-><learner>')."""
    learner: str = "student"
    """Role (a key of `models`) that trains in this stage."""
    teacher: str | None = None
    """Role that teaches; its trained checkpoint is used when teacher preparation ran."""
    teachers: list[str] = []
    """Several roles that teach at once, instead of `teacher`: each one's signal is cached by its
    own pass, and the KL terms fuse them per token by `loss.fusion` (e.g. `[ta, teacher]`)."""
    steps: list[StepConfig] = Field(default_factory=lambda: [StepConfig(kind=k) for k in ("DPT", "SFT", "DFT")])
    """Steps in order (default LLaVA-KD: DPT, SFT, DFT)."""
    hop_levels: list[int] | None = None
    """Curriculum filter on instruction data: the hop levels this stage trains on (None = all)."""
    loss: LossConfig | None = None
    """Overrides the job's `loss` for this stage's distillation steps."""

    @field_validator("steps", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        return _bare_step_names(value)

    @model_validator(mode="after")
    def _one_or_several_teachers(self) -> "StageConfig":
        if self.teachers and self.teacher is not None:
            raise ValueError("both `teacher` and `teachers` are set: keep `teacher` for one, `teachers` for several")
        if self.teachers and (len(self.teachers) < 2 or len(set(self.teachers)) != len(self.teachers)):
            raise ValueError(f"`teachers` {self.teachers} must name at least two distinct roles (one teacher: set `teacher`)")
        return self

    @property
    def teacher_roles(self) -> list[str]:
        """The roles that teach this stage: `teachers`, or `teacher` alone, or none."""
        return list(self.teachers) or ([self.teacher] if self.teacher else [])

    @property
    def label(self) -> str:
        teachers = "+".join(self.teacher_roles)
        return self.name or (f"{teachers}->{self.learner}" if teachers else f"{self.learner}-alone")


PlanName = Literal["bottom_up", "single_teacher", "top_down", "student_only", "progressive", "end_to_end", "fused"]
PLAN_NAMES = get_args(PlanName)


class CascadeConfig(Section):
    """The plan of a job: teacher preparation, then the stages in order. Either name a `plan`
    (expanded into stages with the roles `student`, `ta`, `teacher`) or list `stages`."""

    plan: PlanName | None = None
    """A named plan: bottom_up (LLaVA-CKD: TA->S, then T->S), single_teacher (LLaVA-KD: T->S),
    top_down (T->TA, then TA->S), student_only (TinyLLaVA: PT, FT), progressive (seed 000: T->S
    over hop levels 0, <=1, all), end_to_end (seed 000's baseline: T->S on all levels at once),
    fused (TA and teacher fused per token into S in one stage, `loss.fusion`)."""
    prepare_teachers: bool = True
    """Train each teacher role without distillation (TinyLLaVA recipe) before it teaches."""
    teacher_prep_steps: list[StepConfig] = Field(default_factory=lambda: [StepConfig(kind=k) for k in ("PT", "FT")])
    """Steps of teacher preparation (bare names or steps with their own budget, e.g.
    `{kind: FT, max_steps: 300}`: a teacher usually needs more steps than the student's stages)."""
    role_prep_steps: dict[str, list[StepConfig]] = {}
    """A role's own preparation steps instead of `teacher_prep_steps` (e.g. `{teacher: [...]}`:
    the papers' largest teacher is trained longest)."""
    share_prepared_teachers: bool = False
    """Prepare each teacher role in a run of its own, `<storage.root>/prepared-<role>-<digest>`,
    named after what it computes (that role's model, the data, evaluation and trainer settings,
    its preparation steps; not the other roles, the signal, the loss or a student budget that the
    preparation steps do not read), and reuse it: a later job with the same recipe for that role
    starts from its checkpoint without preparing it again. Off: the preparation steps are the
    first steps of this job's own run."""
    stages: list[StageConfig] = Field(default_factory=list)
    """Stages in order; the learner's checkpoint is handed from each stage to the next."""
    student_alone: bool = False
    """Also train the control the papers compare with: the student alone, from the same initial
    checkpoint, through the same steps as the plan's student steps with every teacher term
    removed (DPT becomes PT, DFT becomes FT, with the same budgets and learning rates), after the
    plan; it is scored where each student stage's steps end (`student-alone-1`, ..., and
    `student-alone` after all of them, rows of the report), so every distilled student stands
    beside a student trained on the same optimizer steps without a teacher."""
    disjoint_data: bool = False
    """Each learner's steps read disjoint shares of one pool of the training data instead of each
    reading the first samples of the data order its budget needs: per data kind (captions,
    instructions) the pool is the first N records of the order seeded by `data.shuffle_seed` +
    `seed` (a job's seed draws its own pool; evaluation samples do not change with it), N
    what the learner's steps consume at their budgets (max_steps x samples per optimizer step /
    epochs, summed); consecutive steps on the same hop levels split what those levels hold in
    proportion to their budgets, and a curriculum stage reads every record of its levels in the
    pool, those earlier stages read included (the papers' cumulative curriculum: hop 0, then
    hop <= 1, then all, so a later stage does not forget the earlier levels; the run's distinct
    samples per level are still the pool's).
    Plans with the same budgets thus see the same distinct samples per hop level, however they
    split them into steps (`ckd-ray experiment`). Each step still makes its `max_steps`
    optimizer steps, passing over its share as often as that takes; every step needs a budget."""

    @field_validator("teacher_prep_steps", mode="before")
    @classmethod
    def _bare_prep_names(cls, value: Any) -> Any:
        return _bare_step_names(value)

    @field_validator("role_prep_steps", mode="before")
    @classmethod
    def _bare_role_prep_names(cls, value: Any) -> Any:
        return {role: _bare_step_names(steps) for role, steps in value.items()} if isinstance(value, dict) else value

    def prep_steps(self, role: str) -> list[StepConfig]:
        """The steps that prepare `role`: its own `role_prep_steps`, or `teacher_prep_steps`."""
        return list(self.role_prep_steps.get(role) or self.teacher_prep_steps)

    @model_validator(mode="after")
    def _plan_or_stages(self) -> "CascadeConfig":
        if self.plan and self.stages:
            raise ValueError("both `plan` and `stages` are set: keep one (a plan expands into stages)")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The stages to run: the listed ones, or the named plan's."""
        return self.stages if not self.plan else plan_stages(self.plan)

    def control_stages(self, lr: dict[str, float]) -> list[StageConfig]:
        """The student-alone control (`student_alone`), or []: learner `CONTROL_ROLE`, one stage
        per student stage, whose steps mirror that stage's without a teacher, each at the
        learning rate the student step has (`lr`: trainer.lr, per step kind). Each is scored
        where it ends, so every distilled student has the control at the same optimizer steps
        beside it: `student-alone-1` after the first student stage's steps, ..., and
        `student-alone` after all of them."""
        if not self.student_alone:
            return []
        student = [stage for stage in self.resolved_stages() if stage.learner == "student"]
        hops = student[0].hop_levels if student else None
        out = []
        for number, stage in enumerate(student, start=1):
            steps = [step.model_copy(update={"kind": ALONE_KIND.get(step.kind, step.kind), "loss": None, "lr": step.lr or lr[step.kind]})
                     for step in stage.steps]
            name = "student-alone" if number == len(student) else f"student-alone-{number}"
            out.append(StageConfig(name=name, learner=CONTROL_ROLE, teacher=None, teachers=[], steps=steps, hop_levels=hops))
        return out


def default_weights(kind: str):
    """Seed 001: PT/FT/SFT train on the task loss alone; DPT and DFT use the LLaVA-KD loss
    task + output + visual_kl + visual_relation, all weights 1."""
    from ckd_ray.losses.config import LossWeights

    if kind in DISTILLATION_STEPS:
        return LossWeights(task=1.0, output=1.0, visual_kl=1.0, visual_relation=1.0)
    return LossWeights(task=1.0)


def effective_loss(job_loss: LossConfig, stage: StageConfig, step: StepConfig) -> LossConfig:
    """The loss a step trains with: the step's override, else the stage's, else the job's; the
    weights default to the step type's (non-distillation steps always use the task loss alone)."""
    chosen = step.loss or stage.loss or job_loss
    if step.kind not in DISTILLATION_STEPS:
        return chosen.model_copy(update={"weights": default_weights(step.kind)})
    if chosen.weights is None:
        return chosen.model_copy(update={"weights": default_weights(step.kind)})
    return chosen


def plan_stages(plan: str) -> list[StageConfig]:
    """The stages of a named plan (seed 001's method and baselines, seed 000's curriculum)."""
    kd = ["DPT", "SFT", "DFT"]
    if plan == "bottom_up":
        return [StageConfig(teacher="ta", steps=kd), StageConfig(teacher="teacher", steps=kd)]
    if plan == "single_teacher":
        return [StageConfig(teacher="teacher", steps=kd)]
    if plan == "top_down":
        return [StageConfig(learner="ta", teacher="teacher", steps=kd), StageConfig(teacher="ta", steps=kd)]
    if plan == "student_only":
        return [StageConfig(steps=["PT", "FT"])]
    if plan == "progressive":
        # Stage 1 aligns on hop-0 questions (no external facts), then single-hop, then multi-hop.
        return [
            StageConfig(name="progressive-1-hop0", teacher="teacher", steps=["DPT", "SFT", "DFT"], hop_levels=[0]),
            StageConfig(name="progressive-2-hop1", teacher="teacher", steps=["DFT"], hop_levels=[0, 1]),
            StageConfig(name="progressive-3-hop2", teacher="teacher", steps=["DFT"], hop_levels=[0, 1, 2]),
        ]
    if plan == "fused":
        return [StageConfig(teachers=["ta", "teacher"], steps=kd)]
    if plan == "end_to_end":
        return [StageConfig(name="end-to-end", teacher="teacher", steps=["DPT", "SFT", "DFT", "DFT", "DFT"])]
    raise ValueError(f"unknown plan {plan!r}: use one of {PLAN_NAMES}")
