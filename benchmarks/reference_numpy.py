"""Hand-written NumPy baselines for the symdl benchmarks.

These are what an expert writes by hand with NumPy alone: BLAS matrix products for every
contraction, im2col (a strided view plus one copy) and one GEMM for convolutions, col2im by
slice-adds over the kernel offsets, fused and in-place elementwise expressions, and no Python
loop over elements (loops only over kernel offsets and over time steps).

Every layer follows the contract of the generated modules, so the benchmark drives both the
same way:

    out, cache = NAME_forward(*args, **kw)
    grads = NAME_backward(dout, cache)        # one gradient per positional argument

Semantics and parameter layouts match PyTorch (see /work/shared/CATALOGUE.md). ``REFERENCES``
maps a layer name to its ``(forward, backward)`` pair. Depends on NumPy only; ``gelu`` uses
``scipy.special.erf`` in float64 when SciPy is importable (see ``ERF_SOURCE``).
"""

import importlib.util
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["ERF_SOURCE", "REFERENCES"]


# --------------------------------------------------------------------------- helpers


def _sigmoid_(a):
    """In-place logistic sigmoid via 0.5*tanh(0.5*a)+0.5: one transcendental, no overflow."""
    a *= 0.5
    np.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


# --------------------------------------------------------------------------- dense


def linear_forward(x, weight, bias):
    y = x @ weight.T
    y += bias
    return y, {"x": x, "weight": weight}


def linear_backward(dy, cache):
    x, weight = cache["x"], cache["weight"]
    return dy @ weight, dy.T @ x, dy.sum(axis=0)


# --------------------------------------------------------------------------- activations


def tanh_forward(x):
    y = np.tanh(x)
    return y, {"y": y}


def tanh_backward(dy, cache):
    y = cache["y"]
    dx = y * y  # dx = dy * (1 - y^2), in place
    np.subtract(1, dx, out=dx)
    dx *= dy
    return (dx,)


def sigmoid_forward(x):
    y = np.multiply(x, 0.5)
    np.tanh(y, out=y)
    y *= 0.5
    y += 0.5
    return y, {"y": y}


def sigmoid_backward(dy, cache):
    y = cache["y"]
    dx = np.subtract(1, y)  # dx = dy * y * (1 - y)
    dx *= y
    dx *= dy
    return (dx,)


_HAVE_SCIPY = importlib.util.find_spec("scipy") is not None  # imported lazily, float64 only
ERF_SOURCE = (
    "float32: Numerical Recipes erfc Chebyshev fit (rel. err < 1.2e-7); float64: "
    + ("scipy.special.erfc" if _HAVE_SCIPY else "the same fit (SciPy not found)")
)

# Numerical Recipes (2nd ed., erfcc): erfc(z) = t*exp(-z^2 + P(t)), t = 1/(1 + z/2), z >= 0,
# fractional error < 1.2e-7 everywhere: float32 accuracy in both tails.
_ERFC_P = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _half_erfc_abs(x):
    """0.5 * erfc(|x| / sqrt(2)) in x's dtype, i.e. the normal CDF at -|x|."""
    if x.dtype == np.float64 and _HAVE_SCIPY:
        from scipy.special import erfc

        z = np.abs(x)
        z *= _INV_SQRT2
        e = erfc(z)
        e *= 0.5
        return e
    z = np.abs(x)
    z *= _INV_SQRT2
    t = z * 0.5
    t += 1
    np.reciprocal(t, out=t)
    p = t * _ERFC_P[-1]  # Horner: p = t*(c1 + t*(c2 + ... + t*c9))
    for c in _ERFC_P[-2:0:-1]:
        p += c
        p *= t
    p += _ERFC_P[0]
    z *= z
    p -= z
    np.exp(p, out=p)
    p *= t
    p *= 0.5
    return p


def gelu_forward(x):
    # Phi(x) = 1 - e for x >= 0, e for x < 0, with e = 0.5*erfc(|x|/sqrt 2): accurate in both tails
    e = _half_erfc_abs(x)
    cdf = e
    np.subtract(1, e, out=cdf, where=x >= 0)
    y = x * cdf
    return y, {"x": x, "cdf": cdf}


def gelu_backward(dy, cache):
    x, cdf = cache["x"], cache["cdf"]
    dx = x * x  # dx = dy * (Phi(x) + x * phi(x))
    dx *= -0.5
    np.exp(dx, out=dx)
    dx *= x
    dx *= _INV_SQRT_2PI
    dx += cdf
    dx *= dy
    return (dx,)


# --------------------------------------------------------------------------- softmax, losses


def softmax_forward(x):
    y = x - x.max(axis=1, keepdims=True)
    np.exp(y, out=y)
    y /= y.sum(axis=1, keepdims=True)
    return y, {"y": y}


def softmax_backward(dy, cache):
    y = cache["y"]
    dot = np.einsum("nc,nc->n", dy, y)  # dx = y * (dy - <dy, y>)
    dx = dy - dot[:, None]
    dx *= y
    return (dx,)


def cross_entropy_forward(logits, *, target):
    N = logits.shape[0]
    m = logits.max(axis=1, keepdims=True)
    e = logits - m
    np.exp(e, out=e)
    s = e.sum(axis=1)
    rows = np.arange(N)
    loss = (np.log(s).sum() + m.sum() - logits[rows, target].sum()) / N
    return np.asarray(loss, dtype=logits.dtype), {"e": e, "s": s, "target": target}


def cross_entropy_backward(dL, cache):
    e, s, target = cache["e"], cache["s"], cache["target"]
    N = e.shape[0]
    g = np.asarray(dL, dtype=e.dtype) / N
    dlogits = e * (g / s)[:, None]  # softmax * dL/N ...
    dlogits[np.arange(N), target] -= g  # ... minus one-hot (targets are distinct per row)
    return (dlogits,)


# --------------------------------------------------------------------------- normalization


def layer_norm_forward(x, weight, bias, *, eps=1e-5):
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    xhat = x2 - x2.mean(axis=1, keepdims=True)
    var = np.einsum("nd,nd->n", xhat, xhat) / D
    rstd = 1 / np.sqrt(var + eps)
    xhat *= rstd[:, None]
    y = xhat * weight
    y += bias
    return y.reshape(x.shape), {"xhat": xhat, "rstd": rstd, "weight": weight}


def layer_norm_backward(dy, cache):
    xhat, rstd, weight = cache["xhat"], cache["rstd"], cache["weight"]
    shape = dy.shape
    D = xhat.shape[1]
    dy2 = dy.reshape(-1, D)
    dbias = dy2.sum(axis=0)
    dweight = np.einsum("nd,nd->d", dy2, xhat)
    g = dy2 * weight  # dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    a = g.mean(axis=1)
    b = np.einsum("nd,nd->n", g, xhat) / D
    t = xhat * b[:, None]
    g -= a[:, None]
    g -= t
    g *= rstd[:, None]
    return g.reshape(shape), dweight, dbias


def batch_norm_forward(x, weight, bias, *, eps=1e-5):
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)
    M = N * x3.shape[2]
    xhat = x3 - (x3.sum(axis=(0, 2)) / M)[:, None]
    var = np.einsum("nce,nce->c", xhat, xhat) / M
    rstd = 1 / np.sqrt(var + eps)
    xhat *= rstd[:, None]
    y = xhat * weight[:, None]
    y += bias[:, None]
    return y.reshape(x.shape), {"xhat": xhat, "rstd": rstd, "weight": weight}


def batch_norm_backward(dy, cache):
    xhat, rstd, weight = cache["xhat"], cache["rstd"], cache["weight"]
    N, C, E = xhat.shape
    M = N * E
    dy3 = dy.reshape(N, C, E)
    dbias = dy3.sum(axis=(0, 2))
    dweight = np.einsum("nce,nce->c", dy3, xhat)
    # dx = (weight*rstd) * (dy - dbias/M - xhat*dweight/M), per channel
    s = weight * rstd
    t = xhat * (s * dweight / M)[:, None]
    dx = dy3 * s[:, None]
    dx -= (s * dbias / M)[:, None]
    dx -= t
    return dx.reshape(dy.shape), dweight, dbias


# --------------------------------------------------------------------------- convolution


def conv2d_forward(x, weight, bias, *, stride=1, padding=0, dilation=1):
    N, C, H, W = x.shape
    F, _, KH, KW = weight.shape
    s, p, d = int(stride), int(padding), int(dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
    OH = (H + 2 * p - d * (KH - 1) - 1) // s + 1
    OW = (W + 2 * p - d * (KW - 1) - 1) // s + 1
    # windows[n, c, i, j, kh, kw] = xp[n, c, s*i + d*kh, s*j + d*kw]: a view, no copy
    win = sliding_window_view(xp, (d * (KH - 1) + 1, d * (KW - 1) + 1), axis=(2, 3))
    win = win[:, :, ::s, ::s, ::d, ::d][:, :, :OH, :OW]
    # im2col: one copy into (C*KH*KW, N*OH*OW), then a single GEMM
    cols = win.transpose(1, 4, 5, 0, 2, 3).reshape(C * KH * KW, N * OH * OW)
    y2 = weight.reshape(F, -1) @ cols  # (F, N*OH*OW)
    # bias add fused with the (F, N) -> (N, F) layout change
    y = np.empty((N, F, OH, OW), dtype=y2.dtype)
    np.add(y2.reshape(F, N, OH, OW).transpose(1, 0, 2, 3), bias[:, None, None], out=y)
    cache = {"cols": cols, "weight": weight, "geom": (N, C, H, W, OH, OW, s, p, d)}
    return y, cache


def conv2d_backward(dy, cache):
    cols, weight = cache["cols"], cache["weight"]
    N, C, H, W, OH, OW, s, p, d = cache["geom"]
    F, _, KH, KW = weight.shape
    dy2 = dy.transpose(1, 0, 2, 3).reshape(F, N * OH * OW)  # one copy
    dbias = dy2.sum(axis=1)
    # (C*KH*KW, K) @ (K, F) rather than (F, K) @ (K, C*KH*KW): the same product, but OpenBLAS
    # splits this orientation far better across threads (much steadier on a busy machine)
    dweight = (cols @ dy2.T).T.reshape(weight.shape)
    dcols = (weight.reshape(F, -1).T @ dy2).reshape(C, KH, KW, N, OH, OW)
    # col2im: one slice-add per kernel offset, accumulated in (C, N, H, W) order so that each
    # source slice dcols[:, kh, kw] is contiguous; one transposing copy at the end
    dxp = np.zeros((C, N, H + 2 * p, W + 2 * p), dtype=dy.dtype)
    for kh in range(KH):
        for kw in range(KW):
            h0, w0 = d * kh, d * kw
            dxp[:, :, h0 : h0 + s * (OH - 1) + 1 : s, w0 : w0 + s * (OW - 1) + 1 : s] += dcols[
                :, kh, kw
            ]
    dx = np.ascontiguousarray(dxp[:, :, p : p + H, p : p + W].transpose(1, 0, 2, 3))
    return dx, dweight, dbias


def max_pool2d_forward(x, *, kernel_size, stride=None, padding=0):
    k = int(kernel_size)
    s = k if stride is None else int(stride)
    p = int(padding)
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf) if p else x
    OH = (H + 2 * p - k) // s + 1
    OW = (W + 2 * p - k) // s + 1
    # running max over the k*k kernel offsets; idx keeps the first arg-max (PyTorch's choice)
    y = xp[:, :, : s * (OH - 1) + 1 : s, : s * (OW - 1) + 1 : s].copy()
    idx = np.zeros(y.shape, dtype=np.uint8)
    for o in range(1, k * k):
        a, b = divmod(o, k)
        sl = xp[:, :, a : a + s * (OH - 1) + 1 : s, b : b + s * (OW - 1) + 1 : s]
        better = sl > y
        np.copyto(y, sl, where=better)
        idx[better] = o
    return y, {"idx": idx, "geom": (N, C, H, W, k, s, p)}


def max_pool2d_backward(dy, cache):
    idx = cache["idx"]
    N, C, H, W, k, s, p = cache["geom"]
    OH, OW = idx.shape[2:]
    dxp = np.zeros((N, C, H + 2 * p, W + 2 * p), dtype=dy.dtype)
    for o in range(k * k):
        a, b = divmod(o, k)
        dst = dxp[:, :, a : a + s * (OH - 1) + 1 : s, b : b + s * (OW - 1) + 1 : s]
        if s >= k:  # windows do not overlap: write, do not accumulate
            np.multiply(dy, idx == o, out=dst)
        else:
            dst += dy * (idx == o)
    return (dxp[:, :, p : p + H, p : p + W],)


# --------------------------------------------------------------------------- recurrent


def lstm_forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
    T, B, _ = x.shape
    H = h0.shape[1]
    # input projections of all time steps in one GEMM, both biases folded in
    gates = (x.reshape(T * B, -1) @ weight_ih.T).reshape(T, B, 4 * H)
    gates += bias_ih + bias_hh
    hs = np.empty((T + 1, B, H), dtype=x.dtype)
    cs = np.empty((T + 1, B, H), dtype=x.dtype)
    tcs = np.empty((T, B, H), dtype=x.dtype)
    hs[0], cs[0] = h0, c0
    whT = weight_hh.T
    for t in range(T):
        g = gates[t]  # becomes the activated gates i, f, g, o (kept for backward)
        g += hs[t] @ whT
        _sigmoid_(g[:, : 2 * H])
        np.tanh(g[:, 2 * H : 3 * H], out=g[:, 2 * H : 3 * H])
        _sigmoid_(g[:, 3 * H :])
        i, f, gg, o = g[:, :H], g[:, H : 2 * H], g[:, 2 * H : 3 * H], g[:, 3 * H :]
        c = cs[t + 1]
        np.multiply(f, cs[t], out=c)
        c += i * gg
        np.tanh(c, out=tcs[t])
        np.multiply(o, tcs[t], out=hs[t + 1])
    y = hs[1:]
    cache = {"x": x, "hs": hs, "cs": cs, "tcs": tcs, "gates": gates, "weight_ih": weight_ih,
             "weight_hh": weight_hh}
    return (y, hs[T], cs[T]), cache


def lstm_backward(dout, cache):
    dy, dhT, dcT = dout
    x, hs, cs, tcs, gates = cache["x"], cache["hs"], cache["cs"], cache["tcs"], cache["gates"]
    weight_ih, weight_hh = cache["weight_ih"], cache["weight_hh"]
    T, B, _ = x.shape
    H = hs.shape[2]
    dgates = np.empty_like(gates)
    dh = dhT.copy()
    dc = dcT.copy()
    for t in range(T - 1, -1, -1):
        g = gates[t]
        i, f, gg, o = g[:, :H], g[:, H : 2 * H], g[:, 2 * H : 3 * H], g[:, 3 * H :]
        dg = dgates[t]
        di, df, dgg, do = dg[:, :H], dg[:, H : 2 * H], dg[:, 2 * H : 3 * H], dg[:, 3 * H :]
        dh += dy[t]
        tc = tcs[t]
        np.multiply(dh, tc, out=do)  # do (pre-activation below)
        tmp = tc * tc  # dc += dh * o * (1 - tanh(c)^2)
        np.subtract(1, tmp, out=tmp)
        tmp *= o
        tmp *= dh
        dc += tmp
        np.multiply(dc, gg, out=di)
        np.multiply(dc, i, out=dgg)
        np.multiply(dc, cs[t], out=df)
        dc *= f
        # through the activations: sigmoid' = s(1-s), tanh' = 1-t^2
        di *= i * (1 - i)
        df *= f * (1 - f)
        dgg *= 1 - gg * gg
        do *= o * (1 - o)
        dh = dg @ weight_hh
    dg2 = dgates.reshape(T * B, 4 * H)
    dx = (dg2 @ weight_ih).reshape(x.shape)
    dweight_ih = dg2.T @ x.reshape(T * B, -1)
    dweight_hh = dg2.T @ hs[:-1].reshape(T * B, H)
    dbias = dg2.sum(axis=0)
    return dx, dh, dc, dweight_ih, dweight_hh, dbias, dbias.copy()


def gru_forward(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    T, B, _ = x.shape
    H = h0.shape[1]
    gx = (x.reshape(T * B, -1) @ weight_ih.T).reshape(T, B, 3 * H)
    gx += bias_ih
    gx[:, :, : 2 * H] += bias_hh[: 2 * H]  # r and z take both biases; n keeps b_hn apart
    hs = np.empty((T + 1, B, H), dtype=x.dtype)
    hn = np.empty((T, B, H), dtype=x.dtype)  # W_hn h + b_hn, needed by backward
    hs[0] = h0
    whT = weight_hh.T
    for t in range(T):
        gh = hs[t] @ whT
        g = gx[t]  # becomes r, z, n
        g[:, : 2 * H] += gh[:, : 2 * H]
        _sigmoid_(g[:, : 2 * H])
        r, z, n = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
        np.add(gh[:, 2 * H :], bias_hh[2 * H :], out=hn[t])
        n += r * hn[t]
        np.tanh(n, out=n)
        h = hs[t + 1]  # h = n + z * (h_prev - n)
        np.subtract(hs[t], n, out=h)
        h *= z
        h += n
    cache = {"x": x, "hs": hs, "hn": hn, "gates": gx, "weight_ih": weight_ih,
             "weight_hh": weight_hh}
    return (hs[1:], hs[T]), cache


def gru_backward(dout, cache):
    dy, dhT = dout
    x, hs, hn, gates = cache["x"], cache["hs"], cache["hn"], cache["gates"]
    weight_ih, weight_hh = cache["weight_ih"], cache["weight_hh"]
    T, B, _ = x.shape
    H = hs.shape[2]
    dgx = np.empty_like(gates)  # gradients of the input-side pre-activations
    dgh = np.empty_like(gates)  # ... and of the hidden-side ones (differ in the n block)
    dh = dhT.copy()
    for t in range(T - 1, -1, -1):
        g = gates[t]
        r, z, n = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
        dh += dy[t]
        a = dgx[t]
        dr, dz, dn = a[:, :H], a[:, H : 2 * H], a[:, 2 * H :]
        np.subtract(hs[t], n, out=dz)  # dz = dh * (h_prev - n) * z(1-z)
        dz *= dh
        dz *= z * (1 - z)
        np.subtract(1, z, out=dn)  # dn = dh * (1 - z) * (1 - n^2)
        dn *= dh
        dn *= 1 - n * n
        np.multiply(dn, hn[t], out=dr)  # dr = dn * hn * r(1-r)
        dr *= r * (1 - r)
        b = dgh[t]
        b[:, : 2 * H] = a[:, : 2 * H]
        np.multiply(dn, r, out=b[:, 2 * H :])
        dh *= z
        dh += b @ weight_hh
    dgx2 = dgx.reshape(T * B, 3 * H)
    dgh2 = dgh.reshape(T * B, 3 * H)
    dx = (dgx2 @ weight_ih).reshape(x.shape)
    dweight_ih = dgx2.T @ x.reshape(T * B, -1)
    dweight_hh = dgh2.T @ hs[:-1].reshape(T * B, H)
    return dx, dh, dweight_ih, dweight_hh, dgx2.sum(axis=0), dgh2.sum(axis=0)


# --------------------------------------------------------------------------- attention


def multi_head_self_attention_forward(
    x, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, *, num_heads, causal=False
):
    N, T, E = x.shape
    h = int(num_heads)
    d = E // h
    x2 = x.reshape(N * T, E)
    qkv = x2 @ in_proj_weight.T
    qkv += in_proj_bias
    # (N, T, 3, h, d) -> (3, N, h, T, d): one copy, then each head is a contiguous matrix
    qkv = np.ascontiguousarray(qkv.reshape(N, T, 3, h, d).transpose(2, 0, 3, 1, 4))
    q, k, v = qkv
    scale = 1.0 / math.sqrt(d)
    P = q @ k.transpose(0, 1, 3, 2)  # (N, h, T, T), batched GEMM
    P *= scale
    if causal:
        P += np.triu(np.full((T, T), -np.inf, dtype=x.dtype), 1)
    P -= P.max(axis=-1, keepdims=True)
    np.exp(P, out=P)
    P /= P.sum(axis=-1, keepdims=True)
    o = P @ v  # (N, h, T, d)
    o2 = o.transpose(0, 2, 1, 3).reshape(N * T, E)
    y = o2 @ out_proj_weight.T
    y += out_proj_bias
    cache = {"x2": x2, "qkv": qkv, "P": P, "o2": o2, "in_proj_weight": in_proj_weight,
             "out_proj_weight": out_proj_weight, "geom": (N, T, E, h, d, scale)}
    return y.reshape(N, T, E), cache


def multi_head_self_attention_backward(dy, cache):
    x2, qkv, P, o2 = cache["x2"], cache["qkv"], cache["P"], cache["o2"]
    W_in, W_out = cache["in_proj_weight"], cache["out_proj_weight"]
    N, T, E, h, d, scale = cache["geom"]
    q, k, v = qkv
    dy2 = dy.reshape(N * T, E)
    dW_out = dy2.T @ o2
    db_out = dy2.sum(axis=0)
    do = (dy2 @ W_out).reshape(N, T, h, d).transpose(0, 2, 1, 3)
    dqkv = np.empty_like(qkv)
    np.matmul(P.transpose(0, 1, 3, 2), do, out=dqkv[2])  # dv = P^T do
    dS = do @ v.transpose(0, 1, 3, 2)  # dP, then dS = P * (dP - rowsum(dP * P)) * scale
    dS -= np.einsum("nhts,nhts->nht", dS, P)[..., None]
    dS *= P
    dS *= scale
    np.matmul(dS, k, out=dqkv[0])
    np.matmul(dS.transpose(0, 1, 3, 2), q, out=dqkv[1])
    dqkv2 = dqkv.transpose(1, 3, 0, 2, 4).reshape(N * T, 3 * E)
    dW_in = dqkv2.T @ x2
    db_in = dqkv2.sum(axis=0)
    dx = (dqkv2 @ W_in).reshape(N, T, E)
    return dx, dW_in, db_in, dW_out, db_out


def _band_transpose(A, w):
    """B[n, s, j] = A[n, s + j - w, 2w - j] (0 outside the sequence): the band seen from the key
    side, as a small contiguous array. With the key-side windows x[n, s + j - w] this turns the
    scatter over band offsets (dk, dv) into a gather: one batched matmul, no slice-add loop."""
    N, T, W = A.shape
    Ap = np.pad(A, ((0, 0), (w, w), (0, 0)))
    sN, sT, sW = Ap.strides
    skew = np.lib.stride_tricks.as_strided(  # skew[n, s, j] = A[n, s + w - j, j]
        Ap[:, 2 * w :], shape=(N, T, W), strides=(sN, sT, sW - sT), writeable=False
    )
    return np.ascontiguousarray(skew[..., ::-1])


def _band_windows(x, w):
    """X[n, t, e, j] = x[n, t + j - w, e], zero outside the sequence: a strided view."""
    return sliding_window_view(np.pad(x, ((0, 0), (w, w), (0, 0))), 2 * w + 1, axis=1)


def local_attention_forward(q, k, v, *, window, scale=None):
    """Banded attention: position i attends to j with |i - j| <= window (scale 1/sqrt(E)).

    Every contraction is one batched matmul over strided band views, so cost and memory are
    O(T * window), never O(T^2).
    """
    _, T, E = q.shape
    w = int(window)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    kw, vw = _band_windows(k, w), _band_windows(v, w)  # (N, T, E, W) views
    S = np.matmul(q[:, :, None, :], kw)[:, :, 0, :]  # (N, T, W)
    S *= scale
    pos = np.arange(T)[:, None] + np.arange(2 * w + 1)[None, :] - w
    S[:, (pos < 0) | (pos >= T)] = -np.inf
    S -= S.max(axis=-1, keepdims=True)
    np.exp(S, out=S)
    S /= S.sum(axis=-1, keepdims=True)
    y = np.matmul(vw, S[..., None])[..., 0]
    return y, {"q": q, "kw": kw, "vw": vw, "P": S, "geom": (w, scale)}


def local_attention_backward(dy, cache):
    q, kw, vw, P = cache["q"], cache["kw"], cache["vw"], cache["P"]
    w, scale = cache["geom"]
    dP = np.matmul(dy[:, :, None, :], vw)[:, :, 0, :]
    dP -= np.einsum("ntw,ntw->nt", dP, P)[..., None]
    dP *= P
    dP *= scale  # dS
    dq = np.matmul(kw, dP[..., None])[..., 0]
    # dk[n, s] = sum_j dS[n, s + j - w, 2w - j] q[n, s + j - w]; dv likewise with P and dy
    dk = np.matmul(_band_windows(q, w), _band_transpose(dP, w)[..., None])[..., 0]
    dv = np.matmul(_band_windows(dy, w), _band_transpose(P, w)[..., None])[..., 0]
    return dq, dk, dv


REFERENCES = {
    name[: -len("_forward")]: (fn, globals()[name[: -len("_forward")] + "_backward"])
    for name, fn in list(globals().items())
    if name.endswith("_forward") and callable(fn)
}
