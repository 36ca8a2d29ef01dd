"""The device and dtype a model is loaded on: arguments first, then $CTXOPT_DEVICE / $CTXOPT_DTYPE, then a
measured default."""
from __future__ import annotations

import os

import torch

from ..errors import InputError

# CPU default dtype. Measured 2026-11-28 on the 2-core AVX2 development CPU (no AVX512-BF16/AMX), SmolLM2-135M
# prefill, median of 3 interleaved runs, 1 thread, CPU seconds (the machine was shared, so wall times ran 1.5-3x):
#   512 tokens: float32 5.7 s, bfloat16 28.8 s;  2048 tokens: float32 25.8 s, bfloat16 134.0 s.
# With 2 threads, 512 tokens took 25.1 s vs 70.6 s wall (loaded machine); a decode step 101 vs 131 ms. float32 wins.
_CPU_DEFAULT_DTYPE = torch.float32

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
}


def resolve_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to load on: arguments first, then $CTXOPT_DEVICE / $CTXOPT_DTYPE, then automatic.

    Automatic is CUDA with bfloat16 when a GPU is present, else CPU with the measured CPU default.
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
        resolved_dtype = torch.bfloat16 if resolved_device.type == "cuda" else _CPU_DEFAULT_DTYPE
    elif isinstance(dtype, torch.dtype):
        resolved_dtype = dtype
    else:
        key = str(dtype).strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; pass one of {sorted(_DTYPES)} or 'auto'")
        resolved_dtype = _DTYPES[key]
    return resolved_device, resolved_dtype
