"""Measuring what a stage costs: wall time and peak memory (torch peak on CUDA, sampled RSS on CPU)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import psutil
import torch

from .types import StageStats


class PeakRSS:
    """Samples this process's resident set size in a background thread and keeps the maximum."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@contextmanager
def measure(stage: str, device: torch.device | str = "cpu", tokens_in: int | None = None):
    """Time a block and record its peak memory into a StageStats the block may fill further."""
    record = StageStats(stage=stage, tokens_in=tokens_in)
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        monitor = None
    else:
        monitor = PeakRSS().__enter__()
    began = time.perf_counter()
    try:
        yield record
    finally:
        if on_cuda:
            torch.cuda.synchronize()
            record.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
        else:
            monitor.__exit__(None, None, None)
            record.peak_memory_bytes = int(monitor.peak)
        record.seconds = time.perf_counter() - began
