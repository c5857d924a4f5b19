"""Composing a Llava folder from public-checkpoint-shaped parts (a Qwen2 causal LM, SigLIP and CLIP
vision towers, each saved as the hub's folders are), loading it with transformers alone, the
refusals, existing Llava folders and other layouts, and one DPT + DFT cascade on composed models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from ckd_ray.config import ConfigError, validate_config
from ckd_ray.models import load_model, shared_vocab_size
from ckd_ray.models.compose import ComposeError, ComposeSpec, compose_model
from ckd_ray.models.folders import UnsupportedCheckpointError, read_model_folder

CORPUS = ["Which digit is shown?", "The digit shown is seven.", "Is the number after the digit even? Yes.",
          "A handwritten digit: 3", "Answer with a single word. No"] * 8
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen2's added tokens: no <image>
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT_TOWER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def save_tokenizer(out: Path, specials: list[str], eos: str, pad: str | None, corpus: list[str] = CORPUS) -> int:
    """A byte-level BPE tokenizer trained on `corpus`, saved as the hub's LLM folders hold one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=pad)
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def save_llm(out: Path, *, family: str = "qwen2", hidden: int = 64, vocab_rows: int | None = 320, seed: int = 0,
             corpus: list[str] = CORPUS) -> Path:
    """A random-weight causal LM folder; `vocab_rows=None` gives exactly the tokenizer's rows (no padding)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if family == "qwen2":
        tokens = save_tokenizer(out, QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", corpus=corpus)
        config_cls, model_cls = Qwen2Config, Qwen2ForCausalLM
    else:  # a Llama-style tokenizer without ChatML turn tokens
        tokens = save_tokenizer(out, ["<unk>", "<s>", "</s>"], eos="</s>", pad=None)
        config_cls, model_cls = LlamaConfig, LlamaForCausalLM
    config = config_cls(vocab_size=vocab_rows or tokens, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(out)
    return out


def save_vision(out: Path, kind: str, *, processor_size: int = 32) -> Path:
    """A vision folder: `siglip` (vision only), `siglip-full` or `clip-full` (image-text models),
    with the image processor its checkpoint ships."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1)
    if kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(out)
    elif kind == "siglip-full":
        SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT_TOWER)).save_pretrained(out)
    else:
        CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT_TOWER, projection_dim=16)).save_pretrained(out)
    image_processor(kind, processor_size).save_pretrained(out)
    return out


def image_processor(kind: str, size: int):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    if kind.startswith("clip"):  # CLIP's: shortest edge, then a center crop
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return {
        "qwen2": save_llm(root / "qwen2"),
        "qwen2-teacher": save_llm(root / "qwen2-teacher", hidden=96, vocab_rows=384, seed=1),
        "siglip": save_vision(root / "siglip", "siglip"),
        "siglip-full": save_vision(root / "siglip-full", "siglip-full"),
        "clip-full": save_vision(root / "clip-full", "clip-full"),
    }


@pytest.fixture(scope="module")
def composed(parts, tmp_path_factory):
    """Student (Qwen2 64 wide, 320 rows) and teacher (96 wide, 384 rows) on one SigLIP tower."""
    root = tmp_path_factory.mktemp("composed")
    student = compose_model(ComposeSpec(llm=str(parts["qwen2"]), vision=str(parts["siglip"]), out=str(root / "student")))
    teacher = compose_model(ComposeSpec(llm=str(parts["qwen2-teacher"]), vision=str(parts["siglip"]), out=str(root / "teacher")))
    return {"student": student, "teacher": teacher}


def digit_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8))


def answer(folder: str, image: Image.Image, max_new_tokens: int = 4):
    """transformers alone: the processor turns an image and a `<image>` prompt into model inputs."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor, model, prompt, inputs, output


def test_composed_qwen2_siglip_loads_with_transformers_and_answers(parts, composed):
    from transformers import AutoModelForCausalLM

    result = composed["student"]
    files = {p.name for p in Path(result.uri).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "processor_config.json",
            "chat_template.jinja", "generation_config.json"} <= files
    # The LLM's 300 tokens + <image>; the padded 320 rows had room, so nothing was resized.
    assert (result.num_image_tokens, result.image_token_id, result.vocab_rows) == (16, 300, (320, 320))
    assert result.added_tokens == {"<image>": 300}
    assert result.num_parameters["multi_modal_projector"] == 32 * 64 + 64 + 64 * 64 + 64

    processor, model, prompt, inputs, output = answer(result.uri, digit_image())
    assert prompt == "<|im_start|>user\n<image>\nWhich digit is shown?<|im_end|>\n<|im_start|>assistant\n"
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    assert output.shape[1] > inputs["input_ids"].shape[1]  # it answered
    assert model.generation_config.eos_token_id == [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    # The LLM is the part's own: on text alone the composed model gives the LLM's logits, but
    # for the <image> row (300), which is new.
    llm = AutoModelForCausalLM.from_pretrained(parts["qwen2"]).eval()
    text_ids = processor.tokenizer("The digit shown is seven.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        composed_logits, llm_logits = model(input_ids=text_ids).logits, llm(input_ids=text_ids).logits
    keep = torch.arange(320) != 300
    torch.testing.assert_close(composed_logits[..., keep], llm_logits[..., keep], rtol=0, atol=0)
    assert not torch.equal(composed_logits[..., 300], llm_logits[..., 300])
    # The image token's row starts as the mean of the tokenizer's rows (and is tied to lm_head).
    rows = llm.get_input_embeddings().weight
    torch.testing.assert_close(model.get_input_embeddings().weight[300], rows[:300].mean(0))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("kind, strategy, tokens", [("siglip-full", None, 16), ("clip-full", None, 16), ("clip-full", "full", 17)])
def test_full_siglip_and_clip_folders_give_their_vision_half(parts, tmp_path, kind, strategy, tokens):
    from transformers import AutoModel

    out = tmp_path / "vlm"
    result = compose_model(ComposeSpec(llm=str(parts["qwen2"]), vision=str(parts[kind]), out=str(out), select_strategy=strategy))
    assert result.num_image_tokens == tokens  # CLIP adds a class token; `default` drops it
    processor, model, _, inputs, output = answer(str(out), digit_image(), max_new_tokens=2)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2 or output[0, -1] in model.generation_config.eos_token_id
    full = AutoModel.from_pretrained(parts[kind])
    torch.testing.assert_close(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight,
                               full.vision_model.encoder.layers[1].mlp.fc1.weight, rtol=0, atol=0)


def test_llama_without_chat_tokens_gets_them_and_its_embeddings_grow(tmp_path, parts):
    llm = save_llm(tmp_path / "llama", family="llama", vocab_rows=None)
    result = compose_model(ComposeSpec(llm=str(llm), vision=str(parts["siglip"]), out=str(tmp_path / "vlm")))
    assert result.llm_type == "llama"
    assert result.added_tokens == {"<|im_start|>": 300, "<|im_end|>": 301, "<image>": 302}
    assert result.vocab_rows == (300, 320)  # 303 needed, padded to a multiple of 64
    _, model, _, inputs, output = answer(result.uri, digit_image(), max_new_tokens=2)
    embeddings = model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings[300:320], embeddings[:300].mean(0).expand(20, -1))
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_parts_that_do_not_fit_are_refused_with_every_problem(parts, composed, tmp_path):
    big = save_vision(tmp_path / "siglip-64", "siglip", processor_size=64)
    with pytest.raises(ComposeError) as info:
        compose_model(ComposeSpec(llm=str(parts["qwen2"]), vision=str(big), out=str(tmp_path / "a"), vision_feature_layer=5))
    text = str(info.value)
    assert text.startswith("cannot compose a model (2 problems)")
    assert "makes 64x64 images but the tower expects 32x32" in text
    assert "--vision-feature-layer 5 is outside the tower's 2 layers" in text and "-3..2" in text
    assert not (tmp_path / "a").exists()

    with pytest.raises(ComposeError, match=r"model_type 'qwen2'.*SigLIP or CLIP"):
        compose_model(ComposeSpec(llm=str(parts["qwen2"]), vision=str(parts["qwen2"]), out=str(tmp_path / "b")))
    with pytest.raises(ComposeError, match="already a vision-language model"):
        compose_model(ComposeSpec(llm=composed["student"].uri, vision=str(parts["siglip"]), out=str(tmp_path / "c")))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(ComposeError, match="exists and is not empty"):
        compose_model(ComposeSpec(llm=str(parts["qwen2"]), vision=str(parts["siglip"]), out=str(tmp_path / "taken")))


def test_cli_compose_prints_the_summary_and_refuses_with_exit_code_2(parts, tmp_path):
    from click.testing import CliRunner

    from ckd_ray.cli import main

    no_processor = tmp_path / "bare"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_processor / name).write_bytes((parts["siglip"] / name).read_bytes())
    bad = CliRunner().invoke(main, ["models", "compose", "--llm", str(parts["qwen2"]), "--vision", str(no_processor),
                                    "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "has no image processor" in bad.output and "preprocessor_config.json" in bad.output
    good = CliRunner().invoke(main, ["models", "compose", "--llm", str(parts["qwen2"]), "--vision", str(parts["clip-full"]),
                                     "--out", str(tmp_path / "ok"), "--select-strategy", "full", "--vision-feature-layer", "-1"])
    assert good.exit_code == 0, good.output
    assert "17 visual tokens per image" in good.output and "image token id 300" in good.output
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["vision_feature_layer"] == -1


def _llava_hf_folder(parts, out: Path, *, key_names: str) -> torch.nn.Module:
    """A Llava folder as the llava-hf releases are: written by transformers' save_pretrained
    (`saved`: the 4.x key names, which 5.x still writes), or holding the module's own names
    (`module`: model.language_model.*, as some conversion tools write them)."""
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(parts["qwen2"])
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    config = LlavaConfig(vision_config={"model_type": "siglip_vision_model", **VISION},
                         text_config=json.loads((parts["qwen2"] / "config.json").read_text()),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full")
    torch.manual_seed(2)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    LlavaProcessor(image_processor("siglip", 32), tokenizer, patch_size=8, vision_feature_select_strategy="full").save_pretrained(out)
    saved = set(load_file(out / "model.safetensors"))
    assert any(key.startswith("language_model.model.") for key in saved)  # what the llava-hf releases hold
    if key_names == "module":
        weights = {key: value.contiguous() for key, value in model.state_dict().items() if key != "lm_head.weight"}  # tied
        assert any(key.startswith("model.language_model.") for key in weights)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("key_names", ["saved", "module"])
def test_existing_llava_hf_folder_loads_as_a_role_without_conversion(parts, tmp_path, key_names):
    from ckd_ray.cascade.datasets import StepData

    reference = _llava_hf_folder(parts, tmp_path / "llava", key_names=key_names)
    ids = torch.tensor([[5, 6] + [reference.config.image_token_id] * 16 + [7]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "llava"))(input_ids=ids, pixel_values=pixels).logits,
                                   reference(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)
    job = validate_config({"models": {"student": {"path": str(tmp_path / "llava")}}, "data": {"benchmark_root": "data/kvqa"},
                           "cascade": {"plan": "student_only"}})
    processor = StepData(job, str(tmp_path / "run")).processor  # the student's own folder, not the benchmark's
    assert (processor.num_image_tokens, processor.image_token_id, processor.pixel_shape) == (16, 300, (3, 32, 32))


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu"},
     "convert_llava_weights_to_hf.py"),
    ({"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"]}, "TinyLLaVA checkpoint"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "text-only language model"),
])
def test_other_layouts_get_how_to_convert(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointError, match=expected) as info:
        load_model(str(tmp_path))
    assert "ckd-ray models compose --llm" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_config({"models": {"student": {"path": str(tmp_path)}}, "data": {"benchmark_root": "data/kvqa"},
                         "cascade": {"plan": "student_only"}})
    (problem,) = info.value.problems
    assert problem.field == "models.student.path" and expected in problem.message + problem.fix


def _pair_job(student: str, teacher: str) -> dict:
    return {"models": {"student": {"path": student}, "teacher": {"path": teacher}}, "data": {"benchmark_root": "data/kvqa"},
            "cascade": {"prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DFT"]}]}}


def test_pair_checks_accept_padded_vocabularies_and_refuse_other_images_or_tokenizers(parts, composed, tmp_path):
    student, teacher = composed["student"].uri, composed["teacher"].uri
    validate_config(_pair_job(student, teacher))  # 320 vs 384 rows over one tokenizer: compared over 320
    a, b = read_model_folder(student), read_model_folder(teacher)
    assert shared_vocab_size(a.vocab_rows, b.vocab_rows, student_fingerprint=a.tokenizer_fingerprint,
                             teacher_fingerprint=b.tokenizer_fingerprint, tokenizer_len=a.tokenizer_length) == 320

    clip_teacher = compose_model(ComposeSpec(llm=str(parts["qwen2-teacher"]), vision=str(parts["clip-full"]),
                                             out=str(tmp_path / "clip-teacher"), select_strategy="full"))
    with pytest.raises(ConfigError) as info:
        validate_config(_pair_job(student, clip_teacher.uri))
    text = str(info.value)
    assert "an image is 17 visual tokens" in text and "but 16 for" in text
    assert "image processors" in text and "crop_size, do_center_crop, family" in text

    other = save_llm(tmp_path / "other-llm", hidden=96, vocab_rows=384, corpus=[text.upper() for text in CORPUS])
    other_teacher = compose_model(ComposeSpec(llm=str(other), vision=str(parts["siglip"]), out=str(tmp_path / "other-teacher")))
    with pytest.raises(ConfigError, match="different tokenizers"):
        validate_config(_pair_job(student, other_teacher.uri))


def test_a_composed_teacher_marked_prepare_is_trained_before_it_teaches(composed):
    from ckd_ray.cascade.plan import build_plan

    raw = {"models": {"student": {"path": composed["student"].uri}, "teacher": {"path": composed["teacher"].uri}},
           "data": {"benchmark_root": "data/kvqa"}, "cascade": {"plan": "single_teacher"}}
    assert [p.kind for p in build_plan(validate_config(raw))] == ["DPT", "SFT", "DFT"]  # a folder is taken as trained
    raw["models"]["teacher"]["prepare"] = True
    assert [(p.learner, p.kind) for p in build_plan(validate_config(raw))][:2] == [("teacher", "PT"), ("teacher", "FT")]


@pytest.mark.slow
@pytest.mark.ray
def test_dpt_and_dft_on_composed_models_export_a_student_that_answers(ray_local, kvqa_dir, composed, tmp_path):
    from ckd_ray import run_cascade
    from ckd_ray.config import load_config

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "name": "composed",
        "models": {"student": {"path": composed["student"].uri}, "teacher": {"path": composed["teacher"].uri}},
        "data": {"benchmark_root": str(kvqa_dir), "max_length": 160},
        "cascade": {"prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DPT", "DFT"]}]},
        "signal": {"response_top_k": 8, "visual_top_k": 8, "gram": True},
        "teacher_pool": {"batch_size": 8, "use_cache": False},
        # No warm-up: a one-step warm-up's only update runs at lr 0.
        "trainer": {"num_workers": 1, "micro_batch_size": 4, "max_steps": 1, "report_every": 1, "warmup_ratio": 0.0},
        "evaluation": {"max_samples": 4, "latency_runs": 1, "max_new_tokens": 2},
        "storage": {"root": str(tmp_path / "runs")},
    }))
    lines: list[str] = []
    result = run_cascade(load_config(config), log=lines.append, progress=False)

    manifest = json.loads(Path(result.manifest_uri).read_text())
    assert [(s["step"], s["status"], s["metrics"]["step"]) for s in manifest["steps"].values()] == [("DPT", "done", 1), ("DFT", "done", 1)]
    assert sum("teacher pool 'teacher' streams" in line for line in lines) == 2
    # The student's own processor made the rows: its 300-token tokenizer, not the benchmark's.
    assert all(s["metrics"]["val_loss"] > 0 for s in manifest["steps"].values())
    before = load_file(Path(composed["student"].uri) / "model.safetensors")
    after = load_file(Path(result.student_uri) / "model.safetensors")
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"multi_modal_projector", "language_model"}  # DPT trains the connector, DFT the LLM; the tower stays
    _, model, _, inputs, output = answer(result.student_uri, digit_image(), max_new_tokens=3)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_the_shared_preparation_run_is_named_by_what_it_computes(composed):
    """Settings the preparation does not read (the signal, the loss, a student budget when every
    preparation step has its own) keep the `prepared-<role>-<digest>` name, so the prepared teachers are
    reused; the recipe, the data and the models change it."""
    from ckd_ray.cascade.prepared import preparation_config

    raw = {"models": {"student": {"path": composed["student"].uri}, "teacher": {"path": composed["teacher"].uri, "prepare": True}},
           "data": {"benchmark_root": "data/kvqa"}, "trainer": {"max_steps": 40},
           "cascade": {"plan": "single_teacher", "share_prepared_teachers": True,
                       "teacher_prep_steps": [{"kind": "PT", "max_steps": 5}, {"kind": "FT", "max_steps": 9}]}}
    name = preparation_config(raw, "teacher")["name"]
    assert name.startswith("prepared-teacher-")
    same = {**raw, "trainer": {"max_steps": 80}, "loss": {"temperature": 2.0}, "signal": {"response_top_k": 4},
            "cascade": {**raw["cascade"], "plan": "bottom_up", "student_alone": True}}
    assert preparation_config(same, "teacher")["name"] == name
    longer = {**raw, "cascade": {**raw["cascade"], "teacher_prep_steps": [{"kind": "PT", "max_steps": 5}, {"kind": "FT", "max_steps": 10}]}}
    other_data = {**raw, "data": {"benchmark_root": "data/kvqa", "caption_share": 0.1}}
    assert len({name, preparation_config(longer, "teacher")["name"], preparation_config(other_data, "teacher")["name"]}) == 3
    own = {**raw, "cascade": {**raw["cascade"], "role_prep_steps": {"teacher": [{"kind": "PT", "max_steps": 5}, {"kind": "FT", "max_steps": 20}]}}}
    assert validate_config(preparation_config(own, "teacher")).cascade.stages[0].steps[1].max_steps == 20
    prep = validate_config(preparation_config(raw, "teacher"))
    assert [(s.name, s.learner, [k.kind for k in s.steps]) for s in prep.cascade.stages] == [("prepare-teacher", "teacher", ["PT", "FT"])]
    assert not prep.cascade.prepare_teachers


@pytest.mark.slow
@pytest.mark.ray
# 150 s, the default run's longest: CI's second stage, whose Ray-fixture tests end well before its
# README test, so it costs that stage nothing and keeps the default run under 12 min.
@pytest.mark.stage2
def test_teachers_prepared_once_are_reused_by_a_later_job_with_the_same_recipe(ray_local, kvqa_dir, composed, tmp_path):
    from ckd_ray import run_cascade

    raw = {
        "name": "first",
        "models": {"student": {"path": composed["student"].uri}, "teacher": {"path": composed["teacher"].uri, "prepare": True}},
        "data": {"benchmark_root": str(kvqa_dir), "max_length": 160},
        "cascade": {"share_prepared_teachers": True, "stages": [{"teacher": "teacher", "steps": ["DFT"]}],
                    "teacher_prep_steps": [{"kind": "PT", "max_steps": 1}, {"kind": "FT", "max_steps": 1}]},
        "signal": {"response_top_k": 8, "visual_top_k": 8, "gram": True},
        "teacher_pool": {"batch_size": 8},
        "trainer": {"num_workers": 1, "micro_batch_size": 4, "max_steps": 1, "report_every": 1, "warmup_ratio": 0.0},
        "evaluation": {"max_samples": 4, "latency_runs": 1, "max_new_tokens": 2},
        "storage": {"root": str(tmp_path / "runs")},
    }
    first: list[str] = []
    result = run_cascade(validate_config(raw), log=first.append, progress=False)
    prep_runs = sorted((tmp_path / "runs").glob("prepared-teacher-*"))
    assert len(prep_runs) == 1 and any("preparing teacher once" in line for line in first)
    prep_manifest = json.loads((prep_runs[0] / "manifest.json").read_text())
    assert [(s["learner"], s["step"]) for s in prep_manifest["steps"].values()] == [("teacher", "PT"), ("teacher", "FT")]
    manifest = json.loads(Path(result.manifest_uri).read_text())
    assert [s["step"] for s in manifest["steps"].values()] == ["DFT"]  # no preparation steps of its own
    teacher_uri = prep_manifest["roles"]["teacher"]
    assert manifest["roles"]["teacher"] == teacher_uri and manifest["steps"]["00-s1-teacher_to_student-DFT"]["teacher_uri"] == teacher_uri
    assert manifest["evaluations"]["prepare-teacher (teacher)"]["model_uri"] == teacher_uri  # scored once, by its own run

    # Another job: another loss, student budget and signal (the packed version 2: its own pool pass,
    # cached, then trained on), the same recipe: the teacher is not trained again.
    second: list[str] = []
    again = {**raw, "name": "second", "loss": {"temperature": 2.0}, "trainer": {**raw["trainer"], "max_steps": 2},
             "signal": {**raw["signal"], "version": 2, "tail_mass": 0.05}}
    result = run_cascade(validate_config(again), log=second.append, progress=False)
    assert sorted((tmp_path / "runs").glob("prepared-teacher-*")) == prep_runs
    assert any("teacher prepared by an earlier run" in line for line in second)
    assert json.loads((prep_runs[0] / "manifest.json").read_text())["steps"] == prep_manifest["steps"]
    manifest = json.loads(Path(result.manifest_uri).read_text())
    step = manifest["steps"]["00-s1-teacher_to_student-DFT"]
    assert manifest["roles"]["teacher"] == teacher_uri and step["metrics"]["step"] == 2
    assert step["teacher_pass"]["source"] == "teacher pool" and step["teacher_pass"]["samples"] > 0
    assert all(math.isfinite(entry["loss"]) for entry in step["history"]) and math.isfinite(step["metrics"]["val_loss"])

    # `ckd-ray eval` reads the run's manifest as the run wrote it: with the prepared teacher's folder.
    from click.testing import CliRunner

    from ckd_ray.cli import main

    config = tmp_path / "second.yaml"
    config.write_text(yaml.safe_dump(again))
    scored = CliRunner().invoke(main, ["eval", str(config), "--model", "teacher"])
    assert scored.exit_code == 0, scored.output
    assert "teacher prepared by an earlier run" in scored.output and "scores: " in scored.output
