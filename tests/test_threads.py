"""The CPU thread count: a pure choice from the usable cores, the load and the environment, applied once per
process at model load (checked in a fresh process, where nothing has set it yet)."""
import os
import subprocess
import sys

import pytest

from ctxopt.errors import InputError
from ctxopt.models.policy import choose_threads, usable_cores


@pytest.mark.parametrize(
    "cores, load, env, threads",
    [
        (8, 0.2, {}, 8),  # a quiet machine: every usable core
        (8, 5.6, {}, 2),  # six cores busy elsewhere: the two left
        (2, 9.7, {}, 1),  # oversubscribed: one thread, never zero
        (16, 2.5, {}, 14),  # round half to even: 2.5 busy cores count as 2
        (4, None, {}, 4),  # no load average on this platform: counted as idle
        (8, 3.0, {"OMP_NUM_THREADS": "3"}, 3),
        (8, 7.0, {"OMP_NUM_THREADS": "6"}, 6),  # an explicit setting wins over the load
        (8, 0.0, {"CTXOPT_THREADS": "2", "OMP_NUM_THREADS": "6"}, 2),  # ctxopt's own setting wins over OpenMP's
        (8, 0.0, {"CTXOPT_THREADS": "0"}, None),  # 0: leave torch's setting alone
        (8, 0.0, {"OMP_NUM_THREADS": "4,2"}, None),  # an OpenMP list is left to torch
        (8, 1.0, {"CTXOPT_THREADS": " ", "OMP_NUM_THREADS": ""}, 7),  # blank is unset
    ],
)
def test_choose_threads(cores, load, env, threads):
    chosen, why = choose_threads(cores, load, env)
    assert chosen == threads
    assert ("CTXOPT_THREADS" in why) if env.get("CTXOPT_THREADS", "").strip() else why


@pytest.mark.parametrize("value", ["many", "-1", "1.5"])
def test_a_bad_ctxopt_threads_is_an_error(value):
    with pytest.raises(InputError, match="CTXOPT_THREADS"):
        choose_threads(4, 0.0, {"CTXOPT_THREADS": value})


def test_usable_cores_is_within_the_machine():
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def run_fresh(env_changes: dict) -> subprocess.CompletedProcess:
    """A fresh process that loads a (missing) model, which sets the threads first, then prints torch's count."""
    env = {k: v for k, v in os.environ.items() if k not in ("CTXOPT_THREADS", "OMP_NUM_THREADS")}
    code = ("import torch\nfrom ctxopt.models import load_model\ntry:\n    load_model('/nonexistent/model')\n"
            "except Exception:\n    pass\nprint(torch.get_num_threads())")
    return subprocess.run([sys.executable, "-c", code], env={**env, **env_changes}, capture_output=True, text=True,
                          timeout=300, check=True)


def test_model_load_sets_the_threads_once_and_says_so():
    done = run_fresh({"CTXOPT_THREADS": "3"})  # odd, so unlikely to be the count torch picks by itself
    assert done.stdout.split()[-1] == "3"
    assert "ctxopt: 3 CPU threads ($CTXOPT_THREADS=3)" in done.stderr
