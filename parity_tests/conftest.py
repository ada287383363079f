"""Shared test settings: hypothesis profiles and the location of ../shared (offline assets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite within CI's budget on 2 cores and is derandomized, so a CI run is repeatable;
# "thorough" draws 4x as many examples, randomly, for local hunting:  HYPOTHESIS_PROFILE=thorough pytest
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=50, derandomize=True, **COMMON)
settings.register_profile("thorough", max_examples=200, **COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = Path(os.environ.get("GPT2_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"offline assets not found at {SHARED}; set GPT2_SHARED_DIR to the shared/ folder")
    return SHARED
