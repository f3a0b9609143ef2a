"""Custom layers from equation text: derived, generated, imported, gradchecked, and compared
with the element-by-element reference evaluator of the same equations."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from symdl import derive
from symdl.codegen import generate_source
from symdl.parse import parse_layer
from symdl.testing import gradcheck, load_module, random_inputs, reference_forward

# name: (equations, declarations, what it exercises)
CUSTOM = {
    "transposed_contraction": (
        "y[n, o] = Sum(x[n, i] * w[i, o], i)",
        dict(inputs="x", params="w"),
    ),
    "three_operand_contraction": (
        "y[n] = Sum(a[n, i] * W[i, j] * b[n, j], (i, j))",
        dict(inputs="a, b", params="W"),
    ),
    "broadcast_parameters": (
        "y[n, c, h] = x[n, c, h] * g[c] + b[h]",
        dict(inputs="x", params="g, b"),
    ),
    "sum_in_denominator": (
        "y[n, i] = exp(x[n, i]) / Sum(exp(x[n, j]), j)",
        dict(inputs="x"),
    ),
    "multi_equation_chain": (
        """
        h[n, o] = Sum(x[n, i] * w1[o, i], i) + b1[o]
        a[n, o] = tanh(h[n, o])
        y[n, k] = Sum(a[n, o] * w2[k, o], o)
        """,
        dict(inputs="x", params="w1, b1, w2"),
    ),
    "two_outputs": (
        "s[n] = Sum(x[n, i], i); q[n] = Sum(x[n, i] ** 2, i) + s[n]",
        dict(inputs="x", outputs="s, q"),
    ),
    "with_a_constant": (
        "p[n] = Sum(x[n, i] * w[i], i); L = Mean((p[n] - t[n]) ** 2, n)",
        dict(inputs="x", params="w", consts="t"),
    ),
    "parameter_used_twice": (
        "y[n, i] = Sum(x[n, j] * w[i, j], j) + Sum(w[j, i] * x[n, j], j)",
        dict(inputs="x", params="w"),
    ),
    "rms_with_hyperparameter": (
        "y[n, i] = x[n, i] / sqrt(Mean(x[n, j] ** 2, j) + eps) * g[i]",
        dict(inputs="x", params="g", hyper="eps=1e-5"),
    ),
    "gather_by_index": (
        "y[n, d] = w[idx[n], d] * x[n, d]",
        dict(inputs="x", params="w", consts="idx"),
    ),
    "elementwise_where_and_sigmoid": (
        "y[n] = where(x[n] > 0, sigmoid(x[n]) * x[n], 0.1 * x[n]) + softplus(x[n])",
        dict(inputs="x"),
    ),
    "long_product": (  # 40 factors of x: split into partial products before differentiating
        "y[n] = " + " * ".join(f"(x[n] + {k / 10})" for k in range(40)),
        dict(inputs="x"),
    ),
    "long_product_in_a_sum": (
        "y[n] = Sum(" + " * ".join(f"(x[n, i] * w[i] + {k / 10})" for k in range(24)) + ", i)",
        dict(inputs="x", params="w"),
    ),
    "batch_dims_ellipsis": (
        "y[..., o] = Sum(x[..., i] * w[o, i], i)",
        dict(inputs="x", params="w"),
    ),
}


def _build(name):
    text, decl = CUSTOM[name]
    layer = parse_layer(name, text, **decl)
    module = load_module(generate_source(derive(layer)), name)
    return layer, module


@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_layer(name, rng):
    layer, module = _build(name)
    checks = {"avoid": {"x": (0.0,)}}
    args, kwargs = random_inputs(module, rng, checks)
    result = gradcheck(module, args, kwargs, rng=rng, tol=1e-6)
    assert result.ok, str(result)
    out, _ = module.forward(*args, **kwargs)
    ref = reference_forward(layer, *args, **kwargs)
    if isinstance(out, tuple):
        for o, r in zip(out, ref):
            np.testing.assert_allclose(o, r, rtol=1e-11, atol=1e-13)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-11, atol=1e-13)


def test_transposed_contraction_is_a_matrix_product():
    text, decl = CUSTOM["transposed_contraction"]
    text = generate_source(derive(parse_layer("t", text, **decl)))
    assert "x @ w" in text  # forward through BLAS
    assert "einsum" not in text.split("def backward")[1].split("def _float_arg")[0]


def test_tanh_backward_reuses_forward_output():
    text = generate_source(
        derive(parse_layer("act", "y[n] = tanh(x[n])", inputs="x")), options={"blocked": False}
    )
    backward = text.split("def backward")[1].split("def _float_arg")[0]
    assert "np.tanh" not in backward
    assert "y**2" in backward or "np.square(y)" in backward  # fused: dx = np.square(y); ...


def test_sigmoid_backward_reuses_forward_output():
    from symdl import registry

    text = generate_source(registry.get("sigmoid").definition, options={"blocked": False})
    backward = text.split("def backward")[1].split("def _float_arg")[0]
    assert "np.exp" not in backward and "logaddexp" not in backward
    fused = "dx = 1 - y" in backward and "dx *= y" in backward  # in place, one buffer
    assert "y * (1 - y)" in backward or "(1 - y) * y" in backward or fused


def test_softmax_backward_uses_cached_exponentials():
    from symdl import registry

    text = generate_source(registry.get("softmax").definition)
    backward = text.split("def backward")[1].split("def _float_arg")[0]
    assert "np.exp" not in backward


def test_bias_gradient_reduces_over_the_batch():
    from symdl import registry

    text = generate_source(registry.get("linear").definition)
    assert "dbias = dy.sum(axis=0)" in text
    assert "dweight = dy.T @ x" in text and "dx = dy @ weight" in text


def test_long_product_derivative_grows_linearly():
    """The derivative of a product of k factors is a sum of k products of k - 1 factors; split
    into partial products, the backward grows linearly with k, not quadratically."""

    def backward_size(k):
        text = "y[n] = " + " * ".join(f"(x[n] + {j})" for j in range(k))
        d = derive(parse_layer("p", text, inputs="x"))
        return sum(sp.count_ops(c.body) for c in d.backward)

    small, large = backward_size(64), backward_size(256)
    assert large < 6 * small, (small, large)  # quadratic growth would be 16x


def test_stacked_dimension_alone_gives_its_base(rng):
    """A weight of shape ("2*H", I) read as two halves w[j, i] and w[H + j, i], and no argument
    with H itself: H is the stacked size over 2, and an odd stacked size is a named error."""
    from symdl.functions import Sum
    from symdl.spec import Dim, Layer, indices, tensors

    x_, w_, y_ = tensors("x w y")
    n, i, j = indices("n i j")
    layer = Layer(
        "halves",
        [(y_[n, j], Sum(x_[n, i] * w_[j, i], i) * Sum(x_[n, i] * w_[Dim("H") + j, i], i))],
        inputs="x",
        params="w",
        shapes={"x": ("N", "I"), "w": ("2*H", "I"), "y": ("N", "H")},
    )
    module = load_module(generate_source(derive(layer)), "halves")
    x, w = rng.standard_normal((2, 3)), rng.standard_normal((6, 3))
    out, _ = module.forward(x, w)
    np.testing.assert_allclose(out, (x @ w[:3].T) * (x @ w[3:].T), rtol=1e-12)
    result = gradcheck(module, [x, w], {}, rng=rng, tol=1e-6)
    assert result.ok, str(result)
    with pytest.raises(ValueError, match=r"'w'.*'2\*H' requires a multiple of 2, got 5"):
        module.forward(x, rng.standard_normal((5, 3)))


def test_isfinite_tests_a_constant_for_infinities(rng):
    """isfinite(b) > 0 keeps the finite entries of a constant (a mask's -inf, a NaN drops out),
    with no gradient through the test; the reference evaluator agrees."""
    layer = parse_layer("finite_add", "y[n] = where(isfinite(b[n]) > 0, x[n] * b[n], 0)", inputs="x", consts="b")
    module = load_module(generate_source(derive(layer)), "finite_add")
    x, b = rng.standard_normal(5), np.array([0.5, -np.inf, 2.0, np.inf, np.nan])
    y, cache = module.forward(x, b=b)
    (dx,) = module.backward(np.ones(5), cache)
    np.testing.assert_array_equal(y, [x[0] * 0.5, 0, x[2] * 2.0, 0, 0])
    np.testing.assert_array_equal(dx, [0.5, 0, 2.0, 0, 0])
    np.testing.assert_array_equal(reference_forward(layer, x, b=b), y)
