"""Build, load, save and freeze LLaVA-style VLMs (SigLIP vision tower, 2-layer MLP + GELU
connector, Qwen2 LLM) through `transformers`' Llava classes.

Weights are read and written as safetensors only; `trust_remote_code` is passed through from the
config and is off by default.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from ckd_ray import storage
from ckd_ray.models.config import ModelSpec
from ckd_ray.models.folders import check_llava_layout, count_visual_tokens, tokenizer_fingerprint
from ckd_ray.models.presets import EOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, PRESETS, TINY_VISION

# Parameter-name parts that each freeze policy trains; the vision tower is never among them.
FREEZE_POLICIES: dict[str, tuple[str, ...]] = {
    "connector": ("multi_modal_projector",),
    "connector+llm": ("multi_modal_projector", "language_model", "lm_head"),
}
# What `AutoProcessor` and `AutoTokenizer` read: copied next to every checkpoint of a model.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                   "processor_config.json", "chat_template.jinja", "chat_template.json")


class VocabularyMismatchError(ValueError):
    """Student and teacher tokenize differently: their logits index different tokens."""


def preset_config(name: str) -> LlavaConfig:
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
    if not preset.buildable:
        raise ValueError(
            f"preset {name!r} is a real checkpoint size ({preset.checkpoint_hint}): it is not built from scratch; "
            "set model.path to a directory (local or s3://) holding it"
        )
    t = preset.text
    text = Qwen2Config(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        bos_token_id=None,
    )
    return LlavaConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION),
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=num_image_tokens_of(SiglipVisionConfig(**TINY_VISION), "full"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def num_image_tokens_of(vision_config, select_strategy: str) -> int:
    """Visual tokens the connector emits per image (see `folders.count_visual_tokens`)."""
    return count_visual_tokens(image_size=vision_config.image_size, patch_size=vision_config.patch_size,
                               vision_model_type=vision_config.model_type, select_strategy=select_strategy)


def num_image_tokens(config: LlavaConfig) -> int:
    return num_image_tokens_of(config.vision_config, config.vision_feature_select_strategy)


def build_preset(name: str, *, seed: int = 0, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """A freshly initialised tiny model; the same name and seed give the same weights."""
    config = preset_config(name)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model


def save_model(model, out_dir: str | Path, processor_dir: str | Path | None = None) -> Path:
    """Writes the Hugging Face format (config.json, safetensors) plus the tokenizer and image
    processor files copied from `processor_dir`, so the directory loads with transformers alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if processor_dir is not None:
        copy_processor_files(processor_dir, out)
    return out


def copy_processor_files(src_dir: str | Path, dst_dir: str | Path) -> None:
    src, dst = Path(src_dir), Path(dst_dir)
    for name in PROCESSOR_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def resolve_dtype(dtype: str, on_gpu: bool) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_model(
    uri: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
):
    """Loads a model directory (local or s3://, mirrored to a local cache) from safetensors. A
    folder in another layout than transformers' Llava (original LLaVA, TinyLLaVA, a text-only
    LLM) raises UnsupportedCheckpointError saying how to convert it."""
    local = storage.download_dir(uri, cache_dir)
    if (local / "config.json").exists():  # another layout gets how to convert it, not a loader traceback
        check_llava_layout(json.loads((local / "config.json").read_text()), uri)
    if not any(local.glob("*.safetensors")):
        raise FileNotFoundError(f"{uri!r} holds no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    return AutoModelForImageTextToText.from_pretrained(
        local,
        attn_implementation=attn_implementation,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )


def load_spec(spec: ModelSpec, *, seed: int = 0, attn_implementation: str = "sdpa", on_gpu: bool = False):
    """The model a `ModelSpec` names: a preset is built (with `seed`), a path is loaded."""
    if spec.preset:
        return build_preset(spec.preset, seed=seed, attn_implementation=attn_implementation)
    return load_model(
        spec.path,
        attn_implementation=attn_implementation,
        dtype=resolve_dtype(spec.dtype, on_gpu),
        trust_remote_code=spec.trust_remote_code,
    )


def apply_freeze(model, policy: str) -> None:
    """Marks trainable exactly the parameters the step's policy names; the vision tower is
    always frozen."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}: choose one of {sorted(FREEZE_POLICIES)}")
    trainable = FREEZE_POLICIES[policy]
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad = "vision_tower" not in parts and any(part in parts for part in trainable)


def count_parameters(model, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def vocab_fingerprint(processor_dir: str | Path) -> str:
    """The fingerprint of a folder's `tokenizer.json` (see `folders.tokenizer_fingerprint`)."""
    return tokenizer_fingerprint(json.loads((Path(processor_dir) / "tokenizer.json").read_text()))


def shared_vocab_size(
    student_vocab: int, teacher_vocab: int, *, student_fingerprint: str, teacher_fingerprint: str, tokenizer_len: int
) -> int:
    """The vocabulary range both models' logits are compared over.

    Padded vocabularies (Qwen2.5: 151936 for 0.5B-3B, 152064 for 7B) only add rows no token maps
    to, so logits are cut to the smaller size. Different tokenizers are a real mismatch: an error.
    """
    if student_fingerprint != teacher_fingerprint:
        raise VocabularyMismatchError(
            f"student and teacher tokenizers differ (fingerprints {student_fingerprint} vs {teacher_fingerprint}): "
            "distillation compares logits token by token, so both must use the same tokenizer"
        )
    shared = min(student_vocab, teacher_vocab)
    if shared < tokenizer_len:
        raise VocabularyMismatchError(
            f"a model's vocabulary ({shared} rows) is smaller than its tokenizer ({tokenizer_len} tokens)"
        )
    return shared
