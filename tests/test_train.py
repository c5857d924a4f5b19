"""The student trainer end to end on a local Ray: 2 DeepSpeed workers on CPU (gloo), the bundled
benchmark's rows with a tiny teacher's signal, every step type, restarts from checkpoints (local
and s3://), resubmission, and the exported student loaded by plain `transformers`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray
import ray.cloudpickle
from safetensors.torch import load_file

from ckd_ray.config.cascade import STEP_FREEZE, StageConfig, StepConfig
from ckd_ray.config.loader import validate_config
from ckd_ray.models import FREEZE_POLICIES, build_preset, save_model
from ckd_ray.cascade.steps import default_signal_decoder, plan_step, run_step, samples_needed
from ckd_ray.train.run import TrainStep, run_steps
from ckd_ray.train.config import DEFAULT_LR

# Worker processes cannot import this test module: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NUM_ROWS = 48  # 24 per worker = 6 micro-batches of 4: the 10 optimizer steps cross an epoch boundary
MAX_STEPS = 10
CHECKPOINT_EVERY = 3


class TinyTeacher:
    """A tiny teacher in a Ray Data actor: adds the compressed signal columns (`sig_*`)."""

    def __init__(self, spec):
        from ckd_ray.models import build_preset
        from ckd_ray.teachers.forward import TeacherForward

        self.forward = TeacherForward(build_preset("tiny-ta", seed=1), spec, shared_vocab_size=512)

    def __call__(self, batch):
        return {**batch, **self.forward(batch)}


class CrashOnce:
    """Decodes the teacher signal like the default decoder, except that worker `rank` kills its
    own process (no exception, no cleanup) at its `at_call`-th batch, once: `marker` records it."""

    def __init__(self, decode, marker: str, at_call: int, rank: int = 1):
        self.decode, self.marker, self.at_call, self.rank = decode, marker, at_call, rank
        self.calls = 0

    def __call__(self, batch, device):
        import ray.train

        self.calls += 1
        if self.calls == self.at_call and ray.train.get_context().get_world_rank() == self.rank and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.decode(batch, device=device)


@pytest.fixture(scope="module", autouse=True)
def fast_controller_polls():
    """Ray Train's controller collects reports every 2 s and a worker's next report waits for
    the previous one to be collected: with a report every step, poll every 0.2 s instead."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        yield


def make_job(kvqa_dir, **trainer):
    return validate_config({
        "data": {"benchmark_root": str(kvqa_dir)},
        "models": {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}},
        "trainer": {
            "num_workers": 2, "micro_batch_size": 4, "zero_stage": 2, "max_steps": MAX_STEPS, "report_every": 1,
            "checkpoint_every": CHECKPOINT_EVERY, "max_failures": 1, "epochs": 2.0,
            # Seed 001's SFT/DFT lr (2e-5) barely moves a random tiny model in 8 steps.
            "lr": {kind: 1e-3 for kind in DEFAULT_LR},
            **trainer,
        },
    })


def stage_for(kind: str) -> StageConfig:
    return StageConfig(teacher="ta", steps=[kind]) if kind in ("DPT", "DFT") else StageConfig(steps=[kind])


@pytest.fixture(scope="module")
def s3_for_workers(s3_server, ray_local):
    """The S3 endpoint, checked to be usable from Ray workers: they take their credentials from
    the environment Ray was started with, so the endpoint must be up before Ray starts."""
    @ray.remote(num_cpus=0)
    def endpoint_seen_by_workers():
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint_seen_by_workers.remote()) != s3_server:
        pytest.fail("Ray was started before the S3 test endpoint: Ray workers lack its AWS_* environment. "
                    "Start `s3_server` before `ray_local` (make the ray_local fixture depend on s3_server)")
    return s3_server


@pytest.fixture(scope="module")
def benchmark_rows(s3_server, ray_local, kvqa_dir, tmp_path_factory):
    """Benchmark rows through the real data pipeline plus a tiny teacher's signal, materialized
    once: caption rows (PT, DPT), instruction rows (FT, SFT, DFT), and validation rows."""
    from ckd_ray.data.pipeline import build_student_dataset
    from ckd_ray.data.processor import Processor

    job = make_job(kvqa_dir)
    processor = Processor.load(kvqa_dir / "processor", num_image_tokens=16)
    rejects = tmp_path_factory.mktemp("rejects")

    def rows(sources, name, limit, with_signal=True):
        dataset = build_student_dataset(sources, processor, job.data, rejects_uri=str(rejects / f"{name}.jsonl"), limit=limit).dataset
        if with_signal:
            dataset = dataset.map_batches(
                TinyTeacher, fn_constructor_kwargs={"spec": job.signal}, batch_size=16, concurrency=1, batch_format="numpy"
            )
        return dataset.materialize()

    val_sources = [s.model_copy(update={"split": "val"}) for s in job.data.instruction_sources()]
    return {
        "caption": rows(job.data.caption_sources(), "caption", NUM_ROWS),
        "instruct": rows(job.data.instruction_sources(), "instruct", NUM_ROWS),
        "val": rows(val_sources, "val", 16, with_signal=False),
    }


@pytest.fixture(scope="module")
def init_model_dir(kvqa_dir, tmp_path_factory):
    """The student every step starts from: a Hugging Face directory with the benchmark's processor files."""
    return save_model(build_preset("tiny-student", seed=0), tmp_path_factory.mktemp("init") / "student", kvqa_dir / "processor")


STEP_KINDS = ["PT", "FT", "DPT", "SFT", "DFT"]


@pytest.fixture(scope="module")
def trained(kvqa_dir, benchmark_rows, init_model_dir, tmp_path_factory):
    """`trained(kind)`: the StepResult of an uninterrupted run of that step type. The five step
    types train once, one after the other on one worker group (as a cascade's steps do), each
    from the same initial student; the kill and resume tests compare their own single-step runs
    with these bit for bit."""
    results = {}

    def train(kind: str):
        if not results:
            job = make_job(kvqa_dir)
            root = str(tmp_path_factory.mktemp("steps"))
            steps = []
            for name in STEP_KINDS:
                data = benchmark_rows["caption" if name in ("PT", "DPT") else "instruct"]
                step = StepConfig(kind=name)
                plan = plan_step(job, stage_for(name), step, init_model_uri=str(init_model_dir),
                                 num_train_samples=samples_needed(job, step), export_uri=os.path.join(root, name, "model"),
                                 step_id=name, checkpoint_prefix=f"{name}/", has_validation=True)
                decode = default_signal_decoder(job, plan.loss.attention_layers) if name in ("DPT", "DFT") else None
                steps.append(TrainStep(plan, data, benchmark_rows["val"], decode))
            results.update(zip(STEP_KINDS, run_steps(job.trainer, steps, storage_uri=root)))
        return results[kind]

    return train


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_step_trains_what_its_policy_unfreezes_and_the_loss_falls(kind, trained, init_model_dir):
    result = trained(kind)
    history = result.history
    assert result.num_steps == MAX_STEPS and [h["step"] for h in history] == list(range(1, MAX_STEPS + 1))
    expected_terms = {"loss_task"} | ({"loss_output", "loss_visual_kl", "loss_visual_relation"} if kind in ("DPT", "DFT") else set())
    assert {name for name in history[0] if name.startswith("loss_")} == expected_terms
    for report in history:
        assert report["tokens_per_s"] > 0 and report["step_time_s"] > 0 and report["data_wait_s"] >= 0
    assert history[0]["lr"] == 0.0 and history[1]["lr"] == pytest.approx(1e-3)  # 1 warm-up step, then cosine
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-2:]) / 2
    assert last < first - 0.05, [round(h["loss"], 4) for h in history]
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0 and result.metrics["val_loss"] > 0

    before = load_file(init_model_dir / "model.safetensors")
    after = load_file(os.path.join(result.model_uri, "model.safetensors"))
    assert before.keys() == after.keys()
    trainable = FREEZE_POLICIES[STEP_FREEZE[kind]]
    for name in before:
        parts = name.split(".")
        trains = "vision_tower" not in parts and any(part in parts for part in trainable)
        changed = not (before[name] == after[name]).all()
        assert changed == trains, f"{name}: trainable={trains} but changed={changed}"


def test_worker_killed_mid_step_restarts_from_its_checkpoint(kvqa_dir, benchmark_rows, init_model_dir, trained, tmp_path):
    """Worker 1 dies at its 6th batch: Ray Train restarts the group (FailureConfig), which resumes
    from the step-3 checkpoint (skipping the 3 micro-batches already trained on) and ends
    bit-identical to the uninterrupted run. Bitwise equality holds because nothing in a step is
    random and, on CPU, gloo's 2-way sums and each kernel are deterministic.

    Why not die sooner: Ray Train registers a checkpoint only once its controller has collected
    that report from every worker, and a worker can run one report ahead of the collection. Two
    steps (two all-reduces) after the checkpoint, both workers are provably past it."""
    reference = trained("DFT")
    job = make_job(kvqa_dir)
    marker = tmp_path / "killed"
    decode = CrashOnce(default_signal_decoder(job, {}), str(marker), at_call=CHECKPOINT_EVERY + 3)
    result = run_step(
        job, stage_for("DFT"), StepConfig(kind="DFT"), init_model_uri=str(init_model_dir),
        train_dataset=benchmark_rows["instruct"], val_dataset=benchmark_rows["val"], output_uri=str(tmp_path / "run"),
        decode_signal=decode,
    )
    assert marker.exists(), "the worker was not killed"
    assert result.resumed_from == [CHECKPOINT_EVERY] and reference.resumed_from == []
    assert_same_student(result, reference)


def test_the_train_cleaner_of_the_tests_ray_never_hears_from_another_ray(ray_local):
    """Ray Train's placement-group cleaner (a detached actor the controller starts) removes the
    worker group's placement group once the State API says its controller is gone. In the tests'
    dashboard-less Ray, the State API must refuse, not take the answer of another Ray's dashboard
    on 8265 (conftest). Here 8265 answers as a dashboard that knows no such actor would (unless
    another test's Ray holds the port already): asked about a live actor from an actor that actor
    starts, as the cleaner is, the State API still raises ServerUnavailable."""
    import http.server
    import threading

    from ray.util.state.exception import ServerUnavailable

    class NoSuchActor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"result": True, "msg": "", "data": {"result": {"result": []}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    try:
        other_dashboard = http.server.ThreadingHTTPServer(("127.0.0.1", 8265), NoSuchActor)
    except OSError:
        other_dashboard = None  # another Ray's dashboard has it
    else:
        threading.Thread(target=other_dashboard.serve_forever, daemon=True).start()

    @ray.remote(num_cpus=0)
    class Probe:
        def ask(self, actor_id):
            from ray.util.state import get_actor
            try:
                return get_actor(actor_id, timeout=5)
            except ServerUnavailable as refused:
                return refused

    @ray.remote(num_cpus=0)
    class Controller:
        def ask(self):
            probe = Probe.options(lifetime="detached").remote()
            try:
                return ray.get(probe.ask.remote(ray.get_runtime_context().get_actor_id()))
            finally:
                ray.kill(probe)

    controller = Controller.options(runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}).remote()
    try:
        answer = ray.get(controller.ask.remote())
    finally:
        ray.kill(controller)
        if other_dashboard is not None:
            other_dashboard.shutdown()
            other_dashboard.server_close()
    assert isinstance(answer, ServerUnavailable), f"the State API answered {answer!r}"


def test_resubmitted_step_resumes_from_s3(s3_for_workers, s3_bucket, kvqa_dir, benchmark_rows, init_model_dir, trained, tmp_path):
    """Checkpoints go to s3:// (moto). The first submission dies in step 9, after the step-6
    checkpoint, with no restarts allowed; the resubmitted step (a new TorchTrainer on the same
    output URI) picks the step-6 checkpoint up from S3, at the start of the second epoch, and
    finishes identical to the uninterrupted run."""
    from ray.train import TrainingFailedError

    reference = trained("DFT")
    job = make_job(kvqa_dir, max_failures=0)
    output_uri = f"s3://{s3_bucket}/steps/dft"
    marker = tmp_path / "killed"
    common = dict(init_model_uri=str(init_model_dir), train_dataset=benchmark_rows["instruct"],
                  val_dataset=benchmark_rows["val"], output_uri=output_uri)
    with pytest.raises(TrainingFailedError) as failure:
        run_step(job, stage_for("DFT"), StepConfig(kind="DFT"),
                 decode_signal=CrashOnce(default_signal_decoder(job, {}), str(marker), at_call=2 * CHECKPOINT_EVERY + 3), **common)
    assert marker.exists(), f"the run failed before the worker was killed: {failure.value}"

    result = run_step(job, stage_for("DFT"), StepConfig(kind="DFT"), **common)
    assert result.resumed_from == [2 * CHECKPOINT_EVERY]
    assert result.checkpoint_uri == f"{output_uri}/train/step-{MAX_STEPS:07d}"
    assert result.model_uri == f"{output_uri}/model"
    assert_same_student(result, reference)


def assert_same_student(result, reference):
    from ckd_ray import storage

    assert [h["loss"] for h in result.history] == [h["loss"] for h in reference.history]
    actual = load_file(storage.download_dir(result.model_uri) / "model.safetensors")
    expected = load_file(os.path.join(reference.model_uri, "model.safetensors"))
    assert actual.keys() == expected.keys()
    for name in expected:
        assert (actual[name] == expected[name]).all(), name
    assert result.metrics["val_loss"] == reference.metrics["val_loss"]


def test_exported_student_answers_with_transformers_alone(trained, kvqa_dir, tmp_path):
    """The exported step model, used as a user does (AutoProcessor, generate, the pipeline; no
    ckd_ray), reads the benchmark row's tokens and answers what the project's evaluation answers."""
    from transformers import AutoTokenizer

    from ckd_ray.evaluate.generate import generate_answers, prompt_of
    from ckd_ray.models import load_model, num_image_tokens
    from test_models import USER_CHECK, benchmark_rows

    result = trained("DFT")
    files = set(os.listdir(result.model_uri))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "processor_config.json"} <= files
    assert not any("projection" in name or "optimizer" in name for name in files)
    record = next(r for r in json.loads((kvqa_dir / "instructions.json").read_text()) if r["split"] == "test")
    question = record["conversations"][0]["value"].removeprefix("<image>\n")
    # -I: isolated interpreter (no PYTHONPATH, no user site, not started in the repo)
    completed = subprocess.run(
        [sys.executable, "-I", "-c", USER_CHECK, result.model_uri, json.dumps([[str(kvqa_dir / "images" / record["image"]), question]])],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    user = json.loads(completed.stdout.strip().splitlines()[-1])
    (answer,) = user["results"]
    assert len(answer["new_tokens"]) > 0
    assert user["ckd_ray_imported"] is False

    model = load_model(result.model_uri)
    (row,) = benchmark_rows(kvqa_dir, [record], num_image_tokens(model.config))
    assert answer["input_ids"] == prompt_of(row).tolist() and answer["input_ids"].count(4) == num_image_tokens(model.config) == 16
    evaluated = generate_answers(model, AutoTokenizer.from_pretrained(result.model_uri), [row], max_new_tokens=8)
    assert [answer["answer"]] == [answer["pipeline"]] == evaluated


def test_worker_group_asks_for_the_configured_custom_resources(ray_local, tmp_path):
    """`trainer.resources` (e.g. the `student_gpu` slots of cluster/) reach every worker's
    resource request, next to its CPUs and GPU."""
    from ckd_ray.train.entry import PACKED, run_packed
    from ckd_ray.train.run import build_trainer

    job = validate_config({"models": {"student": {"preset": "tiny-student"}}, "data": {"benchmark_root": str(tmp_path)},
                           "cascade": {"plan": "student_only"}, "trainer": {"num_workers": 3, "resources": {"student_gpu": 1}}})
    trainer = build_trainer(job.trainer, lambda config: None, {}, storage_uri=str(tmp_path / "out"), name="train",
                            datasets={"train-0": ray.data.range(4)}, max_failures=0, keep_checkpoints=1)
    assert trainer.scaling_config.num_workers == 3
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.0, "student_gpu": 1.0}
    # What the controller unpickles is the light entry and the packed loop (tests/test_train_units.py).
    assert trainer.train_loop_per_worker is run_packed and PACKED in trainer.train_loop_config
