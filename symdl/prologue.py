"""The prologue of a generated module: what ``forward`` does before its first statement
(argument, shape and hyperparameter checks, padding, sizes derived from others) and what
``backward`` does before its first (the cache read back, the incoming gradients checked), and
the ``return`` of ``forward``. Layers and sequences share these pieces; each records the runtime
helpers its text calls in the module's :class:`~symdl.runtime.Runtime`."""

from __future__ import annotations

import sympy as sp
from sympy.printing.str import StrPrinter

from .runtime import Runtime


def conversion(default) -> str:
    """``int``, ``bool`` or ``float``: how a hyperparameter is converted on the way in."""
    if default is bool or isinstance(default, bool):
        return "bool"
    if default is int or (isinstance(default, int) and not isinstance(default, bool)):
        return "int"
    return "float"


def float_formula(expr, names) -> str:
    """A scalar formula of sizes and hyperparameters (a default such as 1/sqrt(E))."""
    from .printing import NumpyPrinter

    mapping = {s: names.get(s.name, s.name) for s in expr.free_symbols}
    return f"float({NumpyPrinter(mapping, set(), set(), {}).doprint(expr)})"


class _IntPrinter(StrPrinter):
    """Integer size formulas as Python: floor(a/b) -> a // b, Min -> min."""

    def __init__(self, names):
        super().__init__({"order": "none"})
        self.names = names

    def _print_Symbol(self, expr):
        return self.names.get(expr.name, expr.name)

    def _print_floor(self, expr):
        num, den = sp.fraction(sp.together(expr.args[0]))
        if den == 1:
            return self._print(num)
        den_text = self._print(den)
        if not (den.is_Symbol or den.is_Integer):
            den_text = f"({den_text})"
        return f"({self._print(num)}) // {den_text}"

    def _print_Min(self, expr):
        return "min(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Relational(self, expr):
        return f"{self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)}"

    def _print_Mod(self, expr):
        return f"{self.parenthesize(expr.args[0], 50)} % {self.parenthesize(expr.args[1], 50)}"

    def _print_Add(self, expr, order=None):
        terms = sorted(expr.args, key=lambda t: (t.is_number, sp.default_sort_key(t)))
        text = self._print(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                text += f" - {self.parenthesize(-t, 50)}"
            else:
                text += f" + {self.parenthesize(t, 40)}"
        return text


def int_formula(expr, names) -> str:
    return _IntPrinter(names).doprint(expr)


def const_call(rt, name: str, var: str, spec) -> str:
    """The check converting a floating-point constant: an attention mask's or the plain one."""
    if name in spec.masks:
        return rt.call("_mask_arg", f'"{name}", {var}, dtype')
    return rt.call("_float_arg", f'"{name}", {var}, dtype', "const")


def coefficient_hypers(spec) -> set[str]:
    """The hyperparameters in the coefficients of affine index positions."""
    from .spec import affine_reads, affine_terms

    out: set[str] = set()
    for _, _, _, ix in affine_reads(spec.assigns, spec.tensors):
        for coeff, _ in affine_terms(ix)[0]:
            out |= {s.name for s in coeff.free_symbols if s.name in spec.hyper}
    return out


def shape_expr(dims, dim_vars, batch=False) -> str:
    """The shape tuple of a tensor: ``(N, C, batch)`` flattened, or with ``batch=True`` the
    full shape ``(N, C) + batch_shape``."""

    def tup(parts):
        return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"

    if not batch or "..." not in dims:
        return tup([dim_vars[d] for d in dims]) if dims else "()"
    k = list(dims).index("...")
    before = [dim_vars[d] for d in dims[:k]]
    after = [dim_vars[d] for d in dims[k + 1 :]]
    pieces = ([tup(before)] if before else []) + ["batch_shape"] + ([tup(after)] if after else [])
    return " + ".join(pieces)


def float_args(rt: Runtime, args) -> list[str]:
    """Lines checking the differentiable arguments (``(name, variable)`` pairs) and taking their
    one floating dtype as ``dtype``."""
    lines = [f"{var} = " + rt.call("_float_arg", f'"{name}", {var}') for name, var in args]
    if len(args) == 1:
        lines.append(f"dtype = {args[0][1]}.dtype")
    else:
        arrays = ", ".join(f'"{name}": {var}' for name, var in args)
        lines.append(f"dtype = {rt.call('_common_dtype', f'{{{arrays}}}')}")
    return lines


def _stacked(dim: str) -> bool:
    """A stacked axis such as "4*H"."""
    factor, _, base = dim.partition("*")
    return bool(base) and factor.isdigit()


def _raise(kind: str, *pieces: str) -> str:
    """``raise kind(...)`` of an f-string message written in ``pieces``, one line each."""
    return f"raise {kind}(\n" + "".join(f'    f"{p}"\n' for p in pieces) + ")"


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ")


def _inline_shapes(arrays, needed, dim_vars) -> list[str] | None:
    """The shape checks of ``arrays`` written out, when all there is to check is each array's
    rank and that the arrays of shape ("...",) share one batch shape; None otherwise. The
    messages are those of ``_bind_shapes``."""
    lines: list[str] = []
    bound: set[str] = set()
    batch_from = None  # the array that binds "..."
    for name, var, dims in arrays:
        if dims == ("...",) and batch_from is None:
            lines.append(f"batch_shape = {var}.shape")
            batch_from = name
            bound.add("...")
        elif dims == ("...",):
            message = _raise(
                "ValueError",
                f"{{NAME}}: argument {name!r} expected shape (...) = {{(batch_shape,)}}, ",
                f"got {{{var}.shape}}: dimension '...' is {{batch_shape}} in {batch_from!r} ",
                f"but {{{var}.shape}} here",
            )
            lines.append(f"if {var}.shape != batch_shape:\n    {_indent(message)}")
        elif "..." in dims or bound & set(dims) or len(set(dims)) < len(dims):
            return None  # a size to compare with another one: _bind_shapes
        elif any(map(_stacked, dims)):
            return None
        else:
            message = _raise(
                "ValueError",
                f"{{NAME}}: argument {name!r} requires {len(dims)} dimensions ({', '.join(dims)}), ",
                f"got shape {{{var}.shape}}",
            )
            lines.append(f"if {var}.ndim != {len(dims)}:\n    {_indent(message)}")
            if any(d in needed for d in dims) and len(dims) == 1:
                lines.append(f"{dim_vars[dims[0]]} = {var}.shape[0]")
            elif any(d in needed for d in dims):
                targets = [dim_vars[d] if d in needed else "_" for d in dims]
                lines.append(f"{', '.join(targets)} = {var}.shape")
            bound |= set(dims)
    return lines if set(needed) <= bound else None


def bind_shapes(rt: Runtime, arrays, needed, dim_vars, optional=()) -> list[str]:
    """Lines checking the shapes of ``arrays`` (``(name, variable, dims)`` triples) against
    SHAPES, then of the ``optional`` ones that are not None, and binding ``dim_vars[d]`` for each
    dimension ``d`` in ``needed`` ("..." as ``batch_shape``). Checks that can only fail on an
    array's rank are written out (:func:`_inline_shapes`); otherwise ``_bind_shapes`` checks
    all the arrays."""
    inline = None if optional else _inline_shapes(arrays, needed, dim_vars)
    if inline is not None:
        return inline
    every = [d for _, _, dims in [*arrays, *optional] for d in dims]
    features = ["ellipsis"] * ("..." in every) + ["stacked"] * any(map(_stacked, every))
    listed = ", ".join(f'"{name}": {var}' for name, var, _ in arrays)
    lines = [f"sizes = {rt.call('_bind_shapes', f'{{{listed}}}', *features)}"]
    for name, var, _ in optional:
        call = rt.call("_bind_shapes", f'{{"{name}": {var}}}, sizes', *features, "prebound")
        lines.append(f"if {var} is not None:\n    {call}")
    plain = [d for d in needed if d != "..."]
    if plain:
        values = ", ".join(f'sizes["{d}"]' for d in plain)
        lines.append(f"{', '.join(dim_vars[d] for d in plain)} = {values}")
    if "..." in needed:
        lines.append('batch_shape = sizes["..."]')
    return lines


def number(rt: Runtime, name: str, var: str, conversion: str) -> str:
    """The text of hyperparameter ``name`` (in ``var``) converted by ``conversion`` (``bool``,
    ``int`` or ``float``) and checked."""
    if conversion == "bool":
        return f"bool({var})"
    features = ["integer"] if conversion == "int" else []
    return rt.call("_number", f'"{name}", {var}, {conversion}', *features)


def forward_prologue(lowered, rt: Runtime) -> list[str]:
    """The lines of ``forward`` before its first statement: arguments, shapes,
    hyperparameters, padding, derived sizes and their bounds."""
    spec = lowered.derivation.spec
    dv = lowered.dim_vars
    pre = float_args(rt, [(a.name, a.var) for a in lowered.args])
    for c in lowered.consts:
        if c.name in spec.optional:
            continue  # filled in once the sizes are known
        if c.kind == "int":
            call = rt.call("_int_arg", f'"{c.name}", {c.var}')
        else:
            call = const_call(rt, c.name, c.var, spec)
        pre.append(f"{c.var} = {call}")
    for c in lowered.consts:
        if c.name in spec.optional:
            call = const_call(rt, c.name, c.var, spec)
            pre.append(f"if {c.var} is not None:\n    {c.var} = {call}")
    bound = lowered.args + [c for c in lowered.consts if c.name not in spec.optional]
    optional_bound = [c for c in lowered.consts if c.name in spec.optional]
    fdims = [
        x
        for x in spec.dims
        if x != "..."
        and x not in spec.derived
        and x not in spec.hyper_dims
        and (
            x in lowered.forward_dims
            or x in lowered.backward_dims
            or x in lowered.index_ranges.values()
            or any(x in a.dims for a in lowered.args + lowered.consts if "..." in a.dims)
        )
    ]
    pre += bind_shapes(
        rt,
        [(a.name, a.var, tuple(a.dims)) for a in bound],
        fdims + ["..."] * lowered.has_ell,
        dv,
        [(c.name, c.var, tuple(c.dims)) for c in optional_bound],
    )
    if lowered.has_ell:
        pre.append(f"{dv['...']} = int(np.prod(batch_shape))")
        for a in bound:
            if "..." in a.dims:
                pre.append(f"{a.var} = {a.var}.reshape({shape_expr(a.dims, dv)})")
    for c in lowered.consts:
        if c.name in lowered.index_ranges:
            dim = lowered.index_ranges[c.name]
            pre.append(rt.call("_check_index", f'"{c.name}", {c.var}, {dv[dim]}'))
    hyper_vars = {name: var for name, var, _ in lowered.hyper}
    expr_defaults = hyperparameter_checks(lowered, rt, pre)
    names = {**{s: v for s, v in dv.items()}, **hyper_vars}
    for a in bound:
        widths = spec.pads.get(a.name)
        if widths:
            pairs = []
            for p in range(len(a.dims)):
                w = int_formula(widths[p], names) if p in widths else "0"
                pairs.append(f"({w}, {w})")
            value = spec.pad_values.get(a.name, 0.0)
            value_text = {float("-inf"): "-np.inf", float("inf"): "np.inf"}.get(value, repr(value))
            extra = "" if value == 0 else f", constant_values={value_text}"
            pre.append(f"{a.var} = np.pad({a.var}, ({', '.join(pairs)}){extra})")
    for c in optional_bound:
        if c.name in lowered.deferred:
            continue  # filled by the statement that reads it, when it runs
        fill = repr(float(spec.optional[c.name]))
        shape = shape_expr(c.dims, dv)
        pre.append(f"if {c.var} is None:\n    {c.var} = np.full({shape}, {fill}, dtype=dtype)")
    for var, default, name in expr_defaults:
        text = float_formula(default, names)
        pre.append(f"{var} = {text} if {var} is None else {number(rt, name, var, 'float')}")
    for dname, formula in spec.derived.items():
        text = int_formula(formula, names)
        pre.append(f"{dv[dname]} = {text}")
        shown = int_formula(formula, {k: k for k in names})
        pre.append(
            f"if {dv[dname]} < 1:\n    raise ValueError("
            f'f"{{NAME}}: dimension {dname!r} = {shown} = {{{dv[dname]}}} requires at least 1: '
            f'the window does not fit the input")'
        )
    for relation, message in spec.asserts:
        text = int_formula(relation, names)
        pre.append(f'if not ({text}):\n    raise ValueError(f"{{NAME}}: {message}")')
    for dname, formula in spec.bounds:
        text = int_formula(formula, names)
        shown = int_formula(formula, {k: k for k in names})
        pre.append(
            f"if {dv[dname]} > {text}:\n    raise ValueError("
            f'f"{{NAME}}: dimension {dname!r} = {{{dv[dname]}}} requires at most {shown} = '
            f'{{{text}}}")'
        )

    return pre


def hyperparameter_checks(lowered, rt: Runtime, pre: list[str]) -> list[tuple]:
    """Lines (appended to ``pre``) converting and checking each hyperparameter: a default
    naming another one, a number, the sign of pad widths (non-negative) and of coefficients and
    ranges (positive). Returns the defaults that are formulas of the sizes, as ``(variable,
    formula, name)``, to be computed once the sizes are known."""
    spec = lowered.derivation.spec
    hyper_vars = {name: var for name, var, _ in lowered.hyper}
    expr_defaults = []
    for name, var, default in lowered.hyper:
        if isinstance(default, str):  # defaults to another hyperparameter (stride = kernel)
            conv = conversion(spec.hyper[default])
            pre.append(
                f"{var} = {hyper_vars[default]} if {var} is None else {number(rt, name, var, conv)}"
            )
        elif isinstance(default, sp.Expr):  # a formula of the sizes, once they are known
            expr_defaults.append((var, default, name))
        else:
            pre.append(f"{var} = {number(rt, name, var, conversion(default))}")
    pad_hypers = {
        s.name
        for widths in spec.pads.values()
        for w in widths.values()
        for s in sp.sympify(w).free_symbols
        if s.name in spec.hyper
    }
    in_formulas = {
        s.name for f in spec.derived.values() for s in f.free_symbols if s.name in spec.hyper
    }
    # a coefficient or a range is positive (a stride that also pads, x[s*t + k - s], too)
    positive = coefficient_hypers(spec) | set(spec.hyper_dims) | (in_formulas - pad_hypers)
    for name in sorted(pad_hypers - positive):
        pre.append(
            f"if {hyper_vars[name]} < 0:\n    raise ValueError("
            f'f"{{NAME}}: {name} requires a non-negative integer, got {{{hyper_vars[name]}}}")'
        )
    for name in sorted(positive):
        pre.append(
            f"if {hyper_vars[name]} < 1:\n    raise ValueError("
            f'f"{{NAME}}: {name} requires a positive integer, got {{{hyper_vars[name]}}}")'
        )
    return expr_defaults


def forward_epilogue(lowered) -> list[str]:
    """The lines ending ``forward``: the cache, outputs restored to their batch shape, the
    return."""
    dv = lowered.dim_vars
    epilogue: list[str] = []
    out_vars = []
    reshapes = []
    for name, var, dims in lowered.outputs:
        if not dims:
            reshapes.append(f"{var} = np.asarray({var}, dtype=dtype)")
        elif "..." in dims:
            reshapes.append(f"{var} = {var}.reshape({shape_expr(dims, dv, batch=True)})")
        out_vars.append(var)
    # cache keys are the variables' own names, which never collide with "sizes" or "dtype"
    cache_items = [f'"{v}": {v}' for k, v in lowered.cache]
    bdims = [x for x in lowered.backward_dims if x != "..."]
    if bdims:
        cache_items.append(
            '"sizes": (' + ", ".join(dv[x] for x in bdims) + ("," if len(bdims) == 1 else "") + ")"
        )
    if lowered.has_ell:
        cache_items.append('"batch_shape": batch_shape')
    cache_items.append('"dtype": dtype')
    epilogue.append("cache = {" + ", ".join(cache_items) + "}")
    epilogue += reshapes
    outs = out_vars[0] if len(out_vars) == 1 else "(" + ", ".join(out_vars) + ")"
    epilogue.append(f"return {outs}, cache")

    return epilogue


def backward_prologue(lowered, rt: Runtime) -> list[str]:
    """The lines of ``backward`` before its first statement: the cache read back and each
    incoming gradient checked against its output's shape."""
    dv = lowered.dim_vars
    bdims = [x for x in lowered.backward_dims if x != "..."]
    bpre: list[str] = []
    if lowered.cache:
        bpre.append(
            ", ".join(v for _, v in lowered.cache)
            + " = "
            + ", ".join(f'cache["{v}"]' for _, v in lowered.cache)
        )
    if bdims:
        bpre.append(
            ", ".join(dv[x] for x in bdims)
            + ("," if len(bdims) == 1 else "")
            + ' = cache["sizes"]'
        )
    if lowered.has_ell:
        bpre.append('batch_shape = cache["batch_shape"]')
        bpre.append(f"{dv['...']} = int(np.prod(batch_shape))")
    bpre.append('dtype = cache["dtype"]')
    if len(lowered.outputs) > 1:
        bpre.append(", ".join(lowered.dout_vars) + " = dout")
        douts = lowered.dout_vars
    else:
        douts = ["dout"]
    for (name, var, dims), dvar, src in zip(lowered.outputs, lowered.dout_vars, douts):
        shape = shape_expr(dims, dv, batch=True) if dims else "()"
        bpre.append(f"{dvar} = " + rt.call("_check_dout", f'"{name}", {src}, {shape}, dtype'))
        if "..." in dims:
            bpre.append(f"{dvar} = {dvar}.reshape({shape_expr(dims, dv)})")

    return bpre
