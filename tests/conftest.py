"""Shared test setup: offline hubs, the ../shared reference folder, a per-test workspace."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may reach a hub from a test (STACK.md §13).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ACETURBO_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test (with the reason) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (../shared is only beside a developer checkout)")
    return path


@pytest.fixture
def golden():
    """The tiny reference checkpoint folder ../shared/golden/acestep_tiny."""
    return shared_path("golden", "acestep_tiny")


@pytest.fixture
def spec():
    return shared_path("spec")


def pytest_collection_modifyitems(config, items):
    """A test marked ``cuda`` (pyproject's markers) needs a CUDA device and skips without one, saying
    so. The marker is what scripts/gpu_check.sh selects (``-m cuda``) and requires to run: a name
    match would also pick tests that are about CUDA but skip where it exists."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch  # only when a CUDA test is collected

    if torch.cuda.is_available():
        return
    for item in marked:
        why = " ".join(map(str, item.get_closest_marker("cuda").args))
        item.add_marker(pytest.mark.skip(reason=f"needs a CUDA device ({why})" if why else "needs a CUDA device"))
