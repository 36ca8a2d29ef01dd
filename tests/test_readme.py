"""The README's Python snippets run as written (on the packaged model), so the front door stays true."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    """The README's Python blocks that run on their own (the gateway's client example needs a running server;
    tests/test_server.py drives the same client calls against a live gateway)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [block for block in blocks if "base_url=" not in block]


def test_readme_has_the_quick_starts():
    blocks = python_blocks()
    assert len(blocks) == 2
    assert "Pipeline(" in blocks[0] and "CtxoptChatModel(" in blocks[1]


@pytest.mark.real_model
def test_readme_python_snippets_run(smollm):
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in python_blocks():  # the LangChain block reuses the first block's `store`
            exec(compile(block, str(README), "exec"), namespace)
    printed = out.getvalue()
    assert "4817" in printed
    assert "harbour_museum.md" in printed
    assert "prefill" in printed and "decode" in printed  # the Stats summary line
