"""CoLoR training recipe [P: Seo et al., ACL 2025; C: going-doer/CoLoR]: ``ctxopt train color-data`` and
``ctxopt train color``.

1. ``color-data`` (preference data, [P] section 3): each training passage gets candidate compressions from several
   compressors (the packaged models with the summarisation prompt, greedy, plus ``--samples`` sampled summaries
   each; the extractive baseline at several ratios); a judge tells success from failure for each candidate; chosen
   = the SHORTEST success, rejected = the LONGEST failure; a passage with no success or no failure is dropped.
   Judges (pluggable, all named ones must pass): ``retrieval``, in-context retrieval as in LOFT (the target model
   reads the candidate among distractor passages, each with an ID, and must name the candidate's ID); ``answer``,
   answer correctness (the target model answers the question over the candidate and the question's other
   supporting paragraphs; F1 with the gold answer >= ``--min-f1``); ``embedding``, dense retrieval (the
   packaged MiniLM embedder must rank the candidate above every distractor for the question); ``evidence``,
   the candidate keeps every gold answer and bridge entity (title of the question's other supporting paragraph)
   its passage contains.
2. ``color``: ORPO (arXiv 2403.07691) with CoLoR's length term: loss = NLL(chosen) - beta * log sigmoid(s *
   log-odds(chosen, rejected)), beta = 2.5, log-odds over per-token mean log-probabilities, and
   s = max(gamma * (|rejected| - |chosen|), 1) (response tokens, gamma = 0.1) [C: custom_orpo_trainer.py].
   That is the code's form of the length regularisation (the odds-ratio term scaled by the length difference),
   not the paper's added loss: it is the form behind the published numbers, it needs no extra loss weight, and
   it leaves the NLL term alone. LoRA adapters (peft) on the last ``--layers`` layers.

Deviations, all deliberate (a CPU-scale recipe):
- Data: HotpotQA distractor questions of the "train" side of ``hotpotqa_split`` (ctxopt bench and RULER qa_2
  evaluate the "eval" side); a training passage that also belongs to an eval-side question is skipped. The
  targets are each question's supporting paragraphs; the judge's distractors are the question's other
  paragraphs. SQuAD is left out: RULER qa_1 in ctxopt bench draws from every SQuAD dev question.
- The retrieval judge shows IDs and content without titles (LOFT shows titles; a title alone often names the
  answer passage, which would make every candidate a success) and uses ``--distractors`` passages, not a corpus.
- The shipped adapter was trained with the ``embedding`` and ``evidence`` judges: the packaged LMs cannot do
  LOFT-style in-context retrieval (measured on 10-20 train-side passages with 2 distractors, IDs scored as the
  next token: SmolLM2-135M 25%, Qwen2.5-Coder-0.5B 30%, chance 33%; replying freely, neither named an ID at
  all), so their judgement would be noise. With a capable target model, ``--judge retrieval`` is the paper's
  signal.
- Sampled summaries (``--samples``) stand in for the paper's several LLM summarisers: the compressor's own
  outputs at temperature ``--temperature`` vary in length and in what they keep, so its shortest success is a
  response it can already produce (on-policy), which a small LoRA can learn from few pairs. A resumed run draws
  new samples for the passages it had not reached.
- ``--pair-sources summary,sample`` builds the pairs from the compressor's own summaries only. The extractive
  candidates are query-aware (sentences picked for the question) while the compressor never sees the question,
  so an extract as the chosen response teaches a length it cannot reach with the right content: it learns to
  keep a first sentence. The paper's candidates are all summaries.
- The retrieval judge reads the model's next token after "Final Answer: [" among the valid IDs only, rather
  than parsing a free reply.
- A passage whose ORIGINAL text already fails the judge is dropped before its candidates are judged: the judge
  cannot tell good from bad compressions there (this also saves judge calls).
- NLL over the chosen response tokens only (the TRL version [C] used also counted the prompt); LoRA with a
  higher learning rate (default 3e-4) and fewer epochs than [C]'s full fine-tune at 1e-6 for 10 epochs.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from ..text import count_tokens, stable_hash

CANDIDATES_FILE = "candidates.jsonl"
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
PAIR_SOURCES = ("summary", "sample", "extractive")  # candidate kinds, the prefixes of their source names
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RETRIEVAL_INSTRUCTION = (
    "Below are documents, each between 'ID: n |' and '| END ID: n'. Which document is most relevant to answer "
    "the query? Reply with its ID in the format: Final Answer: [id]"
)
RETRIEVAL_PREFIX = "Final Answer: ["


def add_train_parsers(subparsers: argparse._SubParsersAction) -> None:
    """``ctxopt train color-data``, ``ctxopt train color`` and ``ctxopt train color-merge``."""
    data = subparsers.add_parser("color-data", help="build CoLoR preference data (chosen/rejected compressions)")
    data.add_argument("--out", required=True, help="folder for candidates.jsonl, train.jsonl, heldout.jsonl")
    data.add_argument("--questions", type=int, default=40, help="HotpotQA train-side questions to draw")
    data.add_argument("--seed", type=int, default=0, help="seed of the question draw and sampling (default: 0)")
    data.add_argument("--compressors", default="smollm2-135m", help="comma-separated summariser models")
    data.add_argument("--ratios", default="0.25,0.5,0.75", help="extractive candidate ratios")
    data.add_argument("--samples", type=int, default=0, help="sampled summaries per compressor and passage, "
                      "beside its greedy one")
    data.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of --samples")
    data.add_argument("--judge", default="retrieval", help="comma-separated: retrieval, answer, embedding, evidence "
                      "(all must pass)")
    data.add_argument("--target", default="smollm2-135m", help="the long-context model the judges run")
    data.add_argument("--distractors", type=int, default=2, help="distractor passages beside the candidate")
    data.add_argument("--min-f1", type=float, default=0.5, help="answer judge: F1 needed for success")
    data.add_argument("--max-new-tokens", type=int, default=128, help="summary length limit")
    data.add_argument("--candidates-from", help="folder of an earlier color-data run: keep its candidates and "
                      "generate only the sources it lacks (e.g. a new --compressors entry); its judgements are "
                      "reused when judges, target, dtype, --min-f1, --distractors and --seed match, else re-judged")
    data.add_argument("--pair-sources", default="", help="comma-separated candidate kinds that may form the pairs "
                      "(summary, sample, extractive; default all): every candidate is judged and logged either way")
    data.add_argument("--heldout", type=float, default=0.15, help="share of questions held out (by id hash)")
    data.add_argument("--batch-size", type=int, default=8, help="cases per summariser and judge batch (default: 8)")
    data.set_defaults(handler=cmd_color_data)

    train = subparsers.add_parser("color", help="train a CoLoR compressor (ORPO + length term, LoRA)")
    train.add_argument("--data", required=True, help="folder written by `ctxopt train color-data`")
    train.add_argument("--out", required=True, help="adapter folder to write")
    train.add_argument("--base", default="smollm2-135m", help="compressor model to adapt")
    train.add_argument("--epochs", type=float, default=3.0, help="passes over the pairs (default: 3)")
    train.add_argument("--lr", type=float, default=3e-4, help="learning rate (default: 3e-4)")
    train.add_argument("--beta", type=float, default=2.5, help="weight of the odds-ratio term [P]")
    train.add_argument("--length-coef", type=float, default=0.1, help="gamma of the length scaling [C]")
    train.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    train.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: 16)")
    train.add_argument("--layers", type=int, default=8, help="LoRA on the last N decoder layers")
    train.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    train.add_argument("--max-length", type=int, default=512, help="tokens per prompt + response")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    train.set_defaults(handler=cmd_color_train)

    merge = subparsers.add_parser("color-merge", help="write a compressor with its CoLoR adapter merged in: a model "
                                                      "folder a serving engine loads (CoLoR(compressor_engine=URL))")
    merge.add_argument("--out", required=True, help="model folder to write")
    merge.add_argument("--base", default=None, help="compressor model (default: CoLoR's default compressor)")
    merge.add_argument("--adapter", default="auto", help="adapter folder (default: the one packaged for --base)")
    merge.add_argument("--dtype", default="bfloat16", help="dtype of the written weights (default: bfloat16)")
    merge.set_defaults(handler=cmd_color_merge)


# ---------------------------------------------------------------------------------------------------------
# Preference data


def is_heldout(question_id: str, share: float) -> bool:
    """A fixed share of questions (by a hash of the id) goes to the held-out file."""
    return stable_hash(f"ctxopt-color:{question_id}") % 1000 < share * 1000


@dataclass
class JudgeCase:
    """One training passage in its judging context: the question, gold answers, and distractor texts."""

    key: str
    question_id: str
    question: str
    answers: list[str]
    passage: str
    distractors: list[str]
    slot: int  # where the candidate sits among the distractors
    bridges: list[str] = field(default_factory=list)  # titles of the question's other supporting paragraphs
    support: list[str] = field(default_factory=list)  # texts of the question's other supporting paragraphs


def training_cases(questions: int, seed: int, distractors: int) -> list[JudgeCase]:
    """Supporting paragraphs of HotpotQA train-side questions, none of them in an eval-side question."""
    from ..bench.datasets import hotpotqa_raw, hotpotqa_split, load_hotpotqa

    evaluated = {"".join(s) for d in hotpotqa_raw() if hotpotqa_split(d["_id"]) == "eval" for _, s in d["context"]}
    cases = []
    for sample in load_hotpotqa(questions, seed=seed, split="train"):
        qid = sample.metadata["question_id"]
        others = [p.text for p in sample.passages if not p.metadata["supporting"]]
        supporting = [p for p in sample.passages if p.metadata["supporting"]]
        for passage in supporting:
            if passage.text in evaluated:
                continue
            title = passage.metadata["title"]
            rng = random.Random(f"{seed}:{qid}:{title}")
            chosen = rng.sample(others, min(distractors, len(others)))
            partners = [p for p in supporting if p is not passage]
            cases.append(JudgeCase(f"{qid}:{title}", qid, sample.question, sample.answers, passage.text, chosen,
                                   rng.randrange(len(chosen) + 1), [p.metadata["title"] for p in partners],
                                   [p.text for p in partners]))
    return cases


def loft_request(question: str, texts: list[str]) -> str:
    """The LOFT-style in-context retrieval request over ``texts``, which get IDs 0, 1, ... in order."""
    corpus = "\n".join(f"ID: {i} | CONTENT: {t} | END ID: {i}" for i, t in enumerate(texts))
    return f"{RETRIEVAL_INSTRUCTION}\n\n{corpus}\n\nquery: {question}"


def pick_id(lm, question: str, texts: list[str]) -> int:
    """The ID the model names after "Final Answer: [": its most likely next token among "0" .. "n-1" (the
    choice is constrained to valid IDs, so a small model that would ramble still names one)."""
    from ..decoding import prefill
    from ..prompting import render_chat

    text = render_chat(lm.tokenizer, loft_request(question, texts), answer_prefix=RETRIEVAL_PREFIX)
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    logits = prefill(lm.model, ids).logits
    choices = [lm.tokenizer(str(i), add_special_tokens=False)["input_ids"][0] for i in range(len(texts))]
    return int(logits[choices].argmax())


def with_candidate(case: JudgeCase, candidate: str) -> list[str]:
    """The judge's passages: the distractors with the candidate at the case's slot."""
    texts = list(case.distractors)
    texts.insert(case.slot, candidate)
    return texts


class RetrievalJudge:
    """Success when the target model, reading the candidate among the distractors, names the candidate's ID."""

    name = "retrieval"

    def __init__(self, lm, **_: Any):
        self.lm = lm

    def __call__(self, case: JudgeCase, candidate: str) -> bool:
        return pick_id(self.lm, case.question, with_candidate(case, candidate)) == case.slot


class AnswerJudge:
    """Success when the target model's answer, read over the candidate and the question's other supporting
    paragraphs (uncompressed, no distractors), reaches F1 ``min_f1`` with the gold answer: a multi-hop question
    needs every hop, so the judge asks whether the candidate still carries its own hop."""

    name = "answer"

    def __init__(self, lm, min_f1: float = 0.5, **_: Any):
        from ..bench.datasets import HOTPOTQA_INSTRUCTION
        from ..pipeline import Pipeline

        self.pipe = Pipeline(lm, instruction=HOTPOTQA_INSTRUCTION, max_new_tokens=32)
        self.min_f1 = min_f1

    def __call__(self, case: JudgeCase, candidate: str) -> bool:
        from ..bench.metrics import f1_score

        return f1_score(self.pipe.ask(case.question, context=[candidate, *case.support]).text,
                        case.answers) >= self.min_f1


class EmbeddingJudge:
    """Success when the retrieval embedder ranks the candidate above every distractor for the question."""

    name = "embedding"

    def __init__(self, lm=None, **_: Any):
        from ..retrievers.embeddings import load_embedder

        self.embedder = load_embedder()

    def __call__(self, case: JudgeCase, candidate: str) -> bool:
        scores = self.embedder.embed([candidate] + case.distractors) @ self.embedder.embed([case.question])[0]
        return bool(scores[0] > scores[1:].max()) if len(scores) > 1 else True


class EvidenceJudge:
    """Success when the candidate still contains every piece of multi-hop evidence its original passage
    contains: the gold answers and the titles of the question's other supporting paragraphs (the bridge
    entities), compared after answer normalisation; yes/no answers are ignored."""

    name = "evidence"

    def __init__(self, lm=None, **_: Any):
        pass

    @staticmethod
    def spans(case: JudgeCase) -> list[str]:
        """The normalised evidence the case's passage contains (empty: nothing to keep, every candidate passes)."""
        from ..bench.metrics import normalize_answer

        original = normalize_answer(case.passage)
        evidence = [normalize_answer(a) for a in case.answers + case.bridges]
        return [e for e in evidence if e and e not in ("yes", "no") and e in original]

    def __call__(self, case: JudgeCase, candidate: str) -> bool:
        from ..bench.metrics import normalize_answer

        kept = normalize_answer(candidate)
        return all(e in kept for e in self.spans(case))


JUDGES: dict[str, Callable[..., Callable[[JudgeCase, str], bool]]] = {
    "retrieval": RetrievalJudge, "answer": AnswerJudge, "embedding": EmbeddingJudge, "evidence": EvidenceJudge,
}


def choose_pair(candidates: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(chosen, rejected): the shortest success and the longest failure (by ``tokens``); None without both."""
    wins = [c for c in candidates if c["success"]]
    losses = [c for c in candidates if not c["success"]]
    if not wins or not losses:
        return None
    chosen = min(wins, key=lambda c: c["tokens"])
    rejected = max(losses, key=lambda c: c["tokens"])
    return (chosen, rejected) if chosen["text"] != rejected["text"] else None


def candidate_texts(cases: list[JudgeCase], compressors: list[str], ratios: list[float], target,
                    max_new_tokens: int, batch_size: int, samples: int = 0, temperature: float = 0.8,
                    have: list[set[str]] | None = None, seed: int = 0) -> list[list[tuple[str, str]]]:
    """Per case, (source, text) of every candidate whose source it does not ``have`` yet: each compressor's greedy
    summary and sampled summaries ``0 .. samples - 1``, then extractive per ratio. Only the missing ones are
    generated, and a compressor is loaded only when some case lacks one of its summaries.

    Sampling is seeded from ``seed``, the compressor and the (case, sample index) pairs it draws, not from the
    global stream: a later run that adds sample indices 4-7 draws new summaries instead of repeating 0-3."""
    import torch

    from ..compressors.color import CoLoR, summarise
    from ..compressors.extractive import extract
    from ..retrievers.embeddings import load_embedder

    have = have if have is not None else [set() for _ in cases]
    out: list[list[tuple[str, str]]] = [[] for _ in cases]
    for name in compressors:
        greedy = [i for i, sources in enumerate(have) if f"summary:{name}" not in sources]
        drawn = [(i, j) for i, sources in enumerate(have) for j in range(samples)
                 if f"sample:{name}:{j}" not in sources]
        if not greedy and not drawn:
            continue
        stage = CoLoR(compressor=name, adapter=None, max_new_tokens=max_new_tokens, batch_size=batch_size)
        lm = stage.compressor_model(target.device, target.dtype)
        if greedy:
            summaries, _ = stage.summarised([cases[i].passage for i in greedy], target.device, target.dtype)
            for i, summary in zip(greedy, summaries):
                out[i].append((f"summary:{name}", summary))
        if drawn:
            torch.manual_seed(stable_hash(json.dumps([seed, name, [(cases[i].key, j) for i, j in drawn]])))
            texts = summarise(lm, [cases[i].passage for i, _ in drawn], max_new_tokens, batch_size,
                              temperature=temperature)
            for (i, j), text in zip(drawn, texts):
                out[i].append((f"sample:{name}:{j}", text))
    embedder = None
    for i, sources in enumerate(have):
        for ratio in ratios:
            if f"extractive:{ratio}" not in sources:
                embedder = embedder or load_embedder()
                out[i].append((f"extractive:{ratio}",
                               extract(cases[i].question, cases[i].passage, ratio, target.tokenizer, embedder)))
    return out


def judging_settings(args, target) -> dict[str, Any]:
    """Everything a candidate's success depends on besides its text: the judges, the model they run (name and
    dtype), the answer threshold and the distractors (drawn per seed). An earlier run's judgements are reused
    only when all of these match."""
    return {"judge": judge_names(args.judge), "target": args.target,
            "dtype": str(target.dtype).removeprefix("torch."), "min_f1": args.min_f1,
            "distractors": args.distractors, "seed": args.seed}


def build_preference_data(args) -> dict[str, Any]:
    """Judge every candidate of every training passage (resumable: passages already in candidates.jsonl are
    skipped), then write the chosen/rejected pairs to train.jsonl and heldout.jsonl. With ``--candidates-from``,
    the earlier run's candidates are kept, only the sources it lacks are generated, and its judgements are
    reused when its judging settings match this run's (else every candidate is judged anew)."""
    import torch
    from tqdm.auto import tqdm

    from ..models import load_model

    torch.manual_seed(args.seed)
    sources = pair_sources(args.pair_sources)  # all three checked before any model loads
    judge_names(args.judge)
    earlier, earlier_judging = earlier_run(Path(args.candidates_from)) if args.candidates_from else ({}, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / CANDIDATES_FILE
    done = {json.loads(line)["key"] for line in log.open(encoding="utf-8")} if log.exists() else set()
    target = load_model(args.target)
    judging = judging_settings(args, target)
    judged = earlier if earlier_judging == judging else {}
    judges = [JUDGES[name](target, min_f1=args.min_f1) for name in judging["judge"]]

    def success(case: JudgeCase, text: str) -> bool:
        return all(judge(case, text) for judge in judges) if text.strip() else False

    cases = [c for c in training_cases(args.questions, args.seed, args.distractors) if c.key not in done]
    began = time.perf_counter()
    compressors = [c.strip() for c in args.compressors.split(",") if c.strip()]
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    for lo in tqdm(range(0, len(cases), args.batch_size), desc="color-data", unit="batch"):
        batch = cases[lo:lo + args.batch_size]
        judgeable = [c for c in batch if (judged[c.key]["original_success"] if c.key in judged
                                          else success(c, c.passage))]
        kept = {c.key: [(k["source"], k["text"], k["success"] if c.key in judged else None)
                        for k in earlier.get(c.key, {}).get("candidates", [])] for c in judgeable}
        fresh = candidate_texts(judgeable, compressors, ratios, target, args.max_new_tokens, args.batch_size,
                                args.samples, args.temperature, [{k[0] for k in kept[c.key]} for c in judgeable],
                                args.seed)
        for case, row in zip(judgeable, fresh):
            kept[case.key].extend((source, text, None) for source, text in row)
        with log.open("a", encoding="utf-8") as stream:
            for case in batch:
                record = {"key": case.key, "question_id": case.question_id, "question": case.question,
                          "passage": case.passage, "original_success": case.key in kept, "candidates": [
                              {"source": source, "text": text,
                               "tokens": count_tokens(target.tokenizer, text),
                               "success": known if known is not None else success(case, text)}
                              for source, text, known in kept.get(case.key, [])]}
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    return write_pairs(out, args.heldout, time.perf_counter() - began, sources, judging)


def judge_names(spec: str) -> list[str]:
    """``--judge``: the judges' names, each one of ``JUDGES``."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in JUDGES]
    if not names or unknown:
        raise InputError(f"--judge: unknown {unknown or spec!r}; choose from {list(JUDGES)}")
    return names


def pair_sources(spec: str) -> tuple[str, ...]:
    """``--pair-sources``: candidate kinds (source-name prefixes) allowed in the pairs; empty means all."""
    sources = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in sources if s not in PAIR_SOURCES]
    if unknown:
        raise InputError(f"--pair-sources: unknown {unknown}; choose from {list(PAIR_SOURCES)}")
    return sources


def earlier_run(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """An earlier ``color-data`` run's candidates.jsonl records by passage key, and the judging settings its
    color-data.json recorded (None when it recorded none: its judgements are then never reused)."""
    path = folder / CANDIDATES_FILE
    if not path.exists():
        raise InputError(f"--candidates-from: no {CANDIDATES_FILE} in {folder}")
    records = {}
    for line in path.open(encoding="utf-8"):
        record = json.loads(line)
        records[record["key"]] = record
    summary = folder / "color-data.json"
    judging = json.loads(summary.read_text()).get("judging") if summary.exists() else None
    return records, judging


def write_pairs(out: Path, heldout_share: float, seconds: float, sources: tuple[str, ...] = (),
                judging: dict[str, Any] | None = None) -> dict[str, Any]:
    """train.jsonl / heldout.jsonl from candidates.jsonl, pairing only candidates whose source starts with one of
    ``sources`` (all when empty); returns counts. color-data.json records them with the command and the
    ``judging`` settings (what lets a later ``--candidates-from`` run reuse these judgements)."""
    counts = {"passages": 0, "original_failed": 0, "no_success": 0, "no_failure": 0, "train": 0, "heldout": 0}
    train = (out / TRAIN_FILE).open("w", encoding="utf-8")
    held = (out / HELDOUT_FILE).open("w", encoding="utf-8")
    with train, held:
        for line in (out / CANDIDATES_FILE).open(encoding="utf-8"):
            record = json.loads(line)
            counts["passages"] += 1
            if not record["original_success"]:
                counts["original_failed"] += 1
                continue
            candidates = [c for c in record["candidates"] if not sources or c["source"].startswith(sources)]
            pair = choose_pair(candidates)
            if pair is None:
                success = any(c["success"] for c in candidates)
                counts["no_failure" if success else "no_success"] += 1
                continue
            chosen, rejected = pair
            row = {"key": record["key"], "question_id": record["question_id"], "question": record["question"],
                   "passage": record["passage"], "chosen": chosen["text"], "rejected": rejected["text"],
                   "chosen_source": chosen["source"], "rejected_source": rejected["source"],
                   "chosen_tokens": chosen["tokens"], "rejected_tokens": rejected["tokens"]}
            split = "heldout" if is_heldout(record["question_id"], heldout_share) else "train"
            (held if split == "heldout" else train).write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[split] += 1
    counts["seconds_this_run"] = round(seconds, 1)
    command = "ctxopt " + shlex.join(sys.argv[1:])
    (out / "color-data.json").write_text(json.dumps({"counts": counts, "command": command, "judging": judging},
                                                    indent=2))
    return counts


def cmd_color_data(args) -> int:
    print(json.dumps(build_preference_data(args), indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------
# ORPO with the length term


def response_logps(logits, labels):
    """Per row: the mean log-probability of the response tokens (labels != -100), their summed negative
    log-likelihood, and their count. ``logits[:, t]`` predicts ``labels[:, t + 1]``."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    count = mask.sum(-1)
    return logp.sum(-1) / count.clamp(min=1), -logp.sum(-1), count


def orpo_loss(logits, labels, beta: float = 2.5, length_coef: float = 0.1):
    """CoLoR's ORPO loss on a batch whose first half is chosen responses and second half rejected ones.

    NLL (token mean over the chosen responses) - beta * mean log sigmoid(s * log-odds), log-odds =
    log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)) over per-token mean log-probabilities, s = max(length_coef *
    (rejected tokens - chosen tokens), 1) [C]. Returns (loss, nll, odds-ratio term).
    """
    import torch
    import torch.nn.functional as F

    mean_logp, nll, count = response_logps(logits, labels)
    half = logits.shape[0] // 2
    chosen, rejected = mean_logp[:half], mean_logp[half:]
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    scale = torch.clamp(length_coef * (count[half:] - count[:half]).float(), min=1.0)
    odds_term = F.logsigmoid(scale * log_odds).mean()
    chosen_nll = nll[:half].sum() / count[:half].sum().clamp(min=1)
    return chosen_nll - beta * odds_term, chosen_nll, odds_term


def encode_pair(tokenizer, row: dict[str, Any], eos: list[int], max_length: int) -> dict[str, list[int]]:
    """Token ids and labels (prompt masked with -100) of the chosen and the rejected response."""
    from ..compressors.color import summary_prompt

    prompt = tokenizer(summary_prompt(tokenizer, row["passage"]), add_special_tokens=False)["input_ids"]
    encoded = {}
    for side in ("chosen", "rejected"):
        response = tokenizer(row[side], add_special_tokens=False)["input_ids"] + eos[:1]
        ids = (prompt + response)[:max_length]
        encoded[f"{side}_ids"] = ids
        encoded[f"{side}_labels"] = ([-100] * len(prompt) + response)[:max_length]
    return encoded


def collate_pairs(rows: list[dict[str, list[int]]], pad: int) -> dict[str, Any]:
    """One right-padded batch: every chosen sequence, then every rejected one."""
    import torch

    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, target) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)], lab[i, :len(target)], mask[i, :len(s)] = torch.tensor(s), torch.tensor(target), 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def read_pairs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open(encoding="utf-8")] if path.exists() else []


def train_compressor(args, lm=None) -> dict[str, Any]:
    """LoRA-train the compressor with ``orpo_loss`` through transformers' Trainer; save the adapter."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from ..fileutil import sha256_file
    from ..models import load_model

    torch.manual_seed(args.seed)
    data, out = Path(args.data), Path(args.out)
    lm = lm or load_model(args.base)
    eos = lm.eos_token_ids
    pad = eos[0] if eos else (lm.tokenizer.pad_token_id or 0)
    train_rows = read_pairs(data / TRAIN_FILE)
    if not train_rows:
        raise SystemExit(f"{data / TRAIN_FILE} holds no pairs; run `ctxopt train color-data` first.")
    encode = [encode_pair(lm.tokenizer, row, eos, args.max_length) for row in train_rows]
    heldout = [encode_pair(lm.tokenizer, row, eos, args.max_length) for row in read_pairs(data / HELDOUT_FILE)]
    layers = lm.num_layers
    model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=list(LORA_MODULES), layers_to_transform=list(range(max(0, layers - args.layers), layers)),
    ))
    beta, length_coef = args.beta, args.length_coef

    class ORPOTrainer(Trainer):
        """Trainer whose loss is ``orpo_loss`` on the chosen/rejected halves of each batch."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss, _, _ = orpo_loss(logits, inputs["labels"], beta, length_coef)
            return (loss, {"logits": logits}) if return_outputs else loss

    checkpoints = out / "checkpoints"
    trainer = ORPOTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(checkpoints), per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=args.lr,
            logging_steps=1, save_strategy="steps", save_steps=10, save_total_limit=1, report_to=[],
            remove_unused_columns=False, seed=args.seed, use_cpu=lm.device.type == "cpu",
            dataloader_num_workers=0, disable_tqdm=False, prediction_loss_only=True,
        ),
        train_dataset=encode,
        eval_dataset=heldout or None,
        data_collator=lambda rows: collate_pairs(rows, pad),
    )
    began = time.perf_counter()
    resume = args.resume and any(checkpoints.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - began
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evaluation = {}
    if heldout:
        evaluation = {"heldout_loss": trainer.evaluate()["eval_loss"], "heldout_pairs": len(heldout)}
    model.peft_config["default"].base_model_name_or_path = args.base
    model.save_pretrained(str(out), save_embedding_layers=False)
    summary = {
        "base": args.base, "beta": beta, "length_coef": length_coef, "length_form": "odds-ratio term scaled by "
        "max(length_coef * (rejected - chosen tokens), 1) [C]", "lr": args.lr, "epochs": args.epochs,
        "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "layers": args.layers, "batch_size": args.batch_size,
        "train_pairs": len(encode), **evaluation, "first_losses": losses[:5], "last_losses": losses[-5:],
        "train_seconds": round(seconds, 1), "data_sha256": sha256_file(data / TRAIN_FILE),
        "command": "ctxopt " + shlex.join(sys.argv[1:]),
    }
    (out / "color.json").write_text(json.dumps(summary, indent=2))
    (out / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    return summary


def cmd_color_train(args) -> int:
    print(json.dumps(train_compressor(args), indent=2))
    return 0


def merge_compressor(base: str | None, adapter: str, out: str | Path, dtype: str = "bfloat16") -> dict[str, Any]:
    """Write ``base`` with ``adapter`` merged into its weights (float32 merge, then cast to ``dtype``), its
    tokenizer and MERGED_FILE (which names both, for ``CoLoR.engine_identity``) to ``out``: the compressor as one
    plain model, which a serving engine runs faster than the base plus a LoRA module (vLLM's CPU build turns
    compilation off for LoRA; docs/color.md has the measurement)."""
    import torch

    from ..compressors.color import DEFAULT_COMPRESSOR, MERGED_FILE, CoLoR, packaged_adapter

    stage = CoLoR(compressor=base or DEFAULT_COMPRESSOR, adapter=adapter)
    if stage.adapter == "auto" and packaged_adapter(stage.compressor) is None:
        raise InputError(f"No adapter is packaged for {stage.compressor!r}; pass --adapter FOLDER.")
    target_dtype = getattr(torch, dtype, None)
    if not isinstance(target_dtype, torch.dtype):
        raise InputError(f"--dtype must be a torch dtype such as bfloat16 or float32; got {dtype!r}.")
    merged = stage.compressor_model("cpu", torch.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.to(target_dtype) for name, tensor in merged.model.state_dict().items()}
    merged.model.save_pretrained(out, state_dict=weights)
    merged.tokenizer.save_pretrained(out)
    summary = {"compressor": merged.name, "out": str(out), "dtype": dtype}
    (out / MERGED_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def cmd_color_merge(args) -> int:
    summary = merge_compressor(args.base, args.adapter, args.out, args.dtype)
    print(json.dumps(summary, indent=2))
    print(f"serve it: bash scripts/serve_engine.sh {summary['out']} 8001; then CoLoR(compressor_engine="
          f"\"http://127.0.0.1:8001/v1\") or --option compressor_engine=http://127.0.0.1:8001/v1", file=sys.stderr)
    return 0
