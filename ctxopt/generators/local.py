"""ctxopt's own generator: prefill (token ids, or an input stage such as REFRAG), cache stages, decoder.

Each step leaves a Stats record in the run: the prefill (``prefill`` or the input stage's name), each cache
stage, and the decoder (``decode``, or ``decode:<name>`` for a decoder stage such as RAPID).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from ..attention import AttentionCapture, capture_attention
from ..cache import cache_length, clone_cache, kv_bytes
from ..decoding import DecodeResult, Prefill, prefill
from ..errors import InputError
from ..measure import measure
from ..stages import CacheStage, Decoder, InputStage, Run, StepDecoder, TokenPrefill
from ..types import Prompt


class LocalGenerator:
    """Prefill ``prompt`` with ``input_stage`` (under the attention capture a cache stage asks for), prune the
    cache with ``cache_stages`` in turn, and decode with ``decoder``."""

    def __init__(
        self,
        input_stage: InputStage | None = None,
        cache_stages: Sequence[CacheStage] = (),
        decoder: Decoder | None = None,
    ):
        self.input_stage = input_stage or TokenPrefill()
        self.cache_stages = list(cache_stages)
        self.decoder = decoder or StepDecoder()

    # -- steps -------------------------------------------------------------------------------------------
    def attention_request(self, prompt: Prompt, run: Run) -> tuple[CacheStage | None, AttentionCapture | None]:
        """The one capture a cache stage asks of the prefill, and that stage; (None, None) when none asks
        (two captures would need two different forwards)."""
        requests = [(stage, stage.attention_request(prompt, run)) for stage in self.cache_stages]
        asked = [(stage, request) for stage, request in requests if request is not None]
        if len(asked) > 1:
            raise InputError("Only one cache stage per pipeline may score with the prefill's attention.")
        return asked[0] if asked else (None, None)

    def prefill(self, prompt: Prompt, run: Run, request: AttentionCapture | None = None) -> Prefill:
        """Prefill the prompt (reusing ``run.shared_work``'s copy of a plain token prefill when it has one)."""
        shared_work = run.shared_work if isinstance(self.input_stage, TokenPrefill) else None
        found = shared_work.lookup(prompt.input_ids, request) if shared_work is not None else None
        if found is not None:
            state, record = found
            record.extra["shared_prefill"] = True
        else:
            with measure(self.input_stage.name, run.lm.device, tokens_in=len(prompt)) as record:
                with capture_attention(run.lm.model, request) if request is not None else nullcontext():
                    state = self.input_stage.prefill(prompt, run)
                record.tokens_out = cache_length(state.cache)
                record.kv_bytes = kv_bytes(state.cache)
            if shared_work is not None:
                shared_work.store(prompt.input_ids, request, state, record)
        run.add_record(record)
        return state

    def compress_cache(
        self, state: Prefill, prompt: Prompt, run: Run, asker: CacheStage | None, request: AttentionCapture | None
    ) -> Prefill:
        """Each cache stage in turn; the stage that asked for the capture (``asker``) gets it filled."""
        for stage in self.cache_stages:
            capture = request if stage is asker else None
            with measure(stage.name, run.lm.device, tokens_in=cache_length(state.cache)) as record:
                state = stage.compress(state, prompt, run, capture)
                record.tokens_out = cache_length(state.cache)
                record.kv_bytes = kv_bytes(state.cache)
            run.add_record(record)
        return state

    def decode(self, state: Prefill, prompt: Prompt, run: Run, on_text: Callable[[str], None] | None) -> DecodeResult:
        with measure(self.decoder.record_name, run.lm.device) as record:
            result = self.decoder.decode(state, prompt, run, on_text)
            record.tokens_out = len(result.token_ids)
            record.kv_bytes = kv_bytes(state.cache)
            record.extra.update(
                first_token_seconds=result.first_token_seconds,
                forward_passes=result.forward_passes,
                stopped_by=result.stopped_by,
                tokens_per_second=(
                    len(result.token_ids) / result.seconds if result.token_ids and result.seconds else None
                ),
                **result.extra,
            )
        run.add_record(record)
        return result

    # -- the Generator protocol ---------------------------------------------------------------------------
    def generate(self, prompt: Prompt, run: Run, on_text: Callable[[str], None] | None = None) -> DecodeResult:
        asker, request = self.attention_request(prompt, run)
        state = self.prefill(prompt, run, request)
        state = self.compress_cache(state, prompt, run, asker, request)
        return self.decode(state, prompt, run, on_text)

    @property
    def shares_prefixes(self) -> bool:
        """Whether prompts that start alike can share one prefill of their common start: the plain token
        prefill and no cache stage (a pruned cache depends on the whole prompt)."""
        return isinstance(self.input_stage, TokenPrefill) and not self.cache_stages

    def generate_many(self, prompts: Sequence[Prompt], runs: Sequence[Run]) -> list[DecodeResult]:
        """Answer several prompts. When the generator ``shares_prefixes`` and the prompts have a common start,
        that start is prefilled once (record ``prefill_shared`` in every run, counted in each TTFT) and each
        prompt continues from a copy of that cache with its own rest (record ``prefill``); the answers equal
        ``generate``'s. Otherwise each prompt is generated on its own."""
        shared = common_prefix_length([p.input_ids for p in prompts]) - 1  # each prompt keeps >= 1 token
        if len(prompts) < 2 or shared < 1 or not self.shares_prefixes:
            return [self.generate(prompt, run) for prompt, run in zip(prompts, runs, strict=True)]
        lm = runs[0].lm
        chunk = self.input_stage.chunk_size
        with measure("prefill_shared", lm.device, tokens_in=shared) as shared_record:
            base = prefill(lm.model, prompts[0].input_ids[:shared], chunk_size=chunk)
            shared_record.tokens_out = shared
            shared_record.kv_bytes = kv_bytes(base.cache)
        results = []
        for prompt, run in zip(prompts, runs, strict=True):
            run.add_record(shared_record)
            with measure("prefill", lm.device, tokens_in=len(prompt) - shared) as record:
                state = prefill(lm.model, prompt.input_ids[shared:], cache=clone_cache(base.cache), chunk_size=chunk)
                record.tokens_out = cache_length(state.cache)
                record.kv_bytes = kv_bytes(state.cache)
            run.add_record(record)
            results.append(self.decode(state, prompt, run, None))
        return results


def common_prefix_length(sequences: Sequence[torch.Tensor]) -> int:
    """How many leading tokens all ``sequences`` share."""
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        same = (sequences[0][:length] == other[:length]).int()
        length = int(same.cumprod(0).sum())
    return length
