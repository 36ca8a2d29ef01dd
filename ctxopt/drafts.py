"""Draft models: the one place a stage's ``draft`` option becomes a loaded model checked against its target.

SpecPC, SpecKV and RAPID take a second, smaller model by the option ``draft``: None (the registry's smaller
draft for the target, see ``resolve_draft``), "self" (the target), a LoadedModel, or a registry name or path
(loaded on the target's device and dtype, once per process by ``load_model``'s cache). The vocabulary rule is
the same for all: the draft's token ids must mean the target's tokens (equal token-to-id maps), unless the stage
maps text across tokenizers itself (SpecPC's and SpecKV's ``cross_tokenizer``: None, the default, maps exactly
when the vocabularies differ, so the registry's SmolLM2 draft for Qwen2.5-Coder-0.5B works with no option; False
refuses such a draft; True always maps). A stage that compares the two models' logits token by token (RAPID)
also needs equal logit widths.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .models.registry import paired_draft, registry_entry

if TYPE_CHECKING:
    from .models import LoadedModel


CROSS_TOKENIZER_STAGES = ("specpc", "speckv")  # the stages that take ``cross_tokenizer=True``


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map the same tokens to the same ids."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def logit_width(lm: "LoadedModel") -> int:
    return lm.config.get_text_config(decoder=True).vocab_size


def resolve_draft(
    draft: "LoadedModel | str | None",
    target: "LoadedModel",
    stage: str,
    *,
    cross_tokenizer: bool | None = False,
    compare_logits: bool = False,
) -> "LoadedModel":
    """The draft as a LoadedModel, refused with a one-line error when it cannot draft for ``target`` in ``stage``.
    ``"self"``: the target. None: the registry's smaller draft for the target, else the target with a warning
    (``default_draft``). ``cross_tokenizer``: the stage's setting (see the module's docstring);
    anything but False lets a draft of another vocabulary through."""
    maps_text = cross_tokenizer is not False
    if draft is None or draft == "self":
        draft = target if draft else default_draft(target, stage, maps_text)
    if isinstance(draft, str):
        from .models import load_model

        draft = load_model(draft, target.device, target.dtype)
    if draft is target or maps_text:
        return draft
    if not same_vocabulary(draft.tokenizer, target.tokenizer):
        hint = " or cross_tokenizer=True to map the draft's tokens onto the target's by character offsets" \
            if stage in CROSS_TOKENIZER_STAGES else ""
        raise InputError(
            f"{stage}: the draft {draft.name!r} does not share the tokenizer of the target {target.name!r} (a draft "
            f"must share one tokenizer and vocabulary with it: its token ids would mean other words). Pass a draft of "
            f"the target's family (same vocabulary), draft=None for the target itself{hint}."
        )
    if compare_logits and logit_width(draft) != logit_width(target):
        raise InputError(
            f"{stage}: the draft {draft.name!r} and the target {target.name!r} must share one vocabulary (logit "
            f"widths {logit_width(draft)} vs {logit_width(target)}). Pass draft=None for self-speculation, or a "
            "draft from the target's model family."
        )
    return draft


def default_draft(target: "LoadedModel", stage: str, cross_tokenizer: bool = False) -> "LoadedModel | str":
    """The draft a draft-based method uses when given none: the registry's pairing for ``target`` (a name) when
    ``stage`` can use it (``cross_tokenizer``: the stage maps a draft of another tokenizer), else the target itself,
    with a warning saying so and how to ask for self-drafting."""
    name = paired_draft(target.name, cross_tokenizer)
    if name is not None:
        return name
    entry = registry_entry(target.name)
    other = f" ({entry.draft} has another tokenizer, which {stage} cannot use here)" if entry and entry.draft else ""
    warnings.warn(f"{stage}: {target.name} has no smaller registered draft that {stage} can use{other}, so it "
                  "drafts with itself, and a draft as large as its target cannot save time. Pass draft='self' "
                  "(--draft self) to ask for self-drafting, or draft=NAME for a smaller model of its family.",
                  stacklevel=4)
    return target


def crosses_tokenizers(cross_tokenizer: bool | None, draft: "LoadedModel", target: "LoadedModel") -> bool:
    """Whether a stage maps ``draft``'s tokens onto ``target``'s by text: as ``cross_tokenizer`` says, or (None)
    exactly when their vocabularies differ."""
    if cross_tokenizer is None:
        return draft is not target and not same_vocabulary(draft.tokenizer, target.tokenizer)
    return cross_tokenizer


def retokenize(ids: torch.Tensor, source, target) -> torch.Tensor:
    """Token ids of the ``source`` tokenizer as the ``target`` tokenizer's ids of the same text (special tokens
    dropped): a draft's answer handed across tokenizers."""
    text = source.decode(ids, skip_special_tokens=True)
    return torch.tensor(target(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
