"""What a long command shows: its own lines and progress bars on the console; everything the
libraries print (Ray's worker-group chatter, deprecation notices, DeepSpeed's accelerator notice,
checkpoint messages) in a log file named at the start and again on failure."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from ckd_ray import storage
from ckd_ray.cascade.manifest import ManifestMismatchError
from ckd_ray.errors import ConfigError, describe_error


def log_path_for(job) -> Path:
    """`<run folder>/logs/<command>-<time>.log` for a local run folder; a local temp folder for
    a run on S3 (the file is copied next to the run at the end)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(storage.parse(job.run_uri).path) if not storage.is_s3(job.run_uri) else Path(tempfile.gettempdir()) / "ckd_ray" / job.name
    return root / "logs" / f"driver-{stamp}.log"


# Errors whose message says what to change (a config problem, a run folder written by another
# config): the command exits 2 with that message instead of a traceback.
_USER_FIXES = (ConfigError, ManifestMismatchError)


@contextlib.contextmanager
def console(job, *, verbose: bool = False):
    """Yields `log(line)`: the line goes to the console (above any progress bar) and to the log.
    Unless `verbose`, Python-level output of everything else goes only to the log file (start Ray
    with log_to_driver=False too: worker output then stays in Ray's session logs). On an error the console gets its last line
    and the log file's path; the exception propagates."""
    from tqdm import tqdm

    path = log_path_for(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    with open(path, "a", buffering=1, encoding="utf-8") as file:

        def log(line: str) -> None:
            file.write(line + "\n")
            tqdm.write(line, file=terminal)

        log(f"[ckd-ray] log: {path}")
        saved = sys.stdout, sys.stderr
        saved_fd2 = None
        handler = logging.StreamHandler(file)
        handler.setLevel(logging.INFO)
        if not verbose:
            sys.stdout = sys.stderr = file
            # Ray's C++ core writes its warnings straight to file descriptor 2: send that to the
            # log too (the console's lines and bars go to the original stdout).
            saved_fd2 = os.dup(2)
            os.dup2(file.fileno(), 2)
            logging.captureWarnings(True)
            root = logging.getLogger()
            root.addHandler(handler)
            for name in ("ray", "ray.data", "ray.train", "ray.tune", "deepspeed", "transformers"):
                logger = logging.getLogger(name)
                logger.handlers = [handler]
                logger.propagate = False
            warnings.simplefilter("default")
        try:
            yield log
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:
            traceback.print_exc(file=file)
            user_fix = isinstance(err, _USER_FIXES)  # the message names the fix: all of it, exit 2, no traceback
            tqdm.write(f"[ckd-ray] failed: {err if user_fix else describe_error(err)}", file=terminal)
            tqdm.write(f"[ckd-ray] the full log: {path}", file=terminal)
            if user_fix:
                raise SystemExit(2) from None
            raise
        finally:
            sys.stdout, sys.stderr = saved
            if saved_fd2 is not None:
                os.dup2(saved_fd2, 2)
                os.close(saved_fd2)
            logging.getLogger().removeHandler(handler)
            if storage.is_s3(job.run_uri):
                with contextlib.suppress(Exception):
                    storage.write_bytes(storage.join(job.run_uri, "logs", path.name), path.read_bytes())


