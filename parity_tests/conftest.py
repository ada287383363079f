"""Shared test settings: hypothesis profiles and the location of the fixtures (parity_tests/fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# No test reaches the internet. huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported (by the test
# modules, after this file); OpenAI's route of mapper.download goes to a closed local port. The download tests
# give their own in-process 127.0.0.1 servers explicitly (and subprocesses their own environment).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GPT2_OPENAI_BASE_URL"] = "http://127.0.0.1:9"

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
def _private_download_cache(tmp_path_factory: pytest.TempPathFactory):
    """Whatever a test would download, and every per-machine measurement (torch_gpt2.onednn's kernel choice), lands
    in a temporary folder, never the user's cache; the commands tests start as subprocesses inherit it."""
    saved = os.environ.get("GPT2_CACHE")
    os.environ["GPT2_CACHE"] = str(tmp_path_factory.mktemp("gpt2-cache"))
    yield
    if saved is None:
        os.environ.pop("GPT2_CACHE", None)
    else:
        os.environ["GPT2_CACHE"] = saved
