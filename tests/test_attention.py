"""Attention against PyTorch: masks, causal, cross attention (L != S), heads, fully masked rows,
local attention against full attention with a band mask."""

from __future__ import annotations

import numpy as np
import pytest
import references as R
from conftest import load_generated

from symdl.testing import gradcheck

torch = pytest.importorskip("torch")
RTOL, ATOL = 1e-7, 1e-12


def _grads_torch(fn, args, dout):
    targs = [torch.tensor(a, requires_grad=True) for a in args]
    out = fn(*targs)
    grads = torch.autograd.grad(out, targs, grad_outputs=torch.tensor(dout))
    return out.detach().numpy(), [g.numpy() for g in grads]


def _check(module, args, kwargs, fn, rng, fd=True):
    out, cache = module.forward(*args, **kwargs)
    dout = rng.standard_normal(out.shape)
    grads = module.backward(dout, cache)
    t_out, t_grads = _grads_torch(fn, args, dout)
    np.testing.assert_allclose(out, t_out, rtol=RTOL, atol=ATOL, err_msg="forward")
    for name, g, tg in zip(module.ARGS, grads, t_grads):
        np.testing.assert_allclose(g, tg, rtol=RTOL, atol=ATOL, err_msg=f"gradient of {name}")
    if fd:
        result = gradcheck(module, args, kwargs, rng=rng)
        assert result.ok, str(result)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L, S", [(4, 4), (3, 6)], ids=["self", "cross"])
def test_sdpa(L, S, causal, rng):
    if causal and L != S:
        pytest.skip("PyTorch's is_causal aligns the mask to the top-left; covered by L == S")
    m = load_generated("scaled_dot_product_attention")
    args = (rng.standard_normal((2, L, 5)), rng.standard_normal((2, S, 5)), rng.standard_normal((2, S, 3)))
    kw = {"causal": causal}
    _check(m, args, kw, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), rng)


def test_sdpa_with_mask_and_scale(rng):
    m = load_generated("scaled_dot_product_attention")
    args = (rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2)))
    mask = rng.random((3, 5)) < 0.6
    mask[:, 0] = True
    kw = {"mask": mask, "scale": 0.3}
    tmask = torch.tensor(mask)
    _check(
        m, args, kw,
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tmask, scale=0.3),
        rng,
    )


def _float_masks(rng, shape):
    """PyTorch's additive masks: zeros (attend everywhere), 0 / -inf, arbitrary finite values,
    finite values with -inf, and a large negative finite value in place of -inf."""
    blocked = rng.random(shape) < 0.4
    blocked[:, 0] = False
    finite = rng.uniform(-3, 3, shape)
    return {
        "zeros": np.zeros(shape),
        "0/-inf": np.where(blocked, -np.inf, 0.0),
        "finite": finite,
        "finite/-inf": np.where(blocked, -np.inf, finite),
        "-1e9": np.where(blocked, -1e9, 0.0),
    }


@pytest.mark.parametrize("kind", ["zeros", "0/-inf", "finite", "finite/-inf", "-1e9", "bool"])
@pytest.mark.parametrize("L, S", [(4, 4), (3, 6)], ids=["self", "cross"])
def test_sdpa_mask_is_pytorchs_attn_mask(L, S, kind, rng):
    """A float mask is added to the scores (0 = attend, -inf = blocked), a boolean mask is
    True = attend: both as PyTorch's attn_mask, forward and gradients."""
    m = load_generated("scaled_dot_product_attention")
    args = (rng.standard_normal((2, L, 5)), rng.standard_normal((2, S, 5)), rng.standard_normal((2, S, 3)))
    if kind == "bool":
        mask = rng.random((L, S)) < 0.6
        mask[:, 0] = True
    else:
        mask = _float_masks(rng, (L, S))[kind]
    tmask = torch.tensor(mask)
    _check(
        m, args, {"mask": mask},
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tmask),
        rng,
    )


def test_sdpa_float_mask_rows_fully_blocked_or_uniformly_shifted(rng):
    """A row of -inf gives zeros (as PyTorch's); a row of one large finite value is a shift,
    which softmax ignores. (No finite differences: scores near -1e9 leave them 7 digits.)"""
    m = load_generated("scaled_dot_product_attention")
    args = (rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2)))
    mask = rng.uniform(-2, 2, (3, 5))
    mask[1] = -np.inf
    mask[2] = -1e9
    tmask = torch.tensor(mask)
    _check(
        m, args, {"mask": mask},
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tmask),
        rng,
        fd=False,
    )


def test_sdpa_zero_float_mask_equals_no_mask(rng):
    m = load_generated("scaled_dot_product_attention")
    args = (rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2)))
    for causal in (False, True):
        ref, _ = m.forward(*args, causal=causal)
        out, _ = m.forward(*args, mask=np.zeros((3, 5)), causal=causal)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


def test_sdpa_float32_with_float_and_bool_masks(rng):
    m = load_generated("scaled_dot_product_attention")
    args = tuple(a.astype(np.float32) for a in (
        rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    ))
    for mask in (_float_masks(rng, (3, 5))["finite/-inf"].astype(np.float32), rng.random((3, 5)) < 0.6):
        out, cache = m.forward(*args, mask=mask)
        grads = m.backward(np.ones_like(out), cache)
        assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
        assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)


def test_sdpa_mask_of_integers_is_refused(rng):
    m = load_generated("scaled_dot_product_attention")
    q = rng.standard_normal((1, 2, 3))
    with pytest.raises(TypeError, match=r"argument 'mask' requires a boolean mask \(True = attend\) or a floating-point additive mask"):
        m.forward(q, q, q, mask=np.ones((2, 2), dtype=np.int64))


def test_fully_masked_rows_give_zeros_and_zero_gradient(rng):
    m = load_generated("scaled_dot_product_attention")
    q, k, v = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 5, 4)), rng.standard_normal((1, 5, 2))
    mask = np.ones((3, 5), bool)
    mask[1] = False
    with np.errstate(all="raise"):
        out, cache = m.forward(q, k, v, mask=mask)
        dq, dk, dv = m.backward(np.ones_like(out), cache)
    assert np.all(np.isfinite(out)) and np.all(out[:, 1] == 0)
    assert np.all(dq[:, 1] == 0)
    # the other rows are what attention over the allowed keys gives
    np.testing.assert_allclose(out[:, [0, 2]], R._np_sdpa(q, k, v)[:, [0, 2]], rtol=1e-12)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_multi_head_self_attention(num_heads, causal, rng):
    m = load_generated("multi_head_self_attention")
    e = 8
    args = (
        rng.standard_normal((2, 5, e)),
        0.3 * rng.standard_normal((3 * e, e)),
        0.3 * rng.standard_normal(3 * e),
        0.3 * rng.standard_normal((e, e)),
        0.3 * rng.standard_normal(e),
    )
    kw = {"num_heads": num_heads, "causal": causal}

    def fn(x, wi, bi, wo, bo):
        return R._torch_mha(torch, x, wi, bi, wo, bo, num_heads, causal)

    _check(m, args, kw, fn, rng)
    # and the module itself, with the weights copied in, agrees on the forward pass
    mha = torch.nn.MultiheadAttention(e, num_heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.tensor(args[1]))
        mha.in_proj_bias.copy_(torch.tensor(args[2]))
        mha.out_proj.weight.copy_(torch.tensor(args[3]))
        mha.out_proj.bias.copy_(torch.tensor(args[4]))
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1) if causal else None
    t_out, _ = mha(*(torch.tensor(args[0]),) * 3, need_weights=False, attn_mask=mask)
    out, _ = m.forward(*args, **kw)
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=RTOL, atol=ATOL)


def test_num_heads_must_divide_the_embedding(rng):
    m = load_generated("multi_head_self_attention")
    e = 6
    args = (np.ones((1, 2, e)), np.ones((3 * e, e)), np.ones(3 * e), np.ones((e, e)), np.ones(e))
    with pytest.raises(ValueError, match="num_heads requires a divisor"):
        m.forward(*args, num_heads=4)


@pytest.mark.parametrize("window", [0, 1, 3, 10])
def test_local_attention_equals_banded_full_attention(window, rng):
    local = load_generated("local_attention")
    full = load_generated("scaled_dot_product_attention")
    t = 9
    q, k, v = rng.standard_normal((2, t, 4)), rng.standard_normal((2, t, 4)), rng.standard_normal((2, t, 3))
    band = np.abs(np.arange(t)[:, None] - np.arange(t)[None, :]) <= window
    out, cache = local.forward(q, k, v, window=window)
    ref, ref_cache = full.forward(q, k, v, mask=band)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    dout = rng.standard_normal(out.shape)
    for g, rg in zip(local.backward(dout, cache), full.backward(dout, ref_cache)):
        np.testing.assert_allclose(g, rg, rtol=1e-10, atol=1e-13)


def test_local_attention_cache_is_linear_in_t(rng):
    local = load_generated("local_attention")
    sizes = []
    for t in (64, 128, 256):
        q = rng.standard_normal((1, t, 8))
        _, cache = local.forward(q, q, q, window=4)
        sizes.append(sum(a.nbytes for a in cache.values() if isinstance(a, np.ndarray)))
    assert sizes[1] / sizes[0] == pytest.approx(2, rel=0.1)
    assert sizes[2] / sizes[1] == pytest.approx(2, rel=0.1)


@pytest.mark.parametrize("name", ["scaled_dot_product_attention", "multi_head_self_attention", "local_attention", "additive_attention"])
def test_float32(name, rng):
    args, kw = R.DOMAINS[name](rng)
    m = load_generated(name)
    out, cache = m.forward(*(a.astype(np.float32) for a in args), **kw)
    grads = m.backward(np.ones_like(out), cache)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
