"""The benchmark's section of benchmarks/RESULTS.md: how it was run (command, machine, date,
versions), the table, the ratios and the per-sample costs the cluster arithmetic uses. The
section sits between two markers and is replaced on each run; prose around it is kept."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from benchmarks.pools.table import VARIANTS, find, group_rows, markdown_ratios, markdown_table, ratios

BEGIN = "<!-- benchmarks.pools: begin (written by python -m benchmarks.pools) -->"
END = "<!-- benchmarks.pools: end -->"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), {mem_kib / 2**20:.0f} GiB RAM, no GPU; load average at the end {load}"


def versions() -> str:
    import deepspeed
    import ray
    import torch
    import transformers

    return (f"Python {platform.python_version()}, Ray {ray.__version__}, torch {torch.__version__}, "
            f"DeepSpeed {deepspeed.__version__}, transformers {transformers.__version__}")


def per_sample_costs(rows, teacher: str) -> dict[str, float]:
    """Milliseconds of the 2-worker group's time per sample: the student step alone (1/(d)),
    the teacher's forward when inside the step (1/(a) - 1/(d)), and the pool's pass into the
    cache per sample (its actor's start and model load included)."""
    a, c, d = (find(rows, v, teacher) for v in "acd")
    out = {}
    if d:
        out["student step"] = 1000 / d.rate
    if a and d:
        out["teacher forward inside the step"] = 1000 / a.rate - 1000 / d.rate
    if c:
        out["pool pass (1 actor)"] = 1000 * c.median("pass_s") / c.runs[0].samples
    return out


def render_section(figures, scale, *, command: str, wall_s: float) -> str:
    from benchmarks.pools.matrix import CASCADE_NOTE

    rows = group_rows(figures)
    teachers = list(scale.steps)
    all_ratios = {t: ratios(rows, t, CASCADE_NOTE) for t in teachers}
    costs = {t: per_sample_costs(rows, t) for t in teachers}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        BEGIN,
        f"    {command}",
        "",
        f"Measured {when} in {wall_s / 60:.1f} min (the whole command); {machine()}. {versions()}.",
        f"Student tiny-student, {scale.num_workers} Ray Train workers (DeepSpeed ZeRO-2, fp32, gloo), micro-batch "
        f"{scale.micro_batch_size}, sequences up to {scale.max_length} tokens, DFT loss (task + output + visual KL + "
        "visual relation); signal top-16 response + top-16 visual logits + Gram, bf16 unless noted; teacher pools of "
        "1 CPU per actor; local Ray with 8 logical CPUs. Optimizer steps per run: "
        + ", ".join(f"{t} {n}" for t, n in scale.steps.items()) + f"; {scale.runs} runs per variant (the gap-closing "
        "settings and the cascade row: 1 run).",
        "",
        "\n".join(f"- {text}" for text in VARIANTS.values()),
        "",
        markdown_table(rows),
        "",
        markdown_ratios(all_ratios),
        "",
        "Per-sample costs measured here (ms of the worker group's wall time per sample):",
        "",
        "| cost | " + " | ".join(teachers) + " |",
        "|---|" + "---:|" * len(teachers),
    ]
    names = list(dict.fromkeys(name for per in costs.values() for name in per))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{costs[t][name]:.1f}" if name in costs[t] else "-" for t in teachers) + " |")
    lines.append(END)
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replaces the text between the markers (or appends the section under its own heading)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Teacher pools vs a teacher inside the student's step\n\n" + section + "\n"
    path.write_text(text)
