"""Evaluation sets in their published layouts, read (local or s3://) into the LLaVA-style records
the pipeline reads: `id`, `image`, `conversations` (a `<image>\\n` human turn and the gpt turn),
`question_type` (yes_no | multiple_choice | open), `answer`, `hop` 0 and `split`. A record also
keeps what its benchmark's scorer needs beyond `answer`: POPE's `pope_strategy` (F1 is reported
per strategy) and VQAv2's ten human `answers` (soft accuracy).

    POPE        coco_pope_{random,popular,adversarial}.json, JSON lines of
                {question_id, image, text, label: yes|no}; images are COCO val2014 file names
    ScienceQA   problems.json, {pid: {question, choices, answer: index, hint, image, split, ...}};
                a problem's image is <split>/<pid>/<image>; only problems with an image (-IMG)
    VQAv2       v2_OpenEnded_mscoco_<split>_questions.json ({questions: [{image_id, question,
                question_id}]}) with v2_mscoco_<split>_annotations.json ({annotations:
                [{question_id, multiple_choice_answer, answers: [{answer}], answer_type}]});
                images COCO_<split>_<image_id:012d>.jpg

Prompts follow LLaVA-1.5's evaluation: a short-answer instruction after POPE's and VQAv2's
questions, and ScienceQA's context, question and lettered options, answered by the letter.
"""

from __future__ import annotations

import io
import json

from ckd_ray import storage
from ckd_ray.data.llava_json import iter_json_records

POPE_STRATEGIES = ("random", "popular", "adversarial")
# What a record holds for its benchmark's scorer beyond `answer`.
RECORD_FIELDS = ("pope_strategy", "answers")
SCIENCEQA_SPLITS = ("train", "val", "test")
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


class EvaluationSetError(ValueError):
    """A published file that yields no usable records, or does not match its layout. `key` is
    the reader argument (and config key) at fault: `uri`, `split` or `annotations`."""

    def __init__(self, key: str, what: str, fix: str):
        super().__init__(f"{key}: {what}: {fix}")
        self.key, self.what, self.fix = key, what, fix


def pope_file(uri: str, strategy: str) -> str:
    """The published file of one POPE strategy in the folder `uri`."""
    return storage.join(uri, f"coco_pope_{strategy}.json")


def read_pope(uri: str, split: str | None = None) -> list[dict]:
    """The records of POPE's files in the folder `uri`: the strategy `split`, or all three
    (POPE's reported figure is their mean F1)."""
    records = []
    for strategy in (split,) if split else POPE_STRATEGIES:
        file = pope_file(uri, strategy)
        found = 0
        for line in iter_json_records(io.BytesIO(_read(file, "uri")), name=file):
            question = line.value
            label = str(question.get("label", "")).strip().lower() if question else ""
            if question is None or label not in ("yes", "no") or not {"question_id", "image", "text"} <= question.keys():
                raise EvaluationSetError("uri", f"{storage.redact(file)} has a line at byte {line.start} that is not a POPE "
                                         "question ({question_id, image, text, label: yes|no})",
                                         "restore the file from POPE's release")
            records.append(_record(
                f"pope-{strategy}-{question['question_id']}", question["image"], f"{question['text']}\n{SHORT_ANSWER}",
                answer=label, question_type="yes_no", split="test", pope_strategy=strategy,
            ))
            found += 1
        if not found:
            raise EvaluationSetError("uri", f"{storage.redact(file)} holds no questions",
                                     "restore it from POPE's release, or set split: to a strategy whose file you have")
    return records


def read_scienceqa(uri: str, split: str) -> list[dict]:
    """The ScienceQA-IMG records of `split` from the `problems.json` at `uri`: its problems that
    have an image, in file order; the answer is the option's letter."""
    problems = _read_json(uri, "uri")
    if not isinstance(problems, dict):
        raise EvaluationSetError("uri", f"{storage.redact(uri)} is not ScienceQA's problems.json (a JSON object of problems)",
                                 "point it at problems.json of ScienceQA's release")
    records = []
    for pid, problem in problems.items():
        if not isinstance(problem, dict) or problem.get("split") != split or not problem.get("image"):
            continue
        choices, answer = problem.get("choices"), problem.get("answer")
        if (not isinstance(problem.get("question"), str) or not isinstance(choices, list) or not isinstance(answer, int)
                or not 0 <= answer < len(choices)):
            raise EvaluationSetError("uri", f"problem {pid} of {storage.redact(uri)} lacks its `question`, `choices` "
                                     "or a valid `answer` index",
                                     "restore problems.json from ScienceQA's release")
        options = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(choices))
        context = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
        records.append(_record(
            f"scienceqa-{pid}", f"{split}/{pid}/{problem['image']}", f"{context}{problem['question']}\n{options}\n{LETTER_ANSWER}",
            answer=chr(ord("A") + answer), question_type="multiple_choice", split=split,
        ))
    if not records:
        found = sorted({p.get("split") for p in problems.values() if isinstance(p, dict) and p.get("image")} - {None})
        raise EvaluationSetError("split", f"no problem with an image has split {split!r} in {storage.redact(uri)}",
                                 f"use one of the splits it has: {', '.join(found)}" if found else
                                 "point uri at ScienceQA's problems.json (this one has no problem with an image)")
    return records


def read_vqav2(uri: str, annotations: str, split: str) -> list[dict]:
    """The VQAv2 records of the questions file at `uri` with their answers from `annotations`, in
    question order; `split` (e.g. val2014) names the COCO images. Every question must have its
    annotation: a question that cannot be scored is a mismatch of the two files."""
    questions = _read_json(uri, "uri")
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise EvaluationSetError("uri", f"{storage.redact(uri)} is not a VQAv2 questions file ({{\"questions\": [...]}})",
                                 f"point it at v2_OpenEnded_mscoco_{split}_questions.json")
    subtype = questions.get("data_subtype")
    if subtype is not None and subtype != split:
        raise EvaluationSetError("split", f"{split!r}, but {storage.redact(uri)} holds the questions of {subtype!r}",
                                 f"set split: {subtype}, or point uri at the questions of {split}")
    answered = _read_json(annotations, "annotations")
    if not isinstance(answered, dict) or not isinstance(answered.get("annotations"), list):
        raise EvaluationSetError("annotations", f"{storage.redact(annotations)} is not a VQAv2 annotations file "
                                 "({\"annotations\": [...]})", f"point it at v2_mscoco_{split}_annotations.json")
    by_question = {a.get("question_id"): a for a in answered["annotations"] if isinstance(a, dict)}
    records, unanswered = [], 0
    for question in questions["questions"]:
        if not isinstance(question, dict) or not {"question_id", "image_id", "question"} <= question.keys():
            raise EvaluationSetError("uri", f"{storage.redact(uri)} holds an entry that is not a VQAv2 question "
                                     f"({{image_id, question, question_id}}): {str(question)[:120]}",
                                     "restore the file from VQAv2's release")
        annotation = by_question.get(question["question_id"])
        if annotation is None:
            unanswered += 1
            continue
        if not isinstance(annotation.get("multiple_choice_answer"), str) or not isinstance(annotation.get("answers"), list):
            raise EvaluationSetError("annotations", f"the annotation of question {question['question_id']} in "
                                     f"{storage.redact(annotations)} has no `multiple_choice_answer` and `answers`",
                                     "restore the file from VQAv2's release")
        answer = annotation["multiple_choice_answer"]
        records.append(_record(
            f"vqav2-{question['question_id']}", f"COCO_{split}_{int(question['image_id']):012d}.jpg",
            f"{question['question']}\n{SHORT_ANSWER}", answer=answer,
            question_type="yes_no" if annotation.get("answer_type") == "yes/no" else "open",
            split=_held_out_split(split), answers=[a["answer"] for a in annotation["answers"] if isinstance(a, dict)],
        ))
    if unanswered:
        raise EvaluationSetError("annotations", f"{unanswered} of the {len(questions['questions'])} questions in "
                                 f"{storage.redact(uri)} have no annotation in {storage.redact(annotations)}",
                                 "give the annotations file of the same split as the questions")
    if not records:
        raise EvaluationSetError("uri", f"{storage.redact(uri)} holds no questions", "restore it from VQAv2's release")
    return records


def _record(sample_id: str, image: str, prompt: str, *, answer: str, question_type: str, split: str, **fields) -> dict:
    return {
        "id": sample_id,
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}],
        "question_type": question_type,
        "answer": answer,
        "hop": 0,
        "split": split,
        **fields,
    }


def _held_out_split(coco_split: str) -> str:
    """The record `split` of a COCO split name: val2014 -> val, test-dev2015 -> test."""
    return next((name for name in ("train", "val") if coco_split.startswith(name)), "test")


def _read(uri: str, key: str) -> bytes:
    if not storage.exists(uri):
        raise EvaluationSetError(key, f"{storage.redact(uri)} does not exist", "fix the path or URI")
    return storage.read_bytes(uri)


def _read_json(uri: str, key: str):
    data = _read(uri, key)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8
        what = "is empty" if not data.strip() else f"is not JSON ({err})"
        raise EvaluationSetError(key, f"{storage.redact(uri)} {what}", "restore the file from the benchmark's release") from None
