"""Greedy answers of a VLM to preprocessed benchmark rows, and the model's cost figures."""

from __future__ import annotations

import resource
import time

import numpy as np
import torch


def prompt_of(row: dict) -> np.ndarray:
    """The prompt tokens of a preprocessed row: everything up to and including the position that
    predicts the first answer token (the chat template's assistant header)."""
    return np.asarray(row["input_ids"][: int(row["answer_pos"]) + 1])


@torch.no_grad()
def generate_answers(model, tokenizer, rows: list[dict], *, batch_size: int = 64, max_new_tokens: int = 8) -> list[str]:
    """Greedy decoding, left-padded batches, stopping at the tokenizer's end-of-turn token.
    Batches hold prompts of similar length (the rows sorted by prompt length, answers returned
    in the rows' order): the benchmark's prompts differ up to 3x in length, and a batch computes
    its longest prompt for every row."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id or 0
    eos_id = model.generation_config.eos_token_id
    all_prompts = [prompt_of(r) for r in rows]
    order = np.argsort([len(prompt) for prompt in all_prompts], kind="stable")
    answers: list[str | None] = [None] * len(rows)
    for start in range(0, len(rows), batch_size):
        picked = order[start : start + batch_size]
        chunk = [rows[i] for i in picked]
        prompts = [all_prompts[i] for i in picked]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        pixel_values = torch.as_tensor(np.stack([r["pixel_values"] for r in chunk])).to(device, model.dtype)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for index, sequence in zip(picked, output[:, width:]):
            answers[index] = tokenizer.decode(sequence, skip_special_tokens=True).strip()
    return answers


@torch.no_grad()
def measure_latency(model, row: dict, *, max_new_tokens: int, runs: int) -> float:
    """Median seconds to answer one prompt (batch 1), after one warm-up run."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_of(row), dtype=torch.long, device=device)[None]
    pixel_values = torch.as_tensor(row["pixel_values"])[None].to(device, model.dtype)
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        model.generate(input_ids=prompt, pixel_values=pixel_values, max_new_tokens=max_new_tokens, do_sample=False,
                       min_new_tokens=max_new_tokens, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU allocator peak when on GPU, else the process's max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
