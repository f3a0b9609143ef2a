"""Convolution and pooling: affine index maps derived like any other layer.

Checked against PyTorch (float64, rtol 1e-7) over strides, paddings, dilations, non-square
kernels and inputs, batch 1 and a single channel; against a plain-loop implementation; by
finite differences; and for custom affine layers written as text.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import load_generated

from symdl import derive
from symdl.codegen import generate_source
from symdl.parse import parse_layer
from symdl.testing import gradcheck, load_module, reference_forward

RTOL, ATOL = 1e-7, 1e-12
CONV2D_CASES = [
    # (N, C, H, W, F, KH, KW, stride, padding, dilation)
    (2, 3, 7, 6, 4, 3, 3, 1, 0, 1),
    (2, 3, 7, 6, 4, 3, 3, 1, 1, 1),
    (2, 3, 8, 9, 4, 3, 2, 2, 1, 1),
    (1, 1, 9, 7, 2, 2, 3, 2, 2, 2),
    (1, 2, 5, 5, 3, 1, 1, 1, 0, 1),
    (3, 1, 10, 8, 1, 3, 2, 1, 2, 2),
]


def _conv2d_loops(x, w, b, stride, padding, dilation):
    """Textbook loops, for the forward check on small sizes."""
    n_, c_, h_, w_ = x.shape
    f_, _, kh, kw = w.shape
    xp = np.zeros((n_, c_, h_ + 2 * padding, w_ + 2 * padding))
    xp[:, :, padding : padding + h_, padding : padding + w_] = x
    oh = (h_ + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (w_ + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    y = np.zeros((n_, f_, oh, ow))
    for n, f, i, j in itertools.product(range(n_), range(f_), range(oh), range(ow)):
        acc = b[f]
        for c, p, q in itertools.product(range(c_), range(kh), range(kw)):
            acc += xp[n, c, stride * i + dilation * p, stride * j + dilation * q] * w[f, c, p, q]
        y[n, f, i, j] = acc
    return y


def _torch_check(module, fn, args, kwargs, rng):
    torch = pytest.importorskip("torch")
    out, cache = module.forward(*args, **kwargs)
    dout = rng.standard_normal(out.shape)
    grads = module.backward(dout, cache)
    targs = [torch.tensor(a, requires_grad=True) for a in args]
    t_out = fn(torch, *targs)
    t_grads = torch.autograd.grad(t_out, targs, grad_outputs=torch.tensor(dout))
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg="forward")
    for name, g, tg in zip(module.ARGS, grads, t_grads):
        np.testing.assert_allclose(
            g, tg.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"gradient of {name}"
        )
    return out


@pytest.mark.parametrize("case", CONV2D_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d(case, rng):
    n, c, h, w, f, kh, kw, stride, padding, dilation = case
    m = load_generated("conv2d")
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((f, c, kh, kw))
    bias = rng.standard_normal(f)
    hp = dict(stride=stride, padding=padding, dilation=dilation)
    out = _torch_check(
        m,
        lambda torch, x, w, b: torch.nn.functional.conv2d(x, w, b, **hp),
        (x, weight, bias),
        hp,
        rng,
    )
    np.testing.assert_allclose(out, _conv2d_loops(x, weight, bias, **hp), rtol=1e-12, atol=1e-12)
    result = gradcheck(m, (x, weight, bias), hp, rng=rng)
    assert result.ok, str(result)


@pytest.mark.parametrize(
    "case", [(2, 3, 11, 4, 3, 1, 0, 1), (1, 1, 9, 2, 2, 2, 1, 2), (2, 2, 7, 3, 1, 1, 2, 1)]
)
def test_conv1d(case, rng):
    n, c, length, f, k, stride, padding, dilation = case
    m = load_generated("conv1d")
    args = (rng.standard_normal((n, c, length)), rng.standard_normal((f, c, k)), rng.standard_normal(f))
    hp = dict(stride=stride, padding=padding, dilation=dilation)
    _torch_check(m, lambda torch, x, w, b: torch.nn.functional.conv1d(x, w, b, **hp), args, hp, rng)
    assert gradcheck(m, args, hp, rng=rng).ok


@pytest.mark.parametrize(
    "case",
    [(2, 3, 6, 7, 2, None, 0), (1, 2, 7, 7, 3, 2, 1), (2, 1, 5, 6, 2, 1, 1), (1, 1, 8, 8, 3, 3, 1)],
    ids=["k2", "k3s2p1", "overlap", "k3s3p1"],
)
@pytest.mark.parametrize("kind", ["max_pool2d", "avg_pool2d"])
def test_pooling(kind, case, rng):
    n, c, h, w, k, stride, padding = case
    m = load_generated(kind)
    x = rng.standard_normal((n, c, h, w))
    hp = dict(kernel_size=k, stride=stride, padding=padding)
    fn = getattr(__import__("torch").nn.functional, kind) if _has_torch() else None
    _torch_check(m, lambda torch, x: fn(x, **hp), (x,), hp, rng)
    assert gradcheck(m, (x,), hp, rng=rng).ok


def _has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def test_max_pool_ties_go_to_the_first_maximum(rng):
    torch = pytest.importorskip("torch")
    m = load_generated("max_pool2d")
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = x[0, 0, 0, 1] = 1.0  # a tie inside the first 2x2 window
    y, cache = m.forward(x, kernel_size=2, stride=1)
    (dx,) = m.backward(np.ones_like(y), cache)
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tx, 2, 1).sum().backward()
    np.testing.assert_array_equal(dx, tx.grad.numpy())
    assert dx.sum() == y.size  # each window sends its gradient to exactly one element


@pytest.mark.parametrize("kind", ["conv2d", "max_pool2d", "avg_pool2d", "conv1d"])
def test_float32(kind, rng):
    m = load_generated(kind)
    if kind == "conv2d":
        args, hp = (rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)), {"padding": 1}
    elif kind == "conv1d":
        args, hp = (rng.standard_normal((2, 3, 6)), rng.standard_normal((4, 3, 3)), rng.standard_normal(4)), {}
    else:
        args, hp = (rng.standard_normal((2, 3, 6, 5)),), {"kernel_size": 2}
    args32 = tuple(a.astype(np.float32) for a in args)
    y, cache = m.forward(*args32, **hp)
    grads = m.backward(np.ones_like(y), cache)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    y64, _ = m.forward(*args, **hp)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)


def test_kernel_that_does_not_fit_is_a_clear_error(rng):
    m = load_generated("conv2d")
    with pytest.raises(ValueError, match="OH.*requires at least 1"):
        m.forward(np.ones((1, 1, 2, 5)), np.ones((1, 1, 3, 3)), np.ones(1))
    with pytest.raises(ValueError, match="stride requires a positive integer"):
        m.forward(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), np.ones(1), stride=0)


@pytest.mark.parametrize(
    "text, decl",
    [
        ("y[b, i] = x[b, i + 1] - x[b, i]", dict(inputs="x")),
        ("y[b, i] = Sum(x[b, s*i + p] * w[p], p)", dict(inputs="x", params="w", hyper="s=2")),
        ("y[b, i, j] = x[b, 2*i, j + 1] * x[b, 2*i + 1, j]", dict(inputs="x")),
        ("y[n, i] = Max(x[n, i + p], p) + Sum(x[n, i + p] * k[p], p)", dict(inputs="x", params="k")),
    ],
    ids=["difference", "strided-correlation", "two-strides", "max-and-sum-windows"],
)
def test_custom_affine_layers(text, decl, rng):
    layer = parse_layer("affine", text, **decl)
    module = load_module(generate_source(derive(layer)), "affine")
    sizes = {d: 7 + k for k, d in enumerate(sorted({d for dims in module.SHAPES.values() for d in dims if d != "..."}))}
    from symdl.testing import random_inputs

    if "k" in module.SHAPES:
        sizes[module.SHAPES["k"][0]] = 3
    if "w" in module.SHAPES:
        sizes[module.SHAPES["w"][0]] = 3
    args, kwargs = random_inputs(module, rng, sizes=sizes)
    result = gradcheck(module, args, kwargs, rng=rng)
    assert result.ok, str(result)
    out, _ = module.forward(*args, **kwargs)
    np.testing.assert_allclose(out, reference_forward(layer, *args, **kwargs), rtol=1e-12, atol=1e-12)
