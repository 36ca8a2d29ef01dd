"""A LlamaIndex node postprocessor over ctxopt (needs ``llama-index-core``: ``pip install "ctxopt[llamaindex]"``).

``CtxoptNodePostprocessor`` is the LlamaIndex counterpart of LangChain's ``CtxoptDocumentCompressor``: it
compresses retrieved nodes for the query with a ctxopt method's text-level stages, and each node keeps the text
of its kept tokens.

    from llama_index.core import VectorStoreIndex
    engine = VectorStoreIndex(nodes).as_query_engine(
        node_postprocessors=[CtxoptNodePostprocessor(method="extractive", budget=0.5)])
"""
from __future__ import annotations

from typing import Any

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from ..compress import INPUT_KEY, compress_texts, text_stages
from ..errors import InputError
from ..models import DEFAULT_GENERATOR
from ..pipeline import Pipeline
from ..types import Passage

# Metadata ctxopt adds to each node; left out of the text LlamaIndex shows the LLM and the embedder.
ADDED_KEYS = ("ctxopt_method", "ctxopt_budget", "ctxopt_tokens_in", "ctxopt_tokens_out")


class CtxoptNodePostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes with a ctxopt method's text-level stages, given the query.

    ``method``: any registered method made of passage stages (``rag``: the best chunks by embedder similarity;
    ``extractive``: the nodes' sentences most similar to the query, ranked together; ``color``: each node
    rewritten by the CoLoR compressor) or token stages (``truncate``, ``gemfilter``, ``specpc``). ``budget``
    (tokens of ``model``, or a ratio) and ``options`` (``layer=``, ``draft=``) mean what they mean in a Pipeline.
    Token stages score the ctxopt prompt built from the query and all nodes' text, and each node keeps the text
    of its kept tokens (gaps marked " … "); a node with nothing kept is dropped. Returned nodes are copies that
    keep their id, score and metadata, and add ``ctxopt_method``, ``ctxopt_budget``, ``ctxopt_tokens_in`` and
    ``ctxopt_tokens_out`` (tokens of ``model``'s tokenizer; kept out of the LLM's and the embedder's view of the
    node). Their character offsets and embedding are cleared: they described the text before compression.
    An unknown constructor argument is an error.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: Any = DEFAULT_GENERATOR
    method: str = "rag"
    budget: int | float | None = 512
    options: dict[str, Any] = Field(default_factory=dict)
    embedder: Any = None
    _pipe: Pipeline = PrivateAttr()

    @model_validator(mode="after")
    def _build_ctxopt_postprocessor(self) -> "CtxoptNodePostprocessor":
        stages = text_stages(self.method, self.budget, self.options, "A node postprocessor")
        self._pipe = Pipeline(self.model, stages=stages, embedder=self.embedder)
        return self

    @classmethod
    def class_name(cls) -> str:
        return "CtxoptNodePostprocessor"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        if query_bundle is None:
            raise InputError("CtxoptNodePostprocessor compresses for a query: pass query_str=... or query_bundle=...")
        passages = [
            Passage(
                text=item.node.get_content(metadata_mode=MetadataMode.NONE),
                source=str(item.node.metadata.get("file_name") or item.node.node_id),
                metadata={**item.node.metadata, INPUT_KEY: i},
                id=item.node.node_id,
            )
            for i, item in enumerate(nodes)
        ]
        _, kept = compress_texts(self._pipe, query_bundle.query_str, passages)
        out = []
        for i, item in enumerate(nodes):
            if i not in kept:
                continue
            node = item.node.model_copy()
            node.set_content(kept[i].text)
            node.metadata = {
                **item.node.metadata,
                "ctxopt_method": self.method,
                "ctxopt_budget": self.budget,
                "ctxopt_tokens_in": kept[i].tokens_in,
                "ctxopt_tokens_out": kept[i].tokens_out,
            }
            for excluded in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):
                setattr(node, excluded, list(dict.fromkeys([*getattr(node, excluded), *ADDED_KEYS])))
            for offset in ("start_char_idx", "end_char_idx", "embedding"):
                if hasattr(node, offset):
                    setattr(node, offset, None)
            out.append(NodeWithScore(node=node, score=item.score))
        return out
