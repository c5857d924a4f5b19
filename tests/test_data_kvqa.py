"""The bundled digits benchmark: built by the CLI, counts consistent with
its files, deterministic, splits by image, facts in the prompt only for knowledge questions, and a
processor folder that plain transformers loads with the fixed special-token ids."""

from __future__ import annotations

import json
import re
from collections import Counter

from click.testing import CliRunner


def _records(root, kind):
    return json.loads((root / f"{kind}.json").read_text())


def test_cli_builds_benchmark_with_consistent_summary(tmp_path, kvqa_dir):
    from ckd_ray.cli import main

    out = tmp_path / "kvqa"
    result = CliRunner().invoke(main, ["data", "build-kvqa", str(out), "--coverage", "0.5"])
    assert result.exit_code == 0, result.output
    # One progress line per phase on stderr; the summary table on stdout.
    assert sum(line.startswith("[kvqa]") for line in result.stderr.splitlines()) == 6
    assert "[kvqa] 4/6 text-only check: passed" in result.stderr
    for row in ("captions", "instructions", "hop 0", "hop 1", "hop 2", "open", "yes_no", "multiple_choice", "tokenizer:",
                "text-only check on", "question_only", "text_classifier", "template"):
        assert row in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    captions, instructions = _records(out, "captions"), _records(out, "instructions")
    counts = summary["counts"]
    assert counts["captions"] == dict(Counter(r["split"] for r in captions))
    assert counts["instructions"] == dict(Counter(r["split"] for r in instructions))
    for hop in (0, 1, 2):
        assert counts[f"  hop {hop}"] == dict(Counter(r["split"] for r in instructions if r["hop"] == hop))
    for kind in ("open", "yes_no", "multiple_choice"):
        assert counts[f"  {kind}"] == dict(Counter(r["split"] for r in instructions if r["question_type"] == kind))
    # The per-hop and per-type rows each add up to the instruction totals, split by split.
    for split in ("train", "val", "test"):
        assert sum(counts[f"  hop {h}"][split] for h in (0, 1, 2)) == counts["instructions"][split]
        assert sum(counts[f"  {k}"][split] for k in ("open", "yes_no", "multiple_choice")) == counts["instructions"][split]
    assert summary["num_images"] == len(captions) == len(list((out / "images").glob("*.png"))) == 1797
    assert summary["vocab_size"] <= 512
    total = sum(counts["instructions"].values())
    assert f"{'instructions':<28}" + "".join(f"{counts['instructions'][s]:>8}" for s in ("train", "val", "test")) + f"{total:>8}" in result.stdout

    # Same seed: same images, captions and graph as the session fixture's `build_kvqa(out, seed=0)`,
    # and the same questions; `coverage` only changes which facts are retrieved.
    for name in ("captions.json", "knowledge_graph.jsonl", "images/00042.png"):
        assert (out / name).read_bytes() == (kvqa_dir / name).read_bytes(), name
    full = _records(kvqa_dir, "instructions")
    def question(record):  # the prompt without its facts line (a dropped hop can leave none)
        return re.sub(r"^<image>\n(Facts: .*\nQuestion: )?", "", record["conversations"][0]["value"])

    assert [(r["id"], r["answer"], question(r)) for r in full] == [(r["id"], r["answer"], question(r)) for r in instructions]
    needed = sum(r["hop"] for r in instructions)
    dropped = sum(r["num_dropped_facts"] for r in instructions if r["hop"] > 0)
    retrieved = sum(f["supporting"] for r in instructions for f in r["facts"])
    assert retrieved + dropped == needed
    assert 0.45 < dropped / needed < 0.55
    # A dropped hop leaves every candidate's walk in the prompt, not the other candidates' alone.
    for record in instructions:
        prompt = record["conversations"][0]["value"]
        shown = [f for f in record["facts"] if f["text"] in prompt]
        relations = Counter(f["relation"] for f in shown)
        assert len(set(relations.values())) <= 1, prompt


def test_records_follow_llava_format_and_benchmark_rules(kvqa_dir):
    graph_facts = [json.loads(line) for line in (kvqa_dir / "knowledge_graph.jsonl").read_text().splitlines()]
    assert len({f["relation"] for f in graph_facts}) >= 6
    fact_texts = {f["text"] for f in graph_facts}

    split_of_image: dict[str, str] = {}
    for record in _records(kvqa_dir, "captions") + _records(kvqa_dir, "instructions"):
        human, gpt = record["conversations"]
        assert set(record) >= {"id", "image", "conversations", "split", "hop", "question_type", "answer", "facts"}
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert split_of_image.setdefault(record["image"], record["split"]) == record["split"], "an image in two splits"
        assert gpt["value"] == record["answer"]
        if record["question_type"] == "caption":
            continue
        assert len(record["answer"].split()) == 1 and len(record["answer"]) <= 5, record["answer"]
        if record["hop"] == 0:
            assert "Facts:" not in human["value"] and record["facts"] == []
        else:
            supporting = [f for f in record["facts"] if f["supporting"]]
            assert len(supporting) == record["hop"]  # coverage 1.0: every supporting fact retrieved
            assert {f["text"] for f in record["facts"]} <= fact_texts
            if record["question_type"] == "open":  # the answer would be one of the few walks listed
                assert "Facts:" not in human["value"] and len(record["facts"]) >= 2 * record["hop"]
            else:
                facts_line = human["value"].split("\n")[1]
                assert facts_line.startswith("Facts: ") and len(facts_line.split(". ")) <= 4
                walks = 2 if record["question_type"] == "yes_no" else 4
                assert len(record["facts"]) == walks * record["hop"]
        if record["question_type"] == "multiple_choice":
            assert record["answer"] in "ABCD" and "\nA. " in human["value"]
        if record["question_type"] == "yes_no":
            assert record["answer"] in ("yes", "no")

    splits = Counter(split_of_image.values())
    assert splits == {"train": 1438, "val": 180, "test": 179}


def test_answers_are_balanced_per_family_and_the_text_alone_earns_nothing(kvqa_dir):
    """Yes/no half and half and option letters uniform per family and split; on the test split a
    constant and the question-only answerer (fit on train, shipped in baselines.json) score the
    headline 0, and no text-only answerer beats the template."""
    from ckd_ray.data.baselines import TextAnswerers, load_sample_baselines
    from ckd_ray.evaluate.scoring import score_records

    instructions = _records(kvqa_dir, "instructions")
    family = lambda r: r["id"].split("-", 2)[2]  # noqa: E731
    for split in ("train", "val", "test"):
        rows = [r for r in instructions if r["split"] == split]
        for name in {family(r) for r in rows}:
            answers = Counter(r["answer"] for r in rows if family(r) == name)
            if set(answers) == {"yes", "no"}:
                assert answers["yes"] == answers["no"], (split, name, answers)
            if set(answers) <= set("ABCD"):
                assert max(answers.values()) - min(answers.values()) <= 1 and len(answers) == 4, (split, name, answers)
    summary = json.loads((kvqa_dir / "summary.json").read_text())
    assert summary["version"] == 2 and summary["check"]["passed"]
    accuracy = summary["check"]["accuracy"]
    assert accuracy["text_classifier"]["all"] <= accuracy["template"]["all"] + 0.03
    assert abs(accuracy["template"]["yes_no"] - 0.5) <= 0.03 and abs(accuracy["template"]["multiple_choice"] - 0.25) <= 0.03

    test = [r for r in instructions if r["split"] == "test"]
    baselines = load_sample_baselines(str(kvqa_dir))
    assert set(baselines) == {r["id"] for r in instructions if r["split"] != "train"}
    records = [{**r, **baselines[r["id"]]} for r in test]
    answerers = TextAnswerers.fit([r for r in instructions if r["split"] == "train"])
    assert all(answerers.question_only(r) == baselines[r["id"]]["baseline_question_only"] for r in test)
    for answer in ("yes", lambda r: {"open": "1", "yes_no": "yes", "multiple_choice": "B"}[r["question_type"]],
                   lambda r: r["baseline_question_only"], lambda r: r["baseline_majority"]):
        predict = answer if callable(answer) else (lambda r, a=answer: a)
        scores = score_records([{**r, "prediction": predict(r)} for r in records])
        assert abs(scores["grounded"]) <= 0.02, scores
    assert score_records([{**r, "prediction": r["answer"]} for r in records])["grounded"] == 1.0


def test_a_leaking_benchmark_fails_its_build_check(kvqa_dir):
    """The check fails where the text gives the answer away: the digit shown written into every
    prompt (the template hides it, a text-only answerer reads it), or the yes/no answer itself
    (then the template alone is far above chance)."""
    from ckd_ray.data.kvqa import BenchmarkLeakError, check_text_only

    def leak(what):
        leaked = []
        for record in _records(kvqa_dir, "instructions"):
            human, gpt = record["conversations"]
            leaked.append({**record, "conversations": [{**human, "value": human["value"] + what(record)}, gpt]})
        return check_text_only(leaked)

    digit = leak(lambda r: f" (a {r['digit']})")
    assert not digit.passed and any(f.startswith("question_only") for f in digit.failures), digit.failures
    assert any(f.startswith("text_classifier") for f in digit.failures), digit.failures
    answer = leak(lambda r: f" (It is {r['answer']}.)" if r["question_type"] == "yes_no" else "")
    assert any("template alone answers 1.000 of yes_no" in f for f in answer.failures), answer.failures
    assert "text gives its answers away" in str(BenchmarkLeakError(answer))
