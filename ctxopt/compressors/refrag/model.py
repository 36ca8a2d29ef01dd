"""REFRAG's trained parts: the chunk encoder, the projector, the expansion policy, and their files.

Paper: "REFRAG: Rethinking RAG based Decoding" (arXiv 2509.01092) [P]; no official code exists.

- ``ChunkEncoder``: a light encoder (RoBERTa-large in [P]; here any Hugging Face encoder, default the packaged
  all-MiniLM-L6-v2) turns each chunk's text into one vector. [P] does not state the pooling; ``pooling`` is
  "cls" (the first token; the default, chosen by a short paired stage-1 run, see docs/refrag.md) or "mean"
  (mask-weighted mean of the last hidden states). The encoder is tuned with
  LoRA (peft) instead of in full, so a trained adapter stays small.
- ``Projector``: the 2-layer MLP of [P] (hidden = output = decoder width) into the decoder's token-embedding space.
- ``ExpansionPolicy``: the learned policy of [P] section 2: a 2-layer transformer over the chunk embeddings
  giving one logit per chunk. Deviation: it runs at width 128 (a linear map down from the decoder width), so
  the shipped file stays small; [P] does not state its width.

An adapter folder holds ``refrag.json`` (the configuration and a fingerprint), ``projector.safetensors``,
``encoder_lora.safetensors`` (LoRA weights only, never the encoder) and optionally ``policy.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import InputError, ModelLoadError

CONFIG_FILE = "refrag.json"
PROJECTOR_FILE = "projector.safetensors"
LORA_FILE = "encoder_lora.safetensors"
POLICY_FILE = "policy.safetensors"
FORMAT = "ctxopt-refrag"
POOLINGS = ("mean", "cls")


@dataclass
class AdapterConfig:
    """What an adapter was built for: encoder, decoder width, chunk size, pooling, LoRA and policy shapes."""

    encoder: str = "all-minilm-l6-v2"
    decoder: str = "smollm2-135m"
    encoder_hidden: int = 384
    decoder_hidden: int = 576
    chunk_tokens: int = 16
    pooling: str = "cls"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(
        default_factory=lambda: ["query", "key", "value", "intermediate.dense", "output.dense"]
    )
    policy_width: int = 128
    max_encoder_tokens: int = 64
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}.")
        if self.chunk_tokens < 1:
            raise InputError(f"chunk_tokens must be >= 1; got {self.chunk_tokens}.")


class Projector(nn.Module):
    """[P]: 2-layer MLP, encoder width -> decoder width -> decoder width."""

    def __init__(self, encoder_hidden: int, decoder_hidden: int):
        super().__init__()
        self.up = nn.Linear(encoder_hidden, decoder_hidden)
        self.out = nn.Linear(decoder_hidden, decoder_hidden)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.gelu(self.up(vectors)))


class ExpansionPolicy(nn.Module):
    """[P]: a 2-layer transformer over chunk embeddings, one logit per chunk (which chunks to expand)."""

    def __init__(self, decoder_hidden: int, width: int = 128, heads: int = 4):
        super().__init__()
        self.down = nn.Linear(decoder_hidden, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.logit = nn.Linear(width, 1)

    def forward(self, chunk_embeds: torch.Tensor) -> torch.Tensor:
        """(batch, chunks, decoder_hidden) -> (batch, chunks) logits."""
        return self.logit(self.layers(self.down(chunk_embeds))).squeeze(-1)


def choose_chunks(logits: torch.Tensor, count: int, sample: bool, generator: torch.Generator | None = None):
    """[P]: pick ``count`` chunks one at a time without replacement from softmax(logits) over those left.

    Returns (indices in pick order, summed log-probability of the picks). Greedy (``sample=False``) picks the
    highest remaining logit each time, which is the top-``count`` set.
    """
    count = min(count, logits.shape[-1])
    taken = torch.zeros_like(logits, dtype=torch.bool)
    picks, log_prob = [], logits.new_zeros(())
    for _ in range(count):
        masked = logits.masked_fill(taken, -math.inf)
        log_probs = torch.log_softmax(masked, dim=-1)
        if sample:
            pick = int(torch.multinomial(log_probs.exp().detach().cpu(), 1, generator=generator))
        else:
            pick = int(masked.argmax())
        log_prob = log_prob + log_probs[pick]
        taken = taken.clone()  # the mask of this step stays in the autograd graph
        taken[pick] = True
        picks.append(pick)
    return picks, log_prob


class ChunkEncoder(nn.Module):
    """Encoder + pooling: a batch of chunk texts -> one vector each."""

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str = "cls", max_tokens: int = 64):
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_tokens = max_tokens

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def load_encoder(name: str, pooling: str = "cls", max_tokens: int = 64) -> ChunkEncoder:
    """An encoder by name: the packaged MiniLM (``all-minilm-l6-v2``), a local folder, or a hub id when online."""
    from transformers import AutoModel, AutoTokenizer

    from ...retrievers.embeddings import embedder_path

    path = embedder_path(name)
    try:
        model = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"could not load the REFRAG encoder {name!r} from {path}: {exc}") from exc
    return ChunkEncoder(model.eval(), tokenizer, pooling=pooling, max_tokens=max_tokens)


def add_lora(encoder: ChunkEncoder, config: AdapterConfig) -> None:
    """Wrap the encoder's model with LoRA adapters (peft) on ``config.lora_targets``; only they train."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name in config.lora_targets if any(n.endswith(name) for n, _ in encoder.model.named_modules())]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets, lora_dropout=0.0)
    encoder.model = get_peft_model(encoder.model, lora)


def merge_lora(model: nn.Module, lora: dict[str, torch.Tensor], scale: float) -> None:
    """Fold saved LoRA pairs into the base weights, W += scale * B @ A (peft's merge), so that inference
    needs no peft. Keys are peft's: ``base_model.model.<module>.lora_A.weight``."""
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for key, down in lora.items():
            if ".lora_A." not in key:
                continue
            up = lora[key.replace(".lora_A.", ".lora_B.")]
            base = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            weights[base] += scale * (up @ down).to(weights[base].dtype)


@dataclass
class Adapter:
    """A trained REFRAG: encoder (LoRA merged or live), projector, optional policy, and its configuration."""

    config: AdapterConfig
    encoder: ChunkEncoder
    projector: Projector
    policy: ExpansionPolicy | None = None
    saved_fingerprint: str | None = None
    # (weights' identity and in-place version counters, hash): a repeated query hashes nothing
    _hashed: tuple[tuple, str] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def fresh(cls, config: AdapterConfig, encoder: ChunkEncoder | None = None, seed: int = 0) -> "Adapter":
        """An untrained projector (seeded) and LoRA added to the encoder: the start of training. The policy is
        created by the policy stage."""
        encoder = encoder or load_encoder(config.encoder, config.pooling, config.max_encoder_tokens)
        config.encoder_hidden = encoder.hidden_size
        torch.manual_seed(seed)
        projector = Projector(config.encoder_hidden, config.decoder_hidden)
        if config.lora_rank > 0:
            add_lora(encoder, config)
        return cls(config, encoder, projector)

    def embed_chunks(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Chunk texts -> (n, decoder_hidden) embeddings in the decoder's input space."""
        if not texts:
            return torch.zeros(0, self.config.decoder_hidden)
        rows = [self.projector(self.encoder(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(rows)

    def fingerprint(self) -> str:
        """A short hash identifying these weights: the one recorded in the adapter file when loaded from one,
        else a hash of the configuration and every weight. Chunk-embedding caches are keyed by it, and every
        query with a cache checks it: the hash is kept until a weight is replaced or changed in place (an
        optimizer step, ``load_state_dict``), which tensors' version counters record. Hashing RoBERTa-large's
        weights takes about 3 s, which the GPU benchmark saw on every cached REFRAG query before this."""
        if self.saved_fingerprint:
            return self.saved_fingerprint
        config = json.dumps(asdict(self.config), sort_keys=True)
        weights = [(name, tensor) for module in (self.projector, self.encoder.model)
                   for name, tensor in sorted(module.state_dict().items())]
        state = (config, tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in weights))
        if self._hashed is None or self._hashed[0] != state:
            digest = hashlib.sha256(config.encode())
            for name, tensor in weights:
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            self._hashed = (state, digest.hexdigest()[:16])
        return self._hashed[1]

    def save(self, folder: str | Path) -> None:
        """Write refrag.json + projector, LoRA (and policy) weights as safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
                  folder / PROJECTOR_FILE)
        if hasattr(self.encoder.model, "peft_config"):
            from peft import get_peft_model_state_dict

            lora = get_peft_model_state_dict(self.encoder.model)
            save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, folder / LORA_FILE)
        if self.policy is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.policy.state_dict().items()},
                      folder / POLICY_FILE)
        weights = hashlib.sha256()
        for name in (PROJECTOR_FILE, LORA_FILE):
            if (folder / name).is_file():
                weights.update((folder / name).read_bytes())
        shape = {key: value for key, value in asdict(self.config).items() if key != "training"}
        weights.update(json.dumps(shape, sort_keys=True).encode())
        record = {"format": FORMAT, "config": asdict(self.config), "fingerprint": weights.hexdigest()[:16]}
        (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path, encoder: ChunkEncoder | None = None, merge: bool = True) -> "Adapter":
        """Read an adapter folder. ``merge=True`` folds the LoRA weights into the encoder (inference, no peft
        needed; a given ``encoder`` is modified in place); ``merge=False`` keeps them as trainable peft adapters
        (a later training stage)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{folder} is not a REFRAG adapter folder (no {CONFIG_FILE}); train one with "
                                 "`ctxopt train refrag --out DIR`.")
        record = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ModelLoadError(f"{folder / CONFIG_FILE} is not a {FORMAT} file.")
        config = AdapterConfig(**record["config"])
        encoder = encoder or load_encoder(config.encoder, config.pooling, config.max_encoder_tokens)
        projector = Projector(config.encoder_hidden, config.decoder_hidden)
        projector.load_state_dict(load_file(folder / PROJECTOR_FILE))
        if (folder / LORA_FILE).is_file():
            lora = load_file(folder / LORA_FILE)
            if merge:
                merge_lora(encoder.model, lora, config.lora_alpha / config.lora_rank)
            else:
                from peft import set_peft_model_state_dict

                add_lora(encoder, config)
                set_peft_model_state_dict(encoder.model, lora)
        policy = None
        if (folder / POLICY_FILE).is_file():
            policy = ExpansionPolicy(config.decoder_hidden, config.policy_width)
            policy.load_state_dict(load_file(folder / POLICY_FILE))
        adapter = cls(config, encoder, projector, policy, saved_fingerprint=record.get("fingerprint"))
        for module in (adapter.encoder, adapter.projector, adapter.policy):
            if module is not None:
                module.eval()
        return adapter


DEFAULT_ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "refrag-smollm2-minilm-k16"
_LOADED: dict[str, Adapter] = {}


def load_adapter(folder: str | Path = DEFAULT_ADAPTER) -> Adapter:
    """An adapter folder, loaded once per process (LoRA merged, eval mode)."""
    key = str(Path(folder).resolve())
    if key not in _LOADED:
        _LOADED[key] = Adapter.load(folder)
    return _LOADED[key]
