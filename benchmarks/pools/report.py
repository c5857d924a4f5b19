"""The benchmark's section of benchmarks/RESULTS.md: how it was run (command, machine, date,
versions), the table, the ratios and the per-sample costs the cluster arithmetic uses. The
section sits between two markers and is replaced on each run; prose around it is kept."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path

from benchmarks.pools.table import VARIANTS, find, group_rows, markdown_ratios, markdown_table, ratios

def markers(name: str) -> tuple[str, str]:
    """The comments around a section (`cpu` or `gpu`) that the command rewrites."""
    return (f"<!-- benchmarks.pools {name}: begin (written by python -m benchmarks.pools) -->",
            f"<!-- benchmarks.pools {name}: end -->")


def machine(accelerator: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), {mem_kib / 2**20:.0f} GiB RAM, {accelerator}; load average at the end {load}"


def versions() -> str:
    import deepspeed
    import ray
    import torch
    import transformers

    return (f"Python {platform.python_version()}, Ray {ray.__version__}, torch {torch.__version__}, "
            f"DeepSpeed {deepspeed.__version__}, transformers {transformers.__version__}")


def per_sample_costs(rows, teacher: str) -> dict[str, float]:
    """Milliseconds of the worker group's wall time per sample (workers in parallel): the
    student's compute alone ((d)'s time after its first batch, less its data waits), the
    teacher's forward inside the step ((a)'s compute less that), the pool's pass into the cache
    (its actor's start included), and a one-actor streamed pool's pace ((b) after its first batch)."""
    a, b, c, d = (find(rows, v, teacher) for v in "abcd")

    def compute_ms(row) -> float:
        return 1000 * statistics.median((r.train_s - r.data_wait_s) / r.samples for r in row.runs)

    out = {}
    if d:
        out["student step (compute)"] = compute_ms(d)
    if a and d:
        out["teacher forward inside the step"] = compute_ms(a) - compute_ms(d)
    if c:
        out["pool pass into the cache, 1 actor (start included)"] = 1000 * c.median("pass_s") / c.runs[0].samples
    if b:
        out["streamed pool, 1 actor, after the first batch"] = 1000 / b.rate
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_section(figures, scale, *, command: str, wall_s: float, measured_at: str, machine_text: str, marker: str = "cpu") -> str:
    from benchmarks.pools.matrix import CASCADE_NOTE

    rows = group_rows(figures)
    teachers = list(scale.steps)
    all_ratios = {t: ratios(rows, t, CASCADE_NOTE) for t in teachers}
    costs = {t: per_sample_costs(rows, t) for t in teachers}
    trainer, pool, signal = scale.trainer, scale.teacher_pool, scale.signal
    on_gpu = trainer.get("use_gpu", False)
    begin, end = markers(marker)
    lines = [
        begin,
        f"    {command}",
        "",
        f"Measured {measured_at} in {wall_s / 60:.1f} min (the whole command); {machine_text}. {versions()}.",
        f"{scale.num_workers} Ray Train worker(s) (DeepSpeed ZeRO-2, {trainer.get('precision', 'fp32')}, "
        f"{'NCCL' if on_gpu else 'gloo'}, {trainer.get('cpus_per_worker', 1)} CPU each"
        + (f", {trainer['resources']['GPU']} GPU each" if on_gpu else "") + f"), micro-batch {scale.micro_batch_size}, "
        f"sequences up to {scale.max_length} tokens, DFT loss (task + output + visual KL + visual relation); signal "
        f"top-{signal['response_top_k']} response + top-{signal['visual_top_k']} visual logits + Gram, bf16 unless "
        f"noted; teacher actors of {pool.get('num_cpus', 1)} CPU" + (f" and {pool['num_gpus']} GPU" if pool.get("num_gpus") else "")
        + ", batch " + str(pool.get("batch_size", 16)) + ". Optimizer steps per run: "
        + ", ".join(f"{t} {n}" for t, n in scale.steps.items()) + f"; {scale.runs} run(s) per variant (the gap-closing "
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
    lines.append(end)
    return "\n".join(lines)


def write_section(path: Path, section: str, marker: str = "cpu") -> None:
    """Replaces the text between the section's markers (or appends it under its own heading)."""
    begin, end = markers(marker)
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        heading = "Teacher pools vs a teacher inside the student's step" + (" (GPU)" if marker == "gpu" else "")
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text)
