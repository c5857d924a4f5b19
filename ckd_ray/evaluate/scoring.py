"""Scores of generated answers: exact match, POPE-style yes/no F1, multiple-choice accuracy, per
hop level; and the real benchmarks' rules (VQAv2 soft accuracy, POPE F1 over its three splits,
ScienceQA-IMG accuracy) for when their files are supplied locally."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse spaces, number words to digits."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = _ARTICLES.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def yes_no(text: str) -> str | None:
    """The POPE reading of an answer: the first word if it is yes/no, else None (counted wrong)."""
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def pope_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """F1 with "yes" as the positive class (POPE), plus accuracy and the yes-ratio."""
    tp = fp = fn = correct = said_yes = 0
    for prediction, reference in zip(predictions, references):
        answer, truth = yes_no(prediction), yes_no(reference)
        said_yes += answer == "yes"
        correct += answer == truth
        tp += answer == "yes" and truth == "yes"
        fp += answer == "yes" and truth == "no"
        fn += answer != "yes" and truth == "yes"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = max(len(references), 1)
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": correct / total, "yes_ratio": said_yes / total}


def choice_letter(text: str) -> str | None:
    """The option letter a multiple-choice answer names ("B", "(b)", "B. seven" -> "B")."""
    match = re.match(r"\s*\(?([A-Za-z])\b", text)
    return match.group(1).upper() if match else None


def multiple_choice_correct(prediction: str, reference: str) -> bool:
    return choice_letter(prediction) is not None and choice_letter(prediction) == choice_letter(reference)


def vqa_soft_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-out subsets."""
    answer = normalize_answer(prediction)
    humans = [normalize_answer(h) for h in human_answers]
    if len(humans) <= 1:
        return float(bool(humans) and answer == humans[0])
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1 :]
        scores.append(min(sum(h == answer for h in others) / 3.0, 1.0))
    return sum(scores) / len(scores)


def pope_average_f1(by_split: dict[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, float]:
    """POPE's reported figure: F1 per split (random, popular, adversarial) and their mean."""
    scores = {split: pope_f1(p, r)["f1"] for split, (p, r) in by_split.items()}
    scores["average"] = sum(scores.values()) / max(len(scores), 1)
    return scores


def score_records(records: Iterable[dict]) -> dict[str, float]:
    """Benchmark scores of records with `prediction`, `answer`, `question_type`, `hop`:
    open-question exact match, yes/no F1, multiple-choice accuracy, accuracy per hop level and
    overall, and their `average` (seed 001's Avg column: mean of the per-type scores)."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    by_hop: dict[int, list[bool]] = defaultdict(list)
    correct_all = []
    for record in records:
        qtype = record["question_type"]
        by_type[qtype].append(record)
        ok = _correct(record)
        by_hop[int(record["hop"])].append(ok)
        correct_all.append(ok)
    scores: dict[str, float] = {}
    if by_type.get("open"):
        scores["open_em"] = _mean(_correct(r) for r in by_type["open"])
    if by_type.get("yes_no"):
        rows = by_type["yes_no"]
        scores["yes_no_f1"] = pope_f1([r["prediction"] for r in rows], [r["answer"] for r in rows])["f1"]
    if by_type.get("multiple_choice"):
        scores["mc_acc"] = _mean(_correct(r) for r in by_type["multiple_choice"])
    for hop, oks in sorted(by_hop.items()):
        scores[f"hop{hop}_acc"] = _mean(oks)
    scores["accuracy"] = _mean(correct_all)
    headline = [scores[k] for k in ("open_em", "yes_no_f1", "mc_acc") if k in scores]
    scores["average"] = _mean(headline) if headline else scores["accuracy"]
    scores["num_samples"] = float(len(correct_all))
    return scores


def _correct(record: dict) -> bool:
    if record["question_type"] == "multiple_choice":
        return multiple_choice_correct(record["prediction"], record["answer"])
    if record["question_type"] == "yes_no":
        return yes_no(record["prediction"]) == yes_no(record["answer"])
    return exact_match(record["prediction"], record["answer"])


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
