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

    # Tolerance: the helper is within 2 ulp of the exact value (checked against
    # mpmath below) and math.erf (the platform's libm) within about 1, so they
    # may differ by up to 3 ulp (including subnormal results), and by a relative
    # 6.7e-16 wherever the result is a normal float.
    diff = np.abs(y - ref)
    ulps = diff / np.spacing(np.abs(ref))
    assert ulps.max() <= 3.0, f"max ulp error {ulps.max()}"
    normal = np.abs(ref) >= np.finfo(np.float64).tiny
    rel = diff[normal] / np.abs(ref[normal])
    assert rel.max() <= 6.7e-16, f"max relative error {rel.max():.3e}"


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


# --------------------------------------------------------------------------- against SciPy and
# mpmath: the whole range, the tails, tiny and subnormal values, signed zeros, nan and inf


def _exact(x):
    """erf of each float64 in ``x``, correctly rounded (mpmath at 40 digits)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        return np.array([float(mpmath.erf(mpmath.mpf(float(v)))) for v in x])


def _wide_points(rng):
    """|x| up to 30: uniform, log-uniform down to 1e-300, subnormals, the points where erf
    reaches 1 in float64 (5.9) and float32 (3.9), and the helper's clamp points 4 and 6."""
    tiny = np.finfo(np.float64).tiny
    x = np.concatenate([
        rng.uniform(0.0, 7.0, 200_000),
        rng.uniform(0.0, 30.0, 20_000),
        np.exp(rng.uniform(np.log(1e-300), np.log(30.0), 50_000)),
        tiny * rng.uniform(0.0, 1.0, 1000),  # subnormals
        np.linspace(3.8, 4.2, 4001), np.linspace(5.8, 6.2, 4001),
        [5e-324, 1e-323, 1e-310, tiny, 1e-300, 30.0, 4.0, 6.0],
    ])
    return np.concatenate([x, -x])


def test_float64_against_scipy_whole_range():
    special = pytest.importorskip("scipy.special")
    x = _wide_points(np.random.default_rng(20))
    with _strict():
        y = _erf(x)
    ref = special.erf(x)
    assert np.array_equal(np.signbit(y), np.signbit(ref))
    # both are within a few ulp of the exact value: 1e-15 relative where the result is normal,
    # 2 ulp for subnormal results (erf(x) ~ 1.128 x rounds in steps of 5e-324)
    diff = np.abs(y - ref)
    normal = np.abs(ref) >= np.finfo(np.float64).tiny
    assert (diff[normal] / np.abs(ref[normal])).max() <= 1e-15
    assert (diff[~normal] / np.spacing(np.abs(ref[~normal]))).max() <= 2.0
    np.testing.assert_array_equal(y[np.abs(x) >= 6.0], np.sign(x[np.abs(x) >= 6.0]))


def test_float64_within_2_ulp_of_exact():
    """On a sample, the helper against correctly rounded erf: <= 2 ulp, 3.3e-16 relative (the
    worst seen over 1e5 points is 3.1e-16 at 0.77; SciPy's own erf is 4.2e-16 off there)."""
    rng = np.random.default_rng(21)
    x = np.concatenate([
        rng.uniform(0.0, 6.0, 3000),
        rng.uniform(0.0, 1.0, 2000),
        np.exp(rng.uniform(np.log(1e-300), np.log(6.0), 1000)),
    ])
    y = _erf(x)
    ref = _exact(x)
    assert (np.abs(y - ref) / np.spacing(ref)).max() <= 2.0
    assert (np.abs(y - ref) / ref).max() <= 3.3e-16


def test_float32_against_scipy_few_ulp():
    """float32 is computed in float32: within 2.5 ulp of the exact erf of the float32 input
    (exhaustively over [0, 4.5) the worst is 2.05 ulp), subnormal and tiny inputs included."""
    special = pytest.importorskip("scipy.special")
    rng = np.random.default_rng(22)
    x = np.concatenate([
        rng.uniform(0.0, 30.0, 100_000),
        rng.uniform(0.0, 4.5, 400_000),
        np.exp(rng.uniform(np.log(1e-45), np.log(30.0), 100_000)),
        # every float32 in [0.85, 0.95), where the worst case lies
        np.arange(
            np.float32(0.85).view(np.uint32), np.float32(0.95).view(np.uint32), 7, dtype=np.uint32
        ).view(np.float32),
        [1e-45, 1e-40, np.finfo(np.float32).tiny, 3.0e38],
    ]).astype(np.float32)
    x = np.concatenate([x, -x])
    with _strict():
        y = _erf(x)
    assert y.dtype == np.float32
    exact = special.erf(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    err = np.abs(y.astype(np.float64) - exact) / ulp
    assert err.max() <= 2.5, f"max {err.max():.2f} ulp at {x[err.argmax()]!r}"
    assert np.array_equal(np.signbit(y), np.signbit(x))
    np.testing.assert_array_equal(y[np.abs(x) >= 4.0], np.sign(x[np.abs(x) >= 4.0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_both_dtypes(dtype):
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 30.0, -30.0], dtype=dtype)
    with _strict():
        y = _erf(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, [0.0, -0.0, 1.0, -1.0, np.nan, np.nan, 1.0, -1.0])
    assert np.signbit(y[1]) and not np.signbit(y[0])
    tiny = np.array([np.finfo(dtype).smallest_subnormal, np.finfo(dtype).tiny], dtype=dtype)
    with _strict():
        y = _erf(np.concatenate([tiny, -tiny]))
    # erf(x) = 2 x / sqrt(pi) + O(x^3), within an ulp (the correction 0.128 x is subnormal)
    want = (2 / np.sqrt(np.pi) * np.concatenate([tiny, -tiny]).astype(np.float64)).astype(dtype)
    assert np.all(np.abs(y - want) <= np.spacing(np.abs(want)))
    assert np.array_equal(np.signbit(y), np.signbit(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [0.7071067811865476, 2.5, -0.5, 1.0])
def test_scale_is_the_scaled_argument(dtype, scale):
    """erf(scale * x) with the scale applied block by block: bitwise the result of scaling
    first, including signed zeros, nan and inf; a scale > 1 never overflows."""
    rng = np.random.default_rng(23)
    x = np.concatenate([
        4 * rng.standard_normal(70_000),  # more than one block
        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30],
    ]).astype(dtype)
    with _strict():
        on = _erf(x, scale)
        off = _erf(dtype(scale) * x)
    assert on.dtype == dtype
    np.testing.assert_array_equal(on, off)
    number = ~np.isnan(off)  # (the sign of a nan means nothing)
    assert np.array_equal(np.signbit(on[number]), np.signbit(off[number]))
    huge = np.array([np.finfo(dtype).max, -np.finfo(dtype).max], dtype=dtype)
    with _strict():
        np.testing.assert_array_equal(_erf(huge, scale), np.sign(scale) * np.array([1.0, -1.0]))


def test_longdouble_and_int_inputs():
    with _strict():
        y = _erf(np.array([-1.0, 0.5, 2.0], dtype=np.longdouble))
        assert y.dtype == np.longdouble
        np.testing.assert_allclose(y.astype(np.float64), _reference([-1.0, 0.5, 2.0]), rtol=4e-16)
        z = _erf(np.array([-2, 0, 3], dtype=np.int32))
    assert z.dtype == np.float64
    np.testing.assert_array_equal(z, _erf(np.array([-2.0, 0.0, 3.0])))
