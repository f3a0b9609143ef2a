"""Public helper functions a layer may ask for (``Layer(extras=...)``), copied verbatim into its
generated module. Runtime conveniences only: nothing here computes a gradient."""

import numpy as np


def dropout_mask(rng, shape, p, dtype=np.float64):
    """A keep-mask for dropout: 1 with probability 1 - p, else 0, drawn from ``rng``
    (a ``numpy.random.Generator``)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout_mask: p requires 0 <= p < 1, got {p}")
    return (rng.random(shape) >= p).astype(dtype)


def update_running_stats(running_mean, running_var, cache, momentum=0.1):
    """PyTorch's running-statistics rule, from a training-mode forward's cache: returns
    ``(1 - momentum) * running + momentum * batch`` for the mean and the unbiased variance."""
    count = cache["xc"].size // cache["xc"].shape[1]
    unbiased = cache["var"] * (count / max(count - 1, 1))
    new_mean = (1 - momentum) * running_mean + momentum * cache["mu"]
    new_var = (1 - momentum) * running_var + momentum * unbiased
    return new_mean, new_var
