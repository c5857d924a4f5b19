"""What the compressed teacher signal costs and what it loses, version 1 against version 2.

In one run:

1. Bytes a sample at Qwen2.5 scale (151,936-token vocabulary, 2048 positions of which 729 visual;
   every one of the other 1,319 counted as a response position, an upper bound), measured on the
   encoded columns of one such sample (version 2's size depends on its tokens), for each payload
   of PAYLOADS, with the Gram (visual_relation) as the paper config ships it; and the logits part
   in bytes a response token beside published points.
2. The error of each payload against full logits, for the loss value (relative error) and its
   gradient w.r.t. the student logits (cosine), at T = 1 and T = 2, forward and reverse KL, on
   (a) Qwen2.5-vocabulary-sized distributions shaped to Zipf rank profiles (PROFILES) and
   (b) the trained tiny teachers' own distributions (the quickstart's TA and teacher, on
   validation samples, response and visual positions, against the student each one teaches).
   Every payload goes through its real encoder and decoder (bf16 values, packed ids).
3. The quickstart's DFT losses (teacher -> student, configs/tiny_cascade.yaml's loss) on
   version 1 and on version 2's signals, through `TeacherForward` and `decode_signal`.

    python benchmarks/bench_teacher_signal.py [--benchmark data/kvqa] [--run runs/tiny-cascade] [--samples 64]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckd_ray.data.config import DataConfig
from ckd_ray.data.pipeline import iter_plain_batches
from ckd_ray.data.processor import Processor
from ckd_ray.losses import StudentOutputs, distillation_loss, kl_loss_dense, kl_loss_sparse, kl_loss_topk
from ckd_ray.losses.config import LossWeights
from ckd_ray.models import load_model
from ckd_ray.teachers import SignalSpec
from ckd_ray.teachers.forward import TeacherForward
from ckd_ray.teachers.packed import concat_rows, encode_rows, select_rows
from ckd_ray.teachers.signal import decode_signal, from_wire, sparse_logits, to_wire, topk_with_tail

QWEN_VOCAB, SEQ_LEN, NUM_VISUAL = 151_936, 2048, 729
NUM_RESPONSE = SEQ_LEN - NUM_VISUAL
FULL_FP32 = SEQ_LEN * QWEN_VOCAB * 4


@dataclass(frozen=True)
class Payload:
    name: str
    top_k: int
    version: int = 2
    tail_mass: float = 0.0
    tail_samples: int = 0

    def spec(self) -> SignalSpec:
        return SignalSpec(response_top_k=self.top_k, visual_top_k=self.top_k, gram=True, version=self.version,
                          tail_mass=self.tail_mass, tail_samples=self.tail_samples)


PAYLOADS = (
    Payload("v1 top-64 (dense [L, K], int32 ids)", 64, version=1),
    Payload("v2 fixed k = 16", 16),
    Payload("v2 fixed k = 64", 64),
    Payload("v2 fixed k = 128", 128),
    Payload("v2 adaptive, tail_mass 0.05, k <= 64", 64, tail_mass=0.05),
    Payload("v2 adaptive, tail_mass 0.01, k <= 64", 64, tail_mass=0.01),
    Payload("v2 adaptive 0.05, k <= 64, + 12 tail draws", 64, tail_mass=0.05, tail_samples=12),
    Payload("v2 adaptive 0.05, k <= 64, + 48 tail draws", 64, tail_mass=0.05, tail_samples=48),
)
# Zipf rank profiles p_r ~ r^-a over the whole vocabulary (the rank-frequency shape commonly
# reported for LLM next-token distributions), with log-normal jitter; the exponents, ours, span a
# token whose top-1 holds ~90% of the mass to one spread over hundreds. (share of rows, a)
PROFILES = ((0.4, 4.0), (0.3, 2.5), (0.2, 1.5), (0.1, 1.1))
PUBLISHED = (("DistillKit (top-k logits)", "114-300"), ("Arcee (top-k logits)", "about 100"),
             ("RS-KD (sampled logits, Anshumann et al. 2025)", "about 37"))


def zipf_logits(num_rows: int, generator: torch.Generator, vocab: int = QWEN_VOCAB) -> torch.Tensor:
    """Rows of log-probabilities shaped to PROFILES, each row's ranks on a random permutation."""
    shares = torch.tensor([share for share, _ in PROFILES])
    exponents = torch.tensor([a for _, a in PROFILES])[torch.multinomial(shares, num_rows, replacement=True, generator=generator)]
    log_rank = torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    logits = -exponents[:, None] * log_rank + 0.3 * torch.randn(num_rows, vocab, generator=generator)
    order = torch.argsort(torch.rand(num_rows, vocab, generator=generator), dim=1)
    return torch.log_softmax(logits.gather(1, order), dim=-1)


def sample_bytes(generator: torch.Generator) -> list[str]:
    """Part 1: the measured columns of one paper-scale sample, per payload."""
    totals = {payload.name: [] for payload in PAYLOADS}
    for part, num_rows in (("resp", NUM_RESPONSE), ("vis", NUM_VISUAL)):
        chunks = {payload.name: [] for payload in PAYLOADS}
        for start in range(0, num_rows, 256):
            logits = zipf_logits(min(256, num_rows - start), generator)
            for payload in PAYLOADS[1:]:
                chunks[payload.name].append(select_rows(logits, payload.top_k, payload.tail_mass, payload.tail_samples, generator))
        for payload in PAYLOADS[1:]:
            rows = concat_rows(chunks[payload.name])
            totals[payload.name].append((part, len(encode_rows(rows, QWEN_VOCAB, payload.top_k, "bfloat16")), rows))
    lines = ["| payload | bytes a sample | of which response logits | visual logits | Gram | fp32 logits / payload | response logits bytes a response token | mean k (response) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    v1 = PAYLOADS[0]
    v1_topk = SEQ_LEN * v1.top_k * (2 + 4) + SEQ_LEN * 4
    v1_gram = NUM_VISUAL * NUM_VISUAL * 2
    v1_total = 2 * v1_topk + v1_gram
    lines.append(f"| {v1.name} | {v1_total:,} | {v1_topk:,} | {v1_topk:,} | {v1_gram:,} | {FULL_FP32 / v1_total:,.0f}x | "
                 f"{v1_topk / NUM_RESPONSE:,.0f} | {v1.top_k} |")
    gram = NUM_VISUAL * (NUM_VISUAL + 1) // 2 * 2
    for payload in PAYLOADS[1:]:
        (_, resp, resp_rows), (_, vis, _) = totals[payload.name]
        total = resp + vis + gram
        lines.append(f"| {payload.name} | {total:,} | {resp:,} | {vis:,} | {gram:,} | {FULL_FP32 / total:,.0f}x | "
                     f"{resp / NUM_RESPONSE:.1f} | {resp_rows.counts_R.mean():.1f} |")
    lines += [f"| published: {name} | | | | | | {value} | |" for name, value in PUBLISHED]
    return lines


def decoded(payload: Payload, logits_BLV: torch.Tensor, mask_BL: torch.Tensor, generator):
    """The payload as the loss reads it, after its real encoder and decoder."""
    vocab = logits_BLV.shape[-1]
    if payload.version == 1:
        values, ids, tail = topk_with_tail(logits_BLV.reshape(-1, vocab), payload.top_k)
        shape = logits_BLV.shape[:2]
        values = from_wire(to_wire(values, "bfloat16"), "bfloat16").float()  # raw logits on the bf16 wire
        return values.reshape(*shape, -1), ids.reshape(*shape, -1), tail.reshape(shape)
    rows = select_rows(logits_BLV[mask_BL], payload.top_k, payload.tail_mass, payload.tail_samples, generator)
    column = np.array([encode_rows(part, vocab, payload.top_k, "bfloat16") for part in rows.split(mask_BL.sum(dim=1).tolist())],
                      dtype=object)
    return sparse_logits(column, mask_BL.numpy(), "bfloat16")


def value_and_grad(loss_fn, student_BLV):
    student_BLV = student_BLV.detach().clone().requires_grad_(True)
    loss = loss_fn(student_BLV)
    loss.backward()
    return float(loss.detach()), student_BLV.grad


def compressed_kl(signal, student_BLV, mask_BL, temperature, direction):
    if isinstance(signal, tuple):
        return kl_loss_topk(student_BLV, *signal, mask_BL, temperature=temperature, direction=direction)
    return kl_loss_sparse(student_BLV, signal, mask_BL, temperature=temperature, direction=direction)


def error_rows(cases, generator) -> dict[tuple, tuple[float, float]]:
    """{(payload, T, direction): (relative error of the loss, gradient cosine)}, pooled over
    `cases` ([(teacher_BLV, student_BLV, mask_BL)]): losses summed, gradients concatenated."""
    out = {}
    for temperature in (1.0, 2.0):
        for direction in ("forward", "reverse"):
            dense = [value_and_grad(lambda s: kl_loss_dense(s, t, m, temperature=temperature, direction=direction), s0)
                     for t, s0, m in cases]
            for payload in PAYLOADS:
                got = []
                for t, s0, m in cases:
                    signal = decoded(payload, t, m, generator)
                    got.append(value_and_grad(lambda s: compressed_kl(signal, s, m, temperature, direction), s0))
                ref_value = sum(v for v, _ in dense)
                value = sum(v for v, _ in got)
                ref_grad = torch.cat([g.reshape(-1) for _, g in dense])
                grad = torch.cat([g.reshape(-1) for _, g in got])
                cosine = float(torch.nn.functional.cosine_similarity(grad.double(), ref_grad.double(), dim=0))
                out[payload.name, temperature, direction] = (abs(value - ref_value) / ref_value, cosine)
    return out


def error_table(errors: dict) -> list[str]:
    lines = ["| payload | T=1 fwd rel. err | T=1 fwd grad cos | T=1 rev rel. err | T=1 rev grad cos | T=2 fwd rel. err | T=2 fwd grad cos | T=2 rev rel. err | T=2 rev grad cos |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for payload in PAYLOADS:
        cells = []
        for temperature in (1.0, 2.0):
            for direction in ("forward", "reverse"):
                rel, cos = errors[payload.name, temperature, direction]
                cells += [f"{rel:.2%}", f"{cos:.4f}"]
        lines.append(f"| {payload.name} | " + " | ".join(cells) + " |")
    return lines


def qwen_cases(generator, num_rows: int):
    """Zipf-shaped teacher rows at Qwen2.5's vocabulary, and a student that disagrees with them
    (the teacher's log-probs plus unit Gaussian noise on every token)."""
    cases = []
    for start in range(0, num_rows, 64):
        teacher = zipf_logits(min(64, num_rows - start), generator)[None]
        student = teacher + torch.randn(teacher.shape, generator=generator)
        cases.append((teacher, student, torch.ones(teacher.shape[:2], dtype=torch.bool)))
    return cases


def batches(benchmark: Path, split: str, limit: int, batch_size: int = 16):
    data = DataConfig(benchmark_root=str(benchmark), preprocess_batch_size=batch_size)
    sources = [s.model_copy(update={"split": split}) for s in data.instruction_sources()]
    processor = Processor.load(benchmark / "processor", 16)
    seen = 0
    for batch in iter_plain_batches(sources, processor, data, rejects_uri="/tmp/ckd-bench-rejects.jsonl"):
        yield batch
        seen += len(batch["input_ids"])
        if seen >= limit:
            return


def model_inputs(batch) -> dict:
    used = int(batch["attention_mask"].sum(axis=1).max())
    return dict(input_ids=torch.as_tensor(batch["input_ids"][:, :used]).long(),
                attention_mask=torch.as_tensor(batch["attention_mask"][:, :used]).long(),
                pixel_values=torch.as_tensor(batch["pixel_values"]))


@torch.no_grad()
def tiny_cases(teacher, student, benchmark: Path, num_samples: int):
    cases = []
    for batch in batches(benchmark, "val", num_samples):
        inputs = model_inputs(batch)
        used = inputs["input_ids"].shape[1]
        t_logits, s_logits = teacher(**inputs).logits.float(), student(**inputs).logits.float()
        for mask in ("response_mask", "visual_mask"):
            cases.append((t_logits, s_logits, torch.as_tensor(batch[mask][:, :used]).bool()))
    return cases


def quickstart_losses(teacher, student, benchmark: Path, num_samples: int, payloads) -> list[str]:
    """The DFT loss terms of the quickstart's teacher -> student step on each payload's signal."""
    weights = LossWeights(task=1.0, output=1.0, visual_kl=1.0, visual_relation=1.0)
    totals = {name: {} for name, _ in payloads}
    totals["dense (full logits)"] = {}
    vocab = min(teacher.config.text_config.vocab_size, student.config.text_config.vocab_size)
    forwards = {name: TeacherForward(teacher, spec, vocab) for name, spec in payloads}
    for batch in batches(benchmark, "val", num_samples):
        inputs = model_inputs(batch)
        used = inputs["input_ids"].shape[1]
        masks = {name: torch.as_tensor(batch[name][:, :used]).bool() for name in ("response_mask", "visual_mask")}
        with torch.no_grad():
            logits = student(**inputs).logits.float()
            t_logits = teacher(**inputs).logits.float()
        targets = torch.as_tensor(batch["target_ids"][:, :used]).long()
        for name, spec in payloads:
            signal = decode_signal({**batch, **forwards[name](batch)}, spec, {})
            _, report = distillation_loss(weights, StudentOutputs(logits), signal, target_ids_BL=targets,
                                          response_mask_BL=masks["response_mask"], visual_mask_BL=masks["visual_mask"])
            for term, value in report.items():
                totals[name][term] = totals[name].get(term, 0.0) + float(value)
        for term, mask in (("output", masks["response_mask"]), ("visual_kl", masks["visual_mask"])):
            totals["dense (full logits)"][term] = totals["dense (full logits)"].get(term, 0.0) + float(kl_loss_dense(logits, t_logits, mask))
    terms = ("task", "output", "visual_kl", "visual_relation", "total")
    lines = ["| signal | " + " | ".join(terms) + " |", "|---|" + "---:|" * len(terms)]
    for name, values in totals.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[t]:.5f}" if t in values else "-" for t in terms) + " |")
    first = totals[payloads[0][0]]
    for name, _ in payloads[1:]:
        lines.append(f"| {name}: relative difference to {payloads[0][0]} | "
                     + " | ".join(f"{abs(totals[name][t] - first[t]) / abs(first[t]):.3%}" for t in terms) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", type=Path, default=Path("data/kvqa"))
    parser.add_argument("--run", type=Path, default=Path("runs/tiny-cascade"), help="a finished quickstart run (its step exports)")
    parser.add_argument("--samples", type=int, default=64, help="validation samples for the tiny teachers")
    parser.add_argument("--qwen-rows", type=int, default=256, help="Qwen2.5-sized rows for the error table")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    print(__doc__.split("\n\n")[0])
    print("\n".join(["", f"### Bytes a sample at Qwen2.5 scale ({SEQ_LEN} positions: {NUM_VISUAL} visual, {NUM_RESPONSE} response; "
                         f"fp32 logits {FULL_FP32:,} bytes)", ""] + sample_bytes(generator)), flush=True)
    errors = error_rows(qwen_cases(generator, args.qwen_rows), generator)
    print("\n".join(["", f"### Error against full logits, Qwen2.5-sized Zipf profiles ({args.qwen_rows} rows, a in {[a for _, a in PROFILES]})", ""]
                    + error_table(errors)), flush=True)
    if not (args.run / "steps").is_dir():
        print(f"\nno quickstart run at {args.run}: run `bash scripts/quickstart.sh` first (the tiny teachers' tables and the "
              "quickstart's losses need its step exports)")
        return
    steps = {path.name.split("-", 1)[1]: path / "model" for path in sorted((args.run / "steps").iterdir())}
    # The prepared teachers as the run used them: its own preparation's exports, or the shared
    # prepared runs' (`cascade.share_prepared_teachers`); the manifest's roles name either.
    roles = json.loads((args.run / "manifest.json").read_text())["roles"]
    for role, student_step in (("ta", "s1-ta_to_student-SFT"), ("teacher", "s2-teacher_to_student-SFT")):
        teacher, student = load_model(roles[role]).eval(), load_model(str(steps[student_step])).eval()
        errors = error_rows(tiny_cases(teacher, student, args.benchmark, args.samples), generator)
        print("\n".join(["", f"### Error against full logits, the prepared {role} vs the {student_step} student "
                             f"(vocabulary {teacher.config.text_config.vocab_size}, {args.samples} val samples, response + visual positions)", ""]
                        + error_table(errors)), flush=True)
    teacher = load_model(roles["teacher"]).eval()
    student = load_model(str(steps["s2-teacher_to_student-SFT"])).eval()
    v1 = SignalSpec(response_top_k=16, visual_top_k=16, gram=True)  # configs/tiny_cascade.yaml
    payloads = [("v1 top-16 (quickstart)", v1), ("v2 top-16", v1.model_copy(update={"version": 2})),
                ("v2 adaptive 0.01, k <= 16", v1.model_copy(update={"version": 2, "tail_mass": 0.01})),
                ("v2 adaptive 0.05, k <= 16, + 48 draws", v1.model_copy(update={"version": 2, "tail_mass": 0.05, "tail_samples": 48}))]
    print("\n".join(["", f"### The quickstart's DFT loss terms (teacher -> student, T = 1, sums over {args.samples} val samples' batches)", ""]
                    + quickstart_losses(teacher, student, args.benchmark, args.samples, payloads)), flush=True)


if __name__ == "__main__":
    main()
