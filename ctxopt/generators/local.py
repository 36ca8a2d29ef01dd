"""ctxopt's own generator: prefill (token ids, or an input stage such as REFRAG), cache stages, decoder.

Each step leaves a Stats record in the run: the prefill (``prefill`` or the input stage's name), each cache
stage, and the decoder (``decode``, or ``decode:<name>`` for a decoder stage such as RAPID).

The default decoder runs ``ctxopt.decoding.BatchDecoder`` (one decode loop for everything). Concurrent ``generate``
calls on one model, from any generator, prefill one at a time (``model_prepare_lock``, one per model) and decode in a
batch they share (``SharedDecoder``, one per model). ``generate_many`` decodes its prompts together, with the
shared start of their prompts held once (Hydragen) where the model allows it.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from ..attention import AttentionCapture, capture_attention
from ..attention.kernels import runs_grouped_sdpa
from ..attention.shared_prefix import SharedPrefix
from ..cache import cache_length, clone_cache, kv_bytes
from ..decoding import BatchDecoder, DecodeResult, Prefill, SharedDecoder, prefill
from ..errors import InputError
from ..measure import measure
from ..stages import CacheStage, Decoder, InputStage, Run, StepDecoder, TokenPrefill
from ..types import Prompt, StageStats


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
        # Held around each call's prefill and cache stages, and around its decode unless that runs in the shared
        # batch (another decoder, RAPID, runs forwards of its own). None: the model's own (``model_prepare_lock``),
        # so that calls from several threads prefill one at a time -- their peak memory is one prefill's, not one
        # per call, and one core gains nothing from two prefills at once -- and decode together. Callers whose
        # other passes must exclude these too set their own (the LangChain chat model, the gateway).
        self.prepare_lock: threading.RLock | None = None

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
        """The decoder's answer. The default decoder decodes in this generator's shared batch for the model, so
        calls from several threads share their decode steps (``SharedDecoder``); alone, a call is a batch of one."""
        with measure(self.decoder.record_name, run.lm.device) as record:
            if self.decodes_shared:  # the cache is handed over: freed once copied into the batch
                result = shared_decoder(run.lm).decode(state, run.config, on_text, run.lm.eos_token_ids, release=True)
            else:
                result = self.decoder.decode(state, prompt, run, on_text)
        run.add_record(decode_record(record, result, state))
        return result

    @property
    def decodes_shared(self) -> bool:
        """Whether ``generate`` decodes in the model's shared batch (the default decoder; not RAPID)."""
        return type(self.decoder) is StepDecoder

    # -- the Generator protocol ---------------------------------------------------------------------------
    def generate(self, prompt: Prompt, run: Run, on_text: Callable[[str], None] | None = None) -> DecodeResult:
        with self._prepare_locked(run):
            asker, request = self.attention_request(prompt, run)
            state = self.prefill(prompt, run, request)
            state = self.compress_cache(state, prompt, run, asker, request)
            if not self.decodes_shared:
                return self.decode(state, prompt, run, on_text)
        return self.decode(state, prompt, run, on_text)

    @contextmanager
    def _prepare_locked(self, run: Run) -> Iterator[None]:
        """Hold ``prepare_lock`` (the model's own when None) for the block. When another call holds it, the time
        spent waiting goes into the run as a ``wait`` record, so TTFT counts it."""
        lock = self.prepare_lock or model_prepare_lock(run.lm)
        if not lock.acquire(blocking=False):
            began = time.perf_counter()
            lock.acquire()
            run.add_record(StageStats("wait", seconds=time.perf_counter() - began))
        try:
            yield
        finally:
            lock.release()

    @property
    def shares_prefixes(self) -> bool:
        """Whether prompts that start alike can share one prefill of their common start: the plain token
        prefill and no cache stage (a pruned cache depends on the whole prompt)."""
        return isinstance(self.input_stage, TokenPrefill) and not self.cache_stages

    def generate_many(self, prompts: Sequence[Prompt], runs: Sequence[Run]) -> list[DecodeResult]:
        """Answer several prompts; the answers equal ``generate``'s (up to the rounding of batched arithmetic).

        With the default decoder (``StepDecoder``) the prompts decode together, one forward per step for all
        of them (``BatchDecoder``). When the generator ``shares_prefixes`` and the prompts have a common start,
        that start is prefilled once (record ``prefill_shared`` in every run, counted in each TTFT) and the
        prompts' own rests are prefilled together in one forward (record ``prefill``); on a model that runs
        GROUPED_SDPA the shared start's cache is then held once and read once per step for all of them
        (Hydragen's shared-prefix attention), otherwise each prompt's row holds a copy of it. Without a shared
        start each prompt is prefilled and its cache compressed on its own, then all decode together. Another
        decoder (RAPID) answers the prompts one by one, after the shared prefill when there is one."""
        if not prompts:
            return []
        shared = common_prefix_length([p.input_ids for p in prompts]) - 1  # each prompt keeps >= 1 token
        sharing = len(prompts) > 1 and shared >= 1 and self.shares_prefixes
        batched = isinstance(self.decoder, StepDecoder)
        if not sharing and not batched:
            return [self.generate(prompt, run) for prompt, run in zip(prompts, runs, strict=True)]
        lm = runs[0].lm
        if not sharing:
            decoder = BatchDecoder(lm.model, lm.tokenizer, lm.eos_token_ids)
            requests = []
            for prompt, run in zip(prompts, runs, strict=True):
                asker, capture = self.attention_request(prompt, run)
                state = self.prefill(prompt, run, capture)
                state = self.compress_cache(state, prompt, run, asker, capture)
                requests.append(decoder.submit(state, run.config))
            del state  # each cache is copied into the decoder's slots and released when the requests join
            return self._run_together(lm, decoder, requests, runs)
        chunk = self.input_stage.chunk_size
        with measure("prefill_shared", lm.device, tokens_in=shared) as shared_record:
            base = prefill(lm.model, prompts[0].input_ids[:shared], chunk_size=chunk)
            shared_record.tokens_out = shared
            shared_record.kv_bytes = kv_bytes(base.cache)
        for run in runs:
            run.add_record(shared_record)
        if not batched:
            results = []
            for prompt, run in zip(prompts, runs, strict=True):
                with measure("prefill", lm.device, tokens_in=len(prompt) - shared) as record:
                    state = prefill(lm.model, prompt.input_ids[shared:], cache=clone_cache(base.cache),
                                    chunk_size=chunk)
                    record.tokens_out = cache_length(state.cache)
                    record.kv_bytes = kv_bytes(state.cache)
                run.add_record(record)
                results.append(self.decode(state, prompt, run, None))
            return results
        prefix = SharedPrefix.from_cache(base.cache) if runs_grouped_sdpa(lm.model) else None
        decoder = BatchDecoder(lm.model, lm.tokenizer, lm.eos_token_ids, prefix=prefix)
        requests = [
            decoder.submit(Prefill(cache=None if prefix else base.cache, next_position=shared,
                                   pending_ids=prompt.input_ids[shared:]), run.config)
            for prompt, run in zip(prompts, runs, strict=True)
        ]
        with measure("prefill", lm.device, tokens_in=sum(len(p) - shared for p in prompts)) as batch_record:
            decoder.admit()
        for prompt, run, request in zip(prompts, runs, requests, strict=True):
            record = dataclasses.replace(batch_record, tokens_in=len(prompt) - shared, tokens_out=len(prompt),
                                         kv_bytes=decoder.kv_bytes(request), extra=dict(batch_record.extra))
            record.extra.update(batch_size=len(prompts), shared_prefix_attention=prefix is not None)
            run.add_record(record)
        return self._run_together(lm, decoder, requests, runs)

    def _run_together(self, lm, decoder: BatchDecoder, requests, runs: Sequence[Run]) -> list[DecodeResult]:
        """Decode the submitted requests together; one ``decode`` record per run (its own seconds, the batch's
        peak memory)."""
        with measure(self.decoder.record_name, lm.device) as batch_record:
            decoder.run()
        results = [request.result for request in requests]
        for run, request in zip(runs, requests, strict=True):
            record = dataclasses.replace(batch_record, seconds=request.result.seconds, extra={})
            run.add_record(decode_record(record, request.result, request.state))
        return results


_SHARED_LOCK = threading.Lock()
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its SharedDecoder
_PREPARE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its prepare lock


def _per_model(registry: weakref.WeakKeyDictionary, lm, make: Callable[[], object]):
    """``registry``'s object for ``lm``'s model, made on first use (dropped with the model)."""
    with _SHARED_LOCK:
        found = registry.get(lm.model)
        if found is None:
            found = registry[lm.model] = make()
        return found


def shared_decoder(lm) -> SharedDecoder:
    """The decode batch that concurrent ``generate`` calls on ``lm``'s model join, whichever generator (pipeline,
    chat model) they come through: one per model, dropped with the model."""
    return _per_model(_SHARED, lm, lambda: SharedDecoder(lm.model, lm.tokenizer, lm.eos_token_ids))


def model_prepare_lock(lm) -> threading.RLock:
    """The lock under which ``generate`` calls on ``lm``'s model prefill (one per model, dropped with it)."""
    return _per_model(_PREPARE_LOCKS, lm, threading.RLock)


def decode_record(record: StageStats, result: DecodeResult, state: Prefill) -> StageStats:
    """The decoder's record filled from its result: tokens, KV bytes at the end, the decode loop's figures."""
    record.tokens_out = len(result.token_ids)
    if result.kv_bytes is not None:
        record.kv_bytes = result.kv_bytes
    elif state.cache is not None:
        record.kv_bytes = kv_bytes(state.cache)
    record.extra.update(
        first_token_seconds=result.first_token_seconds,
        forward_passes=result.forward_passes,
        stopped_by=result.stopped_by,
        tokens_per_second=len(result.token_ids) / result.seconds if result.token_ids and result.seconds else None,
        **result.extra,
    )
    return record


def common_prefix_length(sequences: Sequence[torch.Tensor]) -> int:
    """How many leading tokens all ``sequences`` share."""
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        same = (sequences[0][:length] == other[:length]).int()
        length = int(same.cumprod(0).sum())
    return length
