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
    train_s: float
    """Rank 0's training + data-wait seconds after its first batch arrived."""
    data_wait_s: float
    """Of `train_s`, the seconds the student waited for its next batch."""
    first_batch_s: float
    """Seconds until the first batch arrived (the data pipeline's start, and a streamed pool's)."""
    pass_s: float
    """The teacher pass into the signal cache, before training (c only)."""
    late_samples: int
    late_s: float
    """Samples trained in the run's second half of optimizer steps, and its seconds (rank 0's
    step-end times): the steady rate, after a streamed pool has used up the lead it built while
    the student waited for its first batch."""
    late_wait_s: float
    """Of the second half's step times, rank 0's seconds waiting for data."""
    peak_rss_bytes: int
    """Peak resident set of the largest student worker process during the run."""
    actors_max: int
    """Most teacher actor processes alive at once during the run (and its pass)."""
    signal_bytes_per_sample: float
    note: str = ""

    @property
    def training_rate(self) -> float:
        return self.late_samples / self.late_s if self.late_s > 0 else self.samples / self.train_s

    @property
    def samples_per_s(self) -> float:
        """The student's steady rate; (c) also pays its teacher pass: its samples over the pass
        plus their training at the steady rate."""
        return self.samples / (self.pass_s + self.samples / self.training_rate)

    @property
    def wait_share(self) -> float:
        """Share of the student's steady time spent waiting for its next batch."""
        if self.late_s > 0:
            return self.late_wait_s / self.late_s
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
    def rate_range(self) -> tuple[float, float]:
        rates = [r.samples_per_s for r in self.runs]
        return min(rates), max(rates)

    def median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.runs)

    @property
    def peak_rss_bytes(self) -> int:
        """The lowest of the runs' peaks: a worker's heap grows by a few MiB with each step its
        group trains, so the run earliest in its group is the one comparable across groups."""
        return min(r.peak_rss_bytes for r in self.runs)


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
    """The issue's ratios for one teacher, from the median rates and peak RSS: (b)/(a), (b)/(d),
    (c)/(a) on samples/s, and the student worker's peak memory (b)/(a), also against the
    co-resident cascade row (TA and teacher both loaded) when `cascade_note` names it."""
    a, b, c, d = (find(rows, v, teacher) for v in "abcd")
    out: dict[str, float] = {}
    if a and b:
        out["(b)/(a) samples/s"] = b.rate / a.rate
        out["(b)/(a) student worker peak RSS"] = b.peak_rss_bytes / a.peak_rss_bytes
    if b and d:
        out["(b)/(d) samples/s"] = b.rate / d.rate
    if c and a:
        out["(c)/(a) samples/s"] = c.rate / a.rate
    cascade = find(rows, "a", teacher, cascade_note) if cascade_note else None
    if b and cascade:
        out["(b)/(a, TA + teacher co-resident) student worker peak RSS"] = b.peak_rss_bytes / cascade.peak_rss_bytes
    return out


HEADER = ("| variant | teacher | runs | samples / run | student samples/s, median (min-max) | waiting for data | "
          "first batch (s) | teacher pass (s) | student worker peak RSS, lowest run (MiB) | teacher actors alive (max) | signal bytes / sample |")


def markdown_table(rows: list[Row]) -> str:
    lines = [HEADER, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        low, high = row.rate_range
        label = row.variant + (f", {row.note}" if row.note else "")
        pass_s = f"{row.median('pass_s'):.1f}" if row.variant == "c" else "-"
        crossing = "" if row.variant != "a" else " (in-process)"
        lines.append(
            f"| {label} | {row.teacher} | {len(row.runs)} | {row.runs[0].samples} | {row.rate:.1f} ({low:.1f}-{high:.1f}) | "
            f"{row.median('wait_share'):.0%} | {row.median('first_batch_s'):.1f} | {pass_s} | "
            f"{row.peak_rss_bytes / MIB:.0f} | {max(r.actors_max for r in row.runs)} | "
            f"{row.median('signal_bytes_per_sample'):,.0f}{crossing} |"
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
