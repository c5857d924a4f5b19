"""Reading sources: a catalog pass that locates and labels every record, a read plan that selects
(split, curriculum hops, mixing draws) and groups records into read tasks, and the read task itself,
which turns a group of records into uniform rows for preprocessing:

    source str | ordinal int64 | record binary (raw JSON) | image binary | read_error str

The catalog runs once on the driver and streams (see `llava_json.py`); it keeps a few bytes per
record, so selection and mixing are decided exactly, before any task runs, and the number of records
a pass reads (the denominator of the reject fraction) is known up front.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import zipfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ckd_ray import storage
from ckd_ray.data.config import SourceConfig
from ckd_ray.data.llava_json import iter_json_records, parse_record
from ckd_ray.data.llava_parquet import UnrepresentableRecord, row_to_record

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
UNLABELED = 3  # the record has no (valid) `split` key
UNREADABLE = -1  # the record does not parse: always selected, so that preprocessing rejects it


@dataclass(frozen=True)
class SourceCatalog:
    """Every record of one source in file order (its index is the record's `ordinal`): where it is
    (`locator` rows: (0, byte start, byte end) in the JSON file, or (file index, row group, row) for
    Parquet), its split code and its hop level (-1 when unreadable)."""

    source: SourceConfig
    files: tuple[str, ...]
    locator: np.ndarray  # int64 [N, 3]
    split: np.ndarray  # int8 [N]
    hop: np.ndarray  # int8 [N]

    @property
    def num_records(self) -> int:
        return len(self.split)

    def select(self, hops: Sequence[int] | None) -> np.ndarray:
        """Records in the source's split and in `hops` (None: all), plus unreadable ones."""
        unreadable = (self.split == UNREADABLE) | (self.hop < 0)
        wanted = np.ones(self.num_records, dtype=bool)
        if self.source.split is not None:
            wanted &= self.split == SPLIT_CODES[self.source.split]
        if hops is not None:
            wanted &= np.isin(self.hop, np.asarray(list(hops), dtype=np.int8))
        return wanted | unreadable


def catalog_source(source: SourceConfig) -> SourceCatalog:
    """One streaming pass over a source (local or S3) that records each record's location and labels."""
    if source.format == "llava_json":
        return _catalog_json(source)
    return _catalog_parquet(source)


def _labels(record: dict | None) -> tuple[int, int]:
    if record is None:
        return UNREADABLE, -1
    split = record.get("split")
    hop = record.get("hop", 0)
    valid_hop = isinstance(hop, int) and not isinstance(hop, bool) and 0 <= hop <= 127
    return SPLIT_CODES.get(split, UNLABELED) if isinstance(split, str) else UNLABELED, hop if valid_hop else -1


def _catalog_json(source: SourceConfig) -> SourceCatalog:
    fs, path = storage.arrow_filesystem(source.uri)
    locator, labels = [], []
    # compression=None: byte offsets must be offsets in the stored object, for ranged reads later.
    with fs.open_input_stream(path, compression=None) as stream:
        for record in iter_json_records(stream, name=source.uri):
            locator.append((0, record.start, record.end))
            labels.append(_labels(record.value))
    return _catalog(source, (source.uri,), locator, labels)


def _catalog_parquet(source: SourceConfig) -> SourceCatalog:
    import pyarrow.parquet as pq

    files = parquet_files(source.uri)
    locator, labels = [], []
    for file_index, uri in enumerate(files):
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            num_rows = parquet.metadata.num_rows
            names = [n for n in ("split", "hop") if n in parquet.schema_arrow.names]
            columns = parquet.read(columns=names).to_pydict() if names else {}
            splits, hops = columns.get("split", [None] * num_rows), columns.get("hop", [None] * num_rows)
            row = 0
            for group in range(parquet.num_row_groups):
                for in_group in range(parquet.metadata.row_group(group).num_rows):
                    locator.append((file_index, group, in_group))
                    labels.append(_labels({"split": splits[row], "hop": 0 if hops[row] is None else hops[row]}))
                    row += 1
    return _catalog(source, tuple(files), locator, labels)


def _catalog(source: SourceConfig, files: tuple[str, ...], locator: list, labels: list) -> SourceCatalog:
    return SourceCatalog(
        source=source,
        files=files,
        locator=np.asarray(locator, dtype=np.int64).reshape(-1, 3),
        split=np.asarray([s for s, _ in labels], dtype=np.int8),
        hop=np.asarray([h for _, h in labels], dtype=np.int8),
    )


def parquet_files(uri: str) -> list[str]:
    """`uri` itself if it is a Parquet file, else the `*.parquet` files under it (sorted; names that
    start with `_` or `.` are skipped, as Parquet dataset readers do)."""
    import pyarrow.fs as pafs

    fs, path = storage.arrow_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound and not storage.is_s3(uri):
        raise FileNotFoundError(f"Parquet source {uri!r} does not exist")
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    names = sorted(
        f.path[len(path) :].lstrip("/")
        for f in found
        if f.type == pafs.FileType.File and f.path.endswith(".parquet") and not f.base_name.startswith(("_", "."))
    )
    if not names:
        raise FileNotFoundError(f"no *.parquet files under {uri!r}")
    return [storage.join(uri, name) for name in names]


def hash_uniform(seed: int, salt: int, ordinals: np.ndarray) -> np.ndarray:
    """A deterministic uint64 hash of (seed, salt, ordinal) (splitmix64 finalizer), vectorized: a
    record's mixing draw depends on nothing but its identity, not on file layout or task order."""
    base = np.uint64((seed * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64))
    with np.errstate(over="ignore"):
        z = np.asarray(ordinals, dtype=np.uint64) + base
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mixing_rates(weights: Sequence[float], counts: Sequence[int]) -> list[float]:
    """Per-source keep rates so that the mix holds each source in proportion to its weight, as large
    as possible without repeating records: the source with the fewest records per unit of weight is
    used whole, the others are subsampled."""
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    size = min(n / share for n, share in zip(counts, shares))
    return [min(1.0, share * size / n) for n, share in zip(counts, shares)]


@dataclass(frozen=True)
class ReadPlan:
    """The read tasks of one pass and how many records they read, per source. A task is a small dict:
    source, format, file, image root, and numpy arrays of its records' ordinals and locations (a
    few bytes per record, so a 665k-record plan stays a few MB on the driver)."""

    tasks: list[dict]
    records_per_source: dict[str, int]

    @property
    def num_records(self) -> int:
        return sum(self.records_per_source.values())

    def prefix(self, count: int) -> "ReadPlan":
        """The plan of the first `count` records in planned order: the same rows in the same order
        as this plan's first `count`, from only the tasks they are in (the last one cut). A pass
        that needs a few samples of a large split reads those, not every task's records."""
        tasks, left = [], count
        for task in self.tasks:
            if left <= 0:
                break
            size = len(task["ordinals"])
            tasks.append(task if size <= left else _task_prefix(task, left))
            left -= size
        per_source: dict[str, int] = dict.fromkeys(self.records_per_source, 0)
        for task in tasks:
            for part in task.get("parts", [task]):
                per_source[part["source"]] += len(part["ordinals"])
        return ReadPlan(tasks, per_source)


def plan_reads(
    catalogs: Sequence[SourceCatalog],
    *,
    hops: Sequence[int] | None,
    mix: bool,
    seed: int,
    records_per_task: int,
    shuffle: bool = False,
    shuffle_block_records: int = 1,
) -> ReadPlan:
    """Selects records (split, `hops`), draws the mix (`mix`: per-source rates from the weights,
    decided by a hash of (seed, source, ordinal)), and groups the kept records into read tasks of
    at most `records_per_task` records.

    Without `shuffle` a task holds consecutive records of one file (Parquet: of one row group).
    With `shuffle` the plan is the shuffle: the driver permutes shuffle units (blocks of
    `shuffle_block_records` consecutive JSON records; Parquet row groups) over every source,
    seeded by `seed`, groups consecutive units into tasks and permutes the records inside each
    task. Consumers see the planned order (order is preserved downstream), so the shuffle is the
    same on every run and no all-to-all exchange stands before the first batch."""
    selected = [catalog.select(hops) for catalog in catalogs]
    empty = [c.source.label for c, s in zip(catalogs, selected) if not s.any()]
    if empty:
        levels = list(hops) if hops is not None else "any"
        raise ValueError(
            f"sources {empty} have no records in their split with hop levels {levels}: "
            "check each source's `split` and the curriculum stage's hops"
        )
    counts = [int(s.sum()) for s in selected]
    rates = mixing_rates([c.source.weight for c in catalogs], counts) if mix else [1.0] * len(catalogs)
    parts: list[dict] = []
    records_per_source: dict[str, int] = {}
    for index, (catalog, wanted, rate) in enumerate(zip(catalogs, selected, rates)):
        ordinals = np.arange(catalog.num_records)
        draw = (hash_uniform(seed, index, ordinals).astype(np.float64) / 2.0**64 < rate) | (rate >= 1.0)
        unreadable = (catalog.split == UNREADABLE) | (catalog.hop < 0)
        kept = np.flatnonzero(wanted & (draw | unreadable))
        records_per_source[catalog.source.label] = len(kept)
        json_block = shuffle_block_records if shuffle else records_per_task
        parts.extend(_group_into_parts(catalog, kept, json_block=json_block, records_per_part=records_per_task))
    if not shuffle:
        return ReadPlan(parts, records_per_source)
    return ReadPlan(_shuffled_tasks(parts, records_per_task, np.random.default_rng(seed)), records_per_source)


def _group_into_parts(catalog: SourceCatalog, kept: np.ndarray, *, json_block: int, records_per_part: int) -> list[dict]:
    """Consecutive kept records of one file as read parts: JSON in blocks of `json_block` records,
    Parquet in row-group pieces of at most `records_per_part` records."""
    source = catalog.source
    base = {"source": source.label, "format": source.format, "image_root": source.image_root}
    if source.format == "llava_json":
        return [
            {**base, "uri": catalog.files[0], "ordinals": chunk, "byte_ranges": catalog.locator[chunk, 1:]}
            for chunk in np.split(kept, np.arange(json_block, len(kept), json_block))
            if len(chunk)
        ]
    parts = []
    group_of = catalog.locator[kept, 0] * (1 << 32) + catalog.locator[kept, 1]
    for group in np.unique(group_of):
        in_group = kept[group_of == group]
        for chunk in np.split(in_group, np.arange(records_per_part, len(in_group), records_per_part)):
            file_index, row_group = (int(x) for x in catalog.locator[chunk[0], :2])
            parts.append({
                **base, "uri": catalog.files[file_index], "row_group": row_group, "ordinals": chunk, "rows": catalog.locator[chunk, 2]
            })
    return parts


def _shuffled_tasks(units: list[dict], records_per_task: int, rng: np.random.Generator) -> list[dict]:
    """Tasks of about `records_per_task` records from the units in a seeded random order; the
    parts of one file in a task are merged (one coalesced read), and `order` permutes the task's
    rows. `ordinals` lists the task's records in the order it yields them."""
    tasks, pending, size = [], [], 0
    for position in rng.permutation(len(units)):
        pending.append(units[position])
        size += len(units[position]["ordinals"])
        if size >= records_per_task:
            tasks.append(_merge_units(pending, rng))
            pending, size = [], 0
    if pending:
        tasks.append(_merge_units(pending, rng))
    return tasks


def _merge_units(units: list[dict], rng: np.random.Generator) -> dict:
    merged: dict[tuple, dict] = {}
    for unit in units:
        key = (unit["source"], unit["uri"], unit.get("row_group"))
        if key not in merged:
            merged[key] = dict(unit)
            continue
        part = merged[key]
        part["ordinals"] = np.concatenate([part["ordinals"], unit["ordinals"]])
        for name in ("byte_ranges", "rows"):
            if name in unit:
                part[name] = np.concatenate([part[name], unit[name]])
    parts = list(merged.values())
    ordinals = np.concatenate([part["ordinals"] for part in parts])
    order = rng.permutation(len(ordinals))
    return {"parts": parts, "order": order, "ordinals": ordinals[order], "uris": sorted({p["uri"] for p in parts})}


_PER_RECORD = ("ordinals", "byte_ranges", "rows")


def _task_prefix(task: dict, count: int) -> dict:
    """The task that yields the first `count` rows of `task`, in the same order."""
    if "parts" not in task:
        return {**task, **{name: task[name][:count] for name in _PER_RECORD if name in task}}
    # Row i of a shuffled task is row order[i] of its parts read one after another: keep the rows
    # the first `count` positions name (in file order within each part, so reads still coalesce).
    wanted = task["order"][:count]
    parts, renumber, start, kept = [], np.full(len(task["order"]), -1), 0, 0
    for part in task["parts"]:
        size = len(part["ordinals"])
        local = np.sort(wanted[(wanted >= start) & (wanted < start + size)]) - start
        if len(local):
            renumber[local + start] = kept + np.arange(len(local))
            parts.append({**part, **{name: part[name][local] for name in _PER_RECORD if name in part}})
            kept += len(local)
        start += size
    return {"parts": parts, "order": renumber[wanted], "ordinals": task["ordinals"][:count],
            "uris": sorted({p["uri"] for p in parts})}


class UnreadableImage(Exception):
    """An image a record names that cannot be read; `reason` is the record's reject code:
    `missing-image` (no such file, a folder, an impossible name) or `image-outside-root` (`..`,
    an absolute path, or a symlink leading out of the image root)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class ImageStore:
    """Reads the images records name, from a folder or a `.zip` archive, local or on S3, and never
    outside that root. Keeps the last image read: questions about one image sit next to each
    other in LLaVA-style files."""

    def __init__(self, root: str):
        self.root = root
        self._fs, self._path = storage.arrow_filesystem(root)
        self._local = not storage.is_s3(root)
        self._real_root = os.path.realpath(self._path) if self._local else None
        self._zip: zipfile.ZipFile | None = None
        self._zip_handle = None
        self._last: tuple[str, bytes] | None = None

    def read(self, name: str) -> bytes:
        """The bytes of image `name` (relative to the root); `UnreadableImage` if it is not there,
        is not a file, or lies outside the root."""
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        if "\x00" in name or not name.strip():
            raise UnreadableImage("missing-image", f"{name!r} is not a file name")
        relative = posixpath.normpath(name.replace("\\", "/"))
        if relative.startswith("../") or relative == ".." or posixpath.isabs(relative):
            raise UnreadableImage("image-outside-root", f"{name!r} points outside the image root {self.root}")
        data = self._read_zip(relative) if self.root.lower().endswith(".zip") else self._read_file(relative)
        self._last = (name, data)
        return data

    def _read_zip(self, relative: str) -> bytes:
        if self._zip is None:
            # A random-access handle: on S3 each member read is a ranged GET, not a full download.
            self._zip_handle = self._fs.open_input_file(self._path)
            self._zip = zipfile.ZipFile(self._zip_handle)
        try:
            return self._zip.read(relative)
        except KeyError:
            raise UnreadableImage("missing-image", f"{relative!r} is not in {self.root}") from None

    def _read_file(self, relative: str) -> bytes:
        if self._local:
            return self._read_local_file(relative)
        import pyarrow.fs as pafs

        path = f"{self._path.rstrip('/')}/{relative}"
        try:
            with self._fs.open_input_file(path) as handle:
                return handle.read()
        except OSError:
            # Only a confirmed absence is a missing image; a network error stays an error.
            kind = self._fs.get_file_info(path).type
            if kind == pafs.FileType.NotFound:
                raise UnreadableImage("missing-image", f"{relative!r} not found in {self.root}") from None
            if kind == pafs.FileType.Directory:
                raise UnreadableImage("missing-image", f"{relative!r} is a folder in {self.root}, not an image file") from None
            raise

    def _read_local_file(self, relative: str) -> bytes:
        # Symlinks are resolved before the check: a link inside the root may lead anywhere.
        real = os.path.realpath(os.path.join(self._path, relative))
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            raise UnreadableImage("image-outside-root", f"{relative!r} is a symlink to {real}, outside the image root {self.root}")
        try:
            with open(real, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise UnreadableImage("missing-image", f"{relative!r} not found in {self.root}") from None
        except IsADirectoryError:
            raise UnreadableImage("missing-image", f"{relative!r} is a folder in {self.root}, not an image file") from None
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                raise UnreadableImage("missing-image", f"{relative[:80]!r}... is too long for a file name") from None
            raise

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip_handle.close()

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


READ_COLUMNS = ("source", "ordinal", "record", "image", "read_error")


def read_task_rows(task: dict):
    """Runs one read task: the uniform rows (a pyarrow Table, `READ_COLUMNS`) of its records, in
    the planned order."""
    import pyarrow as pa

    if "parts" not in task:
        return _read_part_rows(task)
    table = pa.concat_tables([_read_part_rows(part) for part in task["parts"]])
    return table.take(pa.array(task["order"]))


def _read_part_rows(task: dict):
    import pyarrow as pa

    if task["format"] == "llava_json":
        records, images, errors = _read_json_task(task)
    else:
        records, images, errors = _read_parquet_task(task)
    ordinals = task["ordinals"]
    return pa.table({
        "source": pa.array([task["source"]] * len(ordinals), pa.string()),
        "ordinal": pa.array(ordinals, pa.int64()),
        "record": pa.array(records, pa.binary()),
        "image": pa.array(images, pa.binary()),
        "read_error": pa.array(errors, pa.string()),
    })


# Records closer than this are read in one request (the bytes between are read and dropped): a
# few ranged reads for consecutive records, one per record for a scattered (shuffled) task.
COALESCE_GAP_BYTES = 64 * 1024


def read_byte_ranges(handle, ranges: np.ndarray) -> list[bytes]:
    """The bytes of each `[start, end)` row of `ranges` (any order), reading nearby ranges together."""
    by_start = np.argsort(ranges[:, 0], kind="stable")
    out: list[bytes] = [b""] * len(ranges)
    i = 0
    while i < len(by_start):
        j = i
        low, high = int(ranges[by_start[i], 0]), int(ranges[by_start[i], 1])
        while j + 1 < len(by_start) and int(ranges[by_start[j + 1], 0]) - high <= COALESCE_GAP_BYTES:
            j += 1
            high = max(high, int(ranges[by_start[j], 1]))
        blob = handle.read_at(high - low, low)
        for k in by_start[i : j + 1]:
            start, end = int(ranges[k, 0]) - low, int(ranges[k, 1]) - low
            out[k] = blob[start:end]
        i = j + 1
    return out


def _read_json_task(task: dict):
    fs, path = storage.arrow_filesystem(task["uri"])
    with fs.open_input_file(path) as handle:
        raws = read_byte_ranges(handle, np.asarray(task["byte_ranges"]))
    records, images, errors = [], [], []
    with ImageStore(task["image_root"]) as store:
        for raw in raws:
            value = parse_record(raw)
            image, error = None, ""
            if value is not None and isinstance(value.get("image"), str):
                try:
                    image = store.read(value["image"])
                except UnreadableImage as err:
                    error = str(err)
            records.append(raw)
            images.append(image)
            errors.append(error)
    return records, images, errors


def _read_parquet_task(task: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(task["uri"])
    with fs.open_input_file(path) as handle:
        table = pq.ParquetFile(handle).read_row_group(task["row_group"])
    rows = table.take(pa.array(task["rows"])).to_pylist()
    records, images, errors = [], [], []
    for row in rows:
        try:
            record, image = row_to_record(row)
            records.append(json.dumps(record).encode())
            images.append(image)
            errors.append("")
        except (UnrepresentableRecord, TypeError, ValueError) as err:  # TypeError: a column JSON cannot hold (bytes)
            reason, detail = (err.reason, err.detail) if isinstance(err, UnrepresentableRecord) else ("malformed-record", f"not a LLaVA record: {err}")
            records.append(repr({k: v for k, v in row.items() if k != "image"}).encode())
            images.append(None)
            errors.append(f"{reason}: {detail}")
    return records, images, errors
