"""Training recipes behind ``ctxopt train``: one module per method, each adding its own subcommands.

A module listed in ``TRAINING_MODULES`` exposes ``add_train_parsers(subparsers)``; it must import only
argparse-level code at module import (torch and peft are imported inside the command handlers), so that
``ctxopt --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib

TRAINING_MODULES: tuple[str, ...] = ("ctxopt.training.refrag", "ctxopt.training.color")


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``ctxopt train <recipe>`` with one subcommand per recipe of every training module."""
    train = commands.add_parser("train", help="train a method's components (see `ctxopt train -h`)")
    recipes = train.add_subparsers(dest="recipe", required=True,
                                  help="what to train; `ctxopt train RECIPE -h` lists its options")
    for module in TRAINING_MODULES:
        importlib.import_module(module).add_train_parsers(recipes)
