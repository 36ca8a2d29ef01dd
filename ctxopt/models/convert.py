"""GGUF to transformers: read a GGUF file into a dense model and its tokenizer, and keep converted models in the
on-disk cache (``cache_dir()/models/<name>/``, safetensors plus a ``ctxopt.json`` marker), written atomically."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from ..errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
MARKER = "ctxopt.json"


def cache_dir() -> Path:
    """Where converted models live: ``$CTXOPT_CACHE`` or ``~/.cache/ctxopt``."""
    return Path(os.environ.get("CTXOPT_CACHE") or "~/.cache/ctxopt").expanduser()


def as_list(value: Any) -> list[Any]:
    """An id or a list of ids (as configs hold eos_token_id) as a list; None as an empty one."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------------------------------
# GGUF reading.


def check_magic(path: Path, advice: str) -> None:
    """Raise ModelLoadError unless ``path`` starts with the GGUF magic bytes."""
    with open(path, "rb") as stream:
        head = stream.read(4)
    if head != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r}. {advice}")


def gguf_tokenizer(gguf_path: Path, advice: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer a GGUF file describes, with its chat template taken from the metadata if dropped."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:
        raise ModelLoadError(f"could not read the tokenizer of {gguf_path}: {err}. {advice}") from err
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _gguf_string(gguf_path, "tokenizer.chat_template")
    return tokenizer


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    """A string field of a GGUF's metadata, read with the ``gguf`` package, or None when absent."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def gguf_model(
    gguf_path: Path, dtype: torch.dtype, advice: str, progress: bool, attn_implementation: str = "sdpa"
) -> transformers.PreTrainedModel:
    """The dense model a GGUF file holds, dequantised to ``dtype``, with no quantizer left attached.

    ``GgufConfig(dequantize=True)``: recent transformers (5.24 here) keeps the weights packed in GGUF
    blocks whenever the ``kernels`` package offers a matmul kernel for them; such a model cannot be saved
    or cast. Older versions have no ``GgufConfig`` and always dequantise.
    """
    options: dict[str, Any] = {"gguf_file": gguf_path.name, "dtype": dtype, "attn_implementation": attn_implementation}
    if hasattr(transformers, "GgufConfig"):
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        with transformers_progress(progress):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **options)
    except Exception as err:
        raise ModelLoadError(f"could not read the weights of {gguf_path}: {err}. {advice}") from err
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars on or off for the duration."""
    logging = transformers.utils.logging
    were_enabled = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if were_enabled else logging.disable_progress_bar)()


# ----------------------------------------------------------------------------------------------------
# The converted-model cache on disk.


def is_converted(folder: Path, gguf_sha256: str) -> bool:
    """Whether ``folder`` holds a finished conversion of the GGUF with this sha256."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf_sha256") == gguf_sha256


def convert_gguf(
    gguf_path: Path, folder: Path, name: str, stop_tokens: tuple[str, ...], sources: dict[str, Any], advice: str,
    progress: bool,
) -> None:
    """Dequantise the GGUF to float32 and save it with its tokenizer into ``folder``, atomically.

    Everything is written into a temporary sibling folder that replaces ``folder`` only when complete. ``sources``
    goes into the marker file and must hold ``gguf_sha256``, what :func:`is_converted` checks. ``stop_tokens`` end
    a chat turn.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the finished model folder should not be
    try:
        with tqdm(total=3, desc=f"{name}: convert", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = gguf_tokenizer(gguf_path, advice)
            bar.update(1)
            bar.set_postfix_str("weights")
            model = gguf_model(gguf_path, torch.float32, advice, progress)
            _set_stop_tokens(model, tokenizer, stop_tokens)
            bar.update(1)
            bar.set_postfix_str("save")
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            marker = {
                "name": name,
                **sources,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "converted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            (scratch / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            bar.update(1)
        if folder.exists():
            shutil.rmtree(folder)  # a stale conversion of an older registry pin
        try:
            os.replace(scratch, folder)
        except OSError:
            if not is_converted(folder, sources["gguf_sha256"]):  # another process finishing first is fine
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _set_stop_tokens(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase, stop_tokens: tuple[str, ...]
) -> None:
    """Add the chat-turn end tokens to the generation config's eos ids (the GGUF names only one)."""
    vocab = tokenizer.get_vocab()
    ids = as_list(model.generation_config.eos_token_id) + [vocab[t] for t in stop_tokens if t in vocab]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if ids:
        model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
