"""The tests keep out of the user's cache: conftest points $CTXOPT_CACHE at a test-owned folder, kept between runs,
and the packaged model is converted there."""
import os
from pathlib import Path

import pytest
from conftest import TEST_CACHE

from ctxopt.models import cache_dir, registry_path


def test_the_cache_is_the_tests_own():
    assert cache_dir() == TEST_CACHE == Path(os.environ["CTXOPT_CACHE"])
    assert TEST_CACHE != Path("~/.cache/ctxopt").expanduser()


@pytest.mark.real_model
def test_the_packaged_model_is_converted_into_the_test_cache(smollm):
    folder = registry_path("smollm2-135m", progress=False)  # what the engine fixture serves
    assert folder == TEST_CACHE / "models" / "smollm2-135m" and (folder / "model.safetensors").is_file()
