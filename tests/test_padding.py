"""Zero padding and affine reads in custom equations.

A negative offset in an index position, ``x[n, c, s*t + d*k - padding]``, reads zeros below the
start of the axis; as in PyTorch the axis is padded by the same width at its end, so ``t`` ranges
over ``(L + 2*padding - d*(K - 1) - 1) // s + 1`` positions. These tests compare such layers with
PyTorch's convolutions and with a direct evaluation of the written equation in which every read
outside the argument is zero (independent of the engine's padded coordinates), gradcheck them,
place their arguments inside NaN-filled buffers (a read outside an argument shows up as NaN),
and check that mismatched sizes and reads that cannot be proven in bounds are refused.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symdl import derive
from symdl.cli import main
from symdl.codegen import generate_source
from symdl.errors import SymdlError
from symdl.parse import parse_layer
from symdl.testing import gradcheck, load_module, reference_forward

torch = pytest.importorskip("torch")
F = torch.nn.functional


@functools.cache
def _module(text: str, inputs: str, params: str, hyper: str = ""):
    layer = parse_layer("padded", text, inputs=inputs, params=params, hyper=hyper or None)
    return layer, load_module(generate_source(derive(layer)), "padded")


def _torch_conv(x, w, b=None, **kw):
    """PyTorch's forward and gradients of <dy, conv(x, w, b)>."""
    conv = F.conv1d if x.ndim == 3 else F.conv2d
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    groups = kw.pop("groups", 1)
    y = conv(xt, wt, bt, groups=groups, **kw)
    return y, xt, wt, bt


def _in_nan_buffer(a: np.ndarray, margin: int = 2) -> np.ndarray:
    """``a`` as a view into the middle of a larger buffer whose other elements are NaN."""
    buf = np.full(tuple(s + 2 * margin for s in a.shape), np.nan, dtype=a.dtype)
    view = buf[tuple(slice(margin, margin + s) for s in a.shape)]
    view[...] = a
    return view


# ---- the forms a user writes ---------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 1, 2, 3])
def test_depthwise_padding_by_hyperparameter(padding, rng):
    """The form PyTorch documents: y[n,c,t] = sum_k x[n,c,t+k-padding] w[c,k]."""
    _, mod = _module("y[n,c,t] = Sum(x[n,c,t+k-padding]*w[c,k], k)", "x", "w", "padding=1")
    x, w = rng.standard_normal((2, 3, 7)), rng.standard_normal((3, 4))
    y, cache = mod.forward(_in_nan_buffer(x), _in_nan_buffer(w), padding=padding)
    yt, xt, wt, _ = _torch_conv(x, w[:, None, :], padding=padding, groups=3)
    assert y.shape == tuple(yt.shape) == (2, 3, 7 + 2 * padding - 4 + 1)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    dx, dw = mod.backward(_in_nan_buffer(dy), cache)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dw, wt.grad.numpy()[:, 0], rtol=1e-12, atol=1e-13)


def test_negative_padding_value_is_refused(rng):
    _, mod = _module("y[n,c,t] = Sum(x[n,c,t+k-padding]*w[c,k], k)", "x", "w", "padding=1")
    with pytest.raises(ValueError, match="padding requires a non-negative integer, got -1"):
        mod.forward(rng.standard_normal((1, 3, 7)), rng.standard_normal((3, 2)), padding=-1)


def test_conv2d_stride_two_padding_one(rng):
    text = "y[n,f,i,j] = Sum(x[n,c,2*i+p-padding, 2*j+q-padding]*w[f,c,p,q], (c,p,q))"
    _, mod = _module(text, "x", "w", "padding=1")
    x, w = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2))
    y, cache = mod.forward(_in_nan_buffer(x), _in_nan_buffer(w))
    yt, xt, wt, _ = _torch_conv(x, w, stride=2, padding=1)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    dx, dw = mod.backward(dy, cache)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-12, atol=1e-13)


def test_literal_negative_offset_is_padding(rng):
    _, mod = _module("y[t] = Sum(w[k]*x[t + k - 1], k)", "x", "w")
    x, w = rng.standard_normal(6), rng.standard_normal(3)
    y, _ = mod.forward(x, w)
    ref = F.conv1d(torch.tensor(x)[None, None], torch.tensor(w)[None, None], padding=1)
    np.testing.assert_allclose(y, ref[0, 0].numpy(), rtol=1e-12, atol=1e-13)


def test_plain_read_beside_a_padded_read(rng):
    """x[n, t] beside x[n, t + k - 1]: both read the same (padded) x."""
    _, mod = _module("y[n,t] = Sum(w[k]*x[n, t + k - 1], k) + x[n, t]", "x", "w")
    x, w = rng.standard_normal((2, 6)), rng.standard_normal(3)
    y, _ = mod.forward(x, w)
    ref = _zero_extended(
        lambda xe, t, n: sum(w[k] * xe(n, t + k - 1) for k in range(3)) + xe(n, t), x, (2, 6)
    )
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-13)
    result = gradcheck(mod, [x, w], {}, rng=rng, tol=1e-6)
    assert result.ok, str(result)


def _zero_extended(body, x, shape):
    """Evaluate ``body(read, t, n)`` over the (n, t) grid, reading zeros outside ``x``."""

    def read(n, t):
        return x[n, t] if 0 <= t < x.shape[1] else 0.0

    out = np.zeros(shape)
    for n, t in itertools.product(range(shape[0]), range(shape[1])):
        out[n, t] = body(read, t, n)
    return out


# ---- refused, with the position named -------------------------------------------------------


@pytest.mark.parametrize(
    "text, hyper, message",
    [
        (
            "y[t] = Sum(w[k]*x[t - d*k], k)",
            "d=1",
            "index position 1 of x in equation 1 requires a coefficient of k",
        ),
        ("y[t] = Sum(w[k]*x[t - k], k)", "", "requires a positive integer coefficient of k"),
        (
            "h[t] = tanh(x[t]); y[t] = Sum(w[k]*h[t + k - 1], k)",
            "",
            "requires an argument to pad with zeros, got the intermediate 'h'",
        ),
        (
            "y[t] = Sum(w[k]*x[t + k - 1], k) + Sum(w[k]*x[t + k - 2], k)",
            "",
            "requires one padding width per axis",
        ),
        (
            "y[t] = Sum(w[k]*x[t + (d - 1)*k], k)",
            "d=2",
            "requires a coefficient of k made of positive integers",
        ),
    ],
)
def test_unprovable_reads_are_refused(text, hyper, message, tmp_path, capsys):
    with pytest.raises(SymdlError, match=message):
        _module(text, "x", "w", hyper)
    argv = ["derive", "bad", text, "--inputs", "x", "--params", "w", "-o", str(tmp_path)]
    assert main(argv + (["--hyper", hyper] if hyper else [])) == 2
    err = capsys.readouterr().err
    assert message.split(" (")[0].replace("\\", "") in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_plain_axis_beside_an_affine_read_must_match(rng):
    """The channel axis of x is read plainly: 4 channels against w's 3 is an error, not the
    first 3 channels."""
    _, mod = _module("y[n,f,t] = Sum(x[n,c,t+k]*w[f,c,k], (c,k))", "x", "w")
    with pytest.raises(ValueError, match="dimension 'C' is 4 in 'x' but 3 here"):
        mod.forward(rng.standard_normal((2, 4, 6)), rng.standard_normal((5, 3, 2)))


# ---- random padded, strided, dilated layers --------------------------------------------------


@st.composite
def _conv_cases(draw):
    """A random 1-D or 2-D convolution written by hand, its hyperparameters literal or named."""
    rank = draw(st.sampled_from([1, 2]))
    hyper: dict[str, int] = {}
    values: dict[str, int] = {}

    def term(name, lo, hi):
        v = draw(st.integers(lo, hi))
        if draw(st.booleans()):
            hyper[name] = draw(st.integers(lo, hi))  # a default the call may override
            values[name] = v
            return name, v
        return str(v), v

    s_text, s = term("stride", 1, 3)
    d_text, d = term("dilation", 1, 2)
    p_text, p = term("padding", 0, 2)
    spatial = "ij"[:rank]
    kern = "pq"[:rank]
    positions = []
    for a, b in zip(spatial, kern):
        pieces = [f"{s_text}*{a}", f"{d_text}*{b}"] + ([f"-{p_text}"] if p_text != "0" else [])
        order = draw(st.permutations(pieces))
        text = " + ".join(order).replace("+ -", "- ")
        positions.append(text)
    bias = draw(st.booleans())
    rhs = (
        f"Sum(x[n, c, {', '.join(positions)}]*w[f, c, {', '.join(kern)}], (c, {', '.join(kern)}))"
    )
    text = f"y[n, f, {', '.join(spatial)}] = {rhs}" + (" + b[f]" if bias else "")
    ks = [draw(st.integers(1, 3)) for _ in range(rank)]
    lengths = []
    for k in ks:
        reach = d * (k - 1) + 1 - 2 * p
        lengths.append(draw(st.integers(max(reach, 1), max(reach, 1) + 5)))
    n, c, f = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return {
        "text": text,
        "hyper": ",".join(f"{k}={v}" for k, v in sorted(hyper.items())),
        "values": values,
        "s": s,
        "d": d,
        "p": p,
        "bias": bias,
        "x": (n, c, *lengths),
        "w": (f, c, *ks),
    }


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=_conv_cases(), seed=st.integers(0, 2**16))
def test_random_padded_convolutions(case, seed):
    """Each random hand-written convolution: PyTorch's forward and gradients (float64, rtol
    1e-10), the reference evaluator of the equations, a gradcheck, arguments inside NaN
    buffers, and a wrong channel count refused."""
    rng = np.random.default_rng(seed)
    params = "w, b" if case["bias"] else "w"
    layer, mod = _module(case["text"], "x", params, case["hyper"])
    x = rng.standard_normal(case["x"])
    w = rng.standard_normal(case["w"])
    b = rng.standard_normal(case["w"][0]) if case["bias"] else None
    args = [x, w] + ([b] if case["bias"] else [])
    kw = case["values"]
    y, cache = mod.forward(*[_in_nan_buffer(a) for a in args], **kw)
    yt, xt, wt, bt = _torch_conv(x, w, b, stride=case["s"], padding=case["p"], dilation=case["d"])
    assert y.shape == tuple(yt.shape), case["text"]
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    grads = mod.backward(_in_nan_buffer(dy), cache)
    expected = [xt.grad, wt.grad] + ([bt.grad] if case["bias"] else [])
    for name, g, e in zip(mod.ARGS, grads, expected):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    ref = reference_forward(layer, *args, **kw)
    np.testing.assert_allclose(mod.forward(*args, **kw)[0], ref, rtol=1e-11, atol=1e-12)
    result = gradcheck(mod, args, kw, rng=rng, tol=1e-6)
    assert result.ok, str(result)
    # a size that must agree with another argument's, changed, or one axis too many: refused
    shared = [(0, 1, "C"), (1, 1, "C")] + ([(1, 0, "F"), (2, 0, "F")] if case["bias"] else [])
    for arg, axis, dim in shared:
        bad = list(args)
        shape = list(bad[arg].shape)
        shape[axis] += 1
        bad[arg] = rng.standard_normal(shape)
        with pytest.raises(ValueError, match=f"dimension '{dim}'"):
            mod.forward(*bad, **kw)
    for arg in range(len(args)):
        bad = list(args)
        bad[arg] = bad[arg][..., None]
        with pytest.raises(ValueError, match=f"argument '{mod.ARGS[arg]}'"):
            mod.forward(*bad, **kw)


def test_padding_in_a_recurrent_cell_is_refused(tmp_path, capsys):
    """The scan's hoisted and step layers read the cell's arguments as given: a padded read in
    a cell would silently read the unpadded sequence, so it is refused, nothing written."""
    text = "h1[b, j] = tanh(Sum(w[p] * x[b, j + p - 1], p) + h[b, j])"
    argv = ["derive", "sc", text, "--inputs", "x,h", "--params", "w", "--scan", "x"]
    assert main([*argv, "--state", "h=h1", "-o", str(tmp_path)]) == 2
    assert "a recurrent cell requires reads inside its arguments" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
