"""The run manifest: written after every step, so a resubmitted job resumes where it stopped and
never redoes a finished step."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from ckd_ray import storage
from ckd_ray.config.job import JobConfig

# Fields that do not change what a step computes: a resubmission may differ in them.
_RUNTIME_ONLY = ("ray", "observability", "tune")


def config_hash(job: JobConfig) -> str:
    """Identifies what a run computes: the config without its runtime-only sections. Values left
    at their defaults do not enter it, so a release that adds a config field (with a default that
    keeps the old behaviour) still resumes the runs an older release started."""
    data = job.model_dump(mode="json", exclude=set(_RUNTIME_ONLY), exclude_defaults=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ManifestMismatchError(RuntimeError):
    """The run folder holds a manifest of a different config."""


class CorruptManifestError(RuntimeError):
    """The run folder's manifest is truncated or its bytes differ from those written: it is
    refused, never read in part (a resume from it could redo or skip steps)."""


def _body_text(body: dict) -> str:
    return json.dumps(body, indent=2, default=str)


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read_checked(uri: str) -> dict:
    """The manifest's fields, after checking the sha256 it was written with (a manifest written
    before checksums has none and is read as it is)."""
    fix = f"restore {uri} from a copy, or delete the run folder to start the run again"
    try:
        data = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptManifestError(f"{uri} is not valid JSON (truncated or corrupted: {err}): {fix}") from None
    if not isinstance(data, dict):
        raise CorruptManifestError(f"{uri} is not a manifest (a JSON {type(data).__name__}): {fix}")
    recorded = data.pop("sha256", None)
    if recorded is not None and recorded != _checksum(_body_text(data)):
        raise CorruptManifestError(f"{uri} does not match the sha256 it was written with (corrupted on storage): {fix}")
    return data


@dataclass
class Manifest:
    """`steps[step_id]` holds status, stage, step, learner, teacher, model URI, metrics, times;
    `roles[role]` is the latest checkpoint URI of each role; `evaluations[name]` the scores of an
    evaluated checkpoint, and `baselines[name]` those of the no-model answerers on the same samples."""

    uri: str
    job: str
    config_hash: str
    steps: dict[str, dict] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    evaluations: dict[str, dict] = field(default_factory=dict)
    baselines: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, run_uri: str, job: JobConfig) -> "Manifest":
        uri = storage.join(run_uri, "manifest.json")
        digest = config_hash(job)
        if not storage.exists(uri):
            return cls(uri=uri, job=job.name, config_hash=digest)
        data = _read_checked(uri)
        if data["config_hash"] != digest:
            raise ManifestMismatchError(
                f"{uri} was written by a different config (hash {data['config_hash']}, this one {digest}): "
                "resuming would mix two experiments. Use a new `name` (or --set name=...), or delete the run folder"
            )
        return cls(uri=uri, job=data["job"], config_hash=digest, steps=data["steps"], roles=data["roles"],
                   evaluations=data.get("evaluations", {}), baselines=data.get("baselines", {}))

    @classmethod
    def read(cls, run_uri: str) -> "Manifest":
        """A run's manifest as written, whatever config wrote it (to read a finished run's results;
        resuming goes through `open`, which checks the config)."""
        data = _read_checked(storage.join(run_uri, "manifest.json"))
        return cls(uri=storage.join(run_uri, "manifest.json"), job=data["job"], config_hash=data["config_hash"], steps=data["steps"],
                   roles=data["roles"], evaluations=data.get("evaluations", {}), baselines=data.get("baselines", {}))

    def done(self, step_id: str) -> bool:
        return self.steps.get(step_id, {}).get("status") == "done"

    def record(self, step_id: str, **entry) -> None:
        self.steps[step_id] = {**self.steps.get(step_id, {}), **entry, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save()

    def save(self) -> None:
        body = {"job": self.job, "config_hash": self.config_hash, "roles": self.roles, "steps": self.steps,
                "evaluations": self.evaluations, "baselines": self.baselines}
        # The checksum covers the fields as written; it leads so a reader sees it first.
        checksum = _checksum(_body_text(body))
        storage.write_bytes(self.uri, _body_text({"sha256": checksum, **body}).encode())
