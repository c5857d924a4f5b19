"""Statistics of a comparison table: mean and spread over seeds, and a paired bootstrap of the
difference between two rows on the same test samples.

The bootstrap resamples test samples (the same draw for both rows and every seed: the rows
answered the same questions) and recomputes the benchmark's `average` (mean of open-question
exact match, yes/no F1 and multiple-choice accuracy, as `score_records` does) from per-sample
columns, so a draw costs two matrix products instead of re-scoring every record.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean, stdev

import numpy as np

from ckd_ray.evaluate.scoring import _correct, yes_no


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class AnswerColumns:
    """One model's answers as per-sample columns, in `sample_ids` order."""

    sample_ids: tuple[str, ...]
    correct: np.ndarray  # float64 0/1
    is_open: np.ndarray
    is_mc: np.ndarray
    is_yes_no: np.ndarray
    yes_no_tp: np.ndarray  # said yes, truth yes (yes/no rows only)
    yes_no_fp: np.ndarray  # said yes, truth no
    yes_no_fn: np.ndarray  # did not say yes, truth yes

    @classmethod
    def of(cls, records: list[dict]) -> "AnswerColumns":
        """From evaluation records (`sample_id`, `question_type`, `answer`, `prediction`), sorted by sample id."""
        records = sorted(records, key=lambda r: str(r["sample_id"]))
        kind = np.array([r["question_type"] for r in records], dtype=object)
        is_yes_no = kind == "yes_no"
        said = np.array([yes_no(r["prediction"]) == "yes" for r in records])
        truth = np.array([yes_no(r["answer"]) == "yes" for r in records])
        return cls(
            sample_ids=tuple(str(r["sample_id"]) for r in records),
            correct=np.array([_correct(r) for r in records], dtype=np.float64),
            is_open=(kind == "open").astype(np.float64),
            is_mc=(kind == "multiple_choice").astype(np.float64),
            is_yes_no=is_yes_no.astype(np.float64),
            yes_no_tp=(is_yes_no & said & truth).astype(np.float64),
            yes_no_fp=(is_yes_no & said & ~truth).astype(np.float64),
            yes_no_fn=(is_yes_no & ~said & truth).astype(np.float64),
        )

    def average(self, weights_RN: np.ndarray) -> np.ndarray:
        """The `average` score under each row of sample weights `[R, N]` (a bootstrap draw's counts;
        all ones gives `score_records`' own figure). A question type absent from the samples is
        left out, as `score_records` leaves it out."""
        parts = []
        if self.is_open.any():
            parts.append(_ratio(weights_RN @ (self.correct * self.is_open), weights_RN @ self.is_open))
        if self.is_yes_no.any():
            tp, fp, fn = weights_RN @ self.yes_no_tp, weights_RN @ self.yes_no_fp, weights_RN @ self.yes_no_fn
            parts.append(_ratio(2 * tp, 2 * tp + fp + fn))  # = 2PR / (P + R); 0 where tp = 0
        if self.is_mc.any():
            parts.append(_ratio(weights_RN @ (self.correct * self.is_mc), weights_RN @ self.is_mc))
        if not parts:
            return _ratio(weights_RN @ self.correct, weights_RN.sum(axis=1))
        return np.mean(parts, axis=0)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)


@dataclass(frozen=True)
class Difference:
    """Row A minus row B in `average`, averaged over seeds, with its bootstrap interval."""

    observed: float
    low: float
    high: float
    p_not_better: float
    """Fraction of draws in which A does not beat B (A - B <= 0): a one-sided bootstrap p-value."""
    per_seed: tuple[float, ...]
    resamples: int
    confidence: float


def paired_bootstrap(a_per_seed: list[list[dict]], b_per_seed: list[list[dict]], *, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> Difference:
    """A paired bootstrap of `average(A) - average(B)`: each seed's records of both rows cover the
    same test samples (matched by sample id); every draw resamples those samples once, for both
    rows and all seeds, and the difference is averaged over seeds."""
    if len(a_per_seed) != len(b_per_seed) or not a_per_seed:
        raise ValueError(f"both rows need the same seeds: {len(a_per_seed)} vs {len(b_per_seed)} runs")
    a_cols = [AnswerColumns.of(records) for records in a_per_seed]
    b_cols = [AnswerColumns.of(records) for records in b_per_seed]
    ids = a_cols[0].sample_ids
    for cols in a_cols + b_cols:
        if cols.sample_ids != ids:
            raise ValueError("the rows were scored on different test samples: a paired comparison needs the same ones")
    n = len(ids)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # each draw's counts per sample
    ones = np.ones((1, n), dtype=np.float64)
    per_seed = tuple(float(a.average(ones)[0] - b.average(ones)[0]) for a, b in zip(a_cols, b_cols))
    diffs = np.mean([a.average(weights) - b.average(weights) for a, b in zip(a_cols, b_cols)], axis=0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Difference(float(np.mean(per_seed)), float(low), float(high), float(np.mean(diffs <= 0)), per_seed, resamples, confidence)


__all__ = ["AnswerColumns", "Difference", "mean_spread", "paired_bootstrap"]
