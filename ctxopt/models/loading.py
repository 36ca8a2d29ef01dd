"""Load a generator or draft model: from a registry short name, a local folder, a GGUF file or a hub id, onto the
chosen device and dtype, with ctxopt's attention (``attention.GROUPED_SDPA``). Each model, device and dtype is
loaded once per process; later loads return the same :class:`LoadedModel`. The first load sets the number of CPU
threads (``policy.configure_threads``)."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from ..attention import GROUPED_SDPA
from ..errors import ModelLoadError
from .convert import (
    as_list,
    check_magic,
    gguf_model,
    gguf_tokenizer,
    transformers_progress,
)
from .policy import configure_threads, resolve_device_dtype
from .registry import DEFAULT_GENERATOR, known_names, registry_entry, registry_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(eq=False)
class LoadedModel:
    """A causal LM in eval mode on its device, with its tokenizer."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self) -> transformers.PretrainedConfig:
        return self.model.config

    @property
    def _text_config(self) -> transformers.PretrainedConfig:
        return self.config.get_text_config(decoder=True)

    @property
    def max_positions(self) -> int:
        return int(self._text_config.max_position_embeddings)

    @property
    def family(self) -> str:
        """The architecture family: "llama", "qwen2", "gemma3", or else the config's model_type."""
        model_type = self.config.model_type
        return "gemma3" if model_type in ("gemma3", "gemma3_text") else model_type

    @property
    def num_layers(self) -> int:
        return int(self._text_config.num_hidden_layers)

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end generation: the generation config's, then the tokenizer's, without repeats."""
        found: list[Any] = []
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            found += as_list(generation_config.eos_token_id)
        found += as_list(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(int(i) for i in found if i is not None))


_LOADED: dict[tuple[str, str, torch.dtype], LoadedModel] = {}
_LOADED_LOCK = threading.Lock()


def load_model(
    name_or_path: str = DEFAULT_GENERATOR,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    prefill_only: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention (``attention.GROUPED_SDPA``), on
    ``device`` in ``dtype``.

    ``name_or_path`` is one of: a registry short name (see ``REGISTRY``), a folder with a transformers
    model, a ``.gguf`` file, or a hub id ``org/name`` (needs network). Loading the same model on the
    same device and dtype again in this process returns the same object.

    The first load in a process also sets torch's CPU thread count (``policy.configure_threads``: $CTXOPT_THREADS,
    $OMP_NUM_THREADS, or the cores other processes leave free), printed to stderr when ``progress`` and on CPU.
    ``prefill_only`` (a model that only reads prompts: the ctxopt side of a serving engine) may change the
    automatic dtype (``policy.resolve_device_dtype``).
    """
    resolved_device, resolved_dtype = resolve_device_dtype(device, dtype, prefill_only)
    configure_threads(announce=progress and resolved_device.type == "cpu")
    with _LOADED_LOCK:
        kind, source = _resolve_source(str(name_or_path), progress)
        key = (source, str(resolved_device), resolved_dtype)
        if key not in _LOADED:
            model, tokenizer = _load(kind, source, resolved_dtype, progress)
            model.to(resolved_device)
            model.eval()
            model.requires_grad_(False)
            name = registry_entry(str(name_or_path)).name if kind == "registry" else str(name_or_path)
            _LOADED[key] = LoadedModel(model, tokenizer, name, resolved_device, resolved_dtype)
        return _LOADED[key]


_TOKENIZERS: dict[str, transformers.PreTrainedTokenizerBase] = {}


def load_tokenizer(name_or_path: str, progress: bool = True) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of a model named as ``load_model`` takes it, without loading the weights (for a model that
    runs elsewhere: a compressor served by an engine). Loaded once per process."""
    with _LOADED_LOCK:
        kind, source = _resolve_source(str(name_or_path), progress)
        if source in _TOKENIZERS:
            return _TOKENIZERS[source]
        if kind == "gguf":
            tokenizer = gguf_tokenizer(Path(source), "Pass an intact GGUF file.")
        else:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            except Exception as err:
                raise ModelLoadError(f"could not load the tokenizer of {source!r}: {err}") from err
        _TOKENIZERS[source] = tokenizer
        return tokenizer


def _resolve_source(name_or_path: str, progress: bool) -> tuple[str, str]:
    """``(kind, source)``: kind is "registry" | "folder" | "gguf" | "hub"; source a resolved path or hub id."""
    if registry_entry(name_or_path) is not None:
        return "registry", str(registry_path(name_or_path, progress).resolve())
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a .gguf file or a model folder")
        return "gguf", str(path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            return "folder", str(path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(ggufs[0].resolve())
        raise ModelLoadError(
            f"{path} is a folder without config.json and with {len(ggufs)} .gguf files; "
            f"pass a transformers model folder or one .gguf file"
        )
    if _HUB_ID.match(name_or_path) and not name_or_path.lower().endswith(".gguf"):
        return "hub", name_or_path
    raise ModelLoadError(
        f"no model named {name_or_path!r}: it is not a registry name, an existing folder or .gguf file, "
        f"or a hub id of the form org/name. Registry models (load offline): {known_names()}"
    )


def _load(
    kind: str, source: str, dtype: torch.dtype, progress: bool
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Model and tokenizer from a resolved source, on CPU in ``dtype``, running ``GROUPED_SDPA``.

    The attention implementation is chosen here, by ``from_pretrained``: GROUPED_SDPA is transformers' SDPA
    (and is checked as such: a model that cannot run SDPA fails to load, as it would when asked for "sdpa").
    """
    if kind == "gguf":
        path = Path(source)
        advice = "Pass an intact GGUF file (a truncated download is the usual cause)."
        check_magic(path, advice)
        return gguf_model(path, dtype, advice, progress, GROUPED_SDPA), gguf_tokenizer(path, advice)
    try:
        with transformers_progress(progress):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=GROUPED_SDPA
            )
    except Exception as err:
        if kind == "hub":
            raise ModelLoadError(
                f"could not load {source!r} from the model hub ({err}). A hub id needs network access to the hub "
                f"(or a copy already in the local hub cache). Registry models load offline: {known_names()}"
            ) from err
        advice = f"; if it is a registry model folder, delete {source} and load it again" if kind == "registry" else ""
        raise ModelLoadError(f"could not load the model in {source}: {err}{advice}") from err
    return model, tokenizer
