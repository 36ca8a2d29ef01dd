"""The serving-engine generator: the compressed prompt goes to an OpenAI-compatible server (vLLM first).

ctxopt applies the chat template and runs the passage and token stages itself (``Pipeline.compress``), then
sends the kept TOKEN IDS as the prompt of ``POST {base_url}/completions`` (vLLM and SGLang take a list of ints;
``prompt_format="text"`` sends the detokenised ids for servers that take only text). The engine brings what
ctxopt's own loop lacks: continuous batching, prefix caching and fast kernels. Nothing here holds a KV cache, so
cache stages (SnapKV, SpecKV) and decoders (RAPID) cannot run on an engine; an input stage runs only when it can
hand the engine embeddings (REFRAG, through vLLM's ``--enable-prompt-embeds``).

The answer streams (server-sent events), so the first token's arrival is measured as the engine's TTFT; stop
strings, max tokens, temperature, top-p and seed pass through, and the server's ``usage`` comes back in the
Stats record ``decode:engine``.
"""
from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

from ..decoding import DecodeResult
from ..errors import ContextTooLongError, EngineError, InputError
from ..measure import measure
from ..stages import Run
from ..types import Prompt

if TYPE_CHECKING:
    import torch

    from ..models import LoadedModel

PROMPT_FORMATS = ("tokens", "text")
FINISH_REASONS = {"stop": "eos_or_stop", "length": "max_new_tokens"}
PROBE_TEXT = "ctxopt tokenizer probe: the vault code is 4817, naïve café 日本."


class EngineGenerator:
    """Answers through the OpenAI-compatible server at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``).

    ``model``: the served model's name (default: the only model the server lists); the engine's model list and
    tokenizer are checked against the pipeline's model before the first request (``check``). ``input_stage``:
    an input stage that can hand the engine embeddings instead of token ids (REFRAG's ``inputs_embeds``).
    Requests are independent: concurrent calls reach the engine concurrently, which batches them.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        prompt_format: str = "tokens",
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        max_concurrency: int = 16,
        input_stage: Any = None,
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise InputError(f"prompt_format must be one of {PROMPT_FORMATS}; got {prompt_format!r}.")
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"engine must be an http(s) URL such as http://127.0.0.1:8000/v1; got {base_url!r}.")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.prompt_format = prompt_format
        self.max_concurrency = max_concurrency
        self.input_stage = input_stage
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout), trust_env=False
        )
        self._checked_for: object | None = None

    # -- connection and the model check ---------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self._client.request(method, url, **kwargs)
        except httpx.TimeoutException as error:
            raise EngineError(f"The engine at {self.base_url} did not answer {path} in time ({error}).") from error
        except httpx.HTTPError as error:
            raise EngineError(f"The engine at {self.base_url} is not reachable ({type(error).__name__}: {error}); "
                              "start it, or check the URL (it ends in /v1).") from error
        if response.status_code >= 400:
            raise self._http_error(path, response.status_code, response.text)
        return response

    def _http_error(self, path: str, status: int, body: str) -> EngineError:
        message = _error_message(body)
        if status in (400, 413) and any(word in message.lower() for word in ("maximum context", "too long",
                                                                             "max_model_len", "context length")):
            return ContextTooLongError(f"The engine at {self.base_url} refused the prompt as too long: {message}")
        return EngineError(f"The engine at {self.base_url} answered {path} with HTTP {status}: {message}")

    def served_models(self) -> list[str]:
        """The model names the engine serves (``GET /models``)."""
        data = self._request("GET", "/models").json().get("data", [])
        return [entry.get("id") for entry in data if entry.get("id")]

    def check(self, lm: "LoadedModel") -> None:
        """Refuse an engine that serves another model than ``lm`` (``check_tokenizer``), once per model."""
        if self._checked_for is lm:
            return
        self.check_tokenizer(lm.tokenizer, lm.name, getattr(lm.config, "name_or_path", "") or lm.name)
        self._checked_for = lm

    def check_tokenizer(self, tokenizer: Any, name: str, folder: str | None = None) -> None:
        """Refuse an engine that serves another model: the served name must be given or be the only one, and
        where the engine can tokenize (vLLM's ``POST /tokenize``) a probe text must give ``tokenizer``'s ids,
        since ctxopt sends token ids that only mean the same words under the same tokenizer."""
        served = self.served_models()
        if self.model is None:
            if len(served) != 1:
                raise EngineError(f"The engine at {self.base_url} serves {served or 'no model'}; pass "
                                  "engine_model=... (CLI: --engine-model) to name the one to use.")
            self.model = served[0]
        elif self.model not in served:
            raise EngineError(f"The engine at {self.base_url} does not serve {self.model!r}; it serves {served}.")
        expected = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        found = self._engine_tokens(PROBE_TEXT)
        if found is not None and found != expected:
            raise EngineError(
                f"The engine's model {self.model!r} tokenizes text differently from {name!r}: it is another "
                f"model. Serve that model (its folder: {folder or name}) or use the engine's model instead."
            )

    def served_entry(self) -> dict[str, Any]:
        """The engine's ``GET /models`` entry of the served model (vLLM adds ``root``, and ``parent`` for a LoRA
        module), after ``check_tokenizer`` or ``check`` chose it."""
        data = self._request("GET", "/models").json().get("data", [])
        return next((entry for entry in data if entry.get("id") == self.model), {"id": self.model})

    def _engine_tokens(self, text: str) -> list[int] | None:
        """The engine's token ids of ``text`` without special tokens, or None if it has no tokenize endpoint."""
        root = self.base_url.removesuffix("/v1")
        try:
            response = self._client.post(f"{root}/tokenize", json={"model": self.model, "prompt": text,
                                                                   "add_special_tokens": False})
        except httpx.HTTPError:
            return None
        try:
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except ValueError:
            return None
        return list(tokens) if isinstance(tokens, list) else None

    # -- requests ---------------------------------------------------------------------------------------
    def request_body(self, prompt: Prompt, run: Run, embeds: "torch.Tensor | None" = None) -> dict[str, Any]:
        """The completions request for ``prompt``: token ids (or their text, or prompt embeddings) and the
        run's decoding settings."""
        config = run.config
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": config.max_new_tokens, "temperature": config.temperature,
            "top_p": config.top_p, "stream": True, "stream_options": {"include_usage": True},
        }
        if config.stop_strings:
            body["stop"] = list(config.stop_strings)
        if config.seed is not None:
            body["seed"] = config.seed
        if embeds is not None:
            body["prompt_embeds"] = encode_embeds(embeds)
        elif self.prompt_format == "tokens":
            body["prompt"] = prompt.input_ids.tolist()
        else:
            body["prompt"] = run.lm.tokenizer.decode(prompt.input_ids, skip_special_tokens=False)
        return body

    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The server-sent events of one streamed completion, as JSON objects; an error event raises."""
        url = f"{self.base_url}/completions"
        try:
            with self._client.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    raise self._http_error("/completions", response.status_code, response.read().decode())
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise EngineError(f"The engine at {self.base_url} failed mid-answer: "
                                          f"{_error_message(json.dumps(event))}")
                    yield event
        except httpx.TimeoutException as error:
            raise EngineError(f"The engine at {self.base_url} timed out while answering ({error}).") from error
        except httpx.HTTPError as error:
            raise EngineError(f"The engine at {self.base_url} dropped the request ({type(error).__name__}: "
                              f"{error}).") from error

    def complete(
        self, prompt: Prompt, run: Run, on_text: Callable[[str], None] | None = None,
        embeds: "torch.Tensor | None" = None,
    ) -> DecodeResult:
        """One streamed completion: the text, the seconds to its first piece and the server's usage."""
        self.check(run.lm)
        body = self.request_body(prompt, run, embeds)
        began = time.perf_counter()
        pieces: list[str] = []
        first, finish, usage = None, None, {}
        for event in self.stream(body):
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                piece = choice.get("text") or ""
                if piece:
                    first = time.perf_counter() - began if first is None else first
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
                finish = choice.get("finish_reason") or finish
        text = "".join(pieces)
        return DecodeResult(
            token_ids=run.lm.tokenizer(text, add_special_tokens=False)["input_ids"] if text else [],
            text=text,
            seconds=time.perf_counter() - began,
            first_token_seconds=first if first is not None else time.perf_counter() - began,
            forward_passes=0,
            stopped_by=FINISH_REASONS.get(finish, finish or "unknown"),
            extra={"engine": self.base_url, "engine_model": self.model,
                   "engine_prompt_tokens": usage.get("prompt_tokens"),
                   "engine_completion_tokens": usage.get("completion_tokens")},
        )

    def completion_text(self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0) -> str:
        """The text of one completion of a token-id prompt, not streamed (greedy at ``temperature`` 0)."""
        body = {"model": self.model, "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": temperature}
        choices = self._request("POST", "/completions", json=body).json().get("choices") or [{}]
        return choices[0].get("text") or ""

    # -- the Generator protocol ---------------------------------------------------------------------------
    def generate(self, prompt: Prompt, run: Run, on_text: Callable[[str], None] | None = None) -> DecodeResult:
        embeds = None
        if self.input_stage is not None:  # the ctxopt side of an input stage: its embeddings, sent instead of ids
            with measure(self.input_stage.name, run.lm.device, tokens_in=len(prompt)) as record:
                embeds = self.input_stage.inputs_embeds(prompt, run)
                record.tokens_out = int(embeds.shape[0])
            run.add_record(record)
        with measure("decode:engine", run.lm.device, tokens_in=len(prompt)) as record:
            result = self.complete(prompt, run, on_text, embeds)
            record.tokens_out = result.extra.get("engine_completion_tokens") or len(result.token_ids)
            record.extra.update(
                first_token_seconds=result.first_token_seconds, stopped_by=result.stopped_by,
                tokens_per_second=(record.tokens_out / result.seconds if record.tokens_out and result.seconds
                                   else None),
                **result.extra,
            )
        run.add_record(record)
        return result

    def generate_many(self, prompts: Sequence[Prompt], runs: Sequence[Run]) -> list[DecodeResult]:
        """All prompts at once (up to ``max_concurrency`` in flight): the engine batches them and its prefix
        cache shares their common start."""
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(self.generate, prompts, runs))

    def close(self) -> None:
        self._client.close()


def encode_embeds(embeds: "torch.Tensor") -> str:
    """A (positions, hidden) tensor as vLLM's ``prompt_embeds`` field: base64 of ``torch.save`` bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_message(body: str) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}`` or ``{"message": ...}``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "(empty body)"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error)[:500]
