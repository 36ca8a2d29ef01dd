"""Work shared between the benchmark's configurations that read the same prompt: plain prefills (with the
attention capture a cache stage asked for) and the budget-free selection passes of token and cache stages.
It implements ``ctxopt.stages.SharedWork``; the library never imports it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from ..attention import AttentionCapture
from ..decoding import Prefill
from ..types import StageStats

_PLAIN = (int, float, str, bool, type(None))


def capture_signature(request: AttentionCapture) -> tuple | None:
    """What a capture request records, as a comparable key; None when that cannot be told safely.

    Two requests with the same signature fill the same records from the same forward. A reducer must be a
    plain function, or a ``functools.partial`` of one over plain values (ints, floats, strings), to be
    compared; a request that stops the forward early leaves an incomplete cache and is never shared.
    """
    reducer, args, keywords = request.reducer, (), {}
    if isinstance(reducer, functools.partial):
        reducer, args, keywords = reducer.func, reducer.args, reducer.keywords
    plain = all(isinstance(v, _PLAIN) for v in (*args, *keywords.values()))
    if request.stop_after is not None or not plain or not (reducer is None or hasattr(reducer, "__qualname__")):
        return None
    layers = None if request.layers is None else tuple(sorted(request.layers))
    return (request.window, layers, reducer, args, tuple(sorted(keywords.items())))


class PrefillMemo:
    """Prefills of one prompt, and the budget-free passes stages run over it, kept for other pipelines.

    A benchmark that compares full context with SnapKV at several budgets prefills the same prompt once
    instead of once per configuration (on a 2-core CPU a 4K prefill of a 1.5B model is 4 minutes). An entry
    holds the prefilled state before any cache stage ran, the prefill's measured record and the attention
    it captured. A pipeline that requests no capture may use any entry of the same prompt (a capture changes
    no output: the captured forward runs the same attention); one that requests a capture uses only an
    entry captured with an equal request. The reused record keeps the ORIGINAL prefill's seconds and peak
    memory, so TTFT still counts a whole prefill. ``clear()`` between prompts bounds memory to one prompt.

    Stages keep their own budget-free passes here too, through ``Run.shared`` (GemFilter's early layers,
    SpecPC's draft prefill, SpecKV's draft answer): one pass serves every budget, and each reuse reports
    the original pass's seconds and peak memory.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, tuple | None, Prefill, StageStats, dict]] = []
        self._passes: list[tuple[tuple, torch.Tensor, Any, StageStats]] = []

    def clear(self) -> None:
        self._entries.clear()
        self._passes.clear()

    def find_pass(self, key: tuple, input_ids: torch.Tensor) -> tuple[Any, StageStats] | None:
        """The value and measured record of a pass stored under ``key`` for this prompt, or None."""
        for stored_key, ids, value, record in self._passes:
            if stored_key == key and torch.equal(ids, input_ids):
                return value, record
        return None

    def store_pass(self, key: tuple, input_ids: torch.Tensor, value: Any, record: StageStats) -> None:
        """Keep a pass's result; ``key`` names everything it depends on besides the prompt (stage, model,
        knobs other than the budget). The value is handed out as is: its users must not modify it."""
        self._passes.append((key, input_ids.clone(), value, record))

    def lookup(self, input_ids: torch.Tensor, request: AttentionCapture | None) -> tuple[Prefill, StageStats] | None:
        """A fresh copy of a stored prefill that serves this prompt and request (filling its records), or None."""
        wanted = None if request is None else capture_signature(request)
        if request is not None and wanted is None:
            return None
        for ids, signature, state, record, records in self._entries:
            if torch.equal(ids, input_ids) and (request is None or signature == wanted):
                if request is not None:
                    request.records.update(records)
                return state.copy(), dataclasses.replace(record, extra=dict(record.extra))
        return None

    def store(
        self, input_ids: torch.Tensor, request: AttentionCapture | None, state: Prefill, record: StageStats
    ) -> None:
        """Keep a copy of ``state`` (prefilled under ``request``) and its record, unless unsafe to share."""
        signature = None if request is None else capture_signature(request)
        if request is not None and signature is None:
            return
        records = dict(request.records) if request is not None else {}
        kept = dataclasses.replace(record, extra=dict(record.extra))
        self._entries.append((input_ids.clone(), signature, state.copy(), kept, records))
