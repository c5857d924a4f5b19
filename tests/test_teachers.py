"""Teacher pools: the signal equals a direct forward, a killed actor is replaced without losing or
duplicating a sample, and the signal cache is hit (no actor started) or missed by its key."""

from __future__ import annotations

import os
import signal as signals
import time

import numpy as np
import pytest
import torch

from ckd_ray.data.config import DataConfig
from ckd_ray.data.pipeline import build_student_dataset
from ckd_ray.data.processor import Processor
from ckd_ray.models import build_preset, load_model, save_model
from ckd_ray.teachers import SignalSpec, TeacherPoolConfig, TeacherSource, add_teacher_stage, bytes_per_sample
from ckd_ray.teachers.forward import TeacherForward
from ckd_ray.teachers.signal import from_wire, topk_with_tail

pytestmark = pytest.mark.ray

SPEC = SignalSpec(response_top_k=8, visual_top_k=4, gram=True, attention_layers=[2, 5], attention_head_groups=2,
                  feature_layers=[3], facts=True, value_dtype="float32")


@pytest.fixture(scope="module")
def teacher_dir(kvqa_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    save_model(build_preset("tiny-teacher", seed=11), out, kvqa_dir / "processor")
    return out


def _dataset(kvqa_dir, tmp_path, limit: int, split: str = "val"):
    data = DataConfig(benchmark_root=str(kvqa_dir))
    sources = [s.model_copy(update={"split": split}) for s in data.instruction_sources()]
    processor = Processor.load(kvqa_dir / "processor", 16)
    return build_student_dataset(sources, processor, data, rejects_uri=str(tmp_path / "rejects.jsonl"), limit=limit).dataset


def _reference(model, row: dict) -> dict:
    """A direct, in-process teacher forward of one sample, trimmed to its own length."""
    used = int(row["attention_mask"].sum())
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(row["input_ids"][None, :used], dtype=torch.long),
            pixel_values=torch.as_tensor(row["pixel_values"][None]),
            output_attentions=True,
            output_hidden_states=True,
        )
    logits_LV = out.logits[0].float()
    visual_L = torch.as_tensor(row["visual_mask"][:used])
    z_NV = logits_LV[visual_L]
    return {"logits": logits_LV, "gram": z_NV @ z_NV.T, "attentions": out.attentions, "hidden": out.hidden_states, "used": used}


def test_pool_signal_equals_direct_forward(ray_local, kvqa_dir, teacher_dir, tmp_path):
    source = TeacherSource(str(teacher_dir), shared_vocab_size=512, labels={"job": "test", "pool": "teacher"})
    pool = TeacherPoolConfig(min_actors=1, max_actors=1, batch_size=8)
    rows = add_teacher_stage(_dataset(kvqa_dir, tmp_path, 12), source, SPEC, pool).take_all()
    assert len(rows) == 12
    model = load_model(str(teacher_dir), attn_implementation="eager").eval()
    for row in rows[:4]:
        ref = _reference(model, row)
        used = ref["used"]
        response = torch.as_tensor(row["response_mask"][:used])
        values, ids, tail = topk_with_tail(ref["logits"][response], 8)
        shipped_ids = torch.as_tensor(row["sig_resp_topk_ids"][:used])[response]
        assert torch.equal(shipped_ids.long(), ids)  # same tokens, same order
        shipped_values = from_wire(row["sig_resp_topk_values"], "float32")[:used][response]
        # Exact up to float32 summation order: the pool's batch is padded differently.
        torch.testing.assert_close(shipped_values, values, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.as_tensor(row["sig_resp_tail_logmass"][:used])[response], tail, rtol=0, atol=1e-4)
        gram = from_wire(row["sig_gram"], "float32")
        assert torch.allclose(gram, ref["gram"], rtol=1e-3, atol=1e-3 * ref["gram"].abs().max())
        visual = torch.as_tensor(row["visual_mask"][:used])
        for layer in SPEC.attention_layers:
            heads = ref["attentions"][layer][0][:, :, visual]  # [H, L, N] visual key columns
            grouped = heads.reshape(2, heads.shape[0] // 2, *heads.shape[1:]).mean(dim=1)
            shipped = from_wire(row[f"sig_attn_{layer}"], "float32")[:, :used]
            torch.testing.assert_close(shipped, grouped, rtol=0, atol=1e-3)
        torch.testing.assert_close(from_wire(row["sig_hidden_3"], "float32")[:used], ref["hidden"][3][0], rtol=0, atol=1e-3)
        assert np.isclose(np.exp(row["sig_fact_logprobs"][row["fact_mask"]]).sum(), 1.0, atol=1e-4) or not row["fact_mask"].any()


def test_bf16_wire_matches_float32_signal_to_bf16_precision(kvqa_dir, teacher_dir, tmp_path):
    model = load_model(str(teacher_dir), attn_implementation="eager")
    rows = _dataset(kvqa_dir, tmp_path, 4).take_batch(4, batch_format="numpy")
    exact = TeacherForward(model, SPEC, 512)(rows)
    wire = TeacherForward(model, SPEC.model_copy(update={"value_dtype": "bfloat16"}), 512)(rows)
    assert wire["sig_resp_topk_values"].dtype == np.uint16
    assert np.array_equal(wire["sig_resp_topk_ids"], exact["sig_resp_topk_ids"])
    shipped = from_wire(wire["sig_gram"], "bfloat16").float()
    torch.testing.assert_close(shipped, torch.as_tensor(exact["sig_gram"]), rtol=1e-2, atol=1e-2)


def _teacher_actor_pids() -> list[int]:
    """PIDs of this cluster's live teacher actors: workers under our raylet whose process title
    names the TeacherActor class (other Ray clusters on the machine are not ours to kill)."""
    import psutil
    import ray

    raylet_pid = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in psutil.Process(raylet_pid).children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "TeacherActor" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:  # exited (or became a zombie) while we looked
            continue
    return pids


def test_killed_teacher_actor_is_replaced_and_no_sample_is_lost_or_repeated(ray_local, kvqa_dir, teacher_dir, tmp_path):
    source = TeacherSource(str(teacher_dir), shared_vocab_size=512)
    spec = SignalSpec(response_top_k=8, visual_top_k=0, gram=False)
    pool = TeacherPoolConfig(min_actors=1, max_actors=1, batch_size=2)
    dataset = _dataset(kvqa_dir, tmp_path, 240, split="train")
    expected = sorted(dataset.to_pandas()["sample_id"])
    killed = []
    seen: list[str] = []
    for batch in add_teacher_stage(dataset, source, spec, pool).iter_batches(batch_size=2, batch_format="numpy"):
        seen += list(batch["sample_id"])
        if not killed and len(seen) >= 6:
            pids = _teacher_actor_pids()
            assert pids, "no live teacher actor mid-pass"
            os.kill(pids[0], signals.SIGKILL)  # a real crash: the process dies with its batch
            killed.append(pids[0])
    assert killed
    assert sorted(seen) == expected  # every sample exactly once
    assert len(set(seen)) == len(seen)


def test_signal_cache_hit_starts_no_teacher_and_changed_spec_misses(ray_local, kvqa_dir, tmp_path):
    from ckd_ray.cascade.datasets import StepData
    from ckd_ray.cascade.plan import build_plan
    from ckd_ray.cascade.signal import attach_teacher_signal
    from ckd_ray.cascade.session import initial_checkpoints
    from ckd_ray.cascade.manifest import Manifest
    from ckd_ray.config import validate_config

    def job_with(top_k: int):
        return validate_config({
            "name": "cache-test",
            "models": {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"}},
            "data": {"benchmark_root": str(kvqa_dir)},
            "cascade": {"prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DFT"]}]},
            "signal": {"response_top_k": top_k, "visual_top_k": 4},
            "trainer": {"max_steps": 2, "micro_batch_size": 4, "num_workers": 1},
            "storage": {"root": str(tmp_path)},
        })

    job = job_with(8)
    manifest = Manifest.open(job.run_uri, job)
    data = StepData(job, job.run_uri)
    initial_checkpoints(job, manifest, data.processor_uri, job.run_uri, log=lambda _: None)
    (planned,) = build_plan(job)

    def attach(j):
        d = StepData(j, j.run_uri)
        dataset, spec, info = attach_teacher_signal(j, planned, manifest.roles["teacher"], manifest.roles["student"], d.train(planned)[0], d, log=print)
        return dataset, spec, info

    _, _, first = attach(job)
    assert first["source"] == "teacher pool" and first["samples"] == 8
    before = set(_teacher_actor_pids())  # the first pass's actors may still be shutting down
    dataset, spec, second = attach(job)
    rows = dataset.take_all()
    assert second == {"source": "cache hit", "key": first["key"]}
    assert len(rows) == 8 and "sig_resp_topk_ids" in rows[0] and "sig_gram" in rows[0]
    assert not set(_teacher_actor_pids()) - before  # the hit started no teacher actor
    _, _, third = attach(job_with(4))  # another top-k: another key, a miss
    assert third["source"] == "teacher pool" and third["key"] != first["key"]


def test_bytes_per_sample_at_paper_scale():
    spec = SignalSpec(response_top_k=64, visual_top_k=64, gram=True)
    parts = bytes_per_sample(spec, seq_len=2048, num_visual=729, teacher_hidden=2048)
    full = 2048 * 151936 * 4
    assert parts["response_topk"] == 2048 * 64 * (2 + 4) + 2048 * 4
    assert parts["gram"] == 729 * 729 * 2
    assert parts["total"] == 2 * (2048 * 64 * 6 + 2048 * 4) + 729 * 729 * 2 == 2_652_130
    assert full / parts["total"] > 450  # 1.24 GB of fp32 logits vs 2.65 MB of signal


@pytest.mark.ray
def test_a_pass_running_beside_training_is_waited_for_and_its_failure_reaches_the_waiter(ray_local, tmp_path, monkeypatch):
    """Deferred passes (the cascade runs them while its one worker group trains): a pass whose
    teacher the group trains first starts only once that teacher's export is complete; the
    reader made before any entry exists lists its files once the pass's ticket names them; a
    waiter of a pass that fails gets the pass's error instead of waiting forever; a pass whose
    teacher never comes ends when the group stops."""

    import ray.data

    from ckd_ray.cascade.signal import DeferredPass, export_ready
    from ckd_ray.cascade.steps import TeacherPasses
    from ckd_ray.teachers.cache import SignalCache, TeacherPassFailed
    from ckd_ray.train.plan import STEP_SUMMARY_FILE

    # Order is compared as training sees it: Ray Train's ingest preserves block order.
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    cache = SignalCache(str(tmp_path / "cache"))
    good, bad = str(tmp_path / "good.json"), str(tmp_path / "bad.json")
    reader = cache.read_when_ready(good)  # before the entry, or even its key, exists
    rows = ray.data.from_items([{"sample_id": f"s{i}", "x": i} for i in range(6)])
    export = tmp_path / "ta-export"
    ran = []

    def write_good() -> str:
        ran.append("good")
        cache.write(rows, "good", {})
        return "good"

    def fail(batch):
        raise ValueError("the teacher ran out of memory")

    gate = export_ready(str(export))
    passes = TeacherPasses([DeferredPass(lambda: cache.run_ticketed(good, write_good), "s1", gate),
                            DeferredPass(lambda: cache.run_ticketed(bad, lambda: cache.write(rows.map_batches(fail), "bad", {})["key"]), "s2")],
                           2, poll_s=0.05)
    with pytest.raises(TeacherPassFailed, match="the teacher pass of .*bad.json failed: .*UserCodeException"):
        cache.wait_for_ticket(bad)  # the ungated pass ran, while the gated one still waits for its teacher
    time.sleep(0.3)
    assert ran == [] and not (tmp_path / "good.json").exists()
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights first")
    time.sleep(0.3)
    assert ran == []  # an export without its summary is still being written
    (export / STEP_SUMMARY_FILE).write_text("{}")
    assert cache.wait_for_ticket(good) == "good" and ran == ["good"]
    assert reader.take_all() == cache.read("good").take_all()  # the rows, in the order a read made afterwards gives
    assert sorted(row["x"] for row in reader.take_all()) == list(range(6))
    with pytest.raises(Exception, match="the teacher ran out of memory"):
        passes.join()  # the driver gets the pass's own error, with its traceback
    cache.clear_failure("bad")  # a new run forgets it before it waits again
    assert cache.lookup("bad") is None and not (tmp_path / "cache" / "bad" / "_FAILED.json").exists()

    never = TeacherPasses([DeferredPass(lambda: ran.append("never"), "s3", export_ready(str(tmp_path / "no-export")))], 1, poll_s=0.05)
    never.stop()  # the group failed: its export will not come
    never.join()
    assert ran == ["good"]