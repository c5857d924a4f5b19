"""The teacher passes of one worker group's steps, one at a time against `concurrent_passes` at
a time, side by side in one run.

    python benchmarks/bench_teacher_passes.py --run runs/tiny-cascade [--repeats 2]

Takes the prepared TA and teacher of a finished run of `configs/tiny_cascade.yaml` (its
manifest's roles) and prepares the student's segment of that cascade (TA -> student and
teacher -> student: four teacher passes over 1,280 samples each) as the cascade does, with a
fresh signal cache for every try, so every pass runs its teacher pool. Prints the wall time of
the segment's preparation per setting (median and min-max over the repeats, alternating the
settings) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare_student_segment(job, roles: dict, output: Path) -> tuple[float, list[float]]:
    """(wall seconds of the segment's preparation, each pass's own seconds)."""
    from ckd_ray.cascade.datasets import StepData
    from ckd_ray.cascade.plan import build_plan
    from ckd_ray.cascade.steps import prepare_segment, split_segments

    segment = [step for step in split_segments(build_plan(job))[-1] if step.learner == "student"]
    data = StepData(job, str(output))
    started = time.perf_counter()
    prepared = prepare_segment(job, segment, data, dict(roles), output_uri=str(output), log=lambda _: None)
    wall = time.perf_counter() - started
    return wall, [step.teacher_pass["seconds"] for step in prepared if step.teacher_pass.get("seconds")]


def compare(base, roles: dict, scratch: Path, *, repeats: int = 2, concurrent: int = 2, log=print) -> dict[int, list[tuple[float, list[float]]]]:
    """On the Ray this process is connected to: the student's segment of `base` prepared `repeats`
    times with `concurrent_passes` 1 and `concurrent`, alternating, each with a fresh signal cache;
    per setting, each try's (wall seconds, each pass's seconds)."""
    results: dict[int, list[tuple[float, list[float]]]] = {1: [], concurrent: []}
    for repeat in range(repeats):
        for setting in results:
            folder = Path(scratch) / f"{setting}-{repeat}"
            job = base.model_copy(deep=True)
            job.teacher_pool.concurrent_passes = setting
            job.storage.signal_cache = str(folder / "cache")
            wall, passes = prepare_student_segment(job, roles, folder / "run")
            results[setting].append((wall, passes))
            log(f"concurrent_passes={setting} try {repeat + 1}: {wall:.1f} s for {len(passes)} passes "
                f"({', '.join(f'{p:.1f}' for p in passes)} s each)")
    return results


def table(results: dict[int, list[tuple[float, list[float]]]]) -> list[str]:
    """`compare`'s tries as a Markdown table (median, min-max), and the ratio of the second setting to one at a time."""
    lines = ["| concurrent_passes | segment preparation s (median, min-max) | sum of the passes' own s (median) |", "|---|---|---|"]
    medians = {}
    for setting, tries in results.items():
        walls = [wall for wall, _ in tries]
        medians[setting] = statistics.median(walls)
        lines.append(f"| {setting} | {medians[setting]:.1f} ({min(walls):.1f}-{max(walls):.1f}) | "
                     f"{statistics.median(sum(passes) for _, passes in tries):.1f} |")
    concurrent = list(results)[-1]
    return lines + ["", f"concurrent / one at a time: {medians[concurrent] / medians[1]:.2f}x the wall time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run of the config (its manifest names the prepared teachers)")
    parser.add_argument("--config", default="configs/tiny_cascade.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=2, help="the concurrent setting compared with 1")
    args = parser.parse_args()

    import ray

    from ckd_ray import load_config
    from ckd_ray.cascade.session import connect_ray, quiet_data_progress

    roles = json.loads((args.run / "manifest.json").read_text())["roles"]
    base = load_config(args.config)
    connect_ray(base.ray, log_to_driver=False)
    quiet_data_progress()
    with tempfile.TemporaryDirectory(prefix="bench-passes-") as scratch:
        results = compare(base, roles, Path(scratch), repeats=args.repeats, concurrent=args.concurrent,
                          log=lambda line: print(line, flush=True))
    ray.shutdown()
    print("\n" + "\n".join(table(results)))


if __name__ == "__main__":
    main()
