"""What the compressed teacher signal costs and what it loses.

1. Bytes per sample on the wire at the paper's sizes (Qwen2.5: vocab 151936, 2048 tokens,
   SigLIP-384: 729 visual tokens) for the default signal spec against shipping full logits.
2. The error of the top-k KL against the dense KL for k = 16, 64, 256, on a trained tiny
   teacher's outputs (trained here for a few hundred steps on the bundled benchmark unless a
   teacher folder is given), at T = 1 and T = 2.

    python benchmarks/bench_teacher_signal.py [--benchmark data/kvqa] [--teacher DIR] [--train-steps 300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ckd_ray.data.config import DataConfig
from ckd_ray.data.pipeline import iter_plain_batches
from ckd_ray.data.processor import Processor
from ckd_ray.losses import kl_loss_dense, kl_loss_topk, task_loss
from ckd_ray.models import build_preset, load_model
from ckd_ray.models.presets import REAL_PRESETS
from ckd_ray.teachers import SignalSpec, bytes_per_sample
from ckd_ray.teachers.signal import topk_with_tail


def wire_table() -> list[str]:
    spec = SignalSpec()  # the default: top-64 response + top-64 visual logits, Gram matrix, bf16
    lines = ["| teacher | full fp32 logits / sample | default signal / sample | of which top-k | Gram | ratio |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("qwen2.5-1.5b-siglip", "qwen2.5-3b-siglip", "qwen2.5-7b-siglip"):
        text = REAL_PRESETS[name].text
        parts = bytes_per_sample(spec, seq_len=2048, num_visual=729, teacher_hidden=text.hidden_size)
        full = 2048 * 151936 * 4  # compared over the shared (cut) vocabulary
        lines.append(f"| {name} | {full / 2**20:,.1f} MiB | {parts['total'] / 2**20:.2f} MiB | "
                     f"{(parts['response_topk'] + parts['visual_topk']) / 2**20:.2f} MiB | {parts['gram'] / 2**20:.2f} MiB | {full / parts['total']:,.0f}x |")
    return lines


def batches(benchmark: Path, split: str, limit: int):
    data = DataConfig(benchmark_root=str(benchmark), preprocess_batch_size=32)
    sources = [s.model_copy(update={"split": split}) for s in data.instruction_sources()]
    processor = Processor.load(benchmark / "processor", 16)
    seen = 0
    for batch in iter_plain_batches(sources, processor, data, rejects_uri="/tmp/ckd-bench-rejects.jsonl"):
        yield {k: torch.as_tensor(v) for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "target_ids", "response_mask")}
        seen += len(batch["input_ids"])
        if seen >= limit:
            return


def train_teacher(benchmark: Path, steps: int):
    """A tiny teacher trained on the instruction data (connector + LLM, task loss), so its output
    distributions are peaked like a real teacher's rather than uniform like a random one's."""
    model = build_preset("tiny-teacher", seed=0)
    model.model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    start = time.perf_counter()
    for step, batch in enumerate(batches(benchmark, "train", steps * 32)):
        logits = model(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"].long(), pixel_values=batch["pixel_values"]).logits
        loss = task_loss(logits, batch["target_ids"].long(), batch["response_mask"].bool())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"[bench] teacher training step {step}/{steps}: task loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def topk_error_table(teacher, student, benchmark: Path, num_samples: int) -> list[str]:
    lines = ["| T | k | dense KL | top-k KL | relative error |", "|---:|---:|---:|---:|---:|"]
    rows = list(batches(benchmark, "val", num_samples))
    for temperature in (1.0, 2.0):
        dense_total, topk_totals = 0.0, {16: 0.0, 64: 0.0, 256: 0.0}
        for batch in rows:
            inputs = dict(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"].long(), pixel_values=batch["pixel_values"])
            t_logits, s_logits = teacher(**inputs).logits.float(), student(**inputs).logits.float()
            mask = batch["response_mask"].bool()
            dense_total += kl_loss_dense(s_logits, t_logits, mask, temperature=temperature).item()
            for k in topk_totals:
                values, ids, tail = topk_with_tail(t_logits.reshape(-1, t_logits.shape[-1]), k)
                shape = t_logits.shape[:2]
                topk_totals[k] += kl_loss_topk(s_logits, values.reshape(*shape, k), ids.reshape(*shape, k), tail.reshape(shape), mask,
                                               temperature=temperature).item()
        for k, total in topk_totals.items():
            lines.append(f"| {temperature:g} | {k} | {dense_total / len(rows):.4f} | {total / len(rows):.4f} | {abs(total - dense_total) / dense_total:.2%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", type=Path, default=Path("data/kvqa"))
    parser.add_argument("--teacher", help="a trained teacher folder (default: train the tiny teacher here)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("\n".join(["### Bytes per sample at the paper's sizes (2048 tokens, 729 visual tokens)", ""] + wire_table()), flush=True)
    teacher = load_model(args.teacher).eval() if args.teacher else train_teacher(args.benchmark, args.train_steps)
    student = build_preset("tiny-student", seed=1).eval()
    lines = topk_error_table(teacher, student, args.benchmark, args.samples)
    print("\n".join(["", f"### Top-k KL error, trained tiny teacher vs untrained tiny student (vocab 512, {args.samples} val samples)", ""] + lines))


if __name__ == "__main__":
    main()
