"""Dense layers, embedding and softmax."""

import sympy as sp

from ..functions import Max, Sum, stop_gradient
from ..spec import ELL, Layer, indices, tensors

x, x1, x2, weight, bias, y, m, e, s, lse, idx = tensors("x x1 x2 weight bias y m e s lse indices")
n, i, j, o, c, d = indices("n i j o c d")



def log_sum_exp(scores, row, col):
    """Equations for lse[row] = log Sum(exp(scores), col), stabilised by the row maximum
    (a stop-gradient: exact, since the log-sum-exp shifts with its argument)."""
    return [
        (m[row], stop_gradient(Max(scores, col))),
        (lse[row], m[row] + sp.log(Sum(sp.exp(scores - m[row]), col))),
    ]


LAYERS = [
    Layer(
        "linear",
        [(y[n, o], Sum(x[n, i] * weight[o, i], i) + bias[o])],
        inputs="x",
        params="weight bias",
        shapes={"x": ("N", "in"), "weight": ("out", "in"), "bias": ("out",)},
        doc="y = x W^T + b (PyTorch's Linear layout: weight is (out, in))",
    ),
    Layer(
        "bilinear",
        [(y[n, o], Sum(x1[n, i] * weight[o, i, j] * x2[n, j], (i, j)) + bias[o])],
        inputs="x1 x2",
        params="weight bias",
        shapes={
            "x1": ("N", "in1"),
            "x2": ("N", "in2"),
            "weight": ("out", "in1", "in2"),
            "bias": ("out",),
        },
        doc="y[n, o] = x1[n] . W[o] . x2[n] + b[o]",
    ),
    Layer(
        "embedding",
        [(y[ELL, d], weight[idx[ELL], d])],
        params="weight",
        consts="indices",
        shapes={"weight": ("V", "D"), "indices": ("...",)},
        doc="a table lookup: row indices[...] of weight",
    ),
    Layer(
        "softmax",
        [
            (m[n], stop_gradient(Max(x[n, c], c))),
            (e[n, c], sp.exp(x[n, c] - m[n])),
            (s[n], Sum(e[n, c], c)),
            (y[n, c], e[n, c] / s[n]),
        ],
        inputs="x",
        shapes={"x": ("N", "C")},
        doc="softmax over the last axis, with the row maximum subtracted for stability",
    ),
    Layer(
        "log_softmax",
        [
            *log_sum_exp(x[n, c], n, c),
            (y[n, c], x[n, c] - lse[n]),
        ],
        inputs="x",
        shapes={"x": ("N", "C")},
        doc="log of the softmax over the last axis, through a stable log-sum-exp",
    ),
]
