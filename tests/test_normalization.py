"""Normalization layers on the shapes PyTorch users meet, running statistics, dropout masks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_generated

from symdl.testing import gradcheck

torch = pytest.importorskip("torch")
F = torch.nn.functional
RTOL, ATOL = 1e-7, 1e-12


def _compare(module, torch_fn, args, kwargs, rng, check=True):
    out, cache = module.forward(*args, **kwargs)
    dout = rng.standard_normal(out.shape)
    grads = module.backward(dout, cache)
    targs = [torch.tensor(a, requires_grad=True) for a in args]
    t_out = torch_fn(*targs)
    t_grads = torch.autograd.grad(t_out, targs, grad_outputs=torch.tensor(dout))
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=RTOL, atol=ATOL)
    for name, g, tg in zip(module.ARGS, grads, t_grads):
        np.testing.assert_allclose(g, tg.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
    if check:
        result = gradcheck(module, args, kwargs, rng=rng)
        assert result.ok, str(result)


@pytest.mark.parametrize(
    "shape", [(5, 3), (2, 3), (2, 3, 4, 5), (1, 4)], ids=["2d", "2d-batch2", "4d-batch2", "batch1"]
)
def test_batch_norm_matches_torch(shape, rng):
    m = load_generated("batch_norm")
    x = rng.standard_normal(shape) * 2 + 1
    w, b = rng.uniform(0.5, 1.5, shape[1]), rng.standard_normal(shape[1])
    if shape[0] * int(np.prod(shape[2:])) == 1:
        pytest.skip("batch statistics need more than one value per channel")
    _compare(
        m,
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-5),
        (x, w, b),
        {},
        rng,
        # two values per channel normalise to exactly -1 and +1: the gradient is ~0 and a
        # finite-difference ratio is meaningless there (PyTorch agreement is still checked)
        check=shape[0] * int(np.prod(shape[2:])) > 2,
    )


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 4, 5)], ids=["2d", "4d"])
def test_layer_and_rms_norm_match_torch(shape, rng):
    x = rng.standard_normal(shape)
    d = shape[-1]
    w, b = rng.uniform(0.5, 1.5, d), rng.standard_normal(d)
    _compare(
        load_generated("layer_norm"),
        lambda x, w, b: F.layer_norm(x, (d,), w, b, eps=1e-5),
        (x, w, b),
        {},
        rng,
    )
    _compare(
        load_generated("rms_norm"),
        lambda x, w: F.rms_norm(x, (d,), w, eps=1e-6),
        (x, w),
        {},
        rng,
    )


def test_running_statistics_follow_torch(rng):
    m = load_generated("batch_norm")
    x = rng.standard_normal((4, 3, 2, 2))
    w, b = np.ones(3), np.zeros(3)
    running_mean, running_var = np.zeros(3), np.ones(3)
    t_mean, t_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        _, cache = m.forward(x, w, b)
        running_mean, running_var = m.update_running_stats(
            running_mean, running_var, cache, momentum=0.1
        )
        F.batch_norm(torch.tensor(x), t_mean, t_var, None, None, training=True, momentum=0.1)
        x = x * 1.5 + 0.3
    np.testing.assert_allclose(running_mean, t_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(running_var, t_var.numpy(), rtol=1e-12)


def test_dropout_mask_and_scaling(rng):
    m = load_generated("dropout")
    mask = m.dropout_mask(np.random.default_rng(0), (1000, 100), 0.3)
    assert mask.dtype == np.float64 and set(np.unique(mask)) == {0.0, 1.0}
    assert abs(mask.mean() - 0.7) < 0.01
    x = rng.standard_normal((1000, 100))
    y, cache = m.forward(x, mask=mask, p=0.3)
    np.testing.assert_allclose(y, x * mask / 0.7)
    (dx,) = m.backward(np.ones_like(y), cache)
    np.testing.assert_allclose(dx, mask / 0.7)
    with pytest.raises(ValueError, match="p requires"):
        m.dropout_mask(np.random.default_rng(0), (2,), 1.0)


def test_batch_norm_backward_is_compact():
    """The derived backward reduces over the batch twice for dx (one contraction with the
    centred input, one plain sum), plus one each for dweight (shared) and dbias."""
    text = (load_generated("batch_norm").__file__ and open(load_generated("batch_norm").__file__).read())
    backward = text.split("def backward")[1].split("\ndef ")[0]
    reductions = [
        line for line in backward.splitlines()
        if not line.strip().startswith("#") and (".sum(axis" in line or "einsum" in line)
    ]
    assert len(reductions) == 3, reductions
    assert "np.sqrt" not in backward  # the cached 1/sqrt(var + eps) is reused (rstd**3)
