"""Check any module that meets the generated-module contract against finite differences.

Gradients are checked by projection, in float64: for random directions ``u`` (on the
arguments) and ``v`` (on the outputs), ``<u, backward(v)>`` must equal the central difference
of ``<v, forward(x + h u)>``. The forward is checked first (finite, right shape, right dtype),
so a failure is labelled "forward" or "gradient of ARG".
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Mapping

import numpy as np

#: Sizes given to dimensions, in order, so that no two dimensions share a size.
DISTINCT_SIZES = (3, 4, 5, 2, 6, 7, 8, 9, 10, 11)


def load_module(source: str, name: str) -> types.ModuleType:
    """Import generated module text (symdl's own output) as a module object."""
    module = types.ModuleType(name)
    module.__file__ = f"<symdl:{name}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - generated code
    return module


@dataclasses.dataclass
class GradcheckResult:
    """Max relative error of each argument's gradient, and whether all are within tolerance."""

    name: str
    errors: dict[str, float]
    tolerance: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(e <= self.tolerance for e in self.errors.values())

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        errs = ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        extra = "; ".join(self.problems)
        return f"{self.name}: {status} (max rel. error {errs}){'; ' + extra if extra else ''}"


def dimension_sizes(module, sizes: Mapping[str, int] | None = None) -> dict:
    """A distinct size per dimension name of ``module.SHAPES`` ('...' gets a 2-D batch)."""
    out: dict = {"...": (2, 3)}
    k = 0
    stacked = []
    for dims in module.SHAPES.values():
        for d in dims:
            factor, _, base = d.partition("*")
            if base and factor.isdigit():
                stacked.append((d, int(factor), base))
            elif d not in out:
                out[d] = DISTINCT_SIZES[k % len(DISTINCT_SIZES)]
                k += 1
    out.update(sizes or {})
    for d, factor, base in stacked:  # "4*H": four times H
        out[d] = factor * out[base]
    return out


def _shape(dims, sizes):
    shape: tuple = ()
    for d in dims:
        shape += tuple(sizes[d]) if d == "..." else (sizes[d],)
    return shape


def random_inputs(module, rng, checks: Mapping | None = None, sizes=None, dtype=np.float64):
    """Random arguments for ``module``: floats in each argument's domain (default [-1, 1])
    kept away from the points in ``checks["avoid"]``; integer indices in range; hyperparameters
    from ``checks["hyper"]`` or their defaults. Returns ``(args, kwargs)``."""
    checks = dict(checks or {})
    domains = checks.get("domains", {})
    avoid = checks.get("avoid", {})
    sizes = dimension_sizes(module, {**checks.get("sizes", {}), **(sizes or {})})
    index_ranges = getattr(module, "INDEX_RANGES", {})
    values = {}
    for name in list(module.ARGS) + list(module.CONSTS):
        shape = _shape(module.SHAPES[name], sizes)
        if name in index_ranges:
            values[name] = rng.integers(0, sizes[index_ranges[name]], size=shape)
            continue
        lo, hi = domains.get(name, (-1.0, 1.0))
        x = rng.uniform(lo, hi, size=shape)
        for point in avoid.get(name, ()):
            if isinstance(point, (int, float)):
                near = np.abs(x - point) < 0.1
                x = np.where(near, point + np.sign(x - point + 1e-300) * 0.1 + (x - point), x)
        values[name] = x.astype(dtype)
    hyper = {}
    for name, default in module.HYPERPARAMETERS.items():
        hyper[name] = checks.get("hyper", {}).get(name, default)
    args = tuple(values[n] for n in module.ARGS)
    kwargs = {n: values[n] for n in module.CONSTS}
    kwargs.update(hyper)
    return args, kwargs


def required_hyperparameters(module) -> tuple[str, ...]:
    """The hyperparameters ``module.forward`` has no default for (keyword-only, required)."""
    hyper = getattr(module, "HYPERPARAMETERS", {})
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin or C function
        return ()
    return tuple(p.name for p in params if p.name in hyper and p.default is p.empty)


def _inputs_that_fit(module, rng, checks):
    """Random inputs; when a window does not fit them (a convolution's kernel larger than its
    input), try again with small parameter dimensions and large input dimensions."""
    args, kwargs = random_inputs(module, rng, checks)
    try:
        module.forward(*args, **kwargs)
        return args, kwargs
    except (ValueError, TypeError):  # (a TypeError is reported by gradcheck's own call)
        pass
    params = set(getattr(module, "PARAMS", ()))
    sizes = {}
    for name in list(module.ARGS) + list(module.CONSTS):
        for d in module.SHAPES[name]:
            if d != "..." and "*" not in d and d not in sizes:
                sizes[d] = 2 + len(sizes) % 2 if name in params else 9 + len(sizes)
    return random_inputs(module, rng, checks, sizes={**sizes, **dict(checks or {}).get("sizes", {})})


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def gradcheck(
    module,
    args=None,
    kwargs=None,
    *,
    rng=None,
    checks: Mapping | None = None,
    eps: float = 1e-6,
    tol: float = 1e-6,
    directions: int = 3,
) -> GradcheckResult:
    """Central-difference check of ``module.backward`` in float64.

    For each argument separately and ``directions`` random directions, compares
    ``<u, grad>`` with ``(<v, f(x + eps u)> - <v, f(x - eps u)>) / (2 eps)``; the error is
    ``|a - b| / max(|a|, |b|, 1e-8 * scale)``. Returns a :class:`GradcheckResult`.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    name = getattr(module, "NAME", getattr(module, "__name__", "module"))
    if args is None:
        given = dict(checks or {}).get("hyper", {})
        missing = [n for n in required_hyperparameters(module) if given.get(n) is None]
        if missing:
            problem = (
                f"hyperparameter {missing[0]!r} requires a value, got none (it has no "
                f"default): give it as checks={{'hyper': {{{missing[0]!r}: ...}}}}"
            )
            return GradcheckResult(name, {}, tol, [problem])
        args, kwargs = _inputs_that_fit(module, rng, checks)
    kwargs = dict(kwargs or {})
    args = tuple(np.asarray(a, dtype=np.float64) for a in args)
    problems: list[str] = []
    try:
        out, cache = module.forward(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported, not hidden
        return GradcheckResult(name, {}, tol, [f"forward raised {type(err).__name__}: {err}"])
    outs = _as_tuple(out)
    for k, o in enumerate(outs):
        if not np.all(np.isfinite(o)):
            problems.append(f"forward: output {k} is not finite")
        if np.asarray(o).dtype != np.float64:
            problems.append(f"forward: output {k} has dtype {np.asarray(o).dtype}, not float64")
    vs = tuple(rng.standard_normal(np.shape(o)) for o in outs)
    grads = module.backward(vs if len(vs) > 1 else vs[0], cache)
    if len(grads) != len(args):
        problems.append(f"backward returned {len(grads)} gradients for {len(args)} arguments")
        return GradcheckResult(name, {}, tol, problems)

    def objective(xs):
        o, _ = module.forward(*xs, **kwargs)
        return sum(float(np.sum(v * oi)) for v, oi in zip(vs, _as_tuple(o)))

    errors: dict[str, float] = {}
    for p, (a, g) in enumerate(zip(args, grads)):
        argname = module.ARGS[p] if hasattr(module, "ARGS") else str(p)
        if np.shape(g) != np.shape(a):
            problems.append(f"gradient of {argname}: shape {np.shape(g)}, expected {np.shape(a)}")
            continue
        worst = 0.0
        for _ in range(directions):
            u = rng.standard_normal(a.shape)
            plus = list(args)
            minus = list(args)
            plus[p] = a + eps * u
            minus[p] = a - eps * u
            numeric = (objective(plus) - objective(minus)) / (2 * eps)
            analytic = float(np.sum(u * g))
            scale = max(abs(numeric), abs(analytic), 1e-8)
            worst = max(worst, abs(numeric - analytic) / scale)
        errors[argname] = worst
    return GradcheckResult(name, errors, tol, problems)


# ---- optimizers: the generated step against the equations ----------------------------------------


def reference_step(opt, param, grad, state: Mapping, hyper: Mapping) -> tuple:
    """One step of the optimizer ``opt`` computed from its equations alone: each update
    evaluated in order with SymPy's ``lambdify`` (NumPy), nothing from the generated module's
    hoisting, in-place forms or association. ``state`` maps state names to values; returns
    ``(param, state)``."""
    import sympy as sp

    env = {"param": param, "grad": grad, **state, **hyper}
    for lhs, rhs in opt.updates:
        names = sorted(rhs.free_symbols, key=lambda s: s.name)
        fn = sp.lambdify(names, rhs, modules="numpy")
        env[lhs.name] = fn(*(env[s.name] for s in names))
    return env["param"], {n: env[n] for n in opt.state}


def _rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def check_optimizer(
    module, opt, *, rng=None, shape=(3, 4), steps: int = 6, tol: float = 1e-6, cases=None
) -> GradcheckResult:
    """Check a generated optimizer module (``init_state``, ``step``, ``step_inplace``) against
    :func:`reference_step` in float64: for each hyperparameter set of ``cases`` (default
    ``opt.checks["cases"]``, else the defaults), ``steps`` steps from a random ``param`` with
    random gradients; the error of ``param`` and of each state is the largest difference
    relative to the reference, over every step of both functions."""
    rng = np.random.default_rng(0) if rng is None else rng
    name = getattr(module, "NAME", opt.name)
    cases = list(cases if cases is not None else opt.checks.get("cases") or [{}])
    errors: dict[str, float] = {n: 0.0 for n in ["param", *opt.state]}
    problems: list[str] = []
    for case in cases:
        hyper = {k: v for k, v in opt.hyper.items() if v is not None}
        hyper.update(case)
        missing = [k for k in opt.hyper if k not in hyper]
        if missing:
            problems.append(f"hyperparameter {missing[0]!r} requires a value, got none")
            continue
        p = rng.standard_normal(shape)
        state = tuple(module.init_state(p))
        ref = {n: (np.zeros_like(p) if v == "zeros" else v) for n, v in opt.state.items()}
        q, q_state = p.copy(), tuple(np.copy(s) if isinstance(s, np.ndarray) else s for s in state)
        ref_p = p.copy()
        try:
            for _ in range(steps):
                g = rng.standard_normal(shape)
                p, *state = module.step(p, g, *state, **case)
                q_state = module.step_inplace(q, g, *q_state, **case)
                ref_p, ref = reference_step(opt, ref_p, g, ref, hyper)
                for got_p, got_state in ((p, state), (q, q_state)):
                    errors["param"] = max(errors["param"], _rel_diff(got_p, ref_p))
                    for n, value in zip(opt.state, got_state):
                        errors[n] = max(errors[n], _rel_diff(value, ref[n]))
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            problems.append(f"step raised {type(err).__name__}: {err} (hyperparameters {case})")
    return GradcheckResult(name, errors, tol, problems)


# ---- a reference evaluator of the equations -----------------------------------------------------


def scalar_functions():
    """The element functions of the equations (sigmoid, softplus, erf, ...) on Python floats,
    by the names the equations use."""
    import math

    def sigmoid(x):
        return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))

    def softplus(x):
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))

    return {
        "sigmoid": sigmoid,
        "softplus": softplus,
        "relu": lambda x: max(x, 0.0),
        "step": lambda x: 1.0 if x > 0 else 0.0,
        "xlogy": lambda a, b: 0.0 if a == 0 else a * math.log(b),
        "stop_gradient": lambda x: x,
        "isfinite": lambda x: 1.0 if math.isfinite(x) else 0.0,
        "erf": math.erf,
        "Heaviside": lambda x, h0=0.5: 1.0 if x > 0 else (h0 if x == 0 else 0.0),
    }


def reference_forward(layer, *args, **kwargs):
    """Evaluate a layer's equations element by element, with plain Python loops over every
    index value and ``math`` functions: slow, simple, and independent of the lowering and the
    generated code. For testing on small sizes."""
    import sympy as sp

    from .spec import Layer

    spec = layer.spec() if isinstance(layer, Layer) else layer
    arrays, sizes, hyper, batch_shape = _reference_bindings(spec, args, kwargs)
    hsubs = {sp.Symbol(h, real=True): v for h, v in hyper.items() if v is not None}
    funcs = scalar_functions()
    for a in spec.assigns:
        arrays[a.target] = _reference_assign(spec, a, arrays, sizes, hyper, hsubs, funcs)
    outs = []
    for o in spec.outputs:
        arr = arrays[o]
        dims = spec.tensors[o].dims
        if "..." in dims:
            k = dims.index("...")
            arr = arr.reshape(arr.shape[:k] + tuple(batch_shape) + arr.shape[k + 1 :])
        outs.append(arr)
    return outs[0] if len(outs) == 1 else tuple(outs)


def _reference_bindings(spec, args, kwargs):
    """The arrays (padded, '...' flattened, omitted constants filled), the size of every
    dimension, the hyperparameters and the batch shape of a reference evaluation."""
    import sympy as sp

    from .spec import Dim

    values = dict(zip(spec.args, args))
    hyper = {k: v for k, v in spec.hyper.items()}
    for k, v in kwargs.items():
        if k in spec.hyper:
            hyper[k] = v
        else:
            values[k] = v
    for k, v in list(hyper.items()):  # a default naming another hyperparameter
        if isinstance(v, str) or v is None:
            hyper[k] = hyper.get(v) if isinstance(v, str) else v
    arrays = {}
    for k, v in values.items():
        if v is None:
            continue
        v = np.asarray(v)
        if v.dtype == bool:  # an attention mask's True = attend is its additive 0, else -inf
            v = np.where(v, 0.0, -np.inf) if k in spec.masks else v.astype(float)
        arrays[k] = v
    sizes: dict = {}
    batch_shape = None
    for name, a in list(arrays.items()):
        dims = spec.tensors[name].dims
        if "..." in dims:
            k = dims.index("...")
            after = len(dims) - 1 - k
            batch_shape = a.shape[k : a.ndim - after]
            arrays[name] = a.reshape(a.shape[:k] + (-1,) + a.shape[a.ndim - after :])
        for d, n in zip(dims, arrays[name].shape):
            sizes[d] = n
        widths = spec.pads.get(name)
        if widths:
            subs = {sp.Symbol(h, real=True): hyper[h] for h in spec.hyper}
            pad = [(int(widths[p].subs(subs)),) * 2 if p in widths else (0, 0) for p in range(arrays[name].ndim)]
            arrays[name] = np.pad(arrays[name], pad, constant_values=spec.pad_values.get(name, 0.0))
    for d, h in spec.hyper_dims.items():
        sizes[d] = int(hyper[h])
    hsubs = {sp.Symbol(h, real=True): v for h, v in hyper.items() if v is not None}
    for d, formula in spec.derived.items():
        dsubs = {Dim(k): v for k, v in sizes.items() if k != "..."}
        sizes[d] = int(formula.xreplace({**dsubs, **hsubs}))
    dims_now = {Dim(k): v for k, v in sizes.items() if k != "..."}
    for k, v in list(hyper.items()):  # defaults that are formulas of the sizes
        if isinstance(v, sp.Expr):
            hyper[k] = float(v.xreplace(dims_now))
    for name, fill in spec.optional.items():  # omitted constants (a mask of ones)
        if values.get(name) is None:
            shape = tuple(sizes[d] for d in spec.tensors[name].dims)
            arrays[name] = np.full(shape, fill)
    return arrays, sizes, hyper, batch_shape


def _reference_assign(spec, a, arrays, sizes, hyper, hsubs, funcs):
    """One assignment evaluated at every point of its indices, with plain Python loops."""
    import itertools

    import sympy as sp

    from .spec import Dim, is_index, occurrence_indices, occurrence_name, occurrences

    names = list(spec.tensors)
    occs = occurrences(a.expr, names)
    dummies = [sp.Dummy(f"o{k}") for k in range(len(occs))]
    body = a.expr.xreplace(dict(zip(occs, dummies)))
    hyper_syms = sorted(
        (s for s in body.free_symbols if s.name in spec.hyper and not s.is_integer),
        key=lambda s: s.name,
    )
    dim_syms = sorted(
        (s for s in body.free_symbols if s.name in sizes and s not in hyper_syms),
        key=lambda s: s.name,
    )
    index_syms = sorted((s for s in body.free_symbols if is_index(s)), key=lambda s: s.name)
    # every argument a Dummy: a user's name (a hyperparameter called exp) cannot shadow a
    # function in the lambdified source
    params = hyper_syms + dim_syms + index_syms
    stand_ins = [sp.Dummy(f"p{k}") for k in range(len(params))]
    body = body.xreplace(dict(zip(params, stand_ins)))
    fn = sp.lambdify(dummies + stand_ins, body, modules=[funcs, "math"])
    consts = [float(hyper[s.name]) for s in hyper_syms] + [sizes[s.name] for s in dim_syms]
    idx_all = a.all_indices
    ranges = [range(sizes[spec.index_dims[(a.scope, i)]]) for i in idx_all]
    out_shape = tuple(sizes[spec.index_dims[(a.scope, i)]] for i in a.indices)
    init = -np.inf if a.op == "max" else 0.0
    out = np.full(out_shape, init)

    def resolve(ix, env):
        if is_index(ix):
            return env[ix]
        if isinstance(ix, sp.Indexed):
            return int(arrays[occurrence_name(ix)][tuple(env[j] for j in ix.indices)])
        dims = {Dim(k): v for k, v in sizes.items() if k != "..."}
        return int(ix.xreplace({**hsubs, **dims, **env}))

    for point in itertools.product(*ranges):
        env = dict(zip(idx_all, point))
        vals = []
        for occ in occs:
            arr = arrays[occurrence_name(occ)]
            idx = tuple(resolve(ix, env) for ix in occurrence_indices(occ))
            vals.append(float(arr[idx]) if idx else float(arr))
        v = float(fn(*vals, *consts, *(env[s] for s in index_syms)))
        key = tuple(env[i] for i in a.indices)
        if a.op == "map":
            out[key] = v
        elif a.op == "sum":
            out[key] += v
        else:
            out[key] = max(out[key], v)
    return out
