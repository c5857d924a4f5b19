"""A micro-batch's forward in length groups against one forward over the padded batch, side by
side on the same batches: the student worker's training step (`train_step` through a DeepSpeed
ZeRO-2 engine, as `trainer.length_buckets` runs it) for each tiny model, and the teacher pool's
signal pass (`TeacherForward`, as `teacher_pool.length_buckets` runs it).

    python benchmarks/bench_length_buckets.py                       # 1 thread (a 1-CPU worker), 3 groups
    python benchmarks/bench_length_buckets.py --threads 2 --buckets 2 --batches 30

Needs `data/kvqa` (ckd-ray data build-kvqa) and `models/tiny/*` (ckd-ray models pretrain). Batches
of 32 random training records of each kind (instructions: the SFT/DFT/FT steps; captions: DPT/PT),
preprocessed as training reads them; the two settings alternate batch by batch on two engines
built from the same weights, so both see the same load. Prints ms per step (median) and the
share of computed positions that are padding. One process, no Ray.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_composed_budget import columns  # noqa: E402


def padding_share(batches: list[dict], max_buckets: int) -> float:
    """Padding positions over all positions the forward computes."""
    from ckd_ray.models.buckets import plan_buckets

    computed = real = 0
    for batch in batches:
        lengths = batch["attention_mask"].sum(axis=1)
        real += int(lengths.sum())
        computed += sum(len(group) * int(lengths[group[-1]]) for group in plan_buckets(lengths, max_buckets))
    return 1 - real / computed


def process_group() -> None:
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("gloo", rank=0, world_size=1)


def engine_for(model_dir: str):
    import torch

    from ckd_ray.models import apply_freeze, load_model
    from ckd_ray.train.engine import OptimizerPlan, StudentWithProjection, build_engine, deepspeed_config

    student = load_model(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    apply_freeze(student, "connector+llm")
    plan = OptimizerPlan(lr=1e-4, weight_decay=0.0, total_steps=1000, warmup_steps=0)
    config = deepspeed_config(micro_batch_size=32, grad_accum=1, grad_clip=1.0, zero_stage=2, bf16=False)
    return build_engine(StudentWithProjection(student, None), plan, config)[0]


def time_alternating(run, batches: list[dict], settings: tuple[int, int]) -> dict[int, float]:
    """Median ms of `run(batch, setting)` per setting, the settings alternating on each batch (first two batches warm up)."""
    times: dict[int, list[float]] = {setting: [] for setting in settings}
    for index, batch in enumerate(batches):
        for setting in settings if index % 2 == 0 else settings[::-1]:
            started = time.perf_counter()
            run(batch, setting)
            if index >= 2:
                times[setting].append(1000 * (time.perf_counter() - started))
    return {setting: statistics.median(values) for setting, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark-root", default="data/kvqa")
    parser.add_argument("--models", default="models/tiny")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--buckets", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from ckd_ray.losses import TeacherSignalBatch
    from ckd_ray.losses.config import LossConfig
    from ckd_ray.models import load_model
    from ckd_ray.teachers import SignalSpec
    from ckd_ray.teachers.forward import TeacherForward
    from ckd_ray.train.batch import student_batch
    from ckd_ray.train.loop import train_step

    torch.set_num_threads(args.threads)
    process_group()
    rng = np.random.default_rng(0)
    data = {}
    for kind in ("instructions", "captions"):
        rows = columns(args.benchmark_root, kind, "train", 128)
        picks = [rng.choice(len(rows["input_ids"]), 32, replace=False) for _ in range(args.batches)]
        data[kind] = [{name: values[pick] for name, values in rows.items()} for pick in picks]
    settings = (1, args.buckets)
    loss = LossConfig(weights={"task": 1.0})
    lines = [f"| run | data | ms at 1 group | ms at {args.buckets} | speed-up | padding computed at 1 | at {args.buckets} |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def row(label: str, kind: str, ms: dict[int, float]) -> None:
        share = [padding_share(data[kind], setting) for setting in settings]
        lines.append(f"| {label} | {kind} | {ms[1]:.0f} | {ms[args.buckets]:.0f} | {ms[1] / ms[args.buckets]:.2f}x "
                     f"| {100 * share[0]:.0f}% | {100 * share[1]:.0f}% |")
        print(lines[-1], flush=True)

    for role in ("student", "ta", "teacher"):
        engines = {setting: engine_for(f"{args.models}/{role}") for setting in settings}  # same weights, one per setting
        for kind in ("instructions", "captions"):
            ms = time_alternating(lambda batch, setting: train_step(
                engines[setting], student_batch(batch, torch.device("cpu"), torch.float32), TeacherSignalBatch(), loss, setting),
                data[kind], settings)
            row(f"training step: {role}", kind, ms)
    spec = SignalSpec(response_top_k=16, visual_top_k=16, gram=True)  # configs/tiny_cascade.yaml's signal
    model = load_model(f"{args.models}/teacher", attn_implementation="sdpa", dtype=torch.float32)
    forwards = {setting: TeacherForward(model, spec, model.config.text_config.vocab_size, max_buckets=setting) for setting in settings}
    for kind in ("instructions", "captions"):
        row("teacher pass: teacher", kind, time_alternating(lambda batch, setting: forwards[setting](batch), data[kind], settings))
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
