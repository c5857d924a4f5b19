"""Teacher actor pools and the compressed teacher signal they add to each batch."""

from ckd_ray.teachers.cache import SignalCache, cache_key, teacher_checkpoint_hash
from ckd_ray.teachers.config import SignalSpec, TeacherPoolConfig
from ckd_ray.teachers.pool import TeacherActor, TeacherSource, add_teacher_stage, start_teacher_actor
from ckd_ray.teachers.signal import SIGNAL_VERSION, bytes_per_sample, decode_signal, spec_fingerprint

__all__ = [
    "SIGNAL_VERSION", "SignalCache", "SignalSpec", "TeacherActor", "TeacherPoolConfig", "TeacherSource",
    "add_teacher_stage", "bytes_per_sample", "cache_key", "decode_signal", "spec_fingerprint",
    "start_teacher_actor", "teacher_checkpoint_hash",
]
