"""Hand-written NumPy baselines for the symdl benchmarks.

These are what an expert writes by hand with NumPy alone: BLAS matrix products for every
contraction, im2col (a strided view plus one copy) and one GEMM for convolutions, col2im by
slice-adds over the kernel offsets, fused and in-place elementwise expressions run block by
block so that a chain of passes stays in cache, and no Python loop over elements (loops only
over blocks, kernel offsets and time steps).

Every layer follows the contract of the generated modules, so the benchmark drives both the
same way:

    out, cache = NAME_forward(*args, **kw)
    grads = NAME_backward(dout, cache)        # one gradient per positional argument

Semantics and parameter layouts match PyTorch (see /work/shared/CATALOGUE.md). ``REFERENCES``
maps a layer name to its ``(forward, backward)`` pair. Depends on NumPy only (``ERF_SOURCE``
says how ``gelu`` computes erf).
"""

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["ERF_SOURCE", "REFERENCES"]


# --------------------------------------------------------------------------- helpers


def _blocks(size, itemsize, target=1 << 18):
    """Slices covering ``range(size)`` in blocks of about ``target`` bytes (256 KiB): a chain of
    elementwise passes over one block stays in cache."""
    step = max(1, target // itemsize)
    return [slice(k, k + step) for k in range(0, size, step)]


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


ERF_SOURCE = (
    "branch-free rational fit of 1 - erfcx with expm1, same coefficients as symdl's helper "
    "(benchmarks/fit_erf.py): ~2 ulp in float32 and float64"
)

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# erf(a) = G + A (1 - G), A = -expm1(-a^2), G = a + a P(a) / Q(a), a = min(|x|, XMAX); P's
# leading coefficient -1 and Q's leading 1 not stored (see benchmarks/fit_erf.py)
_ERF = {
    np.dtype(np.float64): (
        6.0,
        (71.94443849398584, -381.56123496293833, -773.901003507441, -645.3957850283145,
         -302.83376228906707, -85.26751114646967, -13.746651731780492),
        (560.4058674135191, 1393.0969992781356, 1539.4174120045213, 983.5199567416935,
         393.9651749314381, 99.44988281497989, 14.74665471474452),
    ),
    np.dtype(np.float32): (
        4.0,
        (1.5844811, -9.338971, -11.822731, -5.5419126),
        (12.342198, 23.393404, 17.808483, 6.5413613),
    ),
}


def gelu_forward(x):
    """y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2; the cache holds the derivative
    Phi(x) + x phi(x), computed here while x is in cache (backward is then one multiply)."""
    xmax, p, q = _ERF[x.dtype]
    bits = np.dtype(f"u{x.itemsize}")
    sign_bit = bits.type(1) << bits.type(8 * x.itemsize - 1)
    xf = x.reshape(-1)
    y, k = np.empty_like(xf), np.empty_like(xf)
    size = min(xf.size, max(1, (1 << 18) // x.itemsize))
    a, z, num, den = np.empty((4, size), dtype=x.dtype)
    sign = np.empty(size, dtype=bits)
    for sl in _blocks(xf.size, x.itemsize):
        xs, ys, ks = xf[sl], y[sl], k[sl]
        n = xs.size
        an, zn, pn, qn, sn = a[:n], z[:n], num[:n], den[:n], sign[:n]
        np.bitwise_and(xs.view(bits), sign_bit, out=sn)
        np.abs(xs, out=an)
        an *= _INV_SQRT2
        np.minimum(an, 100.0, out=an)  # exp(-a^2) = exp(-x^2 / 2) is 0 beyond
        np.multiply(an, an, out=zn)
        np.negative(zn, out=zn)
        np.expm1(zn, out=zn)  # m = expm1(-x^2 / 2)
        np.minimum(an, xmax, out=an)
        np.subtract(p[-1], an, out=pn)
        for c in p[-2::-1]:
            pn *= an
            pn += c
        np.add(an, q[-1], out=qn)
        for c in q[-2::-1]:
            qn *= an
            qn += c
        pn /= qn
        pn *= an
        pn += an  # G
        np.subtract(1, pn, out=qn)
        qn *= zn
        pn -= qn  # erf(|x| / sqrt 2) = G - m (1 - G)
        np.bitwise_or(pn.view(bits), sn, out=pn.view(bits))
        pn *= 0.5
        pn += 0.5  # Phi(x)
        np.multiply(xs, pn, out=ys)
        zn += 1  # exp(-x^2 / 2)
        zn *= xs
        zn *= _INV_SQRT_2PI
        np.add(zn, pn, out=ks)  # Phi(x) + x phi(x)
    return y.reshape(x.shape), {"k": k.reshape(x.shape)}


def gelu_backward(dy, cache):
    return (dy * cache["k"],)


_GELU_C1 = math.sqrt(2.0 / math.pi)
_GELU_C2 = 0.044715 * math.sqrt(2.0 / math.pi)


def gelu_tanh_forward(x):
    """y = x h, h = (1 + tanh(u)) / 2, u = sqrt(2/pi) (x + 0.044715 x^3) = x (C1 + C2 x^2);
    the cache holds dy/dx = h + 2 x h (1 - h) (C1 + 3 C2 x^2), computed while x is in cache."""
    xf = x.reshape(-1)
    y, k = np.empty_like(xf), np.empty_like(xf)
    size = min(xf.size, max(1, (1 << 18) // x.itemsize))
    z, h, w = np.empty((3, size), dtype=x.dtype)
    for sl in _blocks(xf.size, x.itemsize):
        xs, ys, ks = xf[sl], y[sl], k[sl]
        n = xs.size
        zn, hn, wn = z[:n], h[:n], w[:n]
        np.multiply(xs, xs, out=zn)
        np.multiply(zn, _GELU_C2, out=hn)
        hn += _GELU_C1
        hn *= xs
        np.tanh(hn, out=hn)
        hn *= 0.5
        hn += 0.5  # h
        np.multiply(xs, hn, out=ys)
        np.multiply(zn, 6 * _GELU_C2, out=wn)
        wn += 2 * _GELU_C1
        wn *= xs  # 2 x u'(x)
        np.subtract(1, hn, out=ks)
        ks *= hn
        ks *= wn
        ks += hn
    return y.reshape(x.shape), {"k": k.reshape(x.shape)}


def gelu_tanh_backward(dy, cache):
    return (dy * cache["k"],)


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
    """Rows are independent: each block of rows (about 256 KiB) goes through all its passes
    while in cache. Per block: the mean as one matrix-vector product, x - mean into xhat (the
    cache), the variance of it as one einsum, xhat scaled in place, y = xhat * weight + bias."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    N = x2.shape[0]
    xhat, y = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty(N, dtype=x2.dtype)
    mean_of = np.full(D, 1.0 / D, dtype=x2.dtype)
    for r in _blocks(N, D * x2.itemsize):
        xr, hr, yr, sr = x2[r], xhat[r], y[r], rstd[r]
        np.subtract(xr, (xr @ mean_of)[:, None], out=hr)
        np.einsum("nd,nd->n", hr, hr, out=sr)
        sr *= 1.0 / D
        sr += eps
        np.sqrt(sr, out=sr)
        np.divide(1, sr, out=sr)
        hr *= sr[:, None]
        np.multiply(hr, weight, out=yr)
        yr += bias
    return y.reshape(x.shape), {"xhat": xhat, "rstd": rstd, "weight": weight}


def layer_norm_backward(dy, cache):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight, block by block of
    rows: mean(g) and mean(g * xhat) as matrix-vector products with weight, the parameter
    gradients summed over the blocks."""
    xhat, rstd, weight = cache["xhat"], cache["rstd"], cache["weight"]
    N, D = xhat.shape
    dy2 = dy.reshape(N, D)
    dx = np.empty_like(dy2)
    dweight = np.zeros(D, dtype=dy2.dtype)
    dbias = np.zeros(D, dtype=dy2.dtype)
    blocks = _blocks(N, D * dy2.itemsize)
    work = np.empty((min(N, blocks[0].stop) if blocks else 0, D), dtype=dy2.dtype)
    for r in blocks:
        g, h, o, s = dy2[r], xhat[r], dx[r], rstd[r]
        t = work[: g.shape[0]]
        dbias += g.sum(axis=0)
        np.multiply(g, h, out=t)
        dweight += t.sum(axis=0)
        b = t @ weight  # D * mean(g * xhat)
        b *= s
        b *= -1.0 / D
        a = g @ weight  # D * mean(g)
        a *= s
        a *= -1.0 / D
        np.multiply(h, b[:, None], out=t)
        np.multiply(g, weight, out=o)
        o *= s[:, None]
        o += t
        o += a[:, None]
    return dx.reshape(dy.shape), dweight, dbias


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
    if k == s == 2 and p == 0:
        y, idx = _max_pool_2x2(x)
        return y, {"idx": idx, "geom": (N, C, H, W, k, s, p)}
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


def _max_pool_2x2(x):
    """2x2 windows, stride 2: the maxima of the four strided sub-grids x00, x01, x10, x11
    (window offsets 0..3) taken pairwise, max(max(x00, x01), max(x10, x11)), with the window
    offset of the first maximum as uint8 (a later offset wins only when strictly greater)."""
    OH, OW = x.shape[2] // 2, x.shape[3] // 2
    v = x[:, :, : 2 * OH, : 2 * OW]
    x00, x01 = v[:, :, 0::2, 0::2], v[:, :, 0::2, 1::2]
    x10, x11 = v[:, :, 1::2, 0::2], v[:, :, 1::2, 1::2]
    top = np.maximum(x00, x01)
    i_top = np.greater(x01, x00).view(np.uint8)  # offset 0 or 1
    bottom = np.maximum(x10, x11)
    i_bottom = np.greater(x11, x10).view(np.uint8)  # offset 2 or 3, less 2
    lower = np.greater(bottom, top).view(np.uint8)
    y = np.maximum(top, bottom, out=top)
    # idx = 2 + i_bottom where lower, else i_top: i_top ^ (lower & (i_top ^ i_bottom)) | 2 lower
    i_bottom ^= i_top
    i_bottom &= lower
    i_top ^= i_bottom
    lower <<= 1
    i_top |= lower
    return y, i_top


def max_pool2d_backward(dy, cache):
    idx = cache["idx"]
    N, C, H, W, k, s, p = cache["geom"]
    OH, OW = idx.shape[2:]
    # windows that tile the input leave no position unwritten: no zero fill
    tiled = s == k and p == 0 and H == k * OH and W == k * OW
    dxp = (np.empty if tiled else np.zeros)((N, C, H + 2 * p, W + 2 * p), dtype=dy.dtype)
    hit = np.empty(idx.shape, dtype=bool)
    for o in range(k * k):
        a, b = divmod(o, k)
        dst = dxp[:, :, a : a + s * (OH - 1) + 1 : s, b : b + s * (OW - 1) + 1 : s]
        np.equal(idx, o, out=hit)
        if s >= k:  # windows do not overlap: write, do not accumulate
            np.multiply(dy, hit, out=dst)
        else:
            dst += dy * hit
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
