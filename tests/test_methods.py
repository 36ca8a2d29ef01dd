"""The method registry: each method's options are exactly what its factory takes; a misspelt option, an option
no method of a run takes, or a draft for a method without one is an error, never silently dropped."""
import argparse
import dataclasses
import importlib
import inspect

import pytest

from ctxopt.bench.runner import _method_options, check_options
from ctxopt.cli import _method_options as cli_method_options
from ctxopt.compressors.gemfilter import GemFilter
from ctxopt.compressors.speckv import SpecKV
from ctxopt.compressors.specpc import SpecPC
from ctxopt.errors import InputError
from ctxopt.methods import METHODS, build_stages, parse_options
from ctxopt.stages import Truncate


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_options_are_the_factory_parameters(name):
    spec = METHODS[name]
    if spec.target is None:
        assert spec.options == () and not spec.takes_budget
        return
    module, _, attribute = spec.target.partition(":")
    target = getattr(importlib.import_module(module), attribute)
    parameters = list(inspect.signature(target).parameters)
    if dataclasses.is_dataclass(target):  # fields for Python callers only are not options
        fields = [f.name for f in dataclasses.fields(target) if f.init and f.metadata.get("option") is not False]
        parameters = [p for p in parameters if p in fields]
    assert ("budget" in parameters) == spec.takes_budget, f"{name}: takes a budget but its stage has none"
    parameters.remove("budget") if "budget" in parameters else None
    assert set(parameters) == set(spec.options), f"{name}: spec options and factory parameters differ"


def test_an_option_the_method_does_not_take_is_an_error():
    with pytest.raises(InputError, match=r"'gemfilter' has no option 'layr'; it takes: layer, kernel, keep_question"):
        build_stages("gemfilter", 64, layr=3)
    with pytest.raises(InputError, match="'truncate' has no option 'window'; it takes none"):
        build_stages("truncate", 64, window=8)


def test_a_composed_method_hands_each_part_only_its_options():
    stages = build_stages("truncate+gemfilter", 64, layer=3)
    assert isinstance(stages[0], Truncate) and stages[0].budget == 64 and stages[1] == GemFilter(budget=64, layer=3)
    with pytest.raises(InputError, match="no option 'nope'"):
        build_stages("truncate+gemfilter", 64, nope=1)


def test_bench_passes_each_method_its_options_and_rejects_an_option_none_takes():
    options = {"layer": 3, "window": 16}
    check_options(["gemfilter", "snapkv"], options)
    assert _method_options("gemfilter", options, None) == {"layer": 3}
    assert _method_options("snapkv", options, None) == {"window": 16}
    assert _method_options("full", options, None) == {}
    with pytest.raises(InputError, match="No method of truncate, snapkv takes the option 'layer'"):
        check_options(["truncate", "snapkv"], options)
    draft = object()
    assert _method_options("rapid", {}, draft) == {"draft": draft}  # one option name for every draft
    assert _method_options("speckv", {}, draft) == {"draft": draft}


def test_option_values_read_as_json_else_kept_as_text():
    assert parse_options(["layer=12", "keep_question=true", "draft=tinyllama", "x=none", "ks=[1, 2]", "t=null"]) == {
        "layer": 12, "keep_question": True, "draft": "tinyllama", "x": "none", "ks": [1, 2], "t": None}
    for bad in ("layer", "=3"):
        with pytest.raises(InputError, match="KEY=VALUE"):
            parse_options([bad])


def test_cli_draft_goes_by_the_name_the_method_takes_it_by():
    def args(method, draft="qwen2.5-coder-0.5b"):
        return argparse.Namespace(method=method, draft=draft, option=["gamma=4"] if method == "rapid" else [])

    assert cli_method_options(args("rapid")) == {"gamma": 4, "draft": "qwen2.5-coder-0.5b"}
    assert cli_method_options(args("specpc")) == {"draft": "qwen2.5-coder-0.5b"}
    with pytest.raises(InputError, match="'truncate' takes no draft"):
        cli_method_options(args("truncate"))


def test_speckv_pc_takes_a_token_count_or_a_ratio_and_lookahead_is_a_token_count():
    specpc, speckv = build_stages("speckv-pc", 4096)
    assert specpc.budget == 4096 and speckv.budget == 4096 and specpc.at_least == 2048  # SpecPC keeps >= 2048
    specpc, speckv = build_stages("speckv-pc", 0.25, cross_tokenizer=True)
    assert specpc.budget == speckv.budget == 0.25 and specpc.cross_tokenizer and speckv.cross_tokenizer
    for stage in (SpecPC, SpecKV):
        for bad in (True, 2.5, -1):
            with pytest.raises(InputError, match="lookahead must be a token count"):
                stage(budget=64, lookahead=bad)
