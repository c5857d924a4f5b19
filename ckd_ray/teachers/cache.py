"""Teacher signal cache: one teacher pass written as Parquet, reused by later steps and by every
Ray Tune trial of a stage.

An entry is keyed by the data it covers (sources, split, curriculum filter, preprocessing), the
teacher checkpoint's content hash and the signal spec's fingerprint; rows inside it are keyed by
`sample_id`. A different key never reads an entry. An entry becomes visible only when its marker
file is written after all its parts, so a crashed write is never read back as a partial pass; the
marker records each part's sha256, checked when the part is read, so a part truncated or changed
on storage is refused instead of feeding wrong signal to training.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
import time
import uuid
from pathlib import Path

from ckd_ray import storage
from ckd_ray.errors import require_ray

MARKER = "_COMPLETE.json"
FAILED = "_FAILED.json"
_SAMPLE_BYTES = 1 << 20


def teacher_checkpoint_hash(model_uri: str) -> str:
    """A content hash of a model directory: config.json, and per weights file its name, size and
    the first and last MiB (a changed checkpoint changes its tensor bytes; reading 15 GB of a 7B
    model on every lookup would not pay). For S3 the objects' ETags and sizes are used."""
    digest = hashlib.sha256()
    if storage.is_s3(model_uri):
        loc = storage.parse(model_uri)
        for rel, obj in sorted(storage._s3_objects(loc)):
            if rel.endswith((".safetensors", ".json")):
                digest.update(f"{rel}:{obj['Size']}:{obj['ETag']}".encode())
        return digest.hexdigest()[:16]
    root = Path(storage.parse(model_uri).path)
    files = sorted(root.glob("*.safetensors")) + [root / "config.json"]
    for file in files:
        if not file.exists():
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                handle.seek(-_SAMPLE_BYTES, 2)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def cache_key(data_fingerprint: str, teacher_hash: str, spec_fingerprint: str) -> str:
    return f"t{teacher_hash}-s{spec_fingerprint}-d{data_fingerprint}"


class CorruptCacheEntry(RuntimeError):
    """A cache entry holds what the cache never writes (a marker that is not its JSON, a file
    that is not Parquet): it is refused, never partly read."""


class TeacherPassFailed(RuntimeError):
    """The pass that was writing an entry failed; whoever waited for the entry gets its error."""


class SignalCache:
    """Entries under `root_uri` (local or s3://), one folder per key."""

    def __init__(self, root_uri: str):
        self.root_uri = root_uri

    def _marker_uri(self, key: str) -> str:
        return storage.join(self.root_uri, key, MARKER)

    def lookup(self, key: str) -> dict | None:
        """The entry's marker (parts folder, row count, key parts) if complete, else None."""
        marker = self._marker_uri(key)
        if not storage.exists(marker):
            return None
        try:
            entry = json.loads(storage.read_bytes(marker))
        except (ValueError, RecursionError):
            entry = None
        if not isinstance(entry, dict) or not re.fullmatch(r"parts-[0-9a-f]+", str(entry.get("parts"))):
            raise CorruptCacheEntry(
                f"signal cache marker {marker} is not the JSON this cache writes: delete "
                f"{storage.join(self.root_uri, key)} (the next step recomputes the teacher pass)"
            )
        return entry

    def wait_for(self, key: str, poll_s: float = 0.5) -> None:
        """Blocks until the entry of `key` is complete (a pass elsewhere is writing it); raises
        TeacherPassFailed with the pass's error if its writer recorded one."""
        while self.lookup(key) is None:
            failed = self._failed_uri(key)
            if storage.exists(failed):
                raise TeacherPassFailed(f"the teacher pass writing signal cache entry {key} failed: "
                                        f"{json.loads(storage.read_bytes(failed)).get('error')}")
            time.sleep(poll_s)

    def clear_failure(self, key: str) -> None:
        """Forgets the failure an earlier pass recorded for `key` (before a new pass, and before
        anyone waits for it)."""
        storage.delete(self._failed_uri(key))

    def read(self, key: str):
        """The entry's rows in the order they were written, one read task per Parquet file. The
        files are listed here, on the caller (read_parquet's listing task cost seconds before the
        first batch of every step that reads the cache)."""
        uris = self._entry_files(key)  # refused entries fail here, on the caller
        return _entry_dataset(lambda: uris, len(uris))

    def read_when_ready(self, ticket_uri: str):
        """The rows of the entry a pass still to run will name in its ticket (`write_ticket`):
        its files are listed when the dataset first executes, after `wait_for_ticket`, so a
        worker group can start, and train other steps, before the pass (or even its teacher)
        exists. The entry's key may not be known yet: it hashes a teacher checkpoint the group
        itself may still have to train."""
        return _entry_dataset(partial(self._ticket_files, ticket_uri), 1, pending=lambda: not storage.exists(ticket_uri))

    def write_ticket(self, ticket_uri: str, *, key: str | None = None, error: str | None = None) -> None:
        """Names the complete entry a deferred pass made (or found), or records why it failed."""
        storage.write_bytes(ticket_uri, json.dumps({"key": key} if error is None else {"error": error}).encode())

    def run_ticketed(self, ticket_uri: str, produce) -> str:
        """Runs `produce()` (a pass: returns the key of the complete entry it wrote or found)
        and writes its ticket: the key, or the error it raised (then re-raised), so the workers
        waiting for the ticket never wait for a pass that is no longer running."""
        try:
            key = produce()
        except BaseException as err:
            from ckd_ray.errors import describe_error

            self.write_ticket(ticket_uri, error=describe_error(err))
            raise
        self.write_ticket(ticket_uri, key=key)
        return key

    def wait_for_ticket(self, ticket_uri: str, poll_s: float = 0.5) -> str:
        """Blocks until the pass of `ticket_uri` has written its ticket; returns the key of its
        complete entry, or raises TeacherPassFailed with the pass's error."""
        while not storage.exists(ticket_uri):
            time.sleep(poll_s)
        ticket = json.loads(storage.read_bytes(ticket_uri))
        if ticket.get("error") is not None or not ticket.get("key"):
            raise TeacherPassFailed(f"the teacher pass of {ticket_uri} failed: {ticket.get('error')}")
        self.wait_for(ticket["key"])
        return ticket["key"]

    def _ticket_files(self, ticket_uri: str) -> list[tuple[str, str | None]]:
        return self._entry_files(self.wait_for_ticket(ticket_uri))

    def _entry_files(self, key: str) -> list[tuple[str, str | None]]:
        """(uri, sha256 the marker records or None) of each Parquet part, in written order."""
        import pyarrow.dataset as pads

        entry = self.lookup(key)
        if entry is None:
            raise KeyError(f"no complete signal cache entry {key!r} under {self.root_uri}")
        parts_uri = storage.join(self.root_uri, key, entry["parts"])
        filesystem, path = storage.arrow_filesystem(parts_uri)
        files = sorted(pads.dataset(path, filesystem=filesystem, format="parquet").files)  # written with ordered names
        foreign = [file.rsplit("/", 1)[-1] for file in files if not file.endswith(".parquet")]
        if foreign:
            # Only Parquet is ever read from the cache; a pickle or anything else in an entry was
            # not written by it, so the entry is refused rather than partly read.
            raise CorruptCacheEntry(
                f"signal cache entry {parts_uri} holds files this cache never writes ({', '.join(foreign[:5])}): "
                f"the cache is read as Parquet only and never unpickled; delete {storage.join(self.root_uri, key)} "
                "(the next step recomputes the teacher pass)"
            )
        names = [file.rsplit("/", 1)[-1] for file in files]
        checksums = entry.get("sha256")  # None in entries written before checksums
        if checksums is not None and sorted(checksums) != names:
            missing = sorted(set(checksums) - set(names)) or ["none"]
            raise CorruptCacheEntry(
                f"signal cache entry {parts_uri} does not hold the files its marker lists (missing: {', '.join(missing[:5])}; "
                f"found: {', '.join(names[:5])}): delete {storage.join(self.root_uri, key)} (the next step recomputes the teacher pass)"
            )
        uris = [storage.join(parts_uri, name) for name in names]
        expected = [checksums[name] if checksums is not None else None for name in names]

        return list(zip(uris, expected))

    def write(self, dataset, key: str, metadata: dict) -> dict:
        """Runs `dataset` (the teacher pass) to Parquet under a fresh parts folder, then writes the
        marker that makes the entry visible. If the pass fails, its error is recorded beside the
        entry (a reader waiting for the entry gets it) and raised."""
        parts = f"parts-{uuid.uuid4().hex[:8]}"
        filesystem, path = storage.arrow_filesystem(storage.join(self.root_uri, key, parts))
        start = time.perf_counter()
        try:
            dataset.write_parquet(path, filesystem=filesystem)
        except BaseException as err:
            from ckd_ray.errors import describe_error

            storage.write_bytes(self._failed_uri(key), json.dumps({"error": describe_error(err)}).encode())
            raise
        written = self._count_rows(key, parts)
        checksums = self._checksums(key, parts)  # reads the parts back once: what storage now holds
        entry = {"key": key, "parts": parts, "num_rows": written, "seconds": round(time.perf_counter() - start, 3), **metadata,
                 "sha256": checksums}
        storage.write_bytes(self._marker_uri(key), json.dumps(entry, indent=2).encode())
        return entry

    def _failed_uri(self, key: str) -> str:
        return storage.join(self.root_uri, key, FAILED)

    def _count_rows(self, key: str, parts: str) -> int:
        import pyarrow.dataset as pads

        filesystem, path = storage.arrow_filesystem(storage.join(self.root_uri, key, parts))
        return pads.dataset(path, filesystem=filesystem, format="parquet").count_rows()


    def _checksums(self, key: str, parts: str) -> dict[str, str]:
        import pyarrow.dataset as pads

        parts_uri = storage.join(self.root_uri, key, parts)
        filesystem, path = storage.arrow_filesystem(parts_uri)
        names = sorted(file.rsplit("/", 1)[-1] for file in pads.dataset(path, filesystem=filesystem, format="parquet").files)
        return {name: hashlib.sha256(storage.read_bytes(storage.join(parts_uri, name))).hexdigest() for name in names}


def _entry_dataset(list_files, num_blocks: int, pending=None):
    """A Dataset of the Parquet files `list_files()` names, one read task and one block per
    file, listed when the dataset's execution is planned. `num_blocks` only keeps Ray Data from
    splitting the files' blocks (it splits read tasks that number fewer than it asks for).
    `pending()` says the files are not written yet: `read_datasource` plans the read once when
    the dataset is made (for its statistics), and that first plan must not wait for them, so it
    gets one placeholder task; execution plans again, on its own copy, and waits in
    `list_files`."""
    import ray.data

    require_ray("reading the teacher signal cache")
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class CacheEntryFiles(Datasource):
        def __init__(self):
            self.uris = None
            self.made = False

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            if not self.made:
                self.made = True
                if pending is not None and pending():
                    return [ReadTask(_unplanned_read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))]
            self.uris = self.uris or list_files()
            return [ReadTask(partial(_read_parquet_file, uri, checksum), BlockMetadata(num_rows=None, size_bytes=None,
                                                                                       exec_stats=None, input_files=(uri,)))
                    for uri, checksum in self.uris]

    return ray.data.read_datasource(CacheEntryFiles(), override_num_blocks=num_blocks)


def _unplanned_read():
    raise RuntimeError("a signal cache read ran the plan made before its entry was written (Ray Data plans again before it executes)")


def _read_parquet_file(uri: str, checksum: str | None = None) -> list:
    """One part as an Arrow table; its bytes are read once, checked against `checksum` (the
    sha256 the marker records), then parsed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
        raise CorruptCacheEntry(
            f"signal cache part {uri} does not match the sha256 its marker records (truncated or corrupted on storage): "
            "delete its entry folder (the next step recomputes the teacher pass)"
        )
    return [pq.read_table(pa.BufferReader(data))]
