"""Property tests: whatever the input, the LLaVA-record checker, the JSON scanner, preprocessing
and the config loader return a result or raise the project's own error (RecordRejected,
JsonLayoutError, ConfigError), never another exception. Examples are few (the suite runs in
seconds); every failure hypothesis finds is replayed from its database on the next run."""

from __future__ import annotations

import io
import json
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ckd_ray.config import ConfigError, JobConfig, validate_config
from ckd_ray.config.loader import apply_override, read_yaml
from ckd_ray.data.llava_json import JsonLayoutError, iter_json_records
from ckd_ray.data.preprocess import CheckedRecord, InputLimits, RecordRejected, check_record, preprocess_rows
from ckd_ray.data.processor import Processor

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=30)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
texts = st.sampled_from(["<image>\nWhich digit?", "Which digit?", "<image>", "", " ", "7", "<image><image>", "\udc80", "é 中 🙂"]) | st.text(max_size=40)
turns = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "robot"]) | json_values, "value": texts | json_values})
records = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=10) | st.integers() | json_values,
        "image": st.just("00000.png") | json_values,
        "conversations": st.lists(turns | json_values, max_size=4) | json_values,
        "hop": st.integers(-2, 200) | json_values,
        "question_type": st.sampled_from(["open", "yes_no"]) | json_values,
        "answer": st.text(max_size=5) | json_values,
        "facts": st.lists(st.fixed_dictionaries({"text": texts | json_values, "supporting": json_values}) | json_values, max_size=3) | json_values,
        "split": st.sampled_from(["train", "val", "test"]) | json_values,
    },
)


def encode(record) -> bytes:
    return json.dumps(record, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(records)
def test_record_checker_accepts_or_rejects_any_record(record):
    try:
        checked = check_record(encode(record))
    except RecordRejected as err:
        assert err.reason in {"malformed-json", "malformed-record", "no-response", "image-placeholders", "non-utf8"}
        assert err.detail
        return
    assert isinstance(checked, CheckedRecord)
    assert any(t["from"] == "gpt" and t["value"].strip() for t in checked.conversations)


@FUZZ
@given(st.binary(max_size=200) | st.builds(lambda r, cut: encode(r)[:cut], records, st.integers(0, 200)))
def test_record_checker_accepts_or_rejects_any_bytes(raw):
    try:
        check_record(raw)
    except RecordRejected as err:
        assert err.reason and err.detail


@FUZZ
@given(st.lists(records | json_values, max_size=6), st.sampled_from(["list", "lines"]), st.integers(0, 400), st.integers(1, 64))
def test_json_scanner_yields_every_element_or_names_the_layout(elements, layout, cut, chunk_bytes):
    body = encode(elements) if layout == "list" else b"\n".join(encode(e) for e in elements)
    data = body[: max(cut, len(body) // 2)] if cut < len(body) else body  # sometimes cut short
    try:
        found = list(iter_json_records(io.BytesIO(data), chunk_bytes=chunk_bytes))
    except JsonLayoutError as err:
        assert "input" in str(err)
        return
    for record in found:
        assert data[record.start : record.end] == record.raw
    if data == body and layout == "list":
        assert len(found) == len(elements)


@pytest.fixture(scope="module")
def processor(kvqa_dir):
    return Processor.load(kvqa_dir / "processor", num_image_tokens=16)


@pytest.fixture(scope="module")
def png(kvqa_dir):
    return (kvqa_dir / "images" / "00000.png").read_bytes()


@FUZZ
@given(st.lists(records, min_size=1, max_size=6), st.lists(st.sampled_from(["png", "none", "junk", "cut"]), min_size=6, max_size=6),
       st.integers(24, 96), st.sampled_from(["truncate", "reject"]))
def test_preprocessing_accounts_for_every_row(processor, png, batch, images, max_length, over_length):
    """Each row becomes a sample or a reject, never both, never neither, and nothing raises."""
    image_bytes = {"png": png, "none": None, "junk": b"not an image", "cut": png[:50]}
    rows = {
        "source": np.array(["fuzz"] * len(batch), dtype=object),
        "ordinal": np.arange(len(batch)),
        "record": np.array([encode(r) for r in batch], dtype=object),
        "image": np.array([image_bytes[images[k]] for k in range(len(batch))], dtype=object),
        "read_error": np.array([""] * len(batch), dtype=object),
    }
    samples, rejects, _ = preprocess_rows(rows, processor, InputLimits(max_length=max_length, over_length=over_length))
    num_samples = 0 if samples is None else len(samples["input_ids"])
    assert num_samples + len(rejects) == len(batch)
    assert len({r.ordinal for r in rejects}) == len(rejects)
    if samples is not None:
        assert samples["input_ids"].shape == (num_samples, max_length)
        assert samples["response_mask"].any(axis=1).all()  # every sample has something to learn


def _dotted_fields(model: type[BaseModel], prefix: str = "", depth: int = 3) -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested and depth > 1:
            paths += _dotted_fields(nested[0], f"{path}.", depth - 1)
    return paths


FIELD_PATHS = _dotted_fields(JobConfig) + ["models.student.path", "models.teacher.preset", "cascade.stages.0.teacher",
                                           "loss.weights.alpha", "nonsense", "data.captions.0.uri", "tune.space.temperature.low"]
BASE = {"name": "fuzz", "data": {"benchmark_root": "data/kvqa"},
        "models": {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"}},
        "cascade": {"stages": [{"teacher": "teacher", "steps": ["SFT", "DFT"]}]}}


def _set(raw: dict, path: str, value) -> None:
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else {}
        else:
            child = node.get(part)
            node[part] = child if isinstance(child, (dict, list)) else {}
            node = node[part]
    if isinstance(node, dict):
        node[parts[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELD_PATHS), json_values), max_size=5),
       st.dictionaries(json_values.filter(lambda k: not isinstance(k, (list, dict))), json_values, max_size=2))
def test_config_loader_gives_a_config_or_config_error(changes, junk):
    raw = json.loads(json.dumps(BASE))
    for path, value in changes:
        _set(raw, path, value)
    raw.update(junk)
    try:
        config = validate_config(raw)
    except ConfigError as err:
        assert err.problems and all(p.field is not None and p.message for p in err.problems)
        return
    assert isinstance(config, JobConfig)


@FUZZ
@given(st.lists(st.builds(lambda path, value: f"{path}={value}", st.sampled_from(FIELD_PATHS + ["cascade.stages.7", "a..b", ""]),
                          st.text(max_size=20) | st.sampled_from(["[1, 2", "{a: ", "null", "true", "- x", "0", "!!python/object:os.system ls"])),
                max_size=4))
def test_set_overrides_give_a_config_or_config_error(assignments):
    raw = json.loads(json.dumps(BASE))
    try:
        for assignment in assignments:
            apply_override(raw, assignment)
        validate_config(raw)
    except ConfigError as err:
        assert err.problems


@FUZZ
@given(st.text(max_size=200) | st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True), json_values) | st.binary(max_size=100))
def test_any_yaml_file_reads_as_a_mapping_or_config_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "job.yaml")
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        try:
            data = read_yaml(path)
        except ConfigError as err:
            assert err.problems
            return
        assert isinstance(data, dict)
        try:
            validate_config(data)
        except ConfigError:
            pass
