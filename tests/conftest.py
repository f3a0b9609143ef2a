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
