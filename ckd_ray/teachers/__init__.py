"""Teacher actor pools and the compressed teacher signal they add to each batch.

The names below load on first use: a process that only reads the signal cache or holds the pool's
stage (a Ray Data coordinator, a read task) imports `ckd_ray.teachers.cache` or `.pool` without
`.signal`, and so without torch (about 1 CPU-s per process)."""

from ckd_ray.lazy import lazy_exports

_EXPORTS = {
    "SignalCache": ".cache", "cache_key": ".cache", "teacher_checkpoint_hash": ".cache",
    "SignalSpec": ".config", "TeacherPoolConfig": ".config",
    "TeacherActor": ".pool", "TeacherSource": ".pool", "add_teacher_stage": ".pool",
    "SIGNAL_VERSION": ".signal", "bytes_per_sample": ".signal", "decode_signal": ".signal", "spec_fingerprint": ".signal",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
