"""The tune run's outputs: the results table (Markdown and CSV, every trial, failed ones
included), a PNG per search of the metric against each searched value, and `tune_report.md`."""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the driver may run on a cluster node without a display
import matplotlib.pyplot as plt  # noqa: E402

from ckd_ray import storage  # noqa: E402
from ckd_ray.tune.trial import CACHE_HITS, TEACHER_PASSES, TRAIN_TASK_LOSS  # noqa: E402

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
REPORT = "tune_report.md"


def table_columns(outcomes, metric: str) -> list[str]:
    keys = list(dict.fromkeys(outcome.search.label(key) for outcome in outcomes for key in outcome.search.dims))
    extra = ["val_accuracy"] if metric != "val_accuracy" else []
    return (["search", "trial", "trial_id", "status", "stopped_early", "steps"] + keys
            + [metric, *extra, TRAIN_TASK_LOSS, CACHE_HITS, TEACHER_PASSES, "seconds", "error"])


def table_rows(outcomes, metric: str) -> list[dict]:
    """Flat rows: one per trial of every search, searched values as their own columns."""
    rows = []
    for outcome in outcomes:
        for row in outcome.rows:
            flat = {k: v for k, v in row.items() if k != "values"}
            flat.update({outcome.search.label(key): value for key, value in row["values"].items()})
            flat["stopped_early"] = row["status"] == "stopped early"
            rows.append(flat)
    return rows


def write_tune_report(tune_uri: str, job, outcomes, best_values: dict[int, dict[str, float]], best_config_name: str) -> str:
    """Writes results.csv, results.md, the plots and tune_report.md into `tune_uri` (local or
    s3://); returns the report's URI."""
    metric = job.tune.metric
    columns = table_columns(outcomes, metric)
    rows = table_rows(outcomes, metric)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        (out / RESULTS_CSV).write_text(buffer.getvalue())
        table = markdown_table(columns, rows)
        (out / RESULTS_MD).write_text(f"# Trials of `ckd-ray tune` for {job.name}\n\n" + "\n".join(table) + "\n")
        plots = {outcome.search.name: plot_metric_vs_values(outcome, metric, out / f"{outcome.search.folder}_{metric}_vs_values.png")
                 for outcome in outcomes}
        (out / REPORT).write_text("\n".join(_report_lines(job, outcomes, best_values, best_config_name, table, plots)))
        for file in out.iterdir():
            storage.write_bytes(storage.join(tune_uri, file.name), file.read_bytes())
    return storage.join(tune_uri, REPORT)


def markdown_table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return lines


def plot_metric_vs_values(outcome, metric: str, path: Path) -> Path | None:
    """One panel per searched value: the metric of every trial that validated against it, the
    best trial ringed. Trials stopped early or failed have no validation metric to plot."""
    points = [row for row in outcome.rows if row["status"] == "finished" and math.isfinite(row[metric])]
    keys = list(outcome.search.dims)
    if not points or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.scatter([row["values"][key] for row in points], [row[metric] for row in points], color="tab:blue")
        if outcome.best_values is not None:
            ax.scatter([outcome.best_values[key]], [outcome.best_metric], s=140, facecolors="none", edgecolors="tab:red", label="best")
            ax.legend(fontsize=7)
        if outcome.search.dims[key].log:
            ax.set_xscale("log")
        ax.set_xlabel(outcome.search.label(key))
        ax.set_ylabel(metric)
    not_plotted = len(outcome.rows) - len(points)
    fig.suptitle(f"{outcome.search.name}: {len(points)} trials" + (f" ({not_plotted} stopped early or failed, not plotted)" if not_plotted else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def append_comparison(report_uri: str, runs: dict) -> None:
    """Adds to the tune report the student of each cascade in `runs` (label -> (job, result)), as
    scored after each stage on the held-out split: the headline, the margin over question-only,
    accuracy and each hop level, so a reader sees whether the tuned weights beat the untuned ones."""
    from ckd_ray.cascade.manifest import Manifest
    from ckd_ray.evaluate.scoring import headline_name

    rows = []
    for label, (job, result) in runs.items():
        manifest = Manifest.open(result.run_uri, job)
        for name, entry in manifest.evaluations.items():
            if name.endswith("(student)"):
                rows.append((label, name.removesuffix(" (student)"), entry["scores"]))
    hops = sorted({key for _, _, scores in rows for key in scores if key.startswith("hop")})
    headline = headline_name(rows[0][2]) if rows else "accuracy"
    lines = ["", "## Tuned against untuned", "",
             "The cascade with the best values and the same cascade with the configured weights, each student "
             f"scored after each stage on the held-out split (`{headline}` is the headline).", "",
             f"| run | after stage | {headline} | margin | accuracy | " + " | ".join(hops) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(hops)]
    for label, stage, scores in rows:
        lines.append(f"| {label} | {stage} | {_fmt(scores.get(headline))} | {_fmt(scores.get('margin'))} | "
                     f"{_fmt(scores.get('accuracy'))} | " + " | ".join(_fmt(scores.get(h)) for h in hops) + " |")
    final = {label: stage_rows[-1][2] for label in runs if (stage_rows := [r for r in rows if r[0] == label])}
    if len(final) == 2:
        gain = final["tuned"].get(headline, 0.0) - final["untuned"].get(headline, 0.0)
        lines += ["", f"Final student: tuned {final['tuned'].get(headline, 0.0):.3f} against untuned "
                  f"{final['untuned'].get(headline, 0.0):.3f} ({gain:+.3f}; one seed, so a difference of a few hundredths "
                  "may be noise: `ckd-ray experiment` gives intervals over seeds)."]
    storage.write_bytes(report_uri, storage.read_bytes(report_uri) + ("\n".join(lines) + "\n").encode())


def _report_lines(job, outcomes, best_values, best_config_name, table, plots) -> list[str]:
    tune = job.tune
    lines = [
        f"# Tune report: {job.name}", "",
        f"Mode `{tune.mode}`, searcher `{tune.searcher}`, {tune.num_samples} trials per search, "
        f"{tune.max_steps_per_trial} optimizer steps per distillation step of a trial; metric `{tune.metric}` ({tune.metric_mode}), "
        "measured on the validation split at the end of each trial.",
        f"ASHA stops trials on the training task loss, compared at equal optimizer steps (grace period {tune.grace_period} "
        f"steps, reduction factor {tune.reduction_factor}): the trainer validates once, at the end of a step.", "",
        "## Teacher signal", "",
        "Teacher pool passes and signal cache hits: before each search (and when a stage is then trained in full with "
        "its best values), and inside the trials.", "",
        "| search | teacher passes (driver) | cache hits (driver) | teacher passes (trials) | cache hits (trials) |",
        "|---|---:|---:|---:|---:|",
    ]
    for outcome in outcomes:
        s = outcome.signal
        lines.append(f"| {outcome.search.name} | {s['driver_teacher_passes']} | {s['driver_cache_hits']} | "
                     f"{s['trial_teacher_passes']} | {s['trial_cache_hits']} |")
    lines += ["", "## Trials", "", f"Also as [{RESULTS_CSV}]({RESULTS_CSV}) and [{RESULTS_MD}]({RESULTS_MD}).", "", *table, ""]
    failed = [row for outcome in outcomes for row in outcome.rows if row["status"] == "failed"]
    if failed:
        lines += ["## Failed trials", ""]
        lines += [f"- {row['search']} trial {row['trial']} ({row['trial_id']}): {row['error']}" for row in failed]
        lines += [""]
    lines += ["## Best values", ""]
    for stage_index, values in sorted(best_values.items()):
        lines.append(f"- stage {stage_index + 1}: " + ", ".join(f"{name} = {value:.4g}" for name, value in values.items()))
    lines += ["", f"The cascade config with these values: [{best_config_name}]({best_config_name}) "
              f"(`ckd-ray cascade {best_config_name}`, or `ckd-ray tune --run-best`).", "", "## Plots", ""]
    for name, path in plots.items():
        if path is not None:
            lines += [f"### {name}: {tune.metric} against each searched value", "", f"![{name}]({path.name})", ""]
    return lines


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "/")
