"""Bad data: a corpus with every kind of bad record the readers know, interleaved with good ones,
read end to end (catalog, read tasks, preprocessing). Each bad record is one counted reject with
its reason; every good record comes through; nothing raises. Decompression bombs and
10^6-character records are refused in bounded memory, measured in a fresh process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ckd_ray.data.config import DataConfig, SourceConfig
from ckd_ray.data.llava_json import JsonLayoutError
from ckd_ray.data.pipeline import iter_plain_batches, plan_pass
from ckd_ray.data.processor import Processor
from ckd_ray.data.rejects import MAX_RECORD_CHARS

REPO = Path(__file__).resolve().parents[2]
BOMB_SIDE = 12_000  # 144M pixels: under PIL's own refusal (179M), so PIL alone would decode it (~700 MB)
LONG_CHARS = 10**6


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height white pixels, compressed to a few KB: its header
    declares what decoding would need (width x height bytes in PIL, 3x that as RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter byte 0, then the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def processor(kvqa_dir):
    return Processor.load(kvqa_dir / "processor", num_image_tokens=16)


def _corpus(kvqa_dir: Path, root: Path) -> tuple[list[dict], dict[str, bytes], dict[str, str]]:
    """Good records, then raw bytes per bad record id and the reason each must be rejected with."""
    good = [r for r in json.loads((kvqa_dir / "instructions.json").read_text()) if r["split"] == "val"][:40]
    good.append({"id": "good-text-only", "conversations": [{"from": "human", "value": "What is 2 plus 2?"},
                                                           {"from": "gpt", "value": "4"}]})
    images, outside = root / "images", root / "outside"
    images.mkdir()
    outside.mkdir()
    for record in good[:-1]:
        (images / record["image"]).write_bytes((kvqa_dir / "images" / record["image"]).read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (images / "bomb.png").write_bytes(png_bomb(BOMB_SIDE, BOMB_SIDE))
    (images / "a-folder").mkdir()
    # A valid image outside the root, reached through symlinks inside it: it would decode if read.
    (outside / "private.png").write_bytes((kvqa_dir / "images" / good[0]["image"]).read_bytes())
    (images / "link-out.png").symlink_to(outside / "private.png")
    (images / "dir-out").symlink_to(outside, target_is_directory=True)
    (images / "link-in.png").symlink_to(images / good[0]["image"])  # stays inside: fine

    base = good[0]
    question, answer = base["conversations"]

    def variant(sample_id: str, **changes) -> bytes:
        return json.dumps({**base, "id": sample_id, **changes}).encode()

    turns = lambda human, gpt: [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]  # noqa: E731
    bad = {
        "bad-missing-image": (variant("bad-missing-image", image="no-such-file.png"), "missing-image"),
        "bad-image-is-a-folder": (variant("bad-image-is-a-folder", image="a-folder"), "missing-image"),
        "bad-image-nul-name": (variant("bad-image-nul-name", image="a\u0000b.png"), "missing-image"),
        "bad-image-name-too-long": (variant("bad-image-name-too-long", image="x" * 300 + ".png"), "missing-image"),
        "bad-dotdot": (variant("bad-dotdot", image="../outside/private.png"), "image-outside-root"),
        "bad-absolute": (variant("bad-absolute", image=str(outside / "private.png")), "image-outside-root"),
        "bad-symlink-out": (variant("bad-symlink-out", image="link-out.png"), "image-outside-root"),
        "bad-symlinked-dir-out": (variant("bad-symlinked-dir-out", image="dir-out/private.png"), "image-outside-root"),
        "bad-corrupt-image": (variant("bad-corrupt-image", image="corrupt.png"), "corrupt-image"),
        "bad-bomb": (variant("bad-bomb", image="bomb.png"), "image-too-large"),
        "bad-malformed-json": (variant("bad-malformed-json").replace(b'"gpt"', b'"gpt" "gpt"'), "malformed-json"),
        "bad-deep-nesting": (variant("bad-deep-nesting")[:-1] + b', "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed-json"),
        "bad-5000-digit-number": (variant("bad-5000-digit-number")[:-1] + b', "n": ' + b"7" * 5000 + b"}", "malformed-json"),
        "bad-conversations-not-a-list": (variant("bad-conversations-not-a-list", conversations={"from": "human"}),
                                         "malformed-record"),
        "bad-role-is-a-list": (variant("bad-role-is-a-list", conversations=[{"from": ["human"], "value": "x"}, answer]),
                               "malformed-record"),
        "bad-hop-not-int": (variant("bad-hop-not-int", hop="two"), "malformed-record"),
        "bad-no-response": (variant("bad-no-response", conversations=[question]), "no-response"),
        "bad-two-placeholders": (variant("bad-two-placeholders", conversations=turns("<image>\n<image>\nWhich digit?", "7")),
                                 "image-placeholders"),
        "bad-no-placeholder": (variant("bad-no-placeholder", conversations=turns("Which digit?", "7")), "image-placeholders"),
        "bad-non-utf8": (variant("bad-non-utf8", conversations=turns("<image>\nWhich digit? XX", "7")).replace(b"XX", b"\xff\xfe"),
                         "non-utf8"),
        "bad-lone-surrogate": (variant("bad-lone-surrogate", conversations=turns("<image>\nWhich \udc80 digit?", "7")), "non-utf8"),
        "bad-long-response": (variant("bad-long-response", conversations=turns(question["value"], "7 " * (LONG_CHARS // 2))),
                              "over-length"),
        "bad-long-prompt": (variant("bad-long-prompt", conversations=turns("<image>\n" + "why " * (LONG_CHARS // 4), "7")),
                            "over-length"),
        "bad-short-max-length": (variant("bad-short-max-length", conversations=turns(question["value"], "seven " * 150)),
                                 "over-length"),
    }
    raw = {record["id"]: json.dumps(record).encode() for record in good}
    raw["good-link-in"] = variant("good-link-in", image="link-in.png")
    good.append(json.loads(raw["good-link-in"]))
    raw.update({key: value for key, (value, _) in bad.items()})
    return good, raw, {key: reason for key, (_, reason) in bad.items()}


@pytest.mark.parametrize("layout", ["json_list", "jsonl"])
def test_every_bad_record_is_one_counted_reject_and_every_good_record_arrives(kvqa_dir, processor, tmp_path, layout):
    good, raw, expected = _corpus(kvqa_dir, tmp_path)
    order = list(raw)
    np.random.default_rng(0).shuffle(order)  # bad records between good ones, in every batch
    if layout == "json_list":
        (tmp_path / "data.json").write_bytes(b"[\n" + b",\n".join(raw[k] for k in order) + b"\n]")
    else:  # JSON lines can end in a record cut mid-way (a file cut short): that line alone is rejected
        (tmp_path / "data.json").write_bytes(b"\n".join(raw[k] for k in order) + b'\n{"id": "bad-cut-line", "conv')
        expected = {**expected, "bad-cut-line": "malformed-json"}
    source = SourceConfig(uri=str(tmp_path / "data.json"), image_root=str(tmp_path / "images"), name="bad-corpus")
    config = DataConfig(benchmark_root=str(kvqa_dir), max_reject_fraction=1.0, preprocess_batch_size=16)
    rejects_uri = tmp_path / "rejects.jsonl"

    batches = list(iter_plain_batches([source], processor, config, rejects_uri=str(rejects_uri), shuffle=False))
    sample_ids = np.concatenate([b["sample_id"] for b in batches]).tolist()
    assert sorted(sample_ids) == sorted(r["id"] for r in good)  # nothing good lost, nothing bad let through

    rejects = [json.loads(line) for line in rejects_uri.read_text().splitlines()]
    assert len(rejects) == len(expected)  # one reject per bad record, none for a good one
    by_id = {}
    for reject in rejects:
        assert reject["source"] == "bad-corpus" and reject["detail"]
        assert len(reject["record"]) <= MAX_RECORD_CHARS + 40  # a 1 MB record is kept as a 2,000-character repr
        matches = [k for k in expected if f'"id": "{k}"' in reject["record"]]
        assert len(matches) == 1, reject
        by_id[matches[0]] = reject
    assert {k: r["reason"] for k, r in by_id.items()} == expected
    counts = dict(Counter(expected.values()))
    print(f"\n[{layout}] {len(sample_ids)} good records through, {len(rejects)} rejected: {dict(sorted(counts.items()))}")

    assert "outside the image root" in by_id["bad-symlink-out"]["detail"]
    assert "is a symlink to" in by_id["bad-symlinked-dir-out"]["detail"]
    assert f"declares {BOMB_SIDE} x {BOMB_SIDE}" in by_id["bad-bomb"]["detail"]
    assert "data.max_image_pixels" in by_id["bad-bomb"]["detail"]
    assert "rejected before tokenizing" in by_id["bad-long-response"]["detail"]
    assert "raise data.max_length" in by_id["bad-short-max-length"]["detail"]
    assert "nested too deeply" in by_id["bad-deep-nesting"]["detail"]
    assert "is a folder" in by_id["bad-image-is-a-folder"]["detail"]
    assert by_id["bad-bomb"]["sample_id"] == "bad-bomb"


def test_a_json_list_cut_mid_record_is_one_clear_error_before_any_read(kvqa_dir, tmp_path):
    """A JSON list that never closes lost an unknown number of records: that is not one bad
    record to count but a file to fix, and it is said at planning, naming file, byte and fix."""
    records = [r for r in json.loads((kvqa_dir / "instructions.json").read_text())][:20]
    text = json.dumps(records).encode()
    cut = text[: len(text) * 2 // 3]
    (tmp_path / "cut.json").write_bytes(cut)
    source = SourceConfig(uri=str(tmp_path / "cut.json"), image_root=str(kvqa_dir / "images"))
    with pytest.raises(JsonLayoutError) as raised:
        plan_pass([source], DataConfig(benchmark_root=str(kvqa_dir)))
    message = str(raised.value)
    assert str(tmp_path / "cut.json") in message and "not closed" in message
    assert "fix the file or convert it to JSON lines" in message
    start = int(message.split("after byte ")[1].split(")")[0])
    assert cut[start:].lstrip().startswith(b"{")  # the byte named is where the cut record starts

    from click.testing import CliRunner

    from ckd_ray.cli import main

    result = CliRunner().invoke(main, ["data", "to-parquet", str(tmp_path / "cut.json"), str(kvqa_dir / "images"), str(tmp_path / "pq")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # click's error, not a traceback
    assert "Error:" in result.output and "not closed" in result.output


def test_parquet_rows_written_by_others_are_rejected_row_by_row(kvqa_dir, processor, tmp_path):
    """Parquet from elsewhere: a `metadata` that is not JSON, `conversations` as a broken JSON
    string, a column JSON cannot hold, a bomb as inline bytes; the good rows still arrive."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = (kvqa_dir / "images" / "00000.png").read_bytes()
    turns = json.dumps([{"from": "human", "value": "<image>\nWhich digit?"}, {"from": "gpt", "value": "0"}])
    rows = [
        {"id": "good-0", "image": png, "conversations": turns, "metadata": "{}", "blob": None},
        {"id": "bad-metadata", "image": png, "conversations": turns, "metadata": "{not json", "blob": None},
        {"id": "bad-metadata-list", "image": png, "conversations": turns, "metadata": "[1, 2]", "blob": None},
        {"id": "bad-conversations", "image": png, "conversations": '[{"from": "human"', "metadata": "{}", "blob": None},
        {"id": "bad-blob", "image": png, "conversations": turns, "metadata": "{}", "blob": b"\x00\x01"},
        {"id": "bad-bomb", "image": png_bomb(BOMB_SIDE, BOMB_SIDE), "conversations": turns, "metadata": "{}", "blob": None},
        {"id": "good-1", "image": png, "conversations": turns, "metadata": None, "blob": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "others.parquet")
    source = SourceConfig(uri=str(tmp_path / "others.parquet"), format="parquet", name="others")
    config = DataConfig(benchmark_root=str(kvqa_dir), max_reject_fraction=1.0)
    batches = list(iter_plain_batches([source], processor, config, rejects_uri=str(tmp_path / "r.jsonl"), shuffle=False))
    assert sorted(np.concatenate([b["sample_id"] for b in batches]).tolist()) == ["good-0", "good-1"]
    rejects = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    reasons = {next(row["id"] for row in rows if f"'{row['id']}'" in r["record"] or f'"{row["id"]}"' in r["record"]): r["reason"]
               for r in rejects}
    assert reasons == {"bad-metadata": "malformed-record", "bad-metadata-list": "malformed-record",
                       "bad-conversations": "malformed-record", "bad-blob": "malformed-record", "bad-bomb": "image-too-large"}


MEASURE = r"""
import json, resource, sys
import numpy as np
from ckd_ray.data.preprocess import InputLimits, decode_image, preprocess_rows
from ckd_ray.data.processor import Processor

processor_dir, case, bomb_path, good_png = sys.argv[1:5]
processor = Processor.load(processor_dir, num_image_tokens=16)


def rows(record, image):
    return {"source": np.array(["m"], dtype=object), "ordinal": np.arange(1), "record": np.array([json.dumps(record).encode()], dtype=object),
            "image": np.array([image], dtype=object), "read_error": np.array([""], dtype=object)}


def status_mb(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def extra_mb(run):
    # Reset the peak (VmHWM) to the current resident size, run, and read the new peak: the memory
    # `run` took at its worst, whatever the imports before it peaked at.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status_mb("VmRSS")
    result = run()
    return result, status_mb("VmHWM") - before


good = {"id": "g", "image": "g.png", "conversations": [{"from": "human", "value": "<image>\nWhich digit?"}, {"from": "gpt", "value": "0"}]}
png = open(good_png, "rb").read()
samples, rejects, _ = preprocess_rows(rows(good, png), processor, InputLimits())  # warm up every lazy import
assert samples is not None and not rejects
if case == "bomb":
    bomb = open(bomb_path, "rb").read()
    (_, rejects, _), guarded = extra_mb(lambda: preprocess_rows(rows(dict(good, id="bomb"), bomb), processor, InputLimits()))
    # What the guard prevents: the same bytes decoded with the limit out of the way.
    size, unguarded = extra_mb(lambda: decode_image(bomb, "bomb.png", max_pixels=10**12).size)
else:
    long_answer = "7 " * 500000
    record = dict(good, id="long", conversations=[good["conversations"][0], {"from": "gpt", "value": long_answer}])
    (_, rejects, _), guarded = extra_mb(lambda: preprocess_rows(rows(record, png), processor, InputLimits()))
    size, unguarded = extra_mb(lambda: len(processor.encode([long_answer])[0][0]))  # tokenizing it anyway
print(json.dumps({"reasons": [r.reason for r in rejects], "guarded_mb": guarded, "unguarded_mb": unguarded, "size": size}))
"""


def test_bomb_and_huge_record_are_refused_in_bounded_memory(kvqa_dir, tmp_path):
    """Peak resident memory of a fresh process while it reads a 12000 x 12000 PNG bomb (a few KB
    on disk) and a 10^6-character record: each is rejected with under 200 MB extra (the peak is
    reset before each read, /proc/self/clear_refs). The figure without the guard is measured too:
    decoding the bomb, tokenizing the record."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(BOMB_SIDE, BOMB_SIDE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    png = kvqa_dir / "images" / "00000.png"
    procs = {  # in parallel: each pays the imports and the processor load
        case: subprocess.Popen([sys.executable, "-c", MEASURE, str(kvqa_dir / "processor"), case, str(bomb), str(png)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case in ("bomb", "long")
    }
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        figures = json.loads(out.strip().splitlines()[-1])
        what = f"{BOMB_SIDE} x {BOMB_SIDE} PNG bomb, {bomb.stat().st_size:,} bytes" if case == "bomb" else f"{LONG_CHARS:,}-character record"
        print(f"\n{what}: rejected as {figures['reasons']} with +{figures['guarded_mb']:.1f} MB peak; "
              f"without the guard +{figures['unguarded_mb']:.0f} MB ({figures['size']})")
        assert figures["reasons"] == (["image-too-large"] if case == "bomb" else ["over-length"])
        assert figures["guarded_mb"] < 200
        assert figures["unguarded_mb"] > 300  # the measurement sees what the guard saves
