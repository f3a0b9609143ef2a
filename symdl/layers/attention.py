"""Attention: scaled dot-product (global), multi-head self-attention, local (banded) and
additive (Bahdanau) attention.

Masked softmax, written once in the equations and reused below: scores of masked positions
are replaced by -1e30 before the row maximum is taken (a stop-gradient, exact because softmax
is shift invariant), masked exponentials are 0, and a fully masked row (sum 0) divides by 1,
so it gives zeros, not NaN, and a zero gradient (as PyTorch's scaled_dot_product_attention).

The mask of scaled dot-product attention is PyTorch's ``attn_mask``: additive (added to the
scores; 0 = attend, -inf = blocked) when floating-point, True = attend when boolean (taken as
the additive 0 / -inf).
"""

import sympy as sp

from ..functions import Max, Sum, isfinite, stop_gradient
from ..spec import Dim, Layer, indices, scalar, tensors

q, k, v, mask, s, keep, bias, sm, m, e, z, zs, p, o = tensors(
    "q k v mask s keep bias sm m e z zs p o"
)
x, wi, bi, wo, bo, qp, kp, vp, a, y = tensors(
    "x in_proj_weight in_proj_bias out_proj_weight out_proj_bias qp kp vp a y"
)
query, keys, w_query, w_keys, vv, qa, ka, sc, ctx = tensors(
    "query keys w_query w_keys v qa ka sc ctx"
)
n, l, t, d, f, h, i, w, c = indices("n l t d f h i w c")
scale, causal, num_heads, window = (
    scalar("scale"),
    scalar("causal"),
    scalar("num_heads"),
    scalar("window"),
)
E, D, T = Dim("E"), Dim("D"), Dim("T")
NEG = sp.Float(-1e30)


def masked_softmax_weights(scores, allowed, rows, col):
    """Equations for e (unnormalised weights), zs (their safe row sums) and p (the weights) of
    a masked softmax over the index ``col``; ``scores`` is an expression of indexed tensors,
    ``allowed`` the condition under which a position may be attended to."""
    sm_, m_, e_, z_, zs_ = (tsr[rows + (col,)] for tsr in (sm, m, e, z, zs))
    del m_, z_, zs_
    return [
        (sm[rows + (col,)], sp.Piecewise((scores, allowed), (NEG, True))),
        (m[rows], stop_gradient(Max(sm_, col))),
        (e[rows + (col,)], sp.Piecewise((sp.exp(sm_ - m[rows]), allowed), (0, True))),
        (z[rows], Sum(e_, col)),
        (zs[rows], sp.Piecewise((z[rows], z[rows] > 0), (1, True))),
        (p[rows + (col,)], e_ / zs[rows]),
    ]


SDPA = Layer(
    "scaled_dot_product_attention",
    [
        (s[n, l, t], Sum(q[n, l, d] * k[n, t, d], d) * scale),
        # the mask is additive: -inf blocks a position, a finite value is added to its score
        (keep[l, t], sp.Piecewise((0, sp.And(causal > 0, t > l)), (1, isfinite(mask[l, t]) > 0), (0, True))),
        (bias[l, t], sp.Piecewise((mask[l, t], keep[l, t] > 0), (0, True))),
        *masked_softmax_weights(s[n, l, t] + bias[l, t], keep[l, t] > 0, (n, l), t),
        (o[n, l, f], Sum(p[n, l, t] * v[n, t, f], t)),
    ],
    inputs="q k v",
    consts="mask",
    optional={"mask": 0.0},
    masks="mask",
    hyper={"causal": False, "scale": 1 / sp.sqrt(Dim("E"))},
    shapes={"q": ("N", "L", "E"), "k": ("N", "S", "E"), "v": ("N", "S", "Ev"), "mask": ("L", "S")},
    doc="softmax(q k^T * scale + mask) v with PyTorch's attn_mask: a float mask is added to "
    "the scores (0 = attend, -inf = blocked), a boolean mask is True = may attend; optional "
    "causal masking; a fully masked row gives zeros",
    checks={"domains": {"mask": (-1.0, 1.0)}},
)

MHA = Layer(
    "multi_head_self_attention",
    [
        (qp[n, t, c], Sum(x[n, t, i] * wi[c, i], i) + bi[c]),
        (kp[n, t, c], Sum(x[n, t, i] * wi[E + c, i], i) + bi[E + c]),
        (vp[n, t, c], Sum(x[n, t, i] * wi[2 * E + c, i], i) + bi[2 * E + c]),
        (s[n, h, l, t], Sum(qp[n, l, h * D + d] * kp[n, t, h * D + d], d) / sp.sqrt(D)),
        (keep[l, t], sp.Piecewise((0, sp.And(causal > 0, t > l)), (1, True))),
        *masked_softmax_weights(s[n, h, l, t], keep[l, t] > 0, (n, h, l), t),
        (a[n, l, h, f], Sum(p[n, h, l, t] * vp[n, t, h * D + f], t)),
        (y[n, l, c], Sum(a[n, l, h, f] * wo[c, h * D + f], (h, f)) + bo[c]),
    ],
    inputs="x",
    params="in_proj_weight in_proj_bias out_proj_weight out_proj_bias",
    hyper={"num_heads": int, "causal": False},
    ranges={"h": "num_heads", "d": "D", "f": "D", "c": "E"},
    dims={"D": sp.floor(E / num_heads)},
    asserts=[(sp.Eq(sp.Mod(E, num_heads), 0), "num_heads requires a divisor of the embedding size")],
    shapes={
        "x": ("N", "T", "E"),
        "in_proj_weight": ("3*E", "E"),
        "in_proj_bias": ("3*E",),
        "out_proj_weight": ("E", "E"),
        "out_proj_bias": ("E",),
    },
    doc="multi-head self-attention with PyTorch's in_proj/out_proj layout (batch first)",
    checks={"hyper": {"num_heads": 2}, "sizes": {"E": 4}},
)

LOCAL = Layer(
    "local_attention",
    [
        # k and v are zero-padded by `window` on both sides of the time axis, so position i
        # reads keys i - window ... i + window as k[n, i + w, d] for w in 0 ... 2*window
        (s[n, i, w], Sum(q[n, i, d] * k[n, i + w, d], d) * scale),
        (keep[i, w], sp.Piecewise((1, sp.And(i + w >= window, i + w < T + window)), (0, True))),
        *masked_softmax_weights(s[n, i, w], keep[i, w] > 0, (n, i), w),
        (o[n, i, f], Sum(p[n, i, w] * v[n, i + w, f], w)),
    ],
    inputs="q k v",
    hyper={"window": int, "scale": 1 / sp.sqrt(Dim("E"))},
    ranges={"w": "W"},
    dims={"W": 2 * window + 1},
    pad={"k": {"axes": {1: "window"}}, "v": {"axes": {1: "window"}}},
    shapes={"q": ("N", "T", "E"), "k": ("N", "T", "E"), "v": ("N", "T", "Ev")},
    doc="sliding-window attention: position i attends to j with |i - j| <= window, "
    "in O(T * window) time and memory",
    checks={"hyper": {"window": 1}},
)

ADDITIVE = Layer(
    "additive_attention",
    [
        (qa[n, c], Sum(w_query[c, d] * query[n, d], d)),
        (ka[n, t, c], Sum(w_keys[c, d] * keys[n, t, d], d)),
        (sc[n, t], Sum(vv[c] * sp.tanh(qa[n, c] + ka[n, t, c]), c)),
        (m[n], stop_gradient(Max(sc[n, t], t))),
        (e[n, t], sp.exp(sc[n, t] - m[n])),
        (z[n], Sum(e[n, t], t)),
        (p[n, t], e[n, t] / z[n]),
        (ctx[n, d], Sum(p[n, t] * keys[n, t, d], t)),
    ],
    inputs="query keys",
    params="w_query w_keys v",
    shapes={
        "query": ("N", "Dq"),
        "keys": ("N", "T", "Dk"),
        "w_query": ("A", "Dq"),
        "w_keys": ("A", "Dk"),
        "v": ("A",),
    },
    doc="Bahdanau attention: scores v . tanh(W_q q + W_k k_t), softmax over t, context "
    "sum_t p_t k_t",
)

LAYERS = [SDPA, MHA, LOCAL, ADDITIVE]
