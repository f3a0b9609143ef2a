"""generated/ is exactly what the engine produces: fresh, deterministic, formatted, NumPy-only."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import GENERATED, ROOT

from symdl import registry
from symdl.codegen import is_hand_edited

ENTRIES = registry.entries()
NAMES = list(ENTRIES)
REGENERATE = "symdl generate  (or: python -m symdl generate)"


@pytest.mark.parametrize("name", NAMES)
def test_generated_file_is_fresh(name):
    path = GENERATED / f"{name}.py"
    assert path.exists(), f"{path} is missing; regenerate with: {REGENERATE}"
    current = path.read_text(encoding="utf-8")
    expected = registry.source(ENTRIES[name])
    if current != expected:
        diff = "".join(
            difflib.unified_diff(
                current.splitlines(True), expected.splitlines(True), str(path), "engine output"
            )
        )
        pytest.fail(f"{path} is stale; regenerate with: {REGENERATE}\n{diff[:4000]}")
    assert not is_hand_edited(current)


def test_no_stray_generated_files():
    files = {p.stem for p in GENERATED.glob("*.py")}
    assert files == set(NAMES)


def test_generate_check_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "symdl", "generate", "--check", "-o", str(GENERATED)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deterministic_across_hash_seeds(tmp_path):
    """Two processes with different PYTHONHASHSEED produce byte-identical modules."""
    outs = []
    for seed in ("1", "4242"):
        out = tmp_path / f"seed{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run(
            [sys.executable, "-m", "symdl", "generate", "--no-cache", "-o", str(out)],
            check=True,
            capture_output=True,
            env=env,
            cwd=ROOT,
        )
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.py"))})
    assert outs[0].keys() == outs[1].keys() == {f"{n}.py" for n in NAMES}
    differing = [n for n in outs[0] if outs[0][n] != outs[1][n]]
    assert not differing, f"output depends on hash order: {differing}"
    committed = {p.name: p.read_bytes() for p in GENERATED.glob("*.py")}
    assert outs[0] == committed


def test_generated_code_is_ruff_formatted():
    from symdl.codegen import _ruff

    proc = subprocess.run(
        [_ruff(), "format", "--check", "--isolated", "--line-length", "99", str(GENERATED)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_modules_import_with_numpy_alone(tmp_path):
    """Each module runs in a process where symdl, sympy, jinja2 and torch cannot be imported.

    Inputs are made here (with the layer's own test domains) and passed through .npz files."""
    import json

    import numpy as np
    from conftest import load_generated

    from symdl.testing import random_inputs

    rng = np.random.default_rng(0)
    for name, entry in ENTRIES.items():
        if entry.kind == "optimizer":  # (no forward and backward to run)
            continue
        layer = entry.definition
        args, kwargs = random_inputs(load_generated(name), rng, layer.checks)
        arrays = {f"arg{k}": a for k, a in enumerate(args)}
        arrays.update({k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)})
        np.savez(tmp_path / f"{name}.npz", **arrays)
        hyper = {k: v for k, v in kwargs.items() if not isinstance(v, np.ndarray)}
        (tmp_path / f"{name}.json").write_text(json.dumps(hyper))
    script = textwrap.dedent(
        f"""
        import importlib.abc, importlib.util, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"symdl", "sympy", "jinja2", "torch", "scipy"}}:
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        import numpy as np
        from pathlib import Path
        ok = 0
        for path in sorted(Path({str(GENERATED)!r}).glob("*.py")):
            spec = importlib.util.spec_from_file_location(path.stem, path)
            m = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(m)
            if hasattr(m, "STATE"):  # an optimizer
                p = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
                state = m.init_state(p)
                kw = {{"lr": 0.1, **{{k: 0.9 for k, v in m.HYPERPARAMETERS.items() if v is None}}}}
                out = m.step(p, 0.1 * p, *state, **kw)
                assert out[0].shape == p.shape
                ok += 1
                continue
            data = np.load(Path.cwd() / (path.stem + ".npz"))
            args = [data[f"arg{{k}}"] for k in range(len(m.ARGS))]
            kw = {{c: data[c] for c in m.CONSTS}}
            kw.update(json.loads((Path.cwd() / (path.stem + ".json")).read_text()))
            out, cache = m.forward(*args, **kw)
            douts = tuple(np.ones_like(o) for o in out) if isinstance(out, tuple) else np.ones_like(out)
            grads = m.backward(douts, cache)
            assert len(grads) == len(m.ARGS)
            assert all(g.shape == a.shape for g, a in zip(grads, args))
            assert "symdl" not in sys.modules and "sympy" not in sys.modules
            ok += 1
        print(ok)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == len(NAMES)
