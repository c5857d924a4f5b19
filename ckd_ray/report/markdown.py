"""The Markdown run report: one table row per step, scores per evaluated checkpoint, plots."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ckd_ray import storage
from ckd_ray.report.plots import PHASE_ORDER, plot_loss_terms, plot_pool_throughput, plot_scores, plot_step_phases

# The headline first (`grounded`, see ckd_ray.evaluate.scoring), then the margin over question-only
# and the accuracies it is made of; `average` is the plain mean of the per-type accuracies.
SCORE_COLUMNS = ("grounded", "margin", "open_em", "yes_no_acc", "yes_no_macro_f1", "mc_acc", "hop0_acc", "hop1_acc", "hop2_acc",
                 "average", "parameters", "latency_s", "peak_memory_mb")
BASELINE_LABELS = {"chance": "baseline: chance", "majority": "baseline: majority per type", "question_only": "baseline: question-only"}


def write_report(run_uri: str, manifest, histories: dict[str, list[dict]], *, metrics_note: str = "",
                 command: dict | None = None) -> str:
    """Writes report.md and its PNGs into the run folder (local or s3://); returns the report URI.
    `command`: {"seconds": the command's wall time from Ray start to the report, "steps": the step
    ids it trained}, for the compute share over the whole command."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plots = {
            "loss terms per step": plot_loss_terms(histories, out / "loss_terms.png"),
            "scores per evaluated checkpoint": plot_scores(
                {**{BASELINE_LABELS[k]: v for k, v in getattr(manifest, "baselines", {}).items() if k != "chance"},
                 **{k: v["scores"] for k, v in manifest.evaluations.items()}}, out / "scores.png"),
            "teacher pool throughput": plot_pool_throughput(
                [{"step_id": k, **v.get("teacher_pass", {})} for k, v in manifest.steps.items()], out / "teacher_throughput.png"
            ),
            "where each step's time went": plot_step_phases(
                {k: v.get("phases", {}) for k, v in manifest.steps.items()}, out / "step_phases.png"
            ),
        }
        lines = [f"# Run report: {manifest.job}", "", f"Config hash `{manifest.config_hash}`; manifest: `manifest.json`.", ""]
        lines += _steps_table(manifest)
        lines += fusion_table(histories)
        lines += _phases_table(manifest, command)
        lines += _scores_table(manifest)
        if metrics_note:
            lines += ["## Metrics", "", metrics_note, ""]
        lines += ["## Plots", ""]
        for title, path in plots.items():
            if path is not None:
                lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
        (out / "report.md").write_text("\n".join(lines))
        for file in out.iterdir():
            storage.write_bytes(storage.join(run_uri, file.name), file.read_bytes())
    return storage.join(run_uri, "report.md")


def _steps_table(manifest) -> list[str]:
    lines = ["## Steps", "", "| step | stage | learner | teacher | status | optimizer steps | final loss | val loss | teacher signal | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for step_id, entry in manifest.steps.items():
        metrics = entry.get("metrics", {})
        signal = entry.get("teacher_pass", {}).get("source", "-")
        lines.append(
            f"| {step_id} | {entry.get('stage', '')} | {entry.get('learner', '')} | {entry.get('teacher') or '-'} | "
            f"{entry.get('status', '')} | {metrics.get('step', '')} | {_fmt(metrics.get('loss'))} | "
            f"{_fmt(metrics.get('val_loss'))} | {signal} | {_fmt(entry.get('seconds'))} |"
        )
    return lines + [""]


def fusion_table(histories: dict[str, list[dict]]) -> list[str]:
    """Steps with several teachers: each teacher's mean per-token weight in each fused term, over
    the step's reports (`fusion_<term>/<role>` metrics), so a reader sees which teacher taught what."""
    from ckd_ray.losses.composite import FUSION_PREFIX

    rows = []
    for step_id, history in histories.items():
        keys = sorted({key for report in history for key in report if key.startswith(FUSION_PREFIX)})
        for term in sorted({key[len(FUSION_PREFIX):].split("/", 1)[0] for key in keys}):
            weights = {}
            for key in keys:
                if key.startswith(f"{FUSION_PREFIX}{term}/"):
                    values = [report[key] for report in history if key in report]
                    weights[key.split("/", 1)[1]] = sum(values) / len(values)
            rows.append(f"| {step_id} | {term} | " + ", ".join(f"{role} {weight:.3f}" for role, weight in weights.items()) + " |")
    if not rows:
        return []
    return ["## Teacher weights (steps with several teachers)", "",
            "Mean per-token weight of each teacher in each fused term, over the step's reports (`loss.fusion`).", "",
            "| step | term | mean weight per teacher |", "|---|---|---|", *rows, ""]


def compute_share(steps: dict[str, dict]) -> float | None:
    """Time in optimizer steps over the wall time of the training steps (None: no phases recorded).
    Ray's start, the evaluations and the report are outside the steps: see `command_share`."""
    timed = [entry for entry in steps.values() if entry.get("phases") and entry.get("seconds")]
    if not timed:
        return None
    return sum(entry["phases"].get("training", 0.0) for entry in timed) / sum(entry["seconds"] for entry in timed)


def command_share(steps: dict[str, dict], command: dict | None) -> float | None:
    """Time in the optimizer steps of the steps a command trained over that command's wall time
    from Ray start to the report (None: unknown, or it trained nothing)."""
    if not command or not command.get("seconds") or not command.get("steps"):
        return None
    return sum(steps.get(step_id, {}).get("phases", {}).get("training", 0.0) for step_id in command["steps"]) / command["seconds"]


def _share_lines(steps: dict[str, dict], command: dict | None, share: float) -> list[str]:
    """The compute share both ways, the command's first, and the training done beside a running teacher pass."""
    timed = [entry for entry in steps.values() if entry.get("phases") and entry.get("seconds")]
    training = sum(entry["phases"].get("training", 0.0) for entry in timed)
    over_steps = (f"{100 * share:.0f}% of the steps' wall time ({training:.0f} s of {sum(e['seconds'] for e in timed):.0f} s; "
                  "Ray's start, the evaluations and the report are outside it)")
    whole = command_share(steps, command)
    if whole is None:
        lines = [f"compute share: {over_steps}"]
    else:
        lines = [f"compute share: **{100 * whole:.0f}% of this command's wall time** (its optimizer steps "
                 f"{sum(steps[s].get('phases', {}).get('training', 0.0) for s in command['steps'] if s in steps):.0f} s "
                 f"of {command['seconds']:.0f} s from Ray start to this report); {over_steps}"]
    beside = sum(entry.get("training_beside_pass_s", 0.0) for entry in timed)
    lines += ["", f"training beside a running teacher pass: {beside:.0f} s of the {training:.0f} s in optimizer steps "
              "(a pass beside the group shares its cores or GPUs, so those steps run slower)"]
    return lines


def _phases_table(manifest, command: dict | None = None) -> list[str]:
    share = compute_share(manifest.steps)
    if share is None:
        return []
    phases = [p for p in PHASE_ORDER if any(e.get("phases", {}).get(p) for e in manifest.steps.values())]
    lines = ["## Where the time went", "", *_share_lines(manifest.steps, command, share), "",
             "Seconds per phase of each step (training = the optimizer steps; worker_start is paid once per worker group).", "",
             "| step | " + " | ".join(phases) + " | total |", "|---" * (len(phases) + 2) + "|"]
    for step_id, entry in manifest.steps.items():
        values = entry.get("phases", {})
        lines.append(f"| {step_id} | " + " | ".join(f"{values.get(p, 0.0):.1f}" for p in phases) + f" | {_fmt(entry.get('seconds'))} |")
    return lines + [""]


def _scores_table(manifest) -> list[str]:
    if not manifest.evaluations:
        return []
    models = {name: (entry["scores"], entry.get("knowledge_preservation")) for name, entry in manifest.evaluations.items()}
    lines = ["## Scores (test split)", "", *HEADLINE_NOTE, "", *scores_table(models, getattr(manifest, "baselines", {}))]
    if any(name.startswith("student-alone") for name in models):
        lines += ["", "`student-alone` (the control): the same student trained without a teacher through the same steps and "
                  "optimizer steps as the distilled student's; `student-alone-N`: through the steps of the "
                  "student's first N stages only, beside the student after its stage N."]
    if any("predictions_uri" in entry for entry in manifest.evaluations.values()):
        lines += ["", "Every answer with its reference: `evaluations/<checkpoint>.jsonl` (one JSON record per sample)."]
    return lines + [""]


HEADLINE_NOTE = (
    "`grounded` (the headline): accuracy above the question-only answerer (an answerer fit on the training "
    "split that reads the question but never the image), per question type, as a share of what it left: "
    "`max(0, (acc - qo) / (1 - qo))`, averaged over types. 0 = no better than reading the question; 1 = always right. "
    "`margin`: accuracy minus question-only accuracy on the same samples.",
)


def scores_table(models: dict[str, tuple[dict, float | None]], baselines: dict[str, dict]) -> list[str]:
    """A Markdown table: the no-model baselines' rows first (where known), then one row per model
    (name -> (scores, knowledge preservation or None))."""
    columns = [c for c in SCORE_COLUMNS if any(c in s for s, _ in models.values()) or any(c in s for s in baselines.values())]
    columns += sorted({key for s, _ in models.values() for key in s if "/" in key})  # per evaluation set
    lines = ["| checkpoint | " + " | ".join(columns) + " | preservation |", "|---" * (len(columns) + 2) + "|"]
    rows = [(BASELINE_LABELS.get(name, name), scores, None) for name, scores in baselines.items()]
    rows += [(name, scores, preservation) for name, (scores, preservation) in models.items()]
    for name, scores, preservation in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(scores.get(c)) for c in columns) + f" | {_fmt(preservation)} |")
    return lines


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
