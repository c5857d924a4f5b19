"""LLaVA records to the student's model inputs: one row per sample, numpy, padded to `max_length`.

Column contract (L = `data.max_length`, F = `data.max_facts`, T = `data.max_fact_tokens`):

    sample_id       str              the record's `id` (else "<source>:<ordinal>")
    input_ids       int32 [L]        chat-formatted tokens; the one `<image>` expanded to
                                     `num_image_tokens` copies of the image token id; right-padded
    attention_mask  int8  [L]        1 on real tokens, 0 on padding
    target_ids      int32 [L]        already shifted: target_ids[t] = input_ids[t+1] where t+1 is a
                                     response token (an assistant answer or its closing <|im_end|>),
                                     else -100
    response_mask   bool  [L]        target_ids != -100
    visual_mask     bool  [L]        the image-token positions
    num_visual      int32            number of image-token positions: num_image_tokens, or 0 for a
                                     text-only record (no `image`, no placeholder; LLaVA-665k has ~40k)
    answer_pos      int32            the position whose next-token prediction is the first response token
    pixel_values    float32 [3,H,W]  from the image processor (zeros for a text-only record)
    hop             int8             0, 1 or 2: supporting facts the question needs
    question_type   str              caption | open | yes_no | multiple_choice
    answer          str              the reference answer, for exact-match evaluation
    fact_token_ids  int32 [F, T]     token ids of each candidate fact's text, padded with -1
    fact_mask       bool  [F]        which rows of fact_token_ids hold a candidate fact
    fact_support    bool  [F]        which candidates are supporting facts

Over-long samples lose prompt text from the left (the facts before the question), never image or
response tokens; with `over_length: reject`, or when that cannot fit, they are rejected.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ckd_ray.data.processor import IMAGE_TOKEN, ROLES, Processor, render_chat
from ckd_ray.data.rejects import Reject

IGNORE_INDEX = -100
FACT_PAD = -1
# A record with more characters than this per token it may hold (the sequence plus every fact
# row) is over-length whatever the tokenizer: tokenizing it first would cost about 450 bytes per
# character (a 10^6-character record took 450 MB), so it is rejected before. Natural text runs
# at 3-5 characters per token; 32 leaves room for long runs of spaces or symbols.
MAX_CHARS_PER_TOKEN = 32


class RecordRejected(Exception):
    """A record that cannot become a sample; `reason` is the short code written to the rejects file."""

    def __init__(self, reason: str, detail: str, sample_id: str | None = None):
        super().__init__(reason, detail, sample_id)
        self.reason, self.detail, self.sample_id = reason, detail, sample_id


@dataclass(frozen=True)
class CheckedRecord:
    """The parts of a valid LLaVA record that preprocessing uses."""

    sample_id: str | None
    conversations: list[dict]
    image_path: str | None  # None: a text-only record
    hop: int
    question_type: str
    answer: str
    facts: list[tuple[str, bool]]


@dataclass(frozen=True)
class InputLimits:
    """The `data` fields that shape model inputs, small enough to ship to every preprocessing task."""

    max_length: int = 128
    over_length: Literal["truncate", "reject"] = "truncate"
    max_facts: int = 8
    max_fact_tokens: int = 12
    max_image_pixels: int = 4096 * 4096

    @classmethod
    def from_config(cls, config) -> "InputLimits":
        return cls(config.max_length, config.over_length, config.max_facts, config.max_fact_tokens, config.max_image_pixels)

    @property
    def max_chars(self) -> int:
        """Characters (turns and facts together) above which a record cannot fit: see MAX_CHARS_PER_TOKEN."""
        return (self.max_length + self.max_facts * self.max_fact_tokens) * MAX_CHARS_PER_TOKEN


def check_record(raw: bytes) -> CheckedRecord:
    """Parses and validates one raw LLaVA record; raises `RecordRejected` with the reason otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordRejected("non-utf8", f"invalid UTF-8 byte 0x{raw[err.start]:02x} at byte {err.start}", _guess_id(raw)) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordRejected("malformed-json", f"{err.msg} at character {err.pos}") from None
    except (ValueError, RecursionError) as err:  # a number of over 4300 digits; nesting deeper than ~1000
        raise RecordRejected("malformed-json", f"not decodable: {_json_limit(err)}") from None
    if not isinstance(record, dict):
        raise RecordRejected("malformed-record", f"expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("id")
    sample_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None

    def reject(reason: str, detail: str) -> RecordRejected:
        return RecordRejected(reason, detail, sample_id)

    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise reject("malformed-record", "`conversations` must be a non-empty list of {from, value} turns")
    for k, turn in enumerate(conversations):
        role = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(role, str) or role not in ROLES or not isinstance(turn.get("value"), str):
            raise reject("malformed-record", f"conversations[{k}] must be {{'from': human|gpt|system, 'value': <text>}}")
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError:
            raise reject("non-utf8", f"conversations[{k}].value holds an unpaired surrogate (\\udXXX escape)") from None
    if not any(t["from"] == "gpt" and t["value"].strip() for t in conversations):
        raise reject("no-response", "no gpt turn with text: the sample has nothing to learn")
    image_path = record.get("image")
    if image_path is not None and not isinstance(image_path, str):
        raise reject("malformed-record", "`image` must be a path string")
    placeholders = [t["value"].count(IMAGE_TOKEN) for t in conversations]
    in_prompts = sum(n for n, t in zip(placeholders, conversations) if t["from"] == "human")
    expected = 0 if image_path is None else 1
    if sum(placeholders) != expected or in_prompts != expected:
        raise reject(
            "image-placeholders",
            f"{sum(placeholders)} `{IMAGE_TOKEN}` placeholders ({in_prompts} in human turns) for "
            + ("a record with no `image`: expected none" if image_path is None
               else "one image: expected exactly one, in a human turn"),
        )
    hop = record.get("hop", 0)
    if not isinstance(hop, int) or isinstance(hop, bool) or not 0 <= hop <= 127:
        raise reject("malformed-record", f"`hop` must be an integer in 0..127, got {hop!r}")
    question_type = record.get("question_type", "open")
    answer = record.get("answer", next(t["value"] for t in conversations if t["from"] == "gpt"))
    if not isinstance(question_type, str) or not isinstance(answer, str):
        raise reject("malformed-record", "`question_type` and `answer` must be strings")
    facts = record.get("facts") or []
    if not isinstance(facts, list) or not all(isinstance(f, dict) and isinstance(f.get("text"), str) for f in facts):
        raise reject("malformed-record", "`facts` must be a list of {text, supporting} objects")
    return CheckedRecord(
        sample_id=sample_id,
        conversations=conversations,
        image_path=image_path,
        hop=hop,
        question_type=question_type,
        answer=answer,
        facts=[(f["text"], bool(f.get("supporting", False))) for f in facts],
    )


def decode_image(data: bytes | None, image_path: str | None, max_pixels: int = InputLimits.max_image_pixels):
    """The RGB image in `data` (None for a text-only record); raises `RecordRejected` when it is
    absent, does not decode, or declares more than `max_pixels` pixels.

    The size is read from the header before anything is decoded: a decompression bomb (a few KB
    of PNG declaring 12000 x 12000 pixels) would otherwise take 700 MB here, and PIL's own guard
    only refuses images of over 179M pixels."""
    from PIL import Image

    if image_path is None:
        return None
    if data is None:
        raise RecordRejected("missing-image", f"no image bytes for {image_path!r}")
    try:
        with warnings.catch_warnings():
            # PIL warns from 89M pixels and refuses from 179M; the limit below is the one that holds.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise _too_large(image_path, f"{width} x {height} = {width * height:,}", max_pixels, len(data))
            image.load()  # decode now: a truncated file fails here, not inside the image processor
            return image.convert("RGB")
    except RecordRejected:
        raise
    except Image.DecompressionBombError as err:  # over PIL's own limit: refused by PIL before its size is known to us
        raise _too_large(image_path, str(err).split(" pixels")[0].removeprefix("Image size ("), max_pixels, len(data)) from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise RecordRejected("corrupt-image", f"{image_path!r} does not decode: {type(err).__name__}: {err}") from None


def _too_large(image_path: str, size: str, max_pixels: int, num_bytes: int) -> RecordRejected:
    return RecordRejected(
        "image-too-large",
        f"{image_path!r} declares {size} pixels, more than data.max_image_pixels={max_pixels:,} "
        f"({num_bytes:,} bytes on disk): downscale the image, or raise data.max_image_pixels",
    )


@dataclass
class _Sample:
    row: int
    record: CheckedRecord
    image: object  # a PIL image, or None for a text-only record
    sequence: dict | None = None


def preprocess_rows(rows: dict[str, np.ndarray], processor: Processor, limits: InputLimits):
    """Preprocesses a batch of read rows (`source`, `ordinal`, `record`, `image`, `read_error`).

    Returns `(samples, rejects, truncated)`: the model-input columns of the accepted rows (None if
    none), a `Reject` per skipped row, and the (source, ordinal) of each truncated sample."""
    rejects: list[Reject] = []
    truncated: list[tuple[str, int]] = []

    def reject(row: int, err: RecordRejected, sample_id: str | None) -> None:
        source, ordinal = str(rows["source"][row]), int(rows["ordinal"][row])
        rejects.append(Reject.of(source, ordinal, err.sample_id or sample_id, err.reason, err.detail, rows["record"][row]))

    checked: list[_Sample] = []
    for row in range(len(rows["ordinal"])):
        record = None
        try:
            if rows["read_error"][row]:
                reason, _, detail = str(rows["read_error"][row]).partition(": ")
                raise RecordRejected(reason, detail, _guess_id(rows["record"][row]))
            record = check_record(rows["record"][row])
            _check_num_chars(record, limits)
            checked.append(_Sample(row, record, decode_image(rows["image"][row], record.image_path, limits.max_image_pixels)))
        except RecordRejected as err:
            reject(row, err, record.sample_id if record else None)

    rendered = [render_chat(sample.record.conversations) for sample in checked]
    token_ids, offsets = processor.encode([chat.text for chat in rendered]) if checked else ([], [])
    samples: list[_Sample] = []
    for sample, chat, ids, spans in zip(checked, rendered, token_ids, offsets):
        try:
            sample.sequence, num_cut = _assemble(ids, spans, chat, sample.image is not None, processor, limits)
        except RecordRejected as err:
            reject(sample.row, err, sample.record.sample_id)
            continue
        if num_cut:
            truncated.append((str(rows["source"][sample.row]), int(rows["ordinal"][sample.row])))
        samples.append(sample)
    if not samples:
        return None, rejects, truncated

    pixel_values = np.zeros((len(samples), *processor.pixel_shape), dtype=np.float32)
    with_image = [k for k, sample in enumerate(samples) if sample.image is not None]
    if with_image:
        images = [samples[k].image for k in with_image]
        pixel_values[with_image] = processor.image_processor(images=images, return_tensors="np")["pixel_values"]
    records = [sample.record for sample in samples]
    columns = {
        "sample_id": np.array(
            [r.sample_id or f"{rows['source'][s.row]}:{rows['ordinal'][s.row]}" for r, s in zip(records, samples)], dtype=object
        ),
        **{name: np.stack([sample.sequence[name] for sample in samples]) for name in samples[0].sequence},
        "pixel_values": pixel_values,
        "hop": np.array([r.hop for r in records], dtype=np.int8),
        "question_type": np.array([r.question_type for r in records], dtype=object),
        "answer": np.array([r.answer for r in records], dtype=object),
    }
    columns.update(_fact_columns([r.facts for r in records], processor, limits))
    return columns, rejects, truncated


def _check_num_chars(record: CheckedRecord, limits: InputLimits) -> None:
    num_chars = sum(len(turn["value"]) for turn in record.conversations) + sum(len(text) for text, _ in record.facts)
    if num_chars > limits.max_chars:
        raise RecordRejected(
            "over-length",
            f"{num_chars:,} characters: more than {MAX_CHARS_PER_TOKEN} per token of data.max_length={limits.max_length} "
            f"plus the fact rows ({limits.max_chars:,}), so it cannot fit; rejected before tokenizing",
            record.sample_id,
        )


def _assemble(
    token_ids: list[int], offsets: list[tuple[int, int]], rendered, has_image: bool, processor: Processor, limits: InputLimits
):
    """One sample's sequence columns, and how many prompt tokens truncation removed."""
    ids = np.asarray(token_ids, dtype=np.int64)
    starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
    response = np.zeros(len(ids), dtype=bool)
    for begin, end in rendered.responses:
        response |= (starts >= begin) & (starts < end)
    prompt = np.zeros(len(ids), dtype=bool)
    for begin, end in rendered.prompts:
        prompt |= (starts >= begin) & (starts < end)
    image_at = np.flatnonzero(ids == processor.image_token_id)
    if len(image_at) != has_image:
        raise RecordRejected(
            "image-placeholders", f"the tokenizer produced {len(image_at)} image tokens; expected {int(has_image)}"
        )
    prompt[image_at] = False

    num_visual = processor.num_image_tokens if has_image else 0
    excess = len(ids) - len(image_at) + num_visual - limits.max_length
    num_cut = 0
    if excess > 0:
        total = len(ids) - len(image_at) + num_visual
        if limits.over_length == "reject":
            raise RecordRejected(
                "over-length", f"{total} tokens > data.max_length={limits.max_length} (data.over_length is reject)"
            )
        removable = np.flatnonzero(prompt)
        if len(removable) < excess:
            raise RecordRejected(
                "over-length",
                f"{total} tokens > data.max_length={limits.max_length}, and image, response and template "
                f"tokens alone take {total - len(removable)}: raise data.max_length",
            )
        keep = np.ones(len(ids), dtype=bool)
        keep[removable[:excess]] = False  # drop prompt text from the left: the question stays
        ids, response = ids[keep], response[keep]
        num_cut = int(excess)

    at = int(np.flatnonzero(ids == processor.image_token_id)[0]) if has_image else 0
    if has_image:
        ids = np.concatenate([ids[:at], np.full(num_visual, processor.image_token_id), ids[at + 1 :]])
        response = np.concatenate([response[:at], np.zeros(num_visual, dtype=bool), response[at + 1 :]])
    length, max_length = len(ids), limits.max_length

    input_ids = np.full(max_length, processor.pad_token_id, dtype=np.int32)
    input_ids[:length] = ids
    is_response = np.zeros(max_length, dtype=bool)
    is_response[:length] = response
    target_ids = np.full(max_length, IGNORE_INDEX, dtype=np.int32)
    target_ids[:-1] = np.where(is_response[1:], input_ids[1:], IGNORE_INDEX)
    attention_mask = np.zeros(max_length, dtype=np.int8)
    attention_mask[:length] = 1
    visual_mask = np.zeros(max_length, dtype=bool)
    visual_mask[at : at + num_visual] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "target_ids": target_ids,
        "response_mask": target_ids != IGNORE_INDEX,
        "visual_mask": visual_mask,
        "num_visual": np.int32(num_visual),
        "answer_pos": np.int32(np.flatnonzero(is_response)[0] - 1),
    }, num_cut


def _fact_columns(
    facts_per_sample: list[list[tuple[str, bool]]], processor: Processor, limits: InputLimits
) -> dict[str, np.ndarray]:
    num = len(facts_per_sample)
    token_ids = np.full((num, limits.max_facts, limits.max_fact_tokens), FACT_PAD, dtype=np.int32)
    mask = np.zeros((num, limits.max_facts), dtype=bool)
    support = np.zeros((num, limits.max_facts), dtype=bool)
    kept = [facts[: limits.max_facts] for facts in facts_per_sample]
    texts = [text for facts in kept for text, _ in facts]
    encoded = iter(processor.encode(texts)[0] if texts else [])
    for row, facts in enumerate(kept):
        for column, (_, supporting) in enumerate(facts):
            ids = next(encoded)[: limits.max_fact_tokens]
            token_ids[row, column, : len(ids)] = ids
            mask[row, column] = True
            support[row, column] = supporting
    return {"fact_token_ids": token_ids, "fact_mask": mask, "fact_support": support}


def _guess_id(raw: bytes) -> str | None:
    """The record's `id` if it can be read at all (invalid UTF-8 replaced), for the rejects file."""
    try:
        value = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    sample_id = value.get("id") if isinstance(value, dict) else None
    return str(sample_id) if isinstance(sample_id, (str, int)) else None


def _json_limit(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err).split(";")[0]  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
