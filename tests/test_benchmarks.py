"""Every benchmark under benchmarks/ at its smallest size: its real code path end to end, and the
shape of what it prints, never its figures (those are taken on a quiet machine, by the command
RESULTS.md names). A benchmark whose code rots fails here, not on the day someone re-measures.

Where each one is run: `bench_composed_budget.py` in tests/test_models_pretrain.py, the teacher
pools (`python -m benchmarks.pools`) in tests/test_bench_pools.py, the rest here, except
`bench_teacher_signal.py`, which reads a finished quickstart run (`--run`) and has no size small
enough for the default run. The ones that
start a Ray of their own in `main()` are run through the function `main()` calls after it has
connected, on the session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_kl_chunked_prints_a_row_per_variant():
    done = _run("benchmarks/bench_kl_chunked.py", "--seq", "16", "--vocab", "128", "--chunk-size", "8", "--topk", "4", "--repeats", "1")
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == ["| variant", "| naive", "| chunked", "| chunked-topk"]
    losses = [float(row.rstrip(" |").rsplit("| ", 1)[1]) for row in rows[1:]]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # the chunked loss is the naive one


@pytest.mark.ray
def test_data_pipeline_compares_plain_and_ray_passes(ray_local, kvqa_dir, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_data_pipeline
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    passes = bench_data_pipeline.compare(str(kvqa_dir), str(tmp_path), split="val", rounds=1, records_per_read_task=512,
                                         preprocess_batch_size=128, batch_size=128)
    assert {name: len(runs) for name, runs in passes.items()} == {"cold": 1, "plain": 1, "ray": 1}
    counts = {runs[0][0] for runs in passes.values()}
    assert len(counts) == 1 and counts.pop() > 1000  # every pass delivers the whole split
    lines = bench_data_pipeline.table(passes)
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| plain loop (1 process)", "| Ray Data, warm workers", "| Ray Data, first pass (starts workers)"]
    assert lines[2].endswith("| 1.00x |")


@pytest.mark.ray
@pytest.mark.stage2
def test_tune_cache_runs_both_variants(ray_local, kvqa_dir, tmp_path):
    from benchmarks.bench_tune_cache import VARIANTS, run_variant, table

    rows = [run_variant(str(kvqa_dir), str(tmp_path), variant, trials=1, steps=1) for variant in VARIANTS]
    assert [(r["variant"], r["trials"], r["finished"], r["teacher_passes"], r["cache_hits"]) for r in rows] == [
        ("teacher-per-trial", 1, 1, 1, 0), ("cache", 1, 1, 1, 1)]
    lines = table(rows, trials=1, steps=1)
    assert any(line.startswith("| teacher-per-trial | 1 (1) | 1 | 0 |") and line.endswith("| 1.00 |") for line in lines)
    assert any(line.startswith("| cache | 1 (1) | 1 | 1 |") for line in lines)


@pytest.mark.ray
@pytest.mark.stage2
def test_teacher_passes_prepare_the_student_segment_both_ways(ray_local, kvqa_dir, tmp_path):
    from benchmarks.bench_teacher_passes import compare, table
    from ckd_ray import load_config
    from ckd_ray.models import build_preset, save_model

    roles = {role: str(save_model(build_preset(f"tiny-{role}", seed=seed), tmp_path / role, kvqa_dir / "processor"))
             for seed, role in enumerate(("student", "ta", "teacher"))}
    base = load_config([str(REPO / "configs" / "tiny_cascade.yaml")],
                       [f"data.benchmark_root={kvqa_dir}", "cascade.plan=single_teacher", "trainer.max_steps=1", "trainer.micro_batch_size=2",
                        f"storage.root={tmp_path / 'runs'}", *(f"models.{role}.path={path}" for role, path in roles.items())])
    results = compare(base, roles, tmp_path / "tries", repeats=1, concurrent=2, log=lambda line: None)
    assert list(results) == [1, 2]
    for tries in results.values():
        (wall, passes), = tries
        assert len(passes) == 2 and wall > 0  # T -> S (the smallest plan with a segment to prepare): DPT and DFT
    lines = table(results)
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| 1", "| 2"]
    assert lines[-1].startswith("concurrent / one at a time: ")


def test_gpu_smoke_refuses_without_cuda_and_its_dry_run_gives_the_real_shapes():
    done = subprocess.run(["bash", "benchmarks/gpu_smoke.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "no CUDA device is visible" in done.stderr
    figures = json.loads(_run("benchmarks/gpu_smoke.py", "--dry-run").stdout)
    assert figures["parameters"] == {"student_llm": 494_032_768, "teacher_llm": 1_543_714_304, "vision_tower": 93_155_328}
    assert figures["visual_tokens_per_image"] == 729


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.stage2
def test_gpu_smoke_rehearsal_and_step_phases_on_its_run(ray_local, kvqa_dir, tmp_path):
    """`gpu_smoke.py --rehearse-on-cpu` (the GPU smoke's whole path at tiny shapes, on the session's
    Ray), then `bench_step_phases.py --run` on the run it made."""
    from benchmarks.gpu_smoke import run

    (tmp_path / "kvqa").symlink_to(kvqa_dir)  # the parts' benchmark, built once per session
    figures = run(SimpleNamespace(rehearse_on_cpu=True, work=str(tmp_path), peak_tflops=None))
    assert figures["device"] == "cpu" and figures["optimizer_steps"] == 2 and figures["student_tokens_per_s"] > 0
    assert figures["teacher_pass_samples"] > 0 and set(figures["phases_s"]) >= {"training", "teacher_pass"}
    run_folder = next((tmp_path / "runs").glob("gpu-smoke-*"))
    done = _run("benchmarks/bench_step_phases.py", "--run", str(run_folder))
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| step |") and rows[0].endswith("| total s | compute share |")
    assert len(rows) == 3 and rows[1].startswith("| 00-s1-teacher_to_student-DFT |") and rows[2].startswith("| **all steps** |")
    assert "compute share: **" in done.stdout and "% of this command's wall time** " in done.stdout  # from its report
    assert "training beside a running teacher pass: " in done.stdout


def test_length_buckets_times_both_settings_on_the_same_batches(kvqa_dir, tmp_path):
    from ckd_ray.models import build_preset, save_model

    for role in ("student", "ta", "teacher"):
        save_model(build_preset(f"tiny-{role}", seed=0), tmp_path / role, kvqa_dir / "processor")
    done = _run("benchmarks/bench_length_buckets.py", "--benchmark-root", str(kvqa_dir), "--models", str(tmp_path), "--batches", "3")
    table = done.stdout.split("\n\n")[-1].splitlines()
    rows = [line.split(" | ")[:2] for line in table[2:]]
    assert rows == [[f"| {run}", kind] for run in ("training step: student", "training step: ta", "training step: teacher",
                                                    "teacher pass: teacher") for kind in ("instructions", "captions")]
    padding = [float(line.rstrip(" |").split(" | ")[-2].rstrip("%")) for line in table[2:]]
    assert all(0 <= share < 100 for share in padding)
