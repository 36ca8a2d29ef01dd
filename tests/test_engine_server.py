"""End-to-end tests against a real vLLM CPU server (see docs/engine.md), over plain HTTP.

One engine serves the converted SmolLM2 for the whole session. The tests skip when the engine venv is not set
up (``bash scripts/engine.sh``), unless ``CTXOPT_REQUIRE_ENGINE=1``, which CI sets so a missing engine fails.
"""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from conftest import MAX_MODEL_LEN
from safetensors import safe_open
from transformers import AutoTokenizer

pytestmark = pytest.mark.real_model

LONG_PROMPT_TOKENS = 4096


@pytest.fixture(scope="session")
def engine_tokenizer(engine_model_folder):
    return AutoTokenizer.from_pretrained(str(engine_model_folder))


def _post(url: str, body: dict, timeout: float = 300.0):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    return urllib.request.urlopen(request, timeout=timeout)


def _complete(engine, **body) -> dict:
    with _post(f"{engine.base_url}/completions", {"model": engine.model, **body}) as response:
        assert response.status == 200
        return json.load(response)


def _stream(engine, **body):
    """(seconds to the first chunk with text, the chunks' concatenated text, the parsed chunks)."""
    started = time.perf_counter()
    first = None
    chunks = []
    with _post(f"{engine.base_url}/completions", {"model": engine.model, "stream": True, **body}) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "text/event-stream"
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - started
            chunks.append(chunk)
    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    return first, text, chunks


def _token_ids(tokenizer, count: int, head: str = "") -> list[int]:
    """``count`` token ids of plain English text (the packaged demo corpus, repeated), after ``head``."""
    corpus = Path(__file__).resolve().parent.parent / "ctxopt" / "data" / "demo" / "corpus"
    text = "\n\n".join(path.read_text() for path in sorted(corpus.glob("*.md")))
    ids = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < count:
        ids += body
    return ids[:count]


def _embeddings(folder: Path, ids: list[int]) -> torch.Tensor:
    """The model's input embeddings of ``ids``, shape (len(ids), hidden_size), read from its safetensors."""
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        table = weights.get_tensor("model.embed_tokens.weight")
    return table[torch.tensor(ids)]


def _encode_embeds(tensor: torch.Tensor) -> str:
    """vLLM's ``prompt_embeds`` wire format: base64 of the bytes ``torch.save`` writes."""
    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_token_id_prompts_plain_and_streamed(engine, engine_tokenizer):
    with urllib.request.urlopen(f"{engine.base_url}/models", timeout=30) as response:
        listed = [entry["id"] for entry in json.load(response)["data"]]
    assert listed == [engine.model]

    text = "The lighthouse keeper walked down to the harbour and"
    ids = engine_tokenizer(text, add_special_tokens=False)["input_ids"]
    body = {"prompt": ids, "max_tokens": 8, "temperature": 0}
    answer = _complete(engine, **body)
    text = answer["choices"][0]["text"]
    assert text.strip()
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["usage"]["completion_tokens"] == 8

    _, streamed, chunks = _stream(engine, **body)
    assert len(chunks) > 1
    assert streamed == text


def test_prompt_embeddings_match_token_ids(engine, engine_model_folder, engine_tokenizer):
    """The embeddings of the same ids, sent as ``prompt_embeds``, give the same greedy continuation."""
    ids = engine_tokenizer("The winter festival in Eldermoor begins when", add_special_tokens=False)["input_ids"]
    by_ids = _complete(engine, prompt=ids, max_tokens=8, temperature=0)
    embeds = _embeddings(engine_model_folder, ids)
    assert embeds.dtype == torch.float32  # the server casts floating point to its --dtype (bfloat16)
    by_embeds = _complete(engine, prompt_embeds=_encode_embeds(embeds), max_tokens=8, temperature=0)
    assert by_embeds["usage"]["prompt_tokens"] == len(ids)
    assert by_embeds["choices"][0]["text"] == by_ids["choices"][0]["text"]


def test_prompt_longer_than_max_model_len_is_a_400(engine):
    ids = [100] * (MAX_MODEL_LEN + 10)
    with pytest.raises(urllib.error.HTTPError) as caught:
        _complete(engine, prompt=ids, max_tokens=8, temperature=0)
    assert caught.value.code == 400
    error = json.load(caught.value)["error"]
    assert error["code"] == 400
    assert str(MAX_MODEL_LEN) in error["message"]


def test_long_prompt_ttft_and_prefix_cache(engine, engine_tokenizer):
    """A 4K-token prompt: first time-to-first-token, then again with its prefix cached."""
    ids = _token_ids(engine_tokenizer, LONG_PROMPT_TOKENS, head=f"Notes {uuid.uuid4().hex}.\n\n")
    body = {"prompt": ids, "max_tokens": 8, "temperature": 0}
    cold, cold_text, _ = _stream(engine, **body)
    warm, warm_text, _ = _stream(engine, **body)
    print(f"\nTTFT of {len(ids)} prompt tokens: {cold:.2f} s cold, {warm:.2f} s with the prefix cached")
    assert cold is not None and warm is not None
    assert warm_text == cold_text
    assert warm < cold
