"""Shared test fixtures: where the real ISBI data lives, and a clear skip where it does not."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ISBI_DIR = ROOT.parent / "shared" / "data" / "isbi2012"


@pytest.fixture
def isbi_dir() -> Path:
    if not (ISBI_DIR / "train-volume.tif").is_file():
        pytest.skip(f"ISBI 2012 data not found at {ISBI_DIR}")
    return ISBI_DIR
