"""ctxopt.checks: the whole-number check every option shares, and --budget parsing."""
import numpy as np
import pytest

from ctxopt.checks import parse_budget, require_int
from ctxopt.decoding import GenerationConfig
from ctxopt.errors import InputError


def test_require_int_accepts_whole_numbers_in_range():
    assert require_int(3, "k") == 3
    assert require_int(0, "first_layer", minimum=0) == 0
    assert require_int(5, "kernel", minimum=1, odd=True) == 5
    assert require_int(11, "layer", minimum=0, maximum=11) == 11
    value = require_int(np.int64(4), "k", minimum=1)
    assert value == 4 and type(value) is int


@pytest.mark.parametrize("value, kwargs, says", [
    (True, {"minimum": 1}, "k must be an int >= 1 (e.g. 1); got True."),
    (False, {}, "k must be an int (e.g. 1); got False."),
    (0, {"minimum": 1}, "k must be an int >= 1 (e.g. 1); got 0."),
    (2.5, {"minimum": 1}, "k must be an int >= 1 (e.g. 2); got 2.5."),
    ("4", {"minimum": 1}, "k must be an int >= 1 (e.g. 1); got '4'."),
    (None, {"minimum": 0}, "k must be an int >= 0 (e.g. 0); got None."),
    (4, {"minimum": 1, "odd": True}, "k must be an odd int >= 1 (e.g. 5); got 4."),
    (12, {"minimum": 0, "maximum": 11}, "k must be an int in 0..11 (e.g. 11); got 12."),
    (12, {"minimum": 1, "maximum": 12, "odd": True}, "k must be an odd int in 1..12 (e.g. 11); got 12."),
    (-3, {"maximum": -1, "odd": True}, None),  # -3 is odd (Python: -3 % 2 == 1), so this one passes
    (float("nan"), {"minimum": 1}, "k must be an int >= 1 (e.g. 1); got nan."),
    (5, {"minimum": 4, "maximum": 4, "odd": True}, "k must be an odd int in 4..4; got 5."),  # nothing fits
])
def test_require_int_says_what_to_pass(value, kwargs, says):
    if says is None:
        assert require_int(value, "k", **kwargs) == value
        return
    with pytest.raises(InputError) as error:
        require_int(value, "k", **kwargs)
    assert str(error.value) == says and "\n" not in says


def test_callers_reject_bools_and_fractions(tiny_tokenizer):
    from ctxopt.retrievers.chunking import chunk_text

    for bad in (True, 2.5):
        with pytest.raises(InputError, match="max_new_tokens must be an int >= 1"):
            GenerationConfig(max_new_tokens=bad)
        with pytest.raises(InputError, match="chunk_tokens must be an int >= 1"):
            chunk_text("some text here", tiny_tokenizer, chunk_tokens=bad, overlap=0)
    with pytest.raises(InputError, match="overlap must be an int >= 0"):
        chunk_text("some text here", tiny_tokenizer, chunk_tokens=20, overlap=-1)
    assert GenerationConfig(max_new_tokens=np.int32(3)).max_new_tokens == 3


def test_parse_budget_is_shared_by_both_command_lines():
    import ctxopt.bench.cli
    import ctxopt.cli

    assert ctxopt.cli.parse_budget is parse_budget is ctxopt.bench.cli.parse_budget
    assert parse_budget("512") == 512 and parse_budget("0.25") == 0.25 and parse_budget(None) is None
    with pytest.raises(InputError, match="--budget must be"):
        parse_budget("lots")
