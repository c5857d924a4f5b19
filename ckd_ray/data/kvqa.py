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
from ckd_ray.data.baselines import BASELINES_FILE, TextAnswerers, text_classifier_predictions
from ckd_ray.data.knowledge_graph import CONFUSABLE, NUMBER_WORDS, RELATIONS, NumberKnowledgeGraph
from ckd_ray.data.processor import IMAGE_TOKEN, build_processor_dir, render_chat

BENCHMARK_VERSION = 2  # 2: answers need the image (balanced per family, no answer in the text alone)
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
MAX_PROMPT_FACTS = 4  # facts written into one prompt (the tiny configs' 128 tokens hold four)


@dataclass(frozen=True)
class KvqaSummary:
    """What `build_kvqa` wrote: record counts per split for each row (record kind, hop, question type)."""

    out_dir: str
    num_images: int
    num_facts: int
    counts: dict[str, dict[str, int]]
    vocab_size: int
    max_text_tokens: int
    check: dict
    seconds: float = field(compare=False)

    def to_json(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "num_images": self.num_images,
            "num_facts": self.num_facts,
            "counts": self.counts,
            "vocab_size": self.vocab_size,
            "max_text_tokens": self.max_text_tokens,
            "version": BENCHMARK_VERSION,
            "check": self.check,
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
        lines += TextOnlyCheck.format_json(self.check)
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
    say(f"[kvqa] 1/6 images: {num_images} digits drawn as {IMAGE_SIZE}x{IMAGE_SIZE} RGB PNG in images/")

    graph = NumberKnowledgeGraph()
    with open(out / "knowledge_graph.jsonl", "w") as f:
        for fact in graph.facts:
            f.write(json.dumps(fact.to_json()) + "\n")
    say(f"[kvqa] 2/6 knowledge graph: {len(graph.facts)} facts over {len(RELATIONS)} relations in knowledge_graph.jsonl")

    popular = [d for d, _ in Counter(labels[i] for i in range(num_images) if splits[i] == "train").most_common(2)]
    captions, drafts, bases = [], [], []
    for i in range(num_images):
        rng = np.random.default_rng((seed, i, 1))
        coverage_rng = np.random.default_rng((seed, i, 2))
        bases.append({"image": _image_name(i), "split": splits[i], "digit": labels[i], "color": colors[i]})
        captions.append(_caption_record(i, bases[i], rng))
        drafts.extend(_draft_questions(i, labels[i], colors[i], graph, popular, rng, coverage_rng, coverage, num_retrieved))
    instructions = [_instruction_record(d, bases[d.index]) for d in _balance(drafts, splits, seed)]
    _write_llava_json(out / "captions.json", captions)
    _write_llava_json(out / "instructions.json", instructions)
    say(f"[kvqa] 3/6 records: {len(captions)} captions, {len(instructions)} instructions (LLaVA-1.5 JSON), "
        f"yes/no and option letters balanced per question family")

    check = check_text_only(instructions)
    say(f"[kvqa] 4/6 text-only check: {check.verdict()}")
    if not check.passed:
        raise BenchmarkLeakError(check)
    check.answerers.save(str(out / BASELINES_FILE), [r for r in instructions if r["split"] != "train"], check.to_json())

    texts = [turn["value"] for r in (*captions, *instructions) for turn in r["conversations"]]
    texts += [fact.text for fact in graph.facts]
    tokenizer = build_processor_dir(texts, out / "processor", vocab_size=vocab_size, image_size=IMAGE_SIZE)
    max_text_tokens = max(
        len(ids)
        for ids in tokenizer(
            [_chat_text(r) for r in (*captions, *instructions)], add_special_tokens=False
        )["input_ids"]
    )
    say(f"[kvqa] 5/6 processor: {tokenizer.vocab_size}-token BPE tokenizer + SigLIP image processor in processor/")

    summary = KvqaSummary(
        out_dir=str(out_dir),
        num_images=num_images,
        num_facts=len(graph.facts),
        counts=_count_rows(captions, instructions),
        vocab_size=len(tokenizer),
        max_text_tokens=max_text_tokens,
        check=check.to_json(),
        seconds=time.perf_counter() - started,
    )
    # Without `out_dir`: the file sits there, and an s3:// build writes it from a temporary folder.
    stored = {k: v for k, v in summary.to_json().items() if k != "out_dir"}
    (out / "summary.json").write_text(json.dumps(stored, indent=2) + "\n")
    say(f"[kvqa] 6/6 summary.json written ({summary.seconds:.1f} s)")
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


@dataclass
class _Draft:
    """One question before the balancing pass: its options (the answer first) are laid out, and
    its letter chosen, only once every question of its family and split is known."""

    index: int
    family: str
    question_type: str
    hop: int
    question: str
    answer: str
    facts: list[dict]
    prompt_facts: list[str]
    options: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _draft_questions(
    index: int,
    digit: int,
    color: str,
    graph: NumberKnowledgeGraph,
    popular: list[int],
    rng: np.random.Generator,
    coverage_rng: np.random.Generator,
    coverage: float,
    num_retrieved: int,
) -> list[_Draft]:
    """The questions of one image: QUESTIONS_PER_HOP families per hop level, drawn independently
    of the image's answers (the balancing pass drops questions, it never picks them by answer)."""
    drafts = [_hop0_draft(index, str(name), digit, color, popular, rng) for name in rng.choice(HOP0_FAMILIES, size=QUESTIONS_PER_HOP[0], replace=False)]
    for hop in (1, 2):
        eligible = [f for f in FAMILIES if f.hop == hop and graph.follow(digit, f.relations) is not None]
        for family_index in rng.choice(len(eligible), size=QUESTIONS_PER_HOP[hop], replace=False):
            drafts.append(_knowledge_draft(index, eligible[family_index], digit, graph, rng, coverage_rng, coverage, num_retrieved))
    return drafts


def _hop0_draft(index: int, name: str, digit: int, color: str, popular: list[int], rng: np.random.Generator) -> _Draft:
    def draft(question_type: str, question: str, answer: str, **kw) -> _Draft:
        return _Draft(index, name, question_type, 0, question, answer, [], [], **kw)

    if name == "digit":
        return draft("open", "Which digit is shown?", str(digit))
    if name == "color":
        return draft("open", "What color is the digit?", color)
    if name == "digit_choice":
        # Options: the digit and three others drawn uniformly, so the option set never tells which it is.
        others = [int(d) for d in rng.permutation([d for d in range(10) if d != digit])[:3]]
        return draft("multiple_choice", "Which digit is shown?", str(digit), options=[digit, *others])
    # POPE-style probe: half name the digit shown; the others a digit drawn uniformly from the rest,
    # labelled with POPE's strategy it falls under (one of the most frequent digits: "popular";
    # one easily confused with it: "adversarial"; else "random").
    if rng.random() < 0.5:
        return draft("yes_no", f"Is there a {digit} in the image?", "yes", extra={"pope_strategy": "positive"})
    probe = int(rng.choice([d for d in range(10) if d != digit]))
    strategy = "adversarial" if probe in CONFUSABLE[digit] else "popular" if probe in popular else "random"
    return draft("yes_no", f"Is there a {probe} in the image?", "no", extra={"pope_strategy": strategy})


def _knowledge_draft(
    index: int,
    family: QuestionFamily,
    digit: int,
    graph: NumberKnowledgeGraph,
    rng: np.random.Generator,
    coverage_rng: np.random.Generator,
    coverage: float,
    num_retrieved: int,
) -> _Draft:
    """A knowledge question and its candidate facts: the walk's facts from the digit shown and from
    other candidate digits, so only the image says which walk is the right one. Yes/no questions
    list two walks, one per answer; multiple choice lists one walk per option; open questions list
    none in the prompt (the answer would be one of few) and keep their candidates in `facts`, for
    the knowledge term. `coverage` < 1 drops that fraction of the digit's own facts (from `facts`,
    and that hop of every walk from the prompt)."""
    supporting = graph.follow(digit, family.relations)
    tail = supporting[-1].tail
    eligible = [d for d in rng.permutation(10).tolist() if d != digit and graph.follow(d, family.relations) is not None]
    if family.question_type == "yes_no":
        answer = "yes" if tail == family.yes_if else "no"
        opposite = next(d for d in eligible if (graph.follow(d, family.relations)[-1].tail == family.yes_if) != (answer == "yes"))
        candidates, options = [opposite], []
    elif family.question_type == "multiple_choice":
        answer, candidates, options = str(tail), [], [tail]
        for other in eligible:
            value = graph.follow(other, family.relations)[-1].tail
            if value not in options and len(options) < len(OPTION_LETTERS):
                candidates.append(other)
                options.append(value)
    else:
        answer, candidates, options = str(tail), [], []
        for other in eligible:
            if (1 + len(candidates) + 1) * family.hop > num_retrieved:
                break
            candidates.append(other)
    kept = [f for f in supporting if coverage_rng.random() < coverage]
    # Ordered before the coverage drop, so `coverage` changes which facts are kept and nothing else.
    chosen = [(f, True) for f in supporting] + [(f, False) for other in candidates for f in graph.follow(other, family.relations)]
    order = rng.permutation(len(chosen))
    facts = [{**chosen[j][0].to_json(), "supporting": chosen[j][1]} for j in order if not chosen[j][1] or chosen[j][0] in kept]
    # The prompt holds at most MAX_PROMPT_FACTS: beyond that (four walks of two hops), each walk's
    # first hop only; the rest the model must know. `facts` keeps them all, for the knowledge term.
    walks = 1 + len(candidates)
    shown_hops = family.hop if walks * family.hop <= MAX_PROMPT_FACTS else MAX_PROMPT_FACTS // walks
    # A hop whose supporting fact coverage dropped is left out of every walk, so that the prompt
    # never holds the other candidates' facts alone (they would give the answer away by elimination).
    first_relations = {f.relation for f in supporting[:shown_hops] if f in kept}
    shown = [f["text"] for f in facts if f["relation"] in first_relations] if family.question_type != "open" else []
    return _Draft(index, family.name, family.question_type, family.hop, family.question, answer, facts, shown,
                  options=options, extra={"num_dropped_facts": len(supporting) - len(kept)})


def _balance(drafts: list[_Draft], splits: list[str], seed: int) -> list[_Draft]:
    """Per split and question family: yes/no answers half and half (for probes, per probed digit:
    the majority answer's questions are dropped at random down to the minority's count), and the
    correct option of multiple choice on each letter equally often (letters dealt in turn over a
    shuffled order). Every draw is seeded, so the same arguments give the same benchmark."""
    rng = np.random.default_rng((seed, 0xBA1A))
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(drafts):
        if d.question_type == "yes_no":
            key = (splits[d.index], d.family, d.question if d.hop == 0 else "")
            groups.setdefault(key, []).append(i)
    dropped: set[int] = set()
    for key in sorted(groups):
        yes = [i for i in groups[key] if drafts[i].answer == "yes"]
        no = [i for i in groups[key] if drafts[i].answer == "no"]
        larger, smaller = (yes, no) if len(yes) > len(no) else (no, yes)
        dropped.update(int(i) for i in rng.choice(larger, size=len(larger) - len(smaller), replace=False))
    kept = [d for i, d in enumerate(drafts) if i not in dropped]
    by_family: dict[tuple, list[_Draft]] = {}
    for d in kept:
        if d.question_type == "multiple_choice":
            by_family.setdefault((splits[d.index], d.family), []).append(d)
    for key in sorted(by_family):
        group = by_family[key]
        for turn, j in enumerate(rng.permutation(len(group))):
            d = group[j]
            letter = turn % len(d.options)
            others = [d.options[k] for k in rng.permutation(range(1, len(d.options)))]
            laid = others[:letter] + [d.options[0]] + others[letter:]
            lines = [f"{OPTION_LETTERS[k]}. {value}" for k, value in enumerate(laid)]
            d.question = f"{d.question}\nOptions:\n" + "\n".join(lines) + f"\n{MULTIPLE_CHOICE_SUFFIX}"
            d.answer = OPTION_LETTERS[letter]
    return kept


def _instruction_record(draft: _Draft, base: dict) -> dict:
    question = draft.question
    if draft.prompt_facts:
        question = "Facts: " + " ".join(draft.prompt_facts) + f"\nQuestion: {question}"
    return {
        "id": f"kvqa-{draft.index:05d}-{draft.family}",
        **base,
        "conversations": _conversation(question, draft.answer),
        "hop": draft.hop,
        "question_type": draft.question_type,
        "answer": draft.answer,
        "facts": draft.facts,
        **draft.extra,
    }


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


TEXT_ONLY_TOLERANCE = 0.03  # how far a text-only answerer may score above the template answerer on test
CHANCE = {"yes_no": 0.5, "multiple_choice": 1 / len(OPTION_LETTERS)}


class BenchmarkLeakError(RuntimeError):
    """The built questions can be answered from their text: the build check failed."""

    def __init__(self, check: "TextOnlyCheck"):
        super().__init__(check)
        self.check = check

    def __str__(self) -> str:
        return (f"the benchmark's text gives its answers away, so it cannot measure what a model sees: "
                f"{'; '.join(self.check.failures)}. The question generator in ckd_ray/data/kvqa.py must "
                "balance these questions (nothing was written past instructions.json)")


@dataclass(frozen=True)
class TextOnlyCheck:
    """Test-split accuracy of the answerers that never see the image, all fit on the training split:
    per question text (`question_only`), per template (`template`), and a bag-of-words classifier
    of the prompt (`text_classifier`); per question type too. Passes when neither text-only
    answerer beats the template by more than TEXT_ONLY_TOLERANCE and the template is at chance
    (within that tolerance) on yes/no and multiple choice."""

    answerers: TextAnswerers
    accuracy: dict[str, dict[str, float]]  # answerer -> {"all": ..., question type: ...}
    num_test: int

    @property
    def failures(self) -> list[str]:
        found = []
        template = self.accuracy["template"]["all"]
        for name in ("question_only", "text_classifier"):
            score = self.accuracy[name]["all"]
            if score > template + TEXT_ONLY_TOLERANCE:
                found.append(f"{name} answers {score:.3f} of the test questions, the template only {template:.3f}")
        for kind, chance in CHANCE.items():
            score = self.accuracy["template"].get(kind)
            if score is not None and abs(score - chance) > TEXT_ONLY_TOLERANCE:
                found.append(f"the template alone answers {score:.3f} of {kind} questions (chance: {chance:.3f})")
        return found

    @property
    def passed(self) -> bool:
        return not self.failures

    def verdict(self) -> str:
        acc = self.accuracy
        return (f"{'passed' if self.passed else 'FAILED'}: on {self.num_test} test questions, question-only "
                f"{acc['question_only']['all']:.3f}, text classifier {acc['text_classifier']['all']:.3f}, "
                f"template {acc['template']['all']:.3f} (allowed: +{TEXT_ONLY_TOLERANCE})")

    def to_json(self) -> dict:
        return {"passed": self.passed, "tolerance": TEXT_ONLY_TOLERANCE, "num_test": self.num_test,
                "accuracy": {name: {k: round(v, 4) for k, v in row.items()} for name, row in self.accuracy.items()}}

    @staticmethod
    def format_json(check: dict) -> list[str]:
        """The check as the summary table shows it: one row per text-only answerer."""
        kinds = ("all", "open", "yes_no", "multiple_choice")
        lines = [f"text-only check on {check['num_test']} test questions ({'passed' if check['passed'] else 'FAILED'}: "
                 f"no text-only answerer above the template by more than {check['tolerance']}, the template at chance "
                 "on yes/no and multiple choice)",
                 f"{'accuracy':<28}" + "".join(f"{k:>17}" for k in kinds)]
        for name, row in check["accuracy"].items():
            lines.append(f"{name:<28}" + "".join(f"{row.get(k, float('nan')):>17.3f}" for k in kinds))
        return lines


def check_text_only(instructions: list[dict]) -> TextOnlyCheck:
    """Fits the text-only answerers on the training split and scores them on the test split."""
    train = [r for r in instructions if r["split"] == "train"]
    test = [r for r in instructions if r["split"] == "test"]
    answerers = TextAnswerers.fit(train)
    predictions = {
        "question_only": [answerers.question_only(r) for r in test],
        "text_classifier": text_classifier_predictions(train, test),
        "template": [answerers.template(r) for r in test],
    }
    accuracy = {}
    for name, answers in predictions.items():
        correct: dict[str, list[bool]] = {"all": []}
        for record, answer in zip(test, answers):
            ok = answer == record["answer"]
            correct["all"].append(ok)
            correct.setdefault(record["question_type"], []).append(ok)
        accuracy[name] = {kind: sum(oks) / len(oks) for kind, oks in correct.items()}
    return TextOnlyCheck(answerers, accuracy, len(test))
