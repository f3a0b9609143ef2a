"""Shared fixtures: seeded RNG, loading generated modules from files or text."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "generated"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_generated(name: str):
    """Import generated/NAME.py by path (a fresh module object each call)."""
    path = GENERATED / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"generated_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


#: Engine bugs found by tests/test_hypothesis.py and not fixed yet (issue "Reliability"). Each is
#: a strict xfail: the day the engine is fixed, the test passes, pytest reports XPASS as a
#: failure, and the entry must be removed.
KNOWN_FAILURES: dict[str, str] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = KNOWN_FAILURES.get(item.name)
        if reason and item.module.__name__.endswith("test_hypothesis"):
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
