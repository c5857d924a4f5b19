"""`ckd-ray experiment`: every plan of both papers on one benchmark and budget, one comparison
table (seed 001's Tables 1 and 3: method, stages, per-metric scores, average; seed 000's Table 2:
accuracy and knowledge preservation after each curriculum stage vs end-to-end).

Teachers are prepared once (TinyLLaVA recipe, in a run named by a digest of its config, so an
unchanged recipe is never trained twice) and shared by every plan and seed, so the rows differ
only in how the student learns. Cells are mean +- spread over seeds; the differences the papers
claim get a paired bootstrap interval over the test samples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Literal

from pydantic import Field, PrivateAttr

from ckd_ray import storage
from ckd_ray.cascade.config import PLAN_NAMES
from ckd_ray.config.base import Section
from ckd_ray.config.loader import ConfigError, Problem, deep_merge, read_yaml, validate_config
from ckd_ray.evaluate.scoring import baseline_scores, headline
from ckd_ray.evaluate.stats import Difference, mean_spread, paired_bootstrap

TABLE_METRICS = ("grounded", "margin", "open_em", "yes_no_acc", "mc_acc", "hop0_acc", "hop1_acc", "hop2_acc")


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
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """Seeds of the student's runs; each runs every plan (cells: mean +- spread over seeds). The
    teachers are prepared once, with the first seed, and shared by every seed."""
    overrides: dict = {}
    """Deep-merged over the base config for every run (e.g. the step budget)."""
    student_steps: int | None = Field(None, ge=1)
    """Budget rule: every row's student gets this many optimizer steps in all, split evenly over
    the plan's student steps (a plan of 6 student steps runs 40 per step at 240; one of 2 runs
    120). A row's TA steps (top-down) run the same per-step count. `trainer.epochs` still applies:
    with a step budget a step reads budget / epochs distinct samples and passes over them
    `epochs` times, so set it high enough for the smallest data set a step reads (the table's
    "student steps" column shows what each row ran). None: the base config's per-step budget for
    every step (rows then differ in student steps)."""
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


def student_step_count(plan: str) -> int:
    """Training steps (PT, DPT, ...) in which a plan's student learns."""
    from ckd_ray.cascade.config import plan_stages

    return sum(len(stage.steps) for stage in plan_stages(plan) if stage.learner == "student")


def _run_config(base: dict, experiment: ExperimentConfig, run: ExperimentRun, seed: int, teachers: dict) -> dict:
    raw = deep_merge(base, run.overrides)
    if experiment.student_steps is not None:  # the budget rule, before `--set` (which may shrink it)
        count = student_step_count(run.plan)
        if experiment.student_steps % count:
            raise ConfigError([Problem("student_steps", f"{experiment.student_steps} does not split evenly over the "
                                       f"{count} student steps of row {run.name!r} ({run.plan})",
                                       "choose a multiple of every row's student step count (240 suits 2, 3, 5 and 6)")],
                              f"experiment {experiment.name}")
        raw["trainer"] = {**raw.get("trainer", {}), "max_steps": experiment.student_steps // count}
    raw = _apply(raw, experiment.command_overrides)
    raw["name"] = f"{experiment.name}-{run.name}-s{seed}"
    raw["seed"] = seed
    # A row's own control is the table's student-alone row, not a second run inside every row.
    raw["cascade"] = {**raw.get("cascade", {}), "plan": run.plan, "prepare_teachers": False, "student_alone": False}
    raw["cascade"].pop("stages", None)
    models = dict(raw.get("models", {}))
    for role, uri in teachers.items():
        if uri != "preset":
            models[role] = {"path": uri}
    raw["models"] = models
    return raw


def _teacher_prep_config(base: dict, experiment: ExperimentConfig) -> dict:
    """The run that prepares the TA and the teacher, once for every seed (the rows differ only in
    how the student learns). Its name carries a digest of its own config, so a changed recipe
    prepares new teachers and an unchanged one, in this experiment or a later one, reuses them."""
    raw = _apply(deep_merge(base, {}), experiment.command_overrides)
    raw["seed"] = experiment.seeds[0]
    from ckd_ray.cascade.config import CascadeConfig

    steps = raw.get("cascade", {}).get("teacher_prep_steps", CascadeConfig.model_fields["teacher_prep_steps"].default)
    steps = [s.model_dump(exclude_none=True) if hasattr(s, "model_dump") else s for s in steps]
    raw["cascade"] = {"prepare_teachers": False, "stages": [
        {"name": f"prepare-{role}", "learner": role, "steps": steps} for role in ("ta", "teacher")
    ]}
    from ckd_ray.cascade.manifest import config_hash

    raw["name"] = "teachers"
    digest = config_hash(validate_config(raw))[:10]  # what the run computes, as its manifest identifies it
    raw["name"] = f"teachers-{digest}"
    return raw


@dataclass
class _Row:
    """One row's results, one entry per seed."""

    scores: list[dict] = field(default_factory=list)
    records: list[list[dict]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)


def run_experiment(experiment: ExperimentConfig, base: dict, log=print) -> str:
    """Prepares the teachers once, runs every (seed, plan) cascade (each resumable through its
    own manifest), and writes `table.md` and `table.json` into `<storage.root>/<experiment
    name>/`: mean and spread over seeds, the paired bootstrap of the differences the papers
    claim, and the per-seed tables. Returns the table URI."""
    from ckd_ray.cascade.manifest import Manifest
    from ckd_ray.cascade.runner import run_cascade

    root = storage.join(str(base.get("storage", {}).get("root", "runs")), experiment.name)
    prep = validate_config(_teacher_prep_config(base, experiment))
    log(f"[experiment] teachers: {prep.name}, prepared once for seeds {experiment.seeds} (reused when an earlier run prepared them)")
    run_cascade(prep, log=log)
    prepared = Manifest.open(prep.run_uri, prep)
    teachers = {role: prepared.roles[role] for role in ("ta", "teacher")}
    prepared_scores = {role: prepared.evaluations[f"prepare-{role} ({role})"]["scores"] for role in ("ta", "teacher")}
    rows: dict[str, _Row] = {run.name: _Row() for run in experiment.runs}
    stage_rows: dict[str, list[dict]] = {}
    for seed in experiment.seeds:
        for run in experiment.runs:
            job = validate_config(_run_config(base, experiment, run, seed, teachers))
            log(f"[experiment] seed {seed}: {run.name} ({run.plan})")
            run_cascade(job, log=log)
            manifest = Manifest.open(job.run_uri, job)
            student = [e for name, e in manifest.evaluations.items() if name.endswith("(student)")][-1]
            row = rows[run.name]
            row.scores.append(student["scores"])
            row.records.append(_read_records(student["predictions_uri"]))
            row.steps.append(_student_total(manifest, "step"))
            row.samples.append(_student_total(manifest, "samples_seen"))
            if run.plan in ("progressive", "end_to_end"):
                for name, entry in manifest.evaluations.items():
                    if name.endswith("(student)"):
                        stage_rows.setdefault(f"{run.name}: {name.removesuffix(' (student)')}", []).append(entry["scores"])
    comparisons = _comparisons(experiment, rows)
    table = _table(experiment, rows, stage_rows, prepared_scores, comparisons)
    storage.write_bytes(storage.join(root, "table.md"), table.encode())
    storage.write_bytes(storage.join(root, "table.json"), json.dumps({
        "seeds": experiment.seeds, "teachers": {"run": prep.run_uri, "scores": prepared_scores},
        "rows": {name: {"scores": r.scores, "student_steps": r.steps, "samples_seen": r.samples} for name, r in rows.items()},
        "stages": stage_rows, "comparisons": {name: asdict(d) for name, d in comparisons.items()},
    }, indent=2).encode())
    log(table)
    return storage.join(root, "table.md")


def _read_records(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _student_total(manifest, metric: str) -> int:
    """Sum over the student's steps of a step's final metric (`step`: optimizer steps;
    `samples_seen`): plans differ in how many steps they run, so the table shows each row's
    training budget next to its scores."""
    return int(sum(entry.get("metrics", {}).get(metric, 0) for entry in manifest.steps.values() if entry.get("learner") == "student"))


# The differences the papers claim (seed 001: CKD over LLaVA-KD, bottom-up over top-down; seed 000:
# the progressive curriculum over end-to-end), as (A, B, claim) by plan.
CLAIMS = (
    ("bottom_up", "single_teacher", "LLaVA-CKD beats LLaVA-KD (seed 001, Table 1)"),
    ("bottom_up", "top_down", "bottom-up beats top-down (seed 001, Table 3)"),
    ("progressive", "end_to_end", "the progressive curriculum beats end-to-end (seed 000, Table 2)"),
)


def _comparisons(experiment: ExperimentConfig, rows: dict[str, _Row]) -> dict[str, Difference]:
    by_plan: dict[str, str] = {}
    for run in experiment.runs:
        by_plan.setdefault(run.plan, run.name)  # the first row of a plan is its method's row
    out = {}
    for a, b, claim in CLAIMS:
        if a in by_plan and b in by_plan:
            out[claim] = paired_bootstrap(rows[by_plan[a]].records, rows[by_plan[b]].records)
    return out


STAGES = {"student_only": "-", "single_teacher": "T->S", "bottom_up": "TA->S, T->S", "top_down": "T->TA, TA->S",
          "progressive": "T->S (hop 0, <=1, all)", "end_to_end": "T->S (all hops)"}


def _table(experiment: ExperimentConfig, rows: dict[str, _Row], stage_rows: dict, prepared: dict,
           comparisons: dict[str, Difference] | None = None) -> str:
    seeds = experiment.seeds
    teacher = prepared.get("teacher", {})
    first = next((r.records[0] for r in rows.values() if r.records), [])
    baselines = baseline_scores(first)  # the rows answered the same test samples
    header = "| method | stages | student steps | samples seen | " + " | ".join(TABLE_METRICS) + " | preservation |"
    rule = "|---|---|---:|---:|" + "---:|" * (len(TABLE_METRICS) + 1)
    spread = " +- sample standard deviation over seeds" if len(seeds) > 1 else ""
    lines = [f"# {experiment.name}", "", f"Seeds: {seeds}; scores on the benchmark's test split, mean{spread}; "
             "student steps and samples seen: the student's optimizer steps and training samples over the whole plan; "
             "preservation: the student's headline over the prepared teacher's. `grounded` (the headline): accuracy above the "
             "question-only answerer per question type, as a share of what it left, averaged over types (0: no better than "
             "reading the question); `margin`: accuracy minus question-only accuracy.", "", header, rule]
    for name, scores in baselines.items():
        cells = " | ".join(f"{scores.get(m, 0):.3f}" for m in TABLE_METRICS)
        lines.append(f"| baseline: {name.replace('_', '-')} | - | - | - | {cells} | - |")
    for role, label in (("teacher", "Teacher (prepared)"), ("ta", "TA (prepared)")):
        if role in prepared:
            cells = " | ".join(f"{prepared[role].get(m, 0):.3f}" for m in TABLE_METRICS)
            lines.append(f"| {label} | - | - | - | {cells} | {_preservation(headline(prepared[role]), teacher)} |")
    for run in experiment.runs:
        row = rows[run.name]
        cells = " | ".join(_cell([s.get(m, 0.0) for s in row.scores]) for m in TABLE_METRICS)
        mean_headline = mean(headline(s) for s in row.scores) if row.scores else 0.0
        steps = f"{mean(row.steps):.0f}" if row.steps else "-"
        samples = f"{mean(row.samples):,.0f}" if row.samples else "-"
        lines.append(f"| {run.method or run.plan} | {STAGES[run.plan]} | {steps} | {samples} | {cells} | {_preservation(mean_headline, teacher)} |")
    if comparisons:
        lines += ["", "## The papers' claims (paired bootstrap over test samples)", "",
                  "Difference in the headline `grounded` (A - B), mean over seeds; interval: 95% paired bootstrap (the same "
                  "resampled test samples for both rows and every seed); P(A <= B): share of draws in which A does not win.", "",
                  "| claim | A - B | 95% interval | P(A <= B) | per seed | holds here |", "|---|---:|---|---:|---|---|"]
        for claim, d in comparisons.items():
            holds = "yes" if d.low > 0 else ("no: B is ahead" if d.high < 0 else "not separable")
            per_seed = ", ".join(f"{x:+.3f}" for x in d.per_seed)
            lines.append(f"| {claim} | {d.observed:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] | {d.p_not_better:.3f} | {per_seed} | {holds} |")
    if stage_rows:
        lines += ["", "## Progressive curriculum (seed 000, Table 2 shape)", "", "| after | accuracy | grounded | preservation |", "|---|---|---|---|"]
        for name, scores in stage_rows.items():
            headlines = [headline(s) for s in scores]
            lines.append(f"| {name} | {_cell([s['accuracy'] for s in scores])} | {_cell(headlines)} | {_preservation(mean(headlines), teacher)} |")
    if len(seeds) > 1:
        for k, seed in enumerate(seeds):
            lines += ["", f"## Seed {seed}", "", "| method | " + " | ".join(TABLE_METRICS) + " |", "|---|" + "---:|" * len(TABLE_METRICS)]
            for run in experiment.runs:
                scores = rows[run.name].scores
                if k < len(scores):
                    lines.append(f"| {run.method or run.plan} | " + " | ".join(f"{scores[k].get(m, 0.0):.3f}" for m in TABLE_METRICS) + " |")
    return "\n".join(lines) + "\n"


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    m, s = mean_spread(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} +- {s:.3f}"


def _preservation(score: float, teacher: dict) -> str:
    """Seed 000's knowledge preservation (student / teacher headline); "-" where the teacher scores 0."""
    return f"{score / headline(teacher):.3f}" if teacher and headline(teacher) else "-"


def experiment_problems(path: str | Path) -> list[Problem]:
    try:
        load_experiment(path)
    except ConfigError as exc:
        return exc.problems
    return []


__all__ = ["ExperimentConfig", "ExperimentRun", "PLAN_NAMES", "load_experiment", "run_experiment"]
