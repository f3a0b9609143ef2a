"""Sequence layers from any recurrent cell: a scan of the cell over a time-major input.

A cell is an ordinary :class:`~symdl.spec.Layer` (one time step). :func:`scan_layer` declares
which of its inputs are read per time step (``x`` -> ``x[t]``), which are carried state
(``h`` is fed by the cell output ``h1`` of the previous step) and which cell outputs are
stacked over time (``y[t] = h1``). From the cell's A-normal form the scan builds two layers,
both derived and lowered by the ordinary engine:

* the **hoisted** part: every assignment that reads the per-step inputs and parameters but not
  the carried state (for the built-in cells, ``gi = x W_ih^T + b_ih``), plus every state-free
  sub-expression of a recurrent assignment (``x W_ih^T + b_ih + b_hh`` inside the Elman cell's
  ``tanh``), with a leading time index on every per-step tensor, so that the input projection
  of all ``T`` steps is one matrix product;
* the **step**: the remaining (recurrent) assignments, with the hoisted tensors of one step and
  the state as its inputs.

The generated module runs the hoisted forward once, the step in a Python loop over time, and in
backward the step's backward in reverse (backpropagation through time) followed by the hoisted
part's backward once over all steps. The step writes its new arrays into arrays made once
before the loop (:data:`OPTIMIZATIONS`: ``buffers``), a recurrent sum's parameter-only terms
join the hoisted part (``fold``) and the parameters' gradients are summed after the loop
(``defer``). No gradient is written by hand: all four functions are
the engine's lowered code, rendered by ``templates/scan.py.j2``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping

import sympy as sp

from . import __version__
from .errors import SpecError
from .functions import IndexMax, IndexSum
from .fusion import written_into
from .passes import defaults
from .spec import (
    Assign,
    Layer,
    check_module_name,
    free_indices,
    is_index,
    occurrence_indices,
    occurrence_name,
    occurrences,
    ordered,
    tensor_name,
)
from .spec import split_names as _names

TIME_DIM = "T"


# ---------------------------------------------------------------------------------------------
# The declaration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sequence:
    """A sequence layer: the scan of ``cell`` over a time-major input.

    ``per_step`` are the cell inputs read at every step (``x`` is ``(T, ...)`` in the sequence),
    ``state`` maps each carried cell input to the cell output that feeds it at the next step,
    ``outputs`` maps each stacked sequence output to a cell output (``y[t] = h1``),
    ``initial`` maps each carried input to the sequence argument holding its initial value
    (``h -> h0``) and ``final`` maps each final-state output to its carried input
    (``h_T -> h``). Arguments: per-step inputs and initial states in the cell's input order,
    then the cell's parameters. Outputs: the stacked outputs, then the final states.
    """

    name: str
    cell: Layer
    per_step: tuple[str, ...]
    state: dict[str, str]
    outputs: dict[str, str]
    initial: dict[str, str]
    final: dict[str, str]
    doc: str = ""
    checks: dict = dataclasses.field(default_factory=dict)
    _parts: object = dataclasses.field(default=None, repr=False, compare=False)
    _derived: object = dataclasses.field(default=None, repr=False, compare=False)

    # the contract's names, known without building anything
    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(n if n in self.per_step else self.initial[n] for n in self.cell.inputs)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(self.cell.params)

    @property
    def args(self) -> tuple[str, ...]:
        return self.inputs + self.params

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.outputs) + tuple(self.final)

    def parts(self, fold: bool = True) -> ScanParts:
        """The hoisted and step layers (built once; ``fold``: see OPTIMIZATIONS)."""
        if self._parts is None:
            self._parts = {}
        if fold not in self._parts:
            try:
                self._parts[fold] = _split(self, fold)
            except SpecError as err:
                raise err.with_context(f"scan {self.name!r} of cell {self.cell.name!r}") from None
        return self._parts[fold]

    def derivations(self, fold: bool = True):
        """``(hoisted, step)`` derivations (the hoisted one None when nothing is hoisted)."""
        if self._derived is None:
            self._derived = {}
        if fold not in self._derived:
            from .derive import derive

            parts = self.parts(fold)
            hoisted = derive(parts.hoisted) if parts.hoisted is not None else None
            self._derived[fold] = (hoisted, derive(parts.step))
        return self._derived[fold]

    def __repr__(self) -> str:
        return f"Sequence {self.name!r}: scan of {self.cell.name!r}\n" + "\n".join(
            f"  {line}" for line in scan_text(self)
        )


def scan_layer(
    cell: Layer,
    name: str,
    *,
    per_step=("x",),
    state: Mapping[str, str] | None = None,
    outputs: Mapping[str, str] | None = None,
    initial: Mapping[str, str] | None = None,
    final: Mapping[str, str] | None = None,
    doc: str = "",
    checks: Mapping | None = None,
) -> Sequence:
    """Declare the sequence layer ``name`` as the scan of ``cell`` over time.

    ``state`` maps each carried cell input to the cell output that feeds it next step
    (default ``{"h": "h1"}``); ``outputs`` maps each stacked output to a cell output (default
    ``{"y": <the first state's output>}``); ``initial`` defaults to ``{s: s + "0"}`` and
    ``final`` to ``{s + "_T": s}``. Cheap: the split into hoisted and step layers happens on
    first use (:meth:`Sequence.parts`), and :func:`sequence_source` renders the module.
    """
    per_step = _names(per_step)
    state = dict(state if state is not None else {"h": "h1"})
    if not state:
        raise SpecError(f"scan {name!r} requires at least one carried state, got none")
    first_out = next(iter(state.values()))
    outputs = dict(outputs if outputs is not None else {"y": first_out})
    initial = dict(initial if initial is not None else {s: f"{s}0" for s in state})
    final = dict(final if final is not None else {f"{s}_T": s for s in state})
    seq = Sequence(
        name, cell, per_step, state, outputs, initial, final, doc or cell.doc, dict(checks or {})
    )
    _validate(seq)
    return seq


_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _validate(seq: Sequence) -> None:
    cell = seq.cell
    where = f"scan {seq.name!r} of cell {cell.name!r}"
    if not _IDENT.match(seq.name or ""):
        raise SpecError(
            f"{where}: a layer name requires letters, digits and underscores, got {seq.name!r}"
        )
    try:
        check_module_name(seq.name, "sequence")
    except SpecError as err:
        raise err.with_context(where) from None
    defined = [tensor_name(lhs) or lhs.name for lhs, _ in cell.equations]
    padded = sorted(cell.spec().pads)
    if padded:  # the scan's hoisted and step layers read the cell's arguments as given
        raise SpecError(
            f"{where}: a recurrent cell requires reads inside its arguments, got zero padding "
            f"of {', '.join(repr(n) for n in padded)} (a negative offset or a declared pad); "
            f"pad the sequence before the layer instead"
        )
    for n in seq.per_step:
        if n not in cell.inputs:
            raise SpecError(
                f"{where}: per-step {n!r} requires an input of the cell ({', '.join(cell.inputs)})"
            )
    for s, o in seq.state.items():
        if s not in cell.inputs:
            raise SpecError(
                f"{where}: state {s!r} requires an input of the cell ({', '.join(cell.inputs)})"
            )
        if s in seq.per_step:
            raise SpecError(
                f"{where}: {s!r} requires one role, got it both per-step and carried state"
            )
        if o not in defined:
            raise SpecError(f"{where}: state {s!r} requires a tensor the cell defines, got {o!r}")
    for y, o in seq.outputs.items():
        if o not in defined:
            raise SpecError(f"{where}: output {y!r} requires a tensor the cell defines, got {o!r}")
    for n in cell.inputs:
        if n not in seq.per_step and n not in seq.state:
            raise SpecError(
                f"{where}: cell input {n!r} requires a role, per-step or carried state, got neither"
            )
    if set(seq.initial) != set(seq.state):
        raise SpecError(
            f"{where}: initial requires one name per state ({', '.join(seq.state)}), got {sorted(seq.initial)}"
        )
    if sorted(seq.final.values()) != sorted(seq.state):
        raise SpecError(
            f"{where}: final requires one output per state ({', '.join(seq.state)}), got {sorted(seq.final.values())}"
        )
    extras = (cell.consts, cell.int_consts, cell.hyper, cell.pad, cell.ranges)
    extras += tuple(getattr(cell, k, None) for k in ("dims", "optional", "asserts"))
    if any(extras):
        raise SpecError(
            f"{where}: a scanned cell requires inputs and parameters only, got constants, "
            f"hyperparameters, padding, index ranges, dimension formulas or asserts (not "
            f"supported by scan yet)"
        )
    names = list(seq.args) + list(seq.output_names)
    for n in names:
        if not _IDENT.match(n):
            raise SpecError(f"{where}: a name requires an identifier, got {n!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: argument and output names require uniqueness, got {names}")


# ---------------------------------------------------------------------------------------------
# Splitting the cell: hoisted (all steps at once) and step (one step) layers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScanParts:
    hoisted: Layer | None  # None: nothing to hoist
    step: Layer
    time_varying: tuple[str, ...]  # hoisted outputs with a leading time axis
    invariant: tuple[str, ...]  # hoisted outputs computed once (parameters only)
    step_outputs: tuple[str, ...]
    cell_dims: dict[str, tuple[str, ...]]  # every cell tensor's dimensions


def _reads(expr, names) -> set[str]:
    return {occurrence_name(o) for o in occurrences(expr, names)}


def _is_trivial(expr) -> bool:
    """An occurrence, a number, or a number times an occurrence: not worth a hoisted array."""
    if expr.is_number or isinstance(expr, (sp.Indexed, sp.Symbol)):
        return True
    if isinstance(expr, sp.Mul):
        rest = [a for a in expr.args if not a.is_number]
        return len(rest) == 1 and isinstance(rest[0], (sp.Indexed, sp.Symbol))
    return False


def _split(seq: Sequence, fold: bool = True) -> ScanParts:
    cell = seq.cell
    spec = cell.spec()
    tensors = spec.tensors
    dims = {n: info.dims for n, info in tensors.items()}
    if any("..." in d for d in dims.values()):
        raise SpecError("a scanned cell requires explicit batch indices, got '...'")
    if spec.derived or spec.hyper_dims:
        raise SpecError("a scanned cell requires every dimension from an argument's shape")
    if TIME_DIM in spec.dims:
        raise SpecError(f"a scanned cell requires no dimension named {TIME_DIM!r} (the time axis)")
    for s, o in seq.state.items():
        if dims[o] != dims[s]:
            raise SpecError(f"state {s!r} {dims[s]} requires the shape of {o!r}, got {dims[o]}")

    state_in = set(seq.state)
    per_in = set(seq.per_step)
    needed_out = list(dict.fromkeys(list(seq.state.values()) + list(seq.outputs.values())))

    # ---- classify: state-dependent, per-step (state-free), constant (parameters only) -------
    dep_state, dep_step = set(state_in), set(per_in)
    for a in spec.assigns:
        r = _reads(a.expr, tensors)
        if r & dep_state:
            dep_state.add(a.target)
        elif r & dep_step:
            dep_step.add(a.target)

    def plain(a: Assign, expr=None) -> bool:
        """Every occurrence reads whole axes through plain index symbols (no window)."""
        for occ in occurrences(a.expr if expr is None else expr, tensors):
            name = occurrence_name(occ)
            for p, ix in enumerate(occurrence_indices(occ)):
                if not is_index(ix) or spec.index_dims[(a.scope, ix)] != dims[name][p]:
                    return False
        return True

    # ---- hoistable assignments: state-free, plain, reading only hoistable intermediates -----
    intermediates = {a.target for a in spec.assigns}
    hoist: set[str] = set()
    for a in spec.assigns:
        r = _reads(a.expr, tensors)
        if a.target in dep_state or a.target in needed_out or not plain(a):
            continue
        if all(n in hoist for n in r & intermediates):
            hoist.add(a.target)

    def provided(names) -> set[str]:
        args = set()
        for n in names:
            a = by_target[n]
            args |= _reads(a.expr, tensors) - intermediates
        return {d for n in args for d in dims[n]}

    by_target = {a.target: a for a in spec.assigns}
    while True:  # every dimension of the hoisted part comes from its own arguments
        have = provided(hoist)
        bad = {n for n in hoist if not set(dims[n]) <= have}
        if not bad:
            break
        for a in spec.assigns:  # demote, with everything reading a demoted tensor
            if a.target in hoist and (a.target in bad or _reads(a.expr, tensors) & bad):
                bad.add(a.target)
        hoist -= bad

    assigns = _folded(spec, hoist, tensors, plain, needed_out) if fold else list(spec.assigns)
    # ---- the step: recurrent assignments, state-free sub-expressions hoisted out --------------
    taken = set(tensors) | {s.name for a in spec.assigns for s in a.all_indices}
    counter = [0]

    def fresh() -> str:
        while f"a{counter[0]}" in taken:
            counter[0] += 1
        name = f"a{counter[0]}"
        taken.add(name)
        return name

    extra: list[Assign] = []  # new hoisted assignments
    extra_dims: dict[str, tuple[str, ...]] = {}
    hoisted_names = set(hoist)

    in_step = dep_state | (intermediates - hoisted_names)  # tensors only the step has

    def movable(e, a) -> bool:
        """State-free, over the assignment's own indices, reading whole axes."""
        return (
            not _reads(e, tensors) & in_step
            and not free_indices(e) & set(a.reduce)
            and plain(a, e)
        )

    def hoistable_sub(e, a) -> bool:
        if not movable(e, a) or _is_trivial(e):
            return False
        r = _reads(e, tensors)
        if not r & (dep_step | per_in):
            return False  # parameters only: cheap, left in the step
        have = provided(hoisted_names) | {d for n in r - intermediates for d in dims[n]}
        idx = ordered(free_indices(e), a.all_indices)
        return all(spec.index_dims[(a.scope, i)] in have for i in idx)

    def new_hoisted(e, a) -> sp.Expr:
        idx = ordered(free_indices(e), a.all_indices)
        name = fresh()
        extra.append(Assign(name, idx, "map", e, (), a.scope))
        extra_dims[name] = tuple(spec.index_dims[(a.scope, i)] for i in idx)
        return sp.IndexedBase(name, real=True)[idx] if idx else sp.Symbol(name, real=True)

    def extract(e, a):
        if not e.args or isinstance(e, (sp.Indexed, sp.Symbol)):
            return e
        if hoistable_sub(e, a):
            return new_hoisted(e, a)
        if isinstance(e, sp.Add):  # the state-free terms of a sum, as one hoisted term
            free = [term for term in e.args if movable(term, a)]
            if len(free) >= 2 and hoistable_sub(sp.Add(*free), a):
                rest = [extract(term, a) for term in e.args if term not in free]
                return sp.Add(new_hoisted(sp.Add(*free), a), *rest)
        return e.func(*[extract(x, a) for x in e.args])

    step_assigns: list[Assign] = []
    for a in assigns:
        if a.target in hoist:
            continue
        step_assigns.append(dataclasses.replace(a, expr=extract(a.expr, a)))

    # ---- what each part needs ----------------------------------------------------------------
    step_reads: set[str] = set()
    for a in step_assigns:
        step_reads |= _reads(a.expr, set(tensors) | set(extra_dims))
    hoisted_all = [a for a in assigns if a.target in hoist] + extra
    hoisted_out = [a.target for a in hoisted_all if a.target in step_reads]
    live: set[str] = set(hoisted_out)
    for a in reversed(hoisted_all):
        if a.target in live:
            live |= _reads(a.expr, set(tensors) | set(extra_dims)) & (hoist | set(extra_dims))
    hoisted_assigns = [a for a in hoisted_all if a.target in live]
    all_dims = {**dims, **extra_dims}
    all_names = set(tensors) | set(extra_dims)

    # time-varying hoisted tensors: those reading a per-step input
    varying: set[str] = set(per_in)
    for a in hoisted_assigns:
        if _reads(a.expr, all_names) & varying:
            varying.add(a.target)

    # ---- the two layers ------------------------------------------------------------------------
    user_names = {tensor_name(lhs) or lhs.name for lhs, _ in spec.equations}
    hoisted_layer = None
    t = _time_index(spec, taken)
    if hoisted_assigns:
        timed = [_with_time(a, varying, t) for a in hoisted_assigns]
        h_reads: set[str] = set()
        for a in hoisted_assigns:
            h_reads |= _reads(a.expr, all_names)
        h_inputs = [n for n in spec.inputs if n in h_reads]
        h_params = [n for n in spec.params if n in h_reads]
        shapes = {n: ((TIME_DIM,) if n in varying else ()) + dims[n] for n in h_inputs + h_params}
        hoisted_layer = Layer(
            f"{seq.name}_hoisted",
            _equations(timed, user_names, outputs=set(hoisted_out)),
            inputs=h_inputs,
            params=h_params,
            outputs=hoisted_out,
            shapes=shapes,
            doc=f"the state-free part of {cell.name}, for all time steps at once",
            extras=cell.extras,
        )
    s_inputs = (
        [n for n in hoisted_out if n in varying]
        + [n for n in spec.inputs if n in per_in and n in step_reads]
        + [n for n in spec.inputs if n in state_in]
        + [n for n in hoisted_out if n not in varying]
    )
    s_params = [n for n in spec.params if n in step_reads]
    step_outputs = tuple(needed_out)
    step_layer = Layer(
        f"{seq.name}_step",
        _equations(step_assigns, user_names, outputs=set(step_outputs)),
        inputs=s_inputs,
        params=s_params,
        outputs=step_outputs,
        shapes={n: all_dims[n] for n in s_inputs + s_params},
        doc=f"one time step of {cell.name}",
        extras=cell.extras,
    )
    parts = ScanParts(
        hoisted=hoisted_layer,
        step=step_layer,
        time_varying=tuple(n for n in hoisted_out if n in varying),
        invariant=tuple(n for n in hoisted_out if n not in varying),
        step_outputs=step_outputs,
        cell_dims=all_dims,
    )
    _check_parts(parts, varying)
    return parts


def _folded(spec, hoist: set, tensors, plain, needed) -> list[Assign]:
    """The cell's assignments with the parameter-only terms of a recurrent sum moved into the
    hoisted tensor it is always added to: with ``gh = h W_hh^T + b_hh`` read only as
    ``gh[b, r'] + gi[b, r']`` (``gi`` hoisted, read nowhere else), ``gh = h W_hh^T`` and
    ``gi = x W_ih^T + b_ih + b_hh``: the bias added once over all steps, not once per step."""
    assigns = list(spec.assigns)
    params = set(spec.params)

    def dims(a):
        return [spec.index_dims[(a.scope, i)] for i in a.indices]

    def pairs(name):
        """(reader, occurrence, the Add it is a term of) of every read of ``name``."""
        out = []
        for b in assigns:
            for o in occurrences(b.expr, {name}):
                adds = [
                    node
                    for node in sp.preorder_traversal(b.expr)
                    if isinstance(node, sp.Add) and o in node.args
                ]
                out.append((b, o, adds[0] if len(adds) == 1 else None))
        return out

    for k, a in enumerate(assigns):
        if a.op != "map" or a.target in hoist or a.target in needed or not isinstance(a.expr, sp.Add):
            continue
        consts = [
            term
            for term in a.expr.args
            if _reads(term, tensors) and _reads(term, tensors) <= params and plain(a, term)
        ]
        if not consts or len(consts) == len(a.expr.args):
            continue
        reads = pairs(a.target)
        partners = set()
        for b, o, add in reads:
            mates = [
                occurrence_name(x)
                for x in (add.args if add is not None else ())
                if isinstance(x, sp.Indexed)
                and x.indices == o.indices
                and occurrence_name(x) in hoist
            ]
            partners.add(mates[0] if len(mates) == 1 else None)
        if len(partners) != 1 or None in partners or not reads:
            continue
        v = partners.pop()
        j = next(n for n, b in enumerate(assigns) if b.target == v)
        va = assigns[j]
        if va.op != "map" or v in needed or dims(va) != dims(a):
            continue
        if any(  # every read of v is one of those sums
            add is None
            or not any(
                isinstance(x, sp.Indexed)
                and occurrence_name(x) == a.target
                and x.indices == o.indices
                for x in add.args
            )
            for _, o, add in pairs(v)
        ):
            continue
        moved = sp.Add(*consts).xreplace(dict(zip(a.indices, va.indices)))
        assigns[j] = dataclasses.replace(va, expr=va.expr + moved)
        assigns[k] = dataclasses.replace(a, expr=sp.Add(*[t for t in a.expr.args if t not in consts]))
    return assigns


def _time_index(spec, taken) -> sp.Symbol:
    for cand in ("t", "tau", "step_t"):
        if cand not in taken and cand not in spec.hyper:
            return sp.Symbol(cand, integer=True)
    raise SpecError("the time index requires a free name, got t, tau and step_t all taken")


def _with_time(a: Assign, varying: set[str], t: sp.Symbol) -> Assign:
    """``a`` with a leading time index on its target (if time-varying) and on every read of a
    time-varying tensor."""
    reps = {}
    for occ in occurrences(a.expr, varying):
        if isinstance(occ, sp.Indexed):
            reps[occ] = occ.base[(t,) + tuple(occ.indices)]
        else:
            reps[occ] = sp.IndexedBase(occ.name, real=True)[t]
    expr = a.expr.xreplace(reps)
    idx = ((t,) + a.indices) if (reps or a.target in varying) else a.indices
    return dataclasses.replace(a, expr=expr, indices=idx)


def _equations(assigns: list[Assign], user_names: set[str], outputs: set[str]) -> list:
    """Equations from A-normal-form assignments, with the engine's own intermediates (the
    hoisted ``Sum``s) put back into their one use, so the equations read like the user's."""
    uses: dict[str, int] = {}
    names = {a.target for a in assigns}
    for a in assigns:
        for occ in occurrences(a.expr, names):
            uses[occurrence_name(occ)] = uses.get(occurrence_name(occ), 0) + 1
    inline: dict[sp.Expr, sp.Expr] = {}
    eqs = []
    for a in assigns:
        expr = a.expr.xreplace(inline) if inline else a.expr
        if a.op == "map":
            rhs = expr
        else:
            rhs = (IndexSum if a.op == "sum" else IndexMax)(expr, a.reduce)
        lhs = (
            sp.IndexedBase(a.target, real=True)[a.indices]
            if a.indices
            else sp.Symbol(a.target, real=True)
        )
        if (
            a.target not in user_names
            and a.target not in outputs
            and a.op != "map"
            and uses.get(a.target) == 1
        ):
            inline[lhs] = rhs
            continue
        eqs.append((lhs, rhs))
    return eqs


def _check_parts(parts: ScanParts, varying: set[str]) -> None:
    """The engine inferred every dimension as in the cell (a leading T where time-varying)."""
    for layer in (parts.hoisted, parts.step):
        if layer is None:
            continue
        spec = layer.spec()
        named = set(spec.args) | {tensor_name(lhs) or lhs.name for lhs, _ in spec.equations}
        for n, info in spec.tensors.items():
            if n not in named or n not in parts.cell_dims:
                continue  # the engine's own intermediates
            want = parts.cell_dims[n]
            if layer is parts.hoisted and n in varying:
                want = (TIME_DIM,) + want
            if info.dims != want:
                raise SpecError(
                    f"tensor {n!r} of {layer.name!r} requires dimensions {want}, got {info.dims} "
                    f"(an internal inconsistency of the scan)"
                )


# ---------------------------------------------------------------------------------------------
# Parameter gradients over all steps at once
# ---------------------------------------------------------------------------------------------

#: Each scan optimization, on by default; ``sequence_source(seq, options={"defer": False})``
#: switches one off (lowering switches from :data:`symdl.lower.OPTIMIZATIONS` go there too).
OPTIMIZATIONS = defaults(("scan",))


@dataclasses.dataclass
class Deferred:
    """The step's parameter gradients, taken out of the time loop.

    ``layer`` computes them for all steps at once: each contribution of the step's backward to
    a parameter's adjoint, with a leading time index on every per-step tensor it reads and the
    time index summed (``dW[r, k] = Sum(dg[t, b, r] * h[t, b, k], (t, b))``). ``loop`` is the
    step's derivation without those contributions (what runs inside the loop).
    """

    layer: Layer
    loop: object  # Derivation
    params: tuple[str, ...]  # step arguments whose gradients the layer computes
    adjoints: tuple[str, ...]  # per-step adjoints it reads (returned by the step's backward)
    per_step: tuple[str, ...]  # per-step forward tensors it reads (step arguments)
    constants: tuple[str, ...]  # step arguments it reads as they are (parameters)


def _defer(seq: Sequence, parts: ScanParts, d) -> Deferred | None:
    """The parameter-gradient part of the step's derivation ``d`` (None: nothing to defer)."""
    spec = d.spec
    adjoint_of = {adj: t for t, adj in d.adjoints.items()}
    names = set(d.tensors) | set(adjoint_of)
    constant = [n for n in spec.args if n in seq.cell.params or n in parts.invariant]
    by_target: dict[str, list] = {}
    for c in d.backward:
        by_target.setdefault(c.target, []).append(c)

    def dims(name):
        return d.tensors[adjoint_of.get(name, name)].dims

    def readable(c) -> bool:
        """Every read is a whole per-step array (or a constant) through plain indices."""
        for occ in occurrences(c.body, names):
            n = occurrence_name(occ)
            if n not in adjoint_of and n not in d.tensors:
                return False
            for p, ix in enumerate(occurrence_indices(occ)):
                if not is_index(ix) or spec.index_dims[(c.scope, ix)] != dims(n)[p]:
                    return False
        return True

    def whole(c) -> bool:
        """The contribution writes the whole adjoint through plain, distinct indices."""
        lhs = tuple(c.lhs)
        if len(set(lhs)) != len(lhs) or not all(is_index(ix) for ix in lhs):
            return False
        return all(spec.index_dims[(c.scope, ix)] == dims(c.tensor)[p] for p, ix in enumerate(lhs))

    # an adjoint that is another one under a new name (dt0[b, r] = dgh[b, r]) is read as that one
    canon: dict[str, str] = {}
    for target, cs in by_target.items():
        body = cs[0].body
        if (
            len(cs) == 1
            and cs[0].first
            and not cs[0].reduce
            and isinstance(body, (sp.Indexed, sp.Symbol))
            and occurrence_name(body) in adjoint_of
            and tuple(occurrence_indices(body)) == tuple(cs[0].lhs)
        ):
            canon[target] = occurrence_name(body)
    from .lower import _same_adjoints

    for dup, orig in _same_adjoints(d).items():  # the same contributions: the same values
        canon.setdefault(dup, orig)

    def resolve(name):
        while name in canon:
            name = canon[name]
        return name

    deferred: dict[str, list] = {}
    for n in constant:
        adj = d.grads.get(n)
        cs = by_target.get(adj, []) if adj else []
        if cs and all(whole(c) and readable(c) for c in cs):
            deferred[n] = cs
    if not deferred:
        return None

    taken = {s.name for a in d.forward for s in a.all_indices}
    taken |= {s.name for c in d.backward for s in c.over} | names
    t = _time_index(spec, taken)
    per_step: list[str] = []
    consts: list[str] = []
    adjoints: list[str] = []
    equations = []
    for n, cs in deferred.items():
        lhs = tuple(cs[0].lhs)
        terms = []
        for c in cs:
            ren = dict(zip(c.lhs, lhs))
            if set(c.reduce) & (set(lhs) - set(c.lhs)):
                return None  # a summed index named like an index of the first: keep the loop
            reps = {}
            for occ in occurrences(c.body, names):
                r = resolve(occurrence_name(occ))
                if r in constant:
                    consts.append(r)
                    continue
                (adjoints if r in adjoint_of else per_step).append(r)
                base = sp.IndexedBase(r, real=True)
                reps[occ] = base[(t,) + tuple(occurrence_indices(occ))]
            body = c.body.xreplace(reps).xreplace(ren)
            terms.append(IndexSum(body, (t,) + tuple(c.reduce)))
        target = d.grads[n]
        out = sp.IndexedBase(target, real=True)[lhs] if lhs else sp.Symbol(target, real=True)
        equations.append((out, sp.Add(*terms)))
    adjoints = list(dict.fromkeys(adjoints))
    per_step = list(dict.fromkeys(per_step))
    consts = [n for n in constant if n in consts]
    shapes = {n: (TIME_DIM,) + dims(n) for n in adjoints + per_step}
    shapes.update({n: dims(n) for n in consts})
    layer = Layer(
        f"{seq.name}_param_grads",
        equations,
        inputs=adjoints + per_step,
        params=consts,
        outputs=[d.grads[n] for n in deferred],
        shapes=shapes,
        doc=f"the gradients of the parameters of {seq.cell.name}, summed over all steps",
        extras=seq.cell.extras,
    )

    # the loop's derivation: the rest of the backward, caching only what that rest reads
    targets = {d.grads[n] for n in deferred}
    backward = [c for c in d.backward if c.target not in targets]
    referenced = set(spec.keep) | {n for n in per_step if n not in spec.args}  # kept per step
    for c in backward:
        referenced |= {occurrence_name(o) for o in occurrences(c.body, d.tensors)}
        referenced |= {occurrence_name(ix) for ix in c.lhs if isinstance(ix, sp.Indexed)}
    cached = tuple(
        n
        for n in list(spec.args) + list(spec.consts) + [a.target for a in d.forward]
        if n in referenced
    )
    loop = dataclasses.replace(d, backward=backward, cached=cached)
    return Deferred(layer, loop, tuple(deferred), tuple(adjoints), tuple(per_step), tuple(consts))


# ---------------------------------------------------------------------------------------------
# Per-step arrays allocated once, before the time loop
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Buffers:
    """A step function whose new arrays are written into arrays its caller allocated once.

    ``lines`` are the function's statements with each rewritten definition (``i = a + b`` ->
    ``np.add(a, b, out=i)``); ``names`` are the variables bound to the given arrays, in the
    order of the function's ``buffers`` argument; ``per_step`` those that outlive the call
    (returned or cached: one slot of a (T, ...) array each step), the others being one array
    reused by every step."""

    lines: list
    names: list[str]
    per_step: set[str]
    final: set[str]  # variables still bound to their given array where the function returns
    dims: dict = dataclasses.field(default_factory=dict)  # variable -> its dimensions


def _root(node) -> str | None:
    """The variable an expression is a view of (``x``, ``x[:, :H]``, ``x.T``), if any."""
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _assigned_name(stmt) -> str | None:
    """The name a plain ``name = value`` statement assigns; None for any other statement."""
    if (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
    ):
        return stmt.targets[0].id
    return None


def _into(stmt, v: str):
    """``stmt`` (``v = <new array>``) as a statement writing into the array ``v``, or None."""
    rhs = stmt.value
    if isinstance(rhs, ast.Call) and ast.unparse(rhs.func) == "np.zeros":
        return ast.parse(f"{v}[...] = 0").body[0]
    if isinstance(rhs, ast.Call) and ast.unparse(rhs.func) == "np.empty":
        return []  # the given array is the one
    text = written_into(rhs, v)
    return ast.parse(text).body[0] if text is not None else None


def _buffered(lines, params, candidates, escaping) -> Buffers | None:
    """Rewrite the first definition of each variable in ``candidates`` (variables of a known
    float shape) to write into a given array. ``params``: the function's arguments;
    ``escaping``: variables whose arrays outlive the call. A later ``v = v + e`` of such a
    variable that nothing else views becomes ``v += e``."""

    parsed = []
    for line in lines:
        try:
            parsed.append(ast.parse(line.code).body)
        except SyntaxError:
            return None
    defined = set(params)
    alias: dict[str, set[str]] = {}  # variable -> the variables it may view
    rewritten: dict[int, object] = {}  # id(stmt) -> its replacement
    names: list[str] = []
    for body in parsed:
        for stmt in body:
            v = _assigned_name(stmt)
            if v is not None:
                new = _into(stmt, v) if v in candidates and v not in defined else None
                if new is not None:
                    rewritten[id(stmt)] = new
                    names.append(v)
                else:
                    r = _root(stmt.value)
                    viewed = {r} if r is not None else set()
                    if isinstance(stmt.value, ast.Call):
                        viewed |= {_root(k.value) for k in stmt.value.keywords if k.arg == "out"}
                    alias.setdefault(v, set()).update(viewed - {None, v})
            for node in ast.walk(stmt):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    defined.add(node.id)
    if not names:
        return None
    out = set(escaping)
    while True:
        more = {b for v in out for b in alias.get(v, ())} - out
        if not more:
            break
        out |= more
    viewed = {b for bs in alias.values() for b in bs}
    assigns: dict[str, list] = {}  # variable -> its plain assignments after the rewritten one
    for body in parsed:
        for stmt in body:
            v = _assigned_name(stmt)
            if v in names and id(stmt) not in rewritten:
                assigns.setdefault(v, []).append(stmt)
    grown = set()  # v = v + e into v's own array: every later assignment of v is one
    for v, stmts in assigns.items():
        if v not in viewed and all(
            isinstance(a.value, ast.BinOp)
            and type(a.value.op) in (ast.Add, ast.Sub, ast.Mult)
            and isinstance(a.value.left, ast.Name)
            and a.value.left.id == v
            for a in stmts
        ):
            grown |= {id(a) for a in stmts}
    new_lines = []
    for line, body in zip(lines, parsed):
        text = line.code.split("\n")
        changed = False
        for stmt in reversed(body):
            new = rewritten.get(id(stmt))
            if id(stmt) in grown:
                new = ast.AugAssign(stmt.targets[0], stmt.value.op, stmt.value.right)
            if new is None:
                continue
            text[stmt.lineno - 1 : stmt.end_lineno] = (
                [] if new == [] else ast.unparse(new).split("\n")
            )
            changed = True
        if changed and not text and not line.comment:
            continue  # an array the caller gives: nothing to make
        new_lines.append(dataclasses.replace(line, code="\n".join(text)) if changed else line)
    final = {v for v in names if all(id(a) in grown for a in assigns.get(v, ()))}
    return Buffers(new_lines, names, {v for v in names if v in out}, final)


# ---------------------------------------------------------------------------------------------
# Code generation
# ---------------------------------------------------------------------------------------------


def _tuple(items) -> str:
    items = list(items)
    if len(items) == 1:
        return f"({items[0]},)"
    return "(" + ", ".join(items) + ")"


def _used(name: str, code: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", code) is not None


class _Part:
    """One lowered part rendered as a private forward/backward pair of functions."""

    def __init__(self, layer: Layer, derivation, prefix: str, options=None, dropped=(), keep=()):
        from .lower import lower

        self.layer = layer
        self.derivation = derivation
        self.lowered = lower(self.derivation, options, keep=keep)  # keep: adjoints read after
        self.derivation = self.lowered.derivation  # (as lowered: see symdl.derive.reuse_outputs)
        self.prefix = prefix
        low = self.lowered
        self.arg_vars = [a.var for a in low.args]
        self.out_vars = [v for _, v, _ in low.outputs]
        self.cache = list(low.cache)
        self.grads = [(n, g) for n, g in low.grads if n not in dropped]  # what backward returns
        fcode = "\n".join(line.code for line in low.forward)
        bcode = (
            "\n".join(line.code for line in low.backward)
            + "\n"
            + "\n".join(t for _, t in self.grads)
        )
        spec = self.derivation.spec
        dv = low.dim_vars
        order = [d for d in spec.dims if d != "..."]
        self.fdims = [d for d in order if _used(dv[d], fcode)]
        self.bdims = [d for d in order if _used(dv[d], bcode)]
        self.fdtype = _used("dtype", fcode)
        self.bdtype = _used("dtype", bcode)

    def function(self, kind, params, body_lines, returns, doc) -> str:
        lines = [f"def _{self.prefix}_{kind}({', '.join(params)}):", f'    """{doc}"""']
        for line in body_lines:
            if isinstance(line, str):
                lines.append("    " + line.replace("\n", "\n    "))
                continue
            if line.comment:
                lines.append(f"    # {line.comment}")
            lines.append("    " + line.code.replace("\n", "\n    "))
        lines.append(f"    return {returns}")
        return "\n".join(lines)


def sequence_source(
    seq: Sequence,
    source: str | None = None,
    command: str | None = None,
    options: Mapping[str, bool] | None = None,
) -> str:
    """The complete text of the generated sequence module (nothing is written). ``options``
    switches scan optimizations (:data:`OPTIMIZATIONS`) and lowering ones
    (:data:`symdl.lower.OPTIMIZATIONS`) off or on."""
    from .codegen import format_source, stamp
    from .derive import backward_text, derive, forward_text
    from .prologue import bind_shapes, float_args, shape_expr
    from .templating import environment
    from .lower import OPTIMIZATIONS as LOWER_OPTIMIZATIONS
    from .lower import _identifier
    from .printing import Namer
    from .runtime import Runtime, extras, snippet

    options = dict(options or {})
    unknown = set(options) - set(OPTIMIZATIONS) - set(LOWER_OPTIMIZATIONS)
    if unknown:
        raise SpecError(
            f"scan options require names from {', '.join([*OPTIMIZATIONS, *LOWER_OPTIMIZATIONS])}, "
            f"got {', '.join(sorted(unknown))}"
        )
    opts = {**OPTIMIZATIONS, **{k: v for k, v in options.items() if k in OPTIMIZATIONS}}
    lower_opts = {k: v for k, v in options.items() if k in LOWER_OPTIMIZATIONS}
    # a step's arrays are one time step's (small), written into per-step buffers: no blocks
    step_opts = {**lower_opts, "blocked": False}
    parts = seq.parts(opts["fold"])
    cell = seq.cell
    cspec = cell.spec()
    hoisted_d, step_d = seq.derivations(opts["fold"])
    hp = (
        _Part(parts.hoisted, hoisted_d, "hoisted", lower_opts)
        if parts.hoisted is not None
        else None
    )
    deferred = _defer(seq, parts, step_d) if opts["defer"] else None
    if deferred is not None:
        sp_ = _Part(
            parts.step, deferred.loop, "step", step_opts, dropped=deferred.params,
            keep=deferred.adjoints,
        )
        dp = _Part(deferred.layer, derive(deferred.layer), "step", step_opts)
    else:
        sp_ = _Part(parts.step, step_d, "step", step_opts)
        dp = None
    step_spec = sp_.derivation.spec
    cdims = parts.cell_dims

    # ---- the sequence's contract ---------------------------------------------------------------
    arg_dims: dict[str, tuple[str, ...]] = {}
    for n in cell.inputs:
        if n in seq.per_step:
            arg_dims[n] = (TIME_DIM,) + cdims[n]
        else:
            arg_dims[seq.initial[n]] = cdims[n]
    for n in cell.params:
        arg_dims[n] = cdims[n]
    out_dims: dict[str, tuple[str, ...]] = {}
    for y, o in seq.outputs.items():
        out_dims[y] = (TIME_DIM,) + cdims[o]
    for f, s in seq.final.items():
        out_dims[f] = cdims[s]
    shapes = [(n, arg_dims[n]) for n in seq.args] + [(n, out_dims[n]) for n in seq.output_names]

    # ---- names of the public functions ---------------------------------------------------------
    namer = Namer()
    var = {n: namer.claim(n) for n in seq.args}
    dim_order: list[str] = []
    for _, ds in shapes:
        for d in ds:
            if d not in dim_order:
                dim_order.append(d)
    for part in (hp, sp_, dp):
        if part is not None:
            for d in part.derivation.spec.dims:
                if d not in dim_order and d != "...":
                    dim_order.append(d)
    dvar = {d: namer.claim(_identifier(d)) for d in dim_order}
    fused: set[str] = set()
    bused: set[str] = set()

    def dims_of(part, kind):
        ds = part.fdims if kind == "forward" else part.bdims
        (fused if kind == "forward" else bused).update(ds)
        return [dvar[d] for d in ds]

    def shape(ds, used):
        used.update(ds)
        return shape_expr(ds, dvar)

    def shape_plus(ds, used):  # a leading "T + 1"
        text = shape((TIME_DIM,) + tuple(ds[1:]), used)
        return text.replace(dvar[TIME_DIM], f"{dvar[TIME_DIM]} + 1", 1)

    state_var = {s: namer.claim(s) for s in seq.state}
    out_var = {n: namer.claim(n) for n in seq.output_names}
    hoisted_var = {n: namer.claim(n) for n in parts.time_varying + parts.invariant}
    t = namer.claim("t")
    steps = namer.claim("steps")
    step_cache = namer.claim("step_cache")
    hoisted_cache = namer.claim("hoisted_cache")
    step_out_var: dict[str, str] = {}
    step_percache_vars = [
        v for k, v in sp_.cache if k not in step_spec.params and k not in parts.invariant
    ]
    fbuf = bbuf = None
    if opts["buffers"]:
        fbuf = _step_buffers(sp_, "forward", set(sp_.out_vars) | set(step_percache_vars))
    fbuf_src: dict[str, str] = {}  # buffer variable -> the array the caller passes

    # ---- forward -------------------------------------------------------------------------------
    rt = Runtime()
    pre = float_args(rt, [(n, var[n]) for n in seq.args])
    body: list[str] = []  # after the preamble's size binding (filled below)

    cell_arg_var = {}  # cell input -> sequence variable
    for n in cell.inputs:
        cell_arg_var[n] = var[n] if n in seq.per_step else var[seq.initial[n]]
    for n in cell.params:
        cell_arg_var[n] = var[n]

    if hp is not None:
        call_args = [cell_arg_var[n] for n in hp.layer.spec().args] + dims_of(hp, "forward")
        if hp.fdtype:
            call_args.append("dtype")
        outs = [hoisted_var[n] for n in hp.layer.spec().outputs] + [hoisted_cache]
        body.append(f"{', '.join(outs)} = _hoisted_forward({', '.join(call_args)})")
    # per-step forward tensors the parameters' gradients read after the backward loop:
    # name -> (cache key, the forward's expression); a state stacked as an output is read
    # from one (T + 1, ...) array whose tail is that output, without a copy
    over_steps: dict[str, tuple[str, str]] = {}
    kept: list[str] = []  # loop lines keeping step intermediates
    state_steps: dict[str, str] = {}  # state -> the (T, ...) array it is copied into per step
    with_state: dict[str, str] = {}  # output -> the (T + 1, ...) array it is the tail of
    for n in deferred.per_step if deferred is not None else ():
        key = namer.claim(f"{n}_steps")
        if n in parts.time_varying:
            over_steps[n] = (key, hoisted_var[n])
        elif n not in step_spec.args:  # a step intermediate, copied out of each step's cache
            info = sp_.derivation.tensors[n]
            body.append(f"{key} = np.empty({shape((TIME_DIM,) + info.dims, fused)}, dtype=dtype)")
            per_t = [c for c, _ in sp_.cache if c not in step_spec.params + parts.invariant]
            k = per_t.index(n)
            kept.append(f"{key}[{t}] = {step_cache}[{k}]  # {n}")
            over_steps[n] = (key, key)
        elif n in seq.per_step:
            over_steps[n] = (key, var[n])
        else:
            ys = [y for y, yo in seq.outputs.items() if yo == seq.state[n]]
            if ys:
                buf = namer.claim(f"{n}s")
                with_state[ys[0]] = buf
                dims_ = (f"{TIME_DIM} + 1",) + cdims[n]
                body.append(f"{buf} = np.empty({shape_plus(dims_, fused)}, dtype=dtype)")
                body.append(f"{buf}[0] = {var[seq.initial[n]]}")
                over_steps[n] = (key, f"{buf}[:-1]")
            else:
                state_steps[n] = key
                body.append(
                    f"{key} = np.empty({shape((TIME_DIM,) + cdims[n], fused)}, dtype=dtype)"
                )
                over_steps[n] = (key, key)
    for y, o in seq.outputs.items():
        if y in with_state:
            body.append(f"{out_var[y]} = {with_state[y]}[1:]")
        else:
            body.append(f"{out_var[y]} = np.empty({shape(out_dims[y], fused)}, dtype=dtype)")
    body.append(
        ", ".join(state_var[s] for s in seq.state)
        + " = "
        + ", ".join(var[seq.initial[s]] for s in seq.state)
    )
    body.append(f"{steps} = []")
    step_args = []
    for n in step_spec.args:
        if n in parts.time_varying:
            step_args.append(f"{hoisted_var[n]}[{t}]")
        elif n in parts.invariant:
            step_args.append(hoisted_var[n])
        elif n in seq.per_step:
            step_args.append(f"{var[n]}[{t}]")
        elif n in seq.state:
            step_args.append(state_var[n])
        else:
            step_args.append(var[n])
    step_args += dims_of(sp_, "forward")
    if sp_.fdtype:
        step_args.append("dtype")
    loop: list[str] = [f"{buf}[{t}] = {state_var[n]}" for n, buf in state_steps.items()]
    targets = []
    after: list[str] = []
    for o in parts.step_outputs:
        carried = [s for s, so in seq.state.items() if so == o]
        stacked = [y for y, yo in seq.outputs.items() if yo == o]
        if not stacked and len(carried) == 1:
            targets.append(state_var[carried[0]])
            continue
        v = step_out_var.setdefault(o, namer.claim(o))
        targets.append(v)
        ov = sp_.out_vars[list(parts.step_outputs).index(o)]
        for y in stacked:
            if fbuf is not None and ov in fbuf.final and ov not in fbuf_src:
                fbuf_src[ov] = f"{out_var[y]}[{t}]"  # the step writes it there itself
                continue
            after.append(f"{out_var[y]}[{t}] = {v}")
        for s in carried:  # the stacked copy feeds the next step: the step's own array is freed
            after.append(
                f"{state_var[s]} = {out_var[stacked[0]]}[{t}]"
                if stacked
                else f"{state_var[s]} = {v}"
            )
    if fbuf is not None:
        step_args.append(_buffer_args(fbuf, fbuf_src, sp_, body, namer, shape, fused, t))
    loop.append(f"{', '.join(targets + [step_cache])} = _step_forward({', '.join(step_args)})")
    loop += after + kept
    loop.append(f"{steps}.append({step_cache})")
    body.append(f"for {t} in range({dvar[TIME_DIM]}):")
    fused.add(TIME_DIM)
    body += ["    " + line for line in loop]
    stacked_states = {s for s, o in seq.state.items() if o in seq.outputs.values()}
    for f, s in seq.final.items():
        copy = ".copy()" if s in stacked_states else ""
        body.append(f"{out_var[f]} = {state_var[s]}{copy}")

    # constants the step's backward reads (parameters, invariant hoisted tensors)
    step_const = [(k, v) for k, v in sp_.cache if k in step_spec.params or k in parts.invariant]
    step_percache = [(k, v) for k, v in sp_.cache if (k, v) not in step_const]
    const_src = {}
    for k, _ in step_const:
        const_src[k] = hoisted_var[k] if k in parts.invariant else var[k]

    # ---- backward ------------------------------------------------------------------------------
    bwd: list[str] = []
    dvar_ = {}  # gradient variables of the public backward
    for n in seq.args:
        dvar_[n] = namer.claim(f"d{n}")
    dout_var = {n: namer.claim(f"d{n}") for n in seq.output_names}
    dstate = {s: namer.claim(f"d{s}") for s in seq.state}
    dhoisted = {n: namer.claim(f"d{n}") for n in parts.time_varying + parts.invariant}
    bpre: list[str] = []
    if len(seq.output_names) > 1:
        bpre.append(", ".join(dout_var[n] for n in seq.output_names) + " = dout")
        srcs = [dout_var[n] for n in seq.output_names]
    else:
        srcs = ["dout"]
    for n, src in zip(seq.output_names, srcs):
        check = rt.call("_check_dout", f'"{n}", {src}, {shape(out_dims[n], bused)}, dtype')
        bpre.append(f"{dout_var[n]} = {check}")

    # where each step gradient goes
    step_grad_target = {}
    accumulate: list[tuple[str, str]] = []  # (accumulator, per-step temp)
    for n in step_spec.args:
        if n in parts.time_varying:
            bwd.append(
                f"{dhoisted[n]} = np.empty({shape((TIME_DIM,) + cdims[n], bused)}, dtype=dtype)"
            )
            step_grad_target[n] = f"{dhoisted[n]}[{t}]"
        elif n in seq.per_step:
            bwd.append(f"{dvar_[n]} = np.empty({shape(arg_dims[n], bused)}, dtype=dtype)")
            step_grad_target[n] = f"{dvar_[n]}[{t}]"
        elif n in seq.state:
            step_grad_target[n] = dstate[n]
        elif deferred is not None and n in deferred.params:
            continue  # summed over all steps after the loop
        else:
            acc = dhoisted[n] if n in parts.invariant else dvar_[n]
            bwd.append(f"{acc} = np.zeros({shape(cdims[n], bused)}, dtype=dtype)")
            tmp = namer.claim(f"{acc}_{t}")
            step_grad_target[n] = tmp
            accumulate.append((acc, tmp))
    for s in seq.state:
        f = next(f for f, fs in seq.final.items() if fs == s)
        bwd.append(f"{dstate[s]} = {dout_var[f]}")
    douts = []
    for o in parts.step_outputs:
        terms = [f"{dout_var[y]}[{t}]" for y, yo in seq.outputs.items() if yo == o]
        terms += [dstate[s] for s, so in seq.state.items() if so == o]
        douts.append(" + ".join(terms))
    bargs = (
        douts
        + [f"{steps}[{t}]"]
        + [const_src[k] for k, _ in step_const]
        + dims_of(sp_, "backward")
    )
    if sp_.bdtype:
        bargs.append("dtype")
    bused.add(TIME_DIM)
    grads_t = [step_grad_target[n] for n, _ in sp_.grads]
    extra_returns: list[str] = []  # adjoints the step's backward returns besides its gradients
    dp_call = None
    if deferred is not None:
        # the per-step adjoints the parameters' gradients read: kept in (T, ...) arrays, the
        # one a step gradient already fills when the step computes the same array for both
        returned = {g: step_grad_target[n] for n, g in sp_.grads}
        dp_src = {}
        low = sp_.lowered
        out_adj = dict(zip((sp_.derivation.adjoints[o] for o in step_spec.outputs), low.dout_vars))
        for a in deferred.adjoints:
            text = low.adjoint_vars.get(a, out_adj.get(a))
            target = returned.get(text, "")
            if target.endswith(f"[{t}]"):
                dp_src[a] = target[: -len(f"[{t}]")]
                continue
            buf = namer.claim(f"{a}_steps")
            info = sp_.derivation.tensors[a if a in sp_.derivation.tensors else next(
                k for k, v in sp_.derivation.adjoints.items() if v == a
            )]
            bwd.append(
                f"{buf} = np.empty({shape((TIME_DIM,) + info.dims, bused)}, dtype=dtype)"
            )
            dp_src[a] = buf
            grads_t.append(f"{buf}[{t}]")
            extra_returns.append(text)
        for n in deferred.per_step:
            dp_src[n] = over_steps[n][0]
        for n in deferred.constants:
            dp_src[n] = hoisted_var[n] if n in parts.invariant else var[n]
        dspec = dp.layer.spec()
        dargs = [dp_src[n] for n in dspec.args] + [dvar[d] for d in dp.fdims]
        bused.update(dp.fdims)
        if dp.fdtype:
            dargs.append("dtype")
        douts_ = [
            dhoisted[n] if n in parts.invariant else dvar_[n] for n in deferred.params
        ]
        dp_call = f"{', '.join(douts_)} = _step_param_grads({', '.join(dargs)})"
    if opts["buffers"]:
        returned_ = [g for _, g in sp_.grads] + extra_returns
        summed = {tmp for _, tmp in accumulate}  # added into an accumulator at once
        bbuf = _step_buffers(
            sp_,
            "backward",
            {
                w
                for g, target in zip(returned_, grads_t)
                if target not in summed
                for w in re.findall(r"[A-Za-z_]\w*", g)
            },
        )
    if bbuf is not None:
        bbuf_src = {}
        for k, (g, target) in enumerate(zip(returned_, grads_t)):
            if g in bbuf.final and g not in bbuf_src and target.endswith(f"[{t}]"):
                bbuf_src[g] = target  # the step writes the gradient there itself
                grads_t[k] = "_"
        bargs.append(_buffer_args(bbuf, bbuf_src, sp_, bwd, namer, shape, bused, t))
    bwd.append(f"for {t} in range({dvar[TIME_DIM]} - 1, -1, -1):")
    bwd.append(f"    {', '.join(grads_t)} = _step_backward({', '.join(bargs)})")
    for acc, tmp in accumulate:
        bwd.append(f"    {acc} += {tmp}")
    if dp_call is not None:
        bwd.append(dp_call)
    if hp is not None:
        hspec = hp.layer.spec()
        hargs = [dhoisted[n] for n in hspec.outputs] + [hoisted_cache] + dims_of(hp, "backward")
        if hp.bdtype:
            hargs.append("dtype")
        hgrads = []
        adds = []
        for n in hspec.args:
            seq_name = n if n in seq.per_step or n in cell.params else seq.initial[n]
            if n in step_spec.args:  # the step contributed too
                tmp = namer.claim(f"{dvar_[seq_name]}_hoisted")
                hgrads.append(tmp)
                adds.append(f"{dvar_[seq_name]} += {tmp}")
            else:
                hgrads.append(dvar_[seq_name])
        bwd.append(f"{', '.join(hgrads)} = _hoisted_backward({', '.join(hargs)})")
        bwd += adds
    returns = []
    for n in seq.args:
        cell_name = (
            n
            if n in seq.per_step or n in cell.params
            else next(s for s, i in seq.initial.items() if i == n)
        )
        returns.append(dstate[cell_name] if cell_name in seq.state else dvar_[n])
    returns_text = returns[0] + "," if len(returns) == 1 else ", ".join(returns)

    # ---- the cache and the size bindings ---------------------------------------------------------
    cache_items = []
    if hp is not None:
        cache_items.append(f'"hoisted": {hoisted_cache}')
    cache_items.append(f'"steps": {steps}')
    for k, _ in step_const:
        cache_items.append(f'"{k}": {const_src[k]}')
    extra_keys = [(key, expr, key) for key, expr in over_steps.values()]  # (key, forward, backward)
    for n in deferred.constants if deferred is not None else ():
        if n not in const_src:
            src = hoisted_var[n] if n in parts.invariant else var[n]
            extra_keys.append((n, src, src))
    for key, expr, _ in extra_keys:
        cache_items.append(f'"{key}": {expr}')
    bdims = [d for d in dim_order if d in bused]
    if bdims:
        cache_items.append('"sizes": ' + _tuple(dvar[d] for d in bdims))
    cache_items.append('"dtype": dtype')
    body.append("cache = {" + ", ".join(cache_items) + "}")
    outs = [out_var[n] for n in seq.output_names]
    body.append(f"return {outs[0] if len(outs) == 1 else _tuple(outs)}, cache")
    fdims = [d for d in dim_order if d in fused or d in bused]  # the cache keeps bdims
    pre += bind_shapes(rt, [(n, var[n], arg_dims[n]) for n in seq.args], fdims, dvar)
    from .prologue import int_formula

    names = {d: dvar[d] for d in dim_order}
    seen_bounds = []
    for spec_ in [p.derivation.spec for p in (hp, sp_) if p is not None]:
        for dname, formula in spec_.bounds:
            if (dname, formula) in seen_bounds:
                continue
            seen_bounds.append((dname, formula))
            for s in formula.free_symbols:
                if s.name in dvar and s.name not in fdims:
                    raise SpecError(
                        f"scan {seq.name!r}: a bound on {dname!r} requires bound sizes"
                    )
            text = int_formula(formula, names)
            shown = int_formula(formula, {k: k for k in names})
            pre.append(
                f"if {dvar[dname]} > {text}:\n    raise ValueError("
                f'f"{{NAME}}: dimension {dname!r} = {{{dvar[dname]}}} requires at most {shown} = '
                f'{{{text}}}")'
            )
    bpre_cache = []
    keys = [("hoisted", hoisted_cache)] if hp is not None else []
    keys += [("steps", steps)] + [(k, const_src[k]) for k, _ in step_const]
    keys += [(key, v) for key, _, v in extra_keys]
    bpre_cache.append(
        ", ".join(v for _, v in keys) + " = " + ", ".join(f'cache["{k}"]' for k, _ in keys)
    )
    if bdims:
        bpre_cache.append(
            ", ".join(dvar[d] for d in bdims)
            + ("," if len(bdims) == 1 else "")
            + ' = cache["sizes"]'
        )
    bpre_cache.append('dtype = cache["dtype"]')

    # ---- the private functions -------------------------------------------------------------------
    private = []
    if hp is not None:
        low = hp.lowered
        params = (
            hp.arg_vars + [low.dim_vars[d] for d in hp.fdims] + (["dtype"] if hp.fdtype else [])
        )
        cache_t = _tuple(v for _, v in hp.cache) if hp.cache else "()"
        private.append(
            hp.function(
                "forward",
                params,
                low.forward,
                ", ".join(hp.out_vars + [cache_t]),
                f"The hoisted part for all time steps at once: ``({', '.join(hp.layer.spec().outputs)}, cache)``.",
            )
        )
        bparams = list(low.dout_vars) + ["cache"] + [low.dim_vars[d] for d in hp.bdims]
        bparams += ["dtype"] if hp.bdtype else []
        unpack = (
            [f"{', '.join(v for _, v in hp.cache)}{',' if len(hp.cache) == 1 else ''} = cache"]
            if hp.cache
            else []
        )
        grads = [g for _, g in low.grads]
        private.append(
            hp.function(
                "backward",
                bparams,
                unpack + list(low.backward),
                grads[0] + "," if len(grads) == 1 else ", ".join(grads),
                "Gradients of the hoisted part's arguments, once over all time steps.",
            )
        )
    low = sp_.lowered
    params = (
        sp_.arg_vars + [low.dim_vars[d] for d in sp_.fdims] + (["dtype"] if sp_.fdtype else [])
    )
    fbody = list(low.forward)
    if fbuf is not None:
        params.append("buffers")
        fbody = [_unpack(fbuf.names, "buffers")] + fbuf.lines
    per_t = _tuple(v for _, v in step_percache) if step_percache else "()"
    private.append(
        sp_.function(
            "forward",
            params,
            fbody,
            ", ".join(sp_.out_vars + [per_t]),
            f"One time step: ``({', '.join(step_spec.outputs)}, cache)``; parameters are not cached.",
        )
    )
    bparams = list(low.dout_vars) + ["cache"] + [v for _, v in step_const]
    bparams += [low.dim_vars[d] for d in sp_.bdims] + (["dtype"] if sp_.bdtype else [])
    bbody = list(low.backward)
    if bbuf is not None:
        bparams.append("buffers")
        bbody = [_unpack(bbuf.names, "buffers")] + bbuf.lines
    unpack = (
        [
            f"{', '.join(v for _, v in step_percache)}{',' if len(step_percache) == 1 else ''} = cache"
        ]
        if step_percache
        else []
    )
    grads = [g for _, g in sp_.grads] + extra_returns
    private.append(
        sp_.function(
            "backward",
            bparams,
            unpack + bbody,
            grads[0] + "," if len(grads) == 1 else ", ".join(grads),
            "Gradients of one step's arguments (its state gradients feed the step before)"
            + (
                f", and the step's {', '.join(deferred.adjoints)} for its parameters' gradients."
                if extra_returns
                else "."
            ),
        )
    )
    if dp is not None:
        low = dp.lowered
        params = dp.arg_vars + [low.dim_vars[d] for d in dp.fdims]
        params += ["dtype"] if dp.fdtype else []
        private.append(
            dp.function(
                "param_grads",
                params,
                low.forward,
                ", ".join(dp.out_vars),
                "Gradients of the step's parameters, summed over all time steps at once.",
            )
        )

    # ---- helpers, docs, formulas ---------------------------------------------------------------
    for part in (hp, sp_, dp):
        for name in part.lowered.helpers if part is not None else ():
            rt.use(name)  # recorded by the lowering as it wrote the calls
    extras_ = [snippet(extras, h) for h in cell.extras]

    hoisted_fwd = forward_text(hp.derivation) if hp is not None else []
    hoisted_bwd = backward_text(hp.derivation) if hp is not None else []
    forms = sequence_formulas(seq, fold=opts["fold"])

    shapes_text = "; ".join(f"{n} ({', '.join(ds)})" if ds else f"{n} scalar" for n, ds in shapes)
    summary = (
        f"{seq.name}: {seq.doc}"
        if seq.doc
        else f"{seq.name}: a sequence layer generated by symdl."
    )
    context = {
        "version": __version__,
        "source": source or f"the scan of {cell.name!r}",
        "command": "; ".join(
            part.strip() for part in (command or f"symdl generate {seq.name}").splitlines() if part.strip()
        ),
        "digest": "{digest}",
        "summary": summary,
        "cell_name": cell.name,
        "cell_text": [f"{eq}" for eq in _cell_text(cspec)],
        "scan_text": scan_text(seq),
        "hoisted_text": hoisted_fwd,
        "step_text": forward_text(sp_.derivation),
        "hoisted_backward": hoisted_bwd,
        "step_backward": backward_text(sp_.derivation),
        "bptt_text": _bptt_text(seq, parts),
        "deferred_text": forward_text(dp.derivation) if dp is not None else [],
        "shapes_text": shapes_text,
        "name": seq.name,
        "args": tuple(seq.args),
        "params": tuple(seq.params),
        "outputs": tuple(seq.output_names),
        "shapes": shapes,
        "formulas": list(forms.items()),
        "signature": ", ".join(var[n] for n in seq.args),
        "outputs_text": ", ".join(seq.output_names),
        "preamble": pre,
        "forward": body,
        "backward_preamble": bpre_cache + bpre,
        "backward": bwd,
        "returns": returns_text,
        "private": private,
        "helpers": rt.sources(),
        "extras": extras_,
    }
    text = environment().get_template("scan.py.j2").render(**context)
    return stamp(format_source(text))


def _unpack(names, source) -> str:
    return f"{', '.join(names)}{',' if len(names) == 1 else ''} = {source}"


def _step_buffers(part, kind, escaping) -> Buffers | None:
    """The step function ``kind`` of ``part`` writing its new float arrays into given ones."""
    low = part.lowered
    d = part.derivation
    dims = {}
    for n, v in low.tensor_vars.items():
        if d.tensors[n].kind == "float" and "..." not in d.tensors[n].dims:
            dims[v] = d.tensors[n].dims
    if kind == "backward":
        for n, adj in d.adjoints.items():
            v = low.adjoint_vars.get(adj)
            if v is not None and re.fullmatch(r"[A-Za-z_]\w*", v) and "..." not in d.tensors[n].dims:
                dims.setdefault(v, d.tensors[n].dims)
        lines = low.backward
        params = list(low.dout_vars) + [v for _, v in part.cache]
    else:
        lines = low.forward
        params = list(part.arg_vars)
    params += list(low.dim_vars.values()) + ["dtype"]
    buf = _buffered(lines, params, dims, escaping)
    if buf is not None:
        buf.dims = {v: dims[v] for v in buf.names}
    return buf


def _buffer_args(buf, given, part, lines, namer, shape, used, t) -> str:
    """Allocate (into ``lines``, before the time loop) the arrays the step writes into; the
    tuple of them the call passes at step ``t`` (``given``: variable -> its array there)."""
    items = []
    for v in buf.names:
        if v in given:
            items.append(given[v])
        elif v in buf.per_step:
            key = namer.claim(f"{v}_steps")
            lines.append(f"{key} = np.empty({shape((TIME_DIM,) + buf.dims[v], used)}, dtype=dtype)")
            items.append(f"{key}[{t}]")
        else:
            key = namer.claim(f"{v}_buf")
            lines.append(f"{key} = np.empty({shape(buf.dims[v], used)}, dtype=dtype)")
            items.append(key)
    return _tuple(items)


def _cell_text(spec) -> list[str]:
    from .printing import equation_text

    return [f"{equation_text(lhs)} = {equation_text(rhs)}" for lhs, rhs in spec.equations]


def scan_text(seq: Sequence) -> list[str]:
    """The scan as pseudo-code lines."""
    cell = seq.cell
    states = list(seq.state)
    lines = [", ".join(states) + " = " + ", ".join(seq.initial[s] for s in states)]
    lines.append("for t in 0, ..., T - 1:")
    args = [f"{n}[t]" if n in seq.per_step else n for n in cell.inputs] + list(cell.params)
    outs = list(dict.fromkeys(list(seq.state.values()) + list(seq.outputs.values())))
    lines.append(f"    {', '.join(outs)} = {cell.name}({', '.join(args)})")
    for y, o in seq.outputs.items():
        lines.append(f"    {y}[t] = {o}")
    lines.append("    " + ", ".join(states) + " = " + ", ".join(seq.state[s] for s in states))
    for f, s in seq.final.items():
        lines.append(f"{f} = {s}")
    return lines


def _bptt_text(seq: Sequence, parts: ScanParts) -> list[str]:
    lines = []
    for o in parts.step_outputs:
        terms = [f"d{y}[t]" for y, yo in seq.outputs.items() if yo == o]
        terms += [f"d{s}" for s, so in seq.state.items() if so == o]
        lines.append(f"d{o} = {' + '.join(terms)}")
    return lines


def sequence_formulas(seq: Sequence, style: str = "partial", fold: bool = True) -> dict[str, str]:
    """LaTeX of the hoisted and step parts' equations and derived gradients (the module's
    FORMULAS); a step key that the hoisted part also has gets the suffix ``@step``."""
    from .latex import formulas

    hoisted, step = seq.derivations(fold)
    out = dict(formulas(hoisted, style)) if hoisted is not None else {}
    for k, v in formulas(step, style).items():
        out[k if k not in out else f"{k}@step"] = v
    return out


def report(seq: Sequence) -> str:
    """Plain text for ``symdl show``: the scan, its split, and the derived gradients."""
    from .derive import backward_text, forward_text

    hoisted, step = seq.derivations()
    lines = [f"{seq.name}: {seq.doc}" if seq.doc else seq.name]
    lines.append(f"  scan of {seq.cell.name}:")
    lines += [f"    {line}" for line in scan_text(seq)]
    if hoisted is not None:
        lines.append("  hoisted out of the time loop (all steps at once):")
        lines += [f"    {t}" for t in forward_text(hoisted)]
    lines.append("  each step:")
    lines += [f"    {t}" for t in forward_text(step)]
    lines.append("  backward of one step (derived), for t = T - 1, ..., 0:")
    lines += [f"    {t}" for t in _bptt_text(seq, seq.parts())]
    lines += [f"    {t}" for t in backward_text(step)]
    if hoisted is not None:
        lines.append("  backward of the hoisted part (derived), once:")
        lines += [f"    {t}" for t in backward_text(hoisted)]
    return "\n".join(lines)
