"""Independent reference implementations used to check the generated modules.

Three registries, keyed by layer name:

``TORCH[name](torch, *args, **kw)``
    Calls the corresponding PyTorch function.  ``torch`` is passed in so this
    module never imports torch itself (tests must be able to import this file
    where torch is absent).  Positional args are float64 tensors (the caller
    sets ``requires_grad``); integer keyword args arrive as int64 tensors,
    float keyword targets as float64 tensors, hyperparameters as Python floats.

``NUMPY[name](*args, **kw)``
    A plain NumPy/SciPy forward written from the textbook formula, with no
    dependence on symdl.  Accurate to ~1e-12 relative in float64 for |x| <= 5.

``DOMAINS[name](rng, dtype=np.float64) -> (args, kwargs)``
    Random valid inputs, every dimension a distinct size, values kept away
    from kinks / branch points so that finite-difference and cross-library
    comparisons are well conditioned.

Positional args follow the module ARGS order (differentiable inputs, then
parameters); keyword-only args are constants and hyperparameters.  Losses
return 0-d arrays (mean reduction unless stated).
"""

import math

import numpy as np
from scipy import special

__all__ = ["TORCH", "NUMPY", "DOMAINS", "NAMES"]

# SELU constants (Klambauer et al. 2017), as used by PyTorch.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _F(torch):
    return torch.nn.functional


# ---------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------

TORCH = {
    # activations
    "sigmoid": lambda torch, x: torch.sigmoid(x),
    "tanh": lambda torch, x: torch.tanh(x),
    "relu": lambda torch, x: _F(torch).relu(x),
    "silu": lambda torch, x: _F(torch).silu(x),
    "softsign": lambda torch, x: _F(torch).softsign(x),
    "selu": lambda torch, x: _F(torch).selu(x),
    "mish": lambda torch, x: _F(torch).mish(x),
    "leaky_relu": lambda torch, x, negative_slope=0.01: _F(torch).leaky_relu(
        x, negative_slope=negative_slope
    ),
    "elu": lambda torch, x, alpha=1.0: _F(torch).elu(x, alpha=alpha),
    "gelu": lambda torch, x: _F(torch).gelu(x),
    "gelu_tanh": lambda torch, x: _F(torch).gelu(x, approximate="tanh"),
    "softplus": lambda torch, x: _F(torch).softplus(x),
    # dense layers
    "linear": lambda torch, x, weight, bias: _F(torch).linear(x, weight, bias),
    "bilinear": lambda torch, x1, x2, weight, bias: _F(torch).bilinear(
        x1, x2, weight, bias
    ),
    "embedding": lambda torch, weight, indices: _F(torch).embedding(indices, weight),
    # normalisers
    "softmax": lambda torch, x: _F(torch).softmax(x, dim=-1),
    "log_softmax": lambda torch, x: _F(torch).log_softmax(x, dim=-1),
    # losses
    "mse_loss": lambda torch, input, target: _F(torch).mse_loss(input, target),
    "huber_loss": lambda torch, input, target, delta=1.0: _F(torch).huber_loss(
        input, target, delta=delta
    ),
    "cross_entropy": lambda torch, logits, target: _F(torch).cross_entropy(
        logits, target
    ),
    "nll_loss": lambda torch, log_probs, target: _F(torch).nll_loss(log_probs, target),
    "binary_cross_entropy_with_logits": lambda torch, logits, target: _F(
        torch
    ).binary_cross_entropy_with_logits(logits, target),
    "kl_div": lambda torch, input, target: _F(torch).kl_div(
        input, target, reduction="batchmean"
    ),
    "gaussian_nll_loss": lambda torch, input, var, target, eps=1e-6: _F(
        torch
    ).gaussian_nll_loss(input, target, var, eps=eps),
    # penalties
    "l1_penalty": lambda torch, w, lam: lam * w.abs().sum(),
    "l2_penalty": lambda torch, w, lam: lam / 2 * (w * w).sum(),
    # GAN losses
    "gan_discriminator_loss": lambda torch, real_logits, fake_logits: (
        _F(torch).binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        )
        + _F(torch).binary_cross_entropy_with_logits(
            fake_logits, torch.zeros_like(fake_logits)
        )
    ),
    "gan_generator_loss": lambda torch, fake_logits: _F(
        torch
    ).binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits)),
}


# ---------------------------------------------------------------------------
# Plain NumPy / SciPy references
# ---------------------------------------------------------------------------

def _a(x):
    return np.asarray(x)


def _softplus(x):
    """log(1 + exp(x)), exact for all x (no threshold)."""
    return np.logaddexp(0.0, x)


def _log_softmax(x):
    x = _a(x)
    return x - special.logsumexp(x, axis=-1, keepdims=True)


def _softmax(x):
    x = _a(x)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _bce_logits(x, t):
    """Elementwise -[t log sigmoid(x) + (1-t) log(1 - sigmoid(x))]."""
    x = _a(x)
    t = _a(t)
    # log(1 + exp(x)) - t x  ==  max(x,0) - t x + log1p(exp(-|x|))
    return np.maximum(x, 0.0) - t * x + np.log1p(np.exp(-np.abs(x)))


def np_sigmoid(x):
    return special.expit(_a(x))


def np_tanh(x):
    return np.tanh(_a(x))


def np_relu(x):
    x = _a(x)
    return np.where(x > 0, x, np.zeros_like(x))


def np_silu(x):
    x = _a(x)
    return x * special.expit(x)


def np_softsign(x):
    x = _a(x)
    return x / (1.0 + np.abs(x))


def np_selu(x):
    x = _a(x)
    return SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0.0)))


def np_mish(x):
    x = _a(x)
    return x * np.tanh(_softplus(x))


def np_leaky_relu(x, negative_slope=0.01):
    x = _a(x)
    return np.where(x > 0, x, negative_slope * x)


def np_elu(x, alpha=1.0):
    x = _a(x)
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def np_gelu(x):
    # x * Phi(x) = 0.5 x (1 + erf(x/sqrt2)) = 0.5 x erfc(-x/sqrt2); the erfc
    # form avoids the cancellation in 1 + erf(.) for negative x.
    x = _a(x)
    return 0.5 * x * special.erfc(-x / math.sqrt(2.0))


def np_gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3);
    # 1 + tanh(u) == 2 sigmoid(2u), which avoids cancellation for negative x.
    x = _a(x)
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)
    return x * special.expit(2.0 * u)


def np_softplus(x):
    return _softplus(_a(x))


def np_linear(x, weight, bias):
    x, weight, bias = _a(x), _a(weight), _a(bias)
    return x @ weight.T + bias


def np_bilinear(x1, x2, weight, bias):
    x1, x2, weight, bias = _a(x1), _a(x2), _a(weight), _a(bias)
    n, out = x1.shape[0], weight.shape[0]
    y = np.empty((n, out), dtype=np.result_type(x1, x2, weight, bias))
    for i in range(n):
        for o in range(out):
            y[i, o] = x1[i] @ weight[o] @ x2[i] + bias[o]
    return y


def np_embedding(weight, indices):
    weight = _a(weight)
    indices = _a(indices).astype(np.int64)
    return weight[indices]


def np_softmax(x):
    return _softmax(x)


def np_log_softmax(x):
    return _log_softmax(x)


def np_mse_loss(input, target):
    d = _a(input) - _a(target)
    return np.asarray(np.mean(d * d))


def np_huber_loss(input, target, delta=1.0):
    d = np.abs(_a(input) - _a(target))
    elem = np.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta))
    return np.asarray(np.mean(elem))


def np_cross_entropy(logits, target):
    lp = _log_softmax(logits)
    target = _a(target).astype(np.int64)
    picked = np.array([lp[i, target[i]] for i in range(lp.shape[0])])
    return np.asarray(-np.mean(picked))


def np_nll_loss(log_probs, target):
    lp = _a(log_probs)
    target = _a(target).astype(np.int64)
    picked = np.array([lp[i, target[i]] for i in range(lp.shape[0])])
    return np.asarray(-np.mean(picked))


def np_binary_cross_entropy_with_logits(logits, target):
    return np.asarray(np.mean(_bce_logits(logits, target)))


def np_kl_div(input, target):
    input, target = _a(input), _a(target)
    # sum over everything of target * (log target - input), divided by batch N;
    # xlogy makes 0 * log 0 == 0.
    total = np.sum(special.xlogy(target, target) - target * input)
    return np.asarray(total / input.shape[0])


def np_gaussian_nll_loss(input, var, target, eps=1e-6):
    input, var, target = _a(input), _a(var), _a(target)
    v = np.maximum(var, eps)
    elem = 0.5 * (np.log(v) + (input - target) ** 2 / v)
    return np.asarray(np.mean(elem))


def np_l1_penalty(w, lam):
    return np.asarray(lam * np.sum(np.abs(_a(w))))


def np_l2_penalty(w, lam):
    w = _a(w)
    return np.asarray(lam / 2.0 * np.sum(w * w))


def np_gan_discriminator_loss(real_logits, fake_logits):
    real = _a(real_logits)
    fake = _a(fake_logits)
    return np.asarray(
        np.mean(_bce_logits(real, np.ones_like(real)))
        + np.mean(_bce_logits(fake, np.zeros_like(fake)))
    )


def np_gan_generator_loss(fake_logits):
    fake = _a(fake_logits)
    return np.asarray(np.mean(_bce_logits(fake, np.ones_like(fake))))


NUMPY = {
    "sigmoid": np_sigmoid,
    "tanh": np_tanh,
    "relu": np_relu,
    "silu": np_silu,
    "softsign": np_softsign,
    "selu": np_selu,
    "mish": np_mish,
    "leaky_relu": np_leaky_relu,
    "elu": np_elu,
    "gelu": np_gelu,
    "gelu_tanh": np_gelu_tanh,
    "softplus": np_softplus,
    "linear": np_linear,
    "bilinear": np_bilinear,
    "embedding": np_embedding,
    "softmax": np_softmax,
    "log_softmax": np_log_softmax,
    "mse_loss": np_mse_loss,
    "huber_loss": np_huber_loss,
    "cross_entropy": np_cross_entropy,
    "nll_loss": np_nll_loss,
    "binary_cross_entropy_with_logits": np_binary_cross_entropy_with_logits,
    "kl_div": np_kl_div,
    "gaussian_nll_loss": np_gaussian_nll_loss,
    "l1_penalty": np_l1_penalty,
    "l2_penalty": np_l2_penalty,
    "gan_discriminator_loss": np_gan_discriminator_loss,
    "gan_generator_loss": np_gan_generator_loss,
}


# ---------------------------------------------------------------------------
# Input domains
# ---------------------------------------------------------------------------

# Distinct sizes for every dimension.
N, IN, OUT, IN1, IN2, V, D, C, M = 3, 5, 4, 2, 6, 7, 5, 6, 2
SHAPE2 = (3, 4)
SHAPE3 = (2, 3, 4)
LAM = 0.3
MARGIN = 0.05  # minimum distance from kinks


def _u(rng, lo, hi, shape, dtype):
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def _away_from_zero(rng, shape, dtype, hi=3.0, margin=MARGIN):
    """Uniform magnitudes in [margin, hi] with random signs (both signs present)."""
    mag = rng.uniform(margin, hi, size=shape)
    sign = rng.choice([-1.0, 1.0], size=shape)
    flat = sign.reshape(-1)
    if flat.size >= 2:  # guarantee both branches are exercised
        flat[0], flat[1] = -1.0, 1.0
    return (mag * sign).astype(dtype)


def _act_domain(shape, **kw):
    def make(rng, dtype=np.float64):
        return (_away_from_zero(rng, shape, dtype),), dict(kw)

    return make


def _smooth_act_domain(shape):
    def make(rng, dtype=np.float64):
        return (_u(rng, -3.0, 3.0, shape, dtype),), {}

    return make


def _make_linear(rng, dtype=np.float64):
    x = _u(rng, -1.0, 1.0, (N, IN), dtype)
    w = _u(rng, -1.0, 1.0, (OUT, IN), dtype)
    b = _u(rng, -1.0, 1.0, (OUT,), dtype)
    return (x, w, b), {}


def _make_bilinear(rng, dtype=np.float64):
    x1 = _u(rng, -1.0, 1.0, (N, IN1), dtype)
    x2 = _u(rng, -1.0, 1.0, (N, IN2), dtype)
    w = _u(rng, -1.0, 1.0, (OUT, IN1, IN2), dtype)
    b = _u(rng, -1.0, 1.0, (OUT,), dtype)
    return (x1, x2, w, b), {}


def _make_embedding(rng, dtype=np.float64):
    weight = _u(rng, -1.0, 1.0, (V, D), dtype)
    indices = rng.integers(0, V, size=(3, 2)).astype(np.int64)
    indices[2, 1] = indices[0, 0]  # guarantee a repeated index
    return (weight,), {"indices": indices}


def _make_softmax(rng, dtype=np.float64):
    return (_u(rng, -3.0, 3.0, (N, C), dtype),), {}


def _make_mse(rng, dtype=np.float64):
    inp = _u(rng, -2.0, 2.0, SHAPE3, dtype)
    tgt = _u(rng, -2.0, 2.0, SHAPE3, dtype)
    return (inp,), {"target": tgt}


def _make_huber(rng, dtype=np.float64):
    delta = 0.8
    inp = rng.uniform(-2.0, 2.0, size=SHAPE2)
    # |input - target| in [0, delta - m] (quadratic branch) or
    # [delta + m, 2.5] (linear branch); first two elements pin one of each.
    # The margin is 0.1 so that float32 rounding cannot cross the kink.
    m = 0.1
    quad = rng.random(SHAPE2) < 0.5
    quad.reshape(-1)[:2] = [True, False]
    mag = np.where(
        quad,
        rng.uniform(0.0, delta - m, size=SHAPE2),
        rng.uniform(delta + m, 2.5, size=SHAPE2),
    )
    diff = mag * rng.choice([-1.0, 1.0], size=SHAPE2)
    tgt = inp - diff
    return (inp.astype(dtype),), {"target": tgt.astype(dtype), "delta": delta}


def _make_cross_entropy(rng, dtype=np.float64):
    logits = _u(rng, -3.0, 3.0, (N, C), dtype)
    target = rng.integers(0, C, size=(N,)).astype(np.int64)
    return (logits,), {"target": target}


def _make_nll(rng, dtype=np.float64):
    log_probs = _log_softmax(rng.uniform(-3.0, 3.0, size=(N, C))).astype(dtype)
    target = rng.integers(0, C, size=(N,)).astype(np.int64)
    return (log_probs,), {"target": target}


def _make_bce_logits(rng, dtype=np.float64):
    logits = _u(rng, -3.0, 3.0, SHAPE2, dtype)
    target = _u(rng, 0.0, 1.0, SHAPE2, dtype)
    return (logits,), {"target": target}


def _make_kl_div(rng, dtype=np.float64):
    inp = _log_softmax(rng.uniform(-3.0, 3.0, size=(N, C))).astype(dtype)
    tgt = _softmax(rng.uniform(-3.0, 3.0, size=(N, C))).astype(dtype)
    return (inp,), {"target": tgt}


def _make_gaussian_nll(rng, dtype=np.float64):
    inp = _u(rng, -2.0, 2.0, SHAPE2, dtype)
    var = _u(rng, 0.5, 2.0, SHAPE2, dtype)
    tgt = _u(rng, -2.0, 2.0, SHAPE2, dtype)
    return (inp, var), {"target": tgt}


def _make_penalty(shape):
    def make(rng, dtype=np.float64):
        # away from 0: |w| has a kink there (l1); harmless for l2
        return (_away_from_zero(rng, shape, dtype, hi=2.0),), {"lam": LAM}

    return make


def _make_gan_disc(rng, dtype=np.float64):
    real = _u(rng, -3.0, 3.0, (N,), dtype)
    fake = _u(rng, -3.0, 3.0, (M,), dtype)
    return (real, fake), {}


def _make_gan_gen(rng, dtype=np.float64):
    return (_u(rng, -3.0, 3.0, (M,), dtype),), {}


DOMAINS = {
    "sigmoid": _smooth_act_domain(SHAPE2),
    "tanh": _smooth_act_domain(SHAPE3),
    "relu": _act_domain(SHAPE2),
    "silu": _smooth_act_domain(SHAPE3),
    "softsign": _act_domain(SHAPE2),  # C^1 at 0 but 2nd derivative jumps
    "selu": _act_domain(SHAPE3),
    "mish": _smooth_act_domain(SHAPE2),
    "leaky_relu": _act_domain(SHAPE3, negative_slope=0.2),
    "elu": _act_domain(SHAPE2, alpha=0.7),
    "gelu": _smooth_act_domain(SHAPE3),
    "gelu_tanh": _smooth_act_domain(SHAPE2),
    "softplus": _smooth_act_domain(SHAPE3),
    "linear": _make_linear,
    "bilinear": _make_bilinear,
    "embedding": _make_embedding,
    "softmax": _make_softmax,
    "log_softmax": _make_softmax,
    "mse_loss": _make_mse,
    "huber_loss": _make_huber,
    "cross_entropy": _make_cross_entropy,
    "nll_loss": _make_nll,
    "binary_cross_entropy_with_logits": _make_bce_logits,
    "kl_div": _make_kl_div,
    "gaussian_nll_loss": _make_gaussian_nll,
    "l1_penalty": _make_penalty(SHAPE2),
    "l2_penalty": _make_penalty(SHAPE3),
    "gan_discriminator_loss": _make_gan_disc,
    "gan_generator_loss": _make_gan_gen,
}


# ---------------------------------------------------------------------------
# Normalization and dropout
# ---------------------------------------------------------------------------


def _np_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _np_rms_norm(x, weight, eps=1e-6):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def _np_batch_norm(x, weight, bias, eps=1e-5):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes).reshape(shape)
    var = x.var(axis=axes).reshape(shape)
    return (x - mean) / np.sqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)


TORCH.update(
    {
        "layer_norm": lambda torch, x, weight, bias, eps=1e-5: _F(torch).layer_norm(
            x, (x.shape[-1],), weight, bias, eps=eps
        ),
        "rms_norm": lambda torch, x, weight, eps=1e-6: _F(torch).rms_norm(
            x, (x.shape[-1],), weight, eps=eps
        ),
        "batch_norm": lambda torch, x, weight, bias, eps=1e-5: _F(torch).batch_norm(
            x, None, None, weight, bias, training=True, eps=eps
        ),
        "dropout": lambda torch, x, mask, p: x * mask / (1 - p),
    }
)
NUMPY.update(
    {
        "layer_norm": _np_layer_norm,
        "rms_norm": _np_rms_norm,
        "batch_norm": _np_batch_norm,
        "dropout": lambda x, mask, p: np.where(mask != 0, x / (1 - p), 0.0),
    }
)


def _make_layer_norm(rng, dtype=np.float64):
    x = rng.standard_normal((2, 3, 5)).astype(dtype)
    return (x, rng.uniform(0.5, 1.5, 5).astype(dtype), rng.standard_normal(5).astype(dtype)), {
        "eps": 1e-5
    }


def _make_rms_norm(rng, dtype=np.float64):
    x = rng.standard_normal((3, 4)).astype(dtype)
    return (x, rng.uniform(0.5, 1.5, 4).astype(dtype)), {"eps": 1e-6}


def _make_batch_norm(rng, dtype=np.float64):
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    return (x, rng.uniform(0.5, 1.5, 3).astype(dtype), rng.standard_normal(3).astype(dtype)), {}


def _make_dropout(rng, dtype=np.float64):
    x = rng.standard_normal((3, 4)).astype(dtype)
    mask = (rng.random((3, 4)) >= 0.25).astype(dtype)
    return (x,), {"mask": mask, "p": 0.25}


DOMAINS.update(
    {
        "layer_norm": _make_layer_norm,
        "rms_norm": _make_rms_norm,
        "batch_norm": _make_batch_norm,
        "dropout": _make_dropout,
    }
)


# ---------------------------------------------------------------------------
# Convolution and pooling (plain loops over output positions)
# ---------------------------------------------------------------------------


def _pad(x, padding, value=0.0):
    width = [(0, 0), (0, 0)] + [(padding, padding)] * (x.ndim - 2)
    return np.pad(x, width, constant_values=value)


def _np_conv2d(x, weight, bias, stride=1, padding=0, dilation=1):
    xp = _pad(x, padding)
    f_, _, kh, kw = weight.shape
    oh = (xp.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    ow = (xp.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    y = np.empty((x.shape[0], f_, oh, ow))
    for i in range(oh):
        for j in range(ow):
            rows = stride * i + dilation * np.arange(kh)
            cols = stride * j + dilation * np.arange(kw)
            patch = xp[:, :, rows][:, :, :, cols]
            y[:, :, i, j] = np.tensordot(patch, weight, axes=([1, 2, 3], [1, 2, 3])) + bias
    return y


def _np_conv1d(x, weight, bias, stride=1, padding=0, dilation=1):
    return _np_conv2d(x[:, :, None, :], weight[:, :, None, :], bias, stride, 0, dilation)[
        :, :, 0
    ] if padding == 0 else _np_conv1d(_pad(x, padding), weight, bias, stride, 0, dilation)


def _np_pool(x, kernel_size, stride=None, padding=0, kind="max"):
    stride = kernel_size if stride is None else stride
    xp = _pad(x, padding, -np.inf if kind == "max" else 0.0)
    oh = (xp.shape[2] - kernel_size) // stride + 1
    ow = (xp.shape[3] - kernel_size) // stride + 1
    y = np.empty(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, stride * i : stride * i + kernel_size, stride * j : stride * j + kernel_size]
            y[:, :, i, j] = win.max(axis=(2, 3)) if kind == "max" else win.mean(axis=(2, 3))
    return y


TORCH.update(
    {
        "conv1d": lambda torch, x, w, b, stride=1, padding=0, dilation=1: _F(torch).conv1d(
            x, w, b, stride=stride, padding=padding, dilation=dilation
        ),
        "conv2d": lambda torch, x, w, b, stride=1, padding=0, dilation=1: _F(torch).conv2d(
            x, w, b, stride=stride, padding=padding, dilation=dilation
        ),
        "max_pool2d": lambda torch, x, kernel_size, stride=None, padding=0: _F(torch).max_pool2d(
            x, kernel_size, stride, padding
        ),
        "avg_pool2d": lambda torch, x, kernel_size, stride=None, padding=0: _F(torch).avg_pool2d(
            x, kernel_size, stride, padding
        ),
    }
)
NUMPY.update(
    {
        "conv1d": _np_conv1d,
        "conv2d": _np_conv2d,
        "max_pool2d": lambda x, **kw: _np_pool(x, kind="max", **kw),
        "avg_pool2d": lambda x, **kw: _np_pool(x, kind="avg", **kw),
    }
)
DOMAINS.update(
    {
        "conv1d": lambda rng, dtype=np.float64: (
            tuple(
                rng.standard_normal(s).astype(dtype) for s in [(2, 3, 11), (4, 3, 3), (4,)]
            ),
            {"stride": 2, "padding": 1, "dilation": 2},
        ),
        "conv2d": lambda rng, dtype=np.float64: (
            tuple(
                rng.standard_normal(s).astype(dtype)
                for s in [(2, 3, 7, 6), (4, 3, 3, 2), (4,)]
            ),
            {"stride": 2, "padding": 1},
        ),
        "max_pool2d": lambda rng, dtype=np.float64: (
            (rng.standard_normal((2, 3, 5, 6)).astype(dtype),),
            {"kernel_size": 2, "stride": 1, "padding": 1},
        ),
        "avg_pool2d": lambda rng, dtype=np.float64: (
            (rng.standard_normal((2, 3, 5, 6)).astype(dtype),),
            {"kernel_size": 3, "stride": 2, "padding": 1},
        ),
    }
)


# ---------------------------------------------------------------------------
# Recurrent cells (PyTorch's gate order)
# ---------------------------------------------------------------------------


def _sig(x):
    return special.expit(x)


def _np_rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    return np.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)


def _np_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    gi = x @ w_ih.T + b_ih
    gh = h @ w_hh.T + b_hh
    i_r, i_z, i_n = np.split(gi, 3, axis=1)
    h_r, h_z, h_n = np.split(gh, 3, axis=1)
    r, z = _sig(i_r + h_r), _sig(i_z + h_z)
    n = np.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _np_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = np.split(gates, 4, axis=1)
    c1 = _sig(f) * c + _sig(i) * np.tanh(g)
    return _sig(o) * np.tanh(c1), c1


def _make_cell(gates, with_c=False):
    def make(rng, dtype=np.float64):
        b, i, h = 3, 5, 4
        shapes = [(b, i), (b, h)] + ([(b, h)] if with_c else [])
        shapes += [(gates * h, i), (gates * h, h), (gates * h,), (gates * h,)]
        return tuple((0.5 * rng.standard_normal(s)).astype(dtype) for s in shapes), {}

    return make


TORCH.update(
    {
        "rnn_cell": lambda torch, x, h, *w: torch.rnn_tanh_cell(x, h, *w),
        "gru_cell": lambda torch, x, h, *w: torch.gru_cell(x, h, *w),
        "lstm_cell": lambda torch, x, h, c, *w: tuple(torch.lstm_cell(x, (h, c), *w)),
    }
)
NUMPY.update({"rnn_cell": _np_rnn_cell, "gru_cell": _np_gru_cell, "lstm_cell": _np_lstm_cell})
DOMAINS.update(
    {
        "rnn_cell": _make_cell(1),
        "gru_cell": _make_cell(3),
        "lstm_cell": _make_cell(4, with_c=True),
    }
)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def _np_softmax_rows(s, allowed):
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(allowed, np.exp(s - m), 0.0)
    z = e.sum(axis=-1, keepdims=True)
    return e / np.where(z > 0, z, 1.0)


def _np_sdpa(q, k, v, mask=None, causal=False, scale=None):
    """PyTorch's attn_mask: True = attend when boolean, added to the scores when float."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    shape = (q.shape[1], k.shape[1])
    mask = np.zeros(shape) if mask is None else np.asarray(mask)
    if mask.dtype == bool:
        mask = np.where(mask, 0.0, -np.inf)
    allowed = mask > -np.inf
    if causal:
        allowed = allowed & np.tril(np.ones_like(allowed))
    p = _np_softmax_rows(q @ k.transpose(0, 2, 1) * scale + np.where(allowed, mask, 0.0), allowed)
    return p @ v


def _np_mha(x, wi, bi, wo, bo, num_heads, causal=False):
    n, t, e = x.shape
    d = e // num_heads
    q, k, v = np.split(x @ wi.T + bi, 3, axis=-1)

    def heads(a):
        return a.reshape(n, t, num_heads, d).transpose(0, 2, 1, 3)

    allowed = np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)
    p = _np_softmax_rows(heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(d), allowed)
    a = (p @ heads(v)).transpose(0, 2, 1, 3).reshape(n, t, e)
    return a @ wo.T + bo


def _band(t, window):
    i = np.arange(t)
    return np.abs(i[:, None] - i[None, :]) <= window


def _np_local(q, k, v, window, scale=None):
    return _np_sdpa(q, k, v, mask=_band(q.shape[1], window), scale=scale)


def _np_additive(query, keys, w_query, w_keys, v):
    scores = np.tanh((query @ w_query.T)[:, None, :] + keys @ w_keys.T) @ v
    p = special.softmax(scores, axis=-1)
    return np.einsum("nt,ntd->nd", p, keys)


def _torch_sdpa(torch, q, k, v, mask=None, causal=False, scale=None):
    return _F(torch).scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=bool(causal), scale=scale
    )


def _torch_mha(torch, x, wi, bi, wo, bo, num_heads, causal=False):
    xt = x.transpose(0, 1)
    t = x.shape[1]
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1) if causal else None
    out, _ = _F(torch).multi_head_attention_forward(
        xt, xt, xt, x.shape[2], num_heads, wi, bi, None, None, False, 0.0, wo, bo,
        training=False, need_weights=False, attn_mask=mask,
    )
    return out.transpose(0, 1)


def _torch_local(torch, q, k, v, window, scale=None):
    band = torch.tensor(_band(q.shape[1], window))
    return _F(torch).scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale)


def _torch_additive(torch, query, keys, w_query, w_keys, v):
    scores = torch.tanh((query @ w_query.T)[:, None, :] + keys @ w_keys.T) @ v
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("nt,ntd->nd", p, keys)


def _make_sdpa(rng, dtype=np.float64):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in [(2, 3, 4), (2, 5, 4), (2, 5, 6)])
    mask = rng.random((3, 5)) < 0.7
    mask[np.arange(3), rng.integers(0, 5, 3)] = True  # no fully masked row here
    return (q, k, v), {"mask": mask}


def _make_mha(rng, dtype=np.float64):
    shapes = [(2, 5, 4), (12, 4), (12,), (4, 4), (4,)]
    return tuple((0.5 * rng.standard_normal(s)).astype(dtype) for s in shapes), {"num_heads": 2}


def _make_local(rng, dtype=np.float64):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in [(2, 7, 4), (2, 7, 4), (2, 7, 3)])
    return (q, k, v), {"window": 2}


def _make_additive(rng, dtype=np.float64):
    shapes = [(2, 3), (2, 5, 4), (6, 3), (6, 4), (6,)]
    return tuple(rng.standard_normal(s).astype(dtype) for s in shapes), {}


TORCH.update(
    {
        "scaled_dot_product_attention": _torch_sdpa,
        "multi_head_self_attention": _torch_mha,
        "local_attention": _torch_local,
        "additive_attention": _torch_additive,
    }
)
NUMPY.update(
    {
        "scaled_dot_product_attention": _np_sdpa,
        "multi_head_self_attention": _np_mha,
        "local_attention": _np_local,
        "additive_attention": _np_additive,
    }
)
DOMAINS.update(
    {
        "scaled_dot_product_attention": _make_sdpa,
        "multi_head_self_attention": _make_mha,
        "local_attention": _make_local,
        "additive_attention": _make_additive,
    }
)

NAMES = tuple(NUMPY)

assert set(TORCH) == set(NUMPY) == set(DOMAINS), "registries out of sync"


# ---------------------------------------------------------------------------
# Self-check: NUMPY vs TORCH in float64
# ---------------------------------------------------------------------------

def _to_torch(torch, v, requires_grad=False):
    if isinstance(v, np.ndarray):
        if np.issubdtype(v.dtype, np.integer):
            return torch.as_tensor(v, dtype=torch.int64)
        t = torch.tensor(v, dtype=torch.float64)
        if requires_grad:
            t.requires_grad_(True)
        return t
    return v  # Python scalars (hyperparameters) pass through


def _max_rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = np.maximum(np.abs(b), 1e-300)
    rel = np.where(a == b, 0.0, np.abs(a - b) / denom)
    return float(np.max(rel)) if rel.size else 0.0


def _self_check(seeds=(0, 1, 2, 3, 4), tol=1e-10):
    import torch

    worst = {}
    for name in NAMES:
        worst[name] = (0.0, 0.0)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            args, kw = DOMAINS[name](rng, np.float64)
            for a in args:
                assert a.dtype == np.float64, (name, a.dtype)
            # float32 domains must also be constructible and typed correctly
            args32, kw32 = DOMAINS[name](np.random.default_rng(seed), np.float32)
            for v in list(args32) + list(kw32.values()):
                if isinstance(v, np.ndarray):
                    assert v.dtype in (np.float32, np.int64), (name, v.dtype)

            ref_np = NUMPY[name](*args, **kw)
            targs = [_to_torch(torch, a, requires_grad=True) for a in args]
            tkw = {k: _to_torch(torch, v) for k, v in kw.items()}
            ref_t = TORCH[name](torch, *targs, **tkw)
            ref_t = ref_t.detach().numpy()
            rel = _max_rel(ref_np, ref_t)
            ab = float(np.max(np.abs(np.asarray(ref_np) - ref_t)))
            worst[name] = (max(worst[name][0], rel), max(worst[name][1], ab))

    ok = True
    print(f"{'layer':36s} {'max rel diff':>14s} {'max abs diff':>14s}")
    for name, (rel, ab) in worst.items():
        flag = "" if rel <= tol else "   <-- FAIL"
        ok &= rel <= tol
        print(f"{name:36s} {rel:14.3e} {ab:14.3e}{flag}")
    print("ALL OK" if ok else "MISMATCHES FOUND")
    return ok


if __name__ == "__main__":
    import sys

    sys.exit(0 if _self_check() else 1)


def sequence_args(module, rng, T=4, B=3):
    """Arguments of a generated sequence module: sizes T and B as given, every other dimension
    5 (a stacked one such as "4*H" four times its base), values uniform in [-0.8, 0.8]."""
    sizes = {"T": T, "B": B}
    args = []
    for n in module.ARGS:
        shape = []
        for d in module.SHAPES[n]:
            factor, _, base = d.partition("*")
            if base:
                shape.append(int(factor) * sizes.setdefault(base, 5))
            else:
                shape.append(sizes.setdefault(d, 5))
        args.append(rng.uniform(-0.8, 0.8, tuple(shape)))
    return args
