"""Losses (mean reduction unless noted), penalties and GAN objectives. Each returns a scalar."""

import sympy as sp

from ..functions import Mean, Sum, softplus, stop_gradient, xlogy
from ..spec import ELL, Layer, indices, scalar, tensors
from .dense import log_sum_exp

inp, target, logits, log_probs, var, v, r, w, m, lse = tensors(
    "input target logits log_probs var v r w m lse"
)
real, fake = tensors("real_logits fake_logits")
n, c, k = indices("n c k")
L = scalar("L")
delta, eps, lam = scalar("delta"), scalar("eps"), scalar("lam")
ANY = ("...",)

LAYERS = [
    Layer(
        "mse_loss",
        [(L, Mean((inp[ELL] - target[ELL]) ** 2, ELL))],
        inputs="input",
        consts="target",
        shapes={"input": ANY, "target": ANY},
        doc="mean squared error",
    ),
    Layer(
        "huber_loss",
        [
            (r[ELL], inp[ELL] - target[ELL]),
            (
                L,
                Mean(
                    sp.Piecewise(
                        (r[ELL] ** 2 / 2, sp.Abs(r[ELL]) < delta),
                        (delta * (sp.Abs(r[ELL]) - delta / 2), True),
                    ),
                    ELL,
                ),
            ),
        ],
        inputs="input",
        consts="target",
        hyper={"delta": 1.0},
        shapes={"input": ANY, "target": ANY},
        doc="quadratic for |input - target| < delta, linear beyond",
        checks={"avoid": {"input": ("target+delta", "target-delta")}},
    ),
    Layer(
        "cross_entropy",
        [
            *log_sum_exp(logits[n, c], n, c),
            (L, Mean(lse[n] - logits[n, target[n]], n)),
        ],
        inputs="logits",
        consts="target",
        shapes={"logits": ("N", "C"), "target": ("N",)},
        doc="softmax cross-entropy with integer class targets, through a stable log-sum-exp",
    ),
    Layer(
        "nll_loss",
        [(L, -Mean(log_probs[n, target[n]], n))],
        inputs="log_probs",
        consts="target",
        shapes={"log_probs": ("N", "C"), "target": ("N",)},
        doc="negative log-likelihood of integer class targets given log-probabilities",
    ),
    Layer(
        "binary_cross_entropy_with_logits",
        [(L, Mean(softplus(logits[ELL]) - logits[ELL] * target[ELL], ELL))],
        inputs="logits",
        consts="target",
        shapes={"logits": ANY, "target": ANY},
        doc="binary cross-entropy of sigmoid(logits), as softplus(x) - x t for stability",
    ),
    Layer(
        "kl_div",
        [(L, Mean(Sum(xlogy(target[n, c], target[n, c]) - target[n, c] * inp[n, c], c), n))],
        inputs="input",
        consts="target",
        shapes={"input": ("N", "C"), "target": ("N", "C")},
        doc="KL(target || exp(input)) for log-probability input, batchmean reduction",
        checks={"domains": {"target": (0.05, 1.0)}},
    ),
    Layer(
        "gaussian_nll_loss",
        [
            # the variance clamped at eps in value only, as PyTorch does (gradient passes)
            (v[ELL], var[ELL] + stop_gradient(sp.Max(var[ELL], eps) - var[ELL])),
            (L, Mean((sp.log(v[ELL]) + (inp[ELL] - target[ELL]) ** 2 / v[ELL]) / 2, ELL)),
        ],
        inputs="input var",
        consts="target",
        hyper={"eps": 1e-6},
        shapes={"input": ANY, "var": ANY, "target": ANY},
        doc="Gaussian negative log-likelihood with predicted variance (without the constant)",
        checks={"domains": {"var": (0.5, 2.0)}},
    ),
    Layer(
        "l1_penalty",
        [(L, lam * Sum(sp.Abs(w[ELL]), ELL))],
        inputs="w",
        hyper={"lam": None},
        shapes={"w": ANY},
        doc="lam * sum |w|",
        checks={"avoid": {"w": (0.0,)}, "hyper": {"lam": 0.3}},
    ),
    Layer(
        "l2_penalty",
        [(L, lam / 2 * Sum(w[ELL] ** 2, ELL))],
        inputs="w",
        hyper={"lam": None},
        shapes={"w": ANY},
        doc="lam / 2 * sum w^2",
        checks={"hyper": {"lam": 0.3}},
    ),
    Layer(
        "gan_discriminator_loss",
        [(L, Mean(softplus(-real[n, ELL]), (n, ELL)) + Mean(softplus(fake[k, ELL]), (k, ELL)))],
        inputs="real_logits fake_logits",
        shapes={"real_logits": ("N", "..."), "fake_logits": ("M", "...")},
        doc="BCE(real, 1) + BCE(fake, 0), each a mean over all elements: the discriminator's "
        "GAN objective (logits of any shape, e.g. (N,) or (N, 1); real and fake may differ in "
        "their first dimension)",
    ),
    Layer(
        "gan_generator_loss",
        [(L, Mean(softplus(-fake[ELL]), ELL))],
        inputs="fake_logits",
        shapes={"fake_logits": ANY},
        doc="BCE(fake, 1), a mean over all elements: the generator's non-saturating GAN "
        "objective (logits of any shape)",
    ),
]
