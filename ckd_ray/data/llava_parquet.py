"""LLaVA records as Parquet rows with the image bytes inline: one file set instead of a JSON list plus
hundreds of thousands of image files, read in parallel by row group.

Schema (`ckd_ray.data.parquet_export.write_llava_parquet` writes it):

    id string | image binary | image_path string | conversations list<struct<from, value>>
    split string | hop int8 | question_type string | answer string | metadata string (JSON of other keys)

`row_to_record` also reads Parquet written by others: `image` as bytes or as a Hugging Face
`{bytes, path}` struct, `conversations` as a list or a JSON string, any other column as a record key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ckd_ray import storage
from ckd_ray.data.rejects import Reject, RejectsLog

TYPED_KEYS = ("id", "split", "hop", "question_type", "answer")


def parquet_schema():
    import pyarrow as pa

    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    return pa.schema([
        ("id", pa.string()),
        ("image", pa.binary()),
        ("image_path", pa.string()),
        ("conversations", pa.list_(turn)),
        ("split", pa.string()),
        ("hop", pa.int8()),
        ("question_type", pa.string()),
        ("answer", pa.string()),
        ("metadata", pa.string()),
    ])


class UnrepresentableRecord(ValueError):
    """A record the Parquet schema cannot hold (not UTF-8, not a JSON object, mistyped keys)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def record_to_row(raw: bytes, image: bytes | None) -> dict:
    """One Parquet row for a raw LLaVA record. Records that are well-typed but still bad (no response
    turn, wrong placeholder count, missing or corrupt image) are written as they are, so reading the
    Parquet rejects exactly what reading the JSON rejects."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UnrepresentableRecord("non-utf8", f"invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise UnrepresentableRecord("malformed-json", f"{err.msg} at character {err.pos}") from None
    except (ValueError, RecursionError):  # a number of over 4300 digits; nesting deeper than ~1000
        raise UnrepresentableRecord("malformed-json", "not decodable (a huge number or deep nesting)") from None
    if not isinstance(record, dict):
        raise UnrepresentableRecord("malformed-record", f"expected a JSON object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in conversations
    ):
        raise UnrepresentableRecord("malformed-record", "`conversations` must be a list of {from, value} string turns")
    hop = record.get("hop")
    if hop is not None and (not isinstance(hop, int) or isinstance(hop, bool) or not 0 <= hop <= 127):
        raise UnrepresentableRecord("malformed-record", f"`hop` must be an integer in 0..127, got {hop!r}")
    for key in ("split", "question_type", "answer", "image"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise UnrepresentableRecord("malformed-record", f"`{key}` must be a string")
    try:
        for text in [t["value"] for t in conversations] + [str(record.get(k)) for k in (*TYPED_KEYS, "image")]:
            text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnrepresentableRecord("non-utf8", "a string holds an unpaired surrogate (\\udXXX escape)") from None
    raw_id = record.get("id")
    metadata = {k: v for k, v in record.items() if k not in (*TYPED_KEYS, "image", "conversations")}
    return {
        "id": None if raw_id is None else str(raw_id),
        "image": image,
        "image_path": record.get("image"),
        "conversations": [{"from": t["from"], "value": t["value"]} for t in conversations],
        "split": record.get("split"),
        "hop": hop,
        "question_type": record.get("question_type"),
        "answer": record.get("answer"),
        "metadata": json.dumps(metadata),
    }


def row_to_record(row: dict) -> tuple[dict, bytes | None]:
    """The LLaVA record and image bytes of one Parquet row (the inverse of `record_to_row`).
    Raises `UnrepresentableRecord` for a row whose `metadata` or `conversations` string is not the
    JSON it should be."""
    row = dict(row)
    image = row.pop("image", None)
    if isinstance(image, dict):  # Hugging Face `Image` feature: {bytes, path}
        row.setdefault("image_path", image.get("path"))
        image = image.get("bytes")
    record = _json_column(row, "metadata", dict, "{}")
    image_path = row.pop("image_path", None)
    if isinstance(row.get("conversations"), str):
        row["conversations"] = _json_column(row, "conversations", list, "[]")
    record.update({k: v for k, v in row.items() if v is not None})
    if image_path is not None:
        record["image"] = image_path
    elif image is not None:
        record["image"] = f"{record.get('id', 'row')}.image"  # inline bytes without a name
    return record, image


def _json_column(row: dict, name: str, kind: type, empty: str):
    text = row.pop(name, None) or empty
    try:
        value = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise UnrepresentableRecord("malformed-record", f"the `{name}` column does not hold JSON") from None
    if not isinstance(value, kind):
        raise UnrepresentableRecord("malformed-record", f"the `{name}` column holds a JSON {type(value).__name__}, not a {kind.__name__}")
    return value
