"""Index builds on a Ray cluster: a pool of :class:`~ctxopt.retrievers.jobs.ShardWorker` actors.

Each actor loads the embedder (and the compressor, and the REFRAG adapter) once, then takes shards of
passages; the driver keeps ``queue_depth`` shards queued per actor, gathers the results as they finish, and
writes each one to the build's parts (``jobs.Parts``). Results travel back through Ray's object store, so the
workers need no shared file system: only ctxopt and its models on every node.

Faults: an actor whose process dies is restarted (``MAX_RESTARTS``) and its queued shards are run again on it
(``MAX_TASK_RETRIES``); a shard whose actor is gone for good is handed to another actor, up to
``SHARD_ATTEMPTS`` times. A shard's results are written once, when the driver receives them, and the index is
assembled by passage id, so every passage ends up in it exactly once. An error raised by the worker's own code
(a model that does not load, bad input) is not retried: it stops the build, and is raised in the driver.

Without an address, ``RayExecutor`` starts a local cluster (one CPU per worker) and stops it on ``close``; with
one, it connects to that cluster and leaves it running. A process that already called ``ray.init`` keeps its
connection, and it is left open too.
"""
from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import CorpusError, InputError, ModelLoadError
from .jobs import Shard, ShardResult, ShardWorker, WorkerSpec

MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
SHARD_ATTEMPTS = 3
QUEUE_DEPTH = 2


def require_ray():
    """The ray module, or an InputError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'ctxopt[ray]' (or pip install 'ray[default]')") from None
    return ray


def local_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class RayExecutor:
    """Runs shards on ``workers`` Ray actors (default: one per CPU of the cluster); see the module docs."""

    name = "ray"

    def __init__(
        self, spec: WorkerSpec, workers: int | None = None, address: str | None = None,
        queue_depth: int = QUEUE_DEPTH, cpus_per_worker: float = 1,
    ) -> None:
        ray = require_ray()
        if workers is not None and workers < 1:
            raise InputError(f"--workers must be at least 1; got {workers}")
        self.spec = spec
        self.queue_depth = max(1, queue_depth)
        self._started = False
        self._actors: list[Any] = []
        if not ray.is_initialized():
            if address in (None, "", "local"):
                cpus = max(1, int(workers * cpus_per_worker)) if workers else local_cpus()
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            self._started = True
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))
        self.workers = workers
        actor = ray.remote(num_cpus=cpus_per_worker, max_restarts=MAX_RESTARTS,
                           max_task_retries=MAX_TASK_RETRIES)(ShardWorker)
        self._actors = [actor.remote(spec) for _ in range(workers)]
        self._fingerprint: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The workers' common fingerprint (waits until every actor has loaded its models)."""
        if self._fingerprint is None:
            ray = require_ray()
            from ray.exceptions import RayActorError

            try:
                found = ray.get([actor.fingerprint.remote() for actor in self._actors])
            except RayActorError as error:  # a worker's __init__ raised (a model that does not load, ...)
                raise ModelLoadError(f"a Ray worker could not start: {_last_error_line(error)}") from error
            if any(f != found[0] for f in found):
                raise InputError(f"the Ray workers loaded different models or settings: {found}; install the same "
                                 "ctxopt and models on every node")
            self._fingerprint = found[0]
        return self._fingerprint

    def map(self, shards: Iterable[Shard]) -> Iterator[tuple[Shard, ShardResult]]:
        """Each shard with its result, in the order they finish."""
        ray = require_ray()
        from ray.exceptions import RayActorError

        pending = iter(shards)
        retry: deque[tuple[Shard, int]] = deque()
        in_flight: dict[Any, tuple[int, Shard, int]] = {}
        load = [0] * len(self._actors)
        dead: set[int] = set()
        exhausted = False
        while True:
            while True:
                free = [i for i in range(len(self._actors)) if i not in dead and load[i] < self.queue_depth]
                if not free:
                    break
                if retry:
                    shard, attempt = retry.popleft()
                elif not exhausted:
                    shard, attempt = next(pending, None), 0
                    if shard is None:
                        exhausted = True
                        break
                else:
                    break
                i = min(free, key=load.__getitem__)
                in_flight[self._actors[i].run.remote(shard)] = (i, shard, attempt)
                load[i] += 1
            if not in_flight:
                return
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            i, shard, attempt = in_flight.pop(ref)
            load[i] -= 1
            try:
                result = ray.get(ref)
            except RayActorError as error:
                dead.add(i)
                if attempt + 1 >= SHARD_ATTEMPTS or len(dead) == len(self._actors):
                    raise CorpusError(f"a shard failed {attempt + 1} times as its Ray worker died ({error}); the "
                                      "finished shards are kept, rerun the same command to resume") from error
                retry.append((shard, attempt + 1))
                continue
            yield shard, result

    def close(self) -> None:
        """Stop the actors, and the local cluster if this executor started it."""
        ray = require_ray()
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # an actor already gone
                pass
        self._actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last_error_line(error: Exception) -> str:
    """The ``SomeError: message`` line a remote traceback ends with (the whole text if there is none)."""
    lines = [line.strip() for line in str(error).splitlines()]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return found[-1] if found else str(error)
