"""Where a cascade's wall clock goes: the phases of every step of a run, side by side, and the
compute share (time in optimizer steps over the steps' wall time; the run report's lines follow,
with the share over the command's wall time from Ray start to the report, the headline, and the
training done beside a running teacher pass).

    python benchmarks/bench_step_phases.py                    # runs the quickstart cascade, then prints
    python benchmarks/bench_step_phases.py --run runs/NAME    # prints an existing run's breakdown

The first form runs `ckd-ray cascade configs/tiny_cascade.yaml` under a fresh name (same budgets
as the quickstart) and reports its total time too. Phases come from the run's manifest: the
driver's data planning and teacher passes, the worker group's start (once per group), and on
rank 0 engine init, first-batch wait, training, later data waits, reports, checkpoints,
validation and export.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ckd_ray.report.markdown import compute_share  # noqa: E402
from ckd_ray.report.plots import PHASE_ORDER  # noqa: E402


def breakdown(manifest: dict) -> str:
    steps = manifest["steps"]
    phases = [p for p in PHASE_ORDER if any(e.get("phases", {}).get(p) for e in steps.values())]
    lines = ["| step | " + " | ".join(phases) + " | total s | compute share |", "|---" * (len(phases) + 3) + "|"]
    totals = dict.fromkeys(phases, 0.0)
    for step_id, entry in steps.items():
        values = entry.get("phases", {})
        for p in phases:
            totals[p] += values.get(p, 0.0)
        share = values.get("training", 0.0) / entry["seconds"] if entry.get("seconds") else 0.0
        lines.append(f"| {step_id} | " + " | ".join(f"{values.get(p, 0.0):.1f}" for p in phases)
                     + f" | {entry.get('seconds', 0):.1f} | {100 * share:.0f}% |")
    wall = sum(e.get("seconds", 0.0) for e in steps.values())
    lines.append("| **all steps** | " + " | ".join(f"**{totals[p]:.1f}**" for p in phases)
                 + f" | **{wall:.1f}** | **{100 * (compute_share(steps) or 0):.0f}%** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="an existing run folder (holding manifest.json)")
    parser.add_argument("--config", default="configs/tiny_cascade.yaml")
    args = parser.parse_args()
    run = args.run
    if run is None:
        name = f"bench-phases-{time.strftime('%Y%m%d-%H%M%S')}"
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "ckd-ray"), "cascade", args.config, "--set", f"name={name}"],
                       cwd=REPO, check=True)
        print(f"\ncascade wall time (ckd-ray cascade, Ray start to report): {time.perf_counter() - started:.0f} s")
        run = REPO / "runs" / name
    manifest = json.loads((run / "manifest.json").read_text())
    print(f"\nrun: {run}\n")
    print(breakdown(manifest))
    report = run / "report.md"
    if report.exists():  # the shares as the run's command measured them (Ray start to report)
        print("\n" + "\n".join(line for line in report.read_text().splitlines()
                                if line.startswith(("compute share:", "training beside a running teacher pass:"))))


if __name__ == "__main__":
    main()
