"""The device and dtype a model is loaded on (arguments first, then $CTXOPT_DEVICE / $CTXOPT_DTYPE, then a
measured default), and the number of CPU threads torch uses ($CTXOPT_THREADS, $OMP_NUM_THREADS, or the free
cores)."""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError

# CPU default dtype. Measured 2026-11-28 on the 2-core AVX2 development CPU (no AVX512-BF16/AMX), SmolLM2-135M
# prefill, median of 3 interleaved runs, 1 thread, CPU seconds (the machine was shared, so wall times ran 1.5-3x):
#   512 tokens: float32 5.7 s, bfloat16 28.8 s;  2048 tokens: float32 25.8 s, bfloat16 134.0 s.
# With 2 threads, 512 tokens took 25.1 s vs 70.6 s wall (loaded machine); a decode step 101 vs 131 ms. float32 wins.
_CPU_DEFAULT_DTYPE = torch.float32
# For a model that only reads prompts (the ctxopt side of a serving engine: GemFilter's early layers, SpecPC's
# draft), on a CPU with native bfloat16 products (AVX512-BF16 or AMX), bfloat16 is the default. Measured
# 2026-12-06 on the 2-core AVX512-BF16 CPU that replaced the one above, 1 thread, CPU seconds: prefill of 2,048
# tokens SmolLM2-135M float32 8.7 s, bfloat16 5.3 s; 4,096 tokens Qwen2.5-Coder-0.5B 49.6 s against 29.4 s. The
# selections on RULER-4K qa_2 at 8x (4 samples): SpecPC with the SmolLM2 draft kept the same positions (23 s ->
# 16 s per compress), GemFilter at Qwen's layer 15 98-99% of them (32 s -> 20 s). A decode step is 2x slower in
# bfloat16 there (SmolLM2, 2K cache: 95 against 181 ms), so a model that generates answers stays in float32.
# Over 50 samples through the engine (RULER-4K qa_2, JOURNAL.md 2026-12-06 20:45), bfloat16 SpecPC scored
# 26/26% at 4x/8x against float32's 26/22% (answers differing on 5/10 of 50) at 0.80/0.71x the engine's
# TTFT against 1.04/0.94x; GemFilter 26/28% against 20/30%, at 0.85/0.76x against 1.45/1.35x (21:12).
# Commands: benchmarks/cpu_dtype.py (prefill, select) and decode_speed.py --dtype; JOURNAL.md 2026-12-06 14:15.
_CPU_PREFILL_DTYPE = torch.bfloat16


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


log = logging.getLogger("ctxopt")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
}


def resolve_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, prefill_only: bool = False
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to load on: arguments first, then $CTXOPT_DEVICE / $CTXOPT_DTYPE, then automatic.

    Automatic is CUDA with bfloat16 when a GPU is present, else CPU with the measured CPU default: float32, or, for
    a model that only reads prompts (``prefill_only``: the ctxopt side of a serving engine) on a CPU with native
    bfloat16 products, bfloat16.
    Strings like "cpu", "cuda", "cuda:1", "auto", "bf16", "bfloat16", "float32", "fp16" are accepted.
    """
    device = device if device is not None else os.environ.get("CTXOPT_DEVICE") or None
    dtype = dtype if dtype is not None else os.environ.get("CTXOPT_DTYPE") or None

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        resolved_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        text = device.strip().lower() if isinstance(device, str) else device
        try:
            resolved_device = torch.device("cuda" if text == "gpu" else text)
        except (RuntimeError, TypeError) as err:
            raise InputError(f"unknown device {device!r}; pass 'cpu', 'cuda', 'cuda:N' or 'auto'") from err
        if resolved_device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but torch sees no CUDA GPU; pass device='cpu'")
    if resolved_device.type == "cuda" and resolved_device.index is None:
        resolved_device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" are one device

    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        if resolved_device.type == "cuda":
            resolved_dtype = torch.bfloat16
        else:
            resolved_dtype = _CPU_PREFILL_DTYPE if prefill_only and native_bf16_cpu() else _CPU_DEFAULT_DTYPE
    elif isinstance(dtype, torch.dtype):
        resolved_dtype = dtype
    else:
        key = str(dtype).strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; pass one of {sorted(_DTYPES)} or 'auto'")
        resolved_dtype = _DTYPES[key]
    return resolved_device, resolved_dtype


# -- CPU threads ------------------------------------------------------------------------------------------------
# On a shared machine a process that starts one torch thread per core competes with everything else running:
# its threads wait for each other at every parallel region, and a forward pass can take ~10x longer than with
# the cores that are actually free. So the thread count is chosen once per process, from the environment or from
# the cores this process may use minus the 1-minute load average.
THREADS_ENV = "CTXOPT_THREADS"
_threads_chosen: tuple[int, str] | None = None
_threads_lock = threading.Lock()


def choose_threads(usable_cores: int, load: float | None, env: Mapping[str, str]) -> tuple[int | None, str]:
    """The torch thread count to use and why, as a pure function of the machine and the environment.

    ``$CTXOPT_THREADS`` wins (``0``: leave torch's own setting alone, returned as None); then
    ``$OMP_NUM_THREADS``, which torch honours itself (a value that is not one positive number, such as an OpenMP
    list, is left to torch: None); otherwise ``usable_cores`` minus ``load`` (the 1-minute load average of the
    other processes, rounded), at least 1. ``load`` None (no load average on this platform) counts as idle.
    """
    value = (env.get(THREADS_ENV) or "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = -1
        if threads < 0:
            raise InputError(f"${THREADS_ENV} must be a whole number of threads (0: leave torch's setting); "
                             f"got {value!r}.")
        return (threads or None), f"${THREADS_ENV}={value}"
    value = (env.get("OMP_NUM_THREADS") or "").strip()
    if value:
        return (int(value) if value.isdigit() and int(value) > 0 else None), f"$OMP_NUM_THREADS={value}"
    usable = max(1, int(usable_cores))
    busy = round(load) if load is not None and load > 0 else 0
    threads = max(1, usable - busy)
    return threads, f"{usable} usable cores, load {load or 0:.1f} from other processes; ${THREADS_ENV} overrides"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform tells it (else every core), capped
    by a cgroup v2 CPU quota (a container started with ``--cpus N``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def own_load() -> float:
    """This process's own part of the 1-minute load average, estimated: its CPU seconds per second of life, times
    the weight the kernel's 60-second exponential average has given to that life so far."""
    try:
        import psutil

        alive = max(1e-3, time.time() - psutil.Process().create_time())
    except Exception:  # no psutil, or it cannot read this process: count no load of our own
        return 0.0
    times = os.times()
    return (times.user + times.system) / alive * (1 - math.exp(-alive / 60))


def configure_threads(announce: bool = False) -> tuple[int, str]:
    """Set torch's CPU thread count once per process (``choose_threads`` on this machine now, this process's own
    load left out); later calls return the first choice. The choice is logged at INFO on the ``ctxopt`` logger,
    and printed to stderr when ``announce``. Returns (threads in use, why)."""
    global _threads_chosen
    with _threads_lock:
        if _threads_chosen is None:
            load = load_average()
            others = None if load is None else max(0.0, load - own_load())
            threads, why = choose_threads(usable_cores(), others, os.environ)
            if threads is not None and threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            _threads_chosen = (torch.get_num_threads(), why)
            log.info("%d CPU threads (%s)", *_threads_chosen)
            if announce:
                print(f"ctxopt: {_threads_chosen[0]} CPU threads ({why})", file=sys.stderr)
        return _threads_chosen
