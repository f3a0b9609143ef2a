"""Layer specifications: equations in index notation, validated and put in A-normal form.

A layer is an ordered list of indexed assignments ``lhs[indices] = rhs`` over

* tensors: differentiable ``inputs``, trainable ``params``, non-differentiable ``consts``
  (targets, integer indices, masks) and the intermediates the equations define;
* index symbols (integers whose ranges come from the shapes of the tensors they index);
* hyperparameters (scalars passed as keyword arguments, with optional defaults).

:func:`Layer.spec` checks the equations and returns a :class:`Spec`: every ``Sum``/``Max`` is
hoisted into a named intermediate (A-normal form), so each assignment is either elementwise over
its left-hand indices or one reduction of an elementwise body, and every index is assigned a
named dimension.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import sympy as sp

from .errors import SpecError
from .functions import ALLOWED_FUNCTIONS, IndexSum, Reduction, Size

#: The batch-dimensions index: ``x[..., d]`` in equation text, ``x[ELL, d]`` from Python. It
#: stands for any number of dimensions (shared by every tensor that uses it), at any one position.
ELL = sp.Symbol("...", integer=True)

_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def tensors(names: str | Iterable[str]) -> tuple[sp.IndexedBase, ...] | sp.IndexedBase:
    """Tensor symbols for equations: ``x, w, y = tensors("x w y")``."""
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    out = tuple(sp.IndexedBase(n, real=True) for n in names)
    return out[0] if len(out) == 1 else out


def indices(names: str | Iterable[str]) -> tuple[sp.Symbol, ...] | sp.Symbol:
    """Index symbols for equations: ``n, i, o = indices("n i o")``."""
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    out = tuple(sp.Symbol(n, integer=True) for n in names)
    return out[0] if len(out) == 1 else out


def scalar(name: str) -> sp.Symbol:
    """A scalar symbol: a hyperparameter or a 0-d tensor (a loss)."""
    return sp.Symbol(name, real=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a layer: its role, rank, dimension names and element kind."""

    name: str
    role: str  # "input" | "param" | "const" | "intermediate"
    rank: int  # number of index positions, the leading ``...`` counted as one
    dims: tuple[str, ...]  # one dimension name per index position ("..." for ELL)
    kind: str = "float"  # "float" | "int"

    @property
    def has_ell(self) -> bool:
        return "..." in self.dims


@dataclasses.dataclass(frozen=True)
class Assign:
    """One assignment of the A-normal form.

    ``op`` is ``"map"`` (``target[indices] = expr``, elementwise), ``"sum"`` or ``"max"``
    (``target[indices] = op(expr, reduce)``). ``scope`` is the number of the user equation the
    assignment comes from: index symbols are local to an equation.
    """

    target: str
    indices: tuple[sp.Symbol, ...]
    op: str
    expr: sp.Expr
    reduce: tuple[sp.Symbol, ...] = ()
    scope: int = 0

    @property
    def all_indices(self) -> tuple[sp.Symbol, ...]:
        return self.indices + self.reduce


@dataclasses.dataclass
class Spec:
    """A validated layer: tensors, A-normal-form assignments and dimension names."""

    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    consts: tuple[str, ...]
    hyper: dict[str, object]
    outputs: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    assigns: list[Assign]
    equations: list[tuple[sp.Expr, sp.Expr]]
    index_dims: dict[tuple[int, sp.Symbol], str]
    dims: tuple[str, ...]
    doc: str = ""
    gathers: dict[str, str] = dataclasses.field(default_factory=dict)  # int const -> range dim
    keep: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    # affine index maps
    affine: dict[int, frozenset] = dataclasses.field(default_factory=dict)  # scope -> symbols
    derived: dict[str, sp.Expr] = dataclasses.field(default_factory=dict)  # dim -> size formula
    bounds: list[tuple[str, sp.Expr]] = dataclasses.field(default_factory=list)  # dim <= bound
    pads: dict[str, dict[int, sp.Expr]] = dataclasses.field(default_factory=dict)
    pad_values: dict[str, float] = dataclasses.field(default_factory=dict)
    hyper_dims: dict[str, str] = dataclasses.field(default_factory=dict)  # dim -> hyperparameter
    optional: dict[str, float] = dataclasses.field(default_factory=dict)
    asserts: list = dataclasses.field(default_factory=list)
    masks: tuple[str, ...] = ()  # constants taken in PyTorch's attention-mask convention

    @property
    def args(self) -> tuple[str, ...]:
        return self.inputs + self.params

    def dim_of(self, scope: int, index: sp.Symbol) -> str:
        return self.index_dims[(scope, index)]

    def shapes(self) -> dict[str, tuple[str, ...]]:
        names = self.args + self.consts + self.outputs
        return {n: self.tensors[n].dims for n in names}


# ---------------------------------------------------------------------------------------------
# Helpers over expressions
# ---------------------------------------------------------------------------------------------


def tensor_name(node) -> str | None:
    """The tensor name of an ``Indexed`` node, else None."""
    if isinstance(node, sp.Indexed):
        return str(node.base.label)
    return None


class Dim(sp.Symbol):
    """The size of a named dimension (a positive integer known at run time)."""

    def __new__(cls, name):
        return super().__new__(cls, name, integer=True, positive=True)


def is_index(sym) -> bool:
    return isinstance(sym, sp.Symbol) and not isinstance(sym, Dim) and bool(sym.is_integer)


def occurrences(expr: sp.Expr, names: Iterable[str]) -> list[sp.Expr]:
    """The distinct occurrences (``Indexed`` nodes or 0-d symbols) of the named tensors in
    ``expr``, sorted deterministically. Gather indices (``target`` in ``x[n, target[n]]``)
    count as occurrences too; the label symbol inside an ``IndexedBase`` does not."""
    names = set(names)
    found = set()

    def visit(node):
        if isinstance(node, sp.Indexed):
            if str(node.base.label) in names:
                found.add(node)
            for ix in node.indices:
                visit(ix)
            return
        if isinstance(node, sp.IndexedBase):
            return
        if isinstance(node, sp.Symbol):
            if not is_index(node) and node.name in names:
                found.add(node)
            return
        for a in node.args:
            visit(a)

    visit(expr)
    return sorted(found, key=sp.default_sort_key)


def occurrence_name(node) -> str:
    return str(node.base.label) if isinstance(node, sp.Indexed) else node.name


def occurrence_indices(node) -> tuple:
    return tuple(node.indices) if isinstance(node, sp.Indexed) else ()


def position_symbols(ix) -> list[sp.Symbol]:
    """The index symbols of one index position: a symbol, a gather ``c[n, m]``, or an affine
    expression ``stride*i + p``, in order of appearance."""
    if is_index(ix):
        return [ix]
    if isinstance(ix, sp.Indexed):
        return list(ix.indices)
    terms, _ = affine_terms(ix)
    return [sym for _, sym in terms]


def is_affine(ix) -> bool:
    """An index position that is neither a plain symbol nor a gather."""
    return not is_index(ix) and not isinstance(ix, sp.Indexed)


def affine_reads(assigns, names):
    """``(assign, occurrence, position, index)`` of every affine index position in the
    right sides of ``assigns`` (occurrences of the tensors in ``names``)."""
    for a in assigns:
        for occ in occurrences(a.expr, names):
            for p, ix in enumerate(occurrence_indices(occ)):
                if is_affine(ix):
                    yield a, occ, p, ix


def affine_terms(ix) -> tuple[list[tuple[sp.Expr, sp.Symbol]], sp.Expr]:
    """``a*i + b*p + c`` -> ``([(a, i), (b, p)], c)``, symbols in a deterministic order."""
    syms = sorted((s for s in ix.free_symbols if is_index(s)), key=lambda s: s.name)
    expanded = sp.expand(ix)
    terms = []
    for sym in syms:
        coeff = expanded.coeff(sym)
        terms.append((coeff, sym))
    const = sp.expand(expanded - sum(c * s for c, s in terms))
    # order of appearance in the printed expression, for readable views (i before p)
    order = {s: k for k, s in enumerate(_appearance(ix))}
    terms.sort(key=lambda t: order.get(t[1], 99))
    return terms, const


def _appearance(expr) -> list[sp.Symbol]:
    out: list[sp.Symbol] = []
    for node in sp.preorder_traversal(expr):
        if is_index(node) and node not in out:
            out.append(node)
    return out


def plain_indices(node) -> tuple[sp.Symbol, ...]:
    """Every index symbol an occurrence depends on, in order of first appearance (the symbols
    inside a gather ``c[n]`` or an affine position ``s*i + p`` included)."""
    out: list[sp.Symbol] = []
    for ix in occurrence_indices(node):
        for s in position_symbols(ix):
            if s not in out:
                out.append(s)
    return tuple(out)


def free_indices(expr: sp.Expr) -> set[sp.Symbol]:
    """Index symbols free in ``expr`` (not bound by a reduction inside it)."""
    if isinstance(expr, Reduction):
        return free_indices(expr.body) - set(expr.indices)
    if isinstance(expr, sp.Indexed):
        return set(plain_indices(expr))
    if isinstance(expr, Size):
        return set()
    if is_index(expr):
        return {expr}
    out: set[sp.Symbol] = set()
    for a in expr.args:
        out |= free_indices(a)
    return out


def ordered(symbols: Iterable[sp.Symbol], context: Sequence[sp.Symbol]) -> tuple[sp.Symbol, ...]:
    """``symbols`` in the order of ``context``, any others after them by name."""
    symbols = set(symbols)
    first = [s for s in context if s in symbols]
    rest = sorted(symbols - set(first), key=lambda s: s.name)
    return tuple(first + rest)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


def split_names(value) -> tuple[str, ...]:
    """Names given as ``"a, b"``, ``"a b"`` or a sequence, as a tuple (None: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    return tuple(str(v) for v in value)


class Layer:
    """A layer written as equations in index notation.

    ``equations`` is a sequence of ``(lhs, rhs)`` pairs or ``sympy.Eq``; ``lhs`` is an
    ``Indexed`` tensor (``y[n, o]``) or a scalar symbol (a loss ``L``). ``hyper`` maps
    hyperparameter names to defaults (``None``: required). ``shapes`` may name the dimensions
    of the arguments (``{"x": ("N", "in")}``); other dimensions are named after their index.
    ``checks`` holds what the tests need (input domains, tolerances); the engine ignores it.
    """

    def __init__(
        self,
        name: str,
        equations: Sequence,
        *,
        inputs=(),
        params=(),
        consts=(),
        hyper: Mapping[str, object] | None = None,
        outputs=None,
        shapes: Mapping[str, Sequence[str]] | None = None,
        int_consts=(),
        doc: str = "",
        checks: Mapping[str, object] | None = None,
        keep=(),
        extras=(),
        pad: Mapping[str, Mapping] | None = None,
        ranges: Mapping[str, str] | None = None,
        dims: Mapping[str, sp.Expr] | None = None,
        optional: Mapping[str, float] | None = None,
        asserts: Sequence[tuple] = (),
        masks=(),
    ):
        self.name = name
        self.equations = [_as_pair(eq, k) for k, eq in enumerate(equations)]
        self.inputs = split_names(inputs)
        self.params = split_names(params)
        self.consts = split_names(consts)
        self.int_consts = split_names(int_consts)
        self.hyper = dict(hyper or {})
        self.outputs = split_names(outputs) if outputs is not None else None
        self.shapes = {k: tuple(v) for k, v in (shapes or {}).items()}
        self.doc = doc
        self.checks = dict(checks or {})
        self.keep = split_names(
            keep
        )  # intermediates always cached (for callers, e.g. batch stats)
        self.extras = split_names(extras)  # helper functions from symdl/snippets/extras.py
        # zero (or constant) padding of arguments: {"x": {"axes": {2: "padding"}, "value": 0.0}}
        self.pad = {k: dict(v) for k, v in (pad or {}).items()}
        # index ranges given by hyperparameters or by named formulas: {"p": "kernel_size"}
        self.ranges = dict(ranges or {})
        # dimensions computed from others: {"D": floor(Dim("E") / num_heads)}
        self.dims = dict(dims or {})
        # constants that may be omitted (None): filled with this value, e.g. a mask of ones
        self.optional = dict(optional or {})
        # run-time conditions on sizes and hyperparameters: [(relational, "message"), ...]
        self.asserts = list(asserts)
        # constants taken as PyTorch takes an attention mask: a boolean array (True = attend)
        # becomes the additive mask 0 / -inf, a floating-point array is added as it is
        self.masks = split_names(masks)
        self._spec: Spec | None = None

    def __repr__(self) -> str:
        lines = [f"Layer {self.name!r}"]
        for lhs, rhs in self.equations:
            lines.append(f"  {sp.sstr(lhs)} = {sp.sstr(rhs)}")
        return "\n".join(lines)

    def spec(self) -> Spec:
        """Validate the equations and return the :class:`Spec` (computed once)."""
        if self._spec is None:
            try:
                self._spec = _integer_defaults(_build_spec(self))
            except SpecError as err:
                raise err.with_context(f"layer {self.name!r}") from None
        return self._spec


def _as_pair(eq, k):
    if isinstance(eq, sp.Equality):
        return eq.lhs, eq.rhs
    try:
        lhs, rhs = eq
    except (TypeError, ValueError):
        raise SpecError(
            f"equation {k + 1} requires a (lhs, rhs) pair or sympy.Eq, got {eq!r}"
        ) from None
    return lhs, sp.sympify(rhs)


# ---------------------------------------------------------------------------------------------
# Building the spec
# ---------------------------------------------------------------------------------------------


#: Modules that generated code, symdl or their users import, besides the standard library's.
SHADOWED_MODULES = frozenset({"np", "numpy", "scipy", "torch", "jinja2", "sympy", "symdl"})


def check_module_name(name: str, kind: str = "layer") -> None:
    """A layer's name is its module's name: ``numpy.py`` or ``math.py`` next to a program
    would be imported instead of NumPy or the standard library's ``math``. Compared ignoring
    case (``NumPy.py`` shadows ``numpy`` on a case-insensitive file system)."""
    taken = SHADOWED_MODULES | frozenset(sys.stdlib_module_names)
    if name.lower() in {m.lower() for m in taken}:
        raise SpecError(
            f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} name requires a name that shadows "
            f"no module, got {name!r} ({name}.py "
            f"would be imported instead of {name.lower()!r}); choose another, such as "
            f"{name}_{kind}",
            name=name,
        )


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _build_spec(layer: Layer) -> Spec:
    """Validate ``layer`` and build its :class:`Spec`, one stage after the other."""
    declared = _check_names(layer)
    ranks, has_ell, defined, gather_consts = _check_equations(layer, declared)
    outputs = _check_uses(layer, declared, ranks, defined)
    assigns = _a_normal_form(layer, declared, defined, ranks, has_ell)
    assigns, zero_pads = _padded_reads(assigns, layer, ranks)
    _check_lower_bounds(assigns, layer, ranks)
    affine, constraints, uf = _index_classes(layer, assigns, ranks)
    names, index_dims = _dimension_names(layer, assigns, ranks, uf)
    tensors_ = _tensor_infos(layer, ranks, names, uf, gather_consts)
    pads, pad_values = _argument_pads(layer, declared, ranks, zero_pads)
    derived, bounds, index_dims, tensors_, known = _derived_sizes(
        layer, declared, tensors_, pads, constraints, index_dims
    )
    for a in assigns:
        for ix in a.all_indices:
            d = index_dims[(a.scope, ix)]
            if d not in known:
                raise SpecError(
                    f"the range of index {ix.name} in equation {a.scope + 1} requires a "
                    f"dimension of some argument's shape, got none (dimension {d!r} is not the "
                    f"size of any input, parameter or constant)"
                )

    # the mean's counts become dimension symbols
    def resolve_sizes(expr, scope):
        reps = {}
        for node in sp.preorder_traversal(expr):
            if isinstance(node, Size):
                ix = node.args[0]
                if (scope, ix) not in index_dims:
                    raise SpecError(f"Size({ix}) in equation {scope + 1} requires a known index")
                reps[node] = dim_symbol(index_dims[(scope, ix)])
        return expr.xreplace(reps) if reps else expr

    assigns = [dataclasses.replace(a, expr=resolve_sizes(a.expr, a.scope)) for a in assigns]

    gathers: dict[str, str] = {}
    for a in assigns:
        for occ in occurrences(a.expr, ranks):
            for p, ix in enumerate(occurrence_indices(occ)):
                if isinstance(ix, sp.Indexed):
                    dim = tensors_[occurrence_name(occ)].dims[p]
                    cname = tensor_name(ix)
                    if gathers.get(cname, dim) != dim:
                        raise SpecError(
                            f"integer constant {cname!r} requires one range, got it indexing "
                            f"dimensions {gathers[cname]!r} and {dim!r}"
                        )
                    gathers[cname] = dim

    dims_order: list[str] = []
    for t in declared:
        for d in tensors_[t].dims:
            if d not in dims_order:
                dims_order.append(d)
    for d in sorted(set(layer.ranges.values()) - set(layer.dims)) + list(derived):
        if d not in dims_order:
            dims_order.append(d)
    return Spec(
        name=layer.name,
        inputs=layer.inputs,
        params=layer.params,
        consts=layer.consts,
        hyper=dict(layer.hyper),
        outputs=tuple(outputs),
        tensors=tensors_,
        assigns=assigns,
        equations=list(layer.equations),
        index_dims=index_dims,
        dims=tuple(dims_order),
        doc=layer.doc,
        gathers=gathers,
        keep=layer.keep,
        extras=layer.extras,
        affine={k: frozenset(v) for k, v in affine.items()},
        derived=derived,
        bounds=bounds,
        pads=pads,
        pad_values=pad_values,
        hyper_dims={h: h for h in layer.ranges.values() if h in layer.hyper},
        optional=dict(layer.optional),
        asserts=list(layer.asserts),
        masks=layer.masks,
    )


def _check_names(layer: Layer) -> tuple[str, ...]:
    """The layer's, its arguments' and its hyperparameters' names; the declared arguments."""
    if not _IDENT.match(layer.name or ""):
        raise SpecError(
            f"a layer name requires letters, digits and underscores starting with a letter, "
            f"got {layer.name!r}"
        )
    check_module_name(layer.name)
    if not layer.equations:
        raise SpecError("a layer requires at least one equation, got none")
    declared = layer.inputs + layer.params + layer.consts
    for n in declared + tuple(layer.hyper):
        if not _IDENT.match(n):
            raise SpecError(f"a name requires an identifier, got {n!r}")
    seen: set[str] = set()
    for n in declared + tuple(layer.hyper):
        if n in seen:
            raise SpecError(f"each name requires one role, got {n!r} declared twice")
        seen.add(n)
    if not (layer.inputs or layer.params):
        raise SpecError("a layer requires at least one input or parameter, got none")
    from .printing import RESERVED

    for n in layer.consts + tuple(layer.hyper):
        if n in RESERVED:
            raise SpecError(
                f"keyword argument {n!r} requires a name the generated module does not use "
                f"itself (it is reserved: a Python keyword, numpy's np, or a local such as "
                f"cache, dout, sizes, dtype), got {n!r}"
            )
    return declared


def _check_equations(layer: Layer, declared) -> tuple[dict, dict, list, set]:
    """Each equation checked; the rank of each tensor, whether it has '...', the tensors
    defined in order, and the integer constants used as gathers."""
    ranks: dict[str, int] = {}
    has_ell: dict[str, bool] = {}
    defined: list[str] = []
    gather_consts: set[str] = set()

    def where(k):
        return f"equation {k + 1}"

    # ---- validate each equation ---------------------------------------------------------
    for k, (lhs, rhs) in enumerate(layer.equations):
        if isinstance(lhs, sp.Indexed):
            tname, lhs_idx = tensor_name(lhs), tuple(lhs.indices)
        elif isinstance(lhs, sp.Symbol) and not is_index(lhs):
            tname, lhs_idx = lhs.name, ()
        else:
            raise SpecError(
                f"the left side of {where(k)} requires a tensor like y[n, o] or a scalar name, "
                f"got {sp.sstr(lhs)}"
            )
        if not _IDENT.match(tname):
            raise SpecError(f"a tensor name requires an identifier, got {tname!r} in {where(k)}")
        if tname in declared or tname in layer.hyper:
            raise SpecError(
                f"{where(k)} assigns {tname!r}, which requires a new name: it is declared as "
                f"an argument or hyperparameter"
            )
        if tname in defined:
            raise SpecError(
                f"each tensor requires one defining equation, got {tname!r} assigned again in "
                f"{where(k)}"
            )
        for p, ix in enumerate(lhs_idx):
            if not is_index(ix):
                raise SpecError(
                    f"the left side of {where(k)} requires plain index symbols, got "
                    f"{sp.sstr(ix)} at position {p + 1} of {tname}"
                )
        if len(set(lhs_idx)) != len(lhs_idx):
            raise SpecError(
                f"the left side of {where(k)} requires distinct indices, got {sp.sstr(lhs)}"
            )
        known = set(declared) | set(defined)
        _check_expr(rhs, k, known, layer, ranks, has_ell, gather_consts)
        free = free_indices(rhs)
        extra = free - set(lhs_idx)
        if extra:
            names = ", ".join(sorted(s.name for s in extra))
            raise SpecError(
                f"index {names} in {where(k)} requires a place on the left side or a "
                f"Sum(..., {names}) around it, got it on the right side only"
            )
        ranks[tname] = len(lhs_idx)
        has_ell[tname] = ELL in lhs_idx
        defined.append(tname)
    return ranks, has_ell, defined, gather_consts


def _check_uses(layer: Layer, declared, ranks: dict, defined: list) -> tuple[str, ...]:
    """Every argument and hyperparameter used, every kept tensor and output defined; the
    outputs."""
    for n in layer.keep:
        if n not in defined:
            raise SpecError(f"keep names {n!r}, which requires a tensor defined by an equation")
    for n in declared:
        if n not in ranks:
            raise SpecError(f"argument {n!r} requires a use in the equations, got none")
    pad_widths = {w for info in layer.pad.values() for w in dict(info.get("axes", {})).values()}
    in_formulas = {s.name for f in layer.dims.values() for s in sp.sympify(f).free_symbols}
    for n in layer.hyper:
        if n in pad_widths or n in layer.ranges.values() or n in in_formulas:
            continue
        if any(v == n for v in layer.hyper.values() if isinstance(v, str)):
            continue
        used = any(
            sp.Symbol(n, real=True) in rhs.free_symbols or n in {s.name for s in rhs.free_symbols}
            for _, rhs in layer.equations
        )
        if not used:
            raise SpecError(f"hyperparameter {n!r} requires a use in the equations, got none")

    outputs = layer.outputs if layer.outputs is not None else (defined[-1],)
    if not outputs:
        raise SpecError("a layer requires at least one output, got none")
    for o in outputs:
        if o not in defined:
            raise SpecError(
                f"output {o!r} requires a tensor defined by an equation; defined: "
                f"{', '.join(defined)}"
            )
    return outputs


def _a_normal_form(layer: Layer, declared, defined: list, ranks: dict, has_ell: dict) -> list:
    """Each reduction inside an equation hoisted into an assignment of its own (A-normal form):
    every assignment is elementwise over its free indices or one reduction of an elementwise
    body. Records the new intermediates' ranks."""
    taken = set(declared) | set(defined) | set(layer.hyper)
    counter = [0]

    def fresh() -> str:
        while f"t{counter[0]}" in taken:
            counter[0] += 1
        name = f"t{counter[0]}"
        taken.add(name)
        counter[0] += 1
        return name

    assigns: list[Assign] = []
    for k, (lhs, rhs) in enumerate(layer.equations):
        tname = tensor_name(lhs) or lhs.name
        lhs_idx = tuple(lhs.indices) if isinstance(lhs, sp.Indexed) else ()

        def hoist(expr, context, k=k):
            """Replace each reduction inside ``expr`` by a fresh intermediate."""
            if isinstance(expr, Reduction):
                inner_context = tuple(context) + tuple(expr.indices)
                body = hoist(expr.body, inner_context)
                free = ordered(free_indices(body) - set(expr.indices), context)
                name = fresh()
                op = "sum" if isinstance(expr, IndexSum) else "max"
                assigns.append(Assign(name, free, op, body, tuple(expr.indices), k))
                ranks[name] = len(free)
                has_ell[name] = ELL in free
                return (
                    sp.IndexedBase(name, real=True)[free] if free else sp.Symbol(name, real=True)
                )
            if not expr.args or isinstance(expr, (sp.Indexed, Size)):
                return expr
            return expr.func(*[hoist(a, context) for a in expr.args])

        if isinstance(rhs, Reduction) and set(free_indices(rhs)) == set(lhs_idx):
            body = hoist(rhs.body, lhs_idx + tuple(rhs.indices))
            op = "sum" if isinstance(rhs, IndexSum) else "max"
            assigns.append(Assign(tname, lhs_idx, op, body, tuple(rhs.indices), k))
        else:
            assigns.append(Assign(tname, lhs_idx, "map", hoist(rhs, lhs_idx), (), k))
    return assigns


def _index_classes(layer: Layer, assigns: list, ranks: dict) -> tuple[dict, list, _UnionFind]:
    """Which axes and indices must have one size (a union-find over them), and the affine
    constraints on the others; the index symbols in affine positions, by equation."""
    # Symbols used in an affine position are sized by constraints, not by equality: in
    # y[b, i] = x[b, i + 1] - x[b, i], i ranges over one less than x's axis.
    # An axis read through an affine position anywhere takes its plain reads as constraints
    # too (gi[b, j] beside gi[b, H + j]: j ranges over part of the axis); every other axis of
    # the tensor is an equality (x[n, c, t + k] and w[c, k] share C).
    affine: dict[int, set] = {}
    affine_axes: set[tuple[str, int]] = set()  # (tensor, axis) read affinely in some equation
    for a, occ, p, ix in affine_reads(assigns, ranks):
        affine.setdefault(a.scope, set()).update(position_symbols(ix))
        affine_axes.add((occurrence_name(occ), p))
    constraints: list[tuple] = []  # (scope, symbol, tensor, axis, coeff, others, const)
    uf = _UnionFind()
    for a in assigns:
        uf.find(("I", a.scope, ELL)) if ELL in a.all_indices else None
        for p, ix in enumerate(a.indices):
            uf.union(("T", a.target, p), ("I", a.scope, ix))
        for occ in occurrences(a.expr, ranks):
            oname = occurrence_name(occ)
            for p, ix in enumerate(occurrence_indices(occ)):
                if is_index(ix) and (oname, p) not in affine_axes:
                    uf.union(("T", oname, p), ("I", a.scope, ix))
                elif is_index(ix):
                    constraints.append((a.scope, ix, oname, p, sp.S.One, (), sp.S.Zero))
                elif isinstance(ix, sp.Indexed):  # a gather c[n, ...]: its own axes
                    cname = tensor_name(ix)
                    for q, jx in enumerate(ix.indices):
                        uf.union(("T", cname, q), ("I", a.scope, jx))
                else:
                    terms, const = affine_terms(ix)
                    for coeff, sym in terms:
                        others = tuple((c, o) for c, o in terms if o != sym)
                        constraints.append((a.scope, sym, oname, p, coeff, others, const))
                        uf.find(("I", a.scope, sym))
        for ix in a.reduce:
            uf.find(("I", a.scope, ix))
    for sym_name, hname in layer.ranges.items():
        shape_dims = {d for dims in layer.shapes.values() for d in dims}
        if hname not in layer.hyper and hname not in layer.dims and hname not in shape_dims:
            raise SpecError(
                f"the range of index {sym_name!r} requires a hyperparameter or a named "
                f"dimension formula, got {hname!r}"
            )
        for key in [k for k in list(uf.parent) if k[0] == "I" and k[2].name == sym_name]:
            uf.union(("H", hname), key)
    for hname in set(layer.ranges.values()):  # a range named after an argument's dimension
        for t, dims in layer.shapes.items():
            for p, dname in enumerate(dims):
                if dname == hname and t in ranks:
                    uf.union(("H", hname), ("T", t, p))
    # one shared batch shape for every '...'
    ell_keys = [key for key in list(uf.parent) if key[0] == "I" and key[2] == ELL]
    for key in ell_keys[1:]:
        uf.union(ell_keys[0], key)
    return affine, constraints, uf


def _dimension_names(layer: Layer, assigns: list, ranks: dict, uf: _UnionFind) -> tuple:
    """A name for each class of equal sizes: declared shapes first, then "..." for the batch
    dimensions, then the index letter; and the dimension of each index in each equation."""
    ell_keys = [key for key in list(uf.parent) if key[0] == "I" and key[2] == ELL]
    names: dict = {}
    for t, dims in layer.shapes.items():
        if t not in ranks:
            raise SpecError(f"shapes names {t!r}, which requires a tensor of the layer, got none")
        if len(dims) != ranks[t]:
            raise SpecError(
                f"the shape of {t!r} requires {ranks[t]} dimension names (its rank in the "
                f"equations), got {len(dims)}: {dims}"
            )
        for p, d in enumerate(dims):
            root = uf.find(("T", t, p))
            if root in names and names[root] != d:
                raise SpecError(
                    f"dimension {d!r} of {t!r} (position {p + 1}) and dimension "
                    f"{names[root]!r} must be equal by the equations, which requires one name, "
                    f"got two"
                )
            names[root] = d
    for hname in set(layer.ranges.values()):
        root = uf.find(("H", hname))
        if root in names and names[root] != hname:
            raise SpecError(
                f"dimension {names[root]!r} and hyperparameter {hname!r} must be equal by the "
                f"equations, which requires one name, got two"
            )
        names[root] = hname
    if ell_keys:
        root = uf.find(ell_keys[0])
        if root in names and names[root] != "...":
            raise SpecError(f"'...' requires the name '...', got {names[root]!r}")
        names[root] = "..."
    used_names = set(names.values())
    for a in assigns:
        for ix in a.all_indices:
            root = uf.find(("I", a.scope, ix))
            if root not in names:
                base = ix.name.upper()
                cand, n = base, 2
                while cand in used_names:
                    cand, n = f"{base}{n}", n + 1
                names[root] = cand
                used_names.add(cand)
    for t in ranks:
        for p in range(ranks[t]):
            root = uf.find(("T", t, p))
            if root not in names:  # an axis no index touches: the gathered axis of a table
                base = f"{t}{p}".upper()
                cand, n = base, 2
                while cand in used_names:
                    cand, n = f"{base}_{n}", n + 1
                names[root] = cand
                used_names.add(cand)

    index_dims: dict = {}
    for a in assigns:
        for ix in a.all_indices:
            index_dims[(a.scope, ix)] = names[uf.find(("I", a.scope, ix))]
        for occ in occurrences(a.expr, ranks):
            for ix in occurrence_indices(occ):
                for s in position_symbols(ix):
                    index_dims[(a.scope, s)] = names[uf.find(("I", a.scope, s))]
    return names, index_dims


def _tensor_infos(layer: Layer, ranks: dict, names: dict, uf: _UnionFind, gather_consts) -> dict:
    """Each tensor's role, rank, dimension names and kind."""
    tensors_: dict[str, TensorInfo] = {}
    for t, r in ranks.items():
        dims = tuple(names[uf.find(("T", t, p))] for p in range(r))
        if t in layer.inputs:
            role = "input"
        elif t in layer.params:
            role = "param"
        elif t in layer.consts:
            role = "const"
        else:
            role = "intermediate"
        kind = "int" if (t in gather_consts or t in layer.int_consts) else "float"
        tensors_[t] = TensorInfo(t, role, r, dims, kind)
    for t in layer.masks:
        if t not in layer.consts or tensors_[t].kind != "float":
            raise SpecError(f"masks names {t!r}, which requires a floating-point constant")
    return tensors_


def _argument_pads(layer: Layer, declared, ranks: dict, zero_pads: dict) -> tuple[dict, dict]:
    """The padding of arguments: declared pads and zero padding from negative offsets."""
    pads: dict[str, dict[int, sp.Expr]] = {}
    pad_values: dict[str, float] = {}
    for t, info in layer.pad.items():
        if t not in declared:
            raise SpecError(f"pad names {t!r}, which requires an argument of the layer")
        widths = {}
        for axis, width in dict(info.get("axes", {})).items():
            if not (isinstance(axis, int) and 0 <= axis < ranks[t]):
                raise SpecError(f"pad of {t!r} requires axes in [0, {ranks[t]}), got {axis!r}")
            if isinstance(width, str):
                if width not in layer.hyper:
                    raise SpecError(f"pad width of {t!r} requires a hyperparameter, got {width!r}")
                widths[axis] = sp.Symbol(width, real=True)
            else:
                widths[axis] = sp.Integer(width)
        pads[t] = widths
        pad_values[t] = float(info.get("value", 0.0))
    for t, widths in zero_pads.items():
        pads.setdefault(t, {}).update(widths)
        pad_values.setdefault(t, 0.0)
    return pads, pad_values


def _derived_sizes(
    layer: Layer, declared, tensors_: dict, pads: dict, constraints: list, index_dims: dict
):
    """The size of each dimension no argument gives, from the affine constraints (the output
    size of a convolution), and the run-time bounds on the sizes arguments give."""

    def axis_size(t, p):
        size = dim_symbol(tensors_[t].dims[p])
        if p in pads.get(t, {}):
            size = size + 2 * pads[t][p]
        return size

    # every dimension comes from an argument's shape, a hyperparameter, or affine constraints
    provided = {d for t in declared for d in tensors_[t].dims} | set(layer.ranges.values())
    by_dim: dict[str, list] = {}
    for scope, sym, t, p, coeff, others, const in constraints:
        by_dim.setdefault(index_dims[(scope, sym)], []).append((scope, t, p, coeff, others, const))
    derived: dict[str, sp.Expr] = {d: f for d, f in layer.dims.items()}
    bounds: list[tuple[str, sp.Expr]] = []
    # a stacked dimension ("2*H") given by an argument whose base (H) no argument gives: the
    # base is its quotient
    for d in sorted(provided):
        factor, _, base = d.partition("*")
        if base and factor.isdigit() and base not in provided and base not in derived:
            derived[base] = sp.floor(Dim(d) / int(factor))
            provided = provided | {base}  # (_bind_shapes checks the multiple at run time)
    pending = [d for d in by_dim if d not in provided]
    known = set(provided)
    while pending:
        progress = False
        for dname in list(pending):
            cons = by_dim[dname]
            needed = {index_dims[(sc, o)] for sc, _, _, _, others, _ in cons for _, o in others}
            if not needed <= known:
                continue
            options = []
            for scope, t, p, coeff, others, const in cons:
                reach = sum(
                    (c * (dim_symbol(index_dims[(scope, o)]) - 1) for c, o in others), sp.S.Zero
                )
                options.append(sp.floor((axis_size(t, p) - 1 - const - reach) / coeff) + 1)
            derived[dname] = sp.Min(*options) if len(options) > 1 else options[0]
            known.add(dname)
            pending.remove(dname)
            progress = True
        if not progress:
            raise SpecError(
                f"the range of dimension {pending[0]!r} requires the sizes of the other indices "
                f"in its affine positions, got a cycle"
            )
    # a size derived from one plain position is just that axis's size: one name, not two
    aliases = {
        d: f.name
        for d, f in derived.items()
        if isinstance(f, Dim) and d not in layer.dims and d not in layer.shapes.get("", ())
    }
    if aliases:
        for d in aliases:
            del derived[d]
        index_dims = {key: aliases.get(v, v) for key, v in index_dims.items()}
        by_dim = {aliases.get(d, d): cons for d, cons in by_dim.items() if d not in aliases}
        tensors_ = {
            t: dataclasses.replace(info, dims=tuple(aliases.get(x, x) for x in info.dims))
            for t, info in tensors_.items()
        }

    def stacked(expr):  # "4*H" is four times H
        reps = {}
        for sym in expr.free_symbols:
            factor, _, base = sym.name.partition("*")
            if isinstance(sym, Dim) and base and factor.isdigit():
                reps[sym] = int(factor) * Dim(base)
        return expr.xreplace(reps)

    for dname, cons in by_dim.items():
        if dname in provided:
            for scope, t, p, coeff, others, const in cons:
                if any(index_dims[(scope, o)] in derived for _, o in others):
                    continue  # implied: the derived size was chosen to satisfy it
                reach = sum(
                    (c * (dim_symbol(index_dims[(scope, o)]) - 1) for c, o in others), sp.S.Zero
                )
                bound = sp.floor((axis_size(t, p) - 1 - const - reach) / coeff) + 1
                slack = sp.simplify(stacked(bound) - dim_symbol(dname))
                if slack.is_nonnegative or (dname, bound) in bounds:
                    continue  # always true, or already checked
                bounds.append((dname, bound))
    return derived, bounds, index_dims, tensors_, known


def dim_symbol(name: str) -> sp.Symbol:
    """The symbol standing for the size of dimension ``name`` (a positive integer)."""
    return Dim(name)


def _check_expr(expr, k, known, layer, ranks, has_ell, gather_consts, bound=()):
    """Reject anything but tensors, indices, numbers, hyperparameters and allowed functions."""
    where = f"equation {k + 1}"
    if isinstance(expr, Reduction):
        if len(set(expr.indices)) != len(expr.indices):
            raise SpecError(
                f"{expr.op_name} in {where} requires distinct indices, got "
                f"{', '.join(i.name for i in expr.indices)}"
            )
        bound_again = [i for i in expr.indices if i in bound]
        if bound_again:
            raise SpecError(
                f"{expr.op_name} in {where} requires indices not already summed by an enclosing "
                f"reduction, got {bound_again[0].name}"
            )
        for ix in expr.indices:
            if not is_index(ix):
                raise SpecError(
                    f"{expr.op_name} in {where} requires index symbols to reduce over, got "
                    f"{sp.sstr(ix)}"
                )
        _check_expr(
            expr.body, k, known, layer, ranks, has_ell, gather_consts, bound + expr.indices
        )
        return
    if isinstance(expr, sp.Indexed):
        name = tensor_name(expr)
        if name not in known:
            raise SpecError(
                f"tensor {name!r} in {where} requires a declaration (input, param or const) or "
                f"an earlier equation defining it, got neither"
            )
        idx = tuple(expr.indices)
        _check_rank(name, len(idx), ELL in idx, where, ranks, has_ell)
        for p, ix in enumerate(idx):
            if is_index(ix):
                continue
            if isinstance(ix, sp.Indexed):
                cname = tensor_name(ix)
                if cname not in layer.consts:
                    raise SpecError(
                        f"an index position holding a tensor requires an integer constant "
                        f"(declared with consts), got {cname!r} in {name}[...] in {where}"
                    )
                for jx in ix.indices:
                    if not is_index(jx):
                        raise SpecError(
                            f"a gather index {cname}[...] requires plain index symbols, got "
                            f"{sp.sstr(jx)} in {where}"
                        )
                _check_rank(cname, len(ix.indices), ELL in ix.indices, where, ranks, has_ell)
                gather_consts.add(cname)
                continue
            _check_affine(ix, p, name, where, layer)
            continue
        if len(set(i for i in idx if is_index(i))) != len([i for i in idx if is_index(i)]):
            raise SpecError(
                f"a tensor occurrence requires distinct indices, got {sp.sstr(expr)} in {where}"
            )
        return
    if isinstance(expr, sp.Symbol):
        if is_index(expr) or isinstance(expr, Dim):
            if expr == ELL:
                raise SpecError(f"'...' in {where} requires a tensor position, got it as a value")
            return  # an index's value (0, 1, ...) or a dimension's size
        if expr.name in known:
            _check_rank(expr.name, 0, False, where, ranks, has_ell)
            return
        if expr.name in layer.hyper:
            return
        raise SpecError(
            f"name {expr.name!r} in {where} requires a declaration as a tensor or hyperparameter, "
            f"got an unknown name"
        )
    if isinstance(expr, Size):
        if not is_index(expr.args[0]):
            raise SpecError(
                f"Size in {where} requires an index symbol, got {sp.sstr(expr.args[0])}"
            )
        return
    if isinstance(expr, (sp.Number, sp.NumberSymbol)) or expr in (sp.true, sp.false):
        if expr.has(sp.zoo, sp.oo, sp.nan, -sp.oo) or (
            isinstance(expr, sp.Number) and not math.isfinite(float(expr))
        ):
            raise SpecError(f"{where} requires numbers that fit a float, got {sp.sstr(expr)}")
        return
    if isinstance(expr, (sp.Function, sp.Piecewise, sp.Max, sp.Min)):
        if not isinstance(expr, ALLOWED_FUNCTIONS):
            raise SpecError(
                f"function {type(expr).__name__!r} in {where} requires a name from the formula "
                f"sheet, got an unknown function"
            )
    elif isinstance(expr, (sp.Add, sp.Mul, sp.Pow, sp.Tuple)) or isinstance(
        expr,
        (
            sp.core.relational.Relational,
            sp.logic.boolalg.BooleanFunction,
            sp.functions.elementary.piecewise.ExprCondPair,
        ),
    ):
        pass
    else:
        raise SpecError(
            f"{where} requires known operations, got {type(expr).__name__}: {sp.sstr(expr)}"
        )
    for a in expr.args:
        _check_expr(a, k, known, layer, ranks, has_ell, gather_consts, bound)


def _check_affine(ix, p, name, where, layer):
    """An affine index position: a sum of index symbols times positive integer coefficients
    (numbers or integer hyperparameters) plus an integer offset. A negative offset reads zeros
    below the start of the axis (zero padding, see :func:`_padded_reads`)."""
    text = sp.sstr(ix)

    def fail(rule):
        raise SpecError(
            f"index position {p + 1} of {name} in {where} requires {rule}, got {text}",
            position=p,
        )

    for sym in ix.free_symbols:
        if is_index(sym) or isinstance(sym, Dim):
            continue
        if sym.name not in layer.hyper:
            fail("index symbols, integers, dimension sizes and hyperparameters only")
    if not any(is_index(sym) for sym in ix.free_symbols):
        fail("at least one index symbol")
    if ix.has(ELL):
        fail("no '...' inside an expression")
    index_syms = [sym for sym in ix.free_symbols if is_index(sym)]
    try:
        poly = sp.Poly(sp.expand(ix), *index_syms)
    except sp.PolynomialError:
        fail("an affine expression like stride*i + p")
    if poly.total_degree() > 1:
        fail("an affine expression (no products of indices)")
    terms, const = affine_terms(ix)
    for coeff, sym in terms:
        if coeff.free_symbols & set(index_syms):
            fail("an affine expression")
        if coeff.is_number and not (coeff.is_integer and coeff > 0):
            fail(
                f"a positive integer coefficient of {sym.name} (an axis read backwards is not "
                f"supported: write the window forwards, e.g. x[t + k] with the kernel reversed)"
            )
        if not coeff.is_number and not _positive(coeff, layer):
            fail(
                f"a coefficient of {sym.name} made of positive integers and hyperparameters "
                f"(hyperparameters in an index are positive integers; an axis read backwards "
                f"is not supported)"
            )
    for term in sp.Add.make_args(const):
        if term.is_number and not term.is_integer:
            fail("an integer offset")
        if not term.is_number and not _positive(-term if _negative(term) else term, layer):
            fail("an offset made of integers and hyperparameters, each term of one sign")


def _as_positive(expr, layer=None):
    """``expr`` with every hyperparameter and dimension size as a positive integer symbol."""
    reps = {}
    for sym in expr.free_symbols:
        if isinstance(sym, Dim) or layer is None or sym.name in layer.hyper:
            reps[sym] = sp.Symbol(sym.name, positive=True, integer=True)
    return expr.xreplace(reps)


def _positive(expr, layer=None) -> bool:
    """``expr`` is provably positive when its hyperparameters and sizes are positive integers."""
    return bool(_as_positive(expr, layer).is_positive)


def _negative(expr, layer=None) -> bool:
    return bool(_as_positive(expr, layer).is_negative)


def _check_lower_bounds(assigns: list, layer: Layer, ranks: dict) -> None:
    """Every affine read starts at or after the start of its (padded) axis: positive
    coefficients and a non-negative offset, proven with hyperparameters and sizes as positive
    integers (pad widths as non-negative). The ranges derived from the constraints keep every
    read below the end of its axis, so a strided view over it never leaves the array."""
    for a, occ, p, ix in affine_reads(assigns, ranks):
        terms, const = affine_terms(ix)
        low = _as_positive(const, layer)
        proven = all(_positive(c, layer) for c, _ in terms) and (
            const == 0 or bool(low.is_nonnegative) or bool((low + 1).is_positive)
        )
        if not proven:
            raise SpecError(
                f"index position {p + 1} of {occurrence_name(occ)} in equation "
                f"{a.scope + 1} requires a read provably inside the axis, got {sp.sstr(ix)}",
                position=p,
            )


def _padded_reads(assigns: list, layer: Layer, ranks: dict) -> tuple[list, dict]:
    """Zero padding written as a negative offset: ``x[n, c, t + k - padding]`` reads zeros
    below the start of x's axis. As in PyTorch, the axis is padded by the same width at both
    ends, so ``t`` ranges over ``L + 2*padding - K + 1`` positions. Every read of that axis is
    moved into the padded coordinates (``x[n, c, t] -> x[n, c, t + padding]``).

    Returns the rewritten assignments and ``{tensor: {axis: width}}``."""
    declared = layer.inputs + layer.params + layer.consts
    widths: dict[str, dict[int, sp.Expr]] = {}
    for a, occ, p, ix in affine_reads(assigns, ranks):
        name = occurrence_name(occ)
        _, const = affine_terms(ix)
        below = -sum((t for t in sp.Add.make_args(const) if _negative(t, layer)), sp.S.Zero)
        if below == 0:
            continue
        where = f"index position {p + 1} of {name} in equation {a.scope + 1}"
        if name not in declared:
            raise SpecError(
                f"{where} reads below the start of the axis ({sp.sstr(ix)}), which "
                f"requires an argument to pad with zeros, got the intermediate {name!r} "
                f"(shift the index instead)",
                position=p,
            )
        if p in dict(layer.pad.get(name, {}).get("axes", {})):
            raise SpecError(
                f"{where} reads below the start of the axis ({sp.sstr(ix)}), which "
                f"requires one way to pad it, got a declared pad of {name!r} as well",
                position=p,
            )
        if name in layer.pad and float(layer.pad[name].get("value", 0.0)) != 0.0:
            raise SpecError(
                f"{where} reads zeros below the start of the axis, which requires a "
                f"zero pad value for {name!r}, got {layer.pad[name]['value']!r}",
                position=p,
            )
        known = widths.setdefault(name, {}).get(p)
        if known is not None and sp.expand(known - below) != 0:
            raise SpecError(
                f"{where} reads {sp.sstr(below)} below the start of the axis, which "
                f"requires one padding width per axis, got {sp.sstr(known)} elsewhere",
                position=p,
            )
        widths[name][p] = below
    if not widths:
        return assigns, widths

    def moved(occ):
        name = occurrence_name(occ)
        shifts = widths.get(name)
        if not shifts:
            return occ
        idx = list(occurrence_indices(occ))
        for p, width in shifts.items():
            idx[p] = sp.expand(idx[p] + width)
        return occ.base[tuple(idx)]

    out = []
    for a in assigns:
        reps = {occ: moved(occ) for occ in occurrences(a.expr, ranks)}
        out.append(dataclasses.replace(a, expr=a.expr.xreplace(reps)))
    return out, widths


def _check_rank(name, rank, ell, where, ranks, has_ell):
    if name in ranks and ranks[name] != rank:
        raise SpecError(
            f"tensor {name!r} requires the same number of indices everywhere, got {rank} in "
            f"{where} and {ranks[name]} before"
        )
    if name in has_ell and has_ell[name] != ell:
        raise SpecError(
            f"tensor {name!r} requires '...' everywhere or nowhere, got both ({where})"
        )
    ranks[name] = rank
    has_ell[name] = bool(ell)


# ---------------------------------------------------------------------------------------------
# Integer hyperparameters
# ---------------------------------------------------------------------------------------------


def integer_hyper(spec: Spec) -> set[str]:
    """Hyperparameters that set sizes or index maps (a stride, a padding, a window size, a
    number of heads): the generated module slices arrays with them, so they are integers."""
    names: set[str] = set(spec.hyper_dims.values())
    for widths in spec.pads.values():
        for w in widths.values():
            names |= {s.name for s in w.free_symbols}
    for f in list(spec.derived.values()) + [b for _, b in spec.bounds]:
        names |= {s.name for s in f.free_symbols if s.name in spec.hyper}
    for _, _, _, ix in affine_reads(spec.assigns, spec.tensors):
        names |= {s.name for s in ix.free_symbols if s.name in spec.hyper}
    return names & set(spec.hyper)


def _integer_defaults(spec: Spec) -> Spec:
    """``spec`` with an int default for every :func:`integer_hyper` (and every hyperparameter
    one of them defaults to by name): none (required) becomes ``int`` (a required integer) and
    an integral float such as 2.0 becomes 2; any other default (2.5, True) is an error."""
    hyper = dict(spec.hyper)
    todo, seen, changed = sorted(integer_hyper(spec)), set(), False
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        value = hyper[name]
        if isinstance(value, str):  # stride defaults to kernel_size: that one too
            todo += [value] if value in hyper else []
            continue
        if (
            isinstance(value, sp.Basic)
            or value is int
            or (isinstance(value, int) and not isinstance(value, bool))
        ):
            continue
        if value is None:
            hyper[name], changed = int, True
            continue
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            hyper[name], changed = int(value), True
            continue
        raise SpecError(
            f"hyperparameter {name!r} sets a size or an index position, which requires an "
            f"integer default, got {value!r}",
            name=name,
            default=value,
        )
    return dataclasses.replace(spec, hyper=hyper) if changed else spec
