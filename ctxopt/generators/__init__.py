"""Generators: what turns a compressed Prompt into an answer.

``LocalGenerator`` is ctxopt's own prefill + cache stages + decoder (the only one that holds the KV cache, so
the only one that runs cache stages and RAPID). The serving-engine generator, which hands the prompt's token
ids to an OpenAI-compatible server, implements the same protocol.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ..decoding import DecodeResult
from ..stages import Run
from ..types import Prompt
from .engine import EngineGenerator
from .local import LocalGenerator


class Generator(Protocol):
    """Prompt -> decoded answer, writing what each step cost into ``run.stats``."""

    def generate(self, prompt: Prompt, run: Run, on_text: Callable[[str], None] | None = None) -> DecodeResult: ...

    def generate_many(self, prompts: Sequence[Prompt], runs: Sequence[Run]) -> list[DecodeResult]: ...


__all__ = ["EngineGenerator", "Generator", "LocalGenerator"]
