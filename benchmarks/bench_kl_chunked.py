"""Chunked vs naive temperature-softened KL, forward + backward: time and peak memory.

Variants, each in its own subprocess so memory peaks do not mix:

* ``naive``: the textbook implementation, float32 ``log_softmax`` of the full ``[P, V]`` student
  and teacher logits, autograd through all of it;
* ``chunked``: ``kl_loss_dense`` (same dense teacher, ``chunk_size`` positions at a time, custom
  backward);
* ``chunked-topk``: ``kl_loss_topk`` on the compressed teacher signal (top-k + tail log-mass), as
  training runs it; the dense teacher logits are freed before measuring.

Peak memory is measured above the inputs (student and teacher logits already allocated): on CUDA
with ``torch.cuda.max_memory_allocated``; on CPU as the peak resident set size (VmHWM, reset via
``/proc/self/clear_refs`` after the inputs exist) minus the resident size at that point, because
torch's CPU allocations are invisible to tracemalloc. Both include the student's gradient
(one ``[P, V]`` tensor), which any variant must allocate.

    python benchmarks/bench_kl_chunked.py                     # CPU, seq 2048, vocab 151936
    python benchmarks/bench_kl_chunked.py --device cuda
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ckd_ray.losses import kl_loss_dense, kl_loss_topk

VARIANTS = ("naive", "chunked", "chunked-topk")
GIB = 1024**3


def naive_kl(student_BLV, teacher_BLV, mask_BL, temperature):
    log_q_PV = F.log_softmax(student_BLV[mask_BL].float() / temperature, dim=-1)
    log_p_PV = F.log_softmax(teacher_BLV[mask_BL].float() / temperature, dim=-1)
    p_PV = log_p_PV.exp()
    return (p_PV * (log_p_PV - log_q_PV)).sum(dim=-1).mean() * temperature**2


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(args) -> dict:
    """One variant, one forward + backward, in this (child) process."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    student_BLV = (torch.randn(1, args.seq, args.vocab, device=device) * 3).to(dtype).requires_grad_(True)
    teacher_BLV = (torch.randn(1, args.seq, args.vocab, device=device) * 3).to(dtype)
    mask_BL = torch.ones(1, args.seq, dtype=torch.bool, device=device)
    options = dict(temperature=args.temperature)
    if args.variant == "naive":
        loss_fn = lambda: naive_kl(student_BLV, teacher_BLV, mask_BL, args.temperature)  # noqa: E731
    elif args.variant == "chunked":
        loss_fn = lambda: kl_loss_dense(  # noqa: E731
            student_BLV, teacher_BLV, mask_BL, chunk_size=args.chunk_size, **options
        )
    else:
        values_BLK, ids_BLK = teacher_BLV.float().topk(args.topk, dim=-1)
        tail_BL = torch.empty(1, args.seq, device=device)
        for start in range(0, args.seq, args.chunk_size):  # the teacher side, chunked too
            rows = teacher_BLV[:, start : start + args.chunk_size].float()
            tail_BL[:, start : start + args.chunk_size] = rows.scatter(
                -1, ids_BLK[:, start : start + args.chunk_size], -math.inf
            ).logsumexp(-1)
        values_BLK, ids_BLK = values_BLK.bfloat16(), ids_BLK.int()
        del teacher_BLV, rows  # only the compressed signal reaches the student
        loss_fn = lambda: kl_loss_topk(  # noqa: E731
            student_BLV, values_BLK, ids_BLK, tail_BL, mask_BL, chunk_size=args.chunk_size, **options
        )

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        baseline = proc_status_bytes("VmRSS")
    seconds = math.inf
    for _ in range(args.repeats):  # the best of a few: the machine may be shared
        student_BLV.grad = None
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = proc_status_bytes("VmHWM") - baseline
    return {"variant": args.variant, "seconds": seconds, "peak_bytes": peak, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048, help="masked (response) positions, all of one sequence")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="student/teacher logits")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per variant; the fastest is reported")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode:
            raise SystemExit(f"{variant} failed:\n{completed.stderr}")
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
        seconds, peak_gib = results[variant]["seconds"], results[variant]["peak_bytes"] / GIB
        print(f"# {variant}: {seconds:.2f} s, {peak_gib:.2f} GiB", file=sys.stderr)

    naive = results.get("naive")
    # Every variant must allocate the logits' gradient; the rest is the loss's own workspace.
    gradient_bytes = args.seq * args.vocab * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    print(
        f"\nseq {args.seq} (all positions masked) x vocab {args.vocab}, {args.dtype} logits, T = {args.temperature}, "
        f"chunk_size {args.chunk_size}, top-k {args.topk}, device {args.device}, torch {torch.__version__}, "
        f"best of {args.repeats}\n"
    )
    print(
        "| variant | fwd+bwd time (s) | peak memory above inputs (GiB) | of which beyond the logits' gradient (GiB) "
        "| time / naive | memory / naive | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, result in results.items():
        time_ratio = f"{result['seconds'] / naive['seconds']:.2f}" if naive else "-"
        memory_ratio = f"{result['peak_bytes'] / naive['peak_bytes']:.3f}" if naive else "-"
        print(
            f"| {variant} | {result['seconds']:.2f} | {result['peak_bytes'] / GIB:.2f} "
            f"| {(result['peak_bytes'] - gradient_bytes) / GIB:.2f} | {time_ratio} | {memory_ratio} "
            f"| {result['loss']:.6f} |"
        )

if __name__ == "__main__":
    main()
