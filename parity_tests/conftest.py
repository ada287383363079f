"""Shared test settings: hypothesis profiles and the location of the fixtures (parity_tests/fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from mapper.host import CACHE_ENV

# "ci" keeps the whole suite within CI's budget on 2 cores and is derandomized, so a CI run is repeatable;
# "thorough" draws 4x as many examples, randomly, for local hunting:  HYPOTHESIS_PROFILE=thorough pytest
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=50, derandomize=True, **COMMON)
settings.register_profile("thorough", max_examples=200, **COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny GPT-2 checkpoints in every format and the outputs transformers computed from them;
# fixtures/make_fixtures.py regenerates them (fixtures/README.md).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """Per-machine measurements (torch_gpt2.onednn's kernel choice) go to a temporary cache folder, not the user's;
    the commands that tests start as subprocesses inherit it."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous
