"""Running the gateway under uvicorn: in the foreground (``serve``, what ``ctxopt serve`` calls: SIGTERM and
Ctrl-C stop taking connections, let the requests in flight finish for up to ``drain_seconds``, then exit) or on a
background thread (``BackgroundServer``, for tests and load runs in one process)."""
from __future__ import annotations

import signal
import socket
import threading
import time

from .app import create_app
from .gateway import ServeConfig


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve until SIGTERM or SIGINT; uvicorn then drains the requests in flight (``config.drain_seconds`` at
    most) before the app shuts down."""
    import uvicorn

    app = create_app(config)
    uvicorn_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=config.drain_seconds,
    )
    server = uvicorn.Server(uvicorn_config)
    # uvicorn drains on SIGTERM, then raises the signal again with the handler it found: with this one the
    # process then exits normally (status 0) instead of being killed by the signal.
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _drained(signum, frame) -> None:
    """SIGTERM once uvicorn has drained the requests in flight: nothing left to do."""


class BackgroundServer:
    """``app`` served by uvicorn on a daemon thread, on ``host`` and a free port (or ``port``).

    >>> with BackgroundServer(create_app(model=lm)) as server:   # doctest: +SKIP
    ...     server.base_url                                         # "http://127.0.0.1:PORT"
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_seconds: float = 5.0):
        import uvicorn

        self.app = app
        self.host = host
        # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on accepted sockets whose protocol says TCP,
        # and without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=drain_seconds)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name=f"ctxopt-gateway-{self.port}", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the gateway did not start on {self.base_url} within {timeout:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
