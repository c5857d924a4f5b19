"""Ray's deferred task cancellation in a worker that inherited an ignored SIGINT, with and
without the project's worker setup hook: Ray's own `DeferSigint` in a fresh process."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

CANCEL_DURING_ARGUMENT_LOADING = r"""
import _thread, sys, time
from ray._private.utils import DeferSigint
if sys.argv[1] == "hook":
    from ckd_ray.cascade.worker_setup import restore_sigint_handler
    restore_sigint_handler()
try:
    with DeferSigint():  # as Ray wraps a task's argument deserialization
        _thread.interrupt_main()  # as Ray's cancellation of the task
        time.sleep(0.1)
    print("NOT CANCELLED")
except KeyboardInterrupt:
    print("CANCELLED")
except TypeError as error:
    print("TYPEERROR", error)
"""


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `ray start ... &` from a script passes on


@pytest.mark.parametrize("mode, expected", [
    ("no-hook", "TYPEERROR 'Handlers' object is not callable"),  # the error users saw
    ("hook", "CANCELLED"),
])
def test_cancelled_task_in_a_worker_with_ignored_sigint(mode, expected):
    completed = subprocess.run([sys.executable, "-c", CANCEL_DURING_ARGUMENT_LOADING, mode],
                               preexec_fn=_ignore_sigint, capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == expected, completed.stderr[-2000:]


def test_hook_keeps_a_handler_the_worker_already_has():
    from ckd_ray.cascade.worker_setup import restore_sigint_handler

    def own_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, own_handler)
    try:
        restore_sigint_handler()
        assert signal.getsignal(signal.SIGINT) is own_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_local_and_submitted_runs_name_the_hook():
    """Both ways a job gets its workers (a local `ray.init`, `ray job submit --runtime-env
    jobs/runtime_env.yaml`) name a hook that resolves to the function tested above."""
    import importlib
    from pathlib import Path

    import yaml

    from ckd_ray.cascade.session import WORKER_SETUP_HOOK
    from ckd_ray.cascade.worker_setup import restore_sigint_handler

    runtime_env = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "runtime_env.yaml").read_text())
    assert runtime_env["worker_process_setup_hook"] == WORKER_SETUP_HOOK
    module, name = WORKER_SETUP_HOOK.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is restore_sigint_handler
