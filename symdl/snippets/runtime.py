"""Argument checks copied into every generated module (which depends on NumPy alone).

Each function below is embedded verbatim, by its source; it may use ``np`` and the generated
module's ``NAME`` (the layer's name) and nothing else from outside its body.
"""

import numpy as np

NAME = "layer"


def _float_arg(name, value, dtype=None):
    """``value`` as a floating-point array (of ``dtype`` when given)."""
    try:
        array = np.asarray(value)
    except ValueError as err:
        raise ValueError(f"{NAME}: argument {name!r} requires an array, got {err}") from None
    if dtype is None:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(
                f"{NAME}: argument {name!r} requires a floating-point array, got dtype "
                f"{array.dtype}"
            )
        return array
    numeric = (np.floating, np.integer, np.bool_)
    if not any(np.issubdtype(array.dtype, kind) for kind in numeric):
        raise TypeError(
            f"{NAME}: argument {name!r} requires a numeric array, got dtype {array.dtype}"
        )
    return array.astype(dtype, copy=False)


def _int_arg(name, value):
    """``value`` as an integer array."""
    try:
        array = np.asarray(value)
    except ValueError as err:
        raise ValueError(f"{NAME}: argument {name!r} requires an array, got {err}") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{NAME}: argument {name!r} requires an integer array, got dtype {array.dtype}"
        )
    return array


def _common_dtype(arrays):
    """The one floating dtype shared by the differentiable arguments."""
    dtypes = {name: array.dtype for name, array in arrays.items()}
    first = next(iter(dtypes.values()))
    for name, dtype in dtypes.items():
        if dtype != first:
            listed = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
            raise TypeError(f"{NAME}: arguments require one floating dtype, got {listed}")
    return first


def _bind_shapes(arrays, shapes, sizes=None):
    """Check each array's shape against its dimension names; return the size of each name.

    A "..." stands for any number of batch dimensions, shared by every argument. ``sizes``
    holds sizes already bound (from other arguments) to check against.
    """
    sizes = {} if sizes is None else sizes
    source = {dim: "the other arguments" for dim in sizes}
    for name, array in arrays.items():
        dims = shapes[name]
        shape = array.shape
        if "..." in dims:
            k = dims.index("...")
            after = len(dims) - 1 - k
            if len(shape) < len(dims) - 1:
                raise ValueError(
                    f"{NAME}: argument {name!r} requires at least {len(dims) - 1} dimensions "
                    f"({', '.join(dims)}), got shape {shape}"
                )
            batch = shape[k : len(shape) - after]
            pairs = list(zip(dims[:k], shape[:k])) + [("...", batch)]
            pairs += list(zip(dims[k + 1 :], shape[len(shape) - after :]))
        else:
            if len(shape) != len(dims):
                raise ValueError(
                    f"{NAME}: argument {name!r} requires {len(dims)} dimensions "
                    f"({', '.join(dims)}), got shape {shape}"
                )
            pairs = list(zip(dims, shape))
        for dim, size in pairs:
            if dim in sizes and sizes[dim] != size:
                expected = tuple(sizes.get(d, "?") for d in dims)
                raise ValueError(
                    f"{NAME}: argument {name!r} expected shape ({', '.join(dims)}) = "
                    f"{expected}, got {shape}: dimension {dim!r} is {sizes[dim]} in "
                    f"{source[dim]!r} but {size} here"
                )
            sizes[dim] = size
            source.setdefault(dim, name)
            factor, _, base = dim.partition("*")
            if base and factor.isdigit():  # a stacked axis such as "4*H"
                k = int(factor)
                if base not in sizes and size % k == 0:
                    sizes[base] = size // k
                    source[base] = name
                if base not in sizes:
                    raise ValueError(
                        f"{NAME}: argument {name!r} expected shape ({', '.join(dims)}), got "
                        f"{shape}: dimension {dim!r} requires a multiple of {k}, got {size}"
                    )
                if sizes[base] * k != size:
                    raise ValueError(
                        f"{NAME}: argument {name!r} expected shape ({', '.join(dims)}), got "
                        f"{shape}: dimension {dim!r} requires {k} * {base} = "
                        f"{k * sizes[base]}, got {size}"
                    )
    return sizes


def _check_dout(name, value, shape, dtype):
    """The incoming gradient of output ``name``, checked against the output's shape."""
    array = np.asarray(value)
    if array.shape != tuple(shape):
        raise ValueError(
            f"{NAME}: the gradient of output {name!r} requires shape {tuple(shape)}, "
            f"got {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"{NAME}: the gradient of output {name!r} requires a floating-point array, "
            f"got dtype {array.dtype}"
        )
    return array.astype(dtype, copy=False)


def _check_index(name, array, size):
    """Integer indices must lie in [0, size)."""
    if array.size and (array.min() < 0 or array.max() >= size):
        raise ValueError(
            f"{NAME}: argument {name!r} requires integers in [0, {size}), got values in "
            f"[{array.min()}, {array.max()}]"
        )


def _argmax_mask(values, axes):
    """1 at the first maximum over the trailing ``axes`` axes of ``values``, else 0."""
    lead = values.shape[: values.ndim - axes]
    flat = values.reshape(lead + (-1,))
    first = flat.argmax(axis=-1)
    mask = np.arange(flat.shape[-1]) == first[..., None]
    return mask.reshape(values.shape).astype(values.dtype)


def _blocks(array, *shape):
    """``array`` with an axis split into blocks (``shape``), as a view to write through:
    setting a view's shape raises where a copy would be needed, never copies."""
    view = array.view()
    view.shape = shape
    return view


def _cache_blocks(array):
    """Slices along the first axis of ``array`` covering it in blocks of about 256 KiB, so that a
    chain of elementwise passes over them stays in cache; one slice of the whole for an array
    of at most 1 MiB (or a single row), where the loop would gain nothing."""
    n = array.shape[0]
    if array.nbytes <= 1 << 20 or n < 2:
        return (slice(None),)
    rows = max(1, (1 << 18) // (array.nbytes // n))
    return [slice(k, k + rows) for k in range(0, n, rows)]


def _sigmoid(x, out=None):
    """The logistic function 1 / (1 + exp(-x)); exp(-x) overflowing to inf gives exactly 0.
    Computed in one buffer (``out`` when given, which may be ``x`` itself)."""
    with np.errstate(over="ignore"):
        if np.ndim(x) == 0 and out is None:
            return 1 / (1 + np.exp(-x))
        if out is None and np.asarray(x).dtype.kind != "f":
            x = np.asarray(x, dtype=np.float64)
        out = np.negative(x, out=out)
        np.exp(out, out=out)
        out += 1
        return np.divide(1, out, out=out)


def _number(name, value, kind):
    """A hyperparameter as a Python ``float``, ``int`` or ``bool``."""
    if kind is bool:
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(
            f"{NAME}: hyperparameter {name!r} requires a number, got {type(value).__name__}"
        )
    if not np.isfinite(value):
        raise ValueError(f"{NAME}: hyperparameter {name!r} requires a finite number, got {value}")
    if kind is int and value != int(value):
        raise ValueError(f"{NAME}: hyperparameter {name!r} requires an integer, got {value}")
    return kind(value)
