"""The Pipeline: model + optional retriever + ordered stages + decoder -> Answer(text, sources, stats)."""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .attention import AttentionCapture, capture_attention
from .cache import clone_cache, kv_bytes
from .decoding import DecodeResult, GenerationConfig, Prefill, decode, prefill
from .errors import ContextTooLongError, InputError
from .measure import measure
from .prompting import DEFAULT_INSTRUCTION, build_prompt, validate_question
from .stages import KINDS, Run, Stage, Truncate
from .types import Answer, Passage, Prompt, StageStats, Stats

Context = str | Passage | Sequence[str] | Sequence[Passage] | None


def as_passages(context: Context) -> list[Passage]:
    """Long-document mode: a string (or list of strings / Passages) given directly as context."""
    if context is None:
        return []
    if isinstance(context, (str, Passage)):
        context = [context]
    passages = [c if isinstance(c, Passage) else Passage(text=str(c), source=f"context[{i}]") for i, c in enumerate(context)]
    if not any(p.text.strip() for p in passages):
        raise InputError("The context is empty: pass non-empty text, or omit it to use the retriever.")
    return passages


def order_stages(stages: Sequence[Stage]) -> dict[str, list[Stage]]:
    """Group stages by kind, keeping the order given within each kind."""
    grouped: dict[str, list[Stage]] = {kind: [] for kind in KINDS}
    for stage in stages:
        if getattr(stage, "kind", None) not in grouped:
            raise InputError(f"{stage!r} is not a ctxopt stage (its kind must be one of {', '.join(KINDS)}).")
        grouped[stage.kind].append(stage)
    for kind in ("input", "decoder"):
        if len(grouped[kind]) > 1:
            raise InputError(f"A pipeline takes at most one {kind} stage; got {len(grouped[kind])}.")
    return grouped


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


class Pipeline:
    """Answer questions over retrieved passages (RAG mode) or a given long text (long-document mode).

    >>> pipe = Pipeline("smollm2-135m", stages=[Truncate(1024)])          # doctest: +SKIP
    >>> pipe.ask("Who wrote it?", context=open("book.txt").read()).text  # doctest: +SKIP
    """

    def __init__(
        self,
        model="smollm2-135m",
        retriever=None,
        stages: Sequence[Stage] = (),
        k: int = 4,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = None,
        max_new_tokens: int = 64,
        truncate: bool = False,
        device=None,
        dtype=None,
        embedder=None,
        prefill_chunk: int | None = None,
        prefill_memo: PrefillMemo | None = None,
    ):
        if k < 1:
            raise InputError(f"k (passages to retrieve) must be >= 1; got {k}.")
        self._model_spec, self._device, self._dtype = model, device, dtype
        self._lm = None
        self._lock = threading.Lock()
        self.retriever = retriever
        self.stages = order_stages(stages)
        self.k = k
        self.instruction = instruction
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.truncate = truncate
        self.prefill_chunk = prefill_chunk or int(os.environ.get("CTXOPT_PREFILL_CHUNK", "0")) or None
        self._embedder = embedder
        self.prefill_memo = prefill_memo

    @property
    def lm(self):
        """The generator, loaded on first use."""
        with self._lock:
            if self._lm is None:
                from .models import LoadedModel, load_model

                spec = self._model_spec
                self._lm = spec if isinstance(spec, LoadedModel) else load_model(spec, self._device, self._dtype)
            return self._lm

    def embedder(self):
        """The retriever's embedder if it has one, else the default embedder (loaded on first use)."""
        if self._embedder is None:
            found = getattr(self.retriever, "embedder", None)
            if found is None:
                from .retrievers.embeddings import load_embedder

                found = load_embedder()
            self._embedder = found
        return self._embedder

    # -- the steps of one run ------------------------------------------------------------------------
    def _gather_passages(self, question: str, context: Context, k: int | None, run: Run) -> list[Passage]:
        if context is not None:
            return as_passages(context)
        if self.retriever is None:
            raise InputError("No context and no retriever: pass context=... or build the Pipeline with a retriever.")
        with measure("retrieve", self.lm.device) as record:
            passages = list(self.retriever.retrieve(question, k or self.k))
            record.tokens_out = len(passages)
        run.stats.add(record)
        if not passages:
            raise InputError("The retriever returned no passages for this question.")
        return passages

    def _passage_stages(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        for stage in self.stages["passage"]:
            with measure(stage.name, self.lm.device, tokens_in=self._count(passages)) as record:
                passages = stage.compress(question, passages, run)
                record.tokens_out = self._count(passages)
            run.stats.add(record)
        return passages

    def _count(self, passages: Sequence[Passage]) -> int:
        tokenizer = self.lm.tokenizer
        return sum(len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in passages)

    def build_prompt(self, question: str, passages: Sequence[Passage], answer_prefix: str = "") -> Prompt:
        return build_prompt(
            self.lm.tokenizer, question, passages, self.instruction, self.system, answer_prefix=answer_prefix
        )

    def _timed_prompt(
        self, question: str, passages: Sequence[Passage], answer_prefix: str = ""
    ) -> tuple[Prompt, StageStats]:
        """The prompt and its "prompt" record: the chat template, tokenization and provenance are work the
        question waits for, so they count in TTFT like every stage before the decoder."""
        with measure("prompt", self.lm.device) as record:
            prompt = self.build_prompt(question, passages, answer_prefix)
            record.tokens_out = len(prompt)
        return prompt, record

    def _fit_positions(self, prompt: Prompt, run: Run) -> list[Stage]:
        """Error on a prompt the model cannot position, or truncate it when the user asked for that."""
        limit = self.lm.max_positions - run.config.max_new_tokens
        if len(prompt) <= limit:
            return []
        if not self.truncate:
            raise ContextTooLongError(
                f"The prompt has {len(prompt)} tokens but {self.lm.name} handles {self.lm.max_positions} positions "
                f"({run.config.max_new_tokens} reserved for the answer). Use a compression method, fewer passages, "
                "or truncate=True (CLI: --truncate) to keep the start and end of the context."
            )
        run.note(f"prompt truncated from {len(prompt)} to {limit} tokens to fit the model's positions")
        return [Truncate(limit)]

    def _token_stages(self, prompt: Prompt, run: Run) -> Prompt:
        for stage in self._fit_positions(prompt, run) + self.stages["token"]:
            with measure(stage.name, self.lm.device, tokens_in=len(prompt)) as record:
                prompt = stage.select(prompt, run)
                record.tokens_out = len(prompt)
            run.add_record(record)
        return prompt

    def _prefill(self, prompt: Prompt, run: Run) -> Prefill:
        input_stage = self.stages["input"][0] if self.stages["input"] else None
        name = input_stage.name if input_stage else "prefill"
        requests = [r for r in (c.attention_request(prompt, run) for c in self.stages["cache"]) if r is not None]
        if len(requests) > 1:
            raise InputError("Only one cache stage per pipeline may score with the prefill's attention.")
        request = requests[0] if requests else None
        memo = self.prefill_memo if input_stage is None else None
        shared = memo.lookup(prompt.input_ids, request) if memo is not None else None
        if shared is not None:
            state, record = shared
            record.extra["shared_prefill"] = True
        else:
            with measure(name, self.lm.device, tokens_in=len(prompt)) as record:
                with capture_attention(self.lm.model, request) if request is not None else nullcontext():
                    if input_stage is not None:
                        state = input_stage.prefill(prompt, run)
                    else:
                        state = prefill(self.lm.model, prompt.input_ids, chunk_size=self.prefill_chunk)
                record.tokens_out = int(state.cache.get_seq_length())
                record.kv_bytes = kv_bytes(state.cache)
            if memo is not None:
                memo.store(prompt.input_ids, request, state, record)
        run.add_record(record)
        for stage in self.stages["cache"]:
            with measure(stage.name, self.lm.device, tokens_in=int(state.cache.get_seq_length())) as record:
                state = stage.compress(state, prompt, run)
                record.tokens_out = int(state.cache.get_seq_length())
                record.kv_bytes = kv_bytes(state.cache)
            run.add_record(record)
        return state

    def _decode(self, state: Prefill, prompt: Prompt, run: Run, on_text) -> DecodeResult:
        decoder = self.stages["decoder"][0] if self.stages["decoder"] else None
        with measure("decode", self.lm.device) as record:
            if decoder is not None:
                result = decoder.decode(state, prompt, run, on_text)
            else:
                result = decode(self.lm.model, self.lm.tokenizer, state, run.config, self.lm.eos_token_ids, on_text)
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
            if decoder is not None:
                record.stage = f"decode:{decoder.name}"
        run.stats.add(record)
        return result

    def _config(self, overrides: dict) -> GenerationConfig:
        overrides.setdefault("max_new_tokens", self.max_new_tokens)
        return GenerationConfig(**overrides)

    def _answer(self, result: DecodeResult, prompt: Prompt, run: Run) -> Answer:
        kept = prompt.passages_kept()
        sources = [prompt.passages[i] for i in kept] if kept else list(prompt.passages)
        for note in run.notes:
            run.stats.stages[-1].extra.setdefault("notes", []).append(note)
        return Answer(text=result.text.strip(), sources=sources, stats=run.stats, token_ids=result.token_ids, prompt=prompt)

    # -- public API --------------------------------------------------------------------------------
    def ask(
        self,
        question: str,
        context: Context = None,
        k: int | None = None,
        on_text: Callable[[str], None] | None = None,
        answer_prefix: str = "",
        **generation,
    ) -> Answer:
        """Answer one question: over ``context`` if given (long-document mode), else over retrieved passages."""
        question = validate_question(question)
        run = Run(
            lm=self.lm, question=question, config=self._config(generation), stats=Stats(), embedder=self.embedder,
            prefill_memo=self.prefill_memo,
        )
        passages = self._gather_passages(question, context, k, run)
        passages = self._passage_stages(question, passages, run)
        run.passages = passages
        prompt, record = self._timed_prompt(question, passages, answer_prefix)
        run.add_record(record)
        prompt = self._token_stages(prompt, run)
        state = self._prefill(prompt, run)
        result = self._decode(state, prompt, run, on_text)
        return self._answer(result, prompt, run)

    def ask_many(self, questions: Sequence[str], context: Context = None, **generation) -> list[Answer]:
        """Answer several questions over one context.

        With no stage that depends on the question, the context prefix shared by all prompts is prefilled
        once and each question continues from a copy of that cache (the kvpress way); otherwise each
        question runs the whole pipeline.
        """
        questions = [validate_question(q) for q in questions]
        question_free = not any(self.stages[kind] for kind in ("passage", "token", "input", "cache", "decoder"))
        if context is None or len(questions) < 2 or not question_free:
            return [self.ask(q, context=context, **generation) for q in questions]
        passages = as_passages(context)
        prompts, prompt_records = zip(*(self._timed_prompt(q, passages) for q in questions))
        for prompt in prompts:
            self._fit_positions(prompt, Run(self.lm, prompt.question, self._config(dict(generation)), Stats()))
        shared = _common_prefix_length([p.input_ids for p in prompts]) - 1  # each question keeps >= 1 token
        if shared < 1:
            return [self.ask(q, context=context, **generation) for q in questions]
        with measure("prefill_shared", self.lm.device, tokens_in=shared) as shared_record:
            base = prefill(self.lm.model, prompts[0].input_ids[:shared], chunk_size=self.prefill_chunk)
            shared_record.kv_bytes = kv_bytes(base.cache)
        answers = []
        for prompt, prompt_record in zip(prompts, prompt_records):
            run = Run(self.lm, prompt.question, self._config(dict(generation)), Stats(), embedder=self.embedder)
            run.stats.add(prompt_record)
            run.stats.add(shared_record)
            with measure("prefill", self.lm.device, tokens_in=len(prompt) - shared) as record:
                state = prefill(self.lm.model, prompt.input_ids[shared:], cache=clone_cache(base.cache))
                record.tokens_out = int(state.cache.get_seq_length())
                record.kv_bytes = kv_bytes(state.cache)
            run.stats.add(record)
            answers.append(self._answer(self._decode(state, prompt, run, None), prompt, run))
        return answers


def _common_prefix_length(sequences: Sequence[torch.Tensor]) -> int:
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        same = (sequences[0][:length] == other[:length]).int()
        length = int(same.cumprod(0).sum())
    return length
