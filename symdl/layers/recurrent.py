"""Recurrent cells in PyTorch's layout: gate-stacked weights, read as slices by affine indices.

``gi[b, r]`` is the stacked input projection (one matrix product for all gates) and
``gi[b, H + j]`` the second gate's rows, so each cell costs two BLAS calls.
"""

import sympy as sp

from ..functions import Sum, sigmoid
from ..spec import Dim, Layer, indices, tensors

x, h, c, weight_ih, weight_hh, bias_ih, bias_hh = tensors("x h c weight_ih weight_hh bias_ih bias_hh")
gi, gh, rg, zg, ng, ig, fg, gg, og, h1, c1 = tensors("gi gh r z n i f g o h1 c1")
b, i, k, r, j = indices("b i k r j")
H = Dim("H")

ARGS = "x h"
PARAMS = "weight_ih weight_hh bias_ih bias_hh"


def _projections():
    return [
        (gi[b, r], Sum(x[b, i] * weight_ih[r, i], i) + bias_ih[r]),
        (gh[b, r], Sum(h[b, k] * weight_hh[r, k], k) + bias_hh[r]),
    ]


def _shapes(gates):
    return {
        "x": ("B", "I"),
        "h": ("B", "H"),
        "weight_ih": (f"{gates}*H", "I") if gates > 1 else ("H", "I"),
        "weight_hh": (f"{gates}*H", "H") if gates > 1 else ("H", "H"),
        "bias_ih": (f"{gates}*H",) if gates > 1 else ("H",),
        "bias_hh": (f"{gates}*H",) if gates > 1 else ("H",),
    }


LAYERS = [
    Layer(
        "rnn_cell",
        [
            (
                h1[b, j],
                sp.tanh(
                    Sum(x[b, i] * weight_ih[j, i], i)
                    + bias_ih[j]
                    + Sum(h[b, k] * weight_hh[j, k], k)
                    + bias_hh[j]
                ),
            )
        ],
        inputs=ARGS,
        params=PARAMS,
        shapes=_shapes(1),
        doc="Elman RNN cell: h' = tanh(W_ih x + b_ih + W_hh h + b_hh)",
    ),
    Layer(
        "gru_cell",
        [
            *_projections(),
            (rg[b, j], sigmoid(gi[b, j] + gh[b, j])),
            (zg[b, j], sigmoid(gi[b, H + j] + gh[b, H + j])),
            (ng[b, j], sp.tanh(gi[b, 2 * H + j] + rg[b, j] * gh[b, 2 * H + j])),
            (h1[b, j], (1 - zg[b, j]) * ng[b, j] + zg[b, j] * h[b, j]),
        ],
        inputs=ARGS,
        params=PARAMS,
        shapes=_shapes(3),
        doc="GRU cell, gates r, z, n (PyTorch's order; r scales W_hn h + b_hn)",
    ),
    Layer(
        "lstm_cell",
        [
            *_projections(),
            (ig[b, j], sigmoid(gi[b, j] + gh[b, j])),
            (fg[b, j], sigmoid(gi[b, H + j] + gh[b, H + j])),
            (gg[b, j], sp.tanh(gi[b, 2 * H + j] + gh[b, 2 * H + j])),
            (og[b, j], sigmoid(gi[b, 3 * H + j] + gh[b, 3 * H + j])),
            (c1[b, j], fg[b, j] * c[b, j] + ig[b, j] * gg[b, j]),
            (h1[b, j], og[b, j] * sp.tanh(c1[b, j])),
        ],
        inputs="x h c",
        params=PARAMS,
        outputs="h1 c1",
        shapes={**_shapes(4), "c": ("B", "H")},
        doc="LSTM cell, gates i, f, g, o (PyTorch's order); returns (h', c')",
    ),
]
