"""Answerers that need no model, fit on a benchmark's training split: what a score must beat.

- `chance`: the expected accuracy of a uniform guess among a question's possible answers (yes/no:
  1/2; multiple choice: one over its options; open: one over the answers its template takes).
- `majority`: the most frequent training answer of the question's type ("yes", "B", "1").
- `question_only`: the most frequent training answer of the question's exact text (prompt without
  the image), else of its template: an answerer that reads everything but the image.
- `template`: the most frequent training answer of the question's template, its text with digits,
  number words and colour names hidden: knows only what kind of question it is.

`kvqa.build_kvqa` fits them on the training split, checks on the test split that reading the text
earns nothing the template does not (and that the template is at chance for yes/no and multiple
choice), and writes them to `baselines.json`; evaluations load that file to score each model's
records beside the baselines on the same records (`ckd_ray.evaluate.scoring`).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from ckd_ray import storage

BASELINES_FILE = "baselines.json"
# The field of an evaluation record (and row) that holds each baseline's answer (chance: its expected accuracy).
BASELINE_FIELDS = {"question_only": "baseline_question_only", "majority": "baseline_majority", "chance": "baseline_chance"}
_NUMBER_WORDS = "zero|one|two|three|four|five|six|seven|eight|nine|ten"
_COLOURS = "black|red|green|blue"
_HIDDEN = re.compile(rf"\b(\d+|{_NUMBER_WORDS}|{_COLOURS})\b", re.IGNORECASE)


def question_text(record: dict) -> str:
    """The record's first human turn without its image placeholder: all a text-only answerer sees."""
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def template_of(text: str) -> str:
    """The question's kind: its text with digits, number words and colour names replaced by `#`."""
    return _HIDDEN.sub("#", text)


def _majority(counter: Counter) -> str:
    # Ties go to the smallest answer string: the same answerer on every build.
    return min(counter.items(), key=lambda item: (-item[1], item[0]))[0]


@dataclass(frozen=True)
class TextAnswerers:
    """The no-model answerers of one benchmark, fit on its training records (see the module doc)."""

    by_text: dict[str, str]
    by_template: dict[str, str]
    by_type: dict[str, str]
    answers_by_template: dict[str, int]  # number of distinct answers each template takes (open chance)

    @classmethod
    def fit(cls, records: Iterable[dict]) -> "TextAnswerers":
        by_text: dict[str, Counter] = defaultdict(Counter)
        by_template: dict[str, Counter] = defaultdict(Counter)
        by_type: dict[str, Counter] = defaultdict(Counter)
        for record in records:
            text, answer = question_text(record), record["answer"]
            by_text[text][answer] += 1
            by_template[template_of(text)][answer] += 1
            by_type[record["question_type"]][answer] += 1
        return cls(
            by_text={text: _majority(c) for text, c in by_text.items()},
            by_template={template: _majority(c) for template, c in by_template.items()},
            by_type={kind: _majority(c) for kind, c in by_type.items()},
            answers_by_template={template: len(c) for template, c in by_template.items()},
        )

    def template(self, record: dict) -> str:
        text = question_text(record)
        return self.by_template.get(template_of(text), self.by_type.get(record["question_type"], ""))

    def question_only(self, record: dict) -> str:
        return self.by_text.get(question_text(record)) or self.template(record)

    def majority(self, record: dict) -> str:
        return self.by_type.get(record["question_type"], "")

    def chance(self, record: dict) -> float:
        """Expected accuracy of a uniform guess among the record's possible answers."""
        kind = record["question_type"]
        if kind == "yes_no":
            return 0.5
        if kind == "multiple_choice":
            return 1.0 / max(len(re.findall(r"^[A-Z]\. ", question_text(record), re.MULTILINE)), 1)
        return 1.0 / max(self.answers_by_template.get(template_of(question_text(record)), 1), 1)

    def to_json(self) -> dict:
        return {"by_text": self.by_text, "by_template": self.by_template, "by_type": self.by_type,
                "answers_by_template": self.answers_by_template}

    def answers(self, record: dict) -> dict:
        """This record's baseline answers, under the field names evaluation records carry them."""
        return {BASELINE_FIELDS["question_only"]: self.question_only(record), BASELINE_FIELDS["majority"]: self.majority(record),
                BASELINE_FIELDS["chance"]: self.chance(record)}

    def save(self, uri: str, records: Iterable[dict], check: dict | None = None) -> None:
        """Writes the answerers, and each of `records`' baseline answers by record id (the held-out
        splits: what evaluations look up), with the build check, as JSON."""
        samples = {r["id"]: self.answers(r) for r in records}
        body = {**self.to_json(), "samples": samples, "check": check or {}}
        storage.write_bytes(uri, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())


def load_sample_baselines(benchmark_root: str | None) -> dict[str, dict] | None:
    """Record id -> baseline answers of the held-out records of a benchmark folder (its
    `baselines.json`), or None where it has none (data that is not the bundled benchmark)."""
    if not benchmark_root:
        return None
    uri = storage.join(benchmark_root, BASELINES_FILE)
    return json.loads(storage.read_bytes(uri))["samples"] if storage.exists(uri) else None


def text_classifier_predictions(train: list[dict], test: list[dict]) -> list[str]:
    """A stronger text-only answerer for the build check: per question type, a logistic regression
    on the prompt's words and word pairs (digits and letters count as words), fit on `train`."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    predictions = [""] * len(test)
    for kind in sorted({r["question_type"] for r in test}):
        fit_rows = [r for r in train if r["question_type"] == kind]
        rows = [i for i, r in enumerate(test) if r["question_type"] == kind]
        answers = {r["answer"] for r in fit_rows}
        if len(answers) < 2:
            for i in rows:
                predictions[i] = next(iter(answers), "")
            continue
        vectorizer = CountVectorizer(token_pattern=r"(?u)\b\w+\b", ngram_range=(1, 2), binary=True)
        features = vectorizer.fit_transform([question_text(r) for r in fit_rows])
        model = LogisticRegression(max_iter=300, C=1.0).fit(features, [r["answer"] for r in fit_rows])
        for i, answer in zip(rows, model.predict(vectorizer.transform([question_text(test[i]) for i in rows]))):
            predictions[i] = str(answer)
    return predictions
