"""Tiny pretrained parts, made offline on CPU from a benchmark's training split, in the layouts real
checkpoints have: a SigLIP vision tower with its image processor, and Qwen2 causal LMs with the
benchmark's tokenizer. `ckd-ray models compose` then joins them into Llava folders exactly as it
joins a public Qwen2.5 LLM and a SigLIP tower, so the tiny path is the path a real run takes.

- **Vision** (`pretrain_vision`): a SigLIP vision tower trained to name the digit shown and its ink
  colour (two linear heads on its mean-pooled last layer, dropped afterwards); its accuracy on the
  validation split is the figure that says it sees.
- **Language** (`pretrain_llm`): a Qwen2 LM per size (`LLM_SHAPES`: capacity doubling from
  student to TA to teacher) trained for the same number of steps on the benchmark's text: the
  knowledge graph's facts as sentences, the training split's captions, and its question-answer
  turns in the chat format with the image left out. Its perplexity on the fact sentences and on the
  validation split's text is printed; with today's 75 facts every size holds them all.

Every folder is cached by content (what it was built with + a digest of the data it read): a
second `pretrain_parts` with the same inputs returns the folders it finds instead of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ckd_ray.models.presets import EOS_TOKEN_ID, PAD_TOKEN_ID, TINY_PRESETS, TINY_VOCAB_SIZE, TextTower

# The tower every tiny part composes with: 16 visual tokens of 32x32 images, wide and deep enough
# to learn digits (the random presets' tower is 32 wide and 1 layer).
PRETRAINED_VISION = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_channels=3)
LLM_SIZES = ("student", "ta", "teacher")


def llm_shape(size: str) -> TextTower:
    """The Qwen2 shape of the pretrained LLM of `size`."""
    return LLM_SHAPES[size]


# Capacity doubles at each level (0.35M, 0.66M, 1.45M parameters with the 512-token vocabulary),
# all of them shallow: at these sizes a wider model learns to read the image in fewer steps, while
# the random presets' 6-layer teacher trained worse than the 3-layer TA and cost 1.2 s a step on 2
# cores (benchmarks/RESULTS.md, "How many steps a composed model needs").
LLM_SHAPES: dict[str, TextTower] = {
    "student": TINY_PRESETS["tiny-student"].text,  # 96 wide, 2 layers
    "ta": TextTower(128, 384, 3, 4, 2, TINY_VOCAB_SIZE),
    "teacher": TINY_PRESETS["tiny-ta"].text,  # 192 wide, 3 layers
}
# The tower's heads were trained on its last layer, so that is the layer that sees: Llava reads it
# (a 2-layer tower's second-to-last layer, LLaVA's usual choice, is half of it).
VISION_FEATURE_LAYER = -1
INK_COLOURS = ("black", "red", "green", "blue")


@dataclass(frozen=True)
class VisionRecipe:
    """How the vision tower is trained."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class LanguageRecipe:
    """How each LLM is trained: the same steps and batches for every size (150 steps: the facts'
    perplexity is as low at 300 for every size, and the teacher's steps cost 0.7 s each)."""

    steps: int = 150
    batch_size: int = 32
    max_tokens: int = 64
    lr: float = 3e-3
    seed: int = 0


@dataclass
class PretrainedParts:
    """Where the parts are and what they scored (`figures`: vision accuracy, LM perplexities,
    seconds each took), and the Llava folders composed from them (`composed`: role -> folder)."""

    vision: str
    llms: dict[str, str]
    figures: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    reused: list[str] = field(default_factory=list)
    composed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        v = self.figures.get("vision", {})
        lines = [f"vision tower {self.vision}: val digit accuracy {v.get('val_digit_accuracy', float('nan')):.3f}, "
                 f"ink colour {v.get('val_colour_accuracy', float('nan')):.3f} (chance 0.100 / 0.250)"
                 + (" [cached]" if self.vision in self.reused else "")]
        for size, uri in self.llms.items():
            f = self.figures.get(size, {})
            lines.append(f"LLM {size} {uri}: {f.get('parameters', 0):,} parameters, perplexity on the facts "
                         f"{f.get('fact_perplexity', float('nan')):.2f}, on held-out (val) question-answer text "
                         f"{f.get('val_perplexity', float('nan')):.2f}" + (" [cached]" if uri in self.reused else ""))
        for role, folder in self.composed.items():
            lines.append(f"{role}: {folder}  (ckd-ray models compose --llm {self.llms[role]} --vision {self.vision} "
                         f"--vision-feature-layer {VISION_FEATURE_LAYER} --out {folder})" + (" [cached]" if folder in self.reused else ""))
        lines.append(f"pretrained parts ready in {self.seconds:.1f} s")
        return "\n".join(lines)


def data_digest(benchmark_root: str | Path) -> str:
    """Digest of what the parts read: the benchmark's records, facts and tokenizer."""
    root = Path(benchmark_root)
    digest = hashlib.sha256()
    for name in ("instructions.json", "captions.json", "knowledge_graph.jsonl", "processor/tokenizer.json"):
        digest.update(name.encode())
        digest.update(hashlib.sha256((root / name).read_bytes()).digest())
    return digest.hexdigest()[:16]


def pretrain_parts(benchmark_root: str | Path, out_dir: str | Path, *, vision: VisionRecipe = VisionRecipe(),
                   language: LanguageRecipe = LanguageRecipe(), sizes: tuple[str, ...] = LLM_SIZES,
                   compose_into: str | Path | None = None, log: Callable[[str], None] = print) -> PretrainedParts:
    """The vision tower and one LLM per size in `out_dir`, each in a folder named by its content
    digest; folders already there are reused, not retrained. With `compose_into`, also the Llava
    folder of each size, `<compose_into>/<size>`, composed by `ckd_ray.models.compose` (what
    `ckd-ray models compose` runs) from that size's LLM and the tower; a folder composed from other
    parts is composed again."""
    started = time.perf_counter()
    root, out = Path(benchmark_root), Path(out_dir)
    data = data_digest(root)
    parts = PretrainedParts(vision="", llms={})
    vision_key = _key({"part": "vision", "tower": PRETRAINED_VISION, "recipe": asdict(vision), "data": data})
    parts.vision = str(out / f"vision-{vision_key}")
    parts.figures["vision"] = _cached(Path(parts.vision), parts, lambda tmp: pretrain_vision(root, tmp, vision, log))
    for size in sizes:
        key = _key({"part": "llm", "text": asdict(llm_shape(size)), "recipe": asdict(language), "data": data})
        folder = out / f"llm-{size}-{key}"
        parts.llms[size] = str(folder)
        parts.figures[size] = _cached(folder, parts, lambda tmp, s=size: pretrain_llm(root, tmp, s, language, log))
    for size in sizes if compose_into is not None else ():
        parts.composed[size] = _compose(parts, size, Path(compose_into) / size, log)
    parts.seconds = time.perf_counter() - started
    return parts


COMPOSED_FROM = "composed_from.json"


def _compose(parts: PretrainedParts, size: str, folder: Path, log: Callable[[str], None]) -> str:
    from ckd_ray.models.compose import ComposeSpec, compose_model

    made_from = {"llm": parts.llms[size], "vision": parts.vision, "vision_feature_layer": VISION_FEATURE_LAYER}
    record = folder / COMPOSED_FROM
    if record.exists() and json.loads(record.read_text()) == made_from:
        parts.reused.append(str(folder))
        return str(folder)
    shutil.rmtree(folder, ignore_errors=True)
    composed = compose_model(ComposeSpec(llm=parts.llms[size], vision=parts.vision, out=str(folder),
                                         vision_feature_layer=VISION_FEATURE_LAYER))
    record.write_text(json.dumps(made_from, indent=2) + "\n")
    log(f"[pretrain] composed {size}: {composed.num_image_tokens} visual tokens, {sum(composed.num_parameters.values()):,} parameters -> {folder}")
    return str(folder)


def _key(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _cached(folder: Path, parts: PretrainedParts, build: Callable[[Path], dict]) -> dict:
    """The figures of `folder`'s part, building it first where it is not there yet (into a
    temporary folder beside it, renamed when complete: an interrupted build leaves nothing)."""
    figures_file = folder / "pretrain.json"
    if figures_file.exists():
        parts.reused.append(str(folder))
        return json.loads(figures_file.read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        figures = build(staging)
        (staging / "pretrain.json").write_text(json.dumps(figures, indent=2) + "\n")
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return figures


def _records(root: Path, kind: str, split: str) -> list[dict]:
    return [r for r in json.loads((root / f"{kind}.json").read_text()) if r["split"] == split]


# ---------------------------------------------------------------------------------------------- vision


def _image_arrays(root: Path, records: list[dict], image_processor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels (the processor's own transform), digit and colour labels of each record's image."""
    from PIL import Image

    images = [Image.open(root / "images" / r["image"]).convert("RGB") for r in records]
    pixels = image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
    digits = np.array([int(r["digit"]) for r in records])
    colours = np.array([INK_COLOURS.index(r["color"]) for r in records])
    return pixels, digits, colours


def pretrain_vision(root: Path, out: Path, recipe: VisionRecipe, log: Callable[[str], None] = print) -> dict:
    """Trains a SigLIP vision tower to name each training image's digit and ink colour; saves the
    tower (no heads) with the benchmark's image processor into `out`; returns its figures."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    image_processor = SiglipImageProcessor.from_pretrained(root / "processor")
    train = _image_arrays(root, _records(root, "captions", "train"), image_processor)
    val = _image_arrays(root, _records(root, "captions", "val"), image_processor)
    config = SiglipVisionConfig(**PRETRAINED_VISION, vision_use_head=False)
    tower = SiglipVisionModel(config)
    heads = torch.nn.ModuleDict({"digit": torch.nn.Linear(config.hidden_size, 10), "colour": torch.nn.Linear(config.hidden_size, 4)})
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    rng = np.random.default_rng(recipe.seed)
    pixels, digits, colours = (torch.from_numpy(a) for a in train)

    def logits(batch_pixels):
        # Mean over the last layer's patch states: what Llava reads (before the post-layernorm).
        features = tower(pixel_values=batch_pixels, output_hidden_states=True).hidden_states[-1].mean(dim=1)
        return heads["digit"](features), heads["colour"](features)

    tower.train()
    for step in range(recipe.steps):
        index = torch.from_numpy(rng.integers(0, len(digits), size=recipe.batch_size))
        batch = _shift(pixels[index], rng)  # a pixel or two of shift: 1,438 images are few
        digit_logits, colour_logits = logits(batch)
        loss = torch.nn.functional.cross_entropy(digit_logits, digits[index]) + torch.nn.functional.cross_entropy(colour_logits, colours[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"[pretrain] vision step {step + 1}/{recipe.steps}: loss {loss.item():.3f}")
    tower.eval()
    with torch.no_grad():
        digit_logits, colour_logits = logits(torch.from_numpy(val[0]))
    figures = {
        "seconds": round(time.perf_counter() - started, 1),
        "val_digit_accuracy": float((digit_logits.argmax(-1).numpy() == val[1]).mean()),
        "val_colour_accuracy": float((colour_logits.argmax(-1).numpy() == val[2]).mean()),
        "parameters": sum(p.numel() for p in tower.parameters()),
        "recipe": asdict(recipe),
    }
    tower.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)
    log(f"[pretrain] vision tower: val digit accuracy {figures['val_digit_accuracy']:.3f}, colour {figures['val_colour_accuracy']:.3f}")
    return figures


def _shift(pixels, rng: np.random.Generator):
    """The batch's images moved by up to one pixel each way; rolled, so the edge that wraps around
    is the digits' white margin."""
    import torch

    dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
    return torch.roll(pixels, shifts=(dy, dx), dims=(2, 3))


# -------------------------------------------------------------------------------------------- language


def language_corpus(root: Path, split: str) -> list[str]:
    """The text an LLM is pretrained on (train) or measured on (val): each fact as a sentence,
    each caption, and each instruction's turns in the chat format with the image left out."""
    from ckd_ray.data.processor import render_chat

    texts = []
    if split == "train":
        texts += [json.loads(line)["text"] for line in (root / "knowledge_graph.jsonl").read_text().splitlines()]
    for kind in ("captions", "instructions"):
        for record in _records(root, kind, split):
            turns = [{**t, "value": t["value"].replace("<image>\n", "").replace("<image>", "")} for t in record["conversations"]]
            texts.append(render_chat(turns).text)
    return texts


def _token_batches(tokenizer, texts: list[str], max_tokens: int) -> np.ndarray:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = np.full((len(ids), max_tokens), PAD_TOKEN_ID, dtype=np.int64)
    for row, seq in enumerate(ids):
        seq = (seq + [EOS_TOKEN_ID])[:max_tokens]
        out[row, : len(seq)] = seq
    return out


def _perplexity(model, tokens: np.ndarray, batch_size: int = 128) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = torch.from_numpy(tokens[start : start + batch_size])
            labels = batch.masked_fill(batch == PAD_TOKEN_ID, -100)
            logits = model(input_ids=batch, attention_mask=(batch != PAD_TOKEN_ID).long()).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / max(count, 1))


def pretrain_llm(root: Path, out: Path, size: str, recipe: LanguageRecipe, log: Callable[[str], None] = print) -> dict:
    """Trains the Qwen2 LM of preset `tiny-<size>` on `language_corpus(root, "train")` for
    `recipe.steps` steps; saves it with the benchmark's tokenizer into `out`; returns its figures
    (perplexity on the fact sentences and on the validation split's text)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    text = llm_shape(size)
    tokenizer = AutoTokenizer.from_pretrained(root / "processor")
    config = Qwen2Config(vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                         num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                         num_key_value_heads=text.num_key_value_heads, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    corpus = _token_batches(tokenizer, language_corpus(root, "train"), recipe.max_tokens)
    facts = _token_batches(tokenizer, [json.loads(line)["text"] for line in (root / "knowledge_graph.jsonl").read_text().splitlines()],
                           recipe.max_tokens)
    val = _token_batches(tokenizer, language_corpus(root, "val"), recipe.max_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    rng = np.random.default_rng(recipe.seed)
    model.train()
    for step in range(recipe.steps):
        # Every batch holds a share of fact sentences: they are few beside the question text.
        num_facts = recipe.batch_size // 4
        rows = np.concatenate([corpus[rng.integers(0, len(corpus), size=recipe.batch_size - num_facts)],
                               facts[rng.integers(0, len(facts), size=num_facts)]])
        batch = torch.from_numpy(rows[:, : int((rows != PAD_TOKEN_ID).sum(axis=1).max())])  # no all-padding columns
        labels = batch.masked_fill(batch == PAD_TOKEN_ID, -100)
        loss = model(input_ids=batch, attention_mask=(batch != PAD_TOKEN_ID).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"[pretrain] LLM {size} step {step + 1}/{recipe.steps}: loss {loss.item():.3f}")
    model.eval()
    figures = {"seconds": round(time.perf_counter() - started, 1), "parameters": sum(p.numel() for p in model.parameters()),
               "fact_perplexity": _perplexity(model, facts),
               "val_perplexity": _perplexity(model, val), "recipe": asdict(recipe)}
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log(f"[pretrain] LLM {size}: perplexity on the facts {figures['fact_perplexity']:.2f}, on val text {figures['val_perplexity']:.2f}")
    return figures
