"""Losses on the shapes PyTorch users meet: GAN objectives on logits of any shape (a
discriminator with one output unit returns (N, 1))."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_generated

from symdl.testing import gradcheck

torch = pytest.importorskip("torch")
F = torch.nn.functional
RTOL, ATOL = 1e-7, 1e-12


def _compare(module, torch_fn, args, rng):
    out, cache = module.forward(*args)
    dout = rng.standard_normal(out.shape)
    grads = module.backward(dout, cache)
    targs = [torch.tensor(a, requires_grad=True) for a in args]
    t_out = torch_fn(*targs)
    t_grads = torch.autograd.grad(t_out, targs, grad_outputs=torch.tensor(dout))
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg="forward")
    for name, a, g, tg in zip(module.ARGS, args, grads, t_grads):
        assert g.shape == a.shape, name
        np.testing.assert_allclose(g, tg.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"gradient of {name}")
    result = gradcheck(module, args, {}, rng=rng)
    assert result.ok, str(result)


SHAPES = [(6,), (6, 1), (6, 3, 2)]
IDS = ["N", "N-1", "N-3-2"]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_gan_generator_loss_matches_torch(shape, rng):
    fake = rng.uniform(-3, 3, shape)
    _compare(
        load_generated("gan_generator_loss"),
        lambda f: F.binary_cross_entropy_with_logits(f, torch.ones_like(f)),
        (fake,),
        rng,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_gan_discriminator_loss_matches_torch(shape, rng):
    real = rng.uniform(-3, 3, shape)
    fake = rng.uniform(-3, 3, (4,) + shape[1:])  # batches of real and fake samples may differ

    def loss(r, f):
        return F.binary_cross_entropy_with_logits(r, torch.ones_like(r)) + (
            F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
        )

    _compare(load_generated("gan_discriminator_loss"), loss, (real, fake), rng)


def test_gan_discriminator_loss_requires_matching_trailing_dimensions():
    m = load_generated("gan_discriminator_loss")
    with pytest.raises(ValueError, match="fake_logits"):
        m.forward(np.zeros((3, 1)), np.zeros((3, 2)))
