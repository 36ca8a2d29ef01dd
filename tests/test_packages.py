"""Data packages are read from an installed copy, or unpacked once from their wheel (never imported)."""
import importlib.util

from ctxopt import packages


def test_installed_package_is_used_in_place():
    folder = packages.package_folder("wonderwords", "wonderwords")
    assert folder == __import__("pathlib").Path(importlib.util.find_spec("wonderwords").submodule_search_locations[0])


def test_missing_package_is_unpacked_from_its_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    folder = packages.package_folder("wonderwords", "wonderwords", progress=False)
    assert folder == tmp_path / "packages" / "wonderwords" / "wonderwords"
    assert (folder / "assets" / "nounlist.txt").stat().st_size > 1000
    # A second call reuses the unpacked copy without downloading again.
    monkeypatch.setattr(packages, "pip_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("downloaded")))
    assert packages.package_folder("wonderwords", "wonderwords") == folder
