"""A stand-in for NVML's Python binding (`pynvml`, the nvidia-ml-py package) on a machine without
a GPU, for the Prometheus test only: the project's GPU sampler (`ckd_ray.observability.GpuSampler`)
imports it in place of the real module when this folder comes first on PYTHONPATH. Everything
past this boundary stays real: the sampler's thread, the recorders, Ray's metrics export and
Prometheus.

It answers only the calls the sampler makes, with fixed readings from the environment variable
`CKD_NVML_STANDIN`, a JSON list of devices: `[{"utilization": 37, "memory_used": 123456}, ...]`
(index = position; UUID `GPU-standin-<index>`). What it does not show: a real driver's readings
moving with the work, MIG devices, errors a real driver returns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class NVMLError(Exception):
    pass


@dataclass(frozen=True)
class _Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


_devices: list[dict] | None = None


def _require() -> list[dict]:
    if _devices is None:
        raise NVMLError("NVML stand-in: nvmlInit was not called")
    return _devices


def nvmlInit() -> None:
    global _devices
    _devices = json.loads(os.environ.get("CKD_NVML_STANDIN", "[]"))
    if not _devices:
        raise NVMLError("NVML stand-in: no devices in CKD_NVML_STANDIN")


def nvmlShutdown() -> None:
    global _devices
    _devices = None


def nvmlDeviceGetCount() -> int:
    return len(_require())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(_require()):
        raise NVMLError(f"NVML stand-in: no device {index}")
    return index


def nvmlDeviceGetHandleByUUID(uuid) -> int:
    text = uuid.decode() if isinstance(uuid, bytes) else uuid
    prefix = "GPU-standin-"
    if not text.startswith(prefix) or not text[len(prefix):].isdigit():
        raise NVMLError(f"NVML stand-in: no device {text}")
    return nvmlDeviceGetHandleByIndex(int(text[len(prefix):]))


def nvmlDeviceGetIndex(handle: int) -> int:
    _require()
    return handle


def nvmlDeviceGetUtilizationRates(handle: int) -> _Utilization:
    return _Utilization(gpu=int(_require()[handle]["utilization"]), memory=0)


def nvmlDeviceGetMemoryInfo(handle: int) -> _Memory:
    used = int(_require()[handle]["memory_used"])
    total = max(used, 80 * 1024**3)
    return _Memory(total=total, free=total - used, used=used)
