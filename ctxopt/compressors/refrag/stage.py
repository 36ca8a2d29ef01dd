"""The REFRAG input stage: prefill the decoder on one embedding per k-token context chunk.

Paper: "REFRAG: Rethinking RAG based Decoding" (arXiv 2509.01092) [P]; no official code exists.

1. Cut the context into k-token chunks with the decoder's tokenizer (``layout.split_context``). [P]
2. Encode each chunk's text and project it into the decoder's token-embedding space (``model.Adapter``), or
   read it from a precomputed ``ChunkCache``. [P]
3. Choose p*L chunks to expand (``expand`` = p): the learned policy (``policy="learned"``, [P]'s RL policy), the
   heuristic (``"heuristic"``: highest perplexity proxy, see ``layout.surprisal_scores``) or ``"random"``
   ([P]'s baseline). [P]
4. inputs_embeds = template/question token embeddings + one embedding per compressed chunk, an expanded chunk
   in place as its k token embeddings; ordinary consecutive positions over the shortened sequence; prefill;
   the normal decode loop continues from position len(inputs). [P]

Deviations: the decoder stays frozen in every training stage (so the shipped adapter works with the unchanged
generator that other methods share); chunks are cut per passage; the pipeline's position check still counts
the uncompressed prompt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...decoding import Prefill, prefill
from ...errors import InputError
from ...stages import InputStage, Run
from ...types import Prompt
from .cache import ChunkCache
from .layout import assemble, expansion_count, split_context, surprisal_scores
from .model import DEFAULT_ADAPTER, Adapter, AdapterConfig, ChunkEncoder, Projector, choose_chunks, load_adapter

if TYPE_CHECKING:
    from ...models import LoadedModel

POLICIES = ("heuristic", "learned", "random", None)


@dataclass
class REFRAG(InputStage):
    """Compress the context to one decoder input embedding per ``chunk_tokens`` tokens (REFRAG, arXiv 2509.01092).

    ``adapter``: a trained adapter folder or object (default: the shipped SmolLM2 + MiniLM, k = 16); or give
    ``encoder`` and ``projector`` directly. ``chunk_tokens`` defaults to the adapter's k. ``expand``: the fraction
    p of chunks given back as tokens, chosen by ``policy``. ``cache``: precomputed chunk embeddings (a
    ``ChunkCache``, its file, or an index folder holding one).
    """

    adapter: str | Path | Adapter | None = None
    encoder: ChunkEncoder | None = field(default=None, metadata={"option": False})
    projector: Projector | None = field(default=None, metadata={"option": False})
    chunk_tokens: int | None = None
    expand: float = 0.0
    policy: str | None = "heuristic"
    cache: ChunkCache | str | Path | None = None
    seed: int = 0
    _adapter: Adapter | None = field(default=None, init=False, repr=False)
    name = "refrag"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"refrag: policy must be one of {POLICIES}; got {self.policy!r}.")
        if not 0.0 <= self.expand <= 1.0:
            raise InputError(f"refrag: expand is a fraction of chunks in [0, 1]; got {self.expand}.")
        if self.expand > 0 and self.policy is None:
            raise InputError("refrag: expand > 0 needs a policy (heuristic, learned or random).")
        if (self.encoder is None) != (self.projector is None):
            raise InputError("refrag: pass both encoder and projector, or neither (then an adapter is loaded).")
        if isinstance(self.cache, (str, Path)):
            self.cache = ChunkCache.load(self.cache)

    def loaded_adapter(self) -> Adapter:
        if self._adapter is None:
            if self.encoder is not None:
                config = AdapterConfig(encoder_hidden=self.encoder.hidden_size,
                                       decoder_hidden=self.projector.out.out_features,
                                       chunk_tokens=self.chunk_tokens or 16, pooling=self.encoder.pooling)
                self._adapter = Adapter(config, self.encoder, self.projector)
            elif isinstance(self.adapter, Adapter):
                self._adapter = self.adapter
            else:
                self._adapter = load_adapter(self.adapter or DEFAULT_ADAPTER)
        return self._adapter

    @property
    def k(self) -> int:
        return self.chunk_tokens or self.loaded_adapter().config.chunk_tokens

    def chunk_embeddings(self, prompt: Prompt, chunks) -> tuple[torch.Tensor, int]:
        """One decoder-space embedding per chunk (from the cache where it has them) and the count served by it."""
        adapter = self.loaded_adapter()
        found: list[torch.Tensor | None] = [None] * len(chunks)
        if self.cache is not None:
            self.cache.check(adapter, self.k)
            found = [self.cache.lookup(prompt.passages[c.passage].id, c.span) for c in chunks]
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            with torch.inference_mode():
                encoded = adapter.embed_chunks([chunks[i].text for i in missing])
            for i, row in zip(missing, encoded):
                found[i] = row
        return torch.stack(found).float(), len(chunks) - len(missing)

    def choose(self, prompt: Prompt, chunks, embeds: torch.Tensor) -> set[int]:
        """The chunks to expand: p*L of them by the policy."""
        count = expansion_count(self.expand, len(chunks))
        if count == 0:
            return set()
        if self.policy == "heuristic":
            scores = surprisal_scores([prompt.input_ids[c.start : c.end] for c in chunks])
            return set(scores.topk(count).indices.tolist())
        if self.policy == "random":
            generator = torch.Generator().manual_seed(self.seed)
            return set(torch.randperm(len(chunks), generator=generator)[:count].tolist())
        policy = self.loaded_adapter().policy
        if policy is None:
            raise InputError("refrag: this adapter has no trained policy; use policy='heuristic' or train one "
                             "(ctxopt train refrag --stage policy).")
        with torch.inference_mode():
            picks, _ = choose_chunks(policy(embeds.unsqueeze(0))[0], count, sample=False)
        return set(picks)

    def prepare(self, lm: "LoadedModel") -> None:
        lm.first_layers(0)

    def inputs_embeds(self, prompt: Prompt, run: Run) -> torch.Tensor:
        """Steps 1-4 before the prefill: the decoder's input embeddings, (positions, width), for ``prompt``.
        A serving engine that takes prompt embeddings (vLLM's ``--enable-prompt-embeds``) prefills these."""
        embedding = run.lm.first_layers(0).get_input_embeddings()  # on an engine, only the embeddings load
        adapter = self.loaded_adapter()
        width = embedding.embedding_dim
        if adapter.config.decoder_hidden != width:
            raise InputError(f"refrag: the adapter projects to width {adapter.config.decoder_hidden} but "
                             f"{run.lm.name} embeds tokens at {width}; train an adapter for this decoder.")
        if self.k != adapter.config.chunk_tokens:
            run.note(f"refrag: chunk_tokens={self.k} but the adapter was trained at k={adapter.config.chunk_tokens}")
        chunks = split_context(prompt, self.k)
        began = time.perf_counter()
        embeds, cached = (self.chunk_embeddings(prompt, chunks) if chunks
                          else (torch.zeros(0, width), 0))
        encode_seconds = time.perf_counter() - began
        expanded = self.choose(prompt, chunks, embeds)
        with torch.inference_mode():
            token_embeds = embedding(prompt.input_ids.to(embedding.weight.device))
            inputs, _ = assemble(token_embeds, chunks, embeds.to(token_embeds.device), expanded)
        run.report(
            chunks=len(chunks), expanded=len(expanded), cached_chunks=cached, encode_seconds=encode_seconds,
            decoder_positions=int(inputs.shape[0]),
        )
        return inputs

    def prefill(self, prompt: Prompt, run: Run) -> Prefill:
        state = prefill(run.lm.model, inputs_embeds=self.inputs_embeds(prompt, run), room=run.config.max_new_tokens)
        run.report(prefill_seconds=state.seconds)
        return state
