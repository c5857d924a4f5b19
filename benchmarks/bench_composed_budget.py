"""How many steps a model composed from the pretrained parts needs before it uses the image: PT
(the fresh connector, on captions) then FT (connector + LLM, on instructions), in one process
without Ray (so it also runs where Ray is not installed, e.g. a GPU box), then greedy answers on
the test split scored beside the question-only baseline.

    python benchmarks/bench_composed_budget.py --role teacher --pt-steps 100 --ft-steps 200
    python benchmarks/bench_composed_budget.py --role student --ft-steps 600 --json out.json

Needs `data/kvqa` (ckd-ray data build-kvqa) and `models/tiny/<role>` (ckd-ray models pretrain).
It measures the recipe, not the engine: plain AdamW, one batch of `--batch-size` samples a step,
no DeepSpeed, no distillation. Prints seconds per phase and the scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHOWN = ("grounded", "margin", "accuracy", "open_em", "yes_no_acc", "mc_acc", "hop0_acc", "hop1_acc", "hop2_acc")


def columns(benchmark_root: str, kind: str, split: str, max_length: int) -> dict[str, np.ndarray]:
    """Every record of `kind` (captions | instructions) in `split`, preprocessed as training reads it."""
    from ckd_ray.data.config import DataConfig
    from ckd_ray.data.pipeline import iter_plain_batches
    from ckd_ray.data.processor import Processor

    config = DataConfig(benchmark_root=benchmark_root, max_length=max_length)
    processor = Processor.load(str(Path(benchmark_root) / "processor"), num_image_tokens=16)
    sources = config.caption_sources() if kind == "captions" else config.instruction_sources()
    sources = [s.model_copy(update={"split": split}) for s in sources]
    parts: dict[str, list] = {}
    for batch in iter_plain_batches(sources, processor, config, rejects_uri=f"/tmp/ckd-budget-rejects-{kind}-{split}.jsonl"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def train(model, data: dict, steps: int, lr: float, batch_size: int, params: list, label: str, device) -> float:
    """`steps` AdamW steps of the response tokens' cross-entropy on random batches, with the
    engine's schedule (3% linear warm-up, cosine to 0) and gradient clip (1.0); seconds taken."""
    import torch

    from ckd_ray.train.engine import lr_factor, warmup_steps_for

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = warmup_steps_for(steps, 0.03)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps=warmup, total_steps=steps))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for step in range(steps):
        index = rng.integers(0, len(data["input_ids"]), batch_size)
        used = int(data["attention_mask"][index].sum(axis=1).max())  # right padding trimmed, as the engine does
        batch = {name: torch.from_numpy(data[name][index][:, :used] if name != "pixel_values" else data[name][index]).to(device)
                 for name in ("input_ids", "attention_mask", "pixel_values", "target_ids")}
        logits = model(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"].long(),
                       pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["target_ids"].long().reshape(-1),
                                                 ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"{label} step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.1f} s)", flush=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", default="teacher", help="models/tiny/<role> (or --model)")
    parser.add_argument("--model", default=None, help="a composed Llava folder (default: models/tiny/<role>)")
    parser.add_argument("--benchmark-root", default="data/kvqa")
    parser.add_argument("--pt-steps", type=int, default=100)
    parser.add_argument("--ft-steps", type=int, default=200)
    parser.add_argument("--lr-pt", type=float, default=3e-3)
    parser.add_argument("--lr-ft", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--test-samples", type=int, default=600)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from ckd_ray.data.baselines import load_sample_baselines
    from ckd_ray.evaluate.generate import generate_answers
    from ckd_ray.evaluate.scoring import score_records

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = args.model or str(REPO / "models" / "tiny" / args.role)
    model = LlavaForConditionalGeneration.from_pretrained(folder).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seconds = {}
    started = time.perf_counter()
    captions = columns(args.benchmark_root, "captions", "train", args.max_length)
    instructions = columns(args.benchmark_root, "instructions", "train", args.max_length)
    test = columns(args.benchmark_root, "instructions", "test", args.max_length)
    seconds["data"] = time.perf_counter() - started

    for p in model.parameters():
        p.requires_grad_(False)
    connector = list(model.model.multi_modal_projector.parameters())
    for p in connector:
        p.requires_grad_(True)
    model.train()
    seconds["PT"] = train(model, captions, args.pt_steps, args.lr_pt, args.batch_size, connector, "PT", device)
    # lm_head shares its weight with the embeddings (tied): each tensor once in the optimizer.
    llm = list({id(p): p for p in [*connector, *model.model.language_model.parameters(), *model.lm_head.parameters()]}.values())
    for p in llm:
        p.requires_grad_(True)
    seconds["FT"] = train(model, instructions, args.ft_steps, args.lr_ft, args.batch_size, llm, "FT", device)

    started = time.perf_counter()
    rows = [{name: test[name][i] for name in test} for i in range(min(args.test_samples, len(test["input_ids"])))]
    answers = generate_answers(model, tokenizer, rows, batch_size=64, max_new_tokens=8)
    baselines = load_sample_baselines(args.benchmark_root) or {}
    records = [{"sample_id": str(r["sample_id"]), "question_type": str(r["question_type"]), "hop": int(r["hop"]),
                "answer": str(r["answer"]), "prediction": a, **baselines.get(str(r["sample_id"]), {})} for r, a in zip(rows, answers)]
    scores = score_records(records)
    seconds["evaluation"] = time.perf_counter() - started

    figures = {"model": folder, "device": str(device), **{k: v for k, v in vars(args).items() if k not in ("json", "model")},
               "seconds": {k: round(v, 1) for k, v in seconds.items()}, "scores": {k: round(scores[k], 4) for k in SHOWN if k in scores}}
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
