"""Ray Tune trials on the teacher signal cache vs trials that each run the teacher.

The same search (one T -> S stage with a single DFT step, N trials, every trial runs its full
budget: ASHA's grace period equals the budget) runs twice in one Ray session:

* ``cache``: the driver runs the teacher pool once and writes the signal cache; each trial reads
  it (the `ckd-ray tune` default);
* ``teacher-per-trial``: `teacher_pool.use_cache: false`, so each trial starts its own teacher
  actor pool and streams the signal into its training run.

Each variant gets a fresh signal cache and run folder; the student, data, seeds and trial values
are the same. Reported: wall time of the whole `run_tune` (initial models, teacher pass, trials,
report), the mean trial time as Tune measured it, and the teacher passes and cache hits counted
by `run_tune`.

    python benchmarks/bench_tune_cache.py --benchmark-root data/kvqa --trials 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

VARIANTS = ("teacher-per-trial", "cache")


def job_config(benchmark_root: str, root: str, variant: str, trials: int, steps: int):
    from ckd_ray.config import validate_config

    return validate_config({
        "name": f"bench-tune-{variant}",
        "seed": 0,
        "models": {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"}},
        "data": {"benchmark_root": benchmark_root, "max_length": 128},
        "cascade": {"prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DFT"]}]},
        "signal": {"response_top_k": 16, "visual_top_k": 16, "gram": True},
        "teacher_pool": {"num_cpus": 1, "min_actors": 1, "max_actors": 1, "batch_size": 16,
                         "use_cache": variant == "cache"},
        "trainer": {"num_workers": 1, "micro_batch_size": 8, "lr": {"DFT": 2.0e-3}, "max_steps": steps,
                    "warmup_ratio": 0.0, "report_every": steps},
        "storage": {"root": f"{root}/{variant}/runs", "signal_cache": f"{root}/{variant}/signal-cache"},
        "tune": {"num_samples": trials, "max_steps_per_trial": steps, "grace_period": steps, "searcher": "random",
                 "space": {"output": {"low": 0.1, "high": 2.0, "log": True}, "temperature": {"choices": [1.0, 2.0]}}},
    })


def run_variant(benchmark_root: str, root: str, variant: str, trials: int, steps: int) -> dict:
    from ckd_ray.tune.runner import run_tune

    job = job_config(benchmark_root, root, variant, trials, steps)
    lines: list[str] = []
    start = time.perf_counter()
    outcome = run_tune(job, log=lambda line: (lines.append(line), print(line, flush=True)))
    wall = time.perf_counter() - start
    (search,) = outcome.searches
    driver_teacher_s = sum(float(m.group(1)) for line in lines for m in [re.search(r"teacher pass: \d+ samples in ([\d.]+) s", line)] if m)
    return {
        "variant": variant,
        "trials": len(search.rows),
        "finished": sum(row["status"] == "finished" for row in search.rows),
        "teacher_passes": search.signal["driver_teacher_passes"] + search.signal["trial_teacher_passes"],
        "cache_hits": search.signal["trial_cache_hits"],
        "driver_teacher_s": driver_teacher_s,
        "trial_s": statistics.mean(row["seconds"] for row in search.rows),
        "overhead_s": statistics.mean(row["seconds"] - row["optimizer_s"] for row in search.rows),
        "wall_s": wall,
        "val_loss": [round(row["val_loss"], 4) for row in search.rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark-root", default="data/kvqa", help="output of `ckd-ray data build-kvqa` (built here if missing)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per trial")
    parser.add_argument("--workdir", default=None, help="run folders and caches (default: a temporary folder)")
    args = parser.parse_args()

    import ray

    if not (Path(args.benchmark_root) / "summary.json").exists():
        from ckd_ray.data.kvqa import build_kvqa

        build_kvqa(args.benchmark_root)
    from ckd_ray.cascade.session import connect_ray
    from ckd_ray.config.job import RayConfig

    connect_ray(RayConfig(num_cpus=8))  # as `ckd-ray tune` starts its local Ray
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        rows = [run_variant(str(Path(args.benchmark_root).resolve()), root, variant, args.trials, args.steps) for variant in VARIANTS]
    ray.shutdown()

    print("\n".join(table(rows, args.trials, args.steps)))


def table(rows: list[dict], trials: int, steps: int) -> list[str]:
    """`run_variant`'s rows as the Markdown table of RESULTS.md, walls against the first row's."""
    base = rows[0]["wall_s"]
    lines = ["", f"{trials} trials x {steps} optimizer steps, tiny-teacher -> tiny-student, 1 Train worker", "",
             "| variant | trials (finished) | teacher passes | cache hits | driver teacher pass (s) | mean trial (s) | mean trial overhead beyond optimizer steps (s) | total wall (s) | wall / teacher-per-trial |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trials']} ({r['finished']}) | {r['teacher_passes']} | {r['cache_hits']} | "
                     f"{r['driver_teacher_s']:.1f} | {r['trial_s']:.1f} | {r['overhead_s']:.1f} | {r['wall_s']:.1f} | {r['wall_s'] / base:.2f} |")
    return lines + ["", f"val_loss per trial: { {r['variant']: r['val_loss'] for r in rows} }"]


if __name__ == "__main__":
    main()
