"""`python -m benchmarks.pools`: runs the matrix, prints the table and writes its section of
benchmarks/RESULTS.md (see the package docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.pools.matrix import Scale
from benchmarks.pools.report import machine, render_section, utc_now, write_section
from benchmarks.pools.table import RunFigures

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pools", description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark-root", default="data/kvqa", help="output of `ckd-ray data build-kvqa` (built there if missing)")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant (the table shows their median and range)")
    parser.add_argument("--steps", default="tiny-teacher=16,small-teacher=8",
                        help="optimizer steps per run for each teacher (32 samples each)")
    parser.add_argument("--no-gap-settings", action="store_true", help="skip the streamed pool's gap-closing settings")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"), help="Markdown file whose section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--workdir", default=None, help="models, caches and run folders (default: a temporary folder)")
    parser.add_argument("--figures", default=None, help="also write every run's figures to this JSON file")
    parser.add_argument("--render", default=None, metavar="JSON", help="rewrite the section from a --figures file; runs nothing")
    parser.add_argument("--gpu", action="store_true", help="real widths in bf16 on a GPU machine (see benchmarks/pools/gpu.py)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: the plan, and its code path at tiny width on CPU")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.gpu:
        from benchmarks.pools.gpu import run_gpu

        return run_gpu(args)
    if args.dry_run:
        parser.error("--dry-run goes with --gpu")

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        section = render_section([RunFigures(**f) for f in saved["figures"]], Scale(**saved["scale"]), command=saved["command"],
                                 wall_s=saved["wall_s"], measured_at=saved["measured_at"], machine_text=saved["machine"])
        return _finish(args, section)

    import ray

    from ckd_ray.cascade.session import connect_ray, quiet_data_progress
    from ckd_ray.config.job import RayConfig

    root = Path(args.benchmark_root).resolve()
    if not (root / "summary.json").exists():
        from ckd_ray.data.kvqa import build_kvqa

        build_kvqa(root)
    steps = {name: int(count) for name, count in (item.split("=") for item in args.steps.split(","))}
    scale = Scale(steps=steps, runs=args.runs, gap_settings=not args.no_gap_settings)
    started = time.perf_counter()
    connect_ray(RayConfig(num_cpus=8), log_to_driver=False)  # as `ckd-ray cascade` starts its local Ray
    quiet_data_progress()
    figures = run_cpu_matrix(root, scale, workdir=args.workdir, log=lambda line: print(line, flush=True))
    ray.shutdown()
    command = ("python -m benchmarks.pools " + " ".join(sys.argv[1:])).strip()
    wall_s, measured_at, machine_text = time.perf_counter() - started, utc_now(), machine("no GPU")
    if args.figures:
        Path(args.figures).write_text(json.dumps({"command": command, "wall_s": wall_s, "measured_at": measured_at,
                                                  "machine": machine_text, "scale": dataclasses.asdict(scale),
                                                  "figures": [dataclasses.asdict(f) for f in figures]}, indent=1))
    section = render_section(figures, scale, command=command, wall_s=wall_s, measured_at=measured_at, machine_text=machine_text)
    return _finish(args, section)


def run_cpu_matrix(root: Path, scale: Scale, *, workdir: str | None = None, log=print) -> list[RunFigures]:
    """Every variant of the CPU matrix on the Ray this process is connected to, in a temporary
    folder under `workdir` (model folders, caches, runs): the figures of the measured runs."""
    from benchmarks.pools.matrix import PoolBenchmark, run_matrix

    with tempfile.TemporaryDirectory(dir=workdir, prefix="ckd-pools-") as work:
        bench = PoolBenchmark(Path(work), root, scale, log=log)
        try:
            bench.build_models()
            return run_matrix(bench)
        finally:
            bench.actors.stop()


def _finish(args, section: str) -> int:
    print("\n" + section)
    if not args.no_write:
        write_section(Path(args.results), section)
        print(f"\n[pools] wrote the section to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
