"""Elementwise activations, any shape: y[...] = f(x[...])."""

import sympy as sp

from ..functions import relu, sigmoid, softplus
from ..spec import ELL, Layer, scalar, tensors

x, y = tensors("x y")
X = x[ELL]
SHAPES = {"x": ("...",), "y": ("...",)}

# SELU's constants (Klambauer et al. 2017), to the precision PyTorch uses.
SELU_ALPHA = sp.Float("1.6732632423543772848170429916717", 32)
SELU_SCALE = sp.Float("1.0507009873554804934193349852946", 32)

alpha = scalar("alpha")
negative_slope = scalar("negative_slope")

# What the tests need: input domains and the kinks to stay away from.
SMOOTH = {"domains": {"x": (-3.0, 3.0)}}
KINK_AT_0 = {"domains": {"x": (-3.0, 3.0)}, "avoid": {"x": (0.0,)}}


def _activation(name, rhs, doc, hyper=None, checks=SMOOTH):
    return Layer(
        name, [(y[ELL], rhs)], inputs="x", hyper=hyper, shapes=SHAPES, doc=doc, checks=checks
    )


LAYERS = [
    _activation("sigmoid", sigmoid(X), "the logistic sigmoid 1 / (1 + exp(-x))"),
    _activation("tanh", sp.tanh(X), "the hyperbolic tangent"),
    _activation("relu", relu(X), "the rectified linear unit max(x, 0)", checks=KINK_AT_0),
    _activation("silu", X * sigmoid(X), "x * sigmoid(x), also called swish"),
    _activation("softsign", X / (1 + sp.Abs(X)), "x / (1 + |x|)", checks=KINK_AT_0),
    _activation(
        "selu",
        SELU_SCALE * sp.Piecewise((X, X > 0), (SELU_ALPHA * (sp.exp(X) - 1), True)),
        "the scaled exponential linear unit",
        checks=KINK_AT_0,
    ),
    _activation("mish", X * sp.tanh(softplus(X)), "x * tanh(softplus(x))"),
    _activation(
        "leaky_relu",
        sp.Piecewise((X, X > 0), (negative_slope * X, True)),
        "x for x > 0, else negative_slope * x",
        hyper={"negative_slope": 0.01},
        checks=KINK_AT_0,
    ),
    _activation(
        "elu",
        sp.Piecewise((X, X > 0), (alpha * (sp.exp(X) - 1), True)),
        "x for x > 0, else alpha * (exp(x) - 1)",
        hyper={"alpha": 1.0},
        checks=KINK_AT_0,
    ),
    _activation("gelu", X / 2 * (1 + sp.erf(X / sp.sqrt(2))), "the Gaussian error linear unit"),
    _activation(
        "gelu_tanh",
        X / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (X + sp.Float("0.044715", 32) * X**3))),
        "the tanh approximation of GELU",
    ),
    _activation("softplus", softplus(X), "log(1 + exp(x)), computed stably"),
]
