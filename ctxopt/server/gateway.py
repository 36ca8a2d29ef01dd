"""The gateway's core, apart from HTTP: the model and pipelines, admission, and the jobs that answer requests.

Threads. ctxopt's own passes (retrieval, compression, the template) run on ONE model thread, in arrival order:
the models and stages are not safe for concurrent use, and the event loop must never wait on a model. Each
request's generation then runs on a generation thread of its own (``concurrency`` of them). With an engine it is
only an HTTP stream, so requests reach the engine concurrently (it batches them); an input stage that computes
embeddings for the engine (REFRAG) still runs on the model thread. Without one, ctxopt's local generator runs
its prefill and cache stages under the gateway's ``model_lock`` (which the model thread's work holds too, so
one pass of the model runs at a time) and decodes outside it, in the model's decode batch that concurrent
requests share (``ctxopt.generators.local.shared_decoder``, continuous batching); a RAPID decoder, which runs
forwards of its own, decodes under the lock.

Admission. At most ``concurrency + max_queue`` requests are admitted at once; the next one gets 429 with
``Retry-After``. A request stays admitted until the threads working for it have returned, so an abandoned
request's model work still counts: the backlog is bounded by construction.

Cancellation. A job's ``closed`` event is set when its client goes away, when it times out, or when the server
shuts down; the decode loop (local or engine) then stops at its next piece of text (``on_text`` raises), which
for the engine closes the HTTP stream and so cancels the engine's request. A job still queued never starts.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..chat import plain_prompt
from ..checks import require_int
from ..errors import ContextTooLongError, CtxoptError, EngineError, InputError
from ..generators import LocalGenerator
from ..methods import METHODS, build_stages
from ..models import DEFAULT_GENERATOR, LoadedModel
from ..pipeline import Pipeline, check_engine_stages, order_stages
from ..types import Answer, Passage, Prompt
from .metrics import GatewayMetrics
from .schema import ApiError, ChatRequest, bad_request, completion_id, finish_reason, now

log = logging.getLogger("ctxopt.server")

# Options that name a model, a file or a side effect: set by whoever starts the server (--draft, --option), never
# by a request, which could otherwise make the server load any model or path it names.
SERVER_ONLY_OPTIONS = ("draft", "compressor", "adapter", "cache", "progress")
ENGINE_PROBE_SECONDS = 2.0


class Cancelled(Exception):
    """Raised inside a job's thread once nobody waits for its answer any more."""


@dataclass
class ServeConfig:
    """What ``ctxopt serve`` runs. ``model``: a registry name, folder or hub id, a LoadedModel, or a function
    returning one (called on the model thread). ``retriever``: any object with ``retrieve(question, k)``
    (else ``index``, a folder written by ``ctxopt index``). ``options``: the method's options (Python objects
    allowed, e.g. a LoadedModel as ``draft``). ``max_new_tokens``: the answer length when a request sets none."""

    model: Any = DEFAULT_GENERATOR
    served_name: str | None = None
    method: str = "full"
    budget: int | float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    index: str | None = None
    retriever: Any = None
    k: int = 4
    engine: str | None = None
    engine_model: str | None = None
    engine_api_key: str | None = None
    max_new_tokens: int = 256
    truncate: bool = False
    device: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    max_queue: int = 16
    concurrency: int = 16
    request_timeout: float = 600.0
    max_body_bytes: int = 4 * 2**20
    pipeline_cache: int = 16
    drain_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.k = require_int(self.k, "k", minimum=1)
        self.max_new_tokens = require_int(self.max_new_tokens, "max_new_tokens", minimum=1)
        self.max_queue = require_int(self.max_queue, "max_queue", minimum=0)
        self.concurrency = require_int(self.concurrency, "concurrency", minimum=1)
        self.max_body_bytes = require_int(self.max_body_bytes, "max_body_bytes", minimum=1024)
        self.pipeline_cache = require_int(self.pipeline_cache, "pipeline_cache", minimum=1)
        for name in ("request_timeout", "drain_seconds"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
                raise InputError(f"{name} must be a positive number of seconds; got {value!r}.")
        if self.engine is not None and not self.engine.startswith(("http://", "https://")):
            raise InputError(f"engine must be an http(s) URL such as http://127.0.0.1:8000/v1; got {self.engine!r}.")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("api_key is empty: give a non-empty key, or none to serve without one.")


@dataclass(frozen=True)
class Settings:
    """The compression one request runs with."""

    method: str
    budget: int | float | None
    options: dict[str, Any]
    k: int

    @property
    def key(self) -> tuple:
        return (self.method, self.budget, tuple((name, _frozen(value)) for name, value in sorted(self.options.items())))


def _frozen(value: Any) -> Any:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return ("object", id(value))


@dataclass
class Prepared:
    """What the model thread made of a request: the pipeline, the compressed prompt, the uncompressed count."""

    pipe: Pipeline
    prompt: Prompt
    original_tokens: int
    generation: dict[str, Any]
    context_from: str  # "documents", "messages", "index" or "none"
    queued_seconds: float
    prepare_seconds: float
    retrieve_seconds: float | None = None
    answer: Answer | None = None
    ready_at: float = field(default_factory=time.perf_counter)  # when the model thread was done with it
    generate_queued_seconds: float | None = None  # waiting for a generation thread (None: generated in place)


class Job:
    """One admitted request: its events (("text", piece), then ("done", Prepared) or ("error", exception);
    ("disconnect", None) from the connection watcher) and the threads working for it."""

    def __init__(self, gateway: "Gateway", request: ChatRequest, settings: Settings):
        self.gateway = gateway
        self.request = request
        self.settings = settings
        self.id = completion_id()
        self.created = now()
        self.began = time.perf_counter()
        self.deadline = self.began + gateway.config.request_timeout
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.closed = threading.Event()
        self.first_text_at: float | None = None
        self.task: asyncio.Task | None = None
        self._outstanding = 0
        self._ended = False
        self._released = False

    # -- called from worker threads ------------------------------------------------------------------
    def on_text(self, piece: str) -> None:
        if self.closed.is_set():
            raise Cancelled
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        if self.request.stream:
            self._post(("text", piece))

    def _post(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is gone, nobody reads this any more
            pass

    # -- called on the loop ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop working for this request: a queued step never starts, a running decode stops at its next piece."""
        self.closed.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def in_thread(self, executor: ThreadPoolExecutor, fn: Callable, *args: Any) -> Any:
        if self.closed.is_set():
            raise Cancelled
        future = executor.submit(fn, *args)
        self._outstanding += 1
        future.add_done_callback(lambda _: self._from_thread(self._thread_done))
        return await asyncio.wrap_future(future)

    def _from_thread(self, callback: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass

    def _thread_done(self) -> None:
        self._outstanding -= 1
        self._maybe_release()

    def end(self) -> None:
        self._ended = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._ended and self._outstanding == 0 and not self._released:
            self._released = True
            self.gateway.release(self)

    async def next_event(self) -> tuple[str, Any]:
        """The next event, or ("timeout", None) once the request's deadline has passed."""
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            return "timeout", None
        try:
            return await asyncio.wait_for(self.events.get(), remaining)
        except asyncio.TimeoutError:
            return "timeout", None


class Gateway:
    """The model, the pipelines (one per method, budget and options, least recently used dropped), admission
    and the jobs. Create it, then ``start()`` on the event loop; ``shutdown()`` at the end."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.engine = config.engine
        self.workers = config.concurrency
        self.limit = self.workers + config.max_queue
        self.metrics.admit_limit.set(self.limit)
        stages = build_stages(config.method, config.budget, **config.options)  # a bad method or option fails now
        if self.engine:
            check_engine_stages(order_stages(stages))  # and so does a method an engine cannot run
        self.lm: LoadedModel | None = None
        try:
            self._check_budget(config.budget, "budget")
        except ApiError as error:
            raise InputError(error.message) from None
        self.default = Settings(config.method, config.budget, dict(config.options), config.k)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="ctxopt-model")
        self.generate_threads = ThreadPoolExecutor(self.workers, thread_name_prefix="ctxopt-generate")
        self.model_lock = threading.RLock()  # one pass of the model at a time (decode steps aside)
        self.retriever = config.retriever
        self.state = "loading"
        self.error: str | None = None
        self.admitted = 0
        self.draining = False
        self._pipelines: OrderedDict[tuple, Pipeline] = OrderedDict()
        self._plain: Pipeline | None = None
        self._jobs: set[Job] = set()
        self._job_seconds: float | None = None
        self._probe = None

    # -- life cycle --------------------------------------------------------------------------------
    @property
    def served_name(self) -> str:
        if self.config.served_name:
            return self.config.served_name
        if self.lm is not None:
            return self.lm.name
        return self.config.model if isinstance(self.config.model, str) else "ctxopt"

    def start(self) -> None:
        """Load the model (and index) on the model thread; the gateway is ready when that is done."""
        if self.engine:
            import httpx

            headers = {"Authorization": f"Bearer {self.config.engine_api_key}"} if self.config.engine_api_key else {}
            self._probe = httpx.AsyncClient(timeout=ENGINE_PROBE_SECONDS, headers=headers, trust_env=False)
        self.model_thread.submit(self._load)

    def _load(self) -> None:
        try:
            model = self.config.model
            if isinstance(model, LoadedModel):
                lm = model
            elif callable(model):
                lm = model()
            else:
                from ..models import load_model

                lm = load_model(model, self.config.device, self.config.dtype, prefill_only=bool(self.engine))
            if self.retriever is None and self.config.index:
                from ..retrievers import FaissStore

                self.retriever = FaissStore.load(self.config.index)
            self.lm = lm
            self._check_budget(self.config.budget, "budget")
            pipe = self._pipeline(self.default)
            pipe.build_prompt("Ready?", [])  # the tokenizer's one-off set-up (byte table): here, not in a request
            if self.engine:
                try:
                    pipe.generator.check(lm)
                except EngineError as error:  # /health says so until the engine answers
                    log.warning("engine not ready yet: %s", error)
            self.state = "ready"
            log.info("ctxopt gateway ready: model %s, method %s", self.served_name, self.default.method)
        except Exception as error:
            self.state = "failed"
            self.error = f"{type(error).__name__}: {error}"
            log.error("ctxopt gateway failed to load: %s", self.error)

    async def shutdown(self) -> None:
        self.draining = True
        for job in list(self._jobs):
            job.cancel()
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.generate_threads.shutdown(wait=False, cancel_futures=True)
        if self._probe is not None:
            await self._probe.aclose()

    async def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 200 once the model is loaded and the engine (if any) lists its model."""
        body: dict[str, Any] = {"status": self.state, "model": self.served_name, "method": self.default.method,
                                "engine": self.engine, "admitted": self.admitted, "limit": self.limit}
        if self.draining:
            return 503, {**body, "status": "draining"}
        if self.state != "ready":
            return 503, {**body, "error": self.error} if self.error else body
        if self.engine:
            problem = await self.probe_engine()
            if problem:
                return 503, {**body, "status": "engine_unavailable", "error": problem}
        return 200, {**body, "status": "ok"}

    async def probe_engine(self) -> str | None:
        """None when the engine lists the model it should serve, else what is wrong."""
        import httpx

        url = f"{self.engine.rstrip('/')}/models"
        try:
            response = await self._probe.get(url)
        except httpx.HTTPError as error:
            return f"the engine at {self.engine} is not reachable ({type(error).__name__}: {error})"
        if response.status_code != 200:
            return f"the engine at {self.engine} answered /models with HTTP {response.status_code}"
        try:
            served = [entry.get("id") for entry in response.json().get("data", [])]
        except (ValueError, AttributeError):
            return f"the engine at {self.engine} answered /models with something other than a model list"
        wanted = self.config.engine_model
        if (wanted and wanted not in served) or not served:
            return f"the engine at {self.engine} serves {served or 'no model'}, not {wanted or 'a model'}"
        return None

    def check_available(self) -> None:
        if self.draining:
            raise ApiError(503, "The gateway is shutting down.", "unavailable", code="draining")
        if self.state == "loading":
            raise ApiError(503, "The gateway is still loading its model; retry shortly (GET /health says when "
                           "it is ready).", "unavailable", code="loading", headers={"Retry-After": "5"})
        if self.state == "failed":
            raise ApiError(503, f"The gateway could not load its model: {self.error}", "unavailable",
                           code="load_failed")

    # -- per request settings ------------------------------------------------------------------------
    def _check_budget(self, budget: Any, param: str) -> None:
        """A token count 1..the model's positions (once it is loaded), or a ratio in (0, 1]."""
        if budget is None:
            return
        max_positions = self.lm.max_positions if self.lm is not None else None
        if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
            if budget >= 1 and (max_positions is None or budget <= max_positions):
                return
            top = f"..{max_positions}" if max_positions else " or more"
            raise bad_request(f"{param} must be a token count 1{top} or a ratio in (0, 1]; got {budget!r}.",
                              param=param, code="budget_out_of_range")
        if isinstance(budget, float) and 0 < budget <= 1:
            return
        raise bad_request(f"{param} must be a token count (a whole number >= 1) or a ratio in (0, 1]; got "
                          f"{budget!r}.", param=param, code="budget_out_of_range")

    def settings_for(self, overrides: dict[str, Any]) -> Settings:
        """The server's settings with a request's ``ctxopt`` overrides laid over them (checked here)."""
        method = overrides.get("method", self.default.method)
        spec = METHODS.get(method)
        if spec is None:
            raise bad_request(f"Unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}.",
                              param="ctxopt.method", code="unknown_method")
        requested = dict(overrides.get("options", {}))
        locked = sorted(set(requested) & set(SERVER_ONLY_OPTIONS))
        if locked:
            raise bad_request(f"ctxopt.options {', '.join(map(repr, locked))} name a model or a file: only the "
                              "server sets them (ctxopt serve --draft / --option).", param="ctxopt.options",
                              code="option_not_allowed")
        unknown = sorted(set(requested) - set(spec.options))
        if unknown:
            takes = ", ".join(o for o in spec.options if o not in SERVER_ONLY_OPTIONS) or "none"
            raise bad_request(f"Method {method!r} has no option {', '.join(map(repr, unknown))}; it takes: {takes}.",
                              param="ctxopt.options", code="unknown_option")
        if "budget" in overrides:
            budget = overrides["budget"]
            self._check_budget(budget, "ctxopt.budget")
        else:
            budget = self.default.budget if spec.takes_budget else None
        options = {name: value for name, value in self.default.options.items() if name in spec.options}
        options.update(requested)
        return Settings(method, budget, options, overrides.get("k", self.default.k))

    # -- admission -----------------------------------------------------------------------------------
    def admit(self, request: ChatRequest, settings: Settings) -> Job:
        if self.admitted >= self.limit:
            wait = self._job_seconds or 1.0
            retry = max(1, math.ceil(wait * (self.admitted - self.workers + 1) / self.workers))
            raise ApiError(429, f"The gateway is busy: {self.admitted} requests are running or queued (at most "
                           f"{self.limit}). Retry after {retry} s.", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry)})
        self.admitted += 1
        self.metrics.admitted.set(self.admitted)
        job = Job(self, request, settings)
        self._jobs.add(job)
        return job

    def release(self, job: Job) -> None:
        self.admitted -= 1
        self.metrics.admitted.set(self.admitted)
        self._jobs.discard(job)
        seconds = time.perf_counter() - job.began
        self._job_seconds = seconds if self._job_seconds is None else 0.8 * self._job_seconds + 0.2 * seconds

    # -- running a job -------------------------------------------------------------------------------
    def run(self, job: Job) -> asyncio.Task:
        job.task = asyncio.get_running_loop().create_task(self._execute(job))
        return job.task

    async def _execute(self, job: Job) -> None:
        try:
            prepared = await job.in_thread(self.model_thread, self._prepare, job)
            if prepared.answer is None:
                prepared.answer = await job.in_thread(self.generate_threads, self._generate_queued, job, prepared)
        except asyncio.CancelledError:
            job.events.put_nowait(("error", Cancelled()))
        except Exception as error:
            job.events.put_nowait(("error", error))
        else:
            job.events.put_nowait(("done", prepared))
        finally:
            job.end()

    def _pipeline(self, settings: Settings) -> Pipeline:
        """The pipeline for ``settings`` (model thread only)."""
        pipe = self._pipelines.get(settings.key)
        if pipe is not None:
            self._pipelines.move_to_end(settings.key)
            return pipe
        pipe = Pipeline(
            self.lm,
            stages=build_stages(settings.method, settings.budget, **settings.options),
            max_new_tokens=self.config.max_new_tokens,
            truncate=self.config.truncate,
            embedder=getattr(self.retriever, "embedder", None),
            engine=self.engine,
            engine_model=self.config.engine_model,
            engine_api_key=self.config.engine_api_key,
        )
        self._share_decoding(pipe)
        self._pipelines[settings.key] = pipe
        while len(self._pipelines) > self.config.pipeline_cache:
            self._pipelines.popitem(last=False)
        return pipe

    def _context(self, job: Job) -> tuple[list[Passage], float | None, str]:
        """The request's passages, the seconds retrieval took (None: none ran) and where they came from; no
        passages when the request carries none and the server has no index."""
        if job.request.context is not None:
            return job.request.context, None, job.request.context_from
        if self.retriever is None:
            return [], None, "none"
        began = time.perf_counter()
        passages = list(self.retriever.retrieve(job.request.question, job.settings.k))
        if not passages:
            raise InputError("The index returned no passages for this question.")
        return passages, time.perf_counter() - began, "index"

    def _plain_pipeline(self) -> Pipeline:
        """The pipeline of a chat with no context (model thread only): no stages, no RAG instruction."""
        if self._plain is None:
            self._plain = Pipeline(self.lm, instruction="", max_new_tokens=self.config.max_new_tokens,
                                   engine=self.engine, engine_model=self.config.engine_model,
                                   engine_api_key=self.config.engine_api_key)
            self._share_decoding(self._plain)
        return self._plain

    def _share_decoding(self, pipe: Pipeline) -> None:
        """A local generator runs its prefill and cache stages under ``model_lock`` and decodes in the model's
        shared batch (an engine generator has nothing to share)."""
        if isinstance(pipe.generator, LocalGenerator):
            pipe.generator.prepare_lock = self.model_lock

    def _prepare(self, job: Job) -> Prepared:
        """Model thread: context, compression, the uncompressed count (under ``model_lock``); and the answer when an
        input stage feeds an engine (REFRAG). With no context the question is answered as a plain chat, as
        CtxoptChatModel does."""
        with self.model_lock:
            return self._prepare_locked(job)

    def _prepare_locked(self, job: Job) -> Prepared:
        started = time.perf_counter()
        if job.closed.is_set():
            raise Cancelled
        passages, retrieve_seconds, context_from = self._context(job)
        pipe = self._pipeline(job.settings) if passages else self._plain_pipeline()
        generation = {"max_new_tokens": self.config.max_new_tokens, **job.request.generation}
        question = job.request.question
        # This request's system prompt, read only while the prompt is built: pipelines build prompts on this thread
        # only (generation threads read the prompt's own copy).
        pipe.system = job.request.system
        try:
            if not passages:
                prompt = plain_prompt(pipe, question)
                original = len(prompt)
            else:
                prompt = pipe.compress(question, passages, **generation)
                original = prompt.prompt_tokens  # the uncompressed prompt's length, measured by compress()
        finally:
            pipe.system = None
        prepared = Prepared(pipe, prompt, original, generation, context_from, queued_seconds=started - job.began,
                            prepare_seconds=time.perf_counter() - started, retrieve_seconds=retrieve_seconds)
        if pipe.engine is not None and pipe.generator.input_stage is not None:
            prepared.answer = self._generate(job, prepared)
        return prepared

    def _generate_queued(self, job: Job, prepared: Prepared) -> Answer:
        """A generation thread: the answer, after noting how long the request waited for this thread."""
        prepared.generate_queued_seconds = time.perf_counter() - prepared.ready_at
        return self._generate(job, prepared)

    def _generate(self, job: Job, prepared: Prepared) -> Answer:
        if job.closed.is_set():
            raise Cancelled
        return prepared.pipe.generate(prepared.prompt, job.on_text, **prepared.generation)

    # -- the answer's numbers --------------------------------------------------------------------------
    def summary(self, job: Job, prepared: Prepared) -> dict[str, Any]:
        """Text, finish reason, token counts and the ``ctxopt`` field of a finished job."""
        answer, prompt, pipe = prepared.answer, prepared.prompt, prepared.pipe
        stats = answer.stats
        decode = stats.decode_record()
        extra = decode.extra if decode is not None else {}
        prefilled = extra.get("engine_prompt_tokens")
        if prefilled is None:
            stage = pipe.generator.input_stage
            record = stats.get(stage.name) if stage is not None else None
            prefilled = record.tokens_out if record is not None and record.tokens_out is not None else len(prompt)
        generated = extra.get("engine_completion_tokens")
        if generated is None:
            generated = len(answer.token_ids)
        stages = [{"stage": "queue", "seconds": prepared.queued_seconds}]
        if prepared.retrieve_seconds is not None:
            stages.append({"stage": "retrieve", "seconds": prepared.retrieve_seconds})
        if prepared.generate_queued_seconds is not None:
            stages.append({"stage": "queue_generate", "seconds": prepared.generate_queued_seconds})
        stages += [{"stage": r.stage, "seconds": r.seconds, "tokens_in": r.tokens_in, "tokens_out": r.tokens_out}
                   for r in stats.stages]
        ttft = job.first_text_at - job.began if job.first_text_at is not None else None
        settings = job.settings
        return {
            "text": answer.text,
            "finish_reason": finish_reason(extra.get("stopped_by")),
            "prompt_tokens": int(prefilled),
            "completion_tokens": int(generated),
            "ctxopt": {
                "method": settings.method,
                "budget": settings.budget,
                "options": {name: value for name, value in settings.options.items() if _jsonable(value)},
                "context": prepared.context_from,
                "prompt_tokens_original": prepared.original_tokens,
                "prompt_tokens": int(prefilled),
                "tokens_saved": prepared.original_tokens - int(prefilled),
                "sources": [_source(p) for p in answer.sources],
                "stages": stages,
                "seconds": time.perf_counter() - job.began,
                "ttft_seconds": ttft,
                "notes": [note for r in stats.stages for note in r.extra.get("notes", [])],
            },
        }

    def record(self, job: Job, summary: dict[str, Any], prepared: Prepared) -> None:
        ttft = job.first_text_at - job.began if job.first_text_at is not None else None
        self.metrics.answered(
            job.settings.method, time.perf_counter() - job.began, ttft, prepared.prepare_seconds,
            prepared.queued_seconds, prepared.original_tokens, summary["prompt_tokens"],
            summary["completion_tokens"],
        )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _source(passage: Passage) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": passage.source, "id": passage.id, "span": list(passage.span)}
    if passage.score is not None:
        entry["score"] = passage.score
    metadata = {key: value for key, value in passage.metadata.items() if _jsonable(value)}
    if metadata:
        entry["metadata"] = metadata
    return entry


def api_error(error: BaseException) -> ApiError:
    """The HTTP answer to an exception raised while serving a request."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ContextTooLongError):
        return ApiError(400, str(error), "invalid_request_error", code="context_length_exceeded")
    if isinstance(error, InputError):
        return ApiError(400, str(error), "invalid_request_error")
    if isinstance(error, EngineError):
        import httpx

        cause = error.__cause__
        if isinstance(cause, httpx.TimeoutException):
            return ApiError(504, str(error), "engine_error", code="engine_timeout")
        if isinstance(cause, httpx.ConnectError):
            return ApiError(503, str(error), "engine_error", code="engine_unavailable", headers={"Retry-After": "5"})
        return ApiError(502, str(error), "engine_error", code="engine_failed")
    if isinstance(error, Cancelled):
        return ApiError(499, "The request was cancelled.", "cancelled", code="cancelled")
    if isinstance(error, CtxoptError):
        return ApiError(500, str(error), "server_error")
    log.error("unexpected error while answering a request", exc_info=error)
    return ApiError(500, f"Internal error ({type(error).__name__}: {error}).", "server_error")
