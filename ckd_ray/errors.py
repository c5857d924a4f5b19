"""Errors as a person reads them: the innermost cause, on one line."""

from __future__ import annotations


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
