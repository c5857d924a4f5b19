"""The model family: tiny presets that build offline from `transformers` config classes, and the
paper's real sizes, described so that a directory holding them can be checked before loading.

All tiny presets share one SigLIP vision tower config and one tokenizer (the bundled benchmark's),
so any of them can teach any other; capacity rises student < TA < teacher (~0.3M, 1.5M, 6M).
`small-teacher` (~26M) is a larger teacher for measuring how a teacher's cost grows with its size.
"""

from __future__ import annotations

from dataclasses import dataclass

# Token ids fixed by the bundled benchmark's tokenizer (ckd_ray.data.kvqa writes it).
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 3  # <|im_end|>
IMAGE_TOKEN_ID = 4  # <image>
TINY_VOCAB_SIZE = 512

TINY_VISION = dict(
    image_size=32,
    patch_size=8,  # 32/8 -> 4x4 = 16 visual tokens
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_channels=3,
)


@dataclass(frozen=True)
class TextTower:
    """Shape of a Qwen2 language model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int


@dataclass(frozen=True)
class Preset:
    """A named model size. Tiny presets are built from scratch (`buildable`); real sizes name the
    checkpoint a user supplies as a directory and the shapes it must have."""

    name: str
    text: TextTower
    buildable: bool
    checkpoint_hint: str = ""


TINY_PRESETS = {
    "tiny-student": Preset("tiny-student", TextTower(96, 256, 2, 4, 2, TINY_VOCAB_SIZE), True),
    "tiny-ta": Preset("tiny-ta", TextTower(192, 512, 3, 4, 2, TINY_VOCAB_SIZE), True),
    "tiny-teacher": Preset("tiny-teacher", TextTower(288, 768, 6, 4, 2, TINY_VOCAB_SIZE), True),
    "small-teacher": Preset("small-teacher", TextTower(512, 1536, 8, 8, 4, TINY_VOCAB_SIZE), True),
}

# The paper's sizes (SigLIP-B/14-384 + Qwen2.5 LLMs). Loaded from a directory (`model.path`);
# the shapes let the planner report signal bytes and check a directory before a long load.
REAL_PRESETS = {
    "qwen2.5-0.5b-siglip": Preset("qwen2.5-0.5b-siglip", TextTower(896, 4864, 24, 14, 2, 151936), False, "TinyLLaVA-style Qwen2.5-0.5B"),
    "qwen2.5-1.5b-siglip": Preset("qwen2.5-1.5b-siglip", TextTower(1536, 8960, 28, 12, 2, 151936), False, "TinyLLaVA-style Qwen2.5-1.5B"),
    "qwen2.5-3b-siglip": Preset("qwen2.5-3b-siglip", TextTower(2048, 11008, 36, 16, 2, 151936), False, "TinyLLaVA-style Qwen2.5-3B"),
    "qwen2.5-7b-siglip": Preset("qwen2.5-7b-siglip", TextTower(3584, 18944, 28, 28, 4, 152064), False, "TinyLLaVA-style Qwen2.5-7B"),
}
# SigLIP-B/14 at 384 px: 27x27 = 729 visual tokens.
REAL_VISION = dict(image_size=384, patch_size=14, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)

PRESETS = {**TINY_PRESETS, **REAL_PRESETS}


def approx_text_parameters(text: TextTower) -> int:
    """Parameter count of a Qwen2 LLM of this shape (tied embeddings for the tiny ones, untied
    lm_head for the real ones is within a few percent and does not change the ordering)."""
    head_dim = text.hidden_size // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    attention = text.hidden_size * (text.hidden_size + 2 * kv) + (text.hidden_size + 2 * kv) + text.hidden_size**2
    mlp = 3 * text.hidden_size * text.intermediate_size
    return text.vocab_size * text.hidden_size + text.num_hidden_layers * (attention + mlp + 2 * text.hidden_size)
