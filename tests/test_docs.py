"""docs/adding-a-method.md's example runs as written: a new stage class, registered in one line, built by name
with its options read from the dataclass, and answered through the Pipeline on the packaged model."""
import contextlib
import io
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


@pytest.mark.real_model
def test_the_adding_a_method_example_runs(smollm):
    from ctxopt.errors import InputError
    from ctxopt.methods import METHODS, build_stages

    (block,) = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(GUIDE), "exec"), {"__name__": "adding_a_method"})
        tokens_in, _, tokens_out, *_ = out.getvalue().split()
        assert int(tokens_out) == round(0.5 * int(tokens_in)) < int(tokens_in)
        assert METHODS["keep-last"].options == () and METHODS["keep-last"].needs_budget
        with pytest.raises(InputError, match="'keep-last' has no option 'layr'; it takes none"):
            build_stages("keep-last", 64, layr=3)
    finally:
        METHODS.pop("keep-last", None)
