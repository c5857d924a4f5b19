"""PNG plots of a run: loss terms per optimizer step, scores per stage, teacher pool throughput."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on cluster nodes without a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_terms(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """One panel per step: every reported loss term against the optimizer step."""
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    columns = min(3, len(histories))
    rows = (len(histories) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, (step_id, history) in zip(axes.flat, histories.items()):
        terms = sorted({k[len("loss_"):] for h in history for k in h if k.startswith("loss_")})
        for term in terms:
            points = [(h["step"], h[f"loss_{term}"]) for h in history if f"loss_{term}" in h]
            ax.plot(*zip(*points), marker=".", label=term)
        ax.set_title(step_id, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(histories):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(evaluations: dict[str, dict], path: Path, metrics=("grounded", "open_em", "yes_no_acc", "mc_acc")) -> Path | None:
    """Grouped bars: each evaluated checkpoint (stage end, teachers) by metric."""
    if not evaluations:
        return None
    names = list(evaluations)
    metrics = [m for m in metrics if any(m in e for e in evaluations.values())]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) * len(metrics) / 2), 3.8))
    width = 0.8 / max(len(metrics), 1)
    for i, metric in enumerate(metrics):
        values = [evaluations[n].get(metric, 0.0) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=metric)
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(names))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pool_throughput(passes: list[dict], path: Path) -> Path | None:
    """Samples per second of each teacher pass (cache misses), by step."""
    passes = [p for p in passes if p.get("samples_per_s")]
    if not passes:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(passes)), 3.2))
    ax.bar(range(len(passes)), [p["samples_per_s"] for p in passes], color="tab:orange")
    ax.set_xticks(range(len(passes)), [p["step_id"] for p in passes], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("teacher samples / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PHASE_ORDER = ("data_planning", "teacher_pass", "worker_start", "engine_init", "first_batch_wait", "training", "data_wait",
               "reports", "checkpoint", "validation", "export", "other")


def plot_step_phases(phases_by_step: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Stacked horizontal bars: each step's wall time split into its phases (training is the
    optimizer steps themselves; the rest is what the step paid around them)."""
    phases_by_step = {k: v for k, v in phases_by_step.items() if v}
    if not phases_by_step:
        return None
    names = list(phases_by_step)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
    left = [0.0] * len(names)
    colors = plt.get_cmap("tab20").colors
    for i, phase in enumerate(PHASE_ORDER):
        widths = [phases_by_step[n].get(phase, 0.0) for n in names]
        if not any(widths):
            continue
        ax.barh(range(len(names)), widths, left=left, label=phase, color="tab:green" if phase == "training" else colors[i % 20])
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
