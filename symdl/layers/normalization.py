"""Normalization and dropout."""

import sympy as sp

from ..functions import Mean
from ..spec import ELL, Layer, indices, scalar, tensors

x, weight, bias, y, mu, xc, var, rstd, xhat, ms, mask = tensors(
    "x weight bias y mu xc var rstd xhat ms mask"
)
n, c, d = indices("n c d")
eps, p = scalar("eps"), scalar("p")

LAYERS = [
    Layer(
        "layer_norm",
        [
            (mu[ELL], Mean(x[ELL, d], d)),
            (xc[ELL, d], x[ELL, d] - mu[ELL]),
            (var[ELL], Mean(xc[ELL, d] ** 2, d)),
            (rstd[ELL], 1 / sp.sqrt(var[ELL] + eps)),
            (xhat[ELL, d], xc[ELL, d] * rstd[ELL]),
            (y[ELL, d], xhat[ELL, d] * weight[d] + bias[d]),
        ],
        inputs="x",
        params="weight bias",
        hyper={"eps": 1e-5},
        shapes={"x": ("...", "D"), "weight": ("D",), "bias": ("D",)},
        doc="layer normalization over the last axis, with an elementwise affine transform",
    ),
    Layer(
        "rms_norm",
        [
            (ms[ELL], Mean(x[ELL, d] ** 2, d)),
            (rstd[ELL], 1 / sp.sqrt(ms[ELL] + eps)),
            (xhat[ELL, d], x[ELL, d] * rstd[ELL]),
            (y[ELL, d], xhat[ELL, d] * weight[d]),
        ],
        inputs="x",
        params="weight",
        hyper={"eps": 1e-6},
        shapes={"x": ("...", "D"), "weight": ("D",)},
        doc="root-mean-square normalization over the last axis, with a learned scale",
    ),
    Layer(
        "batch_norm",
        [
            (mu[c], Mean(x[n, c, ELL], (n, ELL))),
            (xc[n, c, ELL], x[n, c, ELL] - mu[c]),
            (var[c], Mean(xc[n, c, ELL] ** 2, (n, ELL))),
            (rstd[c], 1 / sp.sqrt(var[c] + eps)),
            (y[n, c, ELL], xc[n, c, ELL] * rstd[c] * weight[c] + bias[c]),
        ],
        inputs="x",
        params="weight bias",
        hyper={"eps": 1e-5},
        shapes={"x": ("N", "C", "..."), "weight": ("C",), "bias": ("C",)},
        keep="mu var xc",
        extras="update_running_stats",
        doc=(
            "batch normalization in training mode: statistics over every axis but the channel "
            "axis; the cache keeps the batch mean and variance (see update_running_stats)"
        ),
    ),
    Layer(
        "dropout",
        [(y[ELL], x[ELL] * mask[ELL] / (1 - p))],
        inputs="x",
        consts="mask",
        hyper={"p": None},
        shapes={"x": ("...",), "mask": ("...",)},
        extras="dropout_mask",
        doc="inverted dropout with a given keep-mask (draw one with dropout_mask)",
        checks={"hyper": {"p": 0.25}},
    ),
]
