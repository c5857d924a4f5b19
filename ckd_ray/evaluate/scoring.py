"""Scores of generated answers: accuracy per question type and hop level, yes/no macro-F1, the
headline `grounded` (accuracy above what the question alone earns); and the real benchmarks' rules (VQAv2 soft accuracy, POPE F1 over its three splits,
ScienceQA-IMG accuracy) for when their files are supplied locally."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence

from ckd_ray.data.baselines import BASELINE_FIELDS

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


QUESTION_TYPES = ("open", "yes_no", "multiple_choice")
TYPE_ACCURACY = {"open": "open_em", "yes_no": "yes_no_acc", "multiple_choice": "mc_acc"}


def score_records(records: Iterable[dict]) -> dict[str, float]:
    """Benchmark scores of records with `prediction`, `answer`, `question_type`, `hop`: accuracy
    per question type (`open_em`, `yes_no_acc`, `mc_acc`), yes/no macro-F1 over both classes,
    accuracy per hop level and overall, and `average`, the mean of the per-type accuracies.

    Where every record also carries the question-only answerer's answer (`baseline_question_only`,
    see `ckd_ray.data.baselines`): `question_only_acc` on the same records, `margin` (accuracy
    minus it) and the headline `grounded`, the accuracy above question-only normalised per type,
    `max(0, (acc - qo) / (1 - qo))`, averaged over types: 0 for any answerer that does not look at
    the image (a constant, the question-only answerer), 1 for one that is always right."""
    records = list(records)
    correct = [float(_correct(r)) for r in records]
    scores = _accuracies(records, correct)
    yes_no_rows = [r for r in records if r["question_type"] == "yes_no"]
    if yes_no_rows:
        scores["yes_no_macro_f1"] = yes_no_macro_f1([r["prediction"] for r in yes_no_rows], [r["answer"] for r in yes_no_rows])
        scores["yes_ratio"] = _mean(yes_no(r["prediction"]) == "yes" for r in yes_no_rows)
    field_name = BASELINE_FIELDS["question_only"]
    if records and all(field_name in r for r in records):
        text_only = [float(_correct({**r, "prediction": r[field_name]})) for r in records]
        scores.update(grounded_scores(records, correct, text_only))
    scores.update(set_scores(records))
    return scores


def set_scores(records: list[dict]) -> dict[str, float]:
    """Per evaluation set (records' `eval_set`, from `evaluation.sources`), `<set>/accuracy` and
    its benchmark's own figure where its records carry what that needs: POPE's mean F1 over its
    strategies (`<set>/pope_f1`, records with `pope_strategy`) and VQAv2's soft accuracy
    (`<set>/vqa_acc`, records with the ten human `answers`)."""
    by_set: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("eval_set"):
            by_set[str(record["eval_set"])].append(record)
    scores: dict[str, float] = {}
    for name, rows in sorted(by_set.items()):
        scores[f"{name}/accuracy"] = _mean(float(_correct(r)) for r in rows)
        if all(r.get("pope_strategy") for r in rows):
            by_strategy: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
            for r in rows:
                by_strategy[r["pope_strategy"]][0].append(r["prediction"])
                by_strategy[r["pope_strategy"]][1].append(r["answer"])
            scores[f"{name}/pope_f1"] = pope_average_f1(dict(by_strategy))["average"]
        if all(r.get("answers") for r in rows):
            scores[f"{name}/vqa_acc"] = _mean(vqa_soft_accuracy(r["prediction"], r["answers"]) for r in rows)
    return scores


def grounded_scores(records: list[dict], correct: list[float], text_only: list[float]) -> dict[str, float]:
    """`grounded`, `margin` and `question_only_acc` of per-record correctness `correct`, against
    the question-only answerer's per-record correctness `text_only` (see `score_records`)."""
    parts = []
    for kind in QUESTION_TYPES:
        rows = [i for i, r in enumerate(records) if r["question_type"] == kind]
        if rows:
            parts.append(grounded_part(_mean(correct[i] for i in rows), _mean(text_only[i] for i in rows)))
    question_only = _mean(text_only)
    return {"grounded": _mean(parts), "question_only_acc": question_only, "margin": _mean(correct) - question_only}


def grounded_part(accuracy: float, question_only: float) -> float:
    """One question type's share of `grounded`: accuracy above question-only, over what was left."""
    return max(0.0, (accuracy - question_only) / (1.0 - question_only)) if question_only < 1.0 else 0.0


def baseline_scores(records: list[dict]) -> dict[str, dict[str, float]]:
    """The no-model answerers' scores on the same records (each record carries their answers, see
    `BASELINE_FIELDS`): `question_only` and `majority` scored as if they were models; `chance` as
    the expected score of a uniform guess (its yes/no macro-F1 is its accuracy, 1/2)."""
    if not records or not all(f in r for r in records for f in BASELINE_FIELDS.values()):
        return {}
    out = {name: score_records([{**r, "prediction": r[BASELINE_FIELDS[name]]} for r in records]) for name in ("question_only", "majority")}
    expected = [float(r[BASELINE_FIELDS["chance"]]) for r in records]
    chance = _accuracies(records, expected)
    if "yes_no_acc" in chance:
        chance["yes_no_macro_f1"] = chance["yes_no_acc"]
    text_only = [float(_correct({**r, "prediction": r[BASELINE_FIELDS["question_only"]]})) for r in records]
    out["chance"] = {**chance, **grounded_scores(records, expected, text_only)}
    return {name: out[name] for name in ("chance", "majority", "question_only")}


def headline_name(scores: dict) -> str:
    """The one number a table leads with: `grounded` where the question-only answers were known,
    else `average` (data without a question-only answerer, e.g. a POPE or ScienceQA file)."""
    return "grounded" if "grounded" in scores else "average"


def headline(scores: dict) -> float:
    return float(scores.get(headline_name(scores), 0.0))


def describe_scores(scores: dict) -> str:
    """One line: the headline, the margin over question-only where known, accuracy, sample count."""
    name = headline_name(scores)
    margin = f", {scores['margin']:+.3f} over question-only" if "margin" in scores else ""
    return (f"{name} {scores.get(name, 0.0):.3f}{margin}, accuracy {scores.get('accuracy', 0.0):.3f} "
            f"on {int(scores.get('num_samples', 0))} samples")


def yes_no_macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean of the F1 of "yes" and the F1 of "no": answering one word to every probe earns at most 1/3."""
    parts = []
    for positive in ("yes", "no"):
        said = [yes_no(p) == positive for p in predictions]
        truth = [yes_no(r) == positive for r in references]
        tp = sum(s and t for s, t in zip(said, truth))
        denominator = sum(said) + sum(truth)
        parts.append(2 * tp / denominator if denominator else 0.0)
    return _mean(parts)


def _accuracies(records: list[dict], correct: list[float]) -> dict[str, float]:
    by_type: dict[str, list[float]] = defaultdict(list)
    by_hop: dict[int, list[float]] = defaultdict(list)
    for record, ok in zip(records, correct):
        by_type[record["question_type"]].append(ok)
        by_hop[int(record["hop"])].append(ok)
    scores: dict[str, float] = {}
    for kind, name in TYPE_ACCURACY.items():
        if by_type.get(kind):
            scores[name] = _mean(by_type[kind])
    for hop, oks in sorted(by_hop.items()):
        scores[f"hop{hop}_acc"] = _mean(oks)
    scores["accuracy"] = _mean(correct)
    per_type = [scores[name] for name in TYPE_ACCURACY.values() if name in scores]
    scores["average"] = _mean(per_type) if per_type else scores["accuracy"]
    scores["num_samples"] = float(len(correct))
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
