"""Answer scoring against hand-computed figures."""

import pytest

from ckd_ray.evaluate.run import knowledge_preservation
from ckd_ray.evaluate.scoring import (
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
    assert scores["yes_no_f1"] == pytest.approx(2 / 3)  # tp=1 fp=1 fn=0
    assert scores["mc_acc"] == 1.0
    assert scores["hop0_acc"] == 1.0 and scores["hop1_acc"] == 0.5 and scores["hop2_acc"] == 0.5
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["average"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_knowledge_preservation_is_the_student_share_and_undefined_without_teacher_score():
    assert knowledge_preservation({"average": 0.3, "accuracy": 0.2}, {"average": 0.6, "accuracy": 0.8}) == pytest.approx(0.5)
    assert knowledge_preservation({"accuracy": 0.2}, {"accuracy": 0.8}, metric="accuracy") == pytest.approx(0.25)
    assert knowledge_preservation({"average": 0.3}, {"average": 0.0}) is None  # a teacher scoring 0 preserves nothing measurable
