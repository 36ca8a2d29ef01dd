"""CoLoR: every passage rewritten shorter by a compressor LM before it reaches the long-context model.

Paper: "Efficient Long Context Language Model Retrieval with Compression" (Seo et al., ACL 2025) [P];
official code going-doer/CoLoR [C]. Inference step [P, C]: the compressor summarises each passage, greedy,
with the prompt "Summarize the following content. Content: {passage} Summary:" through its chat template;
an empty summary falls back to the original passage; the summaries replace the passages in the prompt.

Deviations, all deliberate:
- A summary that is not shorter (in compressor tokens) than its passage also falls back to the original
  (the paper only checks for empty output): a rewrite that saves nothing can only lose information.
- The default compressor is Qwen2.5-Coder-0.5B-Instruct with a small LoRA adapter trained by ``ctxopt train
  color`` on CPU (``ctxopt/adapters/color-qwen-coder-0.5b``), picked by measurement over SmolLM2-135M (whose
  adapter ``color-smollm2`` also ships: 2-5x faster on CPU, compresses harder, loses more F1); the paper
  fine-tunes Phi-3-mini fully (see docs/color.md).
- A passage longer than ``passage_tokens`` (512 compressor tokens) is cut into pieces of at most that length,
  each summarised, and the summaries joined into one passage: the paper's passages (LOFT) and the adapter's
  training paragraphs (HotpotQA, at most about 600 tokens) are short, and one summary capped at
  ``max_new_tokens`` could not stand for a long document (RULER's 8K needle essay would shrink 64x).
- Summaries are cached on disk per (passage sha256, compressor fingerprint), so a corpus is compressed once.
- The compressor may run on a serving engine (``compressor_engine``: vLLM serving the compressor with its adapter
  merged in by ``ctxopt train color-merge``, or the adapter as a LoRA module) instead of transformers'
  ``generate``: the same prompt, greedy, with each passage's own length cap; the engine batches the passages.
  Its summaries are cached apart from local ones (another runtime and dtype can change a token).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..fileutil import sha256_file
from ..generators.engine import EngineGenerator
from ..models import LoadedModel, cache_dir, load_model, load_tokenizer, registry_entry
from ..prompting import render_chat
from ..retrievers.chunking import chunk_text
from ..stages import PassageStage, Run
from ..text import count_tokens
from ..types import Passage

SUMMARY_PROMPT = "Summarize the following content. \nContent:\n{passage}\n Summary:"
DEFAULT_COMPRESSOR = "qwen2.5-coder-0.5b"  # picked by measurement: docs/color.md
PACKAGED_ADAPTERS = {  # compressor -> adapter folder under ctxopt/adapters
    "smollm2-135m": "color-smollm2", "qwen2.5-coder-0.5b": "color-qwen-coder-0.5b"}
FALLBACKS = ("original", "drop")
ADAPTER_FILE = "adapter_model.safetensors"
MERGED_FILE = "ctxopt-color-merge.json"  # what `ctxopt train color-merge` merged into a model folder
CAP_SLACK = 8  # tokens a summary may run past its passage's length before generation stops


def summary_prompt(tokenizer, passage: str) -> str:
    """The compressor's full prompt for one passage: the paper's summarisation request in its chat template."""
    return render_chat(tokenizer, SUMMARY_PROMPT.format(passage=passage))


def packaged_adapter(compressor: str) -> Path | None:
    """The adapter shipped for ``compressor`` (a registry name or alias), if one is shipped and present."""
    entry = registry_entry(compressor)
    folder = PACKAGED_ADAPTERS.get(entry.name) if entry is not None else None
    if folder is None:
        return None
    path = Path(str(resources.files("ctxopt") / "adapters" / folder))
    return path if (path / ADAPTER_FILE).is_file() else None


_MERGED: dict[tuple[int, str], LoadedModel] = {}
_MERGED_LOCK = threading.Lock()


def with_adapter(base: LoadedModel, adapter: str | Path) -> LoadedModel:
    """``base`` with a LoRA adapter merged into a copy of its weights (the shared base model stays untouched).

    Merged copies are kept per (base, adapter file hash) for the life of the process.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / ADAPTER_FILE).is_file():
        raise InputError(f"{adapter} holds no {ADAPTER_FILE}; pass a folder written by `ctxopt train color`.")
    key = (id(base), sha256_file(adapter / ADAPTER_FILE))
    with _MERGED_LOCK:
        if key not in _MERGED:
            merged = PeftModel.from_pretrained(copy.deepcopy(base.model), str(adapter)).merge_and_unload()
            merged.eval().requires_grad_(False)
            name = f"{base.name}+{adapter.name}:{key[1][:12]}"
            _MERGED[key] = LoadedModel(merged, base.tokenizer, name, base.device, base.dtype)
        return _MERGED[key]


def summarise(lm: LoadedModel, passages: list[str], max_new_tokens: int, batch_size: int = 8,
              progress: bool = False, temperature: float = 0.0) -> list[str]:
    """The compressor's summary of each passage (the paper's prompt), capped near the passage's own length
    (``summary_caps``; a batch stops at its largest cap)."""
    prompts = [summary_prompt(lm.tokenizer, t) for t in passages]
    caps = summary_caps(lm.tokenizer, passages, max_new_tokens)
    return generate_text(lm, prompts, max_new_tokens, batch_size, progress=progress, desc="color", max_tokens=caps,
                         temperature=temperature)


def summary_caps(tokenizer, passages: list[str], max_new_tokens: int) -> list[int]:
    """Each passage's summary length limit: its own length plus ``CAP_SLACK``, at most ``max_new_tokens``. A
    summary as long as its passage falls back to the passage, so generating far past that is waste; the slack
    keeps a capped (cut) summary at least as long as its passage after re-tokenisation."""
    return [min(max_new_tokens, count_tokens(tokenizer, t) + CAP_SLACK) for t in passages]


def engine_summarise(engine: EngineGenerator, tokenizer, passages: list[str], max_new_tokens: int,
                     progress: bool = False) -> list[str]:
    """``summarise`` on a serving engine: each passage's prompt as token ids, greedy, capped at its own
    ``summary_caps`` limit, up to ``engine.max_concurrency`` requests in flight (the engine batches them)."""
    prompts = [tokenizer(summary_prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in passages]
    caps = summary_caps(tokenizer, passages, max_new_tokens)
    with ThreadPoolExecutor(max_workers=max(1, min(engine.max_concurrency, len(passages)))) as pool, \
            tqdm(total=len(passages), desc="color (engine)", unit="passage", disable=not progress) as bar:
        futures = [pool.submit(engine.completion_text, ids, cap) for ids, cap in zip(prompts, caps)]
        outputs = []
        for future in futures:
            outputs.append(future.result().strip())
            bar.update(1)
    return outputs


def generate_text(lm: LoadedModel, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                  progress: bool = False, desc: str = "generate", max_tokens: list[int] | None = None,
                  temperature: float = 0.0) -> list[str]:
    """Completions of ``prompts`` (full prompt texts), left-padded into batches of ``batch_size``: greedy at
    ``temperature`` 0 (CoLoR inference), else sampled from the full softmax at that temperature (seed torch).

    ``max_tokens[i]``, when given, also caps prompt ``i``'s completion (a batch stops at its largest cap).
    """
    tokenizer = lm.tokenizer
    eos = lm.eos_token_ids
    pad = eos[0] if eos else (tokenizer.pad_token_id or 0)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="passage", disable=not progress) as bar:
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            limit = max_new_tokens if max_tokens is None else min(max_new_tokens, max(max_tokens[i] for i in rows))
            with torch.inference_mode():
                out = lm.model.generate(
                    input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), max_new_tokens=max(1, limit),
                    do_sample=temperature > 0, temperature=temperature or None, top_p=None, top_k=None,
                    eos_token_id=eos or None, pad_token_id=pad,
                )
            for r, i in enumerate(rows):
                outputs[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
            bar.update(len(rows))
    return outputs


class SummaryCache:
    """Summaries on disk, one JSON file per (compressor fingerprint, passage sha256), under
    ``cache_dir()/color/<fingerprint>/``. Writes are atomic, so parallel runs can share it."""

    def __init__(self, fingerprint: str, root: Path | None = None):
        self.folder = (root or cache_dir() / "color") / fingerprint

    def _path(self, text: str) -> Path:
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()}.json"

    def get(self, text: str) -> str | None:
        path = self._path(text)
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))["summary"]

    def put(self, text: str, summary: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump({"summary": summary}, stream)
        os.replace(temp, self._path(text))


def precompressed(passage: Passage) -> bool:
    """Whether the passage's text is already CoLoR's summary (served so by an index built with
    ``ctxopt index --compress color``, which marks it in ``metadata["ctxopt_precompressed"]``)."""
    marker = passage.metadata.get("ctxopt_precompressed")
    return isinstance(marker, dict) and marker.get("method") == "color"


@dataclass
class CoLoR(PassageStage):
    """Each passage replaced by the compressor's greedy summary of it (CoLoR inference [P]).

    ``compressor``: a model name (loaded on the generator's device) or a LoadedModel. ``adapter``: a LoRA
    folder written by ``ctxopt train color``; "auto" uses the packaged adapter of the compressor when one is
    shipped (SmolLM2-135M), None the untrained prompt. ``fallback``: what replaces an unusable summary (empty,
    or not shorter than the passage): "original" keeps the passage [P], "drop" leaves it out. Source, span,
    id and metadata of every passage are kept; only its text changes.

    ``passage_tokens``: the longest passage summarised whole, in compressor tokens; a longer one is cut into
    pieces of at most this length, summarised one by one and joined again (a deviation: see the module).

    ``compressor_engine``: the base URL of an OpenAI-compatible server that serves the compressor with its
    adapter (the folder ``ctxopt train color-merge`` writes, or vLLM's ``--enable-lora --lora-modules
    color=<adapter folder>``; ``compressor_engine_model`` names it when the engine serves several), which then
    writes the summaries; only the compressor's tokenizer loads here, and ``adapter`` is ignored.
    """

    compressor: str | LoadedModel = DEFAULT_COMPRESSOR
    max_new_tokens: int = 128
    passage_tokens: int = 512
    fallback: str = "original"
    adapter: str | Path | None = "auto"
    batch_size: int = 8
    cache: bool = True
    progress: bool = True
    compressor_engine: str | None = None
    compressor_engine_model: str | None = None
    name = "color"
    _model: LoadedModel | None = field(default=None, init=False, repr=False)
    _engine: EngineGenerator | None = field(default=None, init=False, repr=False)
    _engine_identity: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.adapter is False:  # ``--option adapter=false``: the untrained prompt
            self.adapter = None
        if self.fallback not in FALLBACKS:
            raise InputError(f"color: fallback must be one of {FALLBACKS}; got {self.fallback!r}.")
        if self.max_new_tokens < 1:
            raise InputError(f"color: max_new_tokens must be >= 1; got {self.max_new_tokens}.")
        if self.passage_tokens < 1:
            raise InputError(f"color: passage_tokens must be >= 1; got {self.passage_tokens}.")

    def compressor_model(self, device=None, dtype=None) -> LoadedModel:
        """The compressor, with its adapter merged, loaded on first use."""
        if self._model is None:
            base = self.compressor if isinstance(self.compressor, LoadedModel) else load_model(
                self.compressor, device, dtype, progress=self.progress)
            adapter = self.adapter
            if adapter == "auto":
                adapter = packaged_adapter(self.compressor) if isinstance(self.compressor, str) else None
            self._model = with_adapter(base, adapter) if adapter is not None else base
        return self._model

    def compressor_tokenizer(self):
        """The compressor's tokenizer: the loaded compressor's, or only the tokenizer when an engine runs it."""
        if isinstance(self.compressor, LoadedModel):
            return self.compressor.tokenizer
        return load_tokenizer(self.compressor, progress=self.progress)

    def engine(self) -> EngineGenerator:
        """The compressor's engine client, checked (once) to serve a model with the compressor's tokenizer; its
        ``engine_identity`` is read at the same time."""
        if self._engine is None:
            engine = EngineGenerator(self.compressor_engine, self.compressor_engine_model)
            name = self.compressor.name if isinstance(self.compressor, LoadedModel) else self.compressor
            engine.check_tokenizer(self.compressor_tokenizer(), f"color's compressor {name}")
            self._engine_identity = self.engine_identity(engine)
            self._engine = engine
        return self._engine

    def engine_identity(self, engine: EngineGenerator) -> str:
        """What identifies the engine's compressor for the summary cache, from its folder (vLLM's ``root``) when
        that is readable here: a merged folder's compressor name (base + adapter hash, from its MERGED_FILE), a
        LoRA module's adapter file hash; else the served names and the folder's path."""
        entry = engine.served_entry()
        root = Path(str(entry.get("root") or ""))
        if (root / MERGED_FILE).is_file():
            made = json.loads((root / MERGED_FILE).read_text(encoding="utf-8"))["compressor"]
        elif (root / ADAPTER_FILE).is_file():
            made = sha256_file(root / ADAPTER_FILE)[:12]
        else:
            made = str(root)
        return f"engine:{entry.get('parent') or entry.get('id')}+{entry.get('id')}:{made}"

    def fingerprint(self, compressor_name: str) -> str:
        """What a cached summary depends on: compressor (+ adapter hash), prompt and generation length."""
        key = json.dumps([compressor_name, SUMMARY_PROMPT, self.max_new_tokens])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def summaries(self, texts: list[str], compressor_name: str,
                  write: Callable[[list[str]], list[str]]) -> list[str]:
        """The raw summaries of ``texts``, from the cache where present, else written by ``write`` (the
        compressor, local or on the engine) and stored."""
        store = SummaryCache(self.fingerprint(compressor_name)) if self.cache else None
        found = {t: store.get(t) for t in set(texts)} if store else {}
        missing = [t for t in dict.fromkeys(texts) if found.get(t) is None]
        if missing:
            for text, summary in zip(missing, write(missing)):
                found[text] = summary
                if store:
                    store.put(text, summary)
        return [found[t] for t in texts]

    def compressor_identity(self, device=None, dtype=None) -> str:
        """The compressor's name in the summary cache's fingerprint: the engine's (``engine_identity``) when one
        is set, else the local compressor's, loaded on ``device`` in ``dtype``."""
        if self.compressor_engine:
            self.engine()
            return self._engine_identity
        return self.compressor_model(device, dtype).name

    def summarised(self, texts: list[str], device=None, dtype=None) -> tuple[list[str], object]:
        """(summaries of ``texts``, the compressor's tokenizer), from the engine when one is set, else from
        the local compressor on ``device`` in ``dtype``."""
        if self.compressor_engine:
            engine, tokenizer = self.engine(), self.compressor_tokenizer()
            return self.summaries(texts, self._engine_identity, lambda todo: engine_summarise(
                engine, tokenizer, todo, self.max_new_tokens, progress=self.progress)), tokenizer
        lm = self.compressor_model(device, dtype)
        return self.summaries(texts, lm.name, lambda todo: summarise(
            lm, todo, self.max_new_tokens, self.batch_size, progress=self.progress)), lm.tokenizer

    def pieces(self, tokenizer, text: str) -> list[str]:
        """``text`` as the compressor summarises it: whole when it has at most ``passage_tokens`` compressor
        tokens, else cut into pieces of at most that many (cut at sentence or word boundaries, no overlap)."""
        if count_tokens(tokenizer, text) <= self.passage_tokens:
            return [text]
        return [chunk.text for chunk in chunk_text(text, tokenizer, self.passage_tokens, overlap=0)]

    def compress(self, question: str, passages: list[Passage], run: Run | None = None) -> list[Passage]:
        todo = [i for i, p in enumerate(passages) if not precompressed(p)]  # an index may hold the summaries
        if len(todo) < len(passages) and run is not None:
            run.note(f"color: {len(passages) - len(todo)} of {len(passages)} passages already compressed by the index")
        out: list[Passage | None] = list(passages)
        fell_back = pieces_total = 0
        if todo:
            where = (run.lm.device, run.lm.dtype) if run else (None, None)
            compressor_tokenizer = self.compressor_tokenizer()
            split = {i: self.pieces(compressor_tokenizer, passages[i].text) for i in todo}
            summaries, tokenizer = self.summarised([piece for i in todo for piece in split[i]], *where)
            summary_of = iter(summaries)
            for i in todo:
                kept, rewritten = [], False
                for piece in split[i]:
                    summary = next(summary_of)
                    if summary.strip() and count_tokens(tokenizer, summary) < count_tokens(tokenizer, piece):
                        kept.append(summary)
                        rewritten = True
                        continue
                    fell_back += 1
                    if self.fallback == "original":
                        kept.append(piece)
                pieces_total += len(split[i])
                if rewritten:
                    out[i] = passages[i].replace(text="\n".join(kept))
                elif self.fallback == "drop":
                    out[i] = None
        out = [p for p in out if p is not None]
        if run is not None and fell_back:
            run.note(f"color: {fell_back} of {pieces_total} summaries empty or not shorter; {self.fallback} used")
        if not out:
            raise InputError("color: every summary was unusable and fallback='drop' left no passage.")
        return out
