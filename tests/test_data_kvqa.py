"""The bundled digits benchmark: built by the CLI in well under a minute, counts consistent with
its files, deterministic, splits by image, facts in the prompt only for knowledge questions, and a
processor folder that plain transformers loads with the fixed special-token ids."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from ckd_ray.data.kvqa import build_kvqa
from ckd_ray.data.processor import SPECIAL_TOKENS, render_chat


def _records(root, kind):
    return json.loads((root / f"{kind}.json").read_text())


def test_cli_builds_benchmark_fast_with_consistent_summary(tmp_path, kvqa_dir):
    from ckd_ray.cli import main

    out = tmp_path / "kvqa"
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["data", "build-kvqa", str(out), "--coverage", "0.5"])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert seconds < 60
    # One progress line per phase on stderr; the summary table on stdout.
    assert sum(line.startswith("[kvqa]") for line in result.stderr.splitlines()) == 5
    for row in ("captions", "instructions", "hop 0", "hop 1", "hop 2", "open", "yes_no", "multiple_choice", "tokenizer:"):
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
    assert [(r["id"], r["answer"], r["conversations"][0]["value"].split("Question: ")[-1]) for r in full] == [
        (r["id"], r["answer"], r["conversations"][0]["value"].split("Question: ")[-1]) for r in instructions
    ]
    needed = sum(r["hop"] for r in instructions)
    dropped = sum(r["num_dropped_facts"] for r in instructions if r["hop"] > 0)
    retrieved = sum(f["supporting"] for r in instructions for f in r["facts"])
    assert retrieved + dropped == needed
    assert 0.45 < dropped / needed < 0.55


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
            assert len(record["facts"]) == 4
            facts_line = human["value"].split("\n")[1]
            assert facts_line == "Facts: " + " ".join(f["text"] for f in record["facts"])
            assert {f["text"] for f in record["facts"]} <= fact_texts
        if record["question_type"] == "multiple_choice":
            assert record["answer"] in "ABCD" and "\nA. " in human["value"]
        if record["question_type"] == "yes_no":
            assert record["answer"] in ("yes", "no")

    splits = Counter(split_of_image.values())
    assert splits == {"train": 1438, "val": 180, "test": 179}


def test_processor_folder_loads_with_plain_transformers(kvqa_dir):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(kvqa_dir / "processor")
    image_processor = AutoImageProcessor.from_pretrained(kvqa_dir / "processor")
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 3)
    assert len(tokenizer) <= 512

    image = Image.open(kvqa_dir / "images" / "00000.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = image_processor(image, return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    expected = (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(pixels[0], expected, atol=1e-6)

    # The chat template renders exactly what training renders, for LLaVA strings and for the
    # transformers content-list form a user of the exported model writes.
    turns = [{"from": "human", "value": "<image>\nWhich digit is shown?"}, {"from": "gpt", "value": "7"}]
    messages = [{"role": "user", "content": "<image>\nWhich digit is shown?"}, {"role": "assistant", "content": "7"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_chat(turns).text
    assert render_chat(turns).text == "<|im_start|>user\n<image>\nWhich digit is shown?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>"
    content_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is shown?"}]}]
    prompt = tokenizer.apply_chat_template(content_list, tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(turns).text[: -len("7<|im_end|>")]


@pytest.mark.parametrize("bad", [{"coverage": 1.5}, {"num_retrieved": 1}])
def test_bad_build_arguments_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        build_kvqa(tmp_path, progress=None, **bad)
