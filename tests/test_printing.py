"""The NumPy printer's powers: integer and half-integer powers of arrays as multiplications,
squares, square roots and one division (NumPy's ``np.power`` has no fast path for them), in
every target the printer serves: layers (plain, fused and block-by-block chains), sequences'
step functions and optimizers. Powers of scalars stay powers."""

from __future__ import annotations

import ast

import numpy as np
import pytest
import sympy as sp

from symdl import derive
from symdl.codegen import generate_source
from symdl.optim import Optimizer, optimizer_source
from symdl.parse import parse_layer
from symdl.printing import MAX_PRODUCT_POWER, NumpyPrinter
from symdl.scan import scan_layer, sequence_source
from symdl.testing import gradcheck, load_module

x, y, z, eps = sp.symbols("x y z eps")
HALF = sp.Rational(1, 2)


def _printer():
    names = {x: "x", y: "y[:, None]", z: "z", eps: "eps"}
    return NumpyPrinter(names, {x, y, z}, set(), {})


@pytest.mark.parametrize(
    "expr, text",
    [
        (x**2, "x**2"),  # NumPy computes a square as np.square
        (x**3, "x * x * x"),
        (x**4, "(x**2)**2"),
        (x**5, "(x**2)**2 * x"),
        (x**6, "(x * x * x)**2"),
        (x**7, "(x * x * x)**2 * x"),
        (x**8, "((x**2)**2)**2"),
        (x ** (MAX_PRODUCT_POWER + 1), f"x**{MAX_PRODUCT_POWER + 1}"),
        (1 / x, "1 / x"),
        (x**-2, "1 / x**2"),
        (x**-3, "1 / (x * x * x)"),
        (x**-4, "1 / (x**2)**2"),
        (sp.sqrt(x), "np.sqrt(x)"),
        (1 / sp.sqrt(x), "1 / np.sqrt(x)"),
        (x ** (3 * HALF), "x * np.sqrt(x)"),
        (x ** (-3 * HALF), "1 / (x * np.sqrt(x))"),
        (x ** (5 * HALF), "x**2 * np.sqrt(x)"),
        (x ** sp.Float(3.0), "x * x * x"),
        (x ** sp.Float(-1.5), "1 / (x * np.sqrt(x))"),
        (x ** sp.Float(0.7), "x**0.7"),
        (y**3, "y[:, None] * y[:, None] * y[:, None]"),
        # products and quotients keep their grouping
        (z * x**3, "(x * x * x)*z"),
        (z / x**3, "z/(x * x * x)"),
        (z / x**4, "z/(x**2)**2"),
        (-(x**3), "-(x * x * x)"),
        (sp.exp(x**3), "np.exp(x * x * x)"),
        # a compound base is not repeated: squares of squares only
        ((x + z) ** 3, "(x + z)**3"),
        ((x + z) ** 4, "((x + z)**2)**2"),
        (sp.tanh(x) ** 4, "(np.tanh(x)**2)**2"),
        ((x + z) ** -8, "1 / (((x + z)**2)**2)**2"),
        ((x + z) ** (3 * HALF), "(x + z)**(1.5)"),
        # scalars: Python arithmetic, as before
        (eps**3, "eps**3"),
        (eps**-3, "1 / eps**3"),
        (sp.sqrt(eps), "float(np.sqrt(eps))"),
    ],
)
def test_array_powers_as_products(expr, text):
    assert _printer().doprint(expr) == text


def _powers(tree) -> list[str]:
    """Every ``a ** b`` and ``np.power(a, b)`` in the code with b other than 2 (NumPy squares
    fast)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            exponent = node.right
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "np.power":
            exponent = node.args[1]
        else:
            continue
        if not (isinstance(exponent, ast.Constant) and exponent.value == 2):
            found.append(ast.unparse(node))
    return found


def _code_powers(text: str) -> list[str]:
    return _powers(ast.parse(text))


LAYERS = {
    # any sign: integer powers only
    "signed": (
        "y[n, i] = x[n, i]**3 * w[i] + x[n, i]**4 + x[n, i]**5 / 4 + x[n, i]**7 / 50",
        lambda x, w: x**3 * w + x**4 + x**5 / 4 + x**7 / 50,
        (-3.0, 3.0),
    ),
    # positive: negative and half-integer powers
    "positive": (
        "y[n, i] = x[n, i]**-3 * w[i] + sqrt(x[n, i])**3 + x[n, i]**(-5/2) + 1 / x[n, i]**2",
        lambda x, w: x**-3.0 * w + x**1.5 + x**-2.5 + x**-2.0,
        (0.5, 3.0),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("shape", [(3, 5), (300, 1001)])  # the second: chains block by block
def test_layer_powers(name, shape, rng):
    text, reference, (lo, hi) = LAYERS[name]
    layer = parse_layer(name, text, inputs="x", params="w")
    source = generate_source(derive(layer))
    assert _code_powers(source) == []
    module = load_module(source, name)
    xv = rng.uniform(lo, hi, shape)
    wv = rng.uniform(-1, 1, shape[1])
    out, _ = module.forward(xv, wv)
    np.testing.assert_allclose(out, reference(xv, wv), rtol=1e-13, atol=1e-12)  # (cancellation)
    out32, cache = module.forward(xv.astype(np.float32), wv.astype(np.float32))
    assert out32.dtype == np.float32
    grads = module.backward(np.ones_like(out32), cache)
    assert all(g.dtype == np.float32 for g in grads)
    if shape == (3, 5):
        result = gradcheck(module, [xv, wv], {}, rng=rng)
        assert result.ok, result


def test_sequence_step_powers(rng):
    cell = parse_layer(
        "cube_cell",
        "h1[b, j] = tanh(Sum(x[b, i] * w[j, i], i) + h[b, j]**3 / 3 + h[b, j]**-2 / 100)",
        inputs="x, h",
        params="w",
    )
    seq = scan_layer(cell, "cube", per_step="x", state={"h": "h1"})
    source = sequence_source(seq)
    assert _code_powers(source) == []
    module = load_module(source, "cube")
    T, B, I, H = 4, 2, 3, 5
    xv = rng.normal(size=(T, B, I))
    h0 = rng.uniform(0.5, 1.0, (B, H))
    wv = rng.normal(size=(H, I)) / 3
    (ys, h_last), _ = module.forward(xv, h0, wv)
    h = h0
    for t in range(T):
        h = np.tanh(xv[t] @ wv.T + h**3 / 3 + h**-2.0 / 100)
        np.testing.assert_allclose(ys[t], h, rtol=1e-13)
    np.testing.assert_array_equal(h_last, ys[-1])


def test_optimizer_powers(rng):
    param, grad, lr = sp.symbols("param grad lr")
    opt = Optimizer(
        "cubic",
        [(param, param - lr * (grad**3 + grad**-2 + sp.sqrt(grad) ** 3))],
        hyper={"lr": 0.1},
    )
    source = optimizer_source(opt, "tests/test_printing.py", "none")
    tree = ast.parse(source)
    steps = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("step")]
    assert len(steps) == 2 and all(_powers(f) == [] for f in steps)
    module = load_module(source, "cubic")
    p = rng.normal(size=(3, 4))
    g = rng.uniform(0.5, 2.0, (3, 4))
    want = p - 0.1 * (g**3 + g**-2.0 + g**1.5)
    (got,) = module.step(p, g, lr=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-14)
    module.step_inplace(p, g, lr=0.1)
    np.testing.assert_allclose(p, want, rtol=1e-14)
