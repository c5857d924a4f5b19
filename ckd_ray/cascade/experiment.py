"""`ckd-ray experiment`: every plan of both papers on one benchmark and budget, one comparison
table (seed 001's Tables 1 and 3: method, stages, per-metric scores, average; seed 000's Table 2:
accuracy and knowledge preservation after each curriculum stage vs end-to-end).

Teachers are prepared once per seed (TinyLLaVA recipe) and shared by every plan, so the plans
differ only in how the student learns.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Literal

from pydantic import Field, PrivateAttr

from ckd_ray import storage
from ckd_ray.cascade.config import PLAN_NAMES
from ckd_ray.config.base import Section
from ckd_ray.config.loader import ConfigError, Problem, deep_merge, read_yaml, validate_config

TABLE_METRICS = ("open_em", "yes_no_f1", "mc_acc", "hop0_acc", "hop1_acc", "hop2_acc", "average")


class ExperimentRun(Section):
    """One row of the table: a plan and its overrides of the base config."""

    name: str
    """Row label and run-folder suffix."""
    plan: Literal["bottom_up", "single_teacher", "top_down", "student_only", "progressive", "end_to_end"]
    """The cascade plan of this row."""
    method: str = ""
    """Method name shown in the table (default: the plan)."""
    overrides: dict = {}
    """Deep-merged over the base config for this row only."""


class ExperimentConfig(Section):
    """A comparison of plans on the same data, models and budget, over one or more seeds."""

    kind: Literal["experiment"]
    """Marks the file as an experiment (not a job config)."""
    name: str
    """Experiment name: its folder under the base config's storage.root."""
    base: str
    """Job config every run starts from (path relative to this file)."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Seeds; each runs every plan (scores are averaged over seeds)."""
    overrides: dict = {}
    """Deep-merged over the base config for every run (e.g. the step budget)."""
    runs: list[ExperimentRun] = Field(min_length=1)
    """The table's rows."""
    _command_overrides: list[str] = PrivateAttr(default_factory=list)
    """`--set` overrides of the command line, applied to every run last (see `load_experiment`)."""

    @property
    def command_overrides(self) -> list[str]:
        return self._command_overrides


def load_experiment(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, dict]:
    """The experiment and its base job config (raw, validated per run). `overrides` (`--set
    a.b=c`, as for a job) apply to every run's config, the teachers' preparation included, after
    the run's own overrides: `--set trainer.max_steps=2` shrinks every row."""
    from pydantic import ValidationError

    from ckd_ray.config.loader import _problems_from

    path = Path(path)
    raw = read_yaml(path)
    try:
        experiment = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc), str(path)) from None
    base = deep_merge(read_yaml(path.parent / experiment.base), experiment.overrides)
    if overrides:
        _apply(deep_merge(base, {}), overrides)  # a bad --set is named once, before the rows
        experiment._command_overrides = list(overrides)
    for run in experiment.runs:  # every row must be a valid job before anything runs
        validate_config(_run_config(base, experiment, run, 0, {"ta": "preset", "teacher": "preset"}), source=f"{path}: run {run.name}")
    return experiment, base


def _apply(raw: dict, overrides: list[str]) -> dict:
    from ckd_ray.config.loader import apply_override

    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def _run_config(base: dict, experiment: ExperimentConfig, run: ExperimentRun, seed: int, teachers: dict) -> dict:
    raw = _apply(deep_merge(base, run.overrides), experiment.command_overrides)
    raw["name"] = f"{experiment.name}-{run.name}-s{seed}"
    raw["seed"] = seed
    raw["cascade"] = {**raw.get("cascade", {}), "plan": run.plan, "prepare_teachers": False}
    raw["cascade"].pop("stages", None)
    models = dict(raw.get("models", {}))
    for role, uri in teachers.items():
        if uri != "preset":
            models[role] = {"path": uri}
    raw["models"] = models
    return raw


def _teacher_prep_config(base: dict, experiment: ExperimentConfig, seed: int) -> dict:
    raw = _apply(deep_merge(base, {}), experiment.command_overrides)
    raw["name"] = f"{experiment.name}-teachers-s{seed}"
    raw["seed"] = seed
    from ckd_ray.cascade.config import CascadeConfig

    steps = raw.get("cascade", {}).get("teacher_prep_steps", CascadeConfig.model_fields["teacher_prep_steps"].default)
    raw["cascade"] = {"prepare_teachers": False, "stages": [
        {"name": f"prepare-{role}", "learner": role, "steps": steps} for role in ("ta", "teacher")
    ]}
    return raw


def run_experiment(experiment: ExperimentConfig, base: dict, log=print) -> str:
    """Runs every (seed, plan) cascade (each resumable through its own manifest) and writes
    `table.md` and `table.json` into `<storage.root>/<experiment name>/`; returns the table URI."""
    from ckd_ray.cascade.manifest import Manifest
    from ckd_ray.cascade.runner import run_cascade

    rows: dict[str, list[dict]] = {run.name: [] for run in experiment.runs}
    budgets: dict[str, list[int]] = {run.name: [] for run in experiment.runs}
    stage_rows: dict[str, list[dict]] = {}
    teacher_scores = []
    for seed in experiment.seeds:
        prep = validate_config(_teacher_prep_config(base, experiment, seed))
        log(f"[experiment] seed {seed}: preparing the TA and the teacher ({prep.name})")
        run_cascade(prep, log=log)
        prepared = Manifest.open(prep.run_uri, prep)
        teachers = {role: prepared.roles[role] for role in ("ta", "teacher")}
        teacher_scores.append(prepared.evaluations["prepare-teacher (teacher)"]["scores"])
        for run in experiment.runs:
            job = validate_config(_run_config(base, experiment, run, seed, teachers))
            log(f"[experiment] seed {seed}: {run.name} ({run.plan})")
            run_cascade(job, log=log)
            manifest = Manifest.open(job.run_uri, job)
            student = [e for name, e in manifest.evaluations.items() if name.endswith("(student)")]
            rows[run.name].append(student[-1]["scores"])
            budgets[run.name].append(_student_steps(manifest))
            if run.plan in ("progressive", "end_to_end"):
                for name, entry in manifest.evaluations.items():
                    if name.endswith("(student)"):
                        stage_rows.setdefault(f"{run.name}: {name.removesuffix(' (student)')}", []).append(entry["scores"])
    root = storage.join(str(base.get("storage", {}).get("root", "runs")), experiment.name)
    teacher = {k: mean(s[k] for s in teacher_scores) for k in TABLE_METRICS if all(k in s for s in teacher_scores)}
    table = _table(experiment, rows, stage_rows, teacher, budgets)
    storage.write_bytes(storage.join(root, "table.md"), table.encode())
    storage.write_bytes(storage.join(root, "table.json"), json.dumps(
        {"seeds": experiment.seeds, "teacher": teacher, "rows": rows, "student_steps": budgets, "stages": stage_rows},
        indent=2).encode())
    log(table)
    return storage.join(root, "table.md")


def _student_steps(manifest) -> int:
    """Optimizer steps the student took over the whole plan: plans differ in how many steps they
    run, so the table shows each row's training budget next to its scores."""
    return int(sum(entry.get("metrics", {}).get("step", 0) for entry in manifest.steps.values() if entry.get("learner") == "student"))


def _table(experiment: ExperimentConfig, rows: dict, stage_rows: dict, teacher: dict, budgets: dict | None = None) -> str:
    stages = {"student_only": "-", "single_teacher": "T->S", "bottom_up": "TA->S, T->S", "top_down": "T->TA, TA->S",
              "progressive": "T->S (hop 0, <=1, all)", "end_to_end": "T->S (all hops)"}
    budgets = budgets or {}
    header = "| method | stages | student steps | " + " | ".join(TABLE_METRICS) + " | preservation |"
    lines = [f"# {experiment.name}", "", f"Seeds: {experiment.seeds}; scores on the benchmark's test split, mean over seeds; "
             "student steps: the student's optimizer steps over the whole plan.", "",
             header, "|---" * (len(TABLE_METRICS) + 4) + "|"]
    lines.append("| Teacher (prepared) | - | - | " + " | ".join(f"{teacher.get(m, 0):.3f}" for m in TABLE_METRICS) + " | 1.000 |")
    for run in experiment.runs:
        scores = {m: mean(s.get(m, 0.0) for s in rows[run.name]) for m in TABLE_METRICS}
        steps = f"{mean(budgets[run.name]):.0f}" if budgets.get(run.name) else "-"
        lines.append(f"| {run.method or run.plan} | {stages[run.plan]} | {steps} | " + " | ".join(f"{scores[m]:.3f}" for m in TABLE_METRICS)
                     + f" | {_preservation(scores['average'], teacher)} |")
    if stage_rows:
        lines += ["", "## Progressive curriculum (seed 000, Table 2 shape)", "", "| after | accuracy | average | preservation |", "|---|---|---|---|"]
        for name, scores in stage_rows.items():
            accuracy = mean(s["accuracy"] for s in scores)
            average = mean(s["average"] for s in scores)
            lines.append(f"| {name} | {accuracy:.3f} | {average:.3f} | {_preservation(average, teacher)} |")
    return "\n".join(lines) + "\n"


def _preservation(average: float, teacher: dict) -> str:
    """Seed 000's knowledge preservation (student / teacher average); "-" where the teacher scores 0."""
    return f"{average / teacher['average']:.3f}" if teacher.get("average") else "-"


def experiment_problems(path: str | Path) -> list[Problem]:
    try:
        load_experiment(path)
    except ConfigError as exc:
        return exc.problems
    return []


__all__ = ["ExperimentConfig", "ExperimentRun", "PLAN_NAMES", "load_experiment", "run_experiment"]
