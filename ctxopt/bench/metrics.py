"""Answer metrics: SQuAD/HotpotQA exact match and F1, RULER's string matching, supporting-fact survival.

Sources: HotpotQA's official ``hotpot_evaluate_v1.py`` (normalisation, F1 with its yes/no rule), SQuAD's
``evaluate-v1.1.py`` (max over gold answers), and RULER's ``eval/synthetic/constants.py`` and
``eval/evaluate.py`` in the ``nvidia-long-context-eval`` package (string_match_all / string_match_part,
prediction post-processing). RULER reports scores x100; these return fractions in [0, 1].
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctxopt.bench.datasets import Sample

_PUNCTUATION = frozenset(string.punctuation)
_CONTROL = re.compile(r"[\x00-\x1f]")


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD/HotpotQA)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    norm = normalize_answer(pred)
    return float(any(norm == normalize_answer(g) for g in golds))


def _f1(pred: str, gold: str) -> float:
    """Token-overlap F1 of one prediction against one gold answer (hotpot_evaluate_v1.f1_score)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
        return 0.0
    p_tokens, g_tokens = p.split(), g.split()
    same = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_tokens), same / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: Sequence[str]) -> float:
    """The best token F1 over the gold answers; 0.0 for an empty prediction or no golds."""
    return max((_f1(pred, g) for g in golds), default=0.0)


def _ruler_postprocess(pred: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def ruler_string_match_all(pred: str, golds: Sequence[str]) -> float:
    """Fraction of the gold strings contained, case-insensitively, in the prediction (RULER)."""
    if not golds:
        return 0.0
    text = _ruler_postprocess(pred).lower()
    return sum(g.lower() in text for g in golds) / len(golds)


def ruler_string_match_part(pred: str, golds: Sequence[str]) -> float:
    """1.0 when any gold string is contained, case-insensitively, in the prediction (RULER)."""
    text = _ruler_postprocess(pred).lower()
    return float(any(g.lower() in text for g in golds))


def ruler_metric(task: str) -> Callable[[str, Sequence[str]], float]:
    """RULER's metric for a task ("qa_1" or "ruler/qa_1"): string_match_part for qa, string_match_all otherwise."""
    name = task.removeprefix("ruler/")
    return ruler_string_match_part if name.startswith("qa_") else ruler_string_match_all


def _squash(text: str) -> str:
    return " ".join(text.split())


def supporting_facts_kept(sample: "Sample", kept_text_by_passage: Mapping[str, str] | Sequence[str]) -> float:
    """Fraction of a HotpotQA sample's supporting-fact sentences that survive compression whole.

    ``kept_text_by_passage`` gives the text kept of each passage: a sequence aligned with
    ``sample.passages`` (e.g. ``[prompt.kept_text(i) for i in range(len(prompt.passages))]``) or a mapping
    keyed by passage title, id or source. A missing passage kept nothing. A sentence survives when its
    whitespace-normalised text occurs in the passage's whitespace-normalised kept text.
    """
    facts = sample.metadata.get("supporting_facts")
    if not facts or not sample.passages:
        raise ValueError(f"sample {sample.id!r} has no supporting facts (only HotpotQA samples do)")
    kept_by_title: dict[str, str] = {}
    for i, passage in enumerate(sample.passages):
        if isinstance(kept_text_by_passage, Mapping):
            keys = (passage.metadata.get("title"), passage.id, passage.source)
            kept = next((kept_text_by_passage[k] for k in keys if k in kept_text_by_passage), "")
        else:
            kept = kept_text_by_passage[i] if i < len(kept_text_by_passage) else ""
        kept_by_title[passage.metadata["title"]] = _squash(kept)
    sentences = sample.metadata["supporting_sentences"]
    hits = sum(_squash(s) in kept_by_title.get(title, "") for (title, _), s in zip(facts, sentences))
    return hits / len(facts)


def score(sample: "Sample", prediction: str) -> dict[str, float]:
    """The primary metric(s) for a sample's task; ``"score"`` is always the primary one.

    RULER tasks: RULER's own metric. HotpotQA: F1 (primary), EM and whether any gold is contained.
    Needle tasks: the fraction of gold strings contained (string_match_all).
    """
    task = sample.task
    if task.startswith("ruler/"):
        metric = ruler_metric(task)
        value = metric(prediction, sample.answers)
        return {"score": value, metric.__name__.removeprefix("ruler_"): value}
    if task == "hotpotqa":
        f1 = f1_score(prediction, sample.answers)
        return {
            "score": f1,
            "f1": f1,
            "em": exact_match(prediction, sample.answers),
            "string_match_part": ruler_string_match_part(prediction, sample.answers),
        }
    if task.startswith("needle"):
        value = ruler_string_match_all(prediction, sample.answers)
        return {"score": value, "string_match_all": value}
    raise ValueError(f"no metric for task {task!r}; expected 'ruler/<task>', 'hotpotqa' or 'needle'")
