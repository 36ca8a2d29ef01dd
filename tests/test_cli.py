"""The ctxopt command: bad input gives a clear error and exit code 2; every option says what it does; the demo
answers its questions."""
import argparse
import json

import pytest

from ctxopt import __version__
from ctxopt.cli import build_parser, main, parse_budget


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_budget_parsing():
    assert parse_budget("512") == 512 and parse_budget("0.25") == 0.25 and parse_budget(None) is None
    with pytest.raises(Exception, match="token count"):
        parse_budget("lots")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "Where?", "--corpus", "/nonexistent/folder"], "does not exist"),
        (["ask", "Where?", "--file", "/nonexistent/file.txt"], "does not exist"),
        (["ask", "Where?", "--index", "/nonexistent/index"], "index"),
        (["ask", "Where?", "--file", "pyproject.toml", "--method", "nosuch"], "Unknown method"),
        (["ask", "Where?", "--file", "pyproject.toml", "--method", "truncate"], "needs a budget"),
        (["ask", "Where?", "--file", "pyproject.toml", "--model", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_input_exits_with_a_clear_error(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message.lower() in err.lower()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ctxopt {__version__}"


# The subcommands whose parsers live in ctxopt/cli.py besides `index`; index, train and bench are checked by
# their owners' tests.
CHECKED_COMMANDS = ("ask", "demo", "methods", "index", "train", "bench")  # and each one's subcommands


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def test_every_option_and_positional_has_help():
    parser = build_parser()
    commands = subparsers(parser)
    assert set(CHECKED_COMMANDS) <= set(commands)
    checked = [("ctxopt", parser)] + [(c, commands[c]) for c in CHECKED_COMMANDS]
    for name, command in checked:
        if command is not parser:
            checked += [(f"{name} {sub}", p) for sub, p in subparsers(command).items()]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"ctxopt {name}: {'/'.join(action.option_strings) or action.dest} has no help"
    names = {name for name, _ in checked}
    assert {"train color", "train color-data", "train refrag", "bench report", "bench dump-samples"} <= names
    assert {a.dest for a in commands["ask"]._actions} >= {"question", "max_new_tokens", "budget", "method"}


def test_a_broken_index_names_the_command_that_rebuilds_it(tmp_path, capsys):
    broken = tmp_path / "docs.index"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    for folder in (broken, tmp_path / "missing.index"):
        code, _, err = run(capsys, "ask", "Where?", "--index", str(folder))
        assert code == 2 and f"`ctxopt index DOCS_FOLDER --out {folder}`" in err


def test_empty_corpus_folder(tmp_path, capsys):
    code, _, err = run(capsys, "index", str(tmp_path), "--out", str(tmp_path / "idx"))
    assert code == 2 and "no" in err.lower()
    assert not (tmp_path / "idx").exists()


def test_methods_lists_the_registry(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "full" in out and "truncate" in out and "rag" in out


@pytest.mark.real_model
def test_index_then_ask_and_demo(tmp_path, capsys, smollm):
    from importlib import resources

    corpus = resources.files("ctxopt") / "data" / "demo" / "corpus"
    code, out, _ = run(capsys, "index", str(corpus), "--out", str(tmp_path / "idx"))
    assert code == 0 and "indexed" in out
    code, out, _ = run(capsys, "ask", "What is the vault code of the Harbour Museum?", "--index", str(tmp_path / "idx"),
                       "-k", "2", "--max-new-tokens", "24", "--json")
    result = json.loads(out)
    assert code == 0 and "4817" in result["answer"]
    assert result["sources"][0]["source"] == "harbour_museum.md"
    assert [s["stage"] for s in result["stats"]["stages"]] == ["retrieve", "prompt", "prefill", "decode"]
    code, out, _ = run(capsys, "demo", "--model", "smollm2-135m")
    assert code == 0, out
    assert "3/3 correct" in out


def test_refrag_over_an_index_with_chunk_embeddings_reads_them(tmp_path):
    import argparse

    from ctxopt.cli import _method_options
    from ctxopt.compressors.refrag.cache import CACHE_FILE

    def args(method, option=()):
        return argparse.Namespace(method=method, draft=None, option=list(option), index=str(tmp_path))

    assert _method_options(args("refrag")) == {}  # no chunk embeddings in the index: computed per question
    (tmp_path / CACHE_FILE).write_bytes(b"")
    assert _method_options(args("refrag")) == {"cache": str(tmp_path)}
    assert _method_options(args("extractive+refrag")) == {"cache": str(tmp_path)}
    assert _method_options(args("refrag", ["cache=other"])) == {"cache": "other"}
    assert _method_options(args("full")) == {}
