"""Reverse-mode differentiation of a layer's straight-line program of indexed assignments.

For an assignment ``T[I] = f(..., A[g(I, J)], ...)`` (elementwise, or a ``Sum`` over ``J``) and an
occurrence ``A[g]`` in its body, the contribution to the adjoint of ``A`` is

    dA[g] += sum over the indices of I, J not in g of  dT[I] * (d body / d A[g])

where the local partial is a plain scalar derivative: the occurrence is replaced by a fresh
scalar symbol, differentiated with ``sympy.diff`` and substituted back. No Kronecker delta ever
appears, because every occurrence is its own symbol; the "delta elimination" of the textbook
derivation is exactly the index map ``g``. Every contribution is itself an indexed assignment,
lowered by the same machinery as the forward program.

Forward values are reused: a partial that contains the right side of a forward assignment is
rewritten through that assignment's target (sigmoid' = y (1 - y)), and a function application
that the backward needs and the forward computes inside a larger expression is hoisted into a
cached forward intermediate.
"""

from __future__ import annotations

import dataclasses

import sympy as sp

from .errors import DeriveError
from .functions import stop_gradient
from .printing import equation_text
from .spec import (
    Assign,
    Layer,
    Spec,
    TensorInfo,
    free_indices,
    is_index,
    occurrence_indices,
    occurrence_name,
    occurrences,
    ordered,
    plain_indices,
)


@dataclasses.dataclass(frozen=True)
class Contribution:
    """One backward statement: ``target[lhs] (+)= Sum(body, reduce)``.

    ``lhs`` is the occurrence's index list (plain index symbols, or gathers ``c[n]`` whose
    adjoint is a scatter-add). ``body`` ranges over ``over`` (the forward assignment's indices).
    """

    target: str  # the adjoint's name, e.g. "dweight"
    tensor: str  # the tensor whose adjoint this is, e.g. "weight"
    lhs: tuple
    body: sp.Expr
    reduce: tuple[sp.Symbol, ...]
    over: tuple[sp.Symbol, ...]
    scope: int
    first: bool  # the first contribution defines the adjoint, later ones add to it
    source: int  # position of the forward assignment in Derivation.forward
    partial: sp.Expr  # the local partial d body / d occurrence (for reports)
    occurrence: sp.Expr
    outs: tuple = ()  # the forward assignment's own (left-hand) indices

    @property
    def is_gather(self) -> bool:
        return any(not is_index(ix) for ix in self.lhs)


@dataclasses.dataclass
class Derivation:
    """The result of :func:`derive`: the forward program (with any hoisted intermediates),
    the backward program, and the names that connect them. Its ``repr`` is a plain-text report;
    :func:`symdl.latex.formulas` gives the LaTeX and :func:`symdl.report.show` a notebook view."""

    spec: Spec
    forward: list[Assign]
    backward: list[Contribution]
    tensors: dict[str, TensorInfo]
    adjoints: dict[str, str]  # tensor -> adjoint variable name
    grads: dict[str, str | None]  # argument -> adjoint name (None: gradient is zero)
    cached: tuple[str, ...]  # forward tensors the backward reads
    needs_grad: frozenset[str]
    # adjoints held scaled (see reuse_outputs): name -> (adjoint, factor, the factor's indices
    # as those of the adjoint's left side); name[I] stands for factor[I] * adjoint[I]
    scaled: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return plain_report(self)


def _indexed(name: str, idx: tuple) -> sp.Expr:
    return sp.IndexedBase(name, real=True)[idx] if idx else sp.Symbol(name, real=True)


def local_partial(expr: sp.Expr, occ: sp.Expr) -> sp.Expr:
    """d expr / d occ, treating ``occ`` (one tensor occurrence) as a scalar variable."""
    s = sp.Dummy("s", real=True)
    replaced = expr.xreplace({occ: s})
    partial = sp.diff(replaced, s)
    # the derivative of a step (sign, Heaviside) is zero almost everywhere, as in PyTorch
    partial = partial.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)
    if partial.has(sp.Derivative):
        unknown = sorted({sp.sstr(d.expr.func) for d in partial.atoms(sp.Derivative)})
        raise DeriveError(
            f"differentiating {sp.sstr(expr)} requires derivatives of every function, got none "
            f"for {', '.join(unknown)}"
        )
    return partial.xreplace({s: occ})


def _function_nodes(expr: sp.Expr, tensor_names) -> list[sp.Expr]:
    """Function applications (and fractional powers) in ``expr`` that read a tensor, outside
    any ``Piecewise``: a value computed in one branch only must stay there, or the chain rule
    would multiply the other branch's zero by its (possibly infinite) derivative."""
    found = []

    def visit(node):
        if isinstance(node, sp.Piecewise):
            return
        is_fn = isinstance(node, sp.Function) and not isinstance(node, stop_gradient)
        is_root = isinstance(node, sp.Pow) and not node.exp.is_integer
        if (is_fn or is_root) and occurrences(node, tensor_names):
            found.append(node)
        for a in node.args:
            visit(a)

    visit(expr)
    return found


def derive(layer: Layer | Spec) -> Derivation:
    """Derive the backward program of a layer (or of a validated :class:`Spec`)."""
    spec = layer.spec() if isinstance(layer, Layer) else layer
    try:
        return _derive(spec)
    except DeriveError as err:
        raise err.with_context(f"layer {spec.name!r}") from None
    except RecursionError:
        raise DeriveError(
            f"layer {spec.name!r}: differentiating requires less deeply nested expressions, got "
            f"one too deep for SymPy"
        ) from None


def _derive(spec: Spec) -> Derivation:
    return _Deriver(spec).run()


class _Deriver:
    """Reverse mode over a spec's straight-line program, one step per method: which tensors
    need a gradient, arg-max masks for Max, long products split, function applications the
    backward shares hoisted into the forward, then each assignment's local partials turned
    into adjoint contributions in reverse order."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.tensors = dict(spec.tensors)
        self.forward = list(spec.assigns)
        self.all_names = set(self.tensors) | set(spec.hyper) | set(spec.dims)
        self.counter = 0
        self.masks: dict[str, str] = {}
        self.hoisted: dict[tuple[int, sp.Expr], sp.Expr] = {}
        # which tensors depend on a differentiable argument (stop_gradient cuts the dependence)
        self.needs = set(spec.args)
        for a in self.forward:
            live = _strip_stop_gradient(a.expr)
            if any(occurrence_name(o) in self.needs for o in occurrences(live, self.tensors)):
                self.needs.add(a.target)
        for o in spec.outputs:
            if o not in self.needs:
                raise DeriveError(
                    f"output {o!r} requires a dependence on an input or parameter to be "
                    f"differentiated, got none"
                )
        # adjoint names: "d" + name, unless that collides with a user name
        self.adjoints: dict[str, str] = {}
        for t in self.tensors:
            self.adjoints[t] = self.adjoint_name(t)

    def run(self) -> Derivation:
        self.add_argmax_masks()
        split: list[Assign] = []
        for a in self.forward:
            a = self.split_products(a, split) if a.target in self.needs else a
            split.append(a)
        self.forward = split
        partials = self.raw_partials()
        if self.hoist_shared(partials):
            partials = self.raw_partials()
        backward = self.backward_program(partials)
        return self.result(backward)

    def adjoint_name(self, t: str) -> str:
        cand = f"d{t}"
        while cand in self.all_names or cand in self.tensors or cand in self.adjoints.values():
            cand = f"grad_{cand}"
        return cand

    def fresh(self) -> str:
        while f"t{self.counter}" in self.tensors or f"t{self.counter}" in self.all_names:
            self.counter += 1
        name = f"t{self.counter}"
        self.counter += 1
        return name

    def intermediate(self, name: str, idx: tuple, scope: int, differentiable: bool) -> None:
        """Register a new intermediate tensor ``name`` over ``idx`` (of equation ``scope``)."""
        dims = tuple(self.spec.index_dims[(scope, i)] for i in idx)
        self.tensors[name] = TensorInfo(name, "intermediate", len(idx), dims, "float")
        if differentiable:
            self.needs.add(name)
        self.adjoints[name] = self.adjoint_name(name)

    # ---- local partials ---------------------------------------------------------------------
    def active_targets(self) -> set[str]:
        """Tensors whose adjoint is reached from an output (stop_gradient cuts the path)."""
        active = set(self.spec.outputs)
        for a in reversed(self.forward):
            if a.target in active:
                for o in occurrences(_strip_stop_gradient(a.expr), self.tensors):
                    if occurrence_name(o) in self.needs:
                        active.add(occurrence_name(o))
        return active

    def add_argmax_masks(self) -> None:
        """A Max on the gradient path routes its gradient to the first arg-max: the forward
        records a mask of that position (an "argmax" assignment over all of the Max's
        indices)."""
        active = self.active_targets()
        with_masks: list[Assign] = []
        for a in self.forward:
            with_masks.append(a)
            if a.op == "max" and a.target in self.needs and a.target in active:
                name = "argmax_" + a.target
                while name in self.tensors or name in self.all_names:
                    name = "_" + name
                idx = a.all_indices
                dims = tuple(self.spec.index_dims[(a.scope, i)] for i in idx)
                self.tensors[name] = TensorInfo(name, "intermediate", len(idx), dims, "float")
                with_masks.append(Assign(name, idx, "argmax", a.expr, a.reduce, a.scope))
                self.masks[a.target] = name
        self.forward = with_masks

    def raw_partials(self) -> list:
        """``(position, assign, occurrence, partial)`` of every occurrence on a gradient path."""
        out = []
        active = self.active_targets()
        for pos, a in enumerate(self.forward):
            if a.target not in self.needs or a.target not in active or a.op == "argmax":
                continue
            for occ in occurrences(a.expr, self.tensors):
                if occurrence_name(occ) not in self.needs:
                    continue
                p = local_partial(a.expr, occ)
                if a.op == "max":  # d max_J body / d body[J] = [J is the first arg-max]
                    p = p * _indexed(self.masks[a.target], a.all_indices)
                if p != 0:
                    out.append((pos, a, occ, p))
        return out

    # ---- long products: the derivative of a product of k factors that depend on an argument
    # is a sum of k products of k - 1 factors (quadratic in k); split the product into named
    # partial products of at most MAX_FACTORS factors each, so every local partial stays small
    def split_products(self, a: Assign, out: list) -> Assign:
        needs, tensors = self.needs, self.tensors

        def long_products(node):
            if isinstance(node, sp.Piecewise):  # branch values stay inside their branch
                return []
            found = [n for arg in node.args for n in long_products(arg)]
            if node.is_Mul and sum(_depends(f, needs, tensors) for f in node.args) > MAX_FACTORS:
                found.append(node)  # innermost first
            return found

        done: dict = {}  # product -> its split form (inner products first)
        for node in long_products(a.expr):
            inner = node.xreplace(done)
            live = [f for f in inner.args if _depends(f, needs, tensors)]
            rest = [f for f in inner.args if not _depends(f, needs, tensors)]
            while len(live) > MAX_FACTORS:
                chunks = [live[k : k + MAX_FACTORS] for k in range(0, len(live), MAX_FACTORS)]
                live = []
                for chunk in chunks:
                    body = sp.Mul(*chunk)
                    idx = ordered(free_indices(body), a.all_indices)
                    name = self.fresh()
                    self.intermediate(name, idx, a.scope, True)
                    out.append(Assign(name, idx, "map", body, (), a.scope))
                    live.append(_indexed(name, idx))
            done[node] = sp.Mul(*rest, *live)
        return dataclasses.replace(a, expr=a.expr.xreplace(done)) if done else a

    # ---- hoist function applications the backward shares with the forward -------------------
    def hoist_shared(self, partials: list) -> bool:
        """Each function application of a forward assignment that its equation's partials read
        too becomes an intermediate of its own; whether any did."""
        new_forward: list[Assign] = []
        for a in self.forward:
            expr = a.expr
            if a.target in self.needs:
                same_scope = [p for (_, b, _, p) in partials if b.scope == a.scope]
                for node in _function_nodes(expr, self.tensors):
                    if a.op == "map" and node == expr:
                        continue  # the whole right side: reused through the target itself
                    if not any(p.has(node) for p in same_scope):
                        continue
                    key = (a.scope, node)
                    if key not in self.hoisted:
                        idx = ordered(free_indices(node), a.all_indices)
                        name = self.fresh()
                        self.intermediate(
                            name, idx, a.scope, _depends(node, self.needs, self.tensors)
                        )
                        self.hoisted[key] = _indexed(name, idx)
                        new_forward.append(Assign(name, idx, "map", node, (), a.scope))
                    expr = expr.xreplace({node: self.hoisted[key]})
            new_forward.append(dataclasses.replace(a, expr=expr))
        self.forward = new_forward
        return bool(self.hoisted)

    def reuse_tables(self):
        """The right side of each forward map assignment -> its target (and each hoisted
        application -> its intermediate), by equation, longest expressions first so an outer
        match wins over its inner parts."""
        reuse: dict[int, dict[sp.Expr, sp.Expr]] = {}
        for a in self.forward:
            if a.op == "map" and not isinstance(a.expr, (sp.Indexed, sp.Symbol, sp.Number)):
                reuse.setdefault(a.scope, {})[a.expr] = _indexed(a.target, a.indices)
        for (scope, node), ref in self.hoisted.items():
            reuse.setdefault(scope, {})[node] = ref
        order = {
            scope: sorted(table, key=lambda e: (-sp.count_ops(e), sp.default_sort_key(e)))
            for scope, table in reuse.items()
        }
        return reuse, order

    # ---- the backward program, in reverse order of the forward assignments -------------------
    def backward_program(self, partials: list) -> list:
        reuse, reuse_order = self.reuse_tables()

        def rewrite(p, scope):
            table = reuse.get(scope, {})
            for src in reuse_order.get(scope, ()):
                p = p.xreplace({src: table[src]}) if p.has(src) else p
                if src.is_Pow and not src.exp.is_integer:
                    p = _reuse_power(p, src, table[src])
            return p

        by_pos: dict[int, list] = {}
        for pos, a, occ, p in partials:
            by_pos.setdefault(pos, []).append((occ, p))
        backward: list[Contribution] = []
        started: set[str] = set(self.spec.outputs)
        self.first_seen: set[str] = set()
        for pos in range(len(self.forward) - 1, -1, -1):
            a = self.forward[pos]
            if a.target not in started or pos not in by_pos:
                continue
            dT = _indexed(self.adjoints[a.target], a.indices)
            over = a.all_indices
            for occ, p in by_pos[pos]:
                A = occurrence_name(occ)
                p = rewrite(p, a.scope)
                reduce = tuple(i for i in over if i not in plain_indices(occ))
                first = A not in self.first_seen and A not in self.spec.outputs
                self.first_seen.add(A)
                started.add(A)
                backward.append(
                    Contribution(
                        target=self.adjoints[A],
                        tensor=A,
                        lhs=occurrence_indices(occ),
                        body=dT if p == 1 else dT * p,
                        reduce=reduce,
                        over=over,
                        scope=a.scope,
                        first=first,
                        source=pos,
                        partial=p,
                        occurrence=occ,
                        outs=a.indices,
                    )
                )
        return backward

    def result(self, backward: list) -> Derivation:
        spec = self.spec
        grads = {n: (self.adjoints[n] if n in self.first_seen else None) for n in spec.args}
        referenced: set[str] = set()
        for c in backward:
            for occ in occurrences(c.body, self.tensors):
                referenced.add(occurrence_name(occ))
            for ix in c.lhs:
                if isinstance(ix, sp.Indexed):  # a gather's index tensor
                    referenced.add(occurrence_name(ix))
        referenced |= set(spec.keep)
        cached = tuple(
            t
            for t in list(spec.args) + list(spec.consts) + [a.target for a in self.forward]
            if t in referenced
        )
        return Derivation(
            spec=spec,
            forward=self.forward,
            backward=backward,
            tensors=self.tensors,
            adjoints=self.adjoints,
            grads=grads,
            cached=cached,
            needs_grad=frozenset(self.needs),
        )


def reuse_outputs(d: Derivation, keep=()) -> Derivation:
    """The backward through a later forward value ``y = f(e, ...)`` instead of ``e``, where
    ``f`` is invertible in ``e`` without a function (``y = e / s`` gives ``e = y * s``).

    Every read of ``e`` in the backward becomes that inverse; where the inverse's other
    factors then multiply an adjoint at each of its uses, the adjoint is held scaled by them
    (``de_s = s * de``), so they cancel. The result is kept only if the backward no longer
    reads ``e``, reads no more (or larger) forward tensors than before, and takes no more
    operations: for a softmax, ``dx = y * (dy - Sum(dy * y))`` from ``y`` alone instead of
    from ``e`` and ``s``. ``keep``: adjoints the caller reads, never held scaled."""
    for a in d.forward:
        for occ in occurrences(a.expr, d.tensors):
            found = _output_reuse(d, a, occ, keep)
            if found is not None:
                d = found
    return d


def _output_reuse(d: Derivation, a: Assign, occ, keep) -> Derivation | None:
    spec = d.spec
    e = occurrence_name(occ)
    if (
        a.op != "map"
        or not isinstance(occ, sp.Indexed)
        or tuple(occ.indices) != tuple(a.indices)
        or e not in d.cached
        or e in set(spec.outputs) | set(spec.keep) | set(spec.consts)
        or any(occurrence_name(o) == e and o != occ for o in occurrences(a.expr, d.tensors))
        # (an argument, cached at no cost: only as a factor, x[n, d] * rstd[n])
        or (e in spec.args and occ not in sp.Mul.make_args(a.expr))
    ):
        return None
    # the inverse of y = A * e + B (A, B free of e and e inside no function): (y - B) / A
    E = sp.Dummy("e")
    body = a.expr.xreplace({occ: E})
    inside = body.atoms(sp.Function, sp.Piecewise) | {
        p for p in body.atoms(sp.Pow) if not p.exp.is_integer
    }
    if any(node.has(E) for node in inside):
        return None
    slope = sp.diff(body, E)
    rest = sp.expand(body - slope * E)
    if slope.has(E) or slope == 0 or rest.has(E):
        return None
    y = _indexed(a.target, a.indices)
    inverse = (y - rest) / slope
    # a division in the inverse (y = o * t gives t = y / o, not finite where o underflows to
    # 0) is kept only where held-scaled adjoints cancel it (see below)
    divides = _divisions(inverse, d)
    # (only in a product, by a tensor of fewer indices than e, as rstd[n] in xc[n, d] =
    # xhat[n, d] / rstd[n]: no difference to compute, an adjoint of that size to scale)
    if divides and (
        rest != 0
        or not all(isinstance(b, sp.Indexed) and len(b.indices) < len(a.indices) for b in divides)
    ):
        return None
    if not inverse.has(y) or not free_indices(inverse) <= set(a.indices):
        return None
    others = {occurrence_name(o) for o in occurrences(inverse, d.tensors)} - {a.target}

    # every read of e (at plain indices) through the inverse
    def substitute(expr):
        reads = [o for o in occurrences(expr, d.tensors) if occurrence_name(o) == e]
        for o in reads:
            if not isinstance(o, sp.Indexed) or len(plain_indices(o)) != len(o.indices):
                raise _NoReuse
        return expr.xreplace({o: inverse.xreplace(dict(zip(a.indices, o.indices))) for o in reads})

    try:
        backward = [
            dataclasses.replace(c, body=substitute(c.body), partial=substitute(c.partial))
            for c in d.backward
        ]
    except _NoReuse:
        return None
    backward, scaled = _scale_adjoints(d, backward, others, keep)
    if divides and not _divisions(backward, d) <= _divisions(d.backward, d):
        return None
    new = dataclasses.replace(d, backward=backward, scaled={**d.scaled, **scaled})
    new = dataclasses.replace(new, cached=_cached(new))

    def size(der):
        return sorted((d.tensors[t].rank for t in der.cached), reverse=True)

    def ops(cs):
        return sum(sp.count_ops(c.body) for c in cs)

    if e in new.cached or size(new) > size(d) or ops(backward) > ops(d.backward):
        return None
    # an argument is cached at no cost: reading the later value instead must save operations
    if e in spec.args and ops(backward) == ops(d.backward):
        return None
    return new


class _NoReuse(Exception):
    pass


def _divisions(exprs, d: Derivation) -> set:
    """The negative powers of forward tensors in ``exprs`` (an expression or contributions)."""
    if not isinstance(exprs, list):
        exprs = [exprs]
    found = set()
    for e in exprs:
        body = e.body if isinstance(e, Contribution) else e
        found |= {
            p.base
            for p in body.atoms(sp.Pow)
            if p.exp.is_negative and occurrences(p.base, d.tensors)
        }
    return found


def _cached(d: Derivation) -> tuple[str, ...]:
    """The forward tensors the backward of ``d`` reads (with those the layer keeps)."""
    referenced = set(d.spec.keep)
    for c in d.backward:
        referenced |= {occurrence_name(o) for o in occurrences(c.body, d.tensors)}
        referenced |= {occurrence_name(ix) for ix in c.lhs if isinstance(ix, sp.Indexed)}
    spec = d.spec
    order = list(spec.args) + list(spec.consts) + [a.target for a in d.forward]
    return tuple(t for t in order if t in referenced)


def _scale_adjoints(d: Derivation, backward: list, tensors: set, keep) -> tuple[list, dict]:
    """Adjoints held scaled by a factor (of the forward ``tensors``) that multiplies each of
    their uses: the factor moves into their contributions, while that lowers the count of
    operations. Returns the new contributions and the scaled names."""
    fixed = set(d.grads.values()) | {d.adjoints[o] for o in d.spec.outputs} | set(keep)
    scaled: dict = {}
    names = set(d.adjoints.values())
    taken = set(d.tensors) | names | set(d.spec.hyper) | set(d.spec.dims) | set(d.scaled)

    def ops(cs):
        return sum(sp.count_ops(c.body) for c in cs)

    def uses(cs, name):
        return [(k, o) for k, c in enumerate(cs) for o in occurrences(c.body, {name})]

    while True:
        best = None
        for name in sorted({c.target for c in backward} - fixed):
            made = [c for c in backward if c.target == name]
            idx = made[0].lhs
            if any(c.lhs != idx or c.is_gather for c in made) or not all(map(is_index, idx)):
                continue
            used = uses(backward, name)
            if not used or len({k for k, _ in used}) != len(used):
                continue
            candidates, bad = None, False
            for k, o in used:
                body = backward[k].body
                if not isinstance(o, sp.Indexed) or len(set(o.indices)) != len(o.indices):
                    candidates, bad = set(), True
                    break
                if (
                    not all(map(is_index, o.indices))
                    or body.count(o) != 1
                    or o not in sp.Mul.make_args(body)
                ):
                    candidates, bad = set(), True
                    break
                back = dict(zip(o.indices, idx))
                here = set()
                for f in sp.Mul.make_args(body):
                    reads = occurrences(f, d.tensors)
                    if (
                        f == o
                        or not reads
                        or occurrences(f, names | set(scaled))
                        or any(occurrence_name(r) not in tensors for r in reads)
                        or not free_indices(f) <= set(o.indices)
                    ):
                        continue
                    here.add(f.xreplace(back))
                candidates = here if candidates is None else candidates & here
            # or a factor's inverse that every contribution to the adjoint has (where the
            # reads divide by a tensor: the division cancels)
            inverses = set() if bad else None
            for c in made if not bad else ():
                here = set()
                for f in sp.Mul.make_args(c.body):
                    reads = occurrences(f, d.tensors)
                    if (
                        reads
                        and isinstance(f, sp.Pow)
                        and f.exp.is_negative
                        and not occurrences(f, names | set(scaled))
                        and all(occurrence_name(r) in tensors for r in reads)
                        and free_indices(f) <= set(idx)
                    ):
                        here.add(1 / f)
                inverses = here if inverses is None else inverses & here
            for q in sorted((candidates or set()) | (inverses or set()), key=sp.default_sort_key):
                trial = _scaled(backward, name, idx, q, taken)
                if best is None or ops(trial) < best[0]:
                    best = (ops(trial), name, idx, q, trial)
        if best is None or best[0] > ops(backward):  # (a tie may open a later gain)
            return backward, scaled
        _, name, idx, q, trial = best
        new = _scaled_name(name, q, backward, taken)
        scaled[new] = (name, q, idx)
        backward = trial
        names.add(new)
        fixed.add(new)


def _scaled_name(name: str, q, backward, taken) -> str:
    """``de_s`` for the adjoint ``de`` scaled by ``s[n]`` (or ``s[n]**2``)."""
    reads = occurrences(q, {str(b.label) for b in q.atoms(sp.IndexedBase)})
    base = f"{name}_{occurrence_name(reads[0])}" if len(reads) == 1 else f"{name}_scaled"
    taken = {c.target for c in backward} | taken
    while base in taken:
        base = "_" + base
    return base


def _scaled(backward: list, name: str, idx: tuple, q, taken) -> list:
    """``backward`` with adjoint ``name`` held as ``q * name`` under a new name: ``q`` times
    each contribution to it, and each use (a product with the factor ``q``) without it."""
    new = _scaled_name(name, q, backward, taken)
    out = []
    for c in backward:
        body = c.body
        for o in occurrences(body, {name}):
            back = dict(zip(idx, o.indices))
            body = body.xreplace({o: _indexed(new, tuple(o.indices))}) / q.xreplace(back)
        if c.target == name:
            body = body * q.xreplace(dict(zip(idx, c.lhs)))
            c = dataclasses.replace(c, target=new)
        out.append(dataclasses.replace(c, body=body))
    return out


def backward_reads(d: Derivation) -> set[tuple[str, int]]:
    """The occurrences of forward tensors the backward reads, as ``(sp.srepr(occ), scope)``:
    a forward read of the same occurrence may hand its value (a window copied into a
    matrix, say) to the backward instead of the tensor it reads."""
    reads = set()
    for c in d.backward:
        for occ in occurrences(c.body, d.tensors):
            reads.add((sp.srepr(occ), c.scope))
    return reads


def _reuse_power(p, src, target):
    """Powers of a base the forward raised to a fractional power, through the forward value:
    with ``r = b**(-1/2)`` cached, ``b**(-3/2) -> r**3`` (before -> after)."""
    base, exp = src.base, src.exp

    def match(e):
        return isinstance(e, sp.Pow) and e.base == base and (e.exp / exp).is_integer

    return p.replace(match, lambda e: target ** (e.exp / exp))


def _strip_stop_gradient(expr):
    """``expr`` with every ``stop_gradient(...)`` replaced by an opaque constant."""
    return expr.replace(lambda e: isinstance(e, stop_gradient), lambda e: sp.Dummy("c", real=True))


#: The most factors that depend on an argument in one product before it is split (derive).
MAX_FACTORS = 8


def _depends(node, needs, tensors):
    return any(occurrence_name(o) in needs for o in occurrences(_strip_stop_gradient(node), tensors))


def cache_affine(d: Derivation) -> Derivation:
    """A cached forward value ``e`` the backward reads only as ``m * (a*e + b)`` (plus terms
    free of ``e``; ``a``, ``b`` numbers) is cached as ``phi = a*e + b`` instead, computed in the
    forward next to ``e`` and read by the later forward values where that makes them smaller:
    for a GELU, ``t0 = erf(x/sqrt 2)`` gives ``phi = (1 + t0)/2``, the normal CDF, from which
    the forward takes ``y = x*phi`` and the backward ``dx = dy*(phi + x*pdf(x))``. Kept only
    where the operations of forward and backward together go down."""
    for a in list(d.forward):
        found = _affine_cache(d, a)
        if found is not None:
            d = found
    return d


def _affine_cache(d: Derivation, a: Assign) -> Derivation | None:
    spec = d.spec
    e = a.target
    if (
        a.op != "map"
        or e not in d.cached
        or e in set(spec.outputs) | set(spec.keep) | set(spec.args) | set(spec.consts)
        or d.tensors[e].kind != "float"
    ):
        return None
    E = sp.Dummy("e")
    shift = None
    for c in d.backward:
        reads = [o for o in occurrences(c.body, d.tensors) if occurrence_name(o) == e]
        if not reads:
            continue
        if len(set(reads)) != 1 or not isinstance(reads[0], sp.Indexed):
            return None
        body = c.body.xreplace({reads[0]: E})
        inside = body.atoms(sp.Function, sp.Piecewise) | {
            p for p in body.atoms(sp.Pow) if not p.exp.is_integer
        }
        split = _one_factor(body, E)
        if split is None or any(node.has(E) for node in inside):
            return None
        outer, factor = split  # (no expansion of a long product: only the factor with e)
        linear, free = [], []
        for t in sp.Add.make_args(sp.expand(factor, deep=False)):
            part, power = t.as_independent(E, as_Add=False)
            if power == E:
                linear.append(part)
            elif power == 1:
                free.append(part)
            else:
                return None
        coeff, m = (outer * sp.Add(*linear)).as_coeff_Mul()
        if not linear or coeff == 0:
            return None
        rest = sp.Add(*[outer * t / m for t in free])
        b = sp.Add(*[t for t in sp.Add.make_args(rest) if t.is_number])
        if b == 0 or (shift is not None and shift != (coeff, b)):
            return None
        shift = (coeff, b)
    if shift is None:
        return None
    coeff, b = shift
    taken = set(d.tensors) | set(d.adjoints.values()) | set(spec.hyper) | set(spec.dims)
    k = 0
    while f"t{k}" in taken:
        k += 1
    phi = f"t{k}"
    at = _indexed(e, a.indices)
    new_assign = Assign(phi, a.indices, "map", coeff * at + b, scope=a.scope)

    def through(expr, smaller=False):
        reads = [o for o in occurrences(expr, d.tensors) if occurrence_name(o) == e]
        for o in reads:
            if not isinstance(o, sp.Indexed) or len(plain_indices(o)) != len(o.indices):
                raise _NoReuse
        if not reads:
            return expr
        split = _one_factor(expr, *set(reads))
        if split is None:
            raise _NoReuse
        outer, factor = split
        sub = {o: (_indexed(phi, tuple(o.indices)) - b) / coeff for o in reads}
        out = outer * sp.factor_terms(sp.expand(factor.xreplace(sub), deep=False))
        if smaller and sp.count_ops(out) >= sp.count_ops(expr):
            return expr
        return out

    try:
        forward = []
        for f in d.forward:
            forward.append(f if f is a else dataclasses.replace(f, expr=through(f.expr, True)))
            if f is a:
                forward.append(new_assign)
        backward = [
            dataclasses.replace(c, body=through(c.body), partial=through(c.partial))
            for c in d.backward
        ]
    except _NoReuse:
        return None
    tensors = dict(d.tensors)
    tensors[phi] = dataclasses.replace(d.tensors[e], name=phi)
    new = dataclasses.replace(d, forward=forward, backward=backward, tensors=tensors)
    new = dataclasses.replace(new, cached=_cached(new))

    def ops(der):
        return sum(sp.count_ops(f.expr) for f in der.forward) + sum(
            sp.count_ops(c.body) for c in der.backward
        )

    if e in new.cached or ops(new) >= ops(d):
        return None
    return new


def _one_factor(expr, *reads):
    """``(outer, factor)`` with ``expr = outer * factor`` and ``reads`` in ``factor`` alone
    (None where several factors of a product hold them)."""
    if not isinstance(expr, sp.Mul):
        return sp.S.One, expr
    holding = [f for f in expr.args if any(f.has(r) for r in reads)]
    if len(holding) != 1:
        return None
    return sp.Mul(*[f for f in expr.args if f is not holding[0]]), holding[0]


# ---- plain text (the repr; LaTeX is in symdl/latex.py, a later stage) -------------------------


def _lhs_text(name, idx):
    if not idx:
        return name
    return f"{name}[{', '.join(equation_text(i) for i in idx)}]"


def forward_text(derivation: Derivation) -> list[str]:
    """The layer's own equations, one line each."""
    out = []
    for lhs, rhs in derivation.spec.equations:
        out.append(f"{equation_text(lhs)} = {equation_text(rhs)}")
    return out


def backward_text(derivation: Derivation) -> list[str]:
    """The derived backward program, one line per statement (``=`` or ``+=``)."""
    out = []
    written = {c.target for c in derivation.backward}
    for name, (adj, factor, idx) in derivation.scaled.items():
        if name not in written:  # (substituted where it was read)
            continue
        held = equation_text(factor * sp.IndexedBase(adj, real=True)[idx])
        out.append(f"({_lhs_text(name, idx)} stands for {held}, an adjoint held scaled)")
    for c in derivation.backward:
        body = equation_text(c.body)
        if c.reduce:
            idx = ", ".join(equation_text(i) for i in c.reduce)
            body = f"Sum({body}, {idx if len(c.reduce) == 1 else '(' + idx + ')'})"
        op = "=" if c.first else "+="
        out.append(f"{_lhs_text(c.target, c.lhs)} {op} {body}")
    return out


def plain_report(derivation: Derivation) -> str:
    """The derivation as text (its ``repr``): arguments, forward equations, derived gradients."""
    spec = derivation.spec
    lines = [f"{spec.name}: {spec.doc}" if spec.doc else spec.name]
    shapes = spec.shapes()
    lines.append("  arguments:")
    for n in spec.args + spec.consts:
        role = spec.tensors[n].role
        lines.append(f"    {n} ({', '.join(shapes[n])})  {role}")
    for n, v in spec.hyper.items():
        if v is None or isinstance(v, type):
            lines.append(f"    {n}  hyperparameter (required)")
        elif isinstance(v, str):
            lines.append(f"    {n} = {v} unless given  hyperparameter")
        else:
            lines.append(f"    {n} = {v}  hyperparameter")
    lines.append("  forward:")
    lines += [f"    {t}" for t in forward_text(derivation)]
    lines.append("  backward (derived):")
    lines += [f"    {t}" for t in backward_text(derivation)]
    return "\n".join(lines)
