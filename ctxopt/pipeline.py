"""The Pipeline: model + optional retriever + ordered stages -> Answer(text, sources, stats).

Two public steps, which ``ask`` and ``ask_many`` compose:
- ``compress(question, context)``: retrieval (or the given context), passage stages, the chat prompt and
  token stages -> a ``Prompt`` (token ids with provenance, and the Stats of building it);
- ``generate(prompt)``: the generator (``LocalGenerator``: prefill or input stage, cache stages, decoder)
  -> an ``Answer``.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence

from .decoding import DecodeResult, GenerationConfig
from .errors import ContextTooLongError, InputError
from .generators import EngineGenerator, LocalGenerator
from .measure import measure
from .methods import build_stages
from .prompting import DEFAULT_INSTRUCTION, build_prompt, reframe_prompt, validate_question
from .stages import KINDS, Run, SharedWork, Stage, TokenPrefill, Truncate
from .text import count_tokens
from .types import Answer, Passage, Prompt, Stats

Context = str | Passage | Sequence[str] | Sequence[Passage] | None


def as_passages(context: Context) -> list[Passage]:
    """Long-document mode: a string (or list of strings / Passages) given directly as context."""
    if context is None:
        return []
    if isinstance(context, (str, Passage)):
        context = [context]
    passages = [
        c if isinstance(c, Passage) else Passage(text=str(c), source=f"context[{i}]") for i, c in enumerate(context)
    ]
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


ENGINE_METHODS = "rag, truncate, extractive, color, specpc, gemfilter, refrag and their compositions"


def check_engine_stages(stages: dict[str, list[Stage]]) -> None:
    """Refuse stages a serving engine cannot run: cache stages and decoders need the KV cache in hand, and an
    input stage must be able to hand the engine embeddings."""
    local_only = stages["cache"] + stages["decoder"]
    local_only += [s for s in stages["input"] if not hasattr(s, "inputs_embeds")]
    if local_only:
        names = ", ".join(f"{s.name} ({s.kind} stage)" for s in local_only)
        raise InputError(
            f"{names} cannot run on a serving engine, which keeps its own KV cache; these methods do: "
            f"{ENGINE_METHODS}. Run {local_only[0].name} without engine= (ctxopt's own generator)."
        )


class Pipeline:
    """Answer questions over retrieved passages (RAG mode) or a given long text (long-document mode).

    ``method``, ``budget``, ``options``: a registered method (``ctxopt methods``) built by ``build_stages``
    instead of ``stages``; a budget for a method that takes none is an error.
    ``engine``: the base URL of an OpenAI-compatible server serving the same model (``http://127.0.0.1:8000/v1``);
    the passage and token stages run here and the engine answers from the kept token ids (``EngineGenerator``).
    Without it, ctxopt's own generator runs (``LocalGenerator``), which every method can use.

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
        prefill_memo: SharedWork | None = None,
        engine: str | None = None,
        engine_model: str | None = None,
        engine_api_key: str | None = None,
        *,
        method: str | None = None,
        budget: int | float | None = None,
        options: dict | None = None,
    ):
        if method is not None:
            if stages:
                raise InputError("Pass stages=[...] or method=..., not both.")
            stages = build_stages(method, budget, **(options or {}))
        elif budget is not None or options:
            raise InputError("budget= and options= go with method= (any `ctxopt methods` entry, e.g. "
                             "method='extractive'); with stages=[...] give each stage its own budget.")
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
        self.engine = engine
        if engine is not None:
            check_engine_stages(self.stages)
            input_stage = next(iter(self.stages["input"]), None)
            self.generator = EngineGenerator(engine, engine_model, api_key=engine_api_key, input_stage=input_stage)
        else:
            input_stages = self.stages["input"] or [TokenPrefill(self.prefill_chunk)]
            decoder = next(iter(self.stages["decoder"]), None)
            self.generator = LocalGenerator(input_stages[0], self.stages["cache"], decoder)

    @property
    def lm(self):
        """The generator, loaded on first use."""
        with self._lock:
            if self._lm is None:
                from .models import LoadedModel, load_model

                spec = self._model_spec
                # With an engine, ctxopt's model only reads prompts: its automatic dtype may differ (bf16 CPUs).
                self._lm = spec if isinstance(spec, LoadedModel) else load_model(
                    spec, self._device, self._dtype, prefill_only=self.engine is not None)
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

    # -- the steps of compress -----------------------------------------------------------------------
    def _gather_passages(self, question: str, context: Context, k: int | None, run: Run) -> list[Passage]:
        if context is not None:
            return as_passages(context)
        if self.retriever is None:
            raise InputError("No context and no retriever: pass context=... or build the Pipeline with a retriever.")
        with measure("retrieve", self.lm.device) as record:
            passages = list(self.retriever.retrieve(question, k or self.k))
            record.tokens_out = count_tokens(self.lm.tokenizer, passages)
            record.extra["passages"] = len(passages)
        run.add_record(record)
        if not passages:
            raise InputError("The retriever returned no passages for this question.")
        return passages

    def build_prompt(self, question: str, passages: Sequence[Passage], answer_prefix: str = "") -> Prompt:
        """The chat prompt around ``passages``, no stage applied."""
        return build_prompt(
            self.lm.tokenizer, question, passages, self.instruction, self.system, answer_prefix=answer_prefix
        )

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

    # -- public API --------------------------------------------------------------------------------
    def new_run(self, question: str, stats: Stats | None = None, **generation) -> Run:
        """The ledger of one question's run: this pipeline's model, embedder and shared work, and the decoding
        settings (``max_new_tokens``, ``temperature``, ``top_p``, ``stop_strings``, ``seed``)."""
        generation.setdefault("max_new_tokens", self.max_new_tokens)
        return Run(
            lm=self.lm, question=question, config=GenerationConfig(**generation), stats=stats or Stats(),
            embedder=self.embedder, shared_work=self.prefill_memo,
        )

    def compress(
        self, question: str, context: Context = None, k: int | None = None, answer_prefix: str = "", **generation
    ) -> Prompt:
        """The prompt the generator will read: ``context`` (long-document mode) or the retriever's top ``k``
        passages, through the passage stages, framed by the chat template, through the token stages. Its
        ``stats`` record each step. A prompt over the model's positions is an error, or is truncated when the
        pipeline was built with ``truncate=True``. ``generation`` settings matter where a stage reads them
        (the answer room reserved in the positions, a draft's lookahead)."""
        question = validate_question(question)
        run = self.new_run(question, **generation)
        passages = self._gather_passages(question, context, k, run)
        run.measure_prompt = lambda kept: len(self.build_prompt(question, kept, answer_prefix))
        if self.stages["passage"]:  # a ratio budget is of the uncompressed prompt, whatever stage applies it
            run.prompt_tokens = run.measure_prompt(passages)
        for stage in self.stages["passage"]:
            with measure(stage.name, self.lm.device, tokens_in=count_tokens(self.lm.tokenizer, passages)) as record:
                passages = stage.compress(question, passages, run)
                record.tokens_out = count_tokens(self.lm.tokenizer, passages)
            run.add_record(record)
        with measure("prompt", self.lm.device) as record:  # the template and tokenization count in TTFT too
            prompt = self.build_prompt(question, passages, answer_prefix)
            record.tokens_out = len(prompt)
        run.add_record(record)
        run.prompt_tokens = run.prompt_tokens or len(prompt)
        for stage in self._fit_positions(prompt, run) + self.stages["token"]:
            with measure(stage.name, self.lm.device, tokens_in=len(prompt)) as record:
                prompt = stage.select(prompt, run)
                record.tokens_out = len(prompt)
            run.add_record(record)
        return dataclasses.replace(prompt, stats=run.stats, draft_answer=run.draft_answer,
                                   prompt_tokens=run.prompt_tokens)

    def generate(
        self, prompt: Prompt, on_text: Callable[[str], None] | None = None, **generation
    ) -> Answer:
        """Answer a prompt from ``compress`` (or ``build_prompt``) with the pipeline's generator; the answer's
        stats continue the prompt's. ``on_text`` receives the answer's text as it is decoded."""
        run = self._run_for(prompt, generation)
        result = self.generator.generate(prompt, run, on_text)
        return self._answer(result, prompt, run)

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
        prompt = self.compress(question, context, k, answer_prefix, **generation)
        return self.generate(prompt, on_text, **generation)

    def ask_many(self, questions: Sequence[str], context: Context = None, **generation) -> list[Answer]:
        """Answer several questions over one context (or each over its own retrieved passages).

        Each question is compressed on its own (``compress``), so every stage sees its own question; the
        generator then answers them together (``generate_many``): with the local generator the questions decode
        in one batch, and when no input or cache stage runs and the prompts start alike, their common start --
        the template and the context before the question -- is prefilled once and, where the model allows it,
        its cache is held once and read once per step for all questions (Hydragen's shared-prefix attention).
        The answers equal ``ask``'s.
        """
        prompts = [self.compress(question, context, **generation) for question in questions]
        runs = [self._run_for(prompt, generation) for prompt in prompts]
        results = self.generator.generate_many(prompts, runs)
        return [self._answer(result, prompt, run) for result, prompt, run in zip(results, prompts, runs)]

    # -- helpers -------------------------------------------------------------------------------------
    def _run_for(self, prompt: Prompt, generation: dict) -> Run:
        """A run that continues ``prompt``'s ledger and carries its draft answer."""
        run = self.new_run(prompt.question, stats=prompt.stats, **generation)
        run.draft_answer = prompt.draft_answer
        run.prompt_tokens = prompt.prompt_tokens or prompt.original_length
        run.measure_prompt = lambda kept: len(reframe_prompt(self.lm.tokenizer, prompt, kept))
        return run

    def _answer(self, result: DecodeResult, prompt: Prompt, run: Run) -> Answer:
        kept = prompt.passages_kept()
        sources = [prompt.passages[i] for i in kept] if kept else list(prompt.passages)
        notes, run.stats.notes = run.stats.notes, []
        for note in notes:
            run.stats.stages[-1].extra.setdefault("notes", []).append(note)
        return Answer(
            text=result.text.strip(), sources=sources, stats=run.stats, token_ids=result.token_ids, prompt=prompt
        )
