"""Text-level compression without generation: what ``compress_prompt`` returns and what the LangChain document
compressor and the LlamaIndex node postprocessor share.

``compress_prompt(context, question, method=..., budget=...)`` runs a method's passage and token stages
(``Pipeline.compress``) and returns the compressed context as text, the whole compressed prompt, and the token
counts before and after, for a caller who hands the text (or ``result.prompt.input_ids``) to another model.

``compress_texts`` is the step the framework components share: given passages tagged with the index of the input
they came from, each input keeps the text of its kept tokens (gaps marked " … "), with its token counts.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .methods import build_stages
from .models.registry import DEFAULT_GENERATOR
from .pipeline import Context, Pipeline, as_passages
from .prompting import validate_question
from .stages import Stage
from .text import count_tokens
from .types import Passage, Prompt

# Every model forward made through the framework components and compress_prompt runs under this process-wide
# lock: the models and stages are not safe for concurrent forwards (stages cache drafts and adapters), so
# concurrent calls run one at a time, each exactly as if it ran alone.
MODEL_LOCK = threading.RLock()
TEXT_STAGE_KINDS = ("passage", "token")
GAP = " … "  # joins the kept pieces of one input, as Prompt.kept_text joins the pieces of one passage
INPUT_KEY = "_ctxopt_input"  # metadata key: the input a passage came from; stripped before anything is returned


def text_stages(method: str, budget: int | float | None, options: dict[str, Any], who: str) -> list[Stage]:
    """The stages of ``method``, which must all act on text (passage or token stages): ``who`` returns text."""
    stages = build_stages(method, budget, **options)
    other = [f"{s.name} ({s.kind})" for s in stages if s.kind not in TEXT_STAGE_KINDS]
    if other:
        raise InputError(
            f"Method {method!r} has stages that do not act on text: {', '.join(other)}. {who} takes methods "
            "made of passage or token stages (rag, extractive, color, truncate, gemfilter, specpc); run "
            f"{method!r} through a Pipeline (or CtxoptChatModel), which generates the answer itself."
        )
    return stages


def untag(passage: Passage) -> Passage:
    """``passage`` without the INPUT_KEY tag ``compress_texts`` reads."""
    return passage.replace(metadata={k: v for k, v in passage.metadata.items() if k != INPUT_KEY})


@dataclass
class KeptText:
    """What compression left of one input: its kept text and its token counts (``model``'s tokenizer)."""

    text: str
    tokens_in: int
    tokens_out: int


def compress_texts(pipe: Pipeline, question: str, passages: Sequence[Passage]) -> tuple[Prompt, dict[int, KeptText]]:
    """Run ``pipe.compress`` over ``passages``, each tagged ``metadata[INPUT_KEY] = i`` (the input it came from;
    several passages may share one), and return the prompt and, for each input with something kept, its text.

    An input's text is the text of its passages' kept tokens, in order, joined by " … " (a passage whose tokens
    were all kept is its whole text); ``tokens_in`` counts the input's passages as given, ``tokens_out`` its
    tokens in the compressed prompt. An input with nothing kept is left out.
    """
    question = validate_question(question)
    with MODEL_LOCK:
        prompt = pipe.compress(question, list(passages))  # what Pipeline.ask runs before the generator
        tokenizer = pipe.lm.tokenizer
    tokens_in: dict[int, int] = defaultdict(int)
    for passage in passages:
        tokens_in[passage.metadata[INPUT_KEY]] += count_tokens(tokenizer, passage.text)
    untouched = len(prompt) == prompt.original_length
    pieces: dict[int, list[str]] = defaultdict(list)
    tokens_out: dict[int, int] = defaultdict(int)
    for j, passage in enumerate(prompt.passages):
        kept = int((prompt.passage_index == j).sum())
        text = passage.text if untouched else prompt.kept_text(j)
        if kept and text.strip():
            pieces[passage.metadata[INPUT_KEY]].append(text)
            tokens_out[passage.metadata[INPUT_KEY]] += kept
    return prompt, {i: KeptText(GAP.join(pieces[i]), tokens_in[i], tokens_out[i]) for i in sorted(pieces)}


@dataclass
class CompressedPrompt:
    """The result of ``compress_prompt``.

    ``compressed_context``: the kept text of each context passage that kept any, joined by blank lines.
    ``compressed_prompt``: the whole prompt the model would read (chat template, instruction, kept context,
    question), as text. ``origin_tokens`` / ``compressed_tokens``: that prompt's tokens before and after
    compression (``model``'s tokenizer); ``ratio`` = compressed / origin (the fraction kept, as a ratio budget
    means it). ``origin_context_tokens`` / ``compressed_context_tokens``: the same for the context alone.
    ``sources``: the source of each context passage that kept any, in the given order. ``prompt``: the
    compressed ``Prompt`` (token ids with provenance, ``prompt.stats``), for ``Pipeline.generate`` or an engine.
    """

    compressed_context: str
    compressed_prompt: str
    origin_tokens: int
    compressed_tokens: int
    ratio: float
    origin_context_tokens: int
    compressed_context_tokens: int
    sources: list[str]
    prompt: Prompt = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the Prompt left out)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "prompt"}


def compress_prompt(
    context: Context,
    question: str,
    method: str = "extractive",
    budget: int | float | None = 0.5,
    model: Any = DEFAULT_GENERATOR,
    **options: Any,
) -> CompressedPrompt:
    """Compress ``context`` for ``question`` with ``method`` at ``budget``, without generating an answer.

    ``context``: a string, a Passage, or a list of either (one passage each). ``method``: any method whose stages
    act on text (``extractive``, ``rag``, ``color``, ``truncate``, ``gemfilter``, ``specpc`` and their
    compositions; ``full`` keeps everything); ``budget`` and ``options`` mean what they mean for the method (see
    ``ctxopt methods``). ``model``: the model whose tokenizer counts the tokens and whose chat template frames
    the prompt (a registry name, folder, or a loaded model); token-level methods also run it.

    >>> result = compress_prompt(open("report.txt").read(), "What was the revenue?", budget=0.3)  # doctest: +SKIP
    >>> result.compressed_context, result.ratio                                                 # doctest: +SKIP
    """
    stages = text_stages(method, budget, options, "compress_prompt")
    pipe = Pipeline(model, stages=stages)
    passages = [p.replace(metadata={**p.metadata, INPUT_KEY: i}) for i, p in enumerate(as_passages(context))]
    prompt, kept = compress_texts(pipe, question, passages)
    with MODEL_LOCK:
        original = pipe.build_prompt(prompt.question, passages)
    prompt = dataclasses.replace(prompt, passages=[untag(p) for p in prompt.passages])
    untouched = len(prompt) == prompt.original_length
    text = prompt.text if untouched else pipe.lm.tokenizer.decode(prompt.input_ids, skip_special_tokens=False)
    return CompressedPrompt(
        compressed_context="\n\n".join(k.text for k in kept.values()),
        compressed_prompt=text,
        origin_tokens=len(original),
        compressed_tokens=len(prompt),
        ratio=len(prompt) / len(original),
        origin_context_tokens=int((original.passage_index >= 0).sum()),
        compressed_context_tokens=int((prompt.passage_index >= 0).sum()),
        sources=[passages[i].source for i in kept],
        prompt=prompt,
    )
