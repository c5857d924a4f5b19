"""Preprocessing of single records into model inputs: the shifted targets, the masks, the expanded
image tokens, truncation that never cuts image or response tokens, facts, and reject reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ckd_ray.data.preprocess import IGNORE_INDEX, InputLimits, preprocess_rows
from ckd_ray.data.processor import Processor, render_chat

NUM_IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def processor(kvqa_dir):
    return Processor.load(kvqa_dir / "processor", num_image_tokens=NUM_IMAGE_TOKENS)


@pytest.fixture(scope="module")
def png(kvqa_dir):
    return (kvqa_dir / "images" / "00000.png").read_bytes()


def record(question: str, answer: str = "7", **extra) -> dict:
    return {"id": extra.pop("id", "r0"), "image": "00000.png",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}], **extra}


def rows_of(records: list, image: bytes | None) -> dict[str, np.ndarray]:
    raw = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    return {
        "source": np.array(["unit"] * len(raw), dtype=object),
        "ordinal": np.arange(len(raw)),
        "record": np.array(raw, dtype=object),
        "image": np.array([image] * len(raw), dtype=object),
        "read_error": np.array([""] * len(raw), dtype=object),
    }


def run(records, processor, png, **limits):
    samples, rejects, truncated = preprocess_rows(rows_of(records, png), processor, InputLimits(**limits))
    return samples, rejects, truncated


def test_targets_are_shifted_and_masks_line_up(processor, png):
    samples, rejects, _ = run([record("Which digit is shown?", "7")], processor, png)
    assert rejects == []
    ids, targets = samples["input_ids"][0], samples["target_ids"][0]
    length = int(samples["attention_mask"][0].sum())

    # Independent reference: tokens of the rendered prompt, the image expanded, then the response.
    text = render_chat(record("Which digit is shown?", "7")["conversations"]).text
    prompt_text = text[: text.index("assistant\n") + len("assistant\n")]
    prompt_ids = processor.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    at = prompt_ids.index(4)
    expanded = full_ids[:at] + [4] * NUM_IMAGE_TOKENS + full_ids[at + 1 :]
    num_prompt = len(prompt_ids) - 1 + NUM_IMAGE_TOKENS
    assert ids[:length].tolist() == expanded and length == len(expanded)
    assert (ids[length:] == processor.pad_token_id).all()
    assert ids[length - 1] == 3 and ids[num_prompt] == processor.tokenizer.convert_tokens_to_ids("7")

    expected = np.full(len(ids), IGNORE_INDEX)
    for t in range(len(ids) - 1):
        if num_prompt <= t + 1 < length:  # t+1 is "7" or its closing <|im_end|>
            expected[t] = ids[t + 1]
    np.testing.assert_array_equal(targets, expected)
    assert [processor.tokenizer.decode([x]) for x in targets[targets != IGNORE_INDEX]] == ["7", "<|im_end|>"]
    np.testing.assert_array_equal(samples["response_mask"][0], targets != IGNORE_INDEX)
    assert samples["answer_pos"][0] == num_prompt - 1 and targets[num_prompt - 1] == ids[num_prompt]

    visual = np.flatnonzero(samples["visual_mask"][0])
    assert visual.tolist() == list(range(at, at + NUM_IMAGE_TOKENS)) and (ids[visual] == 4).all()
    assert samples["num_visual"][0] == NUM_IMAGE_TOKENS and (ids == 4).sum() == NUM_IMAGE_TOKENS
    assert samples["attention_mask"][0][:length].all() and not samples["attention_mask"][0][length:].any()

    dtypes = {k: v.dtype for k, v in samples.items()}
    assert dtypes["input_ids"] == dtypes["target_ids"] == np.int32 and dtypes["attention_mask"] == np.int8
    assert dtypes["response_mask"] == dtypes["visual_mask"] == np.bool_ and dtypes["hop"] == np.int8
    assert samples["pixel_values"].shape == (1, 3, 32, 32) and dtypes["pixel_values"] == np.float32
    assert samples["input_ids"].shape == (1, 128)


def test_truncation_cuts_prompt_text_from_the_left_only(processor, png):
    facts = " ".join(f"{n} is the successor of {n - 1}." for n in range(1, 9))
    question = f"Facts: {facts}\nQuestion: What number comes after the digit shown?"
    full, _, _ = run([record(question, "8")], processor, png, max_length=256)
    samples, rejects, truncated = run([record(question, "8")], processor, png, max_length=48)
    assert rejects == [] and truncated == [("unit", 0)]
    full_length = int(full["attention_mask"][0].sum())
    assert full_length > 48 and samples["attention_mask"][0].all()  # exactly max_length now

    ids = samples["input_ids"][0]
    assert samples["visual_mask"][0].sum() == NUM_IMAGE_TOKENS == (ids == 4).sum()
    # The response and its targets are untouched; the question survives, the first facts do not.
    response = samples["target_ids"][0][samples["response_mask"][0]]
    np.testing.assert_array_equal(response, full["target_ids"][0][full["response_mask"][0]])
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n" + "<image>" * NUM_IMAGE_TOKENS)
    assert text.endswith("Question: What number comes after the digit shown?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>")
    assert "1 is the successor of 0" not in text
    assert ids[samples["answer_pos"][0] + 1] == processor.tokenizer.convert_tokens_to_ids("8")


def test_over_length_is_rejected_when_asked_or_when_nothing_can_be_cut(processor, png):
    long_question = "Facts: " + "7 is odd. " * 20 + "\nQuestion: Is the digit shown odd?"
    samples, rejects, _ = run([record(long_question, "yes")], processor, png, max_length=48, over_length="reject")
    assert samples is None and [r.reason for r in rejects] == ["over-length"]
    assert "data.max_length=48" in rejects[0].detail and "reject" in rejects[0].detail

    samples, rejects, _ = run([record("Which digit?", "7")], processor, png, max_length=20)
    assert samples is None and rejects[0].reason == "over-length" and "raise data.max_length" in rejects[0].detail


def test_fact_columns_hold_each_candidate_and_its_support(processor, png):
    facts = [{"text": "7 is odd.", "supporting": False}, {"text": "8 is the successor of 7.", "supporting": True},
             {"text": "1 is not prime.", "supporting": False}]
    samples, _, _ = run([record("Q?", "8", facts=facts, hop=1, question_type="open")], processor, png, max_facts=4, max_fact_tokens=6)
    token_ids = samples["fact_token_ids"][0]
    assert token_ids.shape == (4, 6)
    assert samples["fact_mask"][0].tolist() == [True, True, True, False]
    assert samples["fact_support"][0].tolist() == [False, True, False, False]
    for row, fact in enumerate(facts):
        expected = processor.tokenizer(fact["text"], add_special_tokens=False)["input_ids"][:6]
        assert token_ids[row][: len(expected)].tolist() == expected
        assert (token_ids[row][len(expected) :] == -1).all()
    assert (token_ids[3] == -1).all()
    assert samples["hop"][0] == 1 and samples["question_type"][0] == "open" and samples["answer"][0] == "8"

    samples, _, _ = run([record("Q?", "8", facts=facts)], processor, png, max_facts=2)
    assert samples["fact_mask"][0].tolist() == [True, True]


def test_multi_turn_conversations_train_on_every_answer(processor, png):
    turns = [{"from": "human", "value": "<image>\nWhich digit is shown?"}, {"from": "gpt", "value": "7"},
             {"from": "human", "value": "Is it odd?"}, {"from": "gpt", "value": "yes"}]
    samples, rejects, _ = run([{"id": "multi", "image": "00000.png", "conversations": turns}], processor, png)
    assert rejects == []
    targets = samples["target_ids"][0]
    decoded = [processor.tokenizer.decode([x]) for x in targets[targets != IGNORE_INDEX]]
    assert decoded == ["7", "<|im_end|>", "yes", "<|im_end|>"]
    assert samples["answer"][0] == "7"
    assert samples["input_ids"][0][samples["answer_pos"][0] + 1] == processor.tokenizer.convert_tokens_to_ids("7")


def test_text_only_record_has_no_visual_tokens(processor):
    turns = [{"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4"}]
    samples, rejects, _ = run([{"id": "text", "conversations": turns}], processor, None)
    assert rejects == []
    assert samples["num_visual"][0] == 0 and not samples["visual_mask"][0].any()
    assert (samples["input_ids"][0] != 4).all() and not samples["pixel_values"][0].any()


@pytest.mark.parametrize("raw, reason", [
    (b'{"id": "x", "image": "00000.png", "conversations": [{"from": "human", "value": "<image>\\nhi"} {"from": "gpt"}]}', "malformed-json"),
    (b'{"id": "x", "image": "00000.png", "conversations": "hello"}', "malformed-record"),
    (b'[1, 2]', "malformed-record"),
    (b'{"id": "x", "image": "00000.png", "conversations": [{"from": "human", "value": "<image>\\nhi"}]}', "no-response"),
    (b'{"id": "x", "image": "00000.png", "conversations": [{"from": "human", "value": "<image>\\n<image>\\nhi"}, {"from": "gpt", "value": "7"}]}', "image-placeholders"),
    (b'{"id": "x", "image": "00000.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "7"}]}', "image-placeholders"),
    (b'{"id": "x", "conversations": [{"from": "human", "value": "<image>\\nhi"}, {"from": "gpt", "value": "7"}]}', "image-placeholders"),
    (b'{"id": "x", "image": "00000.png", "conversations": [{"from": "human", "value": "<image>\\nhi \xff"}, {"from": "gpt", "value": "7"}]}', "non-utf8"),
    (b'{"id": "x", "image": "00000.png", "conversations": [{"from": "human", "value": "<image>\\nhi \\udc80"}, {"from": "gpt", "value": "7"}]}', "non-utf8"),
    (b'{"id": "x", "image": "00000.png", "hop": "two", "conversations": [{"from": "human", "value": "<image>\\nhi"}, {"from": "gpt", "value": "7"}]}', "malformed-record"),
])
def test_bad_records_are_rejected_with_their_reason(processor, png, raw, reason):
    samples, rejects, _ = run([raw], processor, png)
    assert samples is None and [r.reason for r in rejects] == [reason]
    assert rejects[0].record.startswith(raw[:20].decode("utf-8", "backslashreplace"))


def test_missing_and_corrupt_images_are_rejected(processor, png):
    good = record("Which digit is shown?")
    _, rejects, _ = run([good], processor, None)
    assert [r.reason for r in rejects] == ["missing-image"]
    _, rejects, _ = run([good], processor, png[:40])
    assert [r.reason for r in rejects] == ["corrupt-image"] and rejects[0].sample_id == "r0"


SHIPPED_CHECK = r"""
import pickle, sys
import numpy as np
processor, rows, limits, expected = pickle.load(open(sys.argv[1], "rb"))
from ckd_ray.data.preprocess import preprocess_rows
processor = pickle.loads(pickle.dumps(processor))  # shipped on again, as a coordinator does
samples, rejects, truncated = preprocess_rows(rows, processor, limits)
assert not rejects and not truncated
for name, values in expected.items():
    assert np.array_equal(samples[name], values), name
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("imported:", heavy)
"""


def test_a_shipped_processor_preprocesses_the_same_without_transformers_or_torch(processor, png, tmp_path):
    """What a Ray Data task receives: the pickled processor gives the same columns, and its
    process imports neither transformers nor torch to unpickle it, pickle it on to the next
    process (a Ray Data coordinator does), and use it."""
    import pickle
    import subprocess
    import sys

    records = [record("What digit is shown?", id="a"), record("Is it even?", answer="no", id="b")]
    rows = rows_of(records, png)
    expected, _, _ = preprocess_rows(rows, processor, InputLimits())
    blob = tmp_path / "shipped.pkl"
    blob.write_bytes(pickle.dumps((processor, rows, InputLimits(), expected)))
    done = subprocess.run([sys.executable, "-c", SHIPPED_CHECK, str(blob)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: []" in done.stdout


@pytest.mark.parametrize("settings", [
    {},  # the benchmark's: 32 x 32, bicubic, rescale, normalize
    {"size": {"height": 24, "width": 40}, "resample": 2},
    {"size": {"height": 48, "width": 48}, "do_normalize": False},
    {"do_rescale": False, "image_mean": [0.48, 0.45, 0.41], "image_std": [0.27, 0.26, 0.28]},
    {"do_resize": False},
])
def test_pixel_transform_makes_what_the_image_processor_makes(processor, settings, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    from ckd_ray.data.processor import PixelTransform

    processor.image_processor.save_pretrained(tmp_path)
    reference = AutoImageProcessor.from_pretrained(tmp_path, **settings)
    transform = PixelTransform.of(reference)
    assert transform is not None
    rng = np.random.default_rng(0)
    shapes = [(32, 32)] * 3 if settings.get("do_resize") is False else [(32, 32), (17, 45), (64, 50)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for h, w in shapes]
    expected = reference(images=images, return_tensors="np")["pixel_values"]
    got = transform(images=images, return_tensors="np")["pixel_values"]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_pixel_transform_declines_what_it_does_not_reproduce(processor, tmp_path):
    from transformers import AutoImageProcessor

    from ckd_ray.data.processor import PixelTransform

    processor.image_processor.save_pretrained(tmp_path)
    cropping = AutoImageProcessor.from_pretrained(tmp_path, size={"shortest_edge": 40}, do_center_crop=True,
                                                  crop_size={"height": 32, "width": 32})
    assert PixelTransform.of(cropping) is None
    assert PixelTransform.of(object()) is None
