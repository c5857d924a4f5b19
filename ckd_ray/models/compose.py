"""A Hugging Face Llava folder composed from public parts, the TinyLLaVA way: a causal-LM folder
(Qwen2 / Qwen2.5 first), a vision-tower folder (SigLIP or CLIP, a vision-only model or a full
image-text model whose vision half is taken) and a freshly initialised 2-layer MLP connector.

The folder loads with transformers alone (`AutoProcessor`, `LlavaForConditionalGeneration`):
config.json, safetensors weights, the LLM's tokenizer with `<image>` (and the ChatML turn tokens
the project's chat format uses, where the tokenizer lacks them), the vision tower's image
processor, a LlavaProcessor config and the chat template of `ckd_ray.data.processor`. The
connector is untrained: PT (or DPT) trains it before the model is of any use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from ckd_ray import storage
from ckd_ray.section import Section
from ckd_ray.data.processor import CHAT_TEMPLATE, IMAGE_TOKEN, TURN_END_TOKEN, TURN_START_TOKEN
from ckd_ray.models.folders import ORIGINAL_LLAVA_KEYS, count_visual_tokens

# Connector names in TinyLLaVA's spelling -> the activation of transformers' Llava projector
# (Linear(vision, text) -> act -> Linear(text, text)), the only connector shape Llava loads.
CONNECTORS = {"mlp2x_gelu": "gelu"}
# config.json model_type -> the vision-only model_type Llava builds its tower from.
VISION_MODEL_TYPES = {
    "siglip_vision_model": "siglip_vision_model",
    "siglip": "siglip_vision_model",
    "clip_vision_model": "clip_vision_model",
    "clip": "clip_vision_model",
}
# New embedding rows are padded to a multiple of this (tensor-core friendly matmul shapes).
VOCAB_MULTIPLE = 64


class ComposeError(ValueError):
    """The parts cannot become one model; the message lists each problem and its fix."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"cannot compose a model ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  - {what} -> fix: {fix}" for what, fix in problems]
        super().__init__("\n".join(lines))


class ComposeSpec(Section):
    """What `compose_model` builds: which parts, where to, and how they are joined."""

    llm: str
    """Causal-LM folder (local or s3://) with config.json, safetensors weights and its tokenizer."""
    vision: str
    """Vision folder (local or s3://): a SigLIP or CLIP vision model, or a full SigLIP/CLIP model
    (its vision half is taken), with its preprocessor_config.json."""
    out: str
    """Output folder (local or s3://); must not exist yet, or be empty."""
    connector: Literal["mlp2x_gelu"] = "mlp2x_gelu"
    """Connector between vision features and the LLM: TinyLLaVA's 2-layer MLP with GELU."""
    vision_feature_layer: int = -2
    """Vision tower layer whose output feeds the connector (-2: the second to last, as in
    LLaVA-1.5 and TinyLLaVA); 0 is the patch embeddings."""
    select_strategy: Literal["default", "full"] | None = None
    """`default` drops the first visual token (CLIP's class token), `full` keeps every token;
    None picks `default` for CLIP and `full` for SigLIP (which has no class token)."""
    seed: int = Field(0, ge=0)
    """Seed of the connector's initialisation (and of nothing else: every other weight is the parts')."""


@dataclass(frozen=True)
class ComposedModel:
    """What was written: where, from what, and the figures a user checks against their data."""

    uri: str
    llm_type: str
    vision_type: str
    num_image_tokens: int
    image_size: int
    image_token_id: int
    added_tokens: dict[str, int]
    """Tokens the LLM's tokenizer lacked, with their new ids."""
    vocab_rows: tuple[int, int]
    """Embedding rows before and after (equal when the padded vocabulary had room)."""
    num_parameters: dict[str, int] = field(default_factory=dict)
    dtype: str = "float32"

    def summary(self) -> str:
        added = ", ".join(f"{token} {i}" for token, i in self.added_tokens.items()) or "none"
        params = ", ".join(f"{part} {count:,}" for part, count in self.num_parameters.items())
        return (f"composed {self.uri}: {self.llm_type} LLM + {self.vision_type} tower ({self.image_size} px), "
                f"{self.num_image_tokens} visual tokens per image, {self.dtype}\n"
                f"  tokens added: {added}; image token id {self.image_token_id}; embedding rows "
                f"{self.vocab_rows[0]} -> {self.vocab_rows[1]}\n  parameters: {params}")


def compose_model(spec: ComposeSpec) -> ComposedModel:
    """Builds the Llava folder of `spec`; raises ComposeError (every problem, each with its fix)
    when the parts cannot fit together, before any weight is read."""
    _check_out(spec.out)
    llm_dir, vision_dir = storage.download_dir(spec.llm), storage.download_dir(spec.vision)
    parts = _inspect_parts(spec, llm_dir, vision_dir)
    llm, tokenizer, added, rows = _load_llm(llm_dir)
    vision_tower = _load_vision(vision_dir, parts.vision_config)
    model = _assemble(spec, parts, llm, vision_tower, tokenizer)

    if storage.is_s3(spec.out):
        with tempfile.TemporaryDirectory(prefix="ckd-compose-") as staging:
            _save(model, tokenizer, parts, spec, Path(staging))
            storage.upload_dir(staging, spec.out)
    else:
        out = Path(storage.parse(spec.out).path)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed at the end: a failed run leaves no half folder at `out`.
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.composing-", dir=out.parent))
        try:
            _save(model, tokenizer, parts, spec, staging)
            if out.exists():
                out.rmdir()  # empty: `_check_out` refused anything else
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    inner = model.model
    return ComposedModel(
        uri=spec.out,
        llm_type=parts.llm_config.model_type,
        vision_type=parts.vision_config.model_type,
        num_image_tokens=parts.num_image_tokens,
        image_size=parts.vision_config.image_size,
        image_token_id=model.config.image_token_index,
        added_tokens=added,
        vocab_rows=rows,
        num_parameters={name: sum(p.numel() for p in getattr(inner, name).parameters())
                        for name in ("vision_tower", "multi_modal_projector", "language_model")},
        dtype=str(parts.dtype).removeprefix("torch."),
    )


@dataclass
class _Parts:
    llm_config: object
    vision_config: object
    image_processor: object
    select_strategy: str
    num_image_tokens: int
    dtype: object


def _check_out(out: str) -> None:
    if storage.is_s3(out):
        taken = storage.exists(out)
    else:
        path = Path(storage.parse(out).path)
        taken = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if taken:
        raise ComposeError([(f"--out {out} exists and is not empty", "choose a new folder, or delete that one first")])


def _inspect_parts(spec: ComposeSpec, llm_dir: Path, vision_dir: Path) -> _Parts:
    """The configs and image processor of both parts, and every reason they do not fit together."""
    import json

    import torch
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    problems: list[tuple[str, str]] = []
    for role, folder in (("--llm", llm_dir), ("--vision", vision_dir)):
        if not (folder / "config.json").exists():
            problems.append((f"{role} {folder} holds no config.json", "give a Hugging Face model folder (save_pretrained output)"))
        elif not any(folder.glob("*.safetensors")):
            problems.append((f"{role} {folder} holds no *.safetensors weights (pickled .bin files are not loaded)",
                             "convert the weights to safetensors, or download the checkpoint's safetensors files"))
    if problems:
        raise ComposeError(problems)

    llm_raw = json.loads((llm_dir / "config.json").read_text())
    llm_type = llm_raw.get("model_type")
    if "vision_config" in llm_raw or llm_type in ("llava", "tinyllava") or any(key in llm_raw for key in ORIGINAL_LLAVA_KEYS):
        problems.append((f"--llm {spec.llm} is already a vision-language model ({llm_type})",
                         "give the folder of its language model alone, or use this folder as model.path directly"))
    elif llm_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or llm_type not in MODEL_MAPPING_NAMES:
        problems.append((f"--llm {spec.llm} has model_type {llm_type!r}, not a decoder-only causal LM transformers knows",
                         "give a causal-LM folder (Qwen2/Qwen2.5 tested; Llama, Mistral and other decoder-only families load the same way)"))

    vision_raw = json.loads((vision_dir / "config.json").read_text())
    vision_type = vision_raw.get("model_type")
    if vision_type not in VISION_MODEL_TYPES:
        problems.append((f"--vision {spec.vision} has model_type {vision_type!r}",
                         f"give a SigLIP or CLIP folder (model_type one of {sorted(VISION_MODEL_TYPES)})"))
    image_processor = None
    try:
        image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    except (OSError, ValueError) as err:
        problems.append((f"--vision {spec.vision} has no image processor ({type(err).__name__})",
                         "add the checkpoint's preprocessor_config.json to the folder"))
    if problems:
        raise ComposeError(problems)

    llm_config = AutoConfig.from_pretrained(llm_dir)
    vision_config = AutoConfig.from_pretrained(vision_dir)
    if VISION_MODEL_TYPES[vision_type] != vision_type:
        vision_config = vision_config.vision_config  # a full image-text model: its vision half
    select_strategy = spec.select_strategy or ("default" if vision_config.model_type == "clip_vision_model" else "full")

    layers = vision_config.num_hidden_layers
    if not -(layers + 1) <= spec.vision_feature_layer <= layers:
        problems.append((f"--vision-feature-layer {spec.vision_feature_layer} is outside the tower's {layers} layers",
                         f"give a layer in -{layers + 1}..{layers} (-2, the second to last, is LLaVA's choice)"))
    pixels = _output_size(image_processor)
    if pixels is None:
        problems.append((f"the image processor of --vision {spec.vision} resizes by the shortest edge without a center crop",
                         "the tower needs square images: give it a fixed size or a center crop in preprocessor_config.json"))
    elif pixels != (vision_config.image_size, vision_config.image_size):
        problems.append((f"the image processor of --vision {spec.vision} makes {pixels[0]}x{pixels[1]} images but the tower "
                         f"expects {vision_config.image_size}x{vision_config.image_size}",
                         "use the preprocessor_config.json that ships with that vision checkpoint"))
    if problems:
        raise ComposeError(problems)
    num_image_tokens = count_visual_tokens(image_size=vision_config.image_size, patch_size=vision_config.patch_size,
                                           vision_model_type=vision_config.model_type, select_strategy=select_strategy)
    dtype = getattr(llm_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return _Parts(llm_config, vision_config, image_processor, select_strategy, num_image_tokens, dtype)


def _output_size(image_processor) -> tuple[int, int] | None:
    """(height, width) of the images the processor makes; None when they are not of a fixed size."""
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop:
        return int(crop["height"]), int(crop["width"])
    size = image_processor.size
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    return None


def _load_llm(llm_dir: Path):
    """The causal LM and its tokenizer, with `<image>` and the ChatML turn tokens added where
    missing, and embedding rows for every token; each new row starts as the mean of the
    existing tokens' rows (a neutral start that keeps the new tokens' logits ordinary)."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    llm, info = AutoModelForCausalLM.from_pretrained(llm_dir, dtype="auto", use_safetensors=True, output_loading_info=True)
    if info["missing_keys"]:
        raise ComposeError([(f"--llm {llm_dir} lacks weights {sorted(info['missing_keys'])[:4]}",
                             "give the complete checkpoint (every *.safetensors shard and its index)")])
    known = len(tokenizer)
    added = {}
    for token in (TURN_START_TOKEN, TURN_END_TOKEN, IMAGE_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken(token, special=True, normalized=False)]},
                                         replace_extra_special_tokens=False)
            added[token] = tokenizer.convert_tokens_to_ids(token)
    rows_before = llm.get_input_embeddings().weight.shape[0]
    needed = max(len(tokenizer), max(added.values(), default=0) + 1)
    new_rows = list(added.values())
    if needed > rows_before:
        llm.resize_token_embeddings(needed, pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=False)
        new_rows = sorted(set(new_rows) | set(range(rows_before, llm.get_input_embeddings().weight.shape[0])))
    with torch.no_grad():
        tables = {id(t): t for t in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)}  # one if tied
        for table in tables.values():
            table[new_rows] = table[: min(known, rows_before)].float().mean(0).to(table.dtype)
    return llm, tokenizer, added, (rows_before, llm.get_input_embeddings().weight.shape[0])


def _load_vision(vision_dir: Path, vision_config):
    """The vision tower alone; from a full SigLIP/CLIP folder its text half is left unread."""
    from transformers import CLIPVisionModel, SiglipVisionModel
    from transformers.utils import logging as hf_logging

    cls = SiglipVisionModel if vision_config.model_type == "siglip_vision_model" else CLIPVisionModel
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full model's text weights are "unexpected": expected here
    try:
        tower, info = cls.from_pretrained(vision_dir, dtype="auto", use_safetensors=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ComposeError([(f"--vision {vision_dir} lacks vision weights {sorted(info['missing_keys'])[:4]}",
                             "give the complete checkpoint of a SigLIP or CLIP model")])
    return tower


def _assemble(spec: ComposeSpec, parts: _Parts, llm, vision_tower, tokenizer):
    """One LlavaForConditionalGeneration holding the parts' own modules (no copy of any weight)
    and a new connector."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=parts.vision_config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=parts.num_image_tokens,
        vision_feature_select_strategy=parts.select_strategy,
        vision_feature_layer=spec.vision_feature_layer,
        projector_hidden_act=CONNECTORS[spec.connector],
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.dtype = parts.dtype
    with torch.device("meta"):  # the skeleton only: its modules are replaced by the parts' below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_tower.to(parts.dtype)
    model.model.language_model = getattr(llm, llm.base_model_prefix)
    model.lm_head = llm.get_output_embeddings()
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(parts.dtype)  # nn.Linear's own init
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"composing left {left[:3]} unset: transformers' Llava has parts this module does not fill")

    generation = llm.generation_config
    end_of_turn = tokenizer.convert_tokens_to_ids(TURN_END_TOKEN)
    generation.eos_token_id = [end_of_turn] + [i for i in [tokenizer.eos_token_id] if i is not None and i != end_of_turn]
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    model.generation_config = generation
    return model.eval()


def _save(model, tokenizer, parts: _Parts, spec: ComposeSpec, out: Path) -> None:
    """Weights (safetensors), config, generation config, tokenizer, image processor and the
    LlavaProcessor files (its image-token count follows the tower and the select strategy)."""
    from ckd_ray.models.builder import llava_processor

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    llava_processor(model.config, tokenizer, parts.image_processor, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    parts.image_processor.save_pretrained(out)  # preprocessor_config.json as well: what transformers 4.x reads
