"""`worker_process_setup_hook` of the job's Ray workers (see `connect_ray` and
jobs/runtime_env.yaml): runs once in every worker process before it executes a task."""

from __future__ import annotations

import signal


def restore_sigint_handler() -> None:
    """Gives the worker Python's own SIGINT handler when it inherited an ignored or default one.

    Ray cancels a task by interrupting its worker's main thread; while the task's arguments are
    deserialized it defers that interrupt and afterwards calls the SIGINT handler saved on entry.
    A raylet started from a non-interactive shell or a background job (`ray start ... &`) passes
    an ignored SIGINT on to its workers, and that saved handler is then `signal.SIG_IGN`, which
    is not callable: every task Ray Data cancels at the end of a pass logged
    "Unhandled error ... TypeError: 'Handlers' object is not callable" instead of stopping."""
    if not callable(signal.getsignal(signal.SIGINT)):
        signal.signal(signal.SIGINT, signal.default_int_handler)
