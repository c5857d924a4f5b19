"""Data pipeline throughput: the Ray Data pipeline against a plain single-process loop, side by side,
over the same records of the bundled benchmark (read LLaVA JSON + images -> shuffle -> tokenize,
mask, image transform, facts), in samples per second delivered to the consumer.

* ``plain``: ``iter_plain_batches``, the same read and preprocessing code in one Python process;
* ``ray``: ``build_student_dataset`` iterated with ``iter_batches`` on the driver, as a Ray Train
  worker would iterate its shard. Epoch 1 includes starting Ray's worker processes (each imports
  transformers once); later epochs run on warm workers, which is what a training run sees.

The benchmark is built into a temporary folder unless ``--benchmark-root`` names one.

    python benchmarks/bench_data_pipeline.py                  # train-split instructions, 2 Ray epochs
    python benchmarks/bench_data_pipeline.py --num-cpus 8 --epochs 3
"""

import argparse
import os
import tempfile
import time

from ckd_ray.data.config import DataConfig
from ckd_ray.data.pipeline import build_student_dataset, iter_plain_batches
from ckd_ray.data.processor import Processor


def timed_pass(batches) -> tuple[int, float]:
    started = time.perf_counter()
    num_samples = sum(len(batch["sample_id"]) for batch in batches)
    return num_samples, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark-root", help="an existing `ckd-ray data build-kvqa` folder")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs given to ray.init")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the Ray dataset")
    parser.add_argument("--records-per-read-task", type=int, default=1024)
    parser.add_argument("--preprocess-batch-size", type=int, default=256)
    parser.add_argument("--no-shuffle", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.benchmark_root
        if root is None:
            from ckd_ray.data.kvqa import build_kvqa

            root = os.path.join(scratch, "kvqa")
            build_kvqa(root, progress=None)
        config = DataConfig(
            benchmark_root=root,
            records_per_read_task=args.records_per_read_task,
            preprocess_batch_size=args.preprocess_batch_size,
        )
        sources = [s.model_copy(update={"split": args.split}) for s in config.instruction_sources()]
        processor = Processor.load(os.path.join(root, "processor"), num_image_tokens=16)
        shuffle = not args.no_shuffle
        load_before = os.getloadavg()[0]
        results = []

        plain = iter_plain_batches(sources, processor, config, rejects_uri=os.path.join(scratch, "plain.jsonl"), shuffle=shuffle)
        results.append(("plain (1 process)", 1, *timed_pass(plain)))

        import ray

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        student = build_student_dataset(sources, processor, config, rejects_uri=os.path.join(scratch, "ray.jsonl"), shuffle=shuffle)
        for epoch in range(1, args.epochs + 1):
            batches = student.dataset.iter_batches(batch_size=config.batch_size, batch_format="numpy")
            results.append((f"ray data ({args.num_cpus} logical CPUs)", epoch, *timed_pass(batches)))
        student.close_rejects()
        ray.shutdown()
        load_after = os.getloadavg()[0]

    print(f"records: {args.split}-split instructions; shuffle: {shuffle}; read tasks of {args.records_per_read_task} "
          f"records; preprocess batches of {args.preprocess_batch_size}; {os.cpu_count()} cores; "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    print("| pipeline | epoch | samples | seconds | samples/s | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    plain_rate = results[0][2] / results[0][3]
    for name, epoch, num_samples, seconds in results:
        rate = num_samples / seconds
        print(f"| {name} | {epoch} | {num_samples} | {seconds:.1f} | {rate:.0f} | {rate / plain_rate:.2f}x |")


if __name__ == "__main__":
    main()
