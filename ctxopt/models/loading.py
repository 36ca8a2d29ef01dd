"""Load a generator or draft model: from a registry short name, a local folder, a GGUF file or a hub id, onto the
chosen device and dtype, with ctxopt's attention (``attention.GROUPED_SDPA``). Each model, device and dtype is
loaded once per process; later loads return the same :class:`LoadedModel`. The first load sets the number of CPU
threads (``policy.configure_threads``)."""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

_GGUF_ADVICE = "Pass an intact GGUF file (a truncated download is the usual cause)."
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoadedModel:
    """A causal LM in eval mode on its device, with its tokenizer.

    Built with ``model=None``, a ``loader`` and the model's ``config``, its weights load on first use of
    ``model``: the ctxopt side of a serving engine, where most methods read only the tokenizer and the config
    (rag, extractive, truncation, SpecPC's draft) and GemFilter only the first layers (:meth:`first_layers`).
    ``loader(count)`` returns the model on its device in eval mode, all of it for ``None``, else only its first
    ``count`` decoder layers.
    """

    def __init__(
        self,
        model: transformers.PreTrainedModel | None,
        tokenizer: transformers.PreTrainedTokenizerBase,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        *,
        loader: Callable[[int | None], transformers.PreTrainedModel] | None = None,
        config: transformers.PretrainedConfig | None = None,
        generation_config: transformers.GenerationConfig | None = None,
    ) -> None:
        if model is None and (loader is None or config is None):
            raise ValueError("LoadedModel without a model needs a loader and the model's config")
        self._model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = dtype
        self._loader = loader
        self._config = config
        self._generation_config = generation_config
        self._first: dict[int, transformers.PreTrainedModel] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, {self.device}, {self.dtype}, loaded={self.loaded})"

    @property
    def model(self) -> transformers.PreTrainedModel:
        """The whole model, loaded now if it was deferred."""
        return self.load_weights()

    def load_weights(self) -> transformers.PreTrainedModel:
        """Load the whole model now if it was deferred; returns it."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._loader(None)
                    self._first.clear()  # the whole model runs any first layers now
        return self._model

    @property
    def loaded(self) -> bool:
        """Whether the whole model's weights are in memory."""
        return self._model is not None

    def first_layers(self, count: int) -> transformers.PreTrainedModel:
        """A model that runs at least the first ``count`` decoder layers as this one does: the whole model once
        it is loaded, else one with only those layers loaded (GemFilter's early layers on the ctxopt side of an
        engine: at layer 16 of Qwen2.5-Coder-1.5B's 28, 2.85 GB resident against 3.79 GB, docs/engine.md)."""
        if self._model is not None or count >= self.num_layers:
            return self.model
        with self._lock:
            if count not in self._first:
                self._first[count] = self._loader(count)
            return self._first[count]

    @property
    def config(self) -> transformers.PretrainedConfig:
        return self._config if self._model is None and self._config is not None else self.model.config

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
        generation_config = (self._generation_config if self._model is None
                             else getattr(self._model, "generation_config", None))
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
    automatic dtype (``policy.resolve_device_dtype``) and defers the weights until a method needs them
    (:class:`LoadedModel`): the tokenizer and the config load now, the layers when first used (a GGUF file,
    which holds its config in the weights file, loads whole).
    """
    resolved_device, resolved_dtype = resolve_device_dtype(device, dtype, prefill_only)
    configure_threads(announce=progress and resolved_device.type == "cpu")
    with _LOADED_LOCK:
        kind, source = _resolve_source(str(name_or_path), progress)
        key = (source, str(resolved_device), resolved_dtype)
        if key not in _LOADED:
            name = registry_entry(str(name_or_path)).name if kind == "registry" else str(name_or_path)

            def loader(layers: int | None) -> transformers.PreTrainedModel:
                model = _load_weights(kind, source, resolved_dtype, progress, layers)
                model.to(resolved_device)
                model.eval()
                model.requires_grad_(False)
                return model

            if prefill_only and kind != "gguf":
                config, generation_config = _load_configs(kind, source)
                _LOADED[key] = LoadedModel(None, _load_tokenizer(kind, source), name, resolved_device,
                                           resolved_dtype, loader=loader, config=config,
                                           generation_config=generation_config)
            else:
                _LOADED[key] = LoadedModel(loader(None), _load_tokenizer(kind, source), name, resolved_device,
                                           resolved_dtype, loader=loader)
        return _LOADED[key]


_TOKENIZERS: dict[str, transformers.PreTrainedTokenizerBase] = {}


def load_tokenizer(name_or_path: str, progress: bool = True) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of a model named as ``load_model`` takes it, without loading the weights (for a model that
    runs elsewhere: a compressor served by an engine). Loaded once per process."""
    with _LOADED_LOCK:
        kind, source = _resolve_source(str(name_or_path), progress)
        if source in _TOKENIZERS:
            return _TOKENIZERS[source]
        tokenizer = _TOKENIZERS[source] = _load_tokenizer(kind, source)
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


def _load_failure(kind: str, source: str, what: str, err: Exception) -> ModelLoadError:
    if kind == "hub":
        return ModelLoadError(
            f"could not load {source!r} from the model hub ({err}). A hub id needs network access to the hub "
            f"(or a copy already in the local hub cache). Registry models load offline: {known_names()}"
        )
    advice = f"; if it is a registry model folder, delete {source} and load it again" if kind == "registry" else ""
    return ModelLoadError(f"could not load {what} in {source}: {err}{advice}")


def _load_tokenizer(kind: str, source: str) -> transformers.PreTrainedTokenizerBase:
    if kind == "gguf":
        return gguf_tokenizer(Path(source), _GGUF_ADVICE)
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise _load_failure(kind, source, "the tokenizer", err) from err


def _load_configs(kind: str, source: str) -> tuple[transformers.PretrainedConfig, transformers.GenerationConfig | None]:
    """The model's config and its generation config (None where the model has none)."""
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as err:
        raise _load_failure(kind, source, "the model's config", err) from err
    try:
        generation_config = transformers.GenerationConfig.from_pretrained(source)
    except OSError:
        generation_config = None
    return config, generation_config


def _load_weights(
    kind: str, source: str, dtype: torch.dtype, progress: bool, layers: int | None = None
) -> transformers.PreTrainedModel:
    """The model from a resolved source, on CPU in ``dtype``, running ``GROUPED_SDPA``; with ``layers``, only its
    first ``layers`` decoder layers are built and read (a GGUF file always loads whole).

    The attention implementation is chosen here, by ``from_pretrained``: GROUPED_SDPA is transformers' SDPA
    (and is checked as such: a model that cannot run SDPA fails to load, as it would when asked for "sdpa").
    """
    if kind == "gguf":
        path = Path(source)
        check_magic(path, _GGUF_ADVICE)
        return gguf_model(path, dtype, _GGUF_ADVICE, progress, GROUPED_SDPA)
    try:
        with transformers_progress(progress):
            if layers is None:
                return transformers.AutoModelForCausalLM.from_pretrained(
                    source, dtype=dtype, attn_implementation=GROUPED_SDPA)
            config = transformers.AutoConfig.from_pretrained(source)
            text_config = config.get_text_config(decoder=True)
            text_config.num_hidden_layers = layers
            if isinstance(getattr(text_config, "layer_types", None), list):
                text_config.layer_types = text_config.layer_types[:layers]
            with _quiet_about_unread_layers():
                return transformers.AutoModelForCausalLM.from_pretrained(
                    source, config=config, dtype=dtype, attn_implementation=GROUPED_SDPA)
    except Exception as err:
        raise _load_failure(kind, source, "the model", err) from err


@contextmanager
def _quiet_about_unread_layers() -> Iterator[None]:
    """transformers reports every checkpoint tensor a model does not read: here, by design, the later layers."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
