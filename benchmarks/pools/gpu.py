"""`python -m benchmarks.pools --gpu`: the same matrix at real widths in bf16 on a GPU machine.

A Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher, each composed with a
SigLIP-B/14-384-shaped tower, random weights from `transformers` config classes (the parts and
the compose step are `benchmarks/gpu_smoke.py`'s), sequences up to 1,024 tokens (729 visual),
one Train worker. Layouts:

* one GPU shared by pool and student: the student worker and each teacher actor ask Ray for
  half of it (`trainer.resources: {GPU: 0.5}`, `teacher_pool.num_gpus: 0.5`), so the streamed
  pool (b) runs beside training on the same device; (a) runs the teacher inside the worker on
  that device; (c)'s pass and (d) have the device to themselves;
* the pool on its own GPU (with two or more visible): (b) again with the student on one device
  and the pool's actor on another (`num_gpus: 1` each). With one GPU this layout is not run and
  the section says so; a MIG slice is a device of its own to Ray and serves the same way.

The table also gives the student worker's peak GPU memory (torch's allocator peak). Without
CUDA the command stops with exit code 2 before anything starts; `--dry-run` prints the plan and
runs this same code path at tiny width on CPU (its figures are not GPU figures).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.pools.report import machine, render_section, utc_now, write_section

GPU_STEPS = 20
GPU_TEACHER = "teacher-1.5b"


def gpu_scale(*, rehearsal: bool, runs: int):
    from benchmarks.pools.matrix import Scale

    if rehearsal:  # the same settings at tiny width, on CPU
        return Scale(steps={GPU_TEACHER: 4}, runs=1, gap_settings=False, micro_batch_size=4, num_workers=1, max_length=128,
                     trainer={"cpus_per_worker": 1}, teacher_pool={"num_cpus": 1, "batch_size": 4})
    return Scale(steps={GPU_TEACHER: GPU_STEPS}, runs=runs, gap_settings=False, micro_batch_size=8, num_workers=1, max_length=1024,
                 trainer={"use_gpu": True, "precision": "bf16", "cpus_per_worker": 4, "resources": {"GPU": 0.5}},
                 teacher_pool={"num_gpus": 0.5, "num_cpus": 2, "batch_size": 8},
                 signal={"response_top_k": 64, "visual_top_k": 64, "gram": True}, model_dtype="bfloat16")


def plan_text(scale) -> dict:
    from benchmarks.gpu_smoke import meta_parameters, real_shapes

    return {"parameters": meta_parameters(real_shapes()), "steps_per_run": scale.steps, "runs": scale.runs,
            "micro_batch_size": scale.micro_batch_size, "max_length": scale.max_length, "trainer": scale.trainer,
            "teacher_pool": scale.teacher_pool, "signal": scale.signal,
            "variants": ["a (teacher in the worker, same GPU)", "b (pool beside the student, 0.5 + 0.5 of one GPU)",
                         "c (pass, then training)", "d (student alone on precomputed signal)",
                         "b on its own GPU (with 2+ GPUs)"]}


def run_gpu(args) -> int:
    import torch

    rehearsal = args.dry_run
    if not rehearsal and not torch.cuda.is_available():
        print("benchmarks.pools --gpu: no CUDA device is visible (torch.cuda.is_available() is False): run it on a GPU "
              "machine with the CUDA build of torch, or add --dry-run for the plan and a CPU rehearsal at tiny width",
              file=sys.stderr)
        return 2
    scale = gpu_scale(rehearsal=rehearsal, runs=args.runs)
    print(json.dumps(plan_text(gpu_scale(rehearsal=False, runs=args.runs)), indent=1))

    import ray

    from benchmarks.gpu_smoke import build_parts, compose_both, real_shapes, tiny_shapes
    from benchmarks.pools.matrix import PoolBenchmark, run_matrix
    from ckd_ray.cascade.session import connect_ray, quiet_data_progress
    from ckd_ray.config.job import RayConfig

    started = time.perf_counter()
    num_gpus = 0 if rehearsal else torch.cuda.device_count()
    connect_ray(RayConfig(num_cpus=8 if rehearsal else 16), log_to_driver=False)
    quiet_data_progress()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ckd-pools-gpu-") as work:
        work = Path(work)
        paths = build_parts(tiny_shapes() if rehearsal else real_shapes(), work, "cpu" if rehearsal else "cuda")
        bench = PoolBenchmark(work, paths["benchmark"], scale, log=lambda line: print(line, flush=True))
        models = compose_both(paths, work)
        bench.models = {"student": models["student"], GPU_TEACHER: models["teacher"]}
        figures = run_matrix(bench)
        if num_gpus >= 2:
            own = dict(pool={"num_gpus": 1}, note="pool on its own GPU")
            solo = PoolBenchmark(work, paths["benchmark"], _with_trainer(scale, {"resources": {"GPU": 1}}), log=bench.log,
                                 actors=bench.actors)
            solo.models = bench.models
            figures += solo.run_group("own-gpu", [solo.plan("b", GPU_TEACHER, f"own-gpu-b{i}", **own) for i in range(scale.runs)])
        bench.actors.stop()
    ray.shutdown()
    command = "python -m benchmarks.pools " + " ".join(sys.argv[1:])
    accelerator = ("no GPU (rehearsal at tiny width on CPU: these are not GPU figures)" if rehearsal else
                   f"{num_gpus} x {torch.cuda.get_device_name(0)}" + ("" if num_gpus >= 2 else " (one GPU: the own-GPU layout was not run)"))
    section = render_section(figures, scale, command=command.strip(), wall_s=time.perf_counter() - started,
                             measured_at=utc_now(), machine_text=machine(accelerator), marker="gpu")
    print("\n" + section)
    if not args.no_write and not rehearsal:
        write_section(Path(args.results), section, marker="gpu")
    return 0


def _with_trainer(scale, trainer: dict):
    import dataclasses

    return dataclasses.replace(scale, trainer={**scale.trainer, **trainer})
