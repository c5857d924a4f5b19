"""The trainer's pieces without Ray: schedule, step planning, batch trimming, data position, and a
checkpoint round trip through DeepSpeed in one process (world size 1) for each ZeRO stage."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from ckd_ray.config.cascade import StageConfig, StepConfig
from ckd_ray.config.loader import validate_config
from ckd_ray.train.batch import student_batch
from ckd_ray.train.checkpoint import TrainState, read_state
from ckd_ray.train.engine import lr_factor, warmup_steps_for
from ckd_ray.train.loop import next_position
from ckd_ray.cascade.steps import plan_step


def make_job(**trainer):
    return validate_config({
        "data": {"benchmark_root": "benchmark"},
        "models": {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}},
        "trainer": trainer,
    })


def test_warmup_then_cosine_decay():
    total, warmup = 100, warmup_steps_for(100, 0.03)
    factors = [lr_factor(step, warmup_steps=warmup, total_steps=total) for step in range(total + 1)]
    assert warmup == 3
    assert factors[:4] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert factors[3 + 47] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 97)))
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))  # monotone decay after warm-up


@pytest.mark.parametrize(
    ("kind", "policy", "lr", "terms"),
    [
        ("PT", "connector", 1e-3, ["task"]),
        ("FT", "connector+llm", 2e-5, ["task"]),
        ("DPT", "connector", 1e-3, ["task", "output", "visual_kl", "visual_relation"]),
        ("SFT", "connector+llm", 2e-5, ["task"]),
        ("DFT", "connector+llm", 2e-5, ["task", "output", "visual_kl", "visual_relation"]),
    ],
)
def test_plan_follows_seed_001_per_step_type(kind, policy, lr, terms):
    job = make_job(num_workers=2, micro_batch_size=4, grad_accum=2, epochs=1.0)
    stage = StageConfig(teacher="ta", steps=[kind])
    plan = plan_step(job, stage, StepConfig(kind=kind), init_model_uri="init", export_uri="out", num_train_samples=101)
    # 101 samples -> 50 per worker (equal shards drop one) -> 13 micro-batches -> 6 optimizer steps
    assert (plan.batches_per_epoch, plan.total_steps) == (13, 6)
    assert plan.freeze_policy == policy
    assert plan.optimizer.lr == lr
    assert plan.optimizer.warmup_steps == 1  # ceil(6 * 0.03)
    assert plan.loss.weights.active() == terms
    assert not plan.bf16  # precision auto on CPU


def test_plan_overrides_and_step_budget():
    job = make_job(num_workers=2, micro_batch_size=4, max_steps=5, lr={"DFT": 1e-4}, epochs=3.0)
    stage = StageConfig(teacher="ta", steps=["DFT"], loss={"weights": {"task": 1.0, "output": 0.5}, "temperature": 2.0})
    plan = plan_step(job, stage, StepConfig(kind="DFT"), init_model_uri="init", export_uri="out", num_train_samples=1000)
    assert plan.total_steps == 5 and plan.optimizer.lr == 1e-4
    assert plan.loss.weights.active() == ["task", "output"] and plan.loss.temperature == 2.0
    step = StepConfig(kind="DFT", lr=3e-3, max_steps=2)
    plan = plan_step(job, stage, step, init_model_uri="init", export_uri="out", num_train_samples=1000)
    assert (plan.total_steps, plan.optimizer.lr) == (2, 3e-3)
    assert plan.freeze_policy == "connector+llm"  # DFT's own policy
    plan = plan_step(job, StageConfig(steps=["PT"]), StepConfig(kind="PT", lr=1e-3, freeze="connector+llm"),
                     init_model_uri="init", export_uri="out", num_train_samples=1000)
    assert plan.freeze_policy == "connector+llm"  # PT trains the connector alone unless told
    with pytest.raises(ValueError, match="freeze"):
        StepConfig(kind="PT", freeze="vision")
    with pytest.raises(ValueError, match="no optimizer step"):
        plan_step(job, stage, StepConfig(kind="DFT"), init_model_uri="init", export_uri="out", num_train_samples=1)


def test_batch_is_trimmed_to_its_longest_row():
    length, image = 12, 4
    batch = {
        "input_ids": np.zeros((2, length), np.int32),
        "attention_mask": np.zeros((2, length), np.int8),
        "target_ids": np.full((2, length), -100, np.int32),
        "response_mask": np.zeros((2, length), bool),
        "visual_mask": np.zeros((2, length), bool),
        "num_visual": np.array([2, 0], np.int32),
        "pixel_values": np.ones((2, 3, 4, 4), np.float32),
    }
    batch["attention_mask"][0, :7] = 1
    batch["attention_mask"][1, :5] = 1
    batch["input_ids"][0, 1:3] = image
    out = student_batch(batch, torch.device("cpu"), torch.float32)
    assert out.input_ids_BL.shape == (2, 7) and out.input_ids_BL.dtype == torch.long
    assert out.num_tokens == 12 and out.num_samples == 2
    assert out.pixel_values.shape == (1, 3, 4, 4)  # only the sample with image tokens


def test_data_position_rolls_over_at_the_end_of_an_epoch():
    assert next_position(0, 3, last_in_epoch=False) == (0, 4)
    assert next_position(0, 5, last_in_epoch=True) == (1, 0)


def test_bf16_without_zero_is_a_config_error():
    from ckd_ray.config.loader import ConfigError

    with pytest.raises(ConfigError, match=r"trainer: zero_stage 0 cannot train in bf16 .* set trainer.zero_stage to 1"):
        make_job(zero_stage=0, precision="bf16")
    assert make_job(zero_stage=0, precision="auto").trainer.uses_bf16 is False  # CPU: fp32


def test_train_state_round_trips_through_json(tmp_path):
    state = TrainState(step=3, epoch=1, batches_in_epoch=2, samples_seen=24, tokens_seen=999, num_workers=2,
                       micro_batch_size=4, history=[{"step": 1, "loss": 2.5}])
    (tmp_path / "train_state.json").write_text(state.to_json())
    assert read_state(tmp_path) == state
    (tmp_path / "train_state.json").write_text('{"format_version": 0, "step": 1}')
    with pytest.raises(ValueError, match="format version"):
        read_state(tmp_path)


# --- a DeepSpeed checkpoint round trip in this process -------------------------------------------


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group for the module, torn down afterwards (DeepSpeed caches its
    groups, so one group serves every engine of the module)."""
    import os

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _engine(zero_stage: int, bf16: bool, model_dir, checkpoint_dir=None, start_step=0):
    from ckd_ray.losses import FeatureProjection
    from ckd_ray.models import apply_freeze, load_model
    from ckd_ray.train.checkpoint import load_projection, restore_optimizer_state
    from ckd_ray.train.engine import OptimizerPlan, StudentWithProjection, build_engine, deepspeed_config

    student = load_model(str(model_dir))
    apply_freeze(student, "connector+llm")
    torch.manual_seed(0)
    projection = FeatureProjection({1: 2}, d_student=96, d_teacher=192)
    if checkpoint_dir is not None:
        load_projection(projection, checkpoint_dir)
    plan = OptimizerPlan(lr=1e-3, weight_decay=0.01, total_steps=4, warmup_steps=1)
    config = deepspeed_config(micro_batch_size=2, grad_accum=2, grad_clip=1.0, zero_stage=zero_stage, bf16=bf16)
    engine, scheduler = build_engine(StudentWithProjection(student, projection), plan, config, start_step=start_step)
    if checkpoint_dir is not None:
        restore_optimizer_state(engine, checkpoint_dir, start_step)
    return engine


def _micro_batch(seed: int, dtype: torch.dtype):
    from ckd_ray.losses import TeacherSignalBatch
    from ckd_ray.train.batch import StudentBatch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 500, (2, 24), generator=generator)
    input_ids[:, 1:17] = 4
    target_ids = torch.full_like(input_ids, -100)
    target_ids[:, 17:23] = input_ids[:, 18:24]
    batch = StudentBatch(
        input_ids_BL=input_ids, attention_mask_BL=torch.ones_like(input_ids),
        pixel_values=torch.randn(2, 3, 32, 32, generator=generator).to(dtype), target_ids_BL=target_ids,
        response_mask_BL=target_ids != -100, visual_mask_BL=input_ids == 4, num_samples=2, num_tokens=48,
    )
    signal = TeacherSignalBatch(hidden_states={2: torch.randn(2, 24, 192, generator=generator).to(dtype)})
    return batch, signal


@pytest.mark.parametrize(("zero_stage", "bf16"), [(0, False), (1, False), (2, False), (3, False), (1, True), (2, True), (3, True)])
def test_checkpoint_resumes_bit_identically(zero_stage, bf16, process_group, tmp_path):
    """Two optimizer steps, checkpoint, two more; a second engine restored from the checkpoint
    takes the same last two steps and ends with identical weights, moments and lr. In bf16 the
    checkpoint carries the fp32 master weights, without which the resumed run would drift."""
    pytest.importorskip("deepspeed")
    from ckd_ray.losses.config import LossConfig
    from ckd_ray.models import build_preset, save_model
    from safetensors.torch import load_file

    from ckd_ray.train.checkpoint import MODEL_DIR, write_checkpoint
    from ckd_ray.train.loop import train_step

    save_model(build_preset("tiny-student", seed=0), tmp_path / "init")
    loss = LossConfig(weights={"task": 1.0, "feature": 1.0}, feature_layers={1: 2})
    batches = [_micro_batch(seed, torch.bfloat16 if bf16 else torch.float32) for seed in range(8)]  # 2 per optimizer step

    engine = _engine(zero_stage, bf16, tmp_path / "init")
    for batch, signal in batches[:4]:
        train_step(engine, batch, signal, loss)
    write_checkpoint(engine, TrainState(step=2), tmp_path / "ckpt", processor_dir=tmp_path / "init", is_writer=True)
    for batch, signal in batches[4:]:
        train_step(engine, batch, signal, loss)

    resumed = _engine(zero_stage, bf16, tmp_path / "ckpt" / MODEL_DIR, tmp_path / "ckpt", start_step=2)
    for batch, signal in batches[4:]:
        train_step(resumed, batch, signal, loss)

    assert resumed.get_lr() == engine.get_lr()
    for name, run in (("expected", engine), ("actual", resumed)):
        write_checkpoint(run, TrainState(step=4), tmp_path / name, processor_dir=tmp_path / "init", is_writer=True)
    for file in (f"{MODEL_DIR}/model.safetensors", "optimizer.safetensors", "projection.safetensors"):
        expected, actual = load_file(tmp_path / "expected" / file), load_file(tmp_path / "actual" / file)
        assert expected.keys() == actual.keys(), file
        for name in expected:
            assert torch.equal(expected[name], actual[name]), f"{file}: {name}"
    moments = load_file(tmp_path / "actual" / "optimizer.safetensors")
    assert "projection.projections.1.weight.exp_avg" in moments
    assert ("projection.projections.1.weight.master" in moments) == bf16
    assert not any("vision_tower" in name for name in moments)  # frozen: no optimizer state


def test_feature_and_attention_terms_get_hidden_states_eager_attention_and_a_projection(process_group, tmp_path):
    """With the feature and attention terms on, the student loads with eager attention (SDPA
    returns no attention maps), the projection maps the teacher's width (tiny-ta: 192) to the
    student's (96), and one step trains on both terms."""
    from ckd_ray.losses import TeacherSignalBatch
    from ckd_ray.models import build_preset, save_model
    from ckd_ray.train.loop import build_student, train_step

    save_model(build_preset("tiny-student", seed=0), tmp_path / "init")
    job = validate_config({
        "data": {"benchmark_root": "benchmark"},
        "models": {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}},
        "loss": {"weights": {"task": 1.0, "feature": 1.0, "attention": 1.0}, "feature_layers": {1: 2}, "attention_layers": {1: 2}},
        "trainer": {"micro_batch_size": 2, "num_workers": 1},
    })
    plan = plan_step(job, StageConfig(teacher="ta", steps=["DFT"]), StepConfig(kind="DFT"),
                     init_model_uri=str(tmp_path / "init"), export_uri=str(tmp_path / "out"), num_train_samples=8)
    engine = build_student(plan, torch.device("cpu"), None, TrainState())
    assert engine.module.student.config._attn_implementation == "eager"
    assert engine.module.projection.projections["1"].weight.shape == (96, 192)

    batch, _ = _micro_batch(0, torch.float32)
    attention_BGLN = torch.softmax(torch.randn(2, 1, 24, 16), dim=-1)
    signal = TeacherSignalBatch(hidden_states={2: torch.randn(2, 24, 192)}, attentions={1: attention_BGLN})
    terms = train_step(engine, batch, signal, plan.loss)
    assert set(terms) == {"task", "feature", "attention", "total"}
    assert all(torch.isfinite(value) for value in terms.values())


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_step_in_length_groups_trains_as_the_padded_batch_does(zero_stage, process_group, tmp_path):
    """The student's forward in length groups (`trainer.length_buckets`) runs the engine once per
    group before one backward: after two optimizer steps the loss terms and weights match the
    padded batch's to float32 rounding, under every ZeRO stage."""
    pytest.importorskip("deepspeed")
    from ckd_ray.losses.config import LossConfig
    from ckd_ray.models import build_preset, save_model
    from safetensors.torch import load_file

    from ckd_ray.train.checkpoint import MODEL_DIR, write_checkpoint
    from ckd_ray.train.loop import train_step

    save_model(build_preset("tiny-student", seed=0), tmp_path / "init")
    loss = LossConfig(weights={"task": 1.0, "feature": 1.0}, feature_layers={1: 2})
    batches = []
    for seed in range(4):
        batch, signal = _micro_batch(seed, torch.float32)
        batch.attention_mask_BL[1, 19:] = 0  # row 1 is 19 tokens of the batch's 24
        batch.target_ids_BL[1, 18:] = -100
        batch.response_mask_BL = batch.target_ids_BL != -100
        batches.append((batch, signal))
    from ckd_ray.models.buckets import plan_buckets

    assert len(plan_buckets(np.array([24, 19]), 2)) == 2
    weights, terms = {}, {}
    for max_buckets in (1, 2):
        engine = _engine(zero_stage, False, tmp_path / "init")
        terms[max_buckets] = [train_step(engine, batch, signal, loss, max_buckets) for batch, signal in batches]
        write_checkpoint(engine, TrainState(step=2), tmp_path / f"b{max_buckets}", processor_dir=tmp_path / "init", is_writer=True)
        weights[max_buckets] = load_file(tmp_path / f"b{max_buckets}" / MODEL_DIR / "model.safetensors")
    for whole, split in zip(terms[1], terms[2], strict=True):
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = 0
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[2][name], value, rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(value, load_file(tmp_path / "init" / "model.safetensors")[name])
    assert changed  # the steps trained


PACKED_CHECK = r"""
import sys
from ray import cloudpickle
run, config = cloudpickle.loads(open(sys.argv[1], "rb").read())
heavy = sorted(m for m in ("torch", "transformers", "deepspeed", "ckd_ray.train.loop") if m in sys.modules)
print("imported:", heavy)
"""


def test_the_train_controller_unpickles_the_packed_loop_without_torch(tmp_path):
    """What Ray Train's controller unpickles (`build_trainer`): the entry function and a packed
    config, whose steps hold a `StepPlan` and a signal decoder (both from torch-importing modules).
    A fresh interpreter unpickles them without importing torch, transformers, DeepSpeed or the
    train loop; `run_packed` hands the worker loop the config as it was packed."""
    import subprocess
    import sys
    from functools import partial

    from ray import cloudpickle

    from ckd_ray.teachers.config import SignalSpec
    from ckd_ray.teachers.signal import decode_signal
    from ckd_ray.train.entry import pack, run_packed
    from ckd_ray.train.loop import train_worker

    job = make_job(num_workers=2, micro_batch_size=4)
    plan = plan_step(job, StageConfig(teacher="ta", steps=["DFT"]), StepConfig(kind="DFT"), init_model_uri="init",
                     export_uri="out", num_train_samples=64)
    steps = [(plan, partial(decode_signal, spec=SignalSpec(), attention_layers={}))]
    config = pack(train_worker, {"steps": steps, "events": None, "validation": [None]})
    blob = tmp_path / "controller.pkl"
    blob.write_bytes(cloudpickle.dumps((run_packed, config)))
    done = subprocess.run([sys.executable, "-c", PACKED_CHECK, str(blob)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: []" in done.stdout

    received = tmp_path / "received.pkl"

    def worker_loop(given):
        received.write_bytes(cloudpickle.dumps(given))

    run_packed(pack(worker_loop, {"steps": steps, "events": None, "validation": [None]}))
    given = cloudpickle.loads(received.read_bytes())
    assert given.keys() == {"steps", "events", "validation"}
    assert given["steps"][0][0] == plan and given["validation"] == [None] and given["events"] is None
    assert config.keys() == {"events", "validation", "_packed_loop"}  # the steps travel as bytes only


def test_a_remote_checkpoint_is_read_from_a_folder_of_the_reader_s_own(tmp_path):
    """`checkpoint_directory`: a local checkpoint is read in place; a remote one (any pyarrow
    filesystem but the local one; a SubTreeFileSystem here) is downloaded into a folder each
    reader owns, so a second reader's download never writes over the files a first one holds
    open or mapped (Ray's shared `as_directory` folder does), and each folder goes when its
    reader is done."""
    from pyarrow.fs import LocalFileSystem, SubTreeFileSystem
    from ray.train import Checkpoint

    from ckd_ray.train.checkpoint import checkpoint_directory

    saved = tmp_path / "run" / "step-0000003"
    (saved / "model").mkdir(parents=True)
    (saved / "model" / "model.safetensors").write_bytes(b"weights" * 100)
    with checkpoint_directory(Checkpoint.from_directory(str(saved))) as directory:
        assert Path(directory) == saved

    remote = Checkpoint("run/step-0000003", filesystem=SubTreeFileSystem(str(tmp_path), LocalFileSystem()))
    with checkpoint_directory(remote) as first:
        held = open(Path(first) / "model" / "model.safetensors", "rb")
        with checkpoint_directory(remote) as second:
            assert second != first
            assert (Path(second) / "model" / "model.safetensors").read_bytes() == b"weights" * 100
        assert not Path(second).exists() and Path(first).exists()
        assert held.read() == b"weights" * 100
        held.close()
    assert not Path(first).exists()


def test_a_fused_steps_teacher_weights_reach_prometheus_apart_from_the_loss_terms():
    """`fusion_<term>/<role>` (the fused loss's mean weight of a teacher) is not a loss term: the
    step's Prometheus record gets it as (term, teacher) for its own gauge, averaged over micro-batches."""
    import numpy as np
    import torch

    from ckd_ray.train.loop import ReportWindow

    window = ReportWindow()
    batch = {"input_ids": np.zeros((2, 3)), "attention_mask": np.ones((2, 3))}
    for ta_weight in (0.2, 0.4):
        window.add({"total": torch.tensor(1.0), "output": torch.tensor(0.5),
                    "fusion_output/ta": torch.tensor(ta_weight), "fusion_output/teacher": torch.tensor(1 - ta_weight)},
                   batch, busy_s=0.1, waited_s=0.0)
    closed = window.close_step()
    assert closed["loss_terms"] == {"total": 1.0, "output": 0.5}
    assert closed["fusion_weights"].keys() == {("output", "ta"), ("output", "teacher")}
    assert closed["fusion_weights"][("output", "ta")] == pytest.approx(0.3)
    assert closed["fusion_weights"][("output", "teacher")] == pytest.approx(0.7)
    assert closed["num_tokens"] == 12
