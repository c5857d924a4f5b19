"""Bad configs: wrong types, unknown keys, impossible values, broken files and overrides, inputs
that do not exist, S3 buckets that do not exist or refuse the credentials. Each is the project's
ConfigError naming the field and the fix, before anything starts; through the CLI too (exit code
2, the problems on stderr, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ckd_ray import storage
from ckd_ray.cli import main
from ckd_ray.config import ConfigError, load_config, validate_config
from ckd_ray.config.checks import check_storage
from ckd_ray.config.loader import apply_override, read_yaml

REPO = Path(__file__).resolve().parents[2]


def job(**sections) -> dict:
    raw = {"name": "bad", "data": {"benchmark_root": "data/kvqa"}}
    raw.update(sections)
    return raw


def problems_of(raw: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as raised:
        validate_config(raw)
    return {p.field: str(p) for p in raised.value.problems}


def test_wrong_types_unknown_keys_and_impossible_values_are_listed_together():
    found = problems_of(job(
        trainer={"num_workers": "two", "use_gpu": "yes", "zero_stage": True, "micro_batch_size": 4.5, "lr": {"XYZ": 1e-3}},
        loss={"weights": {"task": -1.0, "output": "big"}, "temperature": 0, "kl_direction": "sideways"},
        teacher_pool={"min_actorz": 1},
        data={"benchmark_root": "data/kvqa", "max_reject_fraction": 2, "over_length": "drop", "shuffle_seed": [1]},
        storage={"root": 5},
        tokenizer={},
    ))
    expected = {
        "trainer.num_workers": "fix: give a int",
        "trainer.use_gpu": "expected true or false, got 'yes'",
        "trainer.zero_stage": "expected a number, got True",
        "trainer.micro_batch_size": "fractional part",
        "trainer.lr.XYZ.[key]": "use one of",
        "loss.weights.task": "give a value greater than or equal to 0",
        "loss.weights.output": "give a float",
        "loss.temperature": "give a value greater than 0",
        "loss.kl_direction": "use one of 'forward' or 'reverse'",
        "teacher_pool.min_actorz": "did you mean `min_actors`?",
        "data.max_reject_fraction": "give a value less than or equal to 1",
        "data.over_length": "use one of 'truncate' or 'reject'",
        "data.shuffle_seed": "give a int",
        "storage.root": "input should be a valid string (got 5)",
        "tokenizer": "unknown key",
    }
    for field, text in expected.items():
        assert field in found, (field, sorted(found))
        assert text in found[field], (field, found[field])
    assert len(found) == len(expected)


def test_temperature_zero_and_negative_weights_in_stage_and_step_overrides():
    found = problems_of(job(cascade={"stages": [{"teacher": "teacher", "steps": [
        {"kind": "DFT", "loss": {"temperature": 0.0, "weights": {"visual_kl": -0.5}}}]}]},
        models={"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"}}))
    assert any(f.endswith("loss.temperature") and "greater than 0" in t for f, t in found.items()), found
    assert any(f.endswith("loss.weights.visual_kl") and "greater than or equal to 0" in t for f, t in found.items()), found


@pytest.mark.parametrize("raw, field, text", [
    ({1: "x", "data": {"benchmark_root": "d"}}, "1", "unknown key"),
    ({"data": {"benchmark_root": "d", 3: 4}}, "data.3", "keys should be strings"),
    ({"data": None}, "data", "valid dictionary"),
    ({"data": [1, 2]}, "data", "valid dictionary"),
    ({"data": {"benchmark_root": "d"}, "models": {"student": 5}}, "models.student", "valid dictionary"),
    ({"data": {"benchmark_root": "d"}, "models": {"student": {"preset": "tiny-student", "path": "/m"}}}, "models.student",
     "set exactly one of `preset`"),
    ({}, "data", "required section is missing"),
    # a top-level scalar: refused by the job model's own validators (found by the fuzz test)
    ({"data": {"benchmark_root": "d"}, "models": {"student": {"preset": "tiny-student"}}, "seed": True}, "seed",
     "expected a number, got True"),
])
def test_malformed_trees_are_config_errors(raw, field, text):
    found = problems_of(raw)
    assert field in found and text in found[field], found


def test_a_top_level_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="top level is a list, not a mapping"):
        validate_config([{"data": {}}])


@pytest.mark.parametrize("assignment, text", [
    ("cascade.stages.x.teacher=ta", "no list item 'x'"),
    ("cascade.stages.5.teacher=ta", "use an index below 1"),
    ("cascade.stages.x=1", "no list item 'x'"),
    ("cascade.stages.9=1", "use an index below 1"),
    ("name.sub=1", "is a value, not a section"),
    ("trainer.lr={DPT: [1", "is not valid YAML"),
    ("no-equals-sign", "not of the form key=value"),
])
def test_bad_set_overrides_are_config_errors(assignment, text):
    raw = job(cascade={"stages": [{"teacher": "ta", "steps": ["DFT"]}]})
    with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("{", r"\{")):
        apply_override(raw, assignment)


def test_broken_yaml_files_are_config_errors(tmp_path):
    cases = {
        "not-utf8.yaml": b"name: \xff\xfe\n",
        "bad-syntax.yaml": b"name: [unclosed\n",
        "a-list.yaml": b"- 1\n- 2\n",
        "extends-number.yaml": b"extends: 5\n",
        "self-extends.yaml": b"extends: self-extends.yaml\nname: x\n",
        "deep.yaml": b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    }
    messages = {}
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(ConfigError) as raised:
            read_yaml(tmp_path / name)
        messages[name] = str(raised.value)
    assert "not UTF-8 text (byte 6) -> fix: save the file as UTF-8" in messages["not-utf8.yaml"]
    assert "not valid YAML" in messages["bad-syntax.yaml"]
    assert "top level is not a mapping" in messages["a-list.yaml"]
    assert "must be a file name, got 5" in messages["extends-number.yaml"]
    assert "forms a cycle" in messages["self-extends.yaml"] and "remove one of the `extends:` lines" in messages["self-extends.yaml"]
    assert "nested too deeply" in messages["deep.yaml"] or "not valid YAML" in messages["deep.yaml"]
    with pytest.raises(ConfigError, match="is a folder"):
        read_yaml(tmp_path)


def test_a_model_folder_with_broken_json_is_named(tmp_path):
    broken, odd = tmp_path / "broken", tmp_path / "odd"
    broken.mkdir()
    odd.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "tokenizer.json").write_text("[1, 2")
    (odd / "config.json").write_text('{"text_config": [1]}')
    (odd / "tokenizer.json").write_text('{"model": [], "added_tokens": [5]}')
    for folder, fix in ((broken, "from the model's source"), (odd, "ckd-ray models compose")):
        raw = job(models={"student": {"preset": "tiny-student"}, "teacher": {"path": str(folder)}},
                  cascade={"stages": [{"teacher": "teacher", "steps": ["DFT"]}]})
        found = problems_of(raw)
        assert list(found) == ["models.teacher.path"], found
        assert fix in found["models.teacher.path"], found


# --- inputs that do not exist and S3 that does not answer (check_storage) ---------------------


def test_missing_local_inputs_are_named_before_anything_starts(tmp_path, kvqa_dir):
    config = validate_config(job(
        data={"benchmark_root": str(tmp_path / "no-benchmark"), "processor": str(tmp_path / "no-processor")},
        models={"student": {"path": str(tmp_path / "no-student")}},
        storage={"root": str(kvqa_dir / "summary.json")},  # a file where a folder must be
    ))
    found = {p.field: str(p) for p in check_storage(config)}
    assert f"{tmp_path / 'no-benchmark'} does not exist" in found["data.benchmark_root"]
    assert "ckd-ray data build-kvqa" in found["data.benchmark_root"]
    assert "no-processor does not exist" in found["data.processor"]
    assert "no-student does not exist -> fix: fix the path or URI of the model folder" in found["models.student.path"]
    assert "is a file, not a folder" in found["storage.root"]
    assert check_storage(validate_config(job(data={"benchmark_root": str(kvqa_dir)}, storage={"root": str(tmp_path / "new")}))) == []

    source = {"uri": str(tmp_path / "none.json"), "image_root": str(tmp_path / "no-images"), "split": "train"}
    config = validate_config(job(data={"captions": [source], "instructions": [source]}))
    fields = sorted(p.field for p in check_storage(config))
    assert fields == ["data.captions[0].image_root", "data.captions[0].uri", "data.instructions[0].image_root",
                      "data.instructions[0].uri"]


def test_an_s3_bucket_that_does_not_exist(s3_bucket, kvqa_dir):
    storage.write_bytes(f"s3://{s3_bucket}/in/instructions.json", b"[]")
    config = validate_config(job(
        data={"benchmark_root": str(kvqa_dir), "instructions": [{"uri": f"s3://{s3_bucket}/in/none.json", "image_root": f"s3://{s3_bucket}/in",
                                                                 "split": "train"}]},
        storage={"root": "s3://ckd-no-such-bucket/runs", "signal_cache": "s3://ckd-no-such-bucket/cache"},
    ))
    found = {p.field: str(p) for p in check_storage(config)}
    assert found == {
        "data.instructions[0].uri": f"data.instructions[0].uri: nothing at s3://{s3_bucket}/in/none.json -> fix: fix the path or URI",
        "storage.root": "storage.root: S3 bucket 'ckd-no-such-bucket' does not exist -> fix: create the bucket, or fix the bucket name",
        "storage.signal_cache": "storage.signal_cache: S3 bucket 'ckd-no-such-bucket' does not exist -> fix: create the bucket, "
                                "or fix the bucket name",
    }


def test_wrong_s3_credentials_are_named_without_showing_them(authenticated_s3, use_s3_env, kvqa_dir, secret_access_key):
    secret = secret_access_key
    config = validate_config(job(data={"benchmark_root": str(kvqa_dir)}, storage={"root": f"s3://{authenticated_s3.bucket}/runs"}))
    use_s3_env(authenticated_s3.env())
    assert check_storage(config) == []  # the right key
    cases = {"wrong secret": authenticated_s3.env(secret_access_key=secret),
             "unknown key id": authenticated_s3.env(access_key_id="AKIARELIABILITYTEST", secret_access_key=secret)}
    for case, env in cases.items():
        use_s3_env(env)
        (problem,) = check_storage(config)
        text = str(problem)
        assert problem.field == "storage.root", case
        assert "S3 refused the credentials from the environment" in text and "AWS_SECRET_ACCESS_KEY" in text, case
        assert secret not in text and env["AWS_ACCESS_KEY_ID"] not in text, case
    use_s3_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})  # nothing listens on port 9
    (problem,) = check_storage(config)
    assert "S3 is not reachable at http://127.0.0.1:9" in str(problem) and "check AWS_ENDPOINT_URL" in str(problem)


def test_credentials_in_a_uri_are_refused_and_not_repeated(secret_access_key):
    SECRET_ACCESS_KEY = secret_access_key  # noqa: N806
    found = problems_of(job(storage={"root": f"s3://AKIAEXAMPLE:{SECRET_ACCESS_KEY}@bucket/runs"},
                            data={"benchmark_root": f"https://user:{SECRET_ACCESS_KEY}@host/kvqa"}))
    assert "carries credentials" in found["storage.root"] and "AWS_SECRET_ACCESS_KEY" in found["storage.root"]
    assert "unknown storage scheme 'https'" in found["data.benchmark_root"]
    assert all(SECRET_ACCESS_KEY not in text and "AKIAEXAMPLE" not in text for text in found.values()), found
    assert storage.redact(f"copy s3://k:{SECRET_ACCESS_KEY}@b/x and http://u@h/y") == "copy s3://***@b/x and http://***@h/y"


# --- through the CLI ---------------------------------------------------------------------------


def test_cli_config_check_lists_every_problem_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job(trainer={"num_workers": True}, loss={"temperature": 0, "weights": {"task": -1}},
                                       cascade={"stages": [{"steps": ["SFT"]}]})))
    result = CliRunner().invoke(main, ["config", "check", str(path), "--set", "cascade.stages.3.teacher=x", "--set", "seed=1"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    # Overrides apply before validation: a broken one is the whole message.
    assert "1 problem in config:\n  - cascade.stages.3: no list item '3' -> fix: use an index below 1" in result.output
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 2 and "3 problems in" in result.output
    for field in ("trainer.num_workers", "loss.temperature", "loss.weights.task"):
        assert field in result.output


def test_cli_cascade_stops_on_missing_storage_before_ray_starts(tmp_path, s3_server, monkeypatch):
    import ckd_ray.cascade.session as session

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a job whose storage is missing")

    monkeypatch.setattr(session, "connect_ray", no_ray)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(data={"benchmark_root": str(tmp_path / "absent")}, storage={"root": "s3://ckd-absent/runs"})))
    for command in (["cascade", str(path)], ["tune", str(path)], ["eval", str(path)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (command, result.output)
        assert "2 problems in the data and storage of" in result.output, command
        assert "data.benchmark_root:" in result.output and "storage.root: S3 bucket 'ckd-absent' does not exist" in result.output

    from ckd_ray.cascade.runner import run_cascade

    with pytest.raises(ConfigError, match="S3 bucket 'ckd-absent' does not exist"):
        run_cascade(load_config(path))  # the Python entry checks too, before Ray


def test_ckd_ray_process_prints_problems_not_a_traceback(tmp_path):
    """The installed entry point, as a user runs it: a process, stderr, exit code."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job(loss={"temperature": 0}, trainer={"zero_stage": "two"})))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", "from ckd_ray.cli import main; main()", "config", "check", str(path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "2 problems in" in done.stderr
    assert "loss.temperature: input should be greater than 0 (got 0) -> fix: give a value greater than 0" in done.stderr


def test_a_submitted_job_may_not_write_into_its_uploaded_working_dir(tmp_path, monkeypatch):
    """Inside `ray job submit --working-dir .` the command runs in Ray's copy of the folder: a
    relative storage.root resolves into it and would be deleted with the job."""
    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}')
    config = validate_config(job(storage={"root": "runs", "signal_cache": str(tmp_path / "shared-cache")}))
    found = {p.field: str(p) for p in check_storage(config)}
    assert sorted(found) == ["data.benchmark_root", "storage.root"], found
    assert f"{copy}/data/kvqa does not exist" in found["data.benchmark_root"]
    assert "leaves out the runtime_env's excludes" in found["data.benchmark_root"]
    assert f"{copy}/runs is inside this submitted job's copy of its working directory" in found["storage.root"]
    assert "--set storage.root=s3://bucket/runs" in found["storage.root"]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # the same config run by hand: only the data is missing
    assert [p.field for p in check_storage(config)] == ["data.benchmark_root"]
