"""The teacher-pool benchmark's arithmetic: per-run figures, medians over runs, the ratios and the
Markdown table. Pure functions of measured numbers (tested in tests/test_bench_pools.py)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

MIB = 2**20

# The four ways of feeding the student a teacher's signal, in table order.
VARIANTS = {
    "a": "(a) co-resident: teacher forward inside each student worker's step",
    "b": "(b) streamed pool: teacher actor pool as a Ray Data stage, cache off",
    "c": "(c) cached: one pool pass into the signal cache, then the student reads it",
    "d": "(d) limit: the student alone on precomputed signal (in the object store)",
}


@dataclass(frozen=True)
class RunFigures:
    """One measured training run (one step of a worker group)."""

    variant: str
    """a, b, c or d (see VARIANTS); a gap-closing or cascade run adds a note."""
    teacher: str
    samples: int
    """Samples the student trained on (all workers)."""
    first_batch_s: float
    """Rank 0's seconds until its first batch arrived: the data pipeline's start and, streamed,
    the pool's start and whatever it computes before its first output reaches the student."""
    train_s: float
    """Rank 0's training + data-wait seconds after its first batch."""
    data_wait_s: float
    """Of `train_s`, the seconds the student waited for its next batch."""
    pass_s: float
    """The teacher pass into the signal cache, before training (c only)."""
    peak_private_bytes: int
    """Peak private (anonymous) resident memory of the largest student worker during the run."""
    actors_max: int
    """Most teacher actor processes alive at once during the run (and its pass)."""
    signal_bytes_per_sample: float
    note: str = ""
    peak_gpu_bytes: int = 0
    """Most GPU memory torch allocated in the largest student worker during the run (0 on CPU)."""

    @property
    def samples_per_s(self) -> float:
        """The student's rate once data flows: its samples over its seconds after the first batch
        arrived; (c) also pays its teacher pass, its actor's start included."""
        return self.samples / (self.pass_s + self.train_s)

    @property
    def whole_run_samples_per_s(self) -> float:
        """The same with the wait for the first batch (the pipeline's and a streamed pool's
        start) counted: what a run this short costs. Worker start and engine build, paid alike
        by every variant, are left out."""
        return self.samples / (self.pass_s + self.first_batch_s + self.train_s)

    @property
    def wait_share(self) -> float:
        """Share of the student's time after its first batch spent waiting for data."""
        return self.data_wait_s / self.train_s if self.train_s else 0.0


@dataclass(frozen=True)
class Row:
    """A variant x teacher (x note) over its runs."""

    variant: str
    teacher: str
    note: str
    runs: list[RunFigures]

    @property
    def rate(self) -> float:
        return statistics.median(r.samples_per_s for r in self.runs)

    @property
    def whole_run_rate(self) -> float:
        return statistics.median(r.whole_run_samples_per_s for r in self.runs)

    @property
    def rate_range(self) -> tuple[float, float]:
        rates = [r.samples_per_s for r in self.runs]
        return min(rates), max(rates)

    def median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.runs)

    @property
    def peak_private_bytes(self) -> int:
        """The lowest of the runs' peaks (the run earliest in its group: a worker's heap can grow
        a little with each step its group trains)."""
        return min(r.peak_private_bytes for r in self.runs)

    @property
    def peak_gpu_bytes(self) -> int:
        return min(r.peak_gpu_bytes for r in self.runs)


def group_rows(runs: list[RunFigures]) -> list[Row]:
    """One row per (variant, teacher, note), in the order first seen."""
    keys: list[tuple[str, str, str]] = []
    for run in runs:
        key = (run.variant, run.teacher, run.note)
        if key not in keys:
            keys.append(key)
    return [Row(*key, [r for r in runs if (r.variant, r.teacher, r.note) == key]) for key in keys]


def find(rows: list[Row], variant: str, teacher: str, note: str = "") -> Row | None:
    return next((r for r in rows if (r.variant, r.teacher, r.note) == (variant, teacher, note)), None)


def ratios(rows: list[Row], teacher: str, cascade_note: str | None = None) -> dict[str, float]:
    """The issue's ratios for one teacher, from the median rates and peak memory: (b)/(a), (b)/(d),
    (c)/(a) on samples/s, and the student worker's peak memory (b)/(a), also against the
    co-resident cascade row (TA and teacher both loaded) when `cascade_note` names it."""
    a, b, c, d = (find(rows, v, teacher) for v in "abcd")
    out: dict[str, float] = {}
    if a and b:
        out["(b)/(a) samples/s"] = b.rate / a.rate
        out["(b)/(a) samples/s, whole runs"] = b.whole_run_rate / a.whole_run_rate
        out["(b)/(a) student worker peak memory"] = b.peak_private_bytes / a.peak_private_bytes
    if a and b and a.peak_gpu_bytes:
        out["(b)/(a) student worker peak GPU memory"] = b.peak_gpu_bytes / a.peak_gpu_bytes
    if b and d:
        out["(b)/(d) samples/s"] = b.rate / d.rate
    if c and a:
        out["(c)/(a) samples/s"] = c.rate / a.rate
    cascade = find(rows, "a", teacher, cascade_note) if cascade_note else None
    if b and cascade:
        out["(b)/(a, TA + teacher co-resident) student worker peak memory"] = b.peak_private_bytes / cascade.peak_private_bytes
    return out


HEADER = ("| variant | teacher | runs | samples / run | student samples/s after its first batch, median (min-max) | "
          "waiting for data | first batch (s) | whole-run samples/s | teacher pass (s) | student worker peak private memory (MiB) | teacher actors alive (max) | "
          "signal bytes / sample |")


def markdown_table(rows: list[Row]) -> str:
    on_gpu = any(row.peak_gpu_bytes for row in rows)
    header = HEADER + (" student worker peak GPU memory (GiB) |" if on_gpu else "")
    lines = [header, "|---|---|" + "---:|" * (10 + on_gpu)]
    for row in rows:
        low, high = row.rate_range
        label = row.variant + (f", {row.note}" if row.note else "")
        pass_s = f"{row.median('pass_s'):.1f}" if row.variant == "c" else "-"
        crossing = "" if row.variant != "a" else " (in-process)"
        lines.append(
            f"| {label} | {row.teacher} | {len(row.runs)} | {row.runs[0].samples} | {row.rate:.1f} ({low:.1f}-{high:.1f}) | "
            f"{row.median('wait_share'):.0%} | {row.median('first_batch_s'):.1f} | {row.whole_run_rate:.1f} | {pass_s} | "
            f"{row.peak_private_bytes / MIB:.0f} | {max(r.actors_max for r in row.runs)} | "
            f"{row.median('signal_bytes_per_sample'):,.0f}{crossing} |"
            + (f" {row.peak_gpu_bytes / 2**30:.2f} |" if on_gpu else "")
        )
    return "\n".join(lines)


def markdown_ratios(values: dict[str, dict[str, float]]) -> str:
    """`values`: teacher -> ratio name -> value."""
    names = list(dict.fromkeys(name for per_teacher in values.values() for name in per_teacher))
    teachers = list(values)
    lines = ["| ratio | " + " | ".join(teachers) + " |", "|---|" + "---:|" * len(teachers)]
    for name in names:
        cells = [f"{values[t][name]:.2f}" if name in values[t] else "-" for t in teachers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
