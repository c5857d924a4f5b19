"""The model family: tiny presets, freeze policies, safetensors round trips (local and S3),
vocabulary alignment, and a saved folder used the way a user uses it (AutoProcessor, generate,
the image-text-to-text pipeline) with transformers alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ckd_ray import storage
from ckd_ray.models import (
    TINY_PRESETS,
    VocabularyMismatchError,
    apply_freeze,
    build_preset,
    count_parameters,
    load_model,
    num_image_tokens,
    preset_config,
    save_model,
    shared_vocab_size,
)
from ckd_ray.models.presets import IMAGE_TOKEN_ID


def tiny_batch(model, batch_size: int = 2, seq_len: int = 28):
    n_img = num_image_tokens(model.config)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, model.config.text_config.vocab_size, (batch_size, seq_len), generator=generator)
    input_ids[:, 2 : 2 + n_img] = IMAGE_TOKEN_ID
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator)
    return input_ids, pixel_values


@pytest.mark.parametrize("name", list(TINY_PRESETS))
def test_preset_forward_returns_logits_attentions_hidden_states(name):
    model = build_preset(name, attn_implementation="eager").eval()
    input_ids, pixel_values = tiny_batch(model)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    text = model.config.text_config
    assert out.logits.shape == (2, 28, text.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == text.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (2, 28, text.hidden_size)
    assert len(out.attentions) == text.num_hidden_layers
    assert out.attentions[0].shape == (2, text.num_attention_heads, 28, 28)
    # Causal softmax rows sum to one.
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, text.num_attention_heads, 28))


def test_presets_rise_in_capacity_and_share_vision_and_vocab():
    counts = {name: count_parameters(build_preset(name)) for name in TINY_PRESETS}
    assert counts["tiny-student"] < counts["tiny-ta"] < counts["tiny-teacher"] < counts["small-teacher"]
    assert 0.2e6 < counts["tiny-student"] < 0.5e6
    assert 1.0e6 < counts["tiny-ta"] < 2.0e6
    assert 4.5e6 < counts["tiny-teacher"] < 8.0e6
    assert 20e6 < counts["small-teacher"] < 30e6
    configs = [preset_config(n) for n in TINY_PRESETS]
    assert len({c.vision_config.to_json_string() for c in configs}) == 1
    assert len({c.text_config.vocab_size for c in configs}) == 1
    assert {num_image_tokens(c) for c in configs} == {16}


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_preset("tiny-student", seed=1), build_preset("tiny-student", seed=1), build_preset("tiny-student", seed=2)
    wa, wb, wc = (m.model.multi_modal_projector.linear_1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    "policy, trained, frozen",
    [
        ("connector", ["multi_modal_projector"], ["vision_tower", "language_model", "lm_head"]),
        ("connector+llm", ["multi_modal_projector", "language_model"], ["vision_tower"]),
    ],
)
def test_freeze_policies(policy, trained, frozen):
    model = build_preset("tiny-student")
    apply_freeze(model, policy)
    names = {name: p.requires_grad for name, p in model.named_parameters()}
    for part in trained:
        assert all(flag for name, flag in names.items() if part in name.split(".")), part
    for part in frozen:
        assert not any(flag for name, flag in names.items() if part in name.split(".")), part
    # A step of SGD moves exactly the trainable parameters.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    input_ids, pixel_values = tiny_batch(model)
    model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param.detach()) != param.requires_grad, name


def test_unknown_policy_and_real_preset_give_clear_errors():
    with pytest.raises(ValueError, match="unknown freeze policy"):
        apply_freeze(build_preset("tiny-student"), "everything")
    with pytest.raises(ValueError, match="set model.path"):
        preset_config("qwen2.5-0.5b-siglip")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("tiny-studnet")


def _logits(model):
    input_ids, pixel_values = tiny_batch(model)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, pixel_values=pixel_values).logits


def test_save_load_round_trip_is_safetensors_only(tmp_path):
    model = build_preset("tiny-ta", seed=3)
    out = save_model(model, tmp_path / "ta")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    torch.testing.assert_close(_logits(load_model(str(out))), _logits(model), rtol=0, atol=0)


def test_load_refuses_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny-student").to_dict()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_save_load_round_trip_through_s3(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("CKD_RAY_CACHE", str(tmp_path / "cache"))
    model = build_preset("tiny-student", seed=5)
    uri = f"s3://{s3_bucket}/models/student"
    storage.upload_dir(save_model(model, tmp_path / "student"), uri)
    torch.testing.assert_close(_logits(load_model(uri)), _logits(model), rtol=0, atol=0)


def test_vocabulary_alignment():
    # Qwen2.5 padding: 0.5B-3B have 151936 rows, 7B 152064; the tokenizer has 151665 tokens.
    assert shared_vocab_size(151936, 152064, student_fingerprint="a", teacher_fingerprint="a", tokenizer_len=151665) == 151936
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ"):
        shared_vocab_size(151936, 151936, student_fingerprint="a", teacher_fingerprint="b", tokenizer_len=151665)
    with pytest.raises(VocabularyMismatchError, match="smaller than its tokenizer"):
        shared_vocab_size(1000, 151936, student_fingerprint="a", teacher_fingerprint="a", tokenizer_len=151665)


# A user's first lines, in an isolated interpreter that imports transformers, torch and PIL only
# (`python -I -c USER_CHECK <folder> <json [[image path, question], ...]>`; tests/test_train.py too).
USER_CHECK = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

folder, samples = sys.argv[1], json.loads(sys.argv[2])
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
pipe = pipeline("image-text-to-text", model=folder)
results = []
for image_path, question in samples:
    image = Image.open(image_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    piped = pipe(text=chat, return_full_text=False, generate_kwargs={"max_new_tokens": 8, "do_sample": False})
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    results.append({
        "prompt": prompt,
        "tokenizer_prompt": processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        "input_ids": inputs["input_ids"][0].tolist(),
        "pixel_values": inputs["pixel_values"][0].tolist(),
        "new_tokens": new_tokens.tolist(),
        "answer": processor.decode(new_tokens, skip_special_tokens=True).strip(),
        "pipeline": piped[0]["generated_text"].strip(),
    })
print(json.dumps({
    "processor": type(processor).__name__,
    "settings": [processor.patch_size, processor.vision_feature_select_strategy, processor.num_additional_image_tokens,
                 processor.image_token, processor.image_token_id],
    "results": results,
    "ckd_ray_imported": any(name.split(".")[0] == "ckd_ray" for name in sys.modules),
}))
"""


def benchmark_rows(kvqa_dir, records, num_visual: int) -> list[dict]:
    """The benchmark's preprocessed rows of `records`, as the project's evaluation reads them."""
    from ckd_ray.data.preprocess import InputLimits, preprocess_rows
    from ckd_ray.data.processor import Processor

    raw = {
        "source": np.array(["test"] * len(records), dtype=object),
        "ordinal": np.arange(len(records)),
        "record": np.array([json.dumps(r).encode() for r in records], dtype=object),
        "image": np.array([(kvqa_dir / "images" / r["image"]).read_bytes() for r in records], dtype=object),
        "read_error": np.array([""] * len(records), dtype=object),
    }
    columns, rejects, truncated = preprocess_rows(raw, Processor.load(kvqa_dir / "processor", num_visual), InputLimits())
    assert rejects == [] and truncated == []
    return [{name: values[k] for name, values in columns.items()} for k in range(len(records))]


def fit(model, rows: list[dict], steps: int = 100):
    """A few AdamW steps on `rows` alone, until the model answers them (so answers are words, not noise)."""
    width = max(int(r["attention_mask"].sum()) for r in rows)
    input_ids = torch.as_tensor(np.stack([r["input_ids"][:width] for r in rows])).long()
    attention_mask = torch.as_tensor(np.stack([r["attention_mask"][:width] for r in rows])).long()
    targets = torch.as_tensor(np.stack([r["target_ids"][:width] for r in rows])).long()
    pixel_values = torch.as_tensor(np.stack([r["pixel_values"] for r in rows]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_saved_folder_answers_through_autoprocessor_and_pipeline_as_the_evaluation_does(kvqa_dir, tmp_path):
    """The folder `save_model` writes (every exported step model, prepared teacher and checkpoint
    gets the same files) is a complete Llava folder: with transformers alone, AutoProcessor
    expands `<image>` to the model's 16 image positions, its inputs are the benchmark's rows token
    for token and pixel for pixel, and generate and the pipeline answer what the project's own
    evaluation answers."""
    from transformers import AutoTokenizer

    from ckd_ray.evaluate.generate import generate_answers, prompt_of

    test_split = [r for r in json.loads((kvqa_dir / "instructions.json").read_text()) if r["split"] == "test"]
    records = [next(r for r in test_split if r["question_type"] == kind) for kind in ("open", "multiple_choice", "yes_no")]
    model = build_preset("tiny-student", seed=0)
    rows = benchmark_rows(kvqa_dir, records, num_image_tokens(model.config))
    folder = save_model(fit(model, rows), tmp_path / "student", kvqa_dir / "processor")
    assert {"processor_config.json", "preprocessor_config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}

    evaluated = generate_answers(load_model(str(folder)), AutoTokenizer.from_pretrained(folder), rows, max_new_tokens=8)
    assert evaluated == [r["answer"] for r in records] == ["0", "C", "no"]

    questions = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in records]
    samples = [[str(kvqa_dir / "images" / r["image"]), q] for r, q in zip(records, questions)]
    # -I: isolated interpreter (no PYTHONPATH, no user site, not started in the repo)
    completed = subprocess.run([sys.executable, "-I", "-c", USER_CHECK, str(folder), json.dumps(samples)],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    user = json.loads(completed.stdout.strip().splitlines()[-1])
    assert user["processor"] == "LlavaProcessor" and user["ckd_ray_imported"] is False
    assert user["settings"] == [8, "full", 0, "<image>", IMAGE_TOKEN_ID]  # SigLIP 32 px / 8 px patches, every patch kept
    for result, row, question in zip(user["results"], rows, questions):
        assert result["prompt"] == result["tokenizer_prompt"] == f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
        assert result["input_ids"].count(IMAGE_TOKEN_ID) == 16
        assert result["input_ids"] == prompt_of(row).tolist()
        np.testing.assert_array_equal(np.asarray(result["pixel_values"], dtype=np.float32), row["pixel_values"])
    assert [r["answer"] for r in user["results"]] == [r["pipeline"] for r in user["results"]] == evaluated


def test_a_processor_folder_that_does_not_fit_the_model_is_refused_when_saving(kvqa_dir, tmp_path):
    """An image processor of another size would expand `<image>` to the wrong count: refused with the fix."""
    processor_dir = tmp_path / "processor"
    shutil.copytree(kvqa_dir / "processor", processor_dir)
    config = json.loads((processor_dir / "preprocessor_config.json").read_text())
    config["size"] = {"height": 64, "width": 64}
    (processor_dir / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"makes 64x64 pixels, 64 image tokens, but the model's tower takes 32x32, 16 tokens"):
        save_model(build_preset("tiny-student"), tmp_path / "student", processor_dir)
