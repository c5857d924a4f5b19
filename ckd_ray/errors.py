"""The project's error types (a config problem: field, what is wrong, how to fix it) and errors as a
person reads them: the innermost cause, on one line. The ground floor: it imports nothing of the
project, so every layer can raise these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: the dotted field, what is wrong, and how to fix it."""

    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" + (f" -> fix: {self.fix}" if self.fix else "")


class ConfigError(ValueError):
    """Every problem found in a config, raised once."""

    def __init__(self, problems: list[Problem], source: str = "config"):
        self.problems = problems
        lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {source}:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def describe_error(err: BaseException) -> str:
    """The innermost cause of an error as one line: Ray wraps a task's or worker's exception
    (RayTaskError, WorkerGroupError, TrainingFailedError) around the one that says what is wrong."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if isinstance(inner, BaseException):
            err = inner
            continue
        errors = getattr(err, "worker_failures", None) or getattr(err, "errors", None)
        if isinstance(errors, dict) and errors:
            err = next(iter(errors.values()))
            continue
        break
    lines = [line for line in str(err).strip().splitlines() if line.strip() and not line.startswith(("To change retry", "Traceback"))]
    text = next((line for line in reversed(lines) if ": " in line or "Error" in line), lines[-1] if lines else "")
    return f"{type(err).__name__}: {text[:500]}"


class RayNotConnectedError(RuntimeError):
    """A function that needs a Ray cluster was called in a process that has not connected to one."""


def require_ray(what: str) -> None:
    """Raises RayNotConnectedError unless this process is connected to Ray. The package never lets
    Ray connect itself: its implicit `ray.init()` joins whatever cluster `/tmp/ray/ray_current_cluster`
    names, and when that head has died it retries the dead address for minutes with no output."""
    import ray

    if not ray.is_initialized():
        raise RayNotConnectedError(
            f"{what} needs a Ray cluster, and this process is not connected to one: call "
            "ckd_ray.cascade.session.connect_ray(job.ray) first (a new local Ray, or the cluster that "
            "ray.address or RAY_ADDRESS names), or ray.init(address=...) with the cluster you mean"
        )
