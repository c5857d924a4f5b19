"""Answer scoring against hand-computed figures."""

import numpy as np
import pytest

from ckd_ray.evaluate.run import knowledge_preservation
from ckd_ray.evaluate.scoring import (
    baseline_scores,
    headline_name,
    choice_letter,
    exact_match,
    normalize_answer,
    pope_average_f1,
    pope_f1,
    score_records,
    vqa_soft_accuracy,
)


def test_normalize_and_exact_match():
    assert normalize_answer(" The Seven. ") == "7"
    assert exact_match("seven", "7") and exact_match("Yes.", "yes") and not exact_match("8", "7")


def test_pope_f1_by_hand():
    predictions = ["yes", "yes", "no", "no", "maybe"]
    references = ["yes", "no", "yes", "no", "yes"]
    # tp=1 fp=1 fn=2 -> precision 1/2, recall 1/3, F1 = 0.4; correct 2/5
    scores = pope_f1(predictions, references)
    assert scores["f1"] == pytest.approx(0.4)
    assert scores["accuracy"] == pytest.approx(0.4)
    assert scores["yes_ratio"] == pytest.approx(0.4)
    assert pope_average_f1({"random": (["yes"], ["yes"]), "adversarial": (["no"], ["yes"])})["average"] == pytest.approx(0.5)


def test_choice_letter_and_vqa_soft_accuracy():
    assert choice_letter("(b) seven") == "B" and choice_letter("C.") == "C" and choice_letter("") is None
    humans = ["two"] * 2 + ["2"] + ["three"] * 7
    # "2" normalizes like "two": 3 of 10 humans; leave-one-out: 3 subsets with 2 matches, 7 with 3.
    assert vqa_soft_accuracy("2", humans) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_soft_accuracy("three", humans) == pytest.approx(1.0)


def test_score_records_per_type_and_hop():
    records = [
        {"question_type": "open", "hop": 0, "answer": "7", "prediction": "7"},
        {"question_type": "open", "hop": 1, "answer": "8", "prediction": "9"},
        {"question_type": "yes_no", "hop": 1, "answer": "yes", "prediction": "yes"},
        {"question_type": "yes_no", "hop": 2, "answer": "no", "prediction": "yes"},
        {"question_type": "multiple_choice", "hop": 2, "answer": "B", "prediction": "B"},
    ]
    scores = score_records(records)
    assert scores["open_em"] == 0.5
    assert scores["yes_no_acc"] == 0.5
    # F1 of "yes": tp=1 fp=1 fn=0 -> 2/3; of "no": tp=0 -> 0; macro: 1/3
    assert scores["yes_no_macro_f1"] == pytest.approx(1 / 3) and scores["yes_ratio"] == 1.0
    assert scores["mc_acc"] == 1.0
    assert scores["hop0_acc"] == 1.0 and scores["hop1_acc"] == 0.5 and scores["hop2_acc"] == 0.5
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["average"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert "grounded" not in scores and headline_name(scores) == "average"  # no question-only answers known


def _benchmark_like(n: int = 120) -> list[dict]:
    """Balanced records as the benchmark's test split has them, with the baselines' answers: the
    question-only answerer knows the template's majority (a fixed open answer, yes, A)."""
    records = []
    for i in range(n):
        kind = ("open", "yes_no", "multiple_choice")[i % 3]
        answer = {"open": str(i // 3 % 4), "yes_no": ("yes", "no")[i // 3 % 2], "multiple_choice": "ABCD"[i // 3 % 4]}[kind]
        text_only = {"open": "0", "yes_no": "yes", "multiple_choice": "A"}[kind]
        chance = {"open": 0.25, "yes_no": 0.5, "multiple_choice": 0.25}[kind]
        records.append({"sample_id": f"s{i:03d}", "question_type": kind, "hop": i % 3, "answer": answer,
                        "baseline_question_only": text_only, "baseline_majority": text_only, "baseline_chance": chance})
    return records


def _grounded_float64(records: list[dict]) -> float:
    """The headline by its definition, in float64 numpy: per type, clip((acc - qo) / (1 - qo), 0), averaged."""
    parts = []
    for kind in ("open", "yes_no", "multiple_choice"):
        rows = [r for r in records if r["question_type"] == kind]
        acc = np.mean([float(score_records([r])["accuracy"]) for r in rows], dtype=np.float64)
        qo = np.mean([float(score_records([{**r, "prediction": r["baseline_question_only"]}])["accuracy"]) for r in rows], dtype=np.float64)
        parts.append(max(0.0, (acc - qo) / (1 - qo)))
    return float(np.mean(parts))


def test_constant_and_question_only_answerers_score_zero_on_the_headline_and_a_perfect_one_one():
    records = _benchmark_like()
    for constant in ("yes", "no", "A", "B", "1", "0"):
        scores = score_records([{**r, "prediction": constant} for r in records])
        assert scores["grounded"] == 0.0, constant
    question_only = score_records([{**r, "prediction": r["baseline_question_only"]} for r in records])
    assert question_only["grounded"] == 0.0 and question_only["margin"] == 0.0
    perfect = score_records([{**r, "prediction": r["answer"]} for r in records])
    assert perfect["grounded"] == 1.0 and perfect["margin"] == pytest.approx(1 - perfect["question_only_acc"])
    rng = np.random.default_rng(3)
    noisy = [{**r, "prediction": r["answer"] if rng.random() < 0.7 else "x"} for r in records]
    assert score_records(noisy)["grounded"] == pytest.approx(_grounded_float64(noisy), abs=1e-12)
    assert headline_name(score_records(noisy)) == "grounded"


def test_baseline_rows_score_the_no_model_answers_on_the_same_records():
    records = _benchmark_like()
    rows = baseline_scores([{**r, "prediction": r["answer"]} for r in records])
    assert list(rows) == ["chance", "majority", "question_only"]
    assert rows["chance"]["yes_no_acc"] == 0.5 and rows["chance"]["mc_acc"] == 0.25 and rows["chance"]["open_em"] == 0.25
    assert rows["question_only"]["yes_no_acc"] == 0.5 and rows["question_only"]["mc_acc"] == 0.25
    assert all(row["grounded"] == 0.0 for row in rows.values())
    assert baseline_scores([{**r, "prediction": "x"} for r in [{"question_type": "open", "hop": 0, "answer": "1"}]]) == {}


def test_each_evaluation_set_is_scored_by_its_own_rules():
    records = [
        {"eval_set": "pope", "pope_strategy": "random", "question_type": "yes_no", "hop": 0, "answer": "yes", "prediction": "yes"},
        {"eval_set": "pope", "pope_strategy": "random", "question_type": "yes_no", "hop": 0, "answer": "no", "prediction": "yes"},
        {"eval_set": "pope", "pope_strategy": "adversarial", "question_type": "yes_no", "hop": 0, "answer": "yes", "prediction": "no"},
        {"eval_set": "vqa", "answers": ["two"] * 2 + ["2"] + ["three"] * 7, "question_type": "open", "hop": 0, "answer": "three",
         "prediction": "2"},
    ]
    scores = score_records(records)
    # POPE: random F1 = 2/3 (tp 1, fp 1), adversarial 0 -> mean 1/3; accuracy 1/3
    assert scores["pope/pope_f1"] == pytest.approx(1 / 3) and scores["pope/accuracy"] == pytest.approx(1 / 3)
    assert scores["vqa/vqa_acc"] == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10) and scores["vqa/accuracy"] == 0.0
    assert not any("/" in key for key in score_records([{**r, "eval_set": None} for r in records]))


def test_knowledge_preservation_is_the_student_share_and_undefined_without_teacher_score():
    assert knowledge_preservation({"average": 0.3, "accuracy": 0.2}, {"average": 0.6, "accuracy": 0.8}) == pytest.approx(0.5)
    assert knowledge_preservation({"grounded": 0.1, "average": 0.3}, {"grounded": 0.4, "average": 0.6}) == pytest.approx(0.25)
    assert knowledge_preservation({"accuracy": 0.2}, {"accuracy": 0.8}, metric="accuracy") == pytest.approx(0.25)
    assert knowledge_preservation({"average": 0.3}, {"average": 0.0}) is None  # a teacher scoring 0 preserves nothing measurable
