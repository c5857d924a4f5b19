"""The run report's compute share, both ways (over the steps' wall time, and over the command's
from Ray start to the report), and the training done beside a running teacher pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ckd_ray.cascade.runner import training_beside_passes
from ckd_ray.report import write_report
from ckd_ray.report.markdown import command_share, compute_share

STEPS = {
    "00-a": {"status": "done", "seconds": 40.0, "phases": {"worker_start": 10.0, "training": 20.0, "other": 10.0},
             "training_beside_pass_s": 5.0},
    "01-b": {"status": "done", "seconds": 60.0, "phases": {"training": 50.0, "validation": 10.0}, "training_beside_pass_s": 0.0},
}


def test_the_share_over_the_command_counts_what_the_steps_leave_out():
    assert compute_share(STEPS) == pytest.approx(70 / 100)
    assert command_share(STEPS, {"seconds": 140.0, "steps": ["00-a", "01-b"]}) == pytest.approx(70 / 140)
    assert command_share(STEPS, {"seconds": 50.0, "steps": ["01-b"]}) == pytest.approx(1.0)  # a resumed run trained only 01-b
    assert command_share(STEPS, None) is None and command_share(STEPS, {"seconds": 9.0, "steps": []}) is None


def test_the_report_gives_both_shares_the_commands_first_and_the_training_beside_passes(tmp_path):
    manifest = SimpleNamespace(job="j", config_hash="h", steps=STEPS, evaluations={}, baselines={})
    report = write_report(str(tmp_path), manifest, {}, command={"seconds": 140.0, "steps": ["00-a", "01-b"]})
    text = (tmp_path / "report.md").read_text()
    assert report.endswith("report.md")
    assert ("compute share: **50% of this command's wall time** (its optimizer steps 70 s of 140 s from Ray start to this "
            "report); 70% of the steps' wall time (70 s of 100 s;") in text
    assert "training beside a running teacher pass: 5 s of the 70 s in optimizer steps" in text
    write_report(str(tmp_path), manifest, {})  # without the command's time (an older caller): the steps' share alone
    assert "compute share: 70% of the steps' wall time" in (tmp_path / "report.md").read_text()


def test_training_beside_passes_prorates_by_the_union_of_the_passes_spans():
    def done(start, end):
        return SimpleNamespace(started_at=start, ended_at=end)

    # The step ran on the group from t=100 to t=200 and trained 50 s of it.
    passes = [done(90, 120), done(110, 130), done(150, None), SimpleNamespace(started_at=None, ended_at=None), done(250, 260)]
    # Covered: 100-130 (two overlapping passes, counted once) and 150-200 (still running): 80 of 100 s.
    assert training_beside_passes(passes, 100.0, 200.0, 50.0) == pytest.approx(40.0)
    assert training_beside_passes([], 100.0, 200.0, 50.0) == 0.0
    assert training_beside_passes(passes, None, 200.0, 50.0) == 0.0  # a step recorded after a restart: start unknown
