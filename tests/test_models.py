"""Tests of ctxopt.models: GGUF and folder loading, the registry, device/dtype parsing, memoization.

Tests marked ``real_model`` use the packaged SmolLM2 in the real cache (downloaded and converted once per
machine); every other test works offline on a tiny random Llama written to GGUF here.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ctxopt import models
from ctxopt.attention import GROUPED_SDPA
from ctxopt.compressors.gemfilter import GemFilter, early_layer_scores
from ctxopt.errors import InputError, ModelLoadError
from ctxopt.models import convert, fetch, policy, registry

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HEADS, KV_HEADS = 4, 2


def _tokens() -> list[str]:
    """A byte-level BPE vocabulary: the 256 byte symbols, the merged tokens, then the special tokens."""
    byte_symbols = [bytes_to_unicode()[b] for b in range(256)]
    return byte_symbols + [merge.replace(" ", "") for merge in MERGES] + SPECIALS


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (transformers' GGUF loader undoes it)."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(model: transformers.LlamaForCausalLM, path: Path) -> None:
    """Write ``model`` and a tiny byte-level tokenizer as an F32 llama GGUF, named the way llama.cpp names tensors."""
    config, tokens = model.config, _tokens()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.float().numpy()
        if base.endswith("q_proj"):
            array = _permute(array, HEADS)
        elif base.endswith("k_proj"):
            array = _permute(array, KV_HEADS)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.LlamaForCausalLM, Path]:
    """A tiny random Llama (hidden 64, 2 layers) and the GGUF file it was written to."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(_tokens()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    _write_gguf(model, path)
    return model, path


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CTXOPT_CACHE pointed at an empty temporary folder."""
    monkeypatch.setenv("CTXOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


IDS = torch.tensor([[5, 80, 17, 200, 3, 99, 256, 258]])


# --- (a) GGUF and folder loading --------------------------------------------------------------------


def test_gguf_file_loads_with_identical_logits(tiny):
    original, path = tiny
    lm = models.load_model(str(path), device="cpu", dtype="float32", progress=False)
    with torch.no_grad():
        expected = original(IDS).logits
        got = lm.model(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert lm.family == "llama" and lm.num_layers == 2 and lm.max_positions == 128
    assert lm.model.config._attn_implementation == GROUPED_SDPA
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert getattr(lm.model, "hf_quantizer", None) is None
    assert not hasattr(lm.config, "quantization_config")


def test_gguf_tokenizer_chat_template_and_eos(tiny):
    _, path = tiny
    lm = models.load_model(str(path), device="cpu", dtype="float32", progress=False)
    tokens = _tokens()
    text = "cat the"
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokens.index("Ġthe") in ids and lm.tokenizer.decode(ids) == text
    assert lm.tokenizer.chat_template == CHAT_TEMPLATE
    assert convert._gguf_string(path, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert tokens.index("<|im_end|>") in lm.eos_token_ids
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_bf16_gguf_load(tiny):
    _, path = tiny
    lm = models.load_model(str(path), device="cpu", dtype="bf16", progress=False)
    assert lm.dtype == torch.bfloat16 and lm.model.dtype == torch.bfloat16
    assert lm.model(IDS).logits.dtype == torch.bfloat16


def test_folder_loads(tiny, tmp_path):
    original, path = tiny
    tokenizer = models.load_model(str(path), device="cpu", dtype="float32", progress=False).tokenizer
    original.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    lm = models.load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, original(IDS).logits)
    assert lm.name == str(tmp_path / "tiny") and lm.tokenizer.chat_template == CHAT_TEMPLATE



def test_a_prefill_only_model_loads_only_the_weights_a_method_reads(tiny, tmp_path):
    """The ctxopt side of a serving engine: the tokenizer and config load at once, GemFilter's first layers or
    REFRAG's embeddings alone when asked, the whole model on first use of ``model``; each computes what the
    whole model does."""
    original, path = tiny
    folder = tmp_path / "tiny"
    original.save_pretrained(folder)
    models.load_model(str(path), device="cpu", dtype="float32", progress=False).tokenizer.save_pretrained(folder)
    lm = models.load_model(str(folder), device="cpu", dtype="float32", progress=False, prefill_only=True)
    assert not lm.loaded
    assert (lm.num_layers, lm.max_positions, lm.family, lm.config.hidden_size) == (2, 128, "llama", 64)
    assert lm.tokenizer.chat_template == CHAT_TEMPLATE and lm.tokenizer("cat")["input_ids"]

    GemFilter(budget=4, layer=0).prepare(lm)
    first = lm.first_layers(1)
    assert len(first.model.layers) == 1 and not lm.loaded
    torch.testing.assert_close(early_layer_scores(first, IDS[0], 0), early_layer_scores(original, IDS[0], 0))
    embedding = lm.first_layers(0).get_input_embeddings()
    torch.testing.assert_close(embedding(IDS), original.get_input_embeddings()(IDS))
    assert lm.first_layers(1) is first and not lm.loaded  # loaded once

    whole = lm.model
    assert lm.loaded and lm.first_layers(1) is whole and len(whole.model.layers) == 2
    with torch.no_grad():
        torch.testing.assert_close(whole(IDS).logits, original(IDS).logits)
    assert models.load_model(str(folder), device="cpu", dtype="float32", progress=False) is lm


# --- (b) registry and errors ------------------------------------------------------------------------


@pytest.fixture
def no_transformers_loading(monkeypatch):
    """Fail the test if anything tries to load a model or tokenizer (it would reach for the hub)."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("name", ["no-such-model", "missing/model.gguf", "./missing-folder", "a/b/c"])
def test_unknown_name_fails_fast_listing_registry(name, tmp_cache, no_transformers_loading):
    with pytest.raises(ModelLoadError) as info:
        models.load_model(name, device="cpu", progress=False)
    for known in models.REGISTRY:
        assert known in str(info.value)


def test_hub_id_failure_says_network_and_lists_registry(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="network") as info:
        models.load_model("some-org/some-model", device="cpu", progress=False)
    assert "smollm2-135m" in str(info.value)


def test_aliases_are_case_insensitive():
    assert models.registry_entry(" SmolLM2 ") is models.REGISTRY["smollm2-135m"]
    assert models.registry_entry("Qwen2.5-Coder-1.5B-Instruct") is models.REGISTRY["qwen2.5-coder-1.5b"]
    assert models.registry_entry("gpt-17") is None
    assert models.DEFAULT_GENERATOR in models.REGISTRY


def test_random_bytes_gguf_is_rejected(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.load_model(str(path), device="cpu", progress=False)


def test_truncated_gguf_is_rejected(tiny, tmp_path):
    _, path = tiny
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        models.load_model(str(truncated), device="cpu", progress=False)


def _fake_wheel(folder: Path, distribution: str, member: str, payload: bytes) -> Path:
    wheel = folder / f"{distribution.replace('-', '_')}-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{distribution.replace('-', '_')}-0.9.0.dist-info/METADATA", "Name: x\n")
        archive.writestr(member, payload)
    return wheel


def test_assemble_concatenates_members_in_order(tmp_path):
    payloads = [b"GGUF-first-", b"second-", b"third"]
    wheels = [_fake_wheel(tmp_path, f"pkg-part{i}", f"data/part{i:02d}.bin", p) for i, p in enumerate(payloads, 1)]
    out = tmp_path / "model.gguf"
    fetch._assemble(wheels, [f"data/part{i:02d}.bin" for i in (1, 2, 3)], out, progress=False, label="test")
    assert out.read_bytes() == b"".join(payloads)


def test_corrupt_registry_download_names_the_cache_folder(tmp_cache, monkeypatch):
    entry = models.REGISTRY["qwen2.5-coder-0.5b"]

    def fake_download(requirements, dest, progress, label):
        return [_fake_wheel(dest, r.split("==")[0], m, b"not a gguf") for r, m in entry.parts]

    monkeypatch.setattr(fetch, "pip_download", fake_download)
    with pytest.raises(ModelLoadError, match="not a GGUF file") as info:
        models.registry_path(entry.name, progress=False)
    assert str(tmp_cache / "downloads" / entry.name) in str(info.value)
    assert not (tmp_cache / "models" / entry.name).exists()


def test_registry_gguf_with_wrong_checksum_is_rejected(tmp_cache):
    entry = models.REGISTRY["smollm2-135m"]
    downloads = tmp_cache / "downloads" / entry.name
    downloads.mkdir(parents=True)
    (downloads / entry.gguf_name).write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ModelLoadError, match="sha256"):
        registry._verify_gguf(downloads / entry.gguf_name, entry, advice="delete it")


def test_cache_dir_follows_env(tmp_cache):
    assert models.cache_dir() == tmp_cache


# --- (c) device and dtype ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("float32", torch.float32), ("FP32", torch.float32),
     ("fp16", torch.float16), ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_dtype_strings(dtype, expected):
    assert models.resolve_device_dtype("cpu", dtype) == (torch.device("cpu"), expected)


def test_automatic_device_and_dtype(monkeypatch):
    monkeypatch.delenv("CTXOPT_DEVICE", raising=False)
    monkeypatch.delenv("CTXOPT_DTYPE", raising=False)
    device, dtype = models.resolve_device_dtype()
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.bfloat16)
    else:
        assert (device, dtype) == (torch.device("cpu"), policy._CPU_DEFAULT_DTYPE)
    assert models.resolve_device_dtype("auto", "auto") == (device, dtype)


def test_a_prefill_only_model_is_bf16_on_a_cpu_with_native_bf16(monkeypatch):
    """The ctxopt side of a serving engine only reads prompts: bf16 where the CPU multiplies it natively (measured
    1.7x faster prefill there), float32 elsewhere; an explicit dtype or $CTXOPT_DTYPE still wins."""
    monkeypatch.delenv("CTXOPT_DTYPE", raising=False)
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, policy._CPU_DEFAULT_DTYPE)):
        monkeypatch.setattr(policy, "native_bf16_cpu", lambda native=native: native)
        assert models.resolve_device_dtype("cpu", prefill_only=True) == (cpu, expected)
        assert models.resolve_device_dtype("cpu") == (cpu, policy._CPU_DEFAULT_DTYPE)  # a generating model
        assert models.resolve_device_dtype("cpu", "float32", prefill_only=True) == (cpu, torch.float32)
    monkeypatch.setenv("CTXOPT_DTYPE", "float32")
    assert models.resolve_device_dtype("cpu", prefill_only=True) == (cpu, torch.float32)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_native_bf16_agrees_with_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert policy.native_bf16_cpu() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_env_overrides_and_arguments_win(monkeypatch):
    monkeypatch.setenv("CTXOPT_DEVICE", "cpu")
    monkeypatch.setenv("CTXOPT_DTYPE", "bf16")
    assert models.resolve_device_dtype() == (torch.device("cpu"), torch.bfloat16)
    assert models.resolve_device_dtype(dtype="float32") == (torch.device("cpu"), torch.float32)


def test_bad_device_or_dtype_is_input_error():
    with pytest.raises(InputError, match="dtype"):
        models.resolve_device_dtype("cpu", "int3")
    with pytest.raises(InputError, match="device"):
        models.resolve_device_dtype("quantum", "float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_input_error():
    with pytest.raises(InputError, match="CUDA"):
        models.resolve_device_dtype("cuda")


# --- (d) memoization --------------------------------------------------------------------------------


def test_same_model_device_dtype_is_memoized(tiny):
    _, path = tiny
    first = models.load_model(str(path), device="cpu", dtype="float32", progress=False)
    assert models.load_model(str(path), device="cpu", dtype="fp32", progress=False) is first
    assert models.load_model(str(path), device="cpu", dtype="bf16", progress=False) is not first


# --- the packaged SmolLM2 (real cache; downloads and converts once per machine) --------------------


@pytest.mark.real_model
def test_smollm2_registry_answers_through_chat_template():
    lm = models.load_model("smollm2-135m", device="cpu", dtype="float32", progress=False)
    assert lm.family == "llama" and lm.num_layers == 30 and lm.max_positions == 8192
    assert (models.cache_dir() / "models" / "smollm2-135m" / models.MARKER).is_file()
    assert lm.tokenizer.chat_template is not None
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in lm.eos_token_ids
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=lm.eos_token_ids)
    answer = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer and "Paris" in answer
