"""Evaluation sets apart from the training data (`evaluation.sources`): POPE, ScienceQA-IMG and
VQAv2 read from their published layouts (small files written here, with real images) into the
LLaVA-style records the pipeline and scorers read, locally and over S3 (moto's server); the
config of each format; and an evaluation that selects nothing refused, naming the field, before
Ray starts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from ckd_ray import storage
from ckd_ray.config import ConfigError, validate_config
from ckd_ray.config.checks import check_storage
from ckd_ray.data.eval_sets import EvaluationSetError, read_pope, read_scienceqa, read_vqav2
from ckd_ray.data.preprocess import check_record
from ckd_ray.data.sources import catalog_source, plan_reads, read_task_rows
from ckd_ray.evaluate.scoring import pope_average_f1, vqa_soft_accuracy
from ckd_ray.evaluate.sets import evaluation_sets

REPO = Path(__file__).resolve().parents[1]

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
POPE_LABELS = {"random": ["yes", "no"], "popular": ["no", "yes"], "adversarial": ["yes", "yes"]}


def _image(path: Path, color: tuple[int, int, int], kind: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buffer, kind)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def write_sets(root: Path) -> dict[str, Path]:
    """POPE, ScienceQA and VQAv2 in their published layouts under `root`, with COCO-named JPEGs
    and ScienceQA's PNGs."""
    coco = root / "coco" / "val2014"
    _image(coco / "COCO_val2014_000000000042.jpg", (200, 30, 30), "JPEG")
    _image(coco / "COCO_val2014_000000000073.jpg", (30, 200, 30), "JPEG")
    pope = root / "pope"
    pope.mkdir()
    for strategy, labels in POPE_LABELS.items():
        lines = [{"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?", "label": labels[0]},
                 {"question_id": 2, "image": "COCO_val2014_000000000073.jpg", "text": "Is there a cat in the image?", "label": labels[1]}]
        (pope / f"coco_pope_{strategy}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    scienceqa = root / "scienceqa"
    problems = {
        "1": {"question": "Which animal is a mammal?", "choices": ["frog", "dog", "snake"], "answer": 1,
              "hint": "Look at the picture.", "image": "image.png", "split": "test", "subject": "natural science"},
        "2": {"question": "What is 2 + 2?", "choices": ["3", "4"], "answer": 1, "hint": "", "image": None, "split": "test"},
        "3": {"question": "Which is a solid?", "choices": ["ice", "water"], "answer": 0, "hint": "", "image": "image.png", "split": "test"},
        "4": {"question": "Which is red?", "choices": ["sky", "apple"], "answer": 1, "hint": "", "image": "image.png", "split": "train"},
    }
    scienceqa.mkdir()
    (scienceqa / "problems.json").write_text(json.dumps(problems))
    for split, pid in (("test", "1"), ("test", "3"), ("train", "4")):
        _image(scienceqa / "images" / split / pid / "image.png", (10, 10, int(pid) * 40), "PNG")
    vqav2 = root / "vqav2"
    vqav2.mkdir()
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "Is the dog asleep?", "question_id": 42000},
        {"image_id": 73, "question": "How many cats are there?", "question_id": 73001},
    ]}
    human = {42000: ["yes"] * 8 + ["no"] * 2, 73001: ["2"] * 5 + ["two"] * 2 + ["3"] * 3}
    annotations = {"annotations": [
        {"question_id": 42000, "image_id": 42, "multiple_choice_answer": "yes", "answer_type": "yes/no",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(human[42000])]},
        {"question_id": 73001, "image_id": 73, "multiple_choice_answer": "2", "answer_type": "number",
         "answers": [{"answer": a, "answer_confidence": "maybe", "answer_id": i + 1} for i, a in enumerate(human[73001])]},
    ]}
    (vqav2 / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (vqav2 / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    return {"coco": coco, "pope": pope, "scienceqa": scienceqa, "vqav2": vqav2}


def source_specs(paths: dict[str, Path | str]) -> list[dict]:
    """`evaluation.sources` entries for the three sets under `paths` (local folders or s3:// URIs)."""
    at = {name: str(path) for name, path in paths.items()}
    return [
        {"format": "pope", "uri": at["pope"], "image_root": at["coco"]},
        {"format": "scienceqa", "uri": storage.join(at["scienceqa"], "problems.json"), "split": "test",
         "image_root": storage.join(at["scienceqa"], "images")},
        {"format": "vqav2", "uri": storage.join(at["vqav2"], "v2_OpenEnded_mscoco_val2014_questions.json"), "split": "val2014",
         "annotations": storage.join(at["vqav2"], "v2_mscoco_val2014_annotations.json"), "image_root": at["coco"]},
    ]


def job_with(sources: list[dict], tmp_path: Path, **data) -> dict:
    """A job config evaluating on `sources`, with training data of its own in `tmp_path/train`
    (checked for existence only: nothing here trains)."""
    train = tmp_path / "train"
    train.mkdir(exist_ok=True)
    (train / "instructions.json").write_text("[]")
    (train / "processor").mkdir(exist_ok=True)  # looked up, never loaded, before evaluation rows are read
    source = {"uri": str(train / "instructions.json"), "image_root": str(train)}
    return {"name": "held-out", "data": {"captions": [source], "instructions": [source], "processor": str(train / "processor"), **data},
            "evaluation": {"sources": sources}, "storage": {"root": str(tmp_path / "runs")}}


@pytest.fixture
def sets(tmp_path) -> dict[str, Path]:
    return write_sets(tmp_path)


def test_pope_files_become_yes_no_records_that_keep_their_strategy(sets):
    records = read_pope(str(sets["pope"]))
    assert [r["id"] for r in records] == ["pope-random-1", "pope-random-2", "pope-popular-1", "pope-popular-2",
                                          "pope-adversarial-1", "pope-adversarial-2"]
    assert records[1] == {
        "id": "pope-random-2", "image": "COCO_val2014_000000000073.jpg",
        "conversations": [{"from": "human", "value": f"<image>\nIs there a cat in the image?\n{SHORT}"}, {"from": "gpt", "value": "no"}],
        "question_type": "yes_no", "answer": "no", "hop": 0, "split": "test", "pope_strategy": "random",
    }
    assert [r["answer"] for r in records] == [label for labels in POPE_LABELS.values() for label in labels]
    assert [r["id"] for r in read_pope(str(sets["pope"]), "adversarial")] == ["pope-adversarial-1", "pope-adversarial-2"]
    # The strategy is what POPE's per-split F1 groups by: answering "yes" always scores 1, 2/3 and 1.
    by_strategy = {}
    for record in records:
        predictions, references = by_strategy.setdefault(record["pope_strategy"], ([], []))
        predictions.append("Yes")
        references.append(record["answer"])
    assert pope_average_f1(by_strategy) == pytest.approx({"random": 2 / 3, "popular": 2 / 3, "adversarial": 1.0, "average": 7 / 9})
    # The pipeline's own record check takes them as they are.
    checked = check_record(json.dumps(records[0]).encode())
    assert (checked.sample_id, checked.question_type, checked.answer, checked.hop) == ("pope-random-1", "yes_no", "yes", 0)


def test_scienceqa_img_keeps_the_split_s_problems_with_an_image_answered_by_letter(sets):
    problems = str(sets["scienceqa"] / "problems.json")
    records = read_scienceqa(problems, "test")
    assert [r["id"] for r in records] == ["scienceqa-1", "scienceqa-3"]  # 2 has no image, 4 is train
    assert records[0] == {
        "id": "scienceqa-1", "image": "test/1/image.png",
        "conversations": [
            {"from": "human", "value": f"<image>\nContext: Look at the picture.\nWhich animal is a mammal?\nA. frog\nB. dog\nC. snake\n{LETTER}"},
            {"from": "gpt", "value": "B"},
        ],
        "question_type": "multiple_choice", "answer": "B", "hop": 0, "split": "test",
    }
    assert records[1]["conversations"][0]["value"] == f"<image>\nWhich is a solid?\nA. ice\nB. water\n{LETTER}"  # no hint, no context
    assert records[1]["answer"] == "A"
    assert [(r["id"], r["image"], r["answer"]) for r in read_scienceqa(problems, "train")] == [("scienceqa-4", "train/4/image.png", "B")]
    with pytest.raises(EvaluationSetError) as raised:
        read_scienceqa(problems, "val")
    assert raised.value.key == "split" and raised.value.fix == "use one of the splits it has: test, train"


def test_vqav2_questions_and_annotations_become_records_with_the_ten_human_answers(sets):
    questions = str(sets["vqav2"] / "v2_OpenEnded_mscoco_val2014_questions.json")
    annotations = str(sets["vqav2"] / "v2_mscoco_val2014_annotations.json")
    records = read_vqav2(questions, annotations, "val2014")
    assert records[0] == {
        "id": "vqav2-42000", "image": "COCO_val2014_000000000042.jpg",
        "conversations": [{"from": "human", "value": f"<image>\nIs the dog asleep?\n{SHORT}"}, {"from": "gpt", "value": "yes"}],
        "question_type": "yes_no", "answer": "yes", "hop": 0, "split": "val", "answers": ["yes"] * 8 + ["no"] * 2,
    }
    assert (records[1]["id"], records[1]["image"], records[1]["question_type"], records[1]["answer"]) == (
        "vqav2-73001", "COCO_val2014_000000000073.jpg", "open", "2")
    assert records[1]["answers"] == ["2"] * 5 + ["two"] * 2 + ["3"] * 3
    # The human answers are what VQA soft accuracy needs ("two" is normalised to "2").
    assert vqa_soft_accuracy("2", records[1]["answers"]) == 1.0
    assert vqa_soft_accuracy("3", records[1]["answers"]) == pytest.approx(0.9)
    assert vqa_soft_accuracy("no", records[0]["answers"]) == pytest.approx(0.6)

    with pytest.raises(EvaluationSetError) as raised:  # the files say val2014
        read_vqav2(questions, annotations, "train2014")
    assert raised.value.key == "split" and "'val2014'" in raised.value.what and raised.value.fix.startswith("set split: val2014")
    partial = sets["vqav2"] / "partial_annotations.json"
    whole = json.loads(Path(annotations).read_text())
    partial.write_text(json.dumps({"annotations": whole["annotations"][:1]}))
    with pytest.raises(EvaluationSetError) as raised:
        read_vqav2(questions, str(partial), "val2014")
    assert raised.value.key == "annotations" and raised.value.what.startswith("1 of the 2 questions")


def test_a_config_with_each_format_validates_with_its_paths_made_absolute(sets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = source_specs({name: path.relative_to(tmp_path) for name, path in sets.items()})
    specs += [{"format": "llava", "uri": "held_out.jsonl", "image_root": "coco/val2014", "split": "test"},
              {"format": "llava", "uri": "s3://bucket/eval/held-out-parquet"}]
    config = validate_config(job_with(specs, tmp_path))
    sources = config.evaluation.sources
    assert [s.label for s in sources] == ["pope", "scienceqa-test", "vqav2-val2014", "held_out.jsonl", "held-out-parquet"]
    assert [s.llava_format for s in sources[3:]] == ["llava_json", "parquet"]
    assert sources[0].uri == str(sets["pope"]) and sources[0].image_root == str(sets["coco"])
    assert sources[2].annotations == str(sets["vqav2"] / "v2_mscoco_val2014_annotations.json")
    assert sources[4].uri == "s3://bucket/eval/held-out-parquet"  # s3:// stays as written


def test_a_source_missing_what_its_format_needs_is_named_with_the_fix(tmp_path):
    specs = [
        {"format": "scienceqa", "uri": "problems.json"},
        {"format": "vqav2", "uri": "q.json", "split": "val2014", "image_root": "coco"},
        {"format": "pope", "uri": "pope", "split": "rnadom", "image_root": "coco", "annotations": "a.json"},
        {"format": "llava", "uri": "rows.parquet", "image_root": "images"},
        {"format": "pope", "uri": "ftp://host/pope", "image_root": "coco", "name": "pope-ftp"},
    ]
    with pytest.raises(ConfigError) as raised:
        validate_config(job_with(specs, tmp_path))
    found = {p.field: str(p) for p in raised.value.problems}
    assert list(found) == [
        "evaluation.sources[0].split", "evaluation.sources[0].image_root", "evaluation.sources[1].annotations",
        "evaluation.sources[2].split", "evaluation.sources[2].annotations", "evaluation.sources[3].image_root",
        "evaluation.sources[4].uri",
    ], found
    assert "set the scienceqa split to evaluate, e.g. test" in found["evaluation.sources[0].split"]
    assert "v2_mscoco_<split>_annotations.json" in found["evaluation.sources[1].annotations"]
    assert "'rnadom' is not a pope split -> fix: use one of random, popular, adversarial" in found["evaluation.sources[2].split"]
    assert "only format vqav2 reads it -> fix: remove it" in found["evaluation.sources[2].annotations"]
    assert "read as Parquet" in found["evaluation.sources[3].image_root"]
    assert "unknown storage scheme 'ftp'" in found["evaluation.sources[4].uri"]
    # Two POPE sources without a name share the default one; an unknown format lists the known ones.
    pope = {"format": "pope", "uri": "pope", "image_root": "coco"}
    with pytest.raises(ConfigError) as raised:
        validate_config(job_with([pope, {**pope, "uri": "pope-copy"}], tmp_path))
    assert [str(p) for p in raised.value.problems] == [
        "evaluation.sources: has two sources named 'pope' -> fix: give each a distinct `name`"]
    with pytest.raises(ConfigError) as raised:
        validate_config(job_with([{**pope, "format": "vqa"}], tmp_path))
    (problem,) = raised.value.problems
    assert problem.field == "evaluation.sources.0.format" and "'llava', 'pope', 'scienceqa' or 'vqav2'" in problem.fix


def test_the_sets_are_converted_in_the_run_folder_and_read_with_their_images(sets, tmp_path):
    job = validate_config(job_with(source_specs(sets), tmp_path))
    found = evaluation_sets(job, job.run_uri, {})
    assert [(s.name, s.field, s.file_name) for s in found] == [
        ("pope", "evaluation.sources[0]", "evaluation-pope"),
        ("scienceqa-test", "evaluation.sources[1]", "evaluation-scienceqa-test"),
        ("vqav2-val2014", "evaluation.sources[2]", "evaluation-vqav2-val2014"),
    ]
    pope, scienceqa, vqav2 = (s.sources[0] for s in found)
    assert pope.uri == str(tmp_path / "runs" / "held-out" / "eval-sets" / "evaluation-pope.jsonl")
    converted = [json.loads(line) for line in Path(vqav2.uri).read_text().splitlines()]
    spec = job.evaluation.sources[2]
    assert converted == read_vqav2(spec.uri, spec.annotations, "val2014")
    # The pipeline's read path finds every record's image under the set's image root.
    for source, images in ((pope, sets["coco"]), (scienceqa, sets["scienceqa"] / "images")):
        plan = plan_reads([catalog_source(source)], hops=None, mix=False, seed=0, records_per_task=64)
        read = read_task_rows(plan.tasks[0]).to_pydict()
        names = [json.loads(raw)["image"] for raw in read["record"]]
        assert read["read_error"] == [""] * len(names) and len(names) == {"pope": 6, "scienceqa-test": 2}[source.name]
        assert read["image"] == [(images / name).read_bytes() for name in names]
    # Rows (as preprocessing makes them) get their set's name and their scorer's fields back.
    rows = found[2].label_rows([{"sample_id": "vqav2-73001", "answer": "2"}])
    assert rows == [{"sample_id": "vqav2-73001", "answer": "2", "eval_set": "vqav2-val2014",
                     "answers": ["2"] * 5 + ["two"] * 2 + ["3"] * 3}]
    assert found[0].label_rows([{"sample_id": "pope-popular-2"}]) == [
        {"sample_id": "pope-popular-2", "eval_set": "pope", "pope_strategy": "popular"}]


def test_an_evaluation_that_selects_nothing_is_refused_before_ray_starts(sets, tmp_path, monkeypatch):
    from ckd_ray.cascade import runner, session

    unlabeled = tmp_path / "llava_instruct.json"  # LLaVA-1.5 instruction records carry no `split`
    unlabeled.write_text(json.dumps([{"id": "a", "image": "COCO_val2014_000000000042.jpg",
                                      "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]}]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (sets["pope"] / "coco_pope_popular.json").write_text("")
    specs = [
        {"format": "llava", "uri": str(unlabeled), "image_root": str(sets["coco"]), "split": "test"},
        {"format": "llava", "uri": str(empty), "image_root": str(sets["coco"])},
        {**source_specs(sets)[1], "split": "val"},
        source_specs(sets)[0],
    ]
    job = validate_config(job_with(specs, tmp_path))
    with pytest.raises(ConfigError) as raised:
        evaluation_sets(job, job.run_uri, {})
    found = {p.field: p for p in raised.value.problems}
    assert list(found) == ["evaluation.sources[0].split", "evaluation.sources[1].uri", "evaluation.sources[2].split",
                           "evaluation.sources[3].uri"]
    assert found["evaluation.sources[0].split"].message == f"no record of {unlabeled} has split 'test'"
    assert found["evaluation.sources[0].split"].fix.endswith("has none): remove split to evaluate every record")
    assert found["evaluation.sources[1].uri"].message == f"{empty} holds no records"
    assert found["evaluation.sources[2].split"].fix == "use one of the splits it has: test, train"
    assert found["evaluation.sources[3].uri"].message == f"{sets['pope'] / 'coco_pope_popular.json'} holds no questions"

    # Without evaluation.sources: the instruction data's evaluation.split, here one no record has
    # (the training reads split train, so the config alone cannot tell).
    raw = job_with([], tmp_path, captions=[{"uri": str(unlabeled), "image_root": str(sets["coco"])}],
                   instructions=[{"uri": str(unlabeled), "image_root": str(sets["coco"]), "split": "train"}])
    job = validate_config(raw)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the evaluation was checked")

    monkeypatch.setattr(session, "connect_ray", no_ray)
    with pytest.raises(ConfigError) as raised:
        runner.run_cascade(job, log=lambda line: None, progress=False)
    (problem,) = raised.value.problems
    assert problem.field == "evaluation.split"
    assert problem.message == f"no record of the instruction source 'llava_instruct.json' ({unlabeled}) has split 'test'"
    assert "list evaluation.sources" in problem.fix


def test_config_check_refuses_an_evaluation_of_a_split_the_training_data_cannot_hold_apart(tmp_path):
    """No evaluation.sources while the job trains on every record of its instruction sources: the
    held-out split is empty (LLaVA-1.5 records have no split key) or the training data itself."""
    from click.testing import CliRunner

    from ckd_ray.cli import main

    raw = job_with([], tmp_path)
    with pytest.raises(ConfigError) as raised:
        validate_config(raw)
    (problem,) = raised.value.problems
    assert problem.field == "evaluation.sources"
    assert "split 'test' would be scored" in problem.message and "no `split` on any source" in problem.message
    assert "evaluation.sources" in problem.fix and "split: train" in problem.fix
    # Either fix is accepted: a split on the training source, or sets apart from it.
    train_source = {**raw["data"]["instructions"][0], "split": "train"}
    validate_config({**raw, "data": {**raw["data"], "instructions": [train_source]}})
    validate_config(job_with([{"format": "llava", "uri": str(tmp_path / "train" / "instructions.json"),
                               "image_root": str(tmp_path / "train")}], tmp_path))

    # The paper config with its evaluation sets removed, through the command a user runs.
    result = CliRunner().invoke(main, ["config", "check", str(REPO / "configs" / "llava_ckd_0.5b.yaml"),
                                       "--set", "evaluation.sources=[]"])
    assert result.exit_code == 2, result.output
    assert "evaluation.sources: is empty" in result.output
    ok = CliRunner().invoke(main, ["config", "check", str(REPO / "configs" / "llava_ckd_0.5b.yaml")])
    assert ok.exit_code == 0 and ok.output.startswith("OK"), ok.output


def test_ckd_ray_eval_prints_the_problem_and_exits_2_before_ray_starts(sets, tmp_path, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from ckd_ray.cascade import session
    from ckd_ray.cli import main

    monkeypatch.setattr(session, "connect_ray", lambda *args, **kwargs: pytest.fail("Ray was started"))
    config = tmp_path / "held_out.yaml"
    config.write_text(yaml.safe_dump(job_with([{**source_specs(sets)[1], "split": "val"}], tmp_path)))
    result = CliRunner().invoke(main, ["eval", str(config)])
    assert result.exit_code == 2, result.output
    assert ("evaluation.sources[0].split: no problem with an image has split 'val' in "
            f"{sets['scienceqa'] / 'problems.json'} -> fix: use one of the splits it has: test, train") in result.output


def test_missing_files_of_a_source_are_named_before_anything_starts(sets, tmp_path):
    (sets["pope"] / "coco_pope_adversarial.json").unlink()
    specs = source_specs(sets)
    specs[2]["annotations"] = str(tmp_path / "nowhere.json")
    found = {p.field: str(p) for p in check_storage(validate_config(job_with(specs, tmp_path)))}
    assert found == {
        "evaluation.sources[0].uri": f"evaluation.sources[0].uri: {sets['pope'] / 'coco_pope_adversarial.json'} does not exist "
                                     "-> fix: put POPE's coco_pope_adversarial.json in that folder, or set split: to a strategy you have",
        "evaluation.sources[2].annotations": f"evaluation.sources[2].annotations: {tmp_path / 'nowhere.json'} does not exist "
                                             "-> fix: fix the path or URI",
    }
    specs[0]["split"] = "random"  # the one strategy there
    specs[2]["annotations"] = str(sets["vqav2"] / "v2_mscoco_val2014_annotations.json")
    assert check_storage(validate_config(job_with(specs, tmp_path))) == []


def test_the_sets_are_read_from_s3_with_their_images(sets, s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/eval"
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(root, str(path.relative_to(tmp_path))), path.read_bytes())
    at = {"coco": f"{root}/coco/val2014", "pope": f"{root}/pope", "scienceqa": f"{root}/scienceqa", "vqav2": f"{root}/vqav2"}
    assert read_pope(at["pope"]) == read_pope(str(sets["pope"]))
    raw = job_with(source_specs(at), tmp_path)
    raw["storage"]["root"] = f"s3://{s3_bucket}/runs"
    job = validate_config(raw)
    assert check_storage(job) == []
    found = evaluation_sets(job, job.run_uri, {})
    assert [s.sources[0].uri for s in found] == [f"s3://{s3_bucket}/runs/held-out/eval-sets/evaluation-{name}.jsonl"
                                                for name in ("pope", "scienceqa-test", "vqav2-val2014")]
    local = evaluation_sets(validate_config(job_with(source_specs(sets), tmp_path)), str(tmp_path / "local-run"), {})
    for on_s3, here in zip(found, local):  # the same records, whichever storage they came from
        assert storage.read_bytes(on_s3.sources[0].uri) == Path(here.sources[0].uri).read_bytes()
    vqav2 = found[2].sources[0]
    plan = plan_reads([catalog_source(vqav2)], hops=None, mix=False, seed=0, records_per_task=64)
    read = read_task_rows(plan.tasks[0]).to_pydict()
    assert read["read_error"] == ["", ""]
    assert read["image"] == [(sets["coco"] / f"COCO_val2014_{i:012d}.jpg").read_bytes() for i in (42, 73)]
    assert found[2].label_rows([{"sample_id": "vqav2-42000"}])[0]["answers"] == ["yes"] * 8 + ["no"] * 2


@pytest.mark.ray
def test_evaluation_rows_hold_each_set_with_what_its_scorer_needs(kvqa_dir, tmp_path):
    from ckd_ray.cascade.datasets import StepData

    paths = write_sets(tmp_path / "sets")
    job = validate_config({"name": "held-out", "data": {"benchmark_root": str(kvqa_dir)},
                           "evaluation": {"sources": source_specs(paths)}, "storage": {"root": str(tmp_path / "runs")}})
    rows = StepData(job, job.run_uri).evaluation_rows()
    found = sorted((row["eval_set"], str(row["sample_id"]), str(row["question_type"]), str(row["answer"])) for row in rows)
    assert found == sorted(
        [("pope", f"pope-{strategy}-{i + 1}", "yes_no", label) for strategy, labels in POPE_LABELS.items() for i, label in enumerate(labels)]
        + [("scienceqa-test", "scienceqa-1", "multiple_choice", "B"), ("scienceqa-test", "scienceqa-3", "multiple_choice", "A"),
           ("vqav2-val2014", "vqav2-42000", "yes_no", "yes"), ("vqav2-val2014", "vqav2-73001", "open", "2")])
    extras = {str(row["sample_id"]): {k: row[k] for k in ("pope_strategy", "answers") if k in row} for row in rows}
    assert extras["pope-popular-2"] == {"pope_strategy": "popular"} and extras["scienceqa-3"] == {}
    assert extras["vqav2-42000"] == {"answers": ["yes"] * 8 + ["no"] * 2}
    assert all(row["pixel_values"].any() and row["num_visual"] > 0 for row in rows)  # every image was read
    # Without evaluation.sources, the benchmark's test split as before: one set, no set name on its rows.
    (default,) = evaluation_sets(validate_config({"name": "kvqa", "data": {"benchmark_root": str(kvqa_dir)}}), str(tmp_path / "kvqa"), {})
    assert (default.name, default.field, [s.split for s in default.sources]) == (None, "evaluation.split", ["test"])
    assert default.label_rows(rows[:1]) == rows[:1]
