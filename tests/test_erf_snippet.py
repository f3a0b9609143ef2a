"""Tests for the embeddable NumPy-only erf snippet (symdl/snippets/erf.py)."""

import ast
import builtins
import contextlib
import importlib.util
import inspect
import math
import symtable
import warnings
from pathlib import Path

import numpy as np
import pytest

# Load the snippet by path so the test does not depend on the ``symdl``
# package (or its __init__) being importable.
_SNIPPET = Path(__file__).resolve().parents[1] / "symdl" / "snippets" / "erf.py"
_spec = importlib.util.spec_from_file_location("_symdl_snippet_erf", _SNIPPET)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_erf = _module._erf

BOUNDARIES = (0.84375, 1.25, 2.857142857142857, 2.8571434020996094, 6.0)
SPECIAL = (0.0, 1e-300, 5e-324, 2.2250738585072014e-308, 1e-310, 1e-10,
           2.0**-28, 1e3, 1e30, math.inf, math.nan)


@contextlib.contextmanager
def _strict():
    """Turn every warning into an error and make NumPy raise on overflow,
    invalid and divide.  (Underflow stays ignored, NumPy's default: erf of a
    subnormal input is subnormal and inexact, so it legitimately underflows.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            yield


def _points_float64():
    rng = np.random.default_rng(12345)
    pts = [rng.uniform(-7.0, 7.0, 200_000)]
    near = []
    for b in BOUNDARIES:
        near.append(b)
        lo = hi = b
        for _ in range(4):  # a few ulps either side
            lo = np.nextafter(lo, -np.inf)
            hi = np.nextafter(hi, np.inf)
            near += [lo, hi]
        near += list(b + np.linspace(-1e-6, 1e-6, 101))
    near += list(SPECIAL)
    near = np.array(near, dtype=np.float64)
    pts += [near, -near]
    return np.concatenate(pts)


def _reference(x):
    return np.array([math.erf(float(v)) for v in x], dtype=np.float64)


def test_float64_accuracy_vs_math_erf():
    x = _points_float64()
    with _strict():
        y = _erf(x)
    assert y.dtype == np.float64 and y.shape == x.shape
    ref = _reference(x)

    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(y), nan)
    y, ref = y[~nan], ref[~nan]
    # Signs, including erf(-0.0) = -0.0, must match exactly.
    assert np.array_equal(np.signbit(y), np.signbit(ref))

    # Tolerance: both fdlibm and math.erf are < 1 ulp from the true value,
    # so they may differ by up to 2 ulp; we require <= 2 ulp everywhere
    # (including subnormal results) and relative error <= 4e-16 wherever the
    # result is a normal float.
    diff = np.abs(y - ref)
    ulps = diff / np.spacing(np.abs(ref))
    assert ulps.max() <= 2.0, f"max ulp error {ulps.max()}"
    normal = np.abs(ref) >= np.finfo(np.float64).tiny
    rel = diff[normal] / np.abs(ref[normal])
    assert rel.max() <= 4e-16, f"max relative error {rel.max():.3e}"


def test_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6.0, -6.0, 1e30, -1e300])
    with _strict():
        y = _erf(x)
    np.testing.assert_array_equal(y, [0.0, -0.0, 1.0, -1.0, np.nan, 1.0, -1.0, 1.0, -1.0])
    assert np.signbit(y[1]) and not np.signbit(y[0])
    assert _erf(np.float64(5e-324)) == math.erf(5e-324)


def test_float32_accuracy():
    rng = np.random.default_rng(7)
    x = np.concatenate([
        rng.uniform(-7.0, 7.0, 200_000),
        np.array(BOUNDARIES + SPECIAL[:-1]),
        -np.array(BOUNDARIES + SPECIAL[:-1]),
        [np.float32(1e-45), np.float32(3e38), np.float32(-3e38)],
    ]).astype(np.float32)
    with _strict():
        y = _erf(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    ref = _reference(x)  # math.erf of the (exactly representable) float32 inputs
    # Tolerance: max absolute error <= 2e-7 (~2 float32 ulps at 1).
    assert np.max(np.abs(y.astype(np.float64) - ref)) <= 2e-7
    with _strict():
        y_nan = _erf(np.array([np.nan, -np.inf], dtype=np.float32))
    assert y_nan.dtype == np.float32
    assert np.isnan(y_nan[0]) and y_nan[1] == -1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (3, 4, 5), (2, 0, 3)])
def test_dtype_and_shape_preserved(dtype, shape):
    rng = np.random.default_rng(0)
    x = rng.uniform(-4.0, 4.0, shape).astype(dtype)
    with _strict():
        y = _erf(x)
    assert isinstance(y, np.ndarray)
    assert y.dtype == dtype
    assert y.shape == shape
    if x.size:
        ref = _reference(x.ravel().astype(np.float64)).reshape(shape)
        np.testing.assert_allclose(y, ref.astype(dtype), rtol=0, atol=2 * np.finfo(dtype).eps)


def test_non_float_and_noncontiguous_input():
    with _strict():
        assert _erf(np.arange(-3, 4)).dtype == np.float64
        assert _erf(1.0).shape == ()
        x = np.linspace(-5, 5, 60).reshape(6, 10)
        np.testing.assert_array_equal(_erf(x.T), _erf(x).T)
        np.testing.assert_array_equal(_erf(x[:, ::3]), _erf(x)[:, ::3])
    assert _erf(np.array(True)).dtype == np.float64


def test_large_input_spans_several_blocks():
    # Larger than the internal block size, with an uneven tail.
    rng = np.random.default_rng(3)
    x = rng.uniform(-7.0, 7.0, 3 * 65536 + 123)
    with _strict():
        y = _erf(x)
    idx = rng.integers(0, x.size, 5000)
    ref = _reference(x[idx])
    assert np.max(np.abs(y[idx] - ref) / np.spacing(np.abs(ref))) <= 2.0
    np.testing.assert_array_equal(y[-123:], _erf(x[-123:]))


def test_module_layout():
    tree = ast.parse(_SNIPPET.read_text())
    # Exactly `import numpy as np` followed by the single function.
    assert len(tree.body) == 2
    imp, func = tree.body
    assert isinstance(imp, ast.Import)
    assert [(a.name, a.asname) for a in imp.names] == [("numpy", "np")]
    assert isinstance(func, ast.FunctionDef) and func.name == "_erf"


def test_source_references_only_np():
    source = inspect.getsource(_erf)
    assert source.startswith("def _erf(x, scale=1.0):")

    # Every free (global) name of _erf and its nested functions must be `np`
    # or a builtin: then the function source can be embedded on its own.
    table = symtable.symtable(source, "<erf snippet>", "exec")
    free_globals = set()
    stack = list(table.get_children())
    while stack:
        t = stack.pop()
        stack.extend(t.get_children())
        if t.get_type() == "function":
            free_globals.update(t.get_globals())
    non_builtin = {n for n in free_globals if not hasattr(builtins, n)}
    assert non_builtin == {"np"}, non_builtin

    # Cross-check with ast: every loaded Name is np, a builtin or bound in
    # the function (parameter, assignment, nested def, loop target).
    tree = ast.parse(source)
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.FunctionDef):
            bound.add(node.name)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    unknown = {n for n in loaded - bound if not hasattr(builtins, n)}
    assert unknown == {"np"}, unknown

    # And it actually runs when exec'd alone with only `np` in scope.
    namespace = {"np": np}
    exec(compile(source, "<erf snippet>", "exec"), namespace)
    x = np.linspace(-7, 7, 1001)
    np.testing.assert_array_equal(namespace["_erf"](x), _erf(x))
