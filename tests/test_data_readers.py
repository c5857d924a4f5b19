"""Readers: the streaming JSON scan, the same model inputs from a local folder, Parquet, and s3://
on moto's server (JSON + zip, Parquet), bad records in the rejects file with their reasons, the
reject threshold, curriculum filters, mixing ratios, the deterministic shuffle and config validation."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from ckd_ray import storage
from ckd_ray.data.config import DataConfig, SourceConfig
from ckd_ray.data.llava_json import iter_json_records
from ckd_ray.data.llava_parquet import record_to_row, row_to_record
from ckd_ray.data.parquet_export import write_llava_parquet
from ckd_ray.data.pipeline import PROGRESSIVE_CURRICULUM, iter_plain_batches, plan_pass
from ckd_ray.data.processor import Processor
from ckd_ray.data.rejects import TooManyRejectsError
from ckd_ray.data.sources import catalog_source, plan_reads


@pytest.fixture(scope="module")
def processor(kvqa_dir):
    return Processor.load(kvqa_dir / "processor", num_image_tokens=16)


@pytest.fixture(scope="module")
def parquet_dir(kvqa_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("parquet")
    export = write_llava_parquet(str(kvqa_dir / "instructions.json"), str(kvqa_dir / "images"), str(out), rows_per_group=512)
    assert export.num_rejected == 0 and export.num_rows == 13911
    return out


def config_for(kvqa_dir, **fields) -> DataConfig:
    return DataConfig(benchmark_root=str(kvqa_dir), **fields)


def collect(batches) -> dict[str, np.ndarray]:
    batches = list(batches)
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def test_json_scan_finds_every_record_whatever_the_chunking():
    records = [{"id": "a", "s": 'x\\"]},[', "n": [1, {"c": "}"}]}, {"id": "b", "s": "café 中 🙂"}, {"id": "c"}]
    for indent in (None, 2):
        text = json.dumps(records, indent=indent, ensure_ascii=False).encode()
        for chunk_bytes in (1, 2, 3, 7, 64, 1 << 20):
            found = list(iter_json_records(io.BytesIO(text), chunk_bytes=chunk_bytes))
            assert [r.value for r in found] == records
            assert all(text[r.start : r.end] == r.raw for r in found)
    # Malformed elements are delimited and yielded with value None, not fatal.
    bad = b'[{"id": "a"}, {"id": "b",}, 7, {"id": "c" "x"}, {"id": "d", "t": "\xff"}, {"id": "e"}]'
    for chunk_bytes in (1, 5, 1 << 20):
        found = list(iter_json_records(io.BytesIO(bad), chunk_bytes=chunk_bytes))
        assert [r.value is not None for r in found] == [True, False, False, False, False, True]
        assert [bad[r.start : r.end] for r in found] == [r.raw for r in found]
    lines = b'{"id": "a"}\n\n{"id": "b", "cut\n{"id": "c"}\n'
    assert [r.value for r in iter_json_records(io.BytesIO(lines), chunk_bytes=4)] == [{"id": "a"}, None, {"id": "c"}]
    with pytest.raises(ValueError, match="not closed"):
        list(iter_json_records(io.BytesIO(b'[{"id": "a"}, {"id": "b')))


def test_same_model_inputs_from_folder_parquet_and_s3(kvqa_dir, parquet_dir, processor, s3_bucket, tmp_path):
    zip_path = tmp_path / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for png in sorted((kvqa_dir / "images").glob("*.png")):
            archive.write(png, png.name)
    s3 = f"s3://{s3_bucket}/kvqa"
    storage.write_bytes(f"{s3}/instructions.json", (kvqa_dir / "instructions.json").read_bytes())
    storage.write_bytes(f"{s3}/images.zip", zip_path.read_bytes())
    storage.upload_dir(parquet_dir, f"{s3}/parquet")
    storage.upload_dir(kvqa_dir / "processor", f"{s3}/processor")

    json_uri = str(kvqa_dir / "instructions.json")
    variants = {
        "folder": SourceConfig(uri=json_uri, image_root=str(kvqa_dir / "images"), split="val"),
        "parquet": SourceConfig(uri=str(parquet_dir), format="parquet", split="val"),
        "s3-json-zip": SourceConfig(uri=f"{s3}/instructions.json", image_root=f"{s3}/images.zip", split="val"),
        "s3-parquet": SourceConfig(uri=f"{s3}/parquet", format="parquet", split="val"),
    }
    config = config_for(kvqa_dir)
    s3_processor = Processor.load(f"{s3}/processor", num_image_tokens=16)
    assert s3_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    inputs = {}
    for name, source in variants.items():
        rejects_uri = f"{s3}/rejects/{name}.jsonl" if name.startswith("s3") else str(tmp_path / f"{name}.jsonl")
        use = s3_processor if name.startswith("s3") else processor
        inputs[name] = collect(iter_plain_batches([source], use, config, rejects_uri=rejects_uri, shuffle=False))
        assert storage.read_bytes(rejects_uri) == b""  # written, and empty: nothing rejected

    reference = inputs.pop("folder")
    assert len(reference["sample_id"]) == 1376 and set(reference["hop"].tolist()) == {0, 1, 2}
    for name, columns in inputs.items():
        assert columns.keys() == reference.keys()
        for column, values in reference.items():
            np.testing.assert_array_equal(columns[column], values, err_msg=f"{name}: {column}")


def test_parquet_rows_round_trip_records(kvqa_dir, parquet_dir):
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_dir)
    assert table.num_rows == 13911 and table.schema.field("image").type == "binary"
    records = json.loads((kvqa_dir / "instructions.json").read_text())
    rows = table.slice(0, 50).to_pylist()
    for record, row in zip(records, rows):
        restored, image = row_to_record(row)
        assert restored == record
        assert image == (kvqa_dir / "images" / record["image"]).read_bytes()
    row = record_to_row(json.dumps(records[0]).encode(), b"png")
    assert row_to_record(row) == (records[0], b"png")


def _bad_dataset(kvqa_dir, root, good) -> dict[str, bytes]:
    """Good records plus one of each kind of bad input; returns raw bytes per record id."""
    images = root / "images"
    images.mkdir()
    for record in good:
        (images / record["image"]).write_bytes((kvqa_dir / "images" / record["image"]).read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    base = good[0]
    turns = base["conversations"]

    def variant(sample_id, **changes):
        return json.dumps({**base, "id": sample_id, **changes}).encode()

    raw = {r["id"]: json.dumps(r).encode() for r in good}
    raw["bad-missing-image"] = variant("bad-missing-image", image="no-such-file.png")
    raw["bad-corrupt-image"] = variant("bad-corrupt-image", image="corrupt.png")
    raw["bad-malformed-json"] = variant("bad-malformed-json").replace(b'"gpt"', b'"gpt" "gpt"')
    raw["bad-malformed-record"] = variant("bad-malformed-record", conversations={"from": "human"})
    raw["bad-no-response"] = variant("bad-no-response", conversations=turns[:1])
    raw["bad-two-placeholders"] = variant("bad-two-placeholders", conversations=[{"from": "human", "value": "<image>\n<image>\nWhich digit?"}, turns[1]])
    raw["bad-no-placeholder"] = variant("bad-no-placeholder", conversations=[{"from": "human", "value": "Which digit?"}, turns[1]])
    raw["bad-non-utf8"] = variant("bad-non-utf8", conversations=[{"from": "human", "value": "<image>\nWhich digit? XX"}, turns[1]]).replace(b"XX", b"\xff\xfe")
    raw["bad-escapes-root"] = variant("bad-escapes-root", image="../../outside.png")
    return raw


BAD_REASONS = {
    "bad-missing-image": "missing-image",
    "bad-corrupt-image": "corrupt-image",
    "bad-malformed-json": "malformed-json",
    "bad-malformed-record": "malformed-record",
    "bad-no-response": "no-response",
    "bad-two-placeholders": "image-placeholders",
    "bad-no-placeholder": "image-placeholders",
    "bad-non-utf8": "non-utf8",
    "bad-escapes-root": "image-outside-root",
}


@pytest.mark.parametrize("layout", ["json_list", "jsonl"])
def test_bad_inputs_go_to_rejects_file_and_every_good_record_arrives(kvqa_dir, processor, tmp_path, layout):
    good = [r for r in json.loads((kvqa_dir / "instructions.json").read_text()) if r["split"] == "val"][:40]
    raw = _bad_dataset(kvqa_dir, tmp_path, good)
    order = list(raw)
    np.random.default_rng(0).shuffle(order)  # bad records interleaved with good ones
    if layout == "json_list":
        (tmp_path / "data.json").write_bytes(b"[\n" + b",\n".join(raw[k] for k in order) + b"\n]")
    else:  # JSON lines can also hold a cut record: it must not take its neighbours with it
        (tmp_path / "data.json").write_bytes(b"\n".join(raw[k] for k in order) + b'\n{"id": "bad-cut-line", "conv\n')
    source = SourceConfig(uri=str(tmp_path / "data.json"), image_root=str(tmp_path / "images"), name="bad-set")
    config = config_for(kvqa_dir, max_reject_fraction=0.5, preprocess_batch_size=16)
    rejects_uri = str(tmp_path / "run" / "rejects.jsonl")

    samples = collect(iter_plain_batches([source], processor, config, rejects_uri=rejects_uri, shuffle=False))
    assert sorted(samples["sample_id"].tolist()) == sorted(r["id"] for r in good)
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    expected = dict(BAD_REASONS, **({"bad-cut-line": "malformed-json"} if layout == "jsonl" else {}))
    # Each reject carries its record (a repr); the id is named where the record could be read.
    by_id = {k: next(r for r in rejects if f'"id": "{k}"' in r["record"]) for k in expected}
    assert by_id["bad-missing-image"]["sample_id"] == "bad-missing-image"
    assert by_id["bad-non-utf8"]["sample_id"] == "bad-non-utf8"
    assert {k: by_id[k]["reason"] for k in expected} == expected
    assert len(rejects) == len(expected)
    for reject in rejects:
        assert reject["source"] == "bad-set" and reject["detail"] and reject["record"]
    assert "outside the image root" in by_id["bad-escapes-root"]["detail"]

    strict = config_for(kvqa_dir, max_reject_fraction=0.05, preprocess_batch_size=16)
    with pytest.raises(TooManyRejectsError) as raised:
        for _ in iter_plain_batches([source], processor, strict, rejects_uri=rejects_uri, shuffle=False):
            pass
    message = str(raised.value)
    total = len(raw) + (layout == "jsonl")
    assert f"of {total} records rejected" in message and "data.max_reject_fraction=0.05" in message
    assert rejects_uri in message and "%" in message
    assert raised.value.num_rejected > 0.05 * total
    assert (tmp_path / "run" / "rejects.jsonl").read_text()  # written before the error was raised


def test_curriculum_stages_filter_by_hop_level(kvqa_dir, processor, tmp_path):
    config = config_for(kvqa_dir)
    val = [s.model_copy(update={"split": "val"}) for s in config.instruction_sources()]
    counts = json.loads((kvqa_dir / "summary.json").read_text())["counts"]
    per_hop = {hop: counts[f"  hop {hop}"]["val"] for hop in (0, 1, 2)}
    for stage in PROGRESSIVE_CURRICULUM:
        assert plan_pass(val, config, hops=stage).num_records == sum(per_hop[h] for h in stage)
    samples = collect(iter_plain_batches(val, processor, config, rejects_uri=str(tmp_path / "r.jsonl"), hops=(0,)))
    assert len(samples["hop"]) == per_hop[0] and set(samples["hop"].tolist()) == {0}
    assert "Facts:" not in processor.tokenizer.decode(samples["input_ids"][0])


def test_mixing_draws_sources_in_proportion_to_weights(kvqa_dir):
    config = config_for(kvqa_dir)
    catalogs = [catalog_source(config.caption_sources()[0]), catalog_source(config.instruction_sources()[0])]

    def plan(weights, mix=True, seed=0):
        weighted = [replace(c, source=c.source.model_copy(update={"weight": w})) for c, w in zip(catalogs, weights)]
        return plan_reads(weighted, hops=None, mix=mix, seed=seed, records_per_task=2048)

    def ordinals(read_plan):
        return np.concatenate([task["ordinals"] for task in read_plan.tasks])

    assert plan((1, 1), mix=False).records_per_source == {"kvqa-captions": 1438, "kvqa-instructions": 11151}
    for weights in ((1, 1), (1, 3), (2, 1)):
        mixed = plan(weights)
        got = mixed.records_per_source
        share = got["kvqa-captions"] / mixed.num_records
        assert abs(share - weights[0] / sum(weights)) < 0.02, (weights, got)
        # The scarcer source (per unit of weight) is used whole; nothing is repeated.
        assert got["kvqa-captions"] == 1438 or got["kvqa-instructions"] == 11151
        np.testing.assert_array_equal(ordinals(plan(weights)), ordinals(mixed))  # deterministic
        reseeded = plan(weights, seed=7)
        assert not np.array_equal(ordinals(reseeded), ordinals(mixed))
        assert abs(reseeded.records_per_source["kvqa-captions"] / reseeded.num_records - share) < 0.02


@pytest.mark.parametrize("layout", ["json", "json_shuffled", "parquet_shuffled", "two_sources_shuffled"])
def test_a_plan_prefix_reads_the_same_first_rows_from_only_its_tasks(kvqa_dir, parquet_dir, layout):
    from ckd_ray.data.sources import read_task_rows

    config = config_for(kvqa_dir)
    if layout.startswith("parquet"):
        sources = [SourceConfig(uri=str(parquet_dir), format="parquet", split="val")]
    else:
        sources = config.instruction_sources() + (config.caption_sources() if layout.startswith("two") else [])
    plan = plan_reads([catalog_source(s) for s in sources], hops=None, mix=False, seed=3, records_per_task=300,
                      shuffle=layout.endswith("shuffled"), shuffle_block_records=4)

    def rows(read_plan) -> list[tuple]:
        tables = [read_task_rows(task) for task in read_plan.tasks]
        return [(t["source"][i].as_py(), t["ordinal"][i].as_py(), t["record"][i].as_py()) for t in tables for i in range(t.num_rows)]

    everything = rows(plan)
    for count in (1, 17, 300, 301, 1000):
        prefix = plan.prefix(count)
        assert rows(prefix) == everything[:count]  # same records, same order, the bytes each read found
        ends = np.cumsum([len(task["ordinals"]) for task in plan.tasks])
        assert len(prefix.tasks) == int(np.searchsorted(ends, count)) + 1 and prefix.num_records == count  # only its tasks
        assert sum(prefix.records_per_source.values()) == count
        np.testing.assert_array_equal(np.concatenate([t["ordinals"] for t in prefix.tasks]),
                                      np.concatenate([t["ordinals"] for t in plan.tasks])[:count])
    assert plan.prefix(plan.num_records + 5).num_records == plan.num_records


def test_plain_shuffle_is_deterministic_by_seed(kvqa_dir, processor, tmp_path):
    def order(seed: int) -> list[str]:
        config = config_for(kvqa_dir, shuffle_seed=seed)
        sources = [s.model_copy(update={"split": "val"}) for s in config.caption_sources()]
        return collect(iter_plain_batches(sources, processor, config, rejects_uri=str(tmp_path / "r.jsonl")))["sample_id"].tolist()

    first, again, other = order(0), order(0), order(1)
    assert first == again and first != other and sorted(first) == sorted(other)
    assert first != sorted(first)


def test_config_reports_every_problem_with_field_and_fix():
    with pytest.raises(ValueError) as raised:
        DataConfig(
            captions=[{"uri": "a.json"}, {"uri": "dir/a.json", "image_root": "imgs"}],
            instructions=[{"uri": "p", "format": "parquet", "image_root": "imgs"}, {"uri": "gs://x/y.json", "image_root": "i"}],
        )
    message = str(raised.value)
    for expected in (
        "data.captions[0].image_root is not set",
        "data.captions has two sources named 'a.json': give each a distinct `name`",
        "data.instructions[0].image_root is set but data.instructions[0].format is parquet",
        "data.instructions[1].uri: unknown storage scheme 'gs'",
    ):
        assert expected in message
    with pytest.raises(ValueError, match="data.captions is empty and data.benchmark_root is not set"):
        DataConfig()
    with pytest.raises(ValueError, match="max_reject_fraction"):
        DataConfig(benchmark_root="b", max_reject_fraction=1.5)
    config = DataConfig(benchmark_root="s3://bucket/kvqa")
    assert config.instruction_sources()[0].uri == "s3://bucket/kvqa/instructions.json"
    assert config.eval_sources("test")[0].split == "test"


def test_caption_share_mixes_the_benchmark_captions_into_the_instruction_steps_but_not_into_evaluation(kvqa_dir):
    config = DataConfig(benchmark_root=str(kvqa_dir), caption_share=0.1)
    questions, captions = config.instruction_sources()
    assert (questions.label, questions.weight, questions.split) == ("kvqa-instructions", 0.9, "train")
    assert (captions.label, captions.weight, captions.split) == ("kvqa-captions", 0.1, "train")
    assert [s.label for s in config.eval_sources("test")] == ["kvqa-instructions"]
    reads = plan_pass([questions, captions], config)
    counts = reads.records_per_source
    assert counts["kvqa-instructions"] == 11151 and abs(counts["kvqa-captions"] / sum(counts.values()) - 0.1) < 0.005
    assert [s.label for s in DataConfig(benchmark_root=str(kvqa_dir)).instruction_sources()] == ["kvqa-instructions"]
    with pytest.raises(ValueError, match="caption_share"):
        DataConfig(benchmark_root="b", caption_share=1.0)
