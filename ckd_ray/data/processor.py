"""The student's input side: tokenizer, image processor, chat format, and how many visual tokens one
image becomes. `build_processor_dir` trains the benchmark's tokenizer; `Processor.load` reads any
Hugging Face processor folder (local or s3://)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

PAD_TOKEN = "<pad>"
END_OF_TEXT_TOKEN = "<|endoftext|>"
TURN_START_TOKEN = "<|im_start|>"
TURN_END_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
# Fixed ids 0..4, in this order: the tiny model presets hard-code pad 0, eos (<|im_end|>) 3, image 4.
SPECIAL_TOKENS = (PAD_TOKEN, END_OF_TEXT_TOKEN, TURN_START_TOKEN, TURN_END_TOKEN, IMAGE_TOKEN)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

# Qwen2's pre-tokenizer split: contractions, words with one leading non-letter, single digits,
# punctuation runs, newlines, spaces. Digits one by one keep numbers compositional in a tiny vocab.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Renders exactly what `render_chat` renders (a test holds them together). String content is used as
# is (LLaVA records carry the `<image>` placeholder in the text); list content in the transformers
# style puts `<image>\n` where an image part is.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class RenderedChat:
    """A conversation as one string, with the character spans that decide masks: `responses` cover each
    assistant answer and its closing `<|im_end|>`; `prompts` cover each human turn's text."""

    text: str
    responses: tuple[tuple[int, int], ...]
    prompts: tuple[tuple[int, int], ...]


def render_chat(conversations: Sequence[dict]) -> RenderedChat:
    """Renders LLaVA turns (`from` human/gpt/system, `value`) in the Qwen chat format of `CHAT_TEMPLATE`."""
    pieces: list[str] = []
    responses: list[tuple[int, int]] = []
    prompts: list[tuple[int, int]] = []
    position = 0
    for k, turn in enumerate(conversations):
        role = ROLES[turn["from"]]
        head = f"{TURN_START_TOKEN}{role}\n"
        content = turn["value"]
        tail = TURN_END_TOKEN + ("\n" if k < len(conversations) - 1 else "")
        start = position + len(head)
        if role == "assistant":
            responses.append((start, start + len(content) + len(TURN_END_TOKEN)))
        elif role == "user":
            prompts.append((start, start + len(content)))
        pieces += (head, content, tail)
        position += len(head) + len(content) + len(tail)
    return RenderedChat("".join(pieces), tuple(responses), tuple(prompts))


class Processor:
    """Tokenizer + image processor + `num_image_tokens`, the number of visual tokens one image becomes
    in the LLM sequence (`(image_size // patch_size) ** 2` for a SigLIP tower: 16 for the tiny
    presets). The one `<image>` placeholder of a prompt expands to that many image-token ids.

    Picklable, so Ray Data tasks receive it as a function argument. Pickled, it carries what
    preprocessing uses: the Rust tokenizer and, where the image processor is one `PixelTransform`
    reproduces, that (see `__getstate__`), so a task's process does not import transformers and
    torch (3 CPU-s per worker process) to unpickle it."""

    def __init__(self, tokenizer, image_processor, num_image_tokens: int):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1")
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_TOKEN, TURN_START_TOKEN, TURN_END_TOKEN)}
        missing = [token for token, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"the tokenizer has no {missing} token(s): add them as special tokens")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.image_token_id: int = ids[IMAGE_TOKEN]
        self.eos_token_id: int = ids[TURN_END_TOKEN]
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer, when there is one

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        pixels = PixelTransform.of(self.image_processor)
        if self.backend is not None and pixels is not None:
            # The transformers objects stay behind (`tokenizer` is None in the copy).
            state.update(tokenizer=None, image_processor=pixels, backend=self.backend.to_str())
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("backend"), str):
            from tokenizers import Tokenizer

            state = {**state, "backend": Tokenizer.from_str(state["backend"])}
        self.__dict__.update(state)

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Token ids and character offsets of each text, adding no special tokens (the rendered chat
        holds its own). Calls the Rust tokenizer directly: the transformers wrapper's per-text
        conversion costs more than the tokenization itself on short samples."""
        backend = self.backend
        if backend is None:
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            return encoded["input_ids"], encoded["offset_mapping"]
        backend.no_truncation()
        backend.no_padding()
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image's `pixel_values`."""
        size = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        if "height" in size:
            return 3, int(size["height"]), int(size["width"])
        return 3, int(size["shortest_edge"]), int(size["shortest_edge"])

    @classmethod
    def load(cls, uri: str | Path, num_image_tokens: int) -> "Processor":
        """Loads the tokenizer and image processor saved in `uri` (a local folder or an s3:// prefix,
        mirrored to the local cache first)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        from ckd_ray import storage

        local = storage.download_dir(str(uri))
        return cls(AutoTokenizer.from_pretrained(local), AutoImageProcessor.from_pretrained(local), num_image_tokens)


@dataclass(frozen=True)
class PixelTransform:
    """The pixel values a transformers image processor of the PIL backend makes of RGB PIL images
    when it resizes to a fixed (height, width) without crop or padding (SigLIP's), in PIL and
    numpy alone, step for step as transformers does them (a test holds them equal): resize in
    PIL, rescale in float64 then float32, normalize in float32, channels first."""

    size: dict
    resample: int
    do_resize: bool
    rescale_factor: float | None
    image_mean: tuple[float, ...] | None
    image_std: tuple[float, ...] | None

    @classmethod
    def of(cls, image_processor) -> "PixelTransform | None":
        """The transform that makes what `image_processor` makes, or None where it does something else.
        A transform is its own: a shipped copy is pickled on where it goes (a Ray Data coordinator
        hands it to its tasks), and asking transformers there would import transformers and torch
        (about 5 CPU-s in each step's coordinator)."""
        if isinstance(image_processor, cls):
            return image_processor
        try:
            from transformers.image_processing_backends import PilBackend
        except ImportError:
            return None
        kind = type(image_processor)
        steps = ("_preprocess", "resize", "rescale", "normalize", "process_image", "convert_to_rgb", "preprocess", "__call__")
        if not isinstance(image_processor, PilBackend) or any(getattr(kind, n) is not getattr(PilBackend, n) for n in steps):
            return None
        settings = image_processor.to_dict()
        size = dict(settings.get("size") or {})
        if set(size) != {"height", "width"} or settings.get("do_center_crop") or settings.get("do_pad"):
            return None

        def per_channel(value):
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3

        return cls(
            size={"height": int(size["height"]), "width": int(size["width"])},
            resample=int(settings.get("resample") if settings.get("resample") is not None else 2),  # PIL's BILINEAR
            do_resize=bool(settings.get("do_resize")),
            rescale_factor=float(settings["rescale_factor"]) if settings.get("do_rescale") else None,
            image_mean=per_channel(settings["image_mean"]) if settings.get("do_normalize") else None,
            image_std=per_channel(settings["image_std"]) if settings.get("do_normalize") else None,
        )

    def __call__(self, images: Sequence, return_tensors: str = "np") -> dict:
        import numpy as np

        out = []
        for image in images:
            if self.do_resize:
                image = image.resize((self.size["width"], self.size["height"]), resample=self.resample)
            pixels = np.moveaxis(np.array(image), -1, 0)
            if self.rescale_factor is not None:
                pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.image_mean is not None:
                pixels = pixels.astype(np.float32) if not np.issubdtype(pixels.dtype, np.floating) else pixels
                mean, std = np.array(self.image_mean, dtype=pixels.dtype), np.array(self.image_std, dtype=pixels.dtype)
                pixels = ((pixels.T - mean) / std).T
            out.append(pixels)
        return {"pixel_values": np.stack(out)}


def build_processor_dir(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512, image_size: int = 32):
    """Trains a byte-level BPE tokenizer (Qwen-style pre-tokenization) on `texts` and saves it with a
    SigLIP image processor config in `out_dir`, loadable by `AutoTokenizer` and `AutoImageProcessor`.
    The special tokens get ids 0..4 in `SPECIAL_TOKENS` order. Returns the tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if core.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {core.token_to_id(token)}, expected {expected_id}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=TURN_END_TOKEN,
        additional_special_tokens=[END_OF_TEXT_TOKEN, TURN_START_TOKEN, IMAGE_TOKEN],
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    # Name the class both transformers 4.x and 5.x resolve (5.x writes its internal backend name).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    siglip_image_processor(image_size).save_pretrained(out)
    return tokenizer


def siglip_image_processor(image_size: int):
    """The benchmark's SigLIP image processor: resize to `image_size` square, scale to [-1, 1]."""
    try:  # transformers 5 without torchvision: the PIL backend, saved under the same processor type
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    return SiglipImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
