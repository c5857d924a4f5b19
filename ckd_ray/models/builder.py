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
# What `AutoProcessor` and `AutoTokenizer` read: copied next to every checkpoint of a model
# (`processor_config.json` is then written for the model itself: `save_processor_files`).
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
    """Writes the Hugging Face format (config.json, safetensors) plus, from `processor_dir`, the
    tokenizer and image processor files and the model's LlavaProcessor config
    (`save_processor_files`), so the directory loads with transformers alone, `AutoProcessor`
    and `pipeline("image-text-to-text")` included."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if processor_dir is not None:
        save_processor_files(processor_dir, out)
    return out


def copy_processor_files(src_dir: str | Path, dst_dir: str | Path) -> None:
    src, dst = Path(src_dir), Path(dst_dir)
    for name in PROCESSOR_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def save_processor_files(processor_dir: str | Path, model_dir: str | Path) -> None:
    """Copies the tokenizer and image processor files of `processor_dir` into `model_dir` (which
    holds the model's config.json already) and writes the model's LlavaProcessor config
    (`processor_config.json`, from `llava_processor`): without it `AutoProcessor` builds a
    LlavaProcessor with no patch size, which cannot expand `<image>`. A `processor_dir` without a
    tokenizer leaves only what it has (nothing to build a processor from)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    src, dst = Path(processor_dir), Path(model_dir)
    copy_processor_files(src, dst)
    if not any((dst / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    tokenizer = AutoTokenizer.from_pretrained(dst)
    processor = llava_processor(AutoConfig.from_pretrained(dst), tokenizer, AutoImageProcessor.from_pretrained(dst),
                                chat_template=tokenizer.chat_template)
    processor.to_json_file(dst / "processor_config.json")  # what LlavaProcessor.save_pretrained writes, tokenizer aside
    if isinstance(processor.chat_template, str) and not any((dst / name).exists() for name in ("chat_template.jinja", "chat_template.json")):
        (dst / "chat_template.jinja").write_text(processor.chat_template)  # a template kept in tokenizer_config.json only


def llava_processor(config, tokenizer, image_processor, *, chat_template: str | None = None):
    """The `LlavaProcessor` of a Llava model, its settings taken from the model's config: the
    tower's `patch_size`, `vision_feature_select_strategy`, the token of `image_token_index`, and
    `num_additional_image_tokens` (CLIP's class token), so that one `<image>` in a prompt becomes
    exactly the `num_image_tokens(config)` image positions the model fills. The one way every
    model folder the project writes gets its processor (`save_processor_files`, `models compose`).
    Raises ValueError where the tokenizer or the image processor does not fit the model."""
    from PIL import Image
    from transformers import LlavaProcessor

    vision, strategy = config.vision_config, config.vision_feature_select_strategy
    expected = num_image_tokens(config)
    grid = (vision.image_size // vision.patch_size) ** 2
    image_token_id = config.image_token_index
    image_token = tokenizer.convert_ids_to_tokens(image_token_id) if 0 <= image_token_id < len(tokenizer) else None
    if image_token is None:
        raise ValueError(f"the model's image token id {image_token_id} is not in its tokenizer ({len(tokenizer)} tokens)")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template,
        image_token=image_token,
        num_additional_image_tokens=expected - grid + (1 if strategy == "default" else 0),
    )
    if processor.image_token_id != image_token_id:  # LlavaProcessor prefers the tokenizer's own `image_token`
        raise ValueError(f"the tokenizer's image token {processor.image_token!r} has id {processor.image_token_id}, "
                         f"but the model's image_token_index is {image_token_id}: give the model the tokenizer it was built with")
    # What a user gets for one (non-square) image: the tower's pixel size and that many image tokens.
    probe = processor(images=Image.new("RGB", (2 * vision.image_size, vision.image_size)), text=processor.image_token,
                      return_tensors="np")
    made = int((probe["input_ids"] == image_token_id).sum())
    pixels = tuple(probe["pixel_values"].shape[-2:])
    if made != expected or pixels != (vision.image_size, vision.image_size):
        raise ValueError(f"the image processor makes {pixels[0]}x{pixels[1]} pixels, {made} image tokens, but the model's "
                         f"tower takes {vision.image_size}x{vision.image_size}, {expected} tokens per image: give the folder "
                         "the image processor of its vision tower")
    return processor


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
