"""The model family: tiny presets, freeze policies, safetensors round trips (local and S3),
vocabulary alignment."""

from __future__ import annotations

import json

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
