"""The experiment's statistics against the plain scorer: the bootstrap's weighted headline is
`score_records` of the resampled records, computed another way (with and without the
question-only answers that make it `grounded`)."""

import numpy as np
import pytest

from ckd_ray.evaluate.scoring import headline, headline_name, score_records
from ckd_ray.evaluate.stats import AnswerColumns, mean_spread, paired_bootstrap


def _records(seed: int, n: int = 90, skill: float = 0.5, text_only: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        kind = ("open", "yes_no", "multiple_choice")[i % 3]
        right = rng.random() < skill
        if kind == "open":
            answer, prediction = str(i % 10), str(i % 10) if right else "none"
        elif kind == "yes_no":
            answer = "yes" if rng.random() < 0.5 else "no"
            prediction = answer if right else ("no" if answer == "yes" else "yes")
        else:
            answer, prediction = "B", "B" if right else "C"
        record = {"sample_id": f"s{i:03d}", "question_type": kind, "hop": i % 3, "answer": answer, "prediction": prediction}
        if text_only:  # a question-only answerer right about a third of the time
            record["baseline_question_only"] = answer if rng.random() < 0.35 else "none"
        records.append(record)
    return records


@pytest.mark.parametrize("text_only", [False, True])
def test_all_ones_weights_give_score_records_headline(text_only):
    records = _records(0, text_only=text_only)
    columns = AnswerColumns.of(records)
    assert headline_name(score_records(records)) == ("grounded" if text_only else "average")
    assert columns.headline(np.ones((1, len(records))))[0] == pytest.approx(headline(score_records(records)), abs=1e-12)


@pytest.mark.parametrize("text_only", [False, True])
def test_a_draws_weighted_headline_is_the_score_of_the_resampled_records(text_only):
    records = sorted(_records(1, text_only=text_only), key=lambda r: r["sample_id"])
    columns = AnswerColumns.of(records)
    rng = np.random.default_rng(7)
    for _ in range(5):
        draw = rng.integers(0, len(records), size=len(records))
        weights = np.bincount(draw, minlength=len(records)).astype(np.float64)[None, :]
        expected = headline(score_records([records[k] for k in draw]))
        assert columns.headline(weights)[0] == pytest.approx(expected, abs=1e-12)


def test_paired_bootstrap_of_a_row_against_itself_is_zero_and_never_better():
    runs = [_records(s) for s in range(3)]
    diff = paired_bootstrap(runs, runs, resamples=200)
    assert diff.observed == 0 and diff.low == 0 and diff.high == 0 and diff.p_not_better == 1.0


def test_paired_bootstrap_separates_a_clearly_better_row_and_reports_each_seed():
    better = [_records(s, n=300, skill=0.8) for s in range(3)]
    worse = [_records(s + 10, n=300, skill=0.4) for s in range(3)]
    diff = paired_bootstrap(better, worse, resamples=500)
    expected = [headline(score_records(a)) - headline(score_records(b)) for a, b in zip(better, worse)]
    assert diff.per_seed == pytest.approx(expected, abs=1e-12)
    assert diff.observed == pytest.approx(np.mean(expected), abs=1e-12)
    assert 0 < diff.low < diff.observed < diff.high and diff.p_not_better < 0.01


def test_paired_bootstrap_refuses_rows_scored_on_different_samples():
    a, b = _records(0), _records(1)
    b[0] = {**b[0], "sample_id": "other"}
    with pytest.raises(ValueError, match="different test samples"):
        paired_bootstrap([a], [b])
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap([a], [a, a])


def test_mean_spread():
    assert mean_spread([0.5]) == (0.5, 0.0)
    m, s = mean_spread([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and s == pytest.approx(0.1)
