"""``python -m ctxopt.server [options]``: the same as ``ctxopt serve [options]``."""
import sys

from .cli import main

sys.exit(main())
