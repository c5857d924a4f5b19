"""The bundled knowledge-VQA benchmark, built offline in seconds from scikit-learn's digits.

`build_kvqa(out_dir)` writes, in the LLaVA-1.5 format (so the reader that serves it serves real LLaVA data):

    images/00000.png ...      1,797 digits upscaled to 32x32 RGB, each drawn in one of four ink colours
    knowledge_graph.jsonl     the number facts as triples (see `knowledge_graph.py`)
    captions.json             one caption per image (PT / DPT)
    instructions.json         questions per image (FT / SFT / DFT): hop 0 (what is seen), hop 1 (one
                              fact), hop 2 (a chain of two facts); open, POPE-style yes/no probes and
                              ScienceQA-style multiple choice (options in the prompt, the answer a letter)
    processor/                tokenizer trained on the benchmark text + SigLIP image processor config
    summary.json              record counts per split, hop level and question type

Beyond `id`, `image` and `conversations`, each record carries `split` (by image, deterministic), `hop`,
`question_type`, `answer` (short, for exact match) and `facts`: the retrieved candidates, supporting
facts plus distractors, each flagged `supporting`. For hop >= 1 the retrieved facts are written into
the prompt ("Facts: 7 is odd. ..."); `coverage` < 1 drops that fraction of supporting facts from
retrieval (replaced by distractors), to study what the student does when knowledge is missing.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ckd_ray import storage
from ckd_ray.data.knowledge_graph import CONFUSABLE, NUMBER_WORDS, RELATIONS, Fact, NumberKnowledgeGraph
from ckd_ray.data.processor import IMAGE_TOKEN, build_processor_dir, render_chat

IMAGE_SIZE = 32
INK_COLORS = {"black": (20, 20, 20), "red": (200, 30, 30), "green": (30, 140, 40), "blue": (30, 60, 200)}
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
OPTION_LETTERS = "ABCD"
MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for the image.",
    "What does the image show?",
)
CAPTION_TEMPLATES = (
    "A handwritten {digit} in {color} ink.",
    "The digit {word}, written by hand in {color}.",
    "A {color} handwritten digit {digit} on a white background.",
)


@dataclass(frozen=True)
class QuestionFamily:
    """Questions that walk `relations` from the digit shown; the walk's last tail gives the answer
    (`yes_if` turns it into yes/no). Hop level = number of relations = supporting facts needed."""

    name: str
    question_type: str  # open | yes_no | multiple_choice
    relations: tuple[str, ...]
    question: str
    yes_if: str | None = None

    @property
    def hop(self) -> int:
        return len(self.relations)


FAMILIES = (
    QuestionFamily("parity", "open", ("parity",), "Is the digit shown odd or even?"),
    QuestionFamily("prime_probe", "yes_no", ("primality",), "Is the digit shown a prime number?", "prime"),
    QuestionFamily("successor", "open", ("successor",), "What number comes after the digit shown?"),
    QuestionFamily("predecessor_choice", "multiple_choice", ("predecessor",), "What number comes before the digit shown?"),
    QuestionFamily("square", "open", ("square",), "What is the square of the digit shown?"),
    QuestionFamily("loops", "open", ("closed_loops",), "How many closed loops does the digit shown have?"),
    QuestionFamily("word_choice", "multiple_choice", ("word",), "Which word names the digit shown?"),
    QuestionFamily(
        "successor_parity_probe", "yes_no", ("successor", "parity"), "Is the number after the digit shown even?", "even"
    ),
    QuestionFamily(
        "predecessor_prime_probe", "yes_no", ("predecessor", "primality"), "Is the number before the digit shown prime?", "prime"
    ),
    QuestionFamily(
        "successor_square", "open", ("successor", "square"), "What is the square of the number after the digit shown?"
    ),
    QuestionFamily(
        "predecessor_loops", "open", ("predecessor", "closed_loops"),
        "How many closed loops does the number before the digit shown have?",
    ),
    QuestionFamily(
        "successor_word_choice", "multiple_choice", ("successor", "word"), "Which word names the number after the digit shown?"
    ),
)
HOP0_FAMILIES = ("digit", "digit_choice", "digit_probe", "color")
QUESTIONS_PER_HOP = {0: 2, 1: 3, 2: 3}


@dataclass(frozen=True)
class KvqaSummary:
    """What `build_kvqa` wrote: record counts per split for each row (record kind, hop, question type)."""

    out_dir: str
    num_images: int
    num_facts: int
    counts: dict[str, dict[str, int]]
    vocab_size: int
    max_text_tokens: int
    seconds: float = field(compare=False)

    def to_json(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "num_images": self.num_images,
            "num_facts": self.num_facts,
            "counts": self.counts,
            "vocab_size": self.vocab_size,
            "max_text_tokens": self.max_text_tokens,
            "seconds": round(self.seconds, 2),
        }

    def format(self) -> str:
        lines = [
            f"kvqa benchmark in {self.out_dir}: {self.num_images} images, {self.num_facts} facts, "
            f"built in {self.seconds:.1f} s",
            f"{'records':<28}" + "".join(f"{s:>8}" for s in (*SPLIT_FRACTIONS, "total")),
        ]
        for row, per_split in self.counts.items():
            values = [per_split.get(s, 0) for s in SPLIT_FRACTIONS]
            lines.append(f"{row:<28}" + "".join(f"{v:>8}" for v in (*values, sum(values))))
        lines.append(
            f"tokenizer: {self.vocab_size} tokens; longest record {self.max_text_tokens} tokens "
            f"with `{IMAGE_TOKEN}` as one token"
        )
        return "\n".join(lines)


def build_kvqa(
    out_dir: str | Path,
    *,
    seed: int = 0,
    coverage: float = 1.0,
    num_retrieved: int = 4,
    vocab_size: int = 512,
    progress: Callable[[str], None] | None = print,
) -> KvqaSummary:
    """Builds the benchmark into `out_dir` (local or s3://) and returns its summary.

    `coverage` is the probability that a supporting fact is retrieved; `num_retrieved` the number of
    candidate facts per knowledge-guided question (supporting + distractors). Same arguments, same
    bytes: every random choice is drawn from generators seeded by (`seed`, image index)."""
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage={coverage} must be within [0, 1]")
    if num_retrieved < 2:
        raise ValueError(f"num_retrieved={num_retrieved} must be >= 2 (a hop-2 question has two supporting facts)")
    started = time.perf_counter()
    say = progress or (lambda _line: None)
    if storage.is_s3(str(out_dir)):
        with tempfile.TemporaryDirectory() as local:
            summary = build_kvqa(
                local, seed=seed, coverage=coverage, num_retrieved=num_retrieved, vocab_size=vocab_size, progress=progress
            )
            say(f"[kvqa] uploading to {out_dir}")
            storage.upload_dir(local, str(out_dir))
        return KvqaSummary(**{**summary.__dict__, "out_dir": str(out_dir), "seconds": time.perf_counter() - started})

    from sklearn.datasets import load_digits

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    labels = [int(x) for x in digits.target]
    num_images = len(labels)
    splits = _assign_splits(num_images, seed)
    colors = [list(INK_COLORS)[np.random.default_rng((seed, i, 0)).integers(len(INK_COLORS))] for i in range(num_images)]

    for i, pixels in enumerate(digits.images):
        (out / "images" / _image_name(i)).write_bytes(_render_png(pixels, INK_COLORS[colors[i]]))
    say(f"[kvqa] 1/5 images: {num_images} digits drawn as {IMAGE_SIZE}x{IMAGE_SIZE} RGB PNG in images/")

    graph = NumberKnowledgeGraph()
    with open(out / "knowledge_graph.jsonl", "w") as f:
        for fact in graph.facts:
            f.write(json.dumps(fact.to_json()) + "\n")
    say(f"[kvqa] 2/5 knowledge graph: {len(graph.facts)} facts over {len(RELATIONS)} relations in knowledge_graph.jsonl")

    popular = [d for d, _ in Counter(labels[i] for i in range(num_images) if splits[i] == "train").most_common(2)]
    captions, instructions = [], []
    for i in range(num_images):
        rng = np.random.default_rng((seed, i, 1))
        coverage_rng = np.random.default_rng((seed, i, 2))
        base = {"image": _image_name(i), "split": splits[i], "digit": labels[i], "color": colors[i]}
        captions.append(_caption_record(i, base, rng))
        instructions.extend(_instruction_records(i, base, graph, popular, rng, coverage_rng, coverage, num_retrieved))
    _write_llava_json(out / "captions.json", captions)
    _write_llava_json(out / "instructions.json", instructions)
    say(f"[kvqa] 3/5 records: {len(captions)} captions, {len(instructions)} instructions (LLaVA-1.5 JSON)")

    texts = [turn["value"] for r in (*captions, *instructions) for turn in r["conversations"]]
    texts += [fact.text for fact in graph.facts]
    tokenizer = build_processor_dir(texts, out / "processor", vocab_size=vocab_size, image_size=IMAGE_SIZE)
    max_text_tokens = max(
        len(ids)
        for ids in tokenizer(
            [_chat_text(r) for r in (*captions, *instructions)], add_special_tokens=False
        )["input_ids"]
    )
    say(f"[kvqa] 4/5 processor: {tokenizer.vocab_size}-token BPE tokenizer + SigLIP image processor in processor/")

    summary = KvqaSummary(
        out_dir=str(out_dir),
        num_images=num_images,
        num_facts=len(graph.facts),
        counts=_count_rows(captions, instructions),
        vocab_size=len(tokenizer),
        max_text_tokens=max_text_tokens,
        seconds=time.perf_counter() - started,
    )
    # Without `out_dir`: the file sits there, and an s3:// build writes it from a temporary folder.
    stored = {k: v for k, v in summary.to_json().items() if k != "out_dir"}
    (out / "summary.json").write_text(json.dumps(stored, indent=2) + "\n")
    say(f"[kvqa] 5/5 summary.json written ({summary.seconds:.1f} s)")
    return summary


def _image_name(index: int) -> str:
    return f"{index:05d}.png"


def _assign_splits(num_images: int, seed: int) -> list[str]:
    """Split by image: a seeded permutation cut at the split fractions, so every question about one
    image lands in the same split and no test image is ever seen in training."""
    order = np.random.default_rng((seed, 0xD1617)).permutation(num_images)
    splits = [""] * num_images
    num_train = round(num_images * SPLIT_FRACTIONS["train"])
    num_val = round(num_images * SPLIT_FRACTIONS["val"])
    for rank, index in enumerate(order):
        splits[index] = "train" if rank < num_train else "val" if rank < num_train + num_val else "test"
    return splits


def _render_png(pixels_8x8: np.ndarray, ink: tuple[int, int, int]) -> bytes:
    from PIL import Image

    # The digits are 0..16 ink intensities; upscale the intensity, then blend ink over white.
    alpha = Image.fromarray((pixels_8x8 * (255 / 16)).astype(np.uint8), mode="L")
    alpha = np.asarray(alpha.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    rgb = 255 * (1 - alpha[..., None]) + np.asarray(ink, dtype=np.float32) * alpha[..., None]
    buffer = io.BytesIO()
    Image.fromarray(rgb.round().astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]


def _caption_record(index: int, base: dict, rng: np.random.Generator) -> dict:
    digit, color = base["digit"], base["color"]
    caption = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(digit=digit, word=NUMBER_WORDS[digit], color=color)
    prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
    return {
        "id": f"kvqa-cap-{index:05d}",
        **base,
        "conversations": _conversation(prompt, caption),
        "hop": 0,
        "question_type": "caption",
        "answer": caption,
        "facts": [],
    }


def _instruction_records(
    index: int,
    base: dict,
    graph: NumberKnowledgeGraph,
    popular: list[int],
    rng: np.random.Generator,
    coverage_rng: np.random.Generator,
    coverage: float,
    num_retrieved: int,
) -> list[dict]:
    digit = base["digit"]
    records = []
    for name in rng.choice(HOP0_FAMILIES, size=QUESTIONS_PER_HOP[0], replace=False):
        question_type, question, answer, extra = _hop0_question(str(name), base, popular, rng)
        records.append({
            "id": f"kvqa-{index:05d}-{name}",
            **base,
            "conversations": _conversation(question, answer),
            "hop": 0,
            "question_type": question_type,
            "answer": answer,
            "facts": [],
            **extra,
        })
    for hop in (1, 2):
        eligible = [f for f in FAMILIES if f.hop == hop and graph.follow(digit, f.relations) is not None]
        for family_index in rng.choice(len(eligible), size=QUESTIONS_PER_HOP[hop], replace=False):
            family = eligible[family_index]
            supporting = graph.follow(digit, family.relations)
            retrieved, num_dropped = _retrieve(graph, digit, family, supporting, rng, coverage_rng, coverage, num_retrieved)
            question, answer = _knowledge_question(family, digit, supporting, graph, rng)
            facts_line = "Facts: " + " ".join(f["text"] for f in retrieved)
            records.append({
                "id": f"kvqa-{index:05d}-{family.name}",
                **base,
                "conversations": _conversation(f"{facts_line}\nQuestion: {question}", answer),
                "hop": hop,
                "question_type": family.question_type,
                "answer": answer,
                "facts": retrieved,
                "num_dropped_facts": num_dropped,
            })
    return records


def _hop0_question(name: str, base: dict, popular: list[int], rng: np.random.Generator) -> tuple[str, str, str, dict]:
    digit = base["digit"]
    if name == "digit":
        return "open", "Which digit is shown?", str(digit), {}
    if name == "color":
        return "open", "What color is the digit?", base["color"], {}
    if name == "digit_choice":
        question, letter = _multiple_choice("Which digit is shown?", digit, _digit_distractors(digit, rng), rng)
        return "multiple_choice", question, letter, {}
    # POPE: half the probes name the digit shown; the others name a digit drawn at random, one of
    # the most frequent digits ("popular"), or one easily confused with it ("adversarial").
    if rng.random() < 0.5:
        return "yes_no", f"Is there a {digit} in the image?", "yes", {"pope_strategy": "positive"}
    strategy = ("random", "popular", "adversarial")[rng.integers(3)]
    pool = {
        "random": [d for d in range(10) if d != digit],
        "popular": [d for d in popular if d != digit] or [d for d in range(10) if d != digit],
        "adversarial": list(CONFUSABLE[digit]),
    }[strategy]
    probe = int(pool[rng.integers(len(pool))])
    return "yes_no", f"Is there a {probe} in the image?", "no", {"pope_strategy": strategy}


def _digit_distractors(digit: int, rng: np.random.Generator) -> list[int]:
    others = [d for d in rng.permutation(10).tolist() if d != digit and d not in CONFUSABLE[digit]]
    return [*CONFUSABLE[digit], *others]


def _knowledge_question(
    family: QuestionFamily, digit: int, supporting: list[Fact], graph: NumberKnowledgeGraph, rng: np.random.Generator
) -> tuple[str, str]:
    tail = supporting[-1].tail
    if family.question_type == "yes_no":
        return family.question, "yes" if tail == family.yes_if else "no"
    if family.question_type == "open":
        return family.question, str(tail)
    # Options: the answer, then the same walk from confusable and random digits, distinct values.
    wrong: list[int | str] = []
    for other in _digit_distractors(digit, rng):
        chain = graph.follow(other, family.relations)
        if chain is not None and chain[-1].tail != tail and chain[-1].tail not in wrong:
            wrong.append(chain[-1].tail)
    return _multiple_choice(family.question, tail, wrong, rng)


def _multiple_choice(question: str, answer: int | str, wrong: list, rng: np.random.Generator) -> tuple[str, str]:
    options = [answer, *wrong[: len(OPTION_LETTERS) - 1]]
    order = rng.permutation(len(options))
    lines = [f"{OPTION_LETTERS[k]}. {options[j]}" for k, j in enumerate(order)]
    letter = OPTION_LETTERS[int(np.flatnonzero(order == 0)[0])]
    return f"{question}\nOptions:\n" + "\n".join(lines) + f"\n{MULTIPLE_CHOICE_SUFFIX}", letter


def _retrieve(
    graph: NumberKnowledgeGraph,
    digit: int,
    family: QuestionFamily,
    supporting: list[Fact],
    rng: np.random.Generator,
    coverage_rng: np.random.Generator,
    coverage: float,
    num_retrieved: int,
) -> tuple[list[dict], int]:
    """The candidate facts of one question: supporting facts that survive `coverage`, then hard
    distractors (the same walk from digits easily confused with this one), then random facts.
    Coverage draws use their own generator, so changing `coverage` changes nothing else."""
    kept = [f for f in supporting if coverage_rng.random() < coverage]
    candidates: list[Fact] = []
    for other in CONFUSABLE[digit]:
        candidates.extend(graph.follow(other, family.relations) or [])
    candidates.extend(graph.facts[j] for j in rng.permutation(len(graph.facts)))
    chosen = list(kept)
    for fact in candidates:
        if len(chosen) == num_retrieved:
            break
        if fact not in supporting and fact not in chosen:
            chosen.append(fact)
    order = rng.permutation(len(chosen))
    retrieved = [{**chosen[j].to_json(), "supporting": chosen[j] in kept} for j in order]
    return retrieved, len(supporting) - len(kept)


def _write_llava_json(path: Path, records: list[dict]) -> None:
    # One record per line inside the list: still a JSON list, but diffable and greppable.
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


def _chat_text(record: dict) -> str:
    return render_chat(record["conversations"]).text


def _count_rows(captions: list[dict], instructions: list[dict]) -> dict[str, dict[str, int]]:
    rows: dict[str, Counter] = {"captions": Counter(r["split"] for r in captions)}
    rows["instructions"] = Counter(r["split"] for r in instructions)
    for hop in (0, 1, 2):
        rows[f"  hop {hop}"] = Counter(r["split"] for r in instructions if r["hop"] == hop)
    for question_type in ("open", "yes_no", "multiple_choice"):
        rows[f"  {question_type}"] = Counter(r["split"] for r in instructions if r["question_type"] == question_type)
    return {row: {s: counter.get(s, 0) for s in SPLIT_FRACTIONS} for row, counter in rows.items()}
