"""GPU smoke test of composed models at real shapes: random weights, nothing downloaded.

    bash benchmarks/gpu_smoke.sh                                   # the whole run (needs CUDA)
    python benchmarks/gpu_smoke.py --dry-run                       # shapes, parameters, FLOPs; allocates nothing
    python benchmarks/gpu_smoke.py --rehearse-on-cpu --work DIR    # the same path at tiny shapes on CPU

It builds a Qwen2.5-0.5B-shaped student LLM, a Qwen2.5-1.5B-shaped teacher LLM and a
SigLIP-B/14-384-shaped vision tower from `transformers` config classes, saves them as the hub's
folders are (with the bundled benchmark's tokenizer and a SigLIP image processor), composes both
VLMs with `ckd-ray models compose`'s code, and runs a few DFT steps in bf16 through
`run_cascade`: the teacher pool's pass (cached) and the student's worker group on the same GPU,
one after the other. It records

- student tokens/s (non-padding tokens, from the step's reports after the first) and step time;
- the student step's model FLOPs utilisation over its compute time (step time less data wait):
  (6 N + 12 L d S) FLOPs per trained token for the LLM
  (N its parameters with lm_head, L layers, d width, S sequence length) plus 2 N_vision per
  image patch for the frozen tower's forward, over the GPU's dense bf16 peak;
- peak GPU memory of each role: the most NVML reports used on the device while that role runs
  (teacher pass, student training), minus the idle baseline before the run;
- the teacher pool's throughput (samples/s of its one pass over the step's 160 samples, the
  actor's start and model load included: a floor for the steady rate).

Figures go to stdout and, as JSON, to `--out` (default `$OUT/gpu_smoke.json` when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 peak per GPU name (TFLOP/s, no sparsity), for MFU; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass(frozen=True)
class Shapes:
    """The parts' shapes: student and teacher LLMs (Qwen2 configs) and the vision tower."""

    student: dict
    teacher: dict
    vision: dict
    max_length: int
    micro_batch_size: int
    max_steps: int


def real_shapes() -> Shapes:
    from ckd_ray.models.presets import REAL_PRESETS, REAL_VISION

    def text(name: str) -> dict:
        t = REAL_PRESETS[name].text
        return dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                    num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                    vocab_size=t.vocab_size, tie_word_embeddings=True, max_position_embeddings=32768)

    # 729 visual tokens + the benchmark's chat-formatted question and answer fit 1024.
    return Shapes(text("qwen2.5-0.5b-siglip"), text("qwen2.5-1.5b-siglip"), dict(REAL_VISION), 1024, 8, 20)


def tiny_shapes() -> Shapes:
    def text(hidden: int) -> dict:
        return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512)

    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return Shapes(text(64), text(96), vision, 128, 4, 2)


def meta_parameters(shapes: Shapes) -> dict[str, int]:
    """Parameter counts of each part, from modules built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**shape)).parameters())
                  for name, shape in (("student_llm", shapes.student), ("teacher_llm", shapes.teacher))}
        counts["vision_tower"] = sum(p.numel() for p in SiglipVisionModel(SiglipVisionConfig(**shapes.vision)).parameters())
    return counts


def flops_per_student_step(shapes: Shapes, num_tokens: int, num_images: int, llm_parameters: int, vision_parameters: int) -> float:
    """Model FLOPs of one student DFT step (see the module docstring); the connector is in the
    noise and left out."""
    text = shapes.student
    patches = (shapes.vision["image_size"] // shapes.vision["patch_size"]) ** 2
    per_token = 6 * llm_parameters + 12 * text["num_hidden_layers"] * text["hidden_size"] * shapes.max_length
    return num_tokens * per_token + num_images * patches * 2 * vision_parameters


def build_parts(shapes: Shapes, work: Path, device: str) -> dict[str, Path]:
    """The benchmark (its tokenizer and data), two LLM folders and one vision folder, random weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from ckd_ray.data.kvqa import build_kvqa
    from ckd_ray.data.processor import siglip_image_processor
    from ckd_ray.models.builder import PROCESSOR_FILES
    from ckd_ray.models.presets import EOS_TOKEN_ID, PAD_TOKEN_ID

    benchmark = work / "kvqa"
    if not (benchmark / "summary.json").exists():
        build_kvqa(benchmark, seed=0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    paths = {"benchmark": benchmark}
    for role, shape in (("student_llm", shapes.student), ("teacher_llm", shapes.teacher)):
        out = work / "parts" / role
        if not (out / "config.json").exists():
            with torch.device(device):  # random init on the GPU: seconds, not minutes, at 1.5B
                model = Qwen2ForCausalLM(Qwen2Config(**shape, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=None))
            model.to(dtype).save_pretrained(out)
            for name in PROCESSOR_FILES:  # the benchmark's tokenizer stands in for Qwen's (its ids fit the rows)
                if (benchmark / "processor" / name).exists() and name.startswith(("tokenizer", "special")):
                    shutil.copy2(benchmark / "processor" / name, out / name)
            del model
        paths[role] = out
    vision_out = work / "parts" / "siglip"
    if not (vision_out / "config.json").exists():
        with torch.device(device):
            tower = SiglipVisionModel(SiglipVisionConfig(**shapes.vision))
        tower.to(dtype).save_pretrained(vision_out)
        siglip_image_processor(shapes.vision["image_size"]).save_pretrained(vision_out)
        del tower
    paths["vision"] = vision_out
    return paths


def compose_both(paths: dict[str, Path], work: Path) -> dict[str, str]:
    from ckd_ray.models.compose import ComposeSpec, compose_model

    models = {}
    for role in ("student", "teacher"):
        out = work / "models" / role
        if not (out / "config.json").exists():
            print(compose_model(ComposeSpec(llm=str(paths[f"{role}_llm"]), vision=str(paths["vision"]), out=str(out))).summary())
        models[role] = str(out)
    return models


def job_config(shapes: Shapes, models: dict[str, str], benchmark: Path, work: Path, on_gpu: bool):
    from ckd_ray.config import validate_config

    name = f"gpu-smoke-{int(time.time())}"
    return validate_config({
        "name": name,
        "models": {"student": {"path": models["student"], "dtype": "bfloat16" if on_gpu else "float32"},
                   "teacher": {"path": models["teacher"], "dtype": "bfloat16" if on_gpu else "float32"}},
        "data": {"benchmark_root": str(benchmark), "max_length": shapes.max_length},
        "cascade": {"prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DFT"]}]},
        "signal": {"response_top_k": 64, "visual_top_k": 64, "gram": True, "value_dtype": "bfloat16"},
        # Cached signal: the pool's pass ends before the worker group starts, so both take the one GPU.
        "teacher_pool": {"num_gpus": 1 if on_gpu else 0, "num_cpus": 2, "batch_size": 16, "use_cache": True},
        "trainer": {"num_workers": 1, "use_gpu": on_gpu, "cpus_per_worker": 4, "zero_stage": 2,
                    "precision": "bf16" if on_gpu else "fp32", "micro_batch_size": shapes.micro_batch_size,
                    "max_steps": shapes.max_steps, "report_every": max(1, shapes.max_steps // 4), "checkpoint_every": 1000, "warmup_ratio": 0.0},
        "evaluation": {"max_samples": 16, "latency_runs": 1, "max_new_tokens": 4},
        # A fresh signal cache per run: a cache hit would skip the teacher pass being measured.
        "storage": {"root": str(work / "runs"), "signal_cache": str(work / "runs" / name / "signal-cache")},
        "ray": {"num_cpus": 16 if on_gpu else 8},
    })


class DeviceMemory:
    """Samples NVML's used memory of GPU 0 every `interval_s` in a thread: (time, bytes) pairs."""

    def __init__(self, interval_s: float = 0.2):
        import pynvml

        pynvml.nvmlInit()
        self._pynvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._interval_s = interval_s
        self.baseline = self._used()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._used()))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> "DeviceMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, start: float | None, end: float | None) -> float | None:
        """GiB above the baseline at the busiest sample in [start, end]."""
        if start is None or end is None:
            return None
        window = [used for t, used in self.samples if start <= t <= end]
        return (max(window) - self.baseline) / 2**30 if window else None


def run(args) -> dict:
    import torch

    on_gpu = not args.rehearse_on_cpu
    shapes = tiny_shapes() if args.rehearse_on_cpu else real_shapes()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = build_parts(shapes, work, "cuda" if on_gpu else "cpu")
    models = compose_both(paths, work)
    build_s = time.perf_counter() - started
    job = job_config(shapes, models, paths["benchmark"], work, on_gpu)

    from ckd_ray import run_cascade

    marks: dict[str, float] = {}

    def log(line: str) -> None:
        print(line, flush=True)
        for key, needle in (("teacher_start", "one pass over the step's data"), ("teacher_end", "teacher pass:"),
                            ("student_start", ": teacher -> student, DFT"), ("student_end", "optimizer steps in")):
            if needle in line:
                marks.setdefault(key, time.time())

    memory = DeviceMemory() if on_gpu else None
    started = time.perf_counter()
    if memory:
        with memory:
            result = run_cascade(job, log=log, progress=False)
    else:
        result = run_cascade(job, log=log, progress=False)
    cascade_s = time.perf_counter() - started

    manifest = json.loads(Path(result.manifest_uri).read_text())
    (step,) = manifest["steps"].values()
    reports = step["history"][1:] or step["history"]  # the first report carries the warm-up
    tokens_per_s = sum(r["tokens_per_s"] for r in reports) / len(reports)
    step_time_s = sum(r["step_time_s"] for r in reports) / len(reports)
    compute_s = step_time_s - sum(r["data_wait_s"] for r in reports) / len(reports)  # MFU is of the step's compute
    parameters = meta_parameters(shapes)
    tokens_per_step = tokens_per_s * step_time_s
    flops = flops_per_student_step(shapes, tokens_per_step, shapes.micro_batch_size, parameters["student_llm"], parameters["vision_tower"])
    name = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    figures = {
        "device": name,
        "shapes": "real (Qwen2.5-0.5B / 1.5B, SigLIP-B/14-384)" if on_gpu else "tiny (CPU rehearsal)",
        "parameters": parameters,
        "optimizer_steps": step["metrics"]["step"],
        "student_tokens_per_s": round(tokens_per_s, 1),
        "student_step_time_s": round(step_time_s, 3),
        "student_step_compute_s": round(compute_s, 3),
        "student_mfu": round(flops / compute_s / (peak * 1e12), 4) if peak else None,
        "teacher_pool_samples_per_s": step["teacher_pass"].get("samples_per_s"),
        "teacher_pass_samples": step["teacher_pass"].get("samples"),
        "peak_gpu_memory_gib": {
            "teacher": memory.peak_between(marks.get("teacher_start"), marks.get("teacher_end")) if memory else None,
            "student": memory.peak_between(marks.get("student_start"), marks.get("student_end")) if memory else None,
        },
        "phases_s": step.get("phases", {}),
        "build_and_compose_s": round(build_s, 1),
        "cascade_s": round(cascade_s, 1),
        "student_uri": result.student_uri,
    }
    return figures


def dry_run() -> dict:
    """Shapes, parameter counts and the FLOPs of one student step at real shapes: config objects
    and meta-device modules only, so it runs anywhere in seconds."""
    shapes = real_shapes()
    parameters = meta_parameters(shapes)
    from ckd_ray.models.folders import count_visual_tokens

    tokens = count_visual_tokens(image_size=shapes.vision["image_size"], patch_size=shapes.vision["patch_size"],
                                 vision_model_type="siglip_vision_model", select_strategy="full")
    step_tokens = shapes.micro_batch_size * shapes.max_length
    return {
        "student_llm": shapes.student, "teacher_llm": shapes.teacher, "vision": shapes.vision,
        "parameters": parameters, "visual_tokens_per_image": tokens, "max_length": shapes.max_length,
        "student_tflops_per_step_at_full_length": round(flops_per_student_step(
            shapes, step_tokens, shapes.micro_batch_size, parameters["student_llm"], parameters["vision_tower"]) / 1e12, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.environ.get("GPU_SMOKE_WORK", "/tmp/ckd-gpu-smoke"), help="Working folder (parts, models, run).")
    parser.add_argument("--out", default=None, help="JSON file for the figures (default $OUT/gpu_smoke.json when $OUT is set).")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak of the GPU, for MFU (default: by name).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="Print shapes, parameters and FLOPs only; allocate no model.")
    mode.add_argument("--rehearse-on-cpu", action="store_true", help="Run the whole path at tiny shapes on CPU (figures mean nothing).")
    args = parser.parse_args()

    if args.dry_run:
        figures = dry_run()
    else:
        import torch

        if not args.rehearse_on_cpu and not torch.cuda.is_available():
            print("gpu_smoke: no CUDA device is visible (torch.cuda.is_available() is False): run it on a GPU machine, "
                  "or use --dry-run (shapes and FLOPs) or --rehearse-on-cpu (the same path at tiny shapes)", file=sys.stderr)
            return 2
        figures = run(args)
    text = json.dumps(figures, indent=2)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_smoke.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
