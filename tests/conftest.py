"""Fixtures: tiny models built in memory, the real default model (loaded once), the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct, fp32; pulled on first use, loaded once per session."""
    import pocketlm

    return pocketlm.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.fail(f"the shared data folder is missing at {path}")
    return path


@pytest.fixture(scope="session")
def golden() -> Path:
    return SHARED / "golden"


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on contended ones; restored afterwards
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that trains)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
