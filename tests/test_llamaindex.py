"""The LlamaIndex node postprocessor on the tiny random model: the same compression as the LangChain document
compressor, nodes copied with their id, score and metadata, ctxopt's counts added out of the LLM's view."""
import asyncio

import pytest

pytest.importorskip("llama_index.core", reason="llama-index-core is not installed (pip install 'ctxopt[llamaindex]')")

from langchain_core.documents import Document  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from ctxopt.compressors.gemfilter import GemFilter  # noqa: E402
from ctxopt.errors import InputError  # noqa: E402
from ctxopt.integrations.langchain import CtxoptDocumentCompressor  # noqa: E402
from ctxopt.integrations.llamaindex import CtxoptNodePostprocessor  # noqa: E402
from ctxopt.pipeline import Pipeline  # noqa: E402
from ctxopt.types import Passage  # noqa: E402

BOXES = [("red", 3), ("blue", 7), ("green", 11), ("yellow", 2), ("black", 5)]
QUESTION = "How many marbles are in the blue box?"


def nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(text=f"The {colour} box holds {count} marbles. It sits on shelf {i} of the north room. "
                               f"The {colour} lid is painted.",
                          id_=f"n{i}", metadata={"colour": colour, "file_name": f"boxes/{colour}.txt"},
                          start_char_idx=0, end_char_idx=90),
            score=1.0 - i / 10,
        )
        for i, (colour, count) in enumerate(BOXES)
    ]


def test_rag_postprocessor_matches_the_langchain_compressor(tiny_lm):
    given = nodes()
    budget = len(Pipeline(tiny_lm).build_prompt(QUESTION, [])) + 40  # the prompt around the context, plus 40
    post = CtxoptNodePostprocessor(model=tiny_lm, method="rag", budget=budget, options={"chunk_tokens": 16})
    out = post.postprocess_nodes(given, query_str=QUESTION)
    documents = [Document(n.node.text, metadata=dict(n.node.metadata), id=n.node.node_id) for n in given]
    expected = CtxoptDocumentCompressor(model=tiny_lm, method="rag", budget=budget, options={"chunk_tokens": 16})
    expected = {d.id: d for d in expected.compress_documents(documents, QUESTION)}
    assert 0 < len(out) < len(given) and [n.node.node_id for n in out] == list(expected)
    scores = {n.node.node_id: n.score for n in given}
    for item in out:
        doc = expected[item.node.node_id]
        assert item.node.text == doc.page_content and item.score == scores[item.node.node_id]
        assert item.node.metadata == doc.metadata  # the node's metadata plus ctxopt's counts, as in LangChain
        assert item.node.metadata["ctxopt_tokens_out"] <= item.node.metadata["ctxopt_tokens_in"]
        llm_view = item.node.get_content(MetadataMode.LLM)
        assert "colour" in llm_view and "ctxopt" not in llm_view
        assert item.node.start_char_idx is None
    assert sum(n.node.metadata["ctxopt_tokens_out"] for n in out) <= 40
    assert given[1].node.text.endswith("painted.") and "ctxopt_method" not in given[1].node.metadata  # untouched
    again = asyncio.run(post.apostprocess_nodes(given, QueryBundle(QUESTION)))
    assert [(n.node.node_id, n.node.text) for n in again] == [(n.node.node_id, n.node.text) for n in out]


def test_token_postprocessor_keeps_what_the_pipeline_keeps(tiny_lm):
    given = nodes()
    out = CtxoptNodePostprocessor(model=tiny_lm, method="gemfilter", budget=30).postprocess_nodes(given,
                                                                                                  query_str=QUESTION)
    passages = [Passage(n.node.text, source=n.node.metadata["file_name"]) for n in given]
    prompt = Pipeline(tiny_lm, stages=[GemFilter(30)]).compress(QUESTION, passages)
    assert {n.node.node_id: n.node.text for n in out} == {f"n{i}": prompt.kept_text(i) for i in prompt.passages_kept()}
    assert 0 < len(out) < len(given)
    for item in out:
        index = int(item.node.node_id[1:])
        assert item.node.metadata["ctxopt_tokens_out"] == int((prompt.passage_index == index).sum())


def test_bad_construction_and_calls_are_errors(tiny_lm):
    with pytest.raises(ValidationError, match="budjet"):
        CtxoptNodePostprocessor(model=tiny_lm, method="rag", budjet=40)
    with pytest.raises(ValueError, match="do not act on text"):
        CtxoptNodePostprocessor(model=tiny_lm, method="snapkv", budget=40)
    post = CtxoptNodePostprocessor(model=tiny_lm, method="truncate", budget=60)
    with pytest.raises(InputError, match="query"):
        post.postprocess_nodes(nodes())
    assert post.postprocess_nodes([], query_str=QUESTION) == []
