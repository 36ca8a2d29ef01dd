"""Where a chunked prefill's time goes: each chunk's seconds, and a torch.profiler table of the last chunk.

    python benchmarks/chunked_prefill_profile.py         # H200: Llama-3.1-8B shapes (random, bf16), 128K in 8K chunks
    python benchmarks/chunked_prefill_profile.py --smoke # tiny shapes on the CPU: checks the script runs

The same context is prefilled once in one piece and once in chunks (ctxopt's ``prefill(chunk_size=...)`` path:
one forward per chunk on a growing cache); the last chunk's profile goes to ``$OUT/last_chunk_profile.txt``.
Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_speed import SMOKE_TARGET, TARGET, random_model, synchronize, word_tokenizer  # noqa: E402

from ctxopt.decoding import forward, new_cache  # noqa: E402


def timed_prefill(lm, ids: torch.Tensor, chunk: int, profile_last_to: Path | None = None) -> list[float]:
    """Seconds of each chunk's forward; with ``profile_last_to``, the last chunk runs under the profiler and its
    table is written there."""
    cache, seconds = new_cache(lm.model), []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if lm.device.type == "cuda" else [])
    for lo in range(0, len(ids), chunk):
        profiled = profile_last_to is not None and lo + chunk >= len(ids)
        with profile(activities=activities) if profiled else contextlib.nullcontext() as prof:
            began = time.perf_counter()
            forward(lm.model, ids[lo : lo + chunk], positions=torch.arange(lo, lo + chunk), cache=cache)
            synchronize(lm.device)
            seconds.append(time.perf_counter() - began)
        if profiled:
            key = "cuda_time_total" if lm.device.type == "cuda" else "cpu_time_total"
            profile_last_to.write_text(prof.key_averages().table(sort_by=key, row_limit=25))
    return seconds


def main() -> None:
    smoke = "--smoke" in sys.argv
    device = torch.device("cpu" if smoke else "cuda")
    shape = SMOKE_TARGET if smoke else TARGET
    length, chunk = (2048, 256) if smoke else (131072, 8192)
    lm = random_model(shape, word_tokenizer(shape["vocab_size"]), "target", device,
                      torch.float32 if smoke else torch.bfloat16, 0)
    ids = torch.randint(1, shape["vocab_size"], (length,))
    out = Path(os.environ.get("OUT") or "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        whole = timed_prefill(lm, ids, length)
        print(f"one piece: {whole[0]:.3f} s", flush=True)
        pieces = timed_prefill(lm, ids, chunk, out / "last_chunk_profile.txt")
        print(f"chunks of {chunk}: {sum(pieces):.3f} s; each: {[round(s, 3) for s in pieces]}")
    print((out / "last_chunk_profile.txt").read_text())


if __name__ == "__main__":
    main()
