"""Bad records are skipped, counted and written with their reason to a rejects file (JSONL); the job
fails only when they exceed `data.max_reject_fraction` of the records read. Nothing is dropped silently."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from ckd_ray import storage

MAX_RECORD_CHARS = 2000  # a rejected record is kept as a repr truncated to this many characters


@dataclass(frozen=True)
class Reject:
    """One skipped record: where it came from, why, and (a truncated repr of) what it was.
    `reason` is a short code (`missing-image`, `image-outside-root`, `corrupt-image`, `image-too-large`,
    `malformed-json`, `malformed-record`, `no-response`, `image-placeholders`, `non-utf8`,
    `over-length`); `detail` says more."""

    source: str
    ordinal: int
    sample_id: str | None
    reason: str
    detail: str
    record: str

    @classmethod
    def of(cls, source: str, ordinal: int, sample_id: str | None, reason: str, detail: str, raw: bytes | str) -> "Reject":
        text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
        if len(text) > MAX_RECORD_CHARS:
            text = text[:MAX_RECORD_CHARS] + f"... [{len(text) - MAX_RECORD_CHARS} more characters]"
        return cls(source, int(ordinal), sample_id, reason, detail, text)

    def to_json(self) -> dict:
        return {
            "sample_id": self.sample_id,
            "source": self.source,
            "ordinal": self.ordinal,
            "reason": self.reason,
            "detail": self.detail,
            "record": self.record,
        }


@dataclass(frozen=True)
class RejectSummary:
    """Counts after (part of) a pass: `num_records` is how many records the pass reads in all."""

    num_records: int
    num_rejected: int
    num_truncated: int
    reasons: dict[str, int]
    max_fraction: float
    rejects_uri: str

    @property
    def fraction(self) -> float:
        return self.num_rejected / self.num_records if self.num_records else 0.0

    @property
    def exceeded(self) -> bool:
        return self.num_rejected > self.max_fraction * self.num_records

    def raise_if_exceeded(self) -> "RejectSummary":
        if self.exceeded:
            raise TooManyRejectsError(self.num_rejected, self.num_records, self.max_fraction, self.rejects_uri, self.reasons)
        return self


class TooManyRejectsError(RuntimeError):
    """More records were rejected than `data.max_reject_fraction` allows."""

    def __init__(self, num_rejected: int, num_records: int, max_fraction: float, rejects_uri: str, reasons: dict | None = None):
        super().__init__(num_rejected, num_records, max_fraction, rejects_uri, reasons or {})
        self.num_rejected, self.num_records = num_rejected, num_records
        self.max_fraction, self.rejects_uri, self.reasons = max_fraction, rejects_uri, reasons or {}

    def __reduce__(self):
        # Ray Data appends to `args` on the way out of a task; rebuild from the fields instead,
        # so the driver unpickles this error rather than an UnserializableException.
        return type(self), (self.num_rejected, self.num_records, self.max_fraction, self.rejects_uri, self.reasons)

    def __str__(self) -> str:
        fraction = self.num_rejected / max(self.num_records, 1)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (
            f"{self.num_rejected} of {self.num_records} records rejected ({fraction:.2%}), more than "
            f"data.max_reject_fraction={self.max_fraction} allows ({reasons}); each rejected record and its "
            f"reason is in {self.rejects_uri}: fix those records, or raise data.max_reject_fraction"
        )


class RejectsLog:
    """Collects the rejects of one pass over `num_records` records. Rejects are keyed by (source,
    ordinal), so a record rejected again in a later epoch or a retried task counts once.

    Used in-process by the plain loop and as a Ray actor (`ray.remote(RejectsLog)`) shared by all
    preprocessing tasks of a Ray Data pipeline."""

    def __init__(self, rejects_uri: str, num_records: int, max_fraction: float):
        self.rejects_uri = rejects_uri
        self.num_records = num_records
        self.max_fraction = max_fraction
        self._rejects: dict[tuple[str, int], Reject] = {}
        self._truncated: set[tuple[str, int]] = set()

    def add(self, rejects: list[Reject], truncated: list[tuple[str, int]] = ()) -> RejectSummary:
        """Records a batch's rejects and truncations. When the total can no longer stay within the
        threshold, writes the rejects file at once, so the failing job can point to it."""
        for reject in rejects:
            self._rejects[(reject.source, reject.ordinal)] = reject
        self._truncated.update((source, int(ordinal)) for source, ordinal in truncated)
        summary = self.summary()
        if summary.exceeded:
            self.write()
        return summary

    def summary(self) -> RejectSummary:
        return RejectSummary(
            num_records=self.num_records,
            num_rejected=len(self._rejects),
            num_truncated=len(self._truncated),
            reasons=dict(Counter(r.reason for r in self._rejects.values())),
            max_fraction=self.max_fraction,
            rejects_uri=self.rejects_uri,
        )

    def write(self) -> None:
        """Writes every reject so far as JSONL (ordered by source and ordinal) to `rejects_uri`. An
        empty file is written too: its presence says the pass ran and rejected nothing."""
        lines = [json.dumps(self._rejects[key].to_json()) + "\n" for key in sorted(self._rejects)]
        storage.write_bytes(self.rejects_uri, "".join(lines).encode())

    def close(self) -> RejectSummary:
        """Ends the pass: writes the rejects file and returns the final counts."""
        self.write()
        return self.summary()

    def rejects(self) -> list[Reject]:
        return [self._rejects[key] for key in sorted(self._rejects)]


class RejectsBook:
    """The RejectsLogs of several passes in one Ray actor, keyed by rejects file: a job's passes
    share one actor process instead of starting one each."""

    def __init__(self):
        self._logs: dict[str, RejectsLog] = {}

    def open(self, rejects_uri: str, num_records: int, max_fraction: float) -> None:
        self._logs[rejects_uri] = RejectsLog(rejects_uri, num_records, max_fraction)

    def add(self, rejects_uri: str, rejects: list[Reject], truncated: list[tuple[str, int]] = ()) -> RejectSummary:
        return self._logs[rejects_uri].add(rejects, truncated)

    def close(self, rejects_uri: str) -> RejectSummary:
        return self._logs[rejects_uri].close()
