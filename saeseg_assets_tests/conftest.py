"""Shared test fixtures: tiny data made per test, and the path of the real ADE20K sample."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "ade20k_sample"


@pytest.fixture
def ade20k_sample() -> Path:
    if not (SHARED_SAMPLE / "ADEChallengeData2016").is_dir():
        pytest.skip(f"the real ADE20K sample is not beside the repository ({SHARED_SAMPLE})")
    return SHARED_SAMPLE
