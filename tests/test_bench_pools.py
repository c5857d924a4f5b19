"""The teacher-pool benchmark's parts that can be wrong without failing loudly: the rate and
ratio arithmetic of its table, the co-resident baseline making the same signal as the pool, and
the whole matrix at its smallest size (every variant through the real worker groups, pools and
cache, then its RESULTS section), so the command cannot rot between its runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.pools.table import RunFigures, group_rows, markdown_table, ratios


def run(variant: str, *, train_s: float, pass_s: float = 0.0, mib: int = 700, note: str = "", wait: float = 0.0) -> RunFigures:
    return RunFigures(variant=variant, teacher="t", note=note, samples=320, first_batch_s=1.0, train_s=train_s,
                      data_wait_s=wait, pass_s=pass_s, peak_private_bytes=mib * 2**20, actors_max=0 if variant == "a" else 1,
                      signal_bytes_per_sample=100.0)


def test_rates_medians_and_ratios():
    runs = [run("a", train_s=8.0, mib=800), run("a", train_s=4.0, mib=810), run("a", train_s=16.0, mib=805),
            run("b", train_s=4.0, wait=1.0), run("c", train_s=2.0, pass_s=8.0), run("d", train_s=2.0),
            run("a", train_s=8.0, mib=1000, note="cascade")]
    rows = group_rows(runs)
    assert [(r.variant, r.note, len(r.runs)) for r in rows] == [("a", "", 3), ("b", "", 1), ("c", "", 1), ("d", "", 1), ("a", "cascade", 1)]
    a = rows[0]
    assert a.rate == 40.0 and a.rate_range == (20.0, 80.0)  # 320 samples over 8 s after the first batch: the median run
    assert a.whole_run_rate == 320 / 9.0  # the first batch's wait counted
    assert a.peak_private_bytes == 800 * 2**20  # the lowest run's peak
    assert runs[4].samples_per_s == 320 / (8.0 + 2.0)  # the pass, then training
    assert runs[4].whole_run_samples_per_s == 320 / (8.0 + 1.0 + 2.0)
    assert runs[3].wait_share == 0.25
    values = ratios(rows, "t", "cascade")
    assert values["(b)/(a) samples/s"] == pytest.approx(80 / 40)
    assert values["(b)/(a) samples/s, whole runs"] == pytest.approx((320 / 5) / (320 / 9))
    assert values["(b)/(d) samples/s"] == pytest.approx(80 / 160)
    assert values["(c)/(a) samples/s"] == pytest.approx(32 / 40)
    assert values["(b)/(a) student worker peak memory"] == pytest.approx(700 / 800)
    assert values["(b)/(a, TA + teacher co-resident) student worker peak memory"] == pytest.approx(0.7)
    table = markdown_table(rows)
    assert "| a | t | 3 | 320 | 40.0 (20.0-80.0) |" in table and "| a, cascade |" in table


@pytest.mark.ray
def test_coresident_teacher_makes_the_pools_signal(ray_local, kvqa_dir, tmp_path):
    from ckd_ray.data.config import DataConfig
    from ckd_ray.data.pipeline import build_student_dataset
    from ckd_ray.data.processor import Processor
    from ckd_ray.models import build_preset, save_model
    from ckd_ray.teachers import SignalSpec, TeacherPoolConfig, TeacherSource, add_teacher_stage, decode_signal
    from ckd_ray.teachers.signal import signal_nbytes

    from benchmarks.pools.worker import CoResidentTeacher, SignalMeter

    teacher_dir = save_model(build_preset("tiny-ta", seed=3), tmp_path / "teacher", kvqa_dir / "processor")
    spec = SignalSpec(response_top_k=8, visual_top_k=4, gram=True, value_dtype="float32")
    data = DataConfig(benchmark_root=str(kvqa_dir))
    sources = [s.model_copy(update={"split": "val"}) for s in data.instruction_sources()]
    rows = build_student_dataset(sources, Processor.load(kvqa_dir / "processor", 16), data,
                                 rejects_uri=str(tmp_path / "rejects.jsonl"), limit=8).dataset
    source = TeacherSource(str(teacher_dir), shared_vocab_size=512)
    pooled = add_teacher_stage(rows, source, spec, TeacherPoolConfig(batch_size=8)).take_batch(8, batch_format="numpy")

    inputs = {name: values for name, values in pooled.items() if not name.startswith("sig_")}
    teacher = CoResidentTeacher(source, spec)
    teacher.load("cpu")
    meter = SignalMeter(lambda batch, device: decode_signal(batch, spec, {}, device=device), attach=teacher)
    decoded = meter(inputs, torch.device("cpu"))
    made = teacher(inputs)
    signal_names = sorted(name for name in pooled if name.startswith("sig_"))
    assert signal_names == sorted(name for name in made if name.startswith("sig_"))
    for name in signal_names:
        if name.endswith("_ids"):
            assert np.array_equal(made[name], pooled[name]), name
        else:  # another process, another thread count: float32 summation order only
            np.testing.assert_allclose(made[name], pooled[name], rtol=0, atol=1e-4, err_msg=name)
    assert meter.samples == 8 and meter.signal_bytes == signal_nbytes(pooled)
    assert decoded.response_topk is not None and decoded.gram_BNN is not None


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.stage2
def test_the_matrix_runs_every_variant_end_to_end_at_its_smallest_size(ray_local, kvqa_dir, tmp_path):
    """`python -m benchmarks.pools` on the session's Ray at its smallest size: one teacher, one
    optimizer step of one 2-sample micro-batch per run, one run per variant, one worker. Checks
    the shape of what it measures and renders, not its figures."""
    from benchmarks.pools.__main__ import run_cpu_matrix
    from benchmarks.pools.matrix import CASCADE_NOTE, Scale
    from benchmarks.pools.report import markers, render_section, write_section

    scale = Scale(steps={"tiny-teacher": 1}, runs=1, gap_settings=False, micro_batch_size=2, num_workers=1)
    figures = run_cpu_matrix(kvqa_dir, scale, workdir=str(tmp_path))
    assert sorted((f.variant, f.note) for f in figures) == [("a", ""), ("a", CASCADE_NOTE), ("b", ""), ("c", ""), ("d", "")]
    for f in figures:
        assert f.teacher == "tiny-teacher" and f.samples == 2, f
        assert f.train_s > 0 and f.peak_private_bytes > 0 and f.signal_bytes_per_sample > 0, f
        assert (f.pass_s > 0) == (f.variant == "c"), f
        assert f.actors_max >= (1 if f.variant in "bc" else 0), f  # a streamed or cached run had a teacher actor alive
    section = render_section(figures, scale, command="python -m benchmarks.pools --smoke", wall_s=1.0,
                             measured_at="today", machine_text="test")
    for row in ("| a | tiny-teacher | 1 | 2 |", "| b | tiny-teacher | 1 | 2 |", "| c | tiny-teacher | 1 | 2 |",
                "| d | tiny-teacher | 1 | 2 |", "student step (compute)", "teacher forward inside the step"):
        assert row in section, (row, section)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    write_section(results, section)
    write_section(results, section)  # rewritten in place, not appended twice
    assert results.read_text().count(markers("cpu")[0]) == 1


def test_the_gpu_matrix_refuses_without_cuda_and_plans_real_widths():
    """`python -m benchmarks.pools --gpu` on a machine without CUDA (as CI's): exit code 2 and why,
    before anything starts; and the plan it would run, at real widths on one GPU."""
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.pools.gpu import GPU_STEPS, gpu_scale

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.pools", "--gpu"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device is visible" in done.stderr, done.stderr[-2000:]
    scale = gpu_scale(rehearsal=False, runs=3)
    assert scale.steps == {"teacher-1.5b": GPU_STEPS} and scale.trainer["use_gpu"] and scale.trainer["resources"] == {"GPU": 0.5}
    assert scale.teacher_pool["num_gpus"] == 0.5 and scale.model_dtype == "bfloat16"
