"""Statistics of a comparison table: mean and spread over seeds, and a paired bootstrap of the
difference between two rows on the same test samples.

The bootstrap resamples test samples (the same draw for both rows and every seed: the rows
answered the same questions) and recomputes the benchmark's headline (`grounded`, or `average`
where no question-only answers are known, as `score_records` does) from per-sample columns, so a
draw costs a few matrix products instead of re-scoring every record.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean, stdev

import numpy as np

from ckd_ray.evaluate.scoring import BASELINE_FIELDS, QUESTION_TYPES, _correct


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class AnswerColumns:
    """One model's answers as per-sample columns, in `sample_ids` order."""

    sample_ids: tuple[str, ...]
    correct: np.ndarray  # float64 0/1
    text_only: np.ndarray | None  # the question-only answerer's 0/1 on the same samples, where known
    is_type: dict[str, np.ndarray]  # question type -> 0/1 column

    @classmethod
    def of(cls, records: list[dict]) -> "AnswerColumns":
        """From evaluation records (`sample_id`, `question_type`, `answer`, `prediction`, and the
        question-only answer where known), sorted by sample id."""
        records = sorted(records, key=lambda r: str(r["sample_id"]))
        kind = np.array([r["question_type"] for r in records], dtype=object)
        field_name = BASELINE_FIELDS["question_only"]
        text_only = None
        if records and all(field_name in r for r in records):
            text_only = np.array([_correct({**r, "prediction": r[field_name]}) for r in records], dtype=np.float64)
        return cls(
            sample_ids=tuple(str(r["sample_id"]) for r in records),
            correct=np.array([_correct(r) for r in records], dtype=np.float64),
            text_only=text_only,
            is_type={t: (kind == t).astype(np.float64) for t in QUESTION_TYPES if (kind == t).any()},
        )

    def headline(self, weights_RN: np.ndarray) -> np.ndarray:
        """The headline score (`scoring.headline`) under each row of sample weights `[R, N]` (a
        bootstrap draw's counts; all ones gives `score_records`' own figure): `grounded` where the
        question-only answers are known, else `average`. A question type absent from the samples
        (or from a draw) is left out, as `score_records` leaves it out."""
        parts, present = [], []
        for column in self.is_type.values():
            count = weights_RN @ column
            accuracy = _ratio(weights_RN @ (self.correct * column), count)
            if self.text_only is not None:
                question_only = _ratio(weights_RN @ (self.text_only * column), count)
                accuracy = np.maximum(0.0, _ratio(accuracy - question_only, 1.0 - question_only))
            parts.append(accuracy)
            present.append(count > 0)
        if not parts:
            return _ratio(weights_RN @ self.correct, weights_RN.sum(axis=1))
        return _ratio(np.sum(parts, axis=0), np.sum(present, axis=0).astype(np.float64))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)


@dataclass(frozen=True)
class Difference:
    """Row A minus row B in the headline score, averaged over seeds, with its bootstrap interval."""

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
    """A paired bootstrap of `headline(A) - headline(B)`: each seed's records of both rows cover the
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
    per_seed = tuple(float(a.headline(ones)[0] - b.headline(ones)[0]) for a, b in zip(a_cols, b_cols))
    diffs = np.mean([a.headline(weights) - b.headline(weights) for a, b in zip(a_cols, b_cols)], axis=0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Difference(float(np.mean(per_seed)), float(low), float(high), float(np.mean(diffs <= 0)), per_seed, resamples, confidence)


__all__ = ["AnswerColumns", "Difference", "mean_spread", "paired_bootstrap"]
