"""Optimizers: update rules as elementwise equations, in the order ``torch.optim`` applies them.

Each equation ``(target, expression)`` sees what the equations above it assigned. ``param`` and
``grad`` are arrays; states are arrays starting at zero or the step counter ``t`` starting at 0
(incremented first, so the first step runs with ``t == 1``); hyperparameters are scalars.
Nothing here is NumPy: the code comes from ``symdl.optim``.

Declarations only: each entry of ``OPTIMIZERS`` holds the keywords of
:class:`symdl.optim.Optimizer` (symdl/registry.py builds the optimizers from them).
"""

import sympy as sp

#: The initial value of an array state: zeros like ``param`` (``symdl.optim.ZEROS``).
ZEROS = "zeros"

param, grad, g = sp.symbols("param grad g")  # g: the gradient after L2 weight decay
exp_avg, exp_avg_sq, square_avg, momentum_buffer, update = sp.symbols(
    "exp_avg exp_avg_sq square_avg momentum_buffer update"
)
t = sp.Symbol("t")
lr, weight_decay, momentum, dampening, alpha, beta1, beta2, eps = sp.symbols(
    "lr weight_decay momentum dampening alpha beta1 beta2 eps"
)
nesterov = sp.Symbol("nesterov")

# LaTeX of the names that are not in symdl.optim.TEX.
TEX = {
    "g": r"\tilde{g}",
    "exp_avg": "m",
    "exp_avg_sq": "v",
    "square_avg": "v",
    "momentum_buffer": "b",
    "update": r"\Delta",
}

NONNEGATIVE = [lr >= 0, weight_decay >= 0]
BETAS = [sp.And(beta1 >= 0, beta1 < 1), sp.And(beta2 >= 0, beta2 < 1), eps >= 0]

# The L2 penalty added to the gradient; like torch (``if weight_decay != 0: grad =
# grad.add(param, alpha=weight_decay)``) it is skipped at 0, so an inf in param stays out of g.
L2 = (g, sp.Piecewise((grad, sp.Eq(weight_decay, 0)), (grad + weight_decay * param, True)))


def adam_moments(gradient):
    """Adam's first and second moments of ``gradient`` (torch: lerp_ and mul_().addcmul_())."""
    return [
        (exp_avg, beta1 * exp_avg + (1 - beta1) * gradient),
        (exp_avg_sq, beta2 * exp_avg_sq + (1 - beta2) * gradient**2),
    ]


# The bias-corrected step in torch's arithmetic: lr / (1 - beta1**t) * m / denom with
# denom = sqrt(v) / sqrt(1 - beta2**t) + eps (eps outside the bias correction).
ADAM_STEP = lr / (1 - beta1**t) * exp_avg / (sp.sqrt(exp_avg_sq) / sp.sqrt(1 - beta2**t) + eps)
ADAM_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


# ``checks`` holds what the tests need: the torch.optim reference and hyperparameter sets on
# which the trajectories are compared.
OPTIMIZERS = [
    {
        "name": "sgd",
        "updates": [L2, (param, param - lr * g)],
        "hyper": {"lr": None, "weight_decay": 0.0},
        "doc": "stochastic gradient descent with optional L2 weight decay",
        "tex": TEX,
        "requires": NONNEGATIVE,
        "checks": {
            "reference": "torch.optim.SGD",
            "cases": [{"lr": 0.1}, {"lr": 0.05, "weight_decay": 0.1}],
        },
    },
    {
        "name": "sgd_momentum",
        "updates": [
            (t, t + 1),
            L2,
            # torch starts the buffer at the first gradient, not at zero
            (
                momentum_buffer,
                sp.Piecewise(
                    (g, sp.Eq(t, 1)),
                    (momentum * momentum_buffer + (1 - dampening) * g, True),
                ),
            ),
            (
                update,
                sp.Piecewise((g + momentum * momentum_buffer, nesterov), (momentum_buffer, True)),
            ),
            (param, param - lr * update),
        ],
        "hyper": {
            "lr": None,
            "momentum": None,
            "dampening": 0.0,
            "nesterov": False,
            "weight_decay": 0.0,
        },
        "state": {"momentum_buffer": ZEROS, "t": 0},
        "doc": "SGD with (optionally Nesterov) momentum and L2 weight decay",
        "tex": TEX,
        "requires": [
            *NONNEGATIVE,
            momentum > 0,
            dampening >= 0,
            sp.Or(sp.Not(nesterov), sp.Eq(dampening, 0)),
        ],
        "checks": {
            "reference": "torch.optim.SGD",
            "cases": [
                {"lr": 0.05, "momentum": 0.9},
                {"lr": 0.05, "momentum": 0.9, "nesterov": True},
                {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1},
                {"lr": 0.05, "momentum": 0.7, "nesterov": True, "weight_decay": 0.05},
            ],
        },
    },
    {
        "name": "rmsprop",
        "updates": [
            L2,
            (square_avg, alpha * square_avg + (1 - alpha) * g**2),
            (param, param - lr * g / (sp.sqrt(square_avg) + eps)),
        ],
        "hyper": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0},
        "state": {"square_avg": ZEROS},
        "doc": "RMSprop (not centered, no momentum) with L2 weight decay; eps outside the sqrt",
        "tex": TEX,
        "requires": [*NONNEGATIVE, alpha >= 0, eps >= 0],
        "checks": {
            "reference": "torch.optim.RMSprop",
            "cases": [{}, {"lr": 0.003, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.1}],
        },
    },
    {
        "name": "adam",
        "updates": [(t, t + 1), L2, *adam_moments(g), (param, param - ADAM_STEP)],
        "hyper": {**ADAM_HYPER, "weight_decay": 0.0},
        "state": {"exp_avg": ZEROS, "exp_avg_sq": ZEROS, "t": 0},
        "doc": "Adam (Kingma and Ba, 2015) with L2 weight decay added to the gradient",
        "tex": TEX,
        "requires": [*NONNEGATIVE, *BETAS],
        "checks": {
            "reference": "torch.optim.Adam",
            "cases": [
                {},
                {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1},
            ],
        },
    },
    {
        "name": "adamw",
        "updates": [
            (t, t + 1),
            *adam_moments(grad),
            # decoupled weight decay: torch multiplies param by (1 - lr*weight_decay) first
            (param, param * (1 - lr * weight_decay) - ADAM_STEP),
        ],
        "hyper": {**ADAM_HYPER, "weight_decay": 1e-2},
        "state": {"exp_avg": ZEROS, "exp_avg_sq": ZEROS, "t": 0},
        "doc": "AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay",
        "tex": TEX,
        "requires": [*NONNEGATIVE, *BETAS],
        "checks": {
            "reference": "torch.optim.AdamW",
            "cases": [
                {},
                {"lr": 0.01, "beta1": 0.85, "beta2": 0.95, "eps": 1e-7, "weight_decay": 0.2},
            ],
        },
    },
]
