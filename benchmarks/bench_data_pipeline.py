"""Data pipeline throughput: the Ray Data pipeline against a plain single-process loop, side by side,
over the same records of the bundled benchmark (read LLaVA JSON + images in a shuffled read plan
-> tokenize, mask, image transform, facts), in samples per second delivered to the consumer.

* ``plain``: ``iter_plain_batches``, the same read and preprocessing code in one Python process;
* ``ray``: ``build_student_dataset`` iterated with ``iter_batches`` on the driver, as a Ray Train
  worker would iterate its shard. Its first pass includes starting Ray's worker processes and is
  reported apart; later passes run on warm workers, which is
  what a training run sees.

Passes alternate (plain, ray, plain, ray, ...) so that both see the same background load on a
shared machine, and Ray's workers run at the driver's priority (Ray nices them to 15 by default);
the table gives the median and the best pass. Every pass re-reads and
re-preprocesses everything (nothing is cached between passes). The benchmark is built into a
temporary folder unless ``--benchmark-root`` names one.

    python benchmarks/bench_data_pipeline.py                  # train-split instructions, 3 rounds
    python benchmarks/bench_data_pipeline.py --num-cpus 8 --rounds 5 --no-shuffle
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import ray

from ckd_ray.data.config import DataConfig
from ckd_ray.data.pipeline import build_student_dataset, iter_plain_batches
from ckd_ray.data.processor import Processor


def timed_pass(batches) -> tuple[int, float]:
    started = time.perf_counter()
    num_samples = sum(len(batch["sample_id"]) for batch in batches)
    return num_samples, time.perf_counter() - started


def rebatch(batches, batch_size: int):
    """Cuts the plain loop's preprocessing batches into consumer batches of `batch_size` rows, as
    `iter_batches` does for the Ray pipeline."""
    pending: list[dict] = []
    num_pending = 0
    for batch in batches:
        pending.append(batch)
        num_pending += len(batch["sample_id"])
        while num_pending >= batch_size:
            joined = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in joined.items()}
            pending = [{k: v[batch_size:] for k, v in joined.items()}]
            num_pending -= batch_size
    if num_pending:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


def compare(root: str, scratch: str, *, split: str = "train", rounds: int = 3, records_per_read_task: int = 1024,
            preprocess_batch_size: int = 256, batch_size: int = 256, shuffle: bool = True) -> dict[str, list[tuple[int, float]]]:
    """The passes on the Ray this process is connected to: "cold" (the first Ray pass, which
    starts its workers), then `rounds` alternating "plain" and "ray" passes; (samples, seconds)
    of each."""
    config = DataConfig(benchmark_root=root, records_per_read_task=records_per_read_task,
                        preprocess_batch_size=preprocess_batch_size)
    sources = [s.model_copy(update={"split": split}) for s in config.instruction_sources()]
    processor = Processor.load(os.path.join(root, "processor"), num_image_tokens=16)
    ray.data.DataContext.get_current().enable_progress_bars = False
    student = build_student_dataset(sources, processor, config, rejects_uri=os.path.join(scratch, "ray.jsonl"), shuffle=shuffle)

    def ray_pass() -> tuple[int, float]:
        return timed_pass(student.dataset.iter_batches(batch_size=batch_size, batch_format="numpy"))

    def plain_pass() -> tuple[int, float]:
        batches = iter_plain_batches(sources, processor, config, rejects_uri=os.path.join(scratch, "plain.jsonl"), shuffle=shuffle)
        return timed_pass(rebatch(batches, batch_size))

    passes = {"cold": [ray_pass()], "plain": [], "ray": []}
    for _ in range(rounds):
        passes["plain"].append(plain_pass())
        passes["ray"].append(ray_pass())
    student.close_rejects()
    return passes


def table(passes: dict[str, list[tuple[int, float]]]) -> list[str]:
    """The Markdown table of `compare`'s passes: median and best samples/s, median against the plain loop's."""
    lines = ["| pipeline | passes | samples per pass | median samples/s | best samples/s | median vs plain |",
             "|---|---:|---:|---:|---:|---:|"]
    rates = {name: [n / seconds for n, seconds in runs] for name, runs in passes.items()}
    plain_median = statistics.median(rates["plain"])
    names = {"plain": "plain loop (1 process)", "ray": "Ray Data, warm workers", "cold": "Ray Data, first pass (starts workers)"}
    for key, name in names.items():
        median = statistics.median(rates[key])
        lines.append(f"| {name} | {len(rates[key])} | {passes[key][0][0]} | {median:.0f} | {max(rates[key]):.0f} | "
                     f"{median / plain_median:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark-root", help="an existing `ckd-ray data build-kvqa` folder")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs given to ray.init")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain / warm Ray passes")
    parser.add_argument("--records-per-read-task", type=int, default=1024)
    parser.add_argument("--preprocess-batch-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batch handed to the consumer")
    parser.add_argument("--no-shuffle", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.benchmark_root
        if root is None:
            from ckd_ray.data.kvqa import build_kvqa

            root = os.path.join(scratch, "kvqa")
            build_kvqa(root, progress=None)
        load_before = os.getloadavg()[0]
        # Ray runs its workers at nice 15. On a machine shared with other jobs that alone would make
        # the pipeline look slow next to the plain loop (nice 0); give both the same priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        passes = compare(root, scratch, split=args.split, rounds=args.rounds, records_per_read_task=args.records_per_read_task,
                         preprocess_batch_size=args.preprocess_batch_size, batch_size=args.batch_size, shuffle=not args.no_shuffle)
        ray.shutdown()
        load_after = os.getloadavg()[0]

    print(f"records: {args.split}-split instructions; shuffled read plan: {not args.no_shuffle}; read tasks of "
          f"{args.records_per_read_task} records; preprocess batches of {args.preprocess_batch_size}; consumer batches of "
          f"{args.batch_size}; {os.cpu_count()} cores, Ray given {args.num_cpus} logical CPUs; load average "
          f"{load_before:.1f} before, {load_after:.1f} after")
    print("\n".join(table(passes)))


if __name__ == "__main__":
    main()
