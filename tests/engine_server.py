"""Start and stop a real vLLM OpenAI-compatible server (CPU build) for tests.

The server runs from its own virtualenv, set up by ``scripts/engine.sh`` (default ``.engine-venv`` at the
repository root, or ``$CTXOPT_ENGINE_VENV``), never from ctxopt's: vLLM pins its own torch and transformers.

    from engine_server import engine_python, start_engine

    with start_engine(folder, extra_args=["--enable-prompt-embeds"]) as engine:
        engine.base_url   # "http://127.0.0.1:PORT/v1"
        engine.model      # the served model name

Each engine runs in its own process group, with its output in a log file; ``stop`` ends the whole group
(the API server and its engine-core child). Engines still running when the interpreter exits are stopped too.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_VARIABLE = "CTXOPT_ENGINE_VENV"

# One OpenMP thread, not bound to a core (the machine is shared), and a 2 GiB KV cache. vLLM's CPU worker
# otherwise binds one thread per physical core it may use ("auto") and reserves 4 GiB.
ENGINE_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# The test runner's own environment must not leak into the engine's interpreter.
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


class EngineError(RuntimeError):
    """The engine did not start (or could not be stopped); the message ends with its log tail."""


def engine_venv() -> Path:
    """The engine's virtualenv folder: ``$CTXOPT_ENGINE_VENV`` or ``.engine-venv`` at the repository root."""
    return Path(os.environ.get(VENV_VARIABLE) or REPO / ".engine-venv").expanduser()


def engine_python() -> Path | None:
    """The engine venv's python when vLLM is installed there (checked on disk, not imported), else None."""
    venv = engine_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    if not any(venv.glob("lib/python*/site-packages/vllm/entrypoints/openai/api_server.py")):
        return None
    return python


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return "\n".join(text.splitlines()[-lines:])


class Engine:
    """A running server: ``base_url``, ``model``, ``port``, ``log_path``, ``process``; ``stop()`` ends it."""

    def __init__(self, process: subprocess.Popen, port: int, model: str, log_path: Path):
        self.process = process
        self.port = port
        self.model = model
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.started_s: float | None = None  # seconds from launch to the first good /v1/models

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.process.returncode}"
        return f"Engine({self.model!r} at {self.base_url}, {state}, log {self.log_path})"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL whatever is left of it."""
        _LIVE.discard(self)
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        if not _signal_group(group, signal.SIGTERM):
            self.process.wait()
            return
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        while _group_alive(group) and time.monotonic() < deadline:  # the engine-core child may outlive the leader
            time.sleep(0.2)
        _signal_group(group, signal.SIGKILL)
        self.process.wait()


_LIVE: set[Engine] = set()


@atexit.register
def _stop_all() -> None:
    for engine in list(_LIVE):
        engine.stop(grace=5.0)


def _signal_group(group: int, sig: int) -> bool:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _served_models(base_url: str) -> list[str] | None:
    """The ids /v1/models lists, or None while the server does not answer."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
            body = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None
    return [entry.get("id") for entry in body.get("data", [])]


def start_engine(
    model_folder: str | os.PathLike,
    *,
    served_name: str | None = None,
    port: int | None = None,
    max_model_len: int = 8192,
    extra_args: Iterable[str] = (),
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
) -> Engine:
    """Start vLLM's OpenAI API server on ``model_folder`` and return once /v1/models lists it.

    ``served_name`` defaults to the folder's name, ``port`` to a free one on 127.0.0.1. ``extra_args`` go on
    the command line (e.g. ``--enable-prompt-embeds``); ``env`` is laid over :data:`ENGINE_ENV`. Raises
    :class:`EngineError` with the log tail when the server exits early or is not ready within ``timeout``
    seconds (it is killed then).
    """
    python = engine_python()
    if python is None:
        raise EngineError(f"no vLLM in {engine_venv()}: run scripts/engine.sh first")
    folder = Path(model_folder).resolve()
    served_name = served_name or folder.name
    port = port or free_port()
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix=f"ctxopt-engine-{port}-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path)

    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(folder),
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--dtype", "bfloat16",
        *extra_args,
    ]
    child_env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    child_env.update(ENGINE_ENV)
    child_env.update(env or {})

    launched = time.monotonic()
    with open(log_path, "wb") as log:
        log.write((" ".join(command) + "\n").encode())
        log.flush()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env,
            cwd=str(folder.parent), start_new_session=True,
        )
    engine = Engine(process, port, served_name, log_path)
    _LIVE.add(engine)

    deadline = launched + timeout
    try:
        while True:
            if process.poll() is not None:
                raise EngineError(
                    f"the engine exited with code {process.returncode} before it was ready "
                    f"(log {log_path}):\n{engine.log_tail()}"
                )
            served = _served_models(engine.base_url)
            if served is not None and served_name in served:
                engine.started_s = time.monotonic() - launched
                return engine
            if time.monotonic() > deadline:
                raise EngineError(
                    f"the engine was not ready after {timeout:.0f} s (log {log_path}):\n{engine.log_tail()}"
                )
            time.sleep(0.5)
    except BaseException:
        engine.stop(grace=5.0)
        raise
