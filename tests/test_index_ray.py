"""Index builds on a local Ray cluster (2 CPUs, 2 worker actors): equal to the single-process build of the same
corpus, resumed after an interrupted driver, --add equal to a full rebuild, and complete with every passage exactly
once after a worker process is killed mid-build. Same tiny models as tests/test_index_jobs.py."""
from __future__ import annotations

import os
import shutil
import signal

import pytest
from test_index_jobs import CHUNK, assert_same_index, full_spec, write_corpus, write_models

from ctxopt.retrievers import FaissStore
from ctxopt.retrievers.jobs import Parts, index_corpus, parts_folder

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from ctxopt.retrievers.ray_jobs import RayExecutor  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The corpus, the models, the single-process reference index, and a Ray executor on a 2-CPU local cluster."""
    root = tmp_path_factory.mktemp("ray")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    corpus = write_corpus(root / "docs")
    spec = full_spec(*write_models(root))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor(spec, workers=2)
        executor.fingerprint()  # start both actors (they load their models) while the reference builds here
        reference = root / "reference"
        index_corpus(corpus, reference, spec, shard_size=4, progress=False, **CHUNK)
        yield root, corpus, spec, executor, reference
        executor.close()
    finally:
        ray.shutdown()


def worker_processes() -> list[psutil.Process]:
    """The live processes of the ShardWorker actors (Ray titles them ray::ShardWorker...)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if command and command[0].startswith("ray::ShardWorker"):
            found.append(process)
    return found


def test_ray_build_equals_the_single_process_build(setup):
    root, corpus, spec, executor, reference = setup
    report = index_corpus(corpus, root / "ray", executor=executor, shard_size=4, progress=False, **CHUNK)
    assert report.executor == "ray" and report.workers == 2 and report.computed == report.passages
    assert set(report.step_seconds) == {"embed", "color", "refrag"}
    assert_same_index(root / "ray", reference)
    assert FaissStore.load(root / "ray").info["build"]["executor"] == "ray"


def test_interrupted_driver_resumes_from_the_finished_shards(setup):
    root, corpus, spec, executor, reference = setup
    out = root / "resumed"

    def interrupt(written, computed):
        if written == 3:
            raise KeyboardInterrupt  # Ctrl-C in the driver

    with pytest.raises(KeyboardInterrupt):
        index_corpus(corpus, out, executor=executor, shard_size=4, progress=False, on_part=interrupt, **CHUNK)
    assert not out.exists() and len(Parts(parts_folder(out)).names()) == 3
    report = index_corpus(corpus, out, executor=executor, shard_size=4, progress=False, **CHUNK)
    assert report.from_parts == 12 and report.computed == report.passages - 12
    assert not parts_folder(out).exists()
    assert_same_index(out, reference)


def test_add_on_ray_equals_a_full_rebuild(setup):
    root, corpus, spec, executor, reference = setup
    changed = root / "changed"
    shutil.copytree(corpus, changed)
    (changed / "doc3.txt").unlink()
    (changed / "doc0.txt").write_text((changed / "doc0.txt").read_text() + "\nThe cart was red.\n")
    shutil.copytree(reference, root / "added")
    added = index_corpus(changed, root / "added", executor=executor, add=True, shard_size=4, progress=False, **CHUNK)
    full = index_corpus(changed, root / "full", spec, shard_size=4, progress=False, **CHUNK)
    assert added.from_index > 0 and added.dropped > 0 and 0 < added.computed < full.computed
    assert added.from_index + added.computed == full.passages
    assert_same_index(root / "added", root / "full")


def test_a_killed_worker_is_restarted_and_every_passage_is_indexed_once(setup):
    root, corpus, spec, executor, reference = setup
    killed = []

    def kill_a_worker(written, computed):
        if written == 1:
            victim = worker_processes()[0]
            killed.append(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)

    report = index_corpus(corpus, root / "killed", executor=executor, shard_size=2, progress=False,
                          on_part=kill_a_worker, **CHUNK)
    assert len(killed) == 1 and killed[0] not in [p.pid for p in worker_processes()]
    assert len(worker_processes()) == 2  # the killed actor was restarted
    assert report.computed == report.passages and report.from_parts == 0
    store = FaissStore.load(root / "killed")
    assert len({p.id for p in store.passages}) == len(store) == report.passages
    assert_same_index(root / "killed", reference)
