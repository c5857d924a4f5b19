"""What a model folder's small files say, read without its weights (local or s3://): its layout
(the Hugging Face Llava layout this project trains, or another one that needs converting), its
tokenizer's fingerprint and length, its image processor. The config checks and the cascade's
start use these to refuse a student/teacher pair that cannot be distilled before any actor
starts; `load_model` uses the layout check before it reads any weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ckd_ray import storage

IMAGE_TOKEN = "<image>"
# Keys of the original LLaVA / LLaVA-NeXT / TinyLLaVA repositories' configs (their own model
# classes); transformers' Llava layout keeps the vision tower in `vision_config` instead.
ORIGINAL_LLAVA_KEYS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer")
COMPOSE_HINT = ("ckd-ray models compose --llm LLM_DIR --vision VISION_DIR --out DIR (its LLM and vision "
                "tower, a fresh connector: train it with PT/FT, cascade.prepare_teachers)")
# Image processor settings that change the pixels a model sees (the class name may differ in
# its backend suffix only: SiglipImageProcessor, ...Fast and ...Pil make the same pixels).
PIXEL_KEYS = ("do_resize", "size", "crop_size", "do_center_crop", "resample", "do_rescale", "rescale_factor",
              "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad")


class UnsupportedCheckpointError(ValueError):
    """A model folder in a layout transformers' Llava classes do not load: the message says how to
    convert it."""


@dataclass(frozen=True)
class ModelFolder:
    """The small JSON files of a model folder: `config.json`, `tokenizer.json`,
    `preprocessor_config.json` (None where the folder has none)."""

    uri: str
    config: dict | None
    tokenizer: dict | None
    image_processor: dict | None

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return tokenizer_fingerprint(self.tokenizer) if self.tokenizer is not None else None

    @property
    def tokenizer_length(self) -> int | None:
        return tokenizer_length(self.tokenizer) if self.tokenizer is not None else None

    @property
    def image_token_id(self) -> int | None:
        """The id of `<image>` in the tokenizer (None if it has none)."""
        if self.tokenizer is None:
            return None
        for token in self.tokenizer.get("added_tokens", []):
            if token["content"] == IMAGE_TOKEN:
                return token["id"]
        vocab = self.tokenizer.get("model", {}).get("vocab", {})
        return vocab.get(IMAGE_TOKEN) if isinstance(vocab, dict) else None

    @property
    def vocab_rows(self) -> int | None:
        """Rows of the LLM's embedding matrix (padded vocabularies have more than the tokenizer)."""
        return ((self.config or {}).get("text_config") or {}).get("vocab_size")


def read_model_folder(uri: str) -> ModelFolder:
    """Reads the small files of `uri` (a local folder or an s3:// prefix); weights are not read.
    Raises FileNotFoundError when the folder holds no config.json."""
    def read(name: str) -> dict | None:
        location = storage.join(uri, name)
        return json.loads(storage.read_bytes(location)) if storage.exists(location) else None

    config = read("config.json")
    if config is None:
        raise FileNotFoundError(f"{uri!r} holds no config.json: it is not a model folder")
    return ModelFolder(uri, config, read("tokenizer.json"), read("preprocessor_config.json"))


def tokenizer_fingerprint(tokenizer: dict) -> str:
    """A hash of a `tokenizer.json`'s token -> id map and added tokens: equal fingerprints mean two
    models' logits index the same tokens (up to vocabulary padding)."""
    model_vocab = tokenizer.get("model", {}).get("vocab", {})
    added = sorted((t["id"], t["content"]) for t in tokenizer.get("added_tokens", []))
    blob = json.dumps([sorted(model_vocab.items()) if isinstance(model_vocab, dict) else model_vocab, added])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_length(tokenizer: dict) -> int:
    """One past the largest id a `tokenizer.json` can produce, added tokens included (Qwen2.5:
    151,643 BPE tokens + 22 added = 151,665; one more with `<image>`)."""
    vocab = tokenizer.get("model", {}).get("vocab", {})
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in tokenizer.get("added_tokens", [])]
    return max(ids) + 1 if ids else 0


def layout_problem(config: dict) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when a `config.json` is not the Hugging Face Llava layout
    (model_type `llava` with a `vision_config` and a `text_config`); None when it is."""
    model_type = config.get("model_type")
    original = [key for key in ORIGINAL_LLAVA_KEYS if key in config]
    if model_type == "tinyllava":
        return ("is a TinyLLaVA checkpoint (model_type tinyllava: TinyLLaVA's own classes, not transformers' Llava)",
                f"rebuild it in the Llava layout from the same parts: {COMPOSE_HINT}; its trained connector is not carried over")
    if original or (model_type == "llava" and "vision_config" not in config):
        found = f"config.json has {', '.join(original)}" if original else "model_type llava without a vision_config"
        return (f"is in the original LLaVA repository's layout ({found}), which transformers' Llava classes do not read",
                "convert it with transformers' models/llava/convert_llava_weights_to_hf.py (LLaVA-1.5 checkpoints), "
                f"or rebuild it from its parts: {COMPOSE_HINT}")
    if model_type == "llava":
        missing = [key for key in ("vision_config", "text_config") if key not in config]
        if missing:
            return f"is a llava config without {' and '.join(missing)}", "save it again with transformers' LlavaForConditionalGeneration"
        return None
    architectures = config.get("architectures") or []
    if any(name.endswith("ForCausalLM") for name in architectures):
        return (f"holds a text-only language model ({model_type}), not a vision-language model",
                f"compose a VLM from it: {COMPOSE_HINT}")
    return (f"has model_type {model_type!r}: this project trains the Llava layout (vision_tower + multi_modal_projector "
            "+ language_model, a fixed number of visual tokens per image)",
            f"use a model_type llava checkpoint (e.g. the llava-hf family), or {COMPOSE_HINT}")


def check_llava_layout(config: dict, uri: str) -> None:
    """Raises UnsupportedCheckpointError (what is wrong, how to convert) unless `config` is the
    Hugging Face Llava layout."""
    problem = layout_problem(config)
    if problem is not None:
        raise UnsupportedCheckpointError(f"{uri} {problem[0]}: {problem[1]}")


def count_visual_tokens(*, image_size: int, patch_size: int, vision_model_type: str, select_strategy: str) -> int:
    """Visual tokens the connector emits per image: the patch grid, plus CLIP's class token, minus
    one when the "default" strategy drops the first token (SigLIP-384 + default gives 728, not 729)."""
    tokens = (image_size // patch_size) ** 2
    if vision_model_type == "clip_vision_model":
        tokens += 1
    if select_strategy == "default":
        tokens -= 1
    return tokens


def visual_tokens(config: dict) -> int:
    """Visual tokens one image becomes, from a Llava `config.json`."""
    vision = config["vision_config"]
    return count_visual_tokens(image_size=vision["image_size"], patch_size=vision["patch_size"],
                               vision_model_type=vision.get("model_type", ""),
                               select_strategy=config.get("vision_feature_select_strategy", "default"))


def pixel_settings(image_processor: dict) -> dict:
    """The settings of a `preprocessor_config.json` that decide the pixels (and the class family)."""
    family = str(image_processor.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
    return {"family": family, **{key: image_processor.get(key) for key in PIXEL_KEYS}}


def pair_problems(learner: ModelFolder, teacher: ModelFolder) -> list[tuple[str, str]]:
    """(what is wrong, how to fix it) for each reason `teacher` cannot teach `learner`. The teacher
    reads the learner's preprocessed rows, so both must tokenize alike, expand an image to as
    many tokens under the same image-token id, and expect the same pixels; padded vocabularies
    (151936 vs 152064 rows) are fine as long as both cover the tokenizer."""
    same_parts = "compose both from LLMs of one family (one tokenizer) and the same --vision folder"
    problems = []
    if learner.tokenizer_fingerprint and teacher.tokenizer_fingerprint and learner.tokenizer_fingerprint != teacher.tokenizer_fingerprint:
        problems.append((f"{teacher.uri} and {learner.uri} use different tokenizers (fingerprints "
                         f"{teacher.tokenizer_fingerprint} vs {learner.tokenizer_fingerprint})",
                         f"distillation compares logits token by token: give both models the same tokenizer ({same_parts})"))
    for folder in (learner, teacher):
        length = folder.tokenizer_length
        if length and folder.vocab_rows and folder.vocab_rows < length:
            problems.append((f"{folder.uri} has {folder.vocab_rows} embedding rows for a tokenizer of {length} tokens",
                             "resize its embeddings to the tokenizer (ckd-ray models compose does)"))
    if learner.config.get("model_type") == teacher.config.get("model_type") == "llava":
        if visual_tokens(learner.config) != visual_tokens(teacher.config):
            problems.append((f"an image is {visual_tokens(teacher.config)} visual tokens for {teacher.uri} but "
                             f"{visual_tokens(learner.config)} for {learner.uri}",
                             f"the teacher reads the learner's token sequence: {same_parts}, with the same --select-strategy"))
        image_ids = learner.config.get("image_token_index"), teacher.config.get("image_token_index")
        if image_ids[0] != image_ids[1]:
            problems.append((f"the image token id is {image_ids[1]} for {teacher.uri} but {image_ids[0]} for {learner.uri}",
                             f"give both the same tokenizer with one `{IMAGE_TOKEN}` token ({same_parts})"))
    if learner.image_processor and teacher.image_processor:
        ours, theirs = pixel_settings(learner.image_processor), pixel_settings(teacher.image_processor)
        differing = sorted(key for key in ours if ours[key] != theirs[key])
        if differing:
            problems.append((f"the image processors of {teacher.uri} and {learner.uri} differ in {', '.join(differing)}",
                             f"the teacher sees the learner's pixels: {same_parts}"))
    return problems
