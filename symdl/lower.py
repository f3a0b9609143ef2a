"""Lowering: each indexed assignment of a derivation becomes vectorized NumPy statements.

* Elementwise assignments broadcast by index alignment: every operand is transposed into the
  order of the statement's index frame and given ``None`` axes where it lacks an index.
* Reductions of a product of operands become one contraction: ``@`` when the contraction is a
  plain matrix product, else ``np.einsum`` with an optimized path (BLAS through tensordot).
  Other factors are computed elementwise first. Sums of one operand are ``.sum(axis=...)``.
* Gathers ``A[c[n], d]`` become fancy indexing; their adjoints become ``np.add.at`` scatters.
* The leading ``...`` of a tensor is flattened into one axis for the computation and restored
  on the way out, so it behaves like any other index.

The result is a :class:`Lowered` module description that the code generator renders.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import string

import sympy as sp

from .derive import Contribution, Derivation, backward_reads, cache_affine, reuse_outputs
from .errors import LowerError
from .fusion import Chain, Statement, block, finish, written_into
from .passes import LOWERING, defaults, resolve
from .printing import Namer, NumpyPrinter, equation_text
from .spec import (
    ELL,
    Dim,
    affine_terms,
    dim_symbol,
    is_affine,
    position_symbols,
    Assign,
    free_indices,
    is_index,
    occurrence_indices,
    occurrence_name,
    occurrences,
    ordered,
    plain_indices,
)


@dataclasses.dataclass
class Line:
    """One statement of generated code, with the formula it implements as a comment."""

    code: str
    comment: str | None = None
    chain: object = None  # a fused statement, rendered once the whole function is known
    branches: tuple | None = None  # an if/else block's statements, as lists of Lines (branch)
    test: str = ""  # a block's condition
    note: str = ""  # what holds in a block's else branch

    def render_block(self):
        """A block's code from its branches' statements (their comments inside)."""
        parts = []
        for lines in self.branches:
            text = []
            for line in lines:
                if line.comment and line.comment != self.comment:
                    text.append(f"# {line.comment}")
                text.append(line.code)
            if all(t.lstrip().startswith("#") for t in text):
                text.append("pass")
            parts.append("\n".join("    " + ln for t in text for ln in t.split("\n")))
        self.code = f"if {self.test}:\n{parts[0]}\nelse:  # {self.note}\n{parts[1]}"


@dataclasses.dataclass
class ArgInfo:
    name: str  # the argument's name (also the keyword for constants)
    var: str  # its Python variable
    kind: str  # "float" | "int"
    dims: tuple[str, ...]
    role: str


@dataclasses.dataclass
class Lowered:
    """What the template needs: names, statements, cache and the helpers the code uses."""

    derivation: Derivation
    args: list[ArgInfo]
    consts: list[ArgInfo]
    hyper: list[tuple[str, str, object]]  # (name, var, default)
    outputs: list[tuple[str, str, tuple[str, ...]]]  # (name, var, dims)
    dim_vars: dict[str, str]
    forward: list[Line]
    backward: list[Line]
    forward_dims: list[str]
    backward_dims: list[str]
    cache: list[tuple[str, str]]  # (key, var)
    grads: list[tuple[str, str]]  # (argument name, expression returned)
    dout_vars: list[str]
    helpers: set[str]
    needs_dtype: bool
    has_ell: bool
    index_ranges: dict[str, str] = dataclasses.field(default_factory=dict)
    deferred: set[str] = dataclasses.field(default_factory=set)  # optional consts filled lazily
    adjoint_vars: dict[str, str] = dataclasses.field(default_factory=dict)  # adjoint -> its variable
    tensor_vars: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> its variable


class _Phase:
    """Statements of one function (forward or backward) being built."""

    def __init__(self):
        self.lines: list[Line] = []
        self.dims: set[str] = set()
        self.hyper: set[str] = set()


class Lowerer:
    def __init__(self, derivation: Derivation, options: dict | None = None):
        self.d = derivation
        self.spec = derivation.spec
        self.tensors = derivation.tensors
        self.arrays = set(derivation.tensors) | set(derivation.adjoints.values())
        self.adjoint_of = {adj: t for t, adj in derivation.adjoints.items()}
        self.namer = Namer()
        self.var: dict[str, str] = {}
        for n in list(self.spec.args) + list(self.spec.consts) + list(self.spec.hyper):
            self.var[n] = self.namer.claim(n)
        for n in self.tensors:
            if n not in self.var:
                self.var[n] = self.namer.claim(n)
        for n, adj in derivation.adjoints.items():
            self.var[adj] = self.namer.claim(adj)
        for name, (adj, _, _) in derivation.scaled.items():  # an adjoint held scaled
            self.var[name] = self.namer.claim(name)
            self.arrays.add(name)
            self.adjoint_of[name] = self.adjoint_of[adj]
        self.dim_vars: dict[str, str] = {}
        for dname in self.spec.dims:
            if dname in self.spec.hyper_dims:  # a range given by a hyperparameter: its variable
                self.dim_vars[dname] = self.var[self.spec.hyper_dims[dname]]
                continue
            self.dim_vars[dname] = self.namer.claim("batch" if dname == "..." else _identifier(dname))
        self.views: dict = {}  # strided views made in the current function
        self.owned: set[str] = set()  # arrays this function allocated (safe to add into)
        self.loop_names: dict[str, str] = {}  # kernel-offset loop variables
        self.helpers: set[str] = set()
        self.flags = {"dtype": False}
        self.options = {**OPTIMIZATIONS, **(options or {})}
        self.flags["erf_scale"] = self.options["erf_scale"]
        self.phase = _Phase()
        self.alias: dict[str, str] = {}  # an adjoint that is another array under a new name
        self.memo: dict[str, str] = {}  # contraction source -> the temporary holding it
        self.dry = False  # building candidate texts only (pairwise): no statements emitted
        self.shapes: dict[str, tuple] = {}  # temporaries of a known shape (see symdl.fusion)
        self.fixed: dict = {}  # index -> its value inside a loop over kernel offsets
        self.argidx: dict[str, tuple] = {}  # arg-max mask -> (window indices): held as an index
        self.fresh: set[str] = set()  # forward tensors held in a new array of their own
        # windows the forward copied into a contiguous matrix for its product, kept for the
        # backward: (occurrence, scope) -> (variable, axes in stored order)
        self.matrices: dict = {}
        self.reads_back: set = set()  # (occurrence, scope) the backward reads
        self.in_forward = True
        self.view_occ: dict = {}  # strided view variable -> (its occurrence, its key)
        self.splits: set[str] = set()  # views that split an axis into blocks (split_view)
        # tensors that are one constant when the optional inputs are absent (a mask when no
        # mask is given and causal is off): name -> (value, the switches' tests, consts filled
        # in their general branch); see find_special and branch
        self.special: dict[str, tuple] = {}
        self.branching = False
        self.deferred: set[str] = set()
        self.matrix_base: dict[str, str] = {}  # window matrix -> the tensor it reads
        # products over adjacent slices of one array, computed as one (see stacked_products):
        # target -> (group key, position of the slice's axis in the result, start, stop);
        # group key -> its merged product's variable once emitted
        self.stacked: dict[str, tuple] = {}
        self.stacked_groups: dict = {}
        self.stacked_done: dict = {}
        self.regions: dict[str, object] = {}  # adjoint -> the stacked group whose buffer holds it
        self.tiled: set[str] = set()  # adjoints whose contributions tile them (see tiles())
        self.made: dict[str, tuple] = {}  # variable -> (buffer, member) it is a slice of

    def v(self, name: str) -> str:
        """The variable holding tensor (or adjoint) ``name``."""
        var = self.var[name]
        return self.alias.get(var, var)

    # ---- small helpers -----------------------------------------------------------------------
    def dimvar(self, scope: int, ix: sp.Symbol) -> str:
        dname = self.spec.index_dims[(scope, ix)]
        self.phase.dims.add(dname)
        return self.dim_vars[dname]

    def shape_parts(self, tensor: str) -> list[str]:
        """The size of each axis of ``tensor`` as stored (padded axes included)."""
        dims = self.tensors[tensor].dims
        for dname in dims:
            self.phase.dims.add(dname)
        pads = self.spec.pads.get(tensor, {})
        return [
            self.dim_vars[d] + (f" + 2 * {self.scalar(pads[p])}" if p in pads else "")
            for p, d in enumerate(dims)
        ]

    def shape_of(self, tensor: str) -> str:
        """The shape of ``tensor`` as stored (padded axes included)."""
        parts = self.shape_parts(tensor)
        if not parts:
            return "()"
        return f"({', '.join(parts)},)" if len(parts) == 1 else f"({', '.join(parts)})"

    def emit(self, code: str, comment: str | None = None, chain: Statement | None = None):
        self.phase.lines.append(Line(code, comment, chain))
        target = code.split(" = ", 1)[0].strip() if " = " in code else None
        if chain is not None:
            target = chain.dest
        if target in self.made and not code.startswith(f"{target} = {self.made[target][0]}["):
            del self.made[target]  # no longer a slice of the stacked buffer
        if target and target.isidentifier():  # a rebound name invalidates what read it
            pattern = re.compile(rf"\b{re.escape(target)}\b")
            self.memo = {k: v for k, v in self.memo.items() if not pattern.search(k) or v == target}

    def align(self, var: str, idx: tuple, frame: tuple) -> str:
        """``var`` (axes in the order ``idx``) as an array that broadcasts against ``frame``."""
        if not idx:
            return var
        missing = [s for s in idx if s not in frame]
        if missing:
            raise LowerError(f"aligning {var} requires its indices in the frame, got {missing}")
        pos = [frame.index(s) for s in idx]
        order = sorted(range(len(idx)), key=lambda p: pos[p])
        text = var
        if order != list(range(len(idx))):
            if len(idx) == 2:
                text = f"{var}.T"
            else:
                text = f"{var}.transpose({', '.join(str(o) for o in order)})"
        present = sorted(pos)
        subs = [":" if j in present else "None" for j in range(present[0], len(frame))]
        while subs and subs[-1] == ":":
            subs.pop()
        if subs:
            text = f"{text}[{', '.join(subs)}]"
        return text

    def needs_view(self, occ, scope: int) -> bool:
        """Whether an occurrence reads a strided window rather than the whole array: an affine
        position, or a plain index ranging over less than the axis (or a padded axis)."""
        if not isinstance(occ, sp.Indexed):
            return False
        info = self.tensors.get(occurrence_name(occ))
        if info is None:
            return False
        pads = self.spec.pads.get(info.name, {})
        for p, ix in enumerate(occ.indices):
            if is_affine(ix):
                return True
            if is_index(ix) and (p in pads or self.spec.index_dims.get((scope, ix)) != info.dims[p]):
                return True
        return False

    def view(self, occ, scope: int) -> tuple[str, tuple]:
        """A strided view (no copy) of an affine occurrence; axes in the order of its symbols."""
        key = (sp.srepr(occ), scope)
        if key in self.views:
            return self.views[key]
        if key in self.matrices:
            return self.matrices[key]
        name = occurrence_name(occ)
        var = self.v(name)
        syms = plain_indices(occ)
        split = self.split_view(occ, scope, var) if self.options["split_reshape"] else None
        if split is not None:
            text, syms = split
            tmp = self.namer.temp()
            self.emit(f"{tmp} = {text}", f"{equation_text(occ)} with its blocks as an axis, no copy")
            self._register(tmp)
            self.splits.add(tmp)
            self.views[key] = (tmp, syms)
            return tmp, syms
        basic = self.basic_slice(occ, scope, var) if self.options["views"] else None
        if basic is not None:
            self.views[key] = (basic, syms)
            return basic, syms
        slices, strides = [], {s: [] for s in syms}
        for p, ix in enumerate(occ.indices):
            if isinstance(ix, sp.Indexed):
                raise LowerError(
                    f"a gather and an affine position in one occurrence ({sp.sstr(occ)}) is "
                    f"not implemented"
                )
            terms, const = ([(sp.S.One, ix)], sp.S.Zero) if is_index(ix) else affine_terms(ix)
            slices.append(f"{self.scalar(const)}:" if const != 0 else ":")
            for coeff, sym in terms:
                st = f"{var}.strides[{p}]"
                strides[sym].append(st if coeff == 1 else f"{self.scalar(coeff)} * {st}")
        while slices and slices[-1] == ":":
            slices.pop()
        base = f"{var}[{', '.join(slices)}]" if slices else var
        shape = ", ".join(self.dimvar(scope, s) for s in syms)
        stride_text = ", ".join(" + ".join(strides[s]) for s in syms)
        if len(syms) == 1:
            shape, stride_text = shape + ",", stride_text + ","
        tmp = self.namer.temp()
        self.emit(
            f"{tmp} = np.lib.stride_tricks.as_strided({base}, shape=({shape}), "
            f"strides=({stride_text}), writeable=False)",
            f"{equation_text(occ)} as a strided view, no copy",
        )
        self._register(tmp)
        self.views[key] = (tmp, syms)
        self.view_occ[tmp] = (occ, key)
        return tmp, syms

    # ---- paths specialized to absent optional inputs (switch 'specialize') -------------------
    def find_special(self):
        """Tensors that are one constant when every optional input they depend on is absent:
        a hyperparameter that defaults to False is 0, an optional constant its fill value
        (``keep = Piecewise((0, causal & (t > l)), (mask[l, t], True))`` is 1 with causal off
        and no mask). Each is computed only when an input is present (else None), and every
        statement reading it branches on that: the general statement, or the statement with
        the constant in place (``sm = s``, no masking pass)."""
        spec = self.spec
        switches = {}
        for name, default in spec.hyper.items():
            if default is False:
                switches[sp.Symbol(name, real=True)] = (sp.S.Zero, self.var[name])
        reads: dict[str, list] = {}  # optional const -> the tensors whose definitions read it
        for a in self.d.forward:
            for occ in occurrences(a.expr, self.tensors):
                reads.setdefault(occurrence_name(occ), []).append(a.target)
        for c in self.d.backward:
            for occ in occurrences(c.body, self.tensors):
                reads.setdefault(occurrence_name(occ), []).append(None)
        for a in self.d.forward:
            if a.op != "map" or a.target in spec.outputs or a.target in self.stacked:
                continue
            reps, tests, fills = {}, [], []
            for sym in a.expr.free_symbols:
                if sym in switches:
                    reps[sym] = switches[sym][0]
                    tests.append(switches[sym][1])
            for occ in occurrences(a.expr, self.tensors):
                name = occurrence_name(occ)
                if name in spec.optional:
                    fill = float(spec.optional[name])
                    reps[occ] = sp.Integer(int(fill)) if fill.is_integer() else sp.Float(fill)
                    tests.append(f"{self.var[name]} is not None")
                    fills.append(name)
                elif name in self.special:
                    reps[occ] = self.special[name][0]
                    tests.append(f"{self.v(name)} is not None")
            if not tests:
                continue
            value = a.expr.xreplace(reps)
            if occurrences(value, self.tensors) or value.free_symbols or not value.is_number:
                continue
            if float(value).is_integer():  # 1, not 1.0: x * 1 is x
                value = sp.Integer(int(value))
            self.special[a.target] = (value, tuple(sorted(set(tests))), tuple(fills))
        # an optional constant read only by such tensors is filled by each of their general
        # branches that runs while it is absent (once: a fill tests for None), else up front
        for target, (value, tests, fills) in list(self.special.items()):
            lazy = tuple(
                name for name in fills
                if name not in self.d.cached and all(t in self.special for t in reads.get(name, ()))
            )
            self.special[target] = (value, tests, lazy)
            self.deferred |= set(lazy)

    def fill(self, name: str):
        """The default of an optional constant, filled where it is first needed."""
        self.flags["dtype"] = True
        var = self.var[name]
        value = repr(float(self.spec.optional[name]))
        self.emit(f"if {var} is None:\n    {var} = np.full({self.shape_of(name)}, {value}, dtype=dtype)")

    def special_reads(self, expr: sp.Expr) -> list[str]:
        return sorted({occurrence_name(o) for o in occurrences(expr, self.arrays)} & set(self.special))

    def specialize(self, expr: sp.Expr):
        """``expr`` with each specialized tensor it reads replaced by its constant (None when
        it reads none)."""
        names = self.special_reads(expr)
        if not names:
            return None
        reps = {o: self.special[occurrence_name(o)][0] for o in occurrences(expr, self.arrays)
                if occurrence_name(o) in names}
        return expr.xreplace(reps)

    def present(self, expr: sp.Expr) -> str:
        return " or ".join(f"{self.v(n)} is not None" for n in self.special_reads(expr))

    def absent_note(self, expr: sp.Expr) -> str:
        return ", ".join(f"{n} is {_number_text(self.special[n][0])} everywhere" for n in self.special_reads(expr))

    def branch(self, test: str, general, plain, comment: str, note: str):
        """``if test: <general statements> else: <plain statements>`` as one block line. The
        lowering state each branch leaves is joined: what both branches agree on is kept (an
        alias one branch made becomes an assignment there), views and memoized temporaries made
        inside a branch are dropped."""
        names = ("memo", "alias", "owned", "fresh", "made", "views", "view_occ", "splits", "shapes")
        fixed = ("matrices", "stacked_done", "regions", "argidx")
        saved = {n: _copy(getattr(self, n)) for n in names}
        before = {n: _copy(getattr(self, n)) for n in fixed}
        start = len(self.phase.lines)
        outcomes = []
        self.branching = True
        try:
            for build in (general, plain):
                for n in names:
                    setattr(self, n, _copy(saved[n]))
                build()
                lines = self.phase.lines[start:]
                del self.phase.lines[start:]
                outcomes.append((lines, {n: getattr(self, n) for n in names}))
        finally:
            self.branching = False
        if any(getattr(self, n) != before[n] for n in fixed):
            raise _Unspecialized(comment)
        (lines_a, a), (lines_b, b) = outcomes
        for lines, state, other in ((lines_a, a, b), (lines_b, b, a)):
            for var in sorted(set(state["alias"]) | set(other["alias"])):
                mine, theirs = state["alias"].get(var), other["alias"].get(var)
                if mine is not None and mine != theirs:
                    lines.append(Line(f"{var} = {mine}"))
        alias = {v: t for v, t in a["alias"].items() if b["alias"].get(v) == t}
        for n in names:
            setattr(self, n, _copy(saved[n]))
        self.alias = alias
        self.memo = {k: v for k, v in saved["memo"].items() if a["memo"].get(k) == v == b["memo"].get(k)}
        self.owned = a["owned"] & b["owned"]
        self.fresh = a["fresh"] & b["fresh"]
        self.made = {k: v for k, v in a["made"].items() if b["made"].get(k) == v}
        line = Line("", comment, branches=(lines_a, lines_b), test=test, note=note)
        line.render_block()
        self.phase.lines.append(line)
        bound = {ln.code.split(" = ", 1)[0] for ln in lines_a + lines_b if " = " in ln.code}
        bound |= {ln.chain.dest for ln in lines_a + lines_b if ln.chain is not None}
        for var in sorted(v for v in bound if v.isidentifier()):
            self.memo = {k: v for k, v in self.memo.items() if not re.search(rf"\b{var}\b", k)}
            self.made.pop(var, None)

    def split_terms(self, ix, scope: int):
        """The symbols of a position ``h*D + f`` that numbers blocks (``h``) of a range
        (``f`` over D) one after another, outermost first, and the extent they cover; None
        for any other position (a constant offset, strides other than the inner extents)."""
        if not is_affine(ix) or isinstance(ix, sp.Indexed):
            return None
        terms, const = affine_terms(ix)
        if len(terms) < 2 or const != 0:
            return None
        remaining, order, stride = list(terms), [], sp.S.One
        while remaining:
            nxt = next((t for t in remaining if sp.expand(t[0] - stride) == 0), None)
            if nxt is None:
                return None
            remaining.remove(nxt)
            order.append(nxt[1])
            stride = stride * dim_symbol(self.spec.index_dims[(scope, nxt[1])])
        return tuple(reversed(order)), stride

    def split_view(self, occ, scope: int, var: str, write: bool = False):
        """``w[c, h*D + f]`` as ``w.reshape(E, num_heads, D)`` (axes c, h, f): a position that
        numbers blocks one after another is the split of its axis, a view in the blocks' own
        order (before: a strided view with the block axis last, which products copy). Every
        other position must be a plain index over the whole axis; else None."""
        info = self.tensors.get(occurrence_name(occ))
        if info is None or self.spec.pads.get(info.name):
            return None
        slices, shape, syms = [], [], []
        split = False
        for p, ix in enumerate(occ.indices):
            if is_index(ix):
                if self.spec.index_dims.get((scope, ix)) != info.dims[p] or ix in syms:
                    return None
                slices.append(":")
                shape.append(self.dimvar(scope, ix))
                syms.append(ix)
                continue
            found = self.split_terms(ix, scope)
            if found is None:
                return None
            order, extent = found
            if any(s in syms for s in order):
                return None
            whole = sp.expand(extent - _stacked_size(info.dims[p])) == 0
            stop = " * ".join(self.dimvar(scope, s) for s in order)
            slices.append(":" if whole else f":{stop}")
            shape += [self.dimvar(scope, s) for s in order]
            syms += order
            split = True
        if not split:
            return None
        while slices and slices[-1] == ":":
            slices.pop()
        base = f"{var}[{', '.join(slices)}]" if slices else var
        if write:  # a view to write through, never a copy (see symdl/snippets/runtime.py)
            self.helpers.add("_blocks")
            return f"_blocks({base}, {', '.join(shape)})", tuple(syms)
        return f"{_paren(base, '.')}.reshape({', '.join(shape)})", tuple(syms)

    def basic_slice(self, occ, scope: int, var: str) -> str | None:
        """``gi[:, H:2 * H]`` for a window that is a plain slice: each position holds at most
        one index symbol, none twice (else None: a strided view is needed)."""
        seen: set = set()
        parts = []
        info = self.tensors[occurrence_name(occ)]
        pads = self.spec.pads.get(info.name, {})
        for p, ix in enumerate(occ.indices):
            syms = position_symbols(ix)
            if len(syms) != 1 or syms[0] in seen or isinstance(ix, sp.Indexed):
                return None
            sym = syms[0]
            seen.add(sym)
            terms, const = ([(sp.S.One, ix)], sp.S.Zero) if is_index(ix) else affine_terms(ix)
            coeff = terms[0][0]
            size = self.dimvar(scope, sym)
            full = (
                const == 0
                and coeff == 1
                and p not in pads
                and self.spec.index_dims[(scope, sym)] == info.dims[p]
            )
            if full:
                parts.append(":")
                continue
            start = self.scalar(const) if const != 0 else ""
            extent = dim_symbol(self.spec.index_dims[(scope, sym)])
            stop = self.scalar(const + coeff * (extent - 1) + 1)
            step = "" if coeff == 1 else f":{self.scalar(coeff)}"
            parts.append(f"{start}:{stop}{step}")
        while parts and parts[-1] == ":":
            parts.pop()
        return f"{var}[{', '.join(parts)}]" if parts else var

    def operand(self, occ, frame: tuple, scope: int) -> str:
        """Source for one tensor occurrence, aligned to ``frame``."""
        name = occurrence_name(occ)
        if name in self.argidx:
            return self.argmax_test(occ, frame, scope)
        if self.fixed and set(plain_indices(occ)) & set(self.fixed):
            text, syms = self.offset_slice(occ, scope)
            return self.align(text, syms, frame)
        if self.needs_view(occ, scope):
            tmp, syms = self.view(occ, scope)
            return self.align(tmp, syms, frame)
        var = self.v(name)
        idx = occurrence_indices(occ)
        if all(is_index(i) for i in idx):
            return self.align(var, idx, frame)
        return self.gather(var, idx, frame, scope)

    def gather_index(self, idx: tuple, frame: tuple, scope: int) -> list[str]:
        parts = []
        for ix in idx:
            if is_index(ix):
                parts.append(self.align(f"np.arange({self.dimvar(scope, ix)})", (ix,), frame))
            else:
                parts.append(self.align(self.var[occurrence_name(ix)], tuple(ix.indices), frame))
        return parts

    def gather(self, var: str, idx: tuple, frame: tuple, scope: int) -> str:
        first = idx[0]
        rest = idx[1:]
        if (
            not is_index(first)
            and all(is_index(i) for i in rest)
            and tuple(first.indices) + tuple(rest) == tuple(frame)
        ):
            return f"{var}[{self.var[occurrence_name(first)]}]"
        return f"{var}[{', '.join(self.gather_index(idx, frame, scope))}]"

    # ---- expressions -------------------------------------------------------------------------
    def elementwise(
        self, expr: sp.Expr, frame: tuple, scope: int, into: str | None = None, comment=None
    ) -> str | None:
        """Source of an elementwise expression over ``frame`` (extra CSE lines are emitted).
        With ``into``, a full-size expression may instead be emitted as a fused statement
        assigning ``into`` (see symdl.fusion); then None is returned."""
        names: dict = {}
        arrays: set = set()
        reps = {}
        for occ in occurrences(expr, self.arrays):
            sym = sp.Dummy(occurrence_name(occ), real=True)
            names[sym] = self.operand(occ, frame, scope)
            reps[occ] = sym
            if occurrence_indices(occ):
                arrays.add(sym)
        with sp.evaluate(False):  # renaming only: re-evaluating nested functions is exponential
            body = expr.xreplace(reps)
        for s in body.free_symbols:
            if s in names:
                continue
            if s.name in self.spec.hyper:
                self.phase.hyper.add(s.name)
                names[s] = self.var[s.name]
            elif s.is_integer and s.is_positive and s.name in self.dim_vars:
                self.phase.dims.add(s.name)
                names[s] = self.dim_vars[s.name]
            elif s in self.fixed:  # an index fixed by a loop over kernel offsets
                names[s] = self.index_text(self.fixed[s], {})
            elif is_index(s) and s in frame:  # the value of an index: 0, 1, 2, ...
                arange = f"np.arange({self.dimvar(scope, s)})"
                if _in_arithmetic(body, s):  # in the arguments' dtype: no float64 promotion
                    self.flags["dtype"] = True
                    arange = f"np.arange({self.dimvar(scope, s)}, dtype=dtype)"
                names[s] = self.align(arange, (s,), frame)
                arrays.add(s)
            else:
                raise LowerError(f"lowering requires known symbols, got {s.name!r}")
        temps = _TempSymbols(self.namer, names, arrays)
        subexprs, (body,) = sp.cse([body], symbols=temps, order="canonical")
        printer = NumpyPrinter(names, arrays, self.helpers, self.flags)
        body = _floats(body)
        subexprs = [(sym, _floats(sub)) for sym, sub in subexprs]
        chain = self.chain(printer, names, reps, arrays, frame, scope) if self.options["fuse"] else None
        for sym, sub in subexprs:
            if any(a in arrays for a in sub.free_symbols):
                arrays.add(sym)
            if chain is not None and chain.fusable(sub):
                self.emit_chain(Statement(chain, sub, names[sym]))
            else:
                self.emit(f"{names[sym]} = {printer.doprint(sub)}")
            if chain is not None:
                chain.define(sym, sub)
        if into is not None and chain is not None and chain.fusable(body):
            self.emit_chain(Statement(chain, body, into), comment)
            return None
        return printer.doprint(body)

    def chain(self, printer, names: dict, reps: dict, arrays: set, frame: tuple, scope: int):
        """A planner of fused statements over ``frame`` (see symdl.fusion)."""
        rank = max((len(t.dims) for t in self.tensors.values()), default=0)
        if not frame or len(frame) < rank:  # not among the layer's largest arrays
            return None
        covers, integers = {}, set()
        for occ, sym in reps.items():
            covers[sym] = frozenset(free_indices(occ)) & set(frame)
            info = self.tensors.get(occurrence_name(occ))
            if info is not None and info.kind != "float":
                integers.add(sym)
        for s in arrays:
            if is_index(s):  # the value of an index: an integer array
                covers[s] = frozenset({s})
                integers.add(s)
        shape = tuple(self.spec.index_dims.get((scope, ix)) for ix in frame)
        chain = Chain(printer, names, covers, frame, self.namer.temp, self.memo, integers, shape)
        chain.masked = self.options["masked_inplace"]
        return chain

    def merged_terms(self, d: Derivation, keep=()) -> list:
        """The backward contributions with the elementwise ones combined: an adjoint made by one
        elementwise contribution and read by one later elementwise contribution, once, is
        substituted there (no array of its own); then the elementwise contributions to one
        adjoint over one frame are one sum, its common factors taken out (``dy*a + dy*b`` as
        ``dy*(a + b)``, numbers included), placed at the last of them (where every array the
        terms read is final)."""
        grads = {a for a in d.grads.values() if a}
        bw = list(d.backward)
        if len(bw) > _MERGE_LIMIT:  # (a long chain of layers' worth of statements: as they are)
            return bw

        def dims(c, ixs):
            return [self.spec.index_dims.get((c.scope, ix)) for ix in ixs]

        def simple(c) -> bool:
            if c.is_gather or c.reduce or self.needs_view(c.occurrence, c.scope):
                return False
            if not set(free_indices(c.body)) <= set(c.lhs):
                return False
            return not any(self.needs_view(o, c.scope) for o in occurrences(c.body, self.arrays))

        def reads(c, name):
            return [o for o in occurrences(c.body, self.arrays) if occurrence_name(o) == name]

        changed = True
        while changed:  # substitute single-use elementwise adjoints
            changed = False
            for k, c1 in enumerate(bw):
                name = c1.target
                if name in grads or name in keep or not c1.first or _ops(c1.body) > _MERGE_LIMIT:
                    continue
                if not simple(c1):
                    continue
                if sum(c.target == name for c in bw) != 1:
                    continue
                users = [j for j, c in enumerate(bw) if reads(c, name)]
                if len(users) != 1 or users[0] <= k or not simple(bw[users[0]]):
                    continue
                c2 = bw[users[0]]
                if _ops(c2.body) > _MERGE_LIMIT:
                    continue
                occs = [o for o in sp.preorder_traversal(c2.body) if o in set(reads(c2, name))]
                if len(occs) != 1 or not all(is_index(ix) for ix in occurrence_indices(occs[0])):
                    continue
                rename = dict(zip(c1.lhs, occurrence_indices(occs[0])))
                if dims(c1, list(rename)) != dims(c2, list(rename.values())):
                    continue
                body = c1.body.xreplace(rename)
                bw[users[0]] = dataclasses.replace(c2, body=c2.body.xreplace({occs[0]: body}))
                del bw[k]
                changed = True
                break
        # one sum per adjoint of its elementwise contributions over one frame
        out = []
        for k, c in enumerate(bw):
            group = [b for b in bw if b.target == c.target]
            if len(group) < 2 or sum(_ops(b.body) for b in group) > 4 * _MERGE_LIMIT or not all(
                simple(b) and b.lhs == c.lhs and dims(b, b.lhs) == dims(c, c.lhs) for b in group
            ):
                out.append(c)
            elif c is group[-1]:
                # (an output's adjoint holds the incoming gradient before its first contribution)
                body = _factored([b.body for b in group], c.lhs)
                out.append(dataclasses.replace(c, body=body, first=group[0].first))
        return out

    def emit_chain(self, statement: Statement, comment: str | None = None):
        self.emit(statement.default, comment, statement)
        if statement.fresh:  # an array of this function's own: later scatters may add into it
            self.owned.add(statement.dest)

    def scatters_later(self, contributions: list, frozen=frozenset()) -> list:
        """A scatter-add that defines an adjoint (into zeros) moves after the adjoint's next
        contribution when that one is a full-size elementwise term, which then defines the
        adjoint: the scatter adds into its buffer, with no zeros and no extra pass. (Every
        contribution to an adjoint comes before its first use, so the scatter's values are
        final where it moves to.) Returns (position, contribution) pairs; ``frozen``:
        positions that keep their place."""
        out = list(enumerate(contributions))
        k = 0
        while k < len(out):
            pos, c = out[k]
            if c.first and c.is_gather and not self.needs_view(c.occurrence, c.scope):
                j = next((j for j in range(k + 1, len(out)) if out[j][1].target == c.target), None)
                nxt = out[j][1] if j is not None else None
                if (
                    nxt is not None
                    and pos not in frozen
                    and out[j][0] not in frozen
                    and not nxt.is_gather
                    and not nxt.reduce
                    and not self.needs_view(nxt.occurrence, nxt.scope)
                    and set(nxt.lhs) <= self.covered(nxt.body)
                ):
                    out[j] = (out[j][0], dataclasses.replace(nxt, first=True))
                    out.insert(j + 1, (pos, dataclasses.replace(c, first=False)))
                    del out[k]
                    continue
            k += 1
        return out

    def covered(self, expr: sp.Expr) -> set:
        out: set = set()
        for occ in occurrences(expr, self.arrays):
            out |= set(plain_indices(occ))
        return out

    def full(self, text: str, expr: sp.Expr, frame: tuple, scope: int) -> str:
        """Make ``text`` (an expression over ``frame``) span the whole frame."""
        if set(frame) <= self.covered(expr):
            return text
        shape = ", ".join(self.dimvar(scope, i) for i in frame)
        shape = f"({shape},)" if len(frame) == 1 else f"({shape})"
        if not occurrences(expr, self.arrays) and not any(is_index(s) for s in expr.free_symbols):
            self.flags["dtype"] = True  # a constant: an array of the arguments' dtype
            return f"np.full({shape}, {text}, dtype=dtype)"
        return f"np.broadcast_to({text}, {shape})"

    def reduction(self, op: str, body: sp.Expr, out: tuple, red: tuple, scope: int) -> str:
        """Source for ``op`` (sum or max) of ``body`` over ``red``, result in the order ``out``."""
        frame = tuple(out) + tuple(red)
        if op == "max":
            text = self.full(self.elementwise(body, frame, scope), body, frame, scope)
            axes = tuple(range(len(out), len(frame)))
            return f"{_paren(text, '.')}.max(axis={_axes(axes)})"
        coeff, operands, rest = self.factor(body, scope)
        redset = set(red)
        # factors free of every reduced index multiply the result after the reduction
        outer_rest = [f for f in rest if not free_indices(f) & redset]
        outer_ops = [(v, i) for v, i in operands if not set(i) & redset]
        if (
            self.options["factor_out"]
            and (outer_rest or outer_ops)
            and len(outer_rest) + len(outer_ops) < len(rest) + len(operands)
        ):
            rest = [f for f in rest if f not in outer_rest]
            operands = [o for o in operands if o not in outer_ops]
            inner_out = tuple(
                i for i in out if any(i in idx for _, idx in operands) or any(i in free_indices(f) for f in rest)
            )
            inner_body = sp.Mul(*rest) * sp.Mul(
                *[sp.IndexedBase(v, real=True)[idx] for v, idx in operands]
            )
            for v, idx in operands:
                self._register(v)
            inner = self.reduction("sum", inner_body, inner_out, red, scope)
            tmp = self.held(inner)
            outer = coeff * sp.Mul(*outer_rest) * sp.Mul(
                *[sp.IndexedBase(v, real=True)[idx] for v, idx in outer_ops]
            )
            for v, idx in outer_ops:
                self._register(v)
            expr = outer * (sp.IndexedBase(tmp, real=True)[inner_out] if inner_out else sp.Symbol(tmp, real=True))
            text = self.elementwise(expr, tuple(out), scope)
            return self.full(text, expr, tuple(out), scope)
        if rest:
            r = sp.Mul(*rest)
            idx = self.storage_order(r, frame)
            tmp = self.namer.temp()
            text = self.elementwise(r, idx, scope, into=tmp)
            if text is not None:
                self.emit(f"{tmp} = {self.full(text, r, idx, scope)}")
            operands.append((tmp, idx))
        before = {v for v, _ in operands}
        operands = self.absorb(operands)
        ints = {self.var[n] for n, t in self.tensors.items() if t.kind != "float"}
        for v, idx in operands:  # products made by absorb: float arrays of a known shape
            if v not in before and self.options["fuse"] and not before & ints:
                self.shapes[v] = tuple(self.spec.index_dims.get((scope, ix)) for ix in idx)
        operands, red = self.pairwise(operands, out, red, scope)
        if self.options["window_matrix"] and self.in_forward:
            operands = self.window_matrix(operands, out, red, scope)
        present = set().union(*[set(i) for _, i in operands]) if operands else set()
        for ix in red:  # a reduced index no operand carries: the sum is a count
            if ix not in present:
                coeff = coeff * dim_symbol(self.spec.index_dims[(scope, ix)])
        red = tuple(i for i in red if i in present)
        if not operands:
            text = self.scalar(coeff)
            coeff = sp.S.One
        else:
            if len(operands) == 1:
                var, idx = operands[0]
                text = self.sum_one(var, idx, out, red)
            else:
                text = self.contract(operands, out, red, scope)
            if text in self.memo and self.options["share"]:
                text = self.memo[text]
        if coeff != 1:
            if coeff == -1:
                text = f"-{_paren(text)}"
            else:
                text = f"{_paren(self.scalar(coeff))} * {_paren(text)}"
        if not set(out) <= present:
            shape = ", ".join(self.dimvar(scope, i) for i in out)
            shape = f"({shape},)" if len(out) == 1 else f"({shape})"
            kept = tuple(i for i in out if i in present)
            text = f"np.broadcast_to({self.align(_paren(text), kept, tuple(out))}, {shape})"
        return text

    def absorb(self, operands: list) -> list:
        """Fewer operands for a contraction: one whose indices all belong to another is
        multiplied into it first (a cheap elementwise pass), so three-operand sums such as
        Sum(w[d] * dy[e, d] * x[e, d], d) become one pairwise contraction (before -> after)."""
        if not self.options["absorb"]:
            return operands
        operands = list(operands)
        # a strided view (a window of an input) is never the host: multiplying into it would
        # materialize the window, kernel-size times the input
        views = {v for v, _ in self.views.values()} | {v for v, _ in self.matrices.values()}
        while len(operands) > 2:
            pair = None
            for a, (va, ia) in enumerate(operands):
                for b, (vb, ib) in enumerate(operands):
                    if a != b and set(ia) <= set(ib) and vb not in views:
                        pair = (a, b)
                        break
                if pair:
                    break
            if pair is None:
                break
            (va, ia), (vb, ib) = operands[pair[0]], operands[pair[1]]
            tmp = self.held(f"{vb} * {self.align(va, ia, ib)}")
            operands = [o for k, o in enumerate(operands) if k not in pair] + [(tmp, ib)]
        return operands

    def pairwise(self, operands: list, out: tuple, red: tuple, scope: int) -> tuple[list, tuple]:
        """A sum over three or more operands as a chain of two-operand contractions, each
        summing the indices no other operand carries: the pair with the smallest result goes
        first, and a pair already contracted earlier in the function is reused (before: one
        einsum over all operands, whose loop cannot use BLAS or the shared result)."""
        if not self.options["pairwise"]:
            return operands, red
        operands = list(operands)
        frame = tuple(out) + tuple(red)
        while len(operands) > 2:
            best = None
            for a in range(len(operands)):
                for b in range(a + 1, len(operands)):
                    (_, ia), (_, ib) = operands[a], operands[b]
                    others = {i for k, (_, ik) in enumerate(operands) if k not in (a, b) for i in ik}
                    summed = tuple(i for i in red if (i in ia or i in ib) and i not in others)
                    if not summed:
                        continue
                    kept = ordered(set(ia) | set(ib), frame)
                    kept = tuple(i for i in kept if i not in summed)
                    self.dry = True  # only a candidate: nothing may be emitted for it
                    try:
                        text = self.contract([operands[a], operands[b]], kept, summed, scope)
                    finally:
                        self.dry = False
                    key = (len(kept), text not in self.memo, a, b)
                    if best is None or key < best[0]:
                        best = (key, a, b, kept, text)
            if best is None:
                break
            _, a, b, kept, text = best
            tmp = self.held(text)
            operands = [o for k, o in enumerate(operands) if k not in (a, b)] + [(tmp, kept)]
            red = tuple(i for i in red if i in kept or any(i in ik for _, ik in operands))
        return operands, red

    def held(self, text: str) -> str:
        """A variable holding the value of ``text``: itself when it is a name, the temporary of
        an identical computation made earlier (switch 'share'), or a new temporary."""
        tmp = text if text.isidentifier() else self.memo.get(text) if self.options["share"] else None
        if tmp is None:
            tmp = self.namer.temp()
            self.emit(f"{tmp} = {text}")
            self.memo[text] = tmp
        self._register(tmp)
        return tmp

    def _register(self, var: str):
        """Let a lowering temporary stand as an operand in expressions."""
        self.arrays.add(var)
        self.var.setdefault(var, var)

    def storage_order(self, expr: sp.Expr, frame: tuple) -> tuple:
        """Index order for a temporary: that of its largest operand, then the frame's."""
        occs = [o for o in occurrences(expr, self.arrays) if isinstance(o, sp.Indexed)]
        best = max(occs, key=lambda o: len(plain_indices(o)), default=None)
        first = list(plain_indices(best)) if best is not None else []
        rest = [i for i in ordered(free_indices(expr), frame) if i not in first]
        return tuple(i for i in first if i in free_indices(expr)) + tuple(rest)

    def scalar(self, expr: sp.Expr) -> str:
        names = {}
        for s in expr.free_symbols:
            if s.name in self.spec.hyper:
                self.phase.hyper.add(s.name)
                names[s] = self.var[s.name]
            elif s.name in self.dim_vars:
                self.phase.dims.add(s.name)
                names[s] = self.dim_vars[s.name]
            elif s.name in self.tensors or s.name in self.var:
                names[s] = self.v(s.name)
        return NumpyPrinter(names, set(), self.helpers, self.flags).doprint(_floats(expr))

    def factor(self, body: sp.Expr, scope: int):
        """Split a product into a scalar coefficient, plain operands and other factors."""
        coeff = sp.S.One
        operands: list[tuple[str, tuple]] = []
        rest = []
        for f in sp.Mul.make_args(body):
            if isinstance(f, sp.Indexed) and occurrence_name(f) in self.argidx:
                rest.append(f)  # an arg-max held as an index: compared elementwise
            elif self.needs_view(f, scope):
                operands.append(self.view(f, scope))
            elif isinstance(f, sp.Indexed) and all(is_index(i) for i in f.indices):
                operands.append((self.v(occurrence_name(f)), tuple(f.indices)))
            elif (
                self.options["fuse"]
                and f.is_Pow
                and f.exp in (2, 3)
                and isinstance(f.base, sp.Indexed)
                and all(is_index(i) for i in f.base.indices)
                and not self.needs_view(f.base, scope)
            ):  # Sum(x**2) as a contraction of x with itself: no temporary for the square
                operand = (self.v(occurrence_name(f.base)), tuple(f.base.indices))
                operands += [operand] * int(f.exp)
            elif not free_indices(f) and not any(
                isinstance(o, sp.Indexed) for o in occurrences(f, self.arrays)
            ):
                coeff = coeff * f
            else:
                rest.append(f)
        return coeff, operands, rest

    def sum_one(self, var: str, idx: tuple, out: tuple, red: tuple) -> str:
        kept = tuple(i for i in idx if i not in red)
        if kept == tuple(i for i in out if i in kept):
            if not red:
                return var
            axes = tuple(p for p, i in enumerate(idx) if i in red)
            return f"{_paren(var, '.')}.sum(axis={_axes(axes)})"
        return self.contract([(var, idx)], out, red)

    def contract(self, operands: list, out: tuple, red: tuple, scope: int | None = None) -> str:
        letters = _letters([i for _, idx in operands for i in idx] + list(out))
        out_kept = tuple(i for i in out if any(i in idx for _, idx in operands))
        mm = _matmul(operands, out_kept) if self.options["matmul"] else None
        if mm is None and self.options["batched_matmul"]:
            views = {v for v, _ in self.views.values()} - self.splits
            mm = _batched_matmul(operands, out_kept, views)
        matrices = {v for v, _ in self.matrices.values()}
        if (
            mm is None
            and scope is not None
            and (
                self.options["grouped_matmul"]
                or any(v in matrices or v in self.splits for v, _ in operands)
            )
        ):
            mm = self.grouped_matmul(operands, out_kept, scope)
        if mm is None and self.options["window_matvec"]:
            mm = self.window_matvec(operands, out_kept)
        if mm is not None:
            return mm
        subs = ",".join("".join(letters[i] for i in idx) for _, idx in operands)
        subs += "->" + "".join(letters[i] for i in out_kept)
        ops = ", ".join(v for v, _ in operands)
        # a path search pays off for three operands, or for a contraction BLAS can do
        # (tensordot); two operands sharing every index run fastest in einsum's own loop
        shared = set(operands[0][1]) & set(operands[-1][1]) if len(operands) == 2 else set()
        blas = len(operands) == 2 and bool(shared - set(out_kept)) and not (shared & set(out_kept))
        opt = ", optimize=True" if len(operands) > 2 or blas else ""
        return f'np.einsum("{subs}", {ops}{opt})'

    def window_matvec(self, operands: list, out: tuple) -> str | None:
        """A stack of matrix-vector products whose matrices are a strided window (local
        attention's band of keys ``k[n, i + w, d]`` times ``q[n, i, d]``): ``window @ x[...,
        None]`` on the view itself, no copy (before: an einsum over the view, its loop two to
        four times slower there). The other operand carries only the batch and the contracted
        index."""
        if len(operands) != 2:
            return None
        views = {v for v, _ in self.views.values()}
        for (va, ia), (vb, ib) in (operands, operands[::-1]):
            if va not in views or vb in views or len(set(ia)) != len(ia) or len(set(ib)) != len(ib):
                continue
            contracted = [i for i in ia if i in ib and i not in out]
            rows = [i for i in ia if i not in ib]
            batch = [i for i in out if i in ia and i in ib]
            if len(contracted) != 1 or len(rows) != 1 or not batch or ELL in ia + ib:
                continue
            if set(ib) != set(batch + contracted) or set(out) != set(batch + rows):
                continue
            perm = [ia.index(i) for i in batch + rows + contracted]
            left = va if perm == sorted(perm) else f"{va}.transpose({', '.join(map(str, perm))})"
            right = self.align(vb, ib, tuple(batch + contracted))
            text = f"({left} @ {_paren(right, '.')}[..., None])[..., 0]"
            result = batch + rows
            if result != list(out):
                text += f".transpose({', '.join(str(result.index(i)) for i in out)})"
            return text
        return None

    # ---- programs ----------------------------------------------------------------------------
    def lower_assign(self, a: Assign, dead: frozenset = frozenset()):
        """``dead``: tensors no later statement reads (their arrays may be reused)."""
        var = self.var[a.target]
        comment = f"{_lhs_text(a.target, a.indices)} = {equation_text(_rhs_of(a))}"
        if a.target in self.stacked:
            self.stacked_slice(a, var, comment)
            return
        if self.special and not self.branching:
            if a.target in self.special:  # computed only when an optional input is present
                _, tests, fills = self.special[a.target]

                def general():
                    for name in fills if len(tests) > 1 else ():  # else: given, when this runs
                        self.fill(name)
                    self.lower_assign(a, dead)

                note = f"{a.target} is {_number_text(self.special[a.target][0])} everywhere"
                self.branch(" or ".join(tests), general, lambda: self.emit(f"{var} = None"),
                            comment, note)
                return
            plain = self.specialize(a.expr)
            if plain is not None:
                self.branch(
                    self.present(a.expr), lambda: self.lower_assign(a, dead),
                    lambda: self.lower_assign(dataclasses.replace(a, expr=plain), dead),
                    comment, self.absent_note(a.expr),
                )
                return
        if a.op == "map" and self.options["inplace"] and self.add_into(a, var, dead, comment):
            return
        if a.op == "map":
            text = self.elementwise(a.expr, a.indices, a.scope, into=var, comment=comment)
            if text is None:  # emitted as a fused statement
                return
            text = self.full(text, a.expr, a.indices, a.scope)
        elif a.op == "argmax" and a.target in self.argidx:
            return  # recorded as an index by the running maximum
        elif a.op == "max" and self.offset_max(a):
            pos = self.d.forward.index(a)
            after = self.d.forward[pos + 1] if pos + 1 < len(self.d.forward) else None
            mask = after if (
                after is not None and after.op == "argmax" and after.reduce == a.reduce
                and after.scope == a.scope
            ) else None
            self.running_max(a, mask, comment)
            return
        elif a.op == "argmax":
            frame = a.indices
            body = self.full(self.elementwise(a.expr, frame, a.scope), a.expr, frame, a.scope)
            self.helpers.add("_argmax_mask")
            comment = f"{_lhs_text(a.target, frame)} = [({', '.join(i.name for i in a.reduce)}) is the first arg-max of {equation_text(a.expr)}]"
            text = f"_argmax_mask({body}, {len(a.reduce)})"
        else:
            text = self.reduction(a.op, a.expr, a.indices, a.reduce, a.scope)
        into = _ordered_product(text, var) if a.op == "sum" else None
        if (
            into is not None and self.options["ordered_product"]
            and not self.spec.pads.get(a.target)
        ):  # the product written in the result's own axis order: later reshapes copy nothing
            self.flags["dtype"] = True
            self.emit(f"{var} = np.empty({self.shape_of(a.target)}, dtype=dtype)", comment)
            self.emit(into)
            self.fresh.add(a.target)
            return
        self.emit(f"{var} = {text}", comment)
        if a.op in ("sum", "map") and _fresh(text):
            self.fresh.add(a.target)

    def stacked_products(self, assigns: list):
        """Find sums of products that read adjacent slices of one array along a kept axis, the
        other operands the same, together covering the whole axis (the q, k and v
        projections ``Sum(x[n, t, i] * w[k*E + c, i], i)``): each group is computed as one
        product over the whole array (one GEMM instead of one per slice), each member a slice
        of it. Fills ``self.stacked`` and ``self.stacked_groups``."""
        known = set(self.spec.args) | set(self.spec.consts)
        groups: dict = {}
        for a in assigns:
            member = self._stack_member(a, known)
            if member is not None:
                key, p, const, extent, operands = member
                groups.setdefault(key, []).append((const, extent, a, operands, p))
            known.add(a.target)
        for key, members in groups.items():
            if len(members) < 2 or len({m[2].target for m in members}) != len(members):
                continue
            ordered_ = sorted(members, key=lambda m: _affine_rank(m[0], members))
            if ordered_[0][0] != 0:
                continue
            ok = all(
                sp.simplify(b[0] - a[0] - a[1]) == 0 for a, b in itertools.pairwise(ordered_)
            )
            base, p = key[0], ordered_[0][4]
            total = _stacked_size(self.tensors[base].dims[p])
            last = ordered_[-1]
            if not ok or sp.simplify(last[0] + last[1] - total) != 0:
                continue
            first = min(ordered_, key=lambda m: assigns.index(m[2]))
            targets = [m[2].target for m in ordered_]
            self.stacked_groups[key] = {
                "operands": first[3],
                "targets": targets,
                "starts": [m[0] for m in ordered_],
                "sources": [assigns.index(m[2]) for m in ordered_],
                "index": key[3],
                "dim": self.tensors[base].dims[p],
                "base": base,
            }
            for const, extent, a, _, _ in ordered_:
                axis = a.indices.index(key[3])
                self.stacked[a.target] = (key, axis, const, const + extent)

    def _stack_member(self, a: Assign, known: set):
        """(group key, slice position, slice start, slice extent, merged operands) for a sum
        of plain operands, one of which reads ``w[const + c, ...]`` with ``c`` kept; else
        None."""
        if a.op != "sum" or not a.reduce:
            return None
        factors = sp.Mul.make_args(a.expr)
        if len(factors) < 2 or not all(isinstance(f, sp.Indexed) for f in factors):
            return None
        if any(occurrence_name(f) not in known for f in factors):
            return None
        if any(isinstance(i, sp.Indexed) for f in factors for i in f.indices):
            return None  # gathers
        sliced = [f for f in factors if self.needs_view(f, a.scope)]
        if len(sliced) != 1:
            return None
        occ = sliced[0]
        name = occurrence_name(occ)
        info = self.tensors[name]
        if name in self.spec.pads:
            return None
        partial = [  # positions read in part: an offset, or an index shorter than the axis
            p for p, ix in enumerate(occ.indices)
            if not is_index(ix) or self.spec.index_dims[(a.scope, ix)] != info.dims[p]
        ]
        if len(partial) != 1:
            return None
        p = partial[0]
        ix = occ.indices[p]
        terms, const = ([(sp.S.One, ix)], sp.S.Zero) if is_index(ix) else affine_terms(ix)
        if len(terms) != 1 or terms[0][0] != 1 or const.free_symbols & set(a.all_indices):
            return None
        c = terms[0][1]
        if c not in a.indices or c in occ.indices[:p] + occ.indices[p + 1 :]:
            return None
        whole = occ.base[tuple(c if q == p else ix for q, ix in enumerate(occ.indices))]
        operands = [
            (self.v(name), tuple(whole.indices)) if f is occ
            else (self.v(occurrence_name(f)), tuple(f.indices))
            for f in factors
        ]
        dims = tuple(
            (ix, info.dims[p] if ix == c else self.spec.index_dims[(a.scope, ix)])
            for ix in a.all_indices
        )
        body = sp.Mul(*[whole if f is occ else f for f in factors])
        key = (name, p, sp.srepr(body), c, a.indices, a.reduce, dims)
        extent = dim_symbol(self.spec.index_dims[(a.scope, c)])
        return key, p, const, extent, operands

    def stacked_adjoints(self, d: Derivation, frozen: set, same: dict) -> dict:
        """The backward of each stacked product (see stacked_products) as one product too: the
        members' adjoints are slices of one array (the arrays they alias are made there), and
        each operand's contributions from the members become one contraction with it, at the
        place of the last of them. Returns position in d.backward -> the merged contribution
        (None: folded into another)."""
        out: dict = {}
        for key, group in self.stacked_groups.items():
            plan = self._stacked_backward(d, key, group, frozen, same)
            if plan is not None:
                out.update(plan)
        return out

    def _stacked_backward(self, d: Derivation, key, group: dict, frozen: set, same: dict):
        sources = group["sources"]
        c = group["index"]
        adjoints = [d.adjoints.get(t) for t in group["targets"]]
        if None in adjoints:
            return None
        # each member's adjoint: the incoming adjoint of another tensor under a new name (the
        # array made in a slice of the stacked buffer), or its own array
        regions = []
        for adj in adjoints:
            cs = [x for x in d.backward if x.target == adj]
            if len(cs) != 1:
                return None
            x = cs[0]
            body = x.body
            if (
                x.first
                and not x.reduce
                and isinstance(body, sp.Indexed)
                and occurrence_name(body) in self.d.adjoints.values()
                and tuple(body.indices) == tuple(x.lhs)
            ):
                regions.append(occurrence_name(body))
            else:
                regions.append(adj)
        shared = set(same) | set(same.values())
        if shared & (set(adjoints) | set(regions)) or len(set(regions)) != len(regions):
            return None
        # the members' contributions to the product's operands, by target
        factors = sp.Mul.make_args(self.d.forward[sources[0]].expr)
        operand_tensors = {occurrence_name(f) for f in factors}
        by_target: dict = {}
        for pos, x in enumerate(d.backward):
            if x.source in sources and x.tensor in operand_tensors:
                by_target.setdefault(x.target, []).append(pos)
        if not by_target:
            return None
        plan: dict = {}
        scope0 = self.d.forward[sources[0]].scope
        big = sp.Symbol(c.name.upper() if c.name.upper() != c.name else c.name + "_", integer=True)
        if any(big.name == s.name for (sc, s) in self.spec.index_dims if sc == scope0):
            return None
        for target, positions in by_target.items():
            if len(positions) != len(sources) or positions[0] in frozen:
                return None
            if any(p in frozen for p in positions):
                return None
            if {d.backward[p].source for p in positions} != set(sources):
                return None
            lo, hi = positions[0], positions[-1]
            between = [q for q in range(lo, hi + 1) if q not in positions]
            if any(d.backward[q].target == target for q in between):
                return None  # another contribution in between: the sum keeps its order
            first = next(d.backward[p] for p in positions if d.backward[p].source == sources[0])
            if first.scope != scope0:
                return None
            plan[target] = (positions, first)
        buf = self.namer.temp()
        self._register(buf)
        group["buffer"] = buf
        group["big"] = big
        group["regions"] = regions
        group["adjoints"] = adjoints
        out: dict = {}
        stacked = sp.IndexedBase(buf, real=True)

        def swap(expr):  # the first member's adjoint -> the stacked array, c -> the whole axis
            expr = expr.replace(
                lambda e: isinstance(e, sp.Indexed) and occurrence_name(e) == adjoints[0],
                lambda e: stacked[tuple(e.indices)],
            )
            return expr.xreplace({c: big})

        for target, (positions, x) in plan.items():
            merged = dataclasses.replace(
                x,
                lhs=tuple(swap(i) if isinstance(i, sp.Expr) else i for i in x.lhs),
                body=swap(x.body),
                reduce=tuple(big if i == c else i for i in x.reduce),
                over=tuple(big if i == c else i for i in x.over),
                occurrence=swap(x.occurrence),
                first=d.backward[positions[0]].first,
            )
            for p in positions[:-1]:
                out[p] = None
            out[positions[-1]] = (merged, key)
        for region in regions:
            self.regions[region] = key
        # the merged index ranges over the whole axis (a copy: the derivation stays as it is)
        index_dims = {**self.spec.index_dims, (scope0, big): group["dim"]}
        self.spec = dataclasses.replace(self.spec, index_dims=index_dims)
        return out

    def region(self, target: str) -> str:
        """A slice of a stacked buffer (allocated here the first time) for adjoint ``target``."""
        key = self.regions[target]
        group = self.stacked_groups[key]
        buf = group["buffer"]
        k = group["regions"].index(target)
        axis = self.stacked[group["targets"][k]][1]
        if not group.get("allocated"):
            a = self.d.forward[group["sources"][0]]
            parts = [
                self.dim_vars[group["dim"]] if ix == group["index"] else self.dimvar(a.scope, ix)
                for ix in a.indices
            ]
            self.phase.dims.add(group["dim"])
            shape = f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
            self.flags["dtype"] = True
            names = ", ".join(group["regions"])
            self.emit(
                f"{buf} = np.zeros({shape}, dtype=dtype)",
                f"{names} as slices of one array, for the products below",
            )
            group["allocated"] = True
        _, _, start, stop = self.stacked[group["targets"][k]]
        lo = self.scalar(start) if start != 0 else ""
        text = f"{buf}[{', '.join([':'] * axis + [f'{lo}:{self.scalar(stop)}'])}]"
        return text

    def stacked_contribution(self, merged: Contribution, key, defined: set):
        """A merged contribution of a stacked product's backward: reads the stacked buffer,
        which holds the members' adjoints when each was made in its slice (else they are
        concatenated into it first)."""
        group = self.stacked_groups[key]
        buf = group["buffer"]
        ok = group.get("allocated") and all(
            self.made.get(self.v(adj)) == (buf, k) for k, adj in enumerate(group["adjoints"])
        )
        if not ok and not group.get("joined"):
            axis = self.stacked[group["targets"][0]][1]
            parts = ", ".join(self.v(adj) for adj in group["adjoints"])
            self.emit(f"{buf} = np.concatenate(({parts}), axis={axis})")
            group["joined"] = True
        self.lower_contribution(merged, defined)

    def stacked_slice(self, a: Assign, var: str, comment: str):
        """A member of a stacked product: the product over the whole array is emitted at the
        group's first member, each member is a slice of it (a view)."""
        key, axis, start, stop = self.stacked[a.target]
        merged = self.stacked_done.get(key)
        if merged is None:
            group = self.stacked_groups[key]
            operands, targets = group["operands"], group["targets"]
            merged = self.namer.temp()
            text = self.contract(operands, a.indices, a.reduce)
            product = sp.Mul(*[sp.IndexedBase(v, real=True)[i] for v, i in operands])
            self.emit(
                f"{merged} = {text}",
                f"{', '.join(targets)} as slices of one product: "
                f"{equation_text(_Sum(product, a.reduce))}",
            )
            self._register(merged)
            self.stacked_done[key] = merged
        parts = [":"] * axis
        lo = self.scalar(start) if start != 0 else ""
        parts.append(f"{lo}:{self.scalar(stop)}")
        self.emit(f"{var} = {merged}[{', '.join(parts)}]", comment)
        self.fresh.add(a.target)  # a region of a new array no other name writes

    def add_into(self, a: Assign, var: str, dead, comment: str) -> bool:
        """``x = t + rest`` as ``t += rest; x = t`` when ``t`` is a whole array this function
        made (a matrix product's result) that nothing reads afterwards: no new array, no
        second pass over memory (the bias of a projection over all time steps)."""
        if not isinstance(a.expr, sp.Add):
            return False
        for term in a.expr.args:
            if (
                isinstance(term, sp.Indexed)
                and occurrence_name(term) in self.fresh
                and occurrence_name(term) in dead
                and tuple(term.indices) == tuple(a.indices)
                and not self.needs_view(term, a.scope)
            ):
                break
        else:
            return False
        rest = a.expr - term
        if not rest.free_symbols or any(
            isinstance(o, sp.Indexed) and set(plain_indices(o)) == set(a.indices)
            for o in occurrences(rest, self.arrays)
        ):
            return False  # a scalar, or a term as large as the result: the plain sum is as fast
        into = self.v(occurrence_name(term))
        text = self.elementwise(rest, a.indices, a.scope)
        self.emit(f"{into} += {text}", comment)
        self.emit(f"{var} = {into}")
        self.fresh.discard(occurrence_name(term))
        self.memo = {k: v for k, v in self.memo.items() if v != into}
        return True

    def lower_contribution(self, c: Contribution, defined: set, shown: sp.Expr | None = None):
        """``shown``: the body for the comment (``c.body`` may read a shared factor)."""
        var = self.var[c.target]
        if self.special and not self.branching:
            plain = self.specialize(c.body)
            if plain is not None:
                rhs = c.body if shown is None else shown
                rhs = rhs if not c.reduce else _Sum(rhs, c.reduce)
                self.branch(
                    self.present(c.body), lambda: self.lower_contribution(c, defined, shown),
                    lambda: self.lower_contribution(
                        dataclasses.replace(c, body=plain), defined, shown
                    ),
                    f"{_lhs_text(c.target, c.lhs)} {'=' if c.first else '+='} {equation_text(rhs)}",
                    self.absent_note(c.body),
                )
                return
        rhs = c.body if shown is None else shown
        rhs = rhs if not c.reduce else _Sum(rhs, c.reduce)
        op = "=" if c.first or c.target in self.tiled else "+="  # a tiled block: assigned
        comment = f"{_lhs_text(c.target, c.lhs)} {op} {equation_text(rhs)}"
        if self.needs_view(c.occurrence, c.scope):
            if not (self.options["gather_adjoint"] and self.gather_affine(c, var, comment)):
                self.scatter_affine(c, var, comment)
            return
        if not c.is_gather:
            body_name = occurrence_name(c.body) if isinstance(c.body, (sp.Indexed, sp.Symbol)) else None
            if (
                c.first
                and not c.reduce
                and body_name in self.d.adjoints.values()
                and occurrence_indices(c.body) == tuple(c.lhs)
            ):
                # the adjoint is the incoming array itself: no copy, a second name
                self.alias[var] = self.v(body_name)
                return
            if c.reduce:
                text = self.reduction("sum", c.body, c.lhs, c.reduce, c.scope)
            else:
                body = c.body
                fused_sum = not c.first and bool(c.lhs) and self.options["fuse"]
                if fused_sum:  # the target and the new term in one statement
                    body = sp.IndexedBase(c.target, real=True)[tuple(c.lhs)] + body
                text = self.elementwise(body, c.lhs, c.scope, into=var, comment=comment)
                if text is None or fused_sum:
                    if text is not None:
                        self.emit(f"{var} = {text}", comment)
                    self.alias.pop(var, None)
                    return
                if c.first:
                    text = self.full(text, c.body, c.lhs, c.scope)
            if c.first:
                self.emit(f"{var} = {text}", comment)
            else:
                self.emit(f"{var} = {self.v(c.target)} + {_paren(text, '+')}", comment)
                self.alias.pop(var, None)
            return
        # a gather's adjoint: compute over the occurrence's own indices, then scatter-add
        frame = ordered(plain_indices(c.occurrence), c.over)
        red = tuple(i for i in c.over if i not in frame)
        if red:
            text = self.reduction("sum", c.body, frame, red, c.scope)
        else:  # np.add.at broadcasts the values against the index arrays
            text = self.elementwise(c.body, frame, c.scope)
        # added in place into an array this function made (see scatters_later), else into zeros
        own = not c.first and self.options["fuse"] and var in self.owned and var not in self.alias
        into = var if (c.first or own) else self.namer.temp()
        if not own:
            self.flags["dtype"] = True
            self.emit(f"{into} = np.zeros({self.shape_of(c.tensor)}, dtype=dtype)")
        first = c.lhs[0]
        if (
            not is_index(first)
            and all(is_index(i) for i in c.lhs[1:])
            and tuple(first.indices) + tuple(c.lhs[1:]) == tuple(frame)
        ):
            where = self.var[occurrence_name(first)]
        else:
            where = f"({', '.join(self.gather_index(c.lhs, frame, c.scope))})"
        if self.options["injective_scatter"] and set(frame) <= {i for i in c.lhs if is_index(i)}:
            # every point of the frame has an index of its own in the target (a row's class,
            # target[n] of row n): no two values meet, so a plain indexed add serves
            op, text = ("-=", text[1:]) if text.startswith("-") and text[1:].isidentifier() else ("+=", text)
            self.emit(f"{into}[{where[1:-1] if where.startswith('(') else where}] {op} {text}", comment)
        else:
            self.emit(f"np.add.at({into}, {where}, {text})", comment)
        if not c.first and not own:
            self.emit(f"{var} = {self.v(c.target)} + {into}")
            self.alias.pop(var, None)

    def index_text(self, expr: sp.Expr, extra: dict) -> str:
        """An integer index expression (hyperparameters, dimensions, loop variables)."""
        names = dict(extra)
        for sym in expr.free_symbols:
            if sym in names:
                continue
            if sym.name in self.spec.hyper:
                self.phase.hyper.add(sym.name)
                names[sym] = self.var[sym.name]
            elif sym.name in self.dim_vars:
                self.phase.dims.add(sym.name)
                names[sym] = self.dim_vars[sym.name]
        return NumpyPrinter(names, set(), self.helpers, self.flags).doprint(expr)

    def scatter_affine(self, c: Contribution, var: str, comment: str):
        """The adjoint of a strided read: values over the occurrence's symbols, added into the
        (padded) array through strided slices, looping over kernel offsets only."""
        occ = c.occurrence
        if self.options["split_reshape"] and self.scatter_split(c, var, comment):
            return
        frame = plain_indices(occ)
        if c.target in self.tiled and var not in self.alias:  # one block, assigned once
            self.scatter_tiled(c, var, comment, frame)
            return
        red, positions, loop, free, simple, offsets, frame = self.scatter_plan(c, frame)
        per_offset = offsets and not red and self.offset_ok(c.body, loop, c.scope)
        loop_syms: dict = {}
        for s in loop:  # one name per index, reused by every loop over it
            if s.name not in self.loop_names:
                self.loop_names[s.name] = self.namer.claim(s.name)
            loop_syms[s] = sp.Symbol(self.loop_names[s.name])  # a value, not an index
        loop_vars = {s: self.loop_names[s.name] for s in loop}
        varies = per_offset and bool(self.covered(c.body) & set(loop) | free_indices(c.body) & set(loop))
        if per_offset and not varies:  # the same values at every offset: computed once
            frame = tuple(s for s in frame if s not in loop)
        vals = None
        layout = None  # the order of the values' axes, when a product gives them its own
        if not varies:
            text = None
            if red and offsets and self.options["scatter_gemm"]:
                frame, text = self.scatter_gemm(c.body, frame, red, loop, c.scope)
                layout = tuple(s for s in frame if s not in loop) if text is not None else None
            if text is not None:  # one product in its own order
                pass
            elif red:
                text = self.reduction("sum", c.body, frame, red, c.scope)
            elif per_offset:
                text = self.elementwise(c.body, frame, c.scope)
            else:
                text = self.full(self.elementwise(c.body, frame, c.scope), c.body, frame, c.scope)
            if text.isidentifier() or (text in self.memo and self.options["share"]):
                vals = self.memo.get(text, text)
                if comment:
                    self.emit(f"# {comment}")
            else:
                vals = self.namer.temp()
                self.emit(f"{vals} = {text}", comment)
                self.memo[text] = vals
        elif comment:
            self.emit(f"# {comment}")
        self.flags["dtype"] = True
        own = not c.first and var in self.owned and var not in self.alias
        into = var if (c.first or own) else self.namer.temp()
        if c.first and c.target in self.regions:  # a slice of a stacked buffer (zeros)
            self.emit(f"{into} = {self.region(c.target)}")
            key = self.regions[c.target]
            group = self.stacked_groups[key]
            self.made[into] = (group["buffer"], group["regions"].index(c.target))
            self.owned.add(into)
        elif c.first or not own:
            self.emit(f"{into} = {self.zeros_in(c.tensor, positions, loop, layout)}")
            self.owned.add(into)
        if not simple:  # general affine map: one scatter-add with index arrays
            arrays = []
            for ix in positions:
                names = {
                    s: self.align(f"np.arange({self.dimvar(c.scope, s)})", (s,), frame)
                    for s in position_symbols(ix)
                }
                arrays.append(self.index_text(ix, names))
            self.emit(f"np.add.at({into}, ({', '.join(arrays)}), {vals})")
        else:
            slices = self.window_slices(c.tensor, positions, loop_vars, c.scope)
            target = f"{into}[{', '.join(slices)}]" if slices else into
            indent = ""
            for s in loop:
                self.emit(f"{indent}for {loop_vars[s]} in range({self.dimvar(c.scope, s)}):")
                indent += "    "
            if varies:  # the values of one offset, computed inside the loop
                start = len(self.phase.lines)
                self.fixed = {s: loop_syms[s] for s in loop}
                try:
                    inner = tuple(s for s in frame if s not in loop)
                    source = self.elementwise(c.body, inner, c.scope)
                finally:
                    self.fixed = {}
                added = self.phase.lines[start:]
                del self.phase.lines[start:]
                for line in added:
                    self.phase.lines.append(Line(indent + line.code, line.comment))
            else:
                vsub = [loop_vars[s] if s in loop_vars else ":" for s in frame]
                while vsub and vsub[-1] == ":":
                    vsub.pop()
                source = f"{vals}[{', '.join(vsub)}]" if vsub else vals
                source = self.align(source, tuple(s for s in frame if s not in loop), tuple(free))
            self.emit(f"{indent}{target} += {source}")
        if not c.first and into != var:
            self.emit(f"{var} = {self.v(c.target)} + {into}")
            self.alias.pop(var, None)
            self.owned.add(var)

    def scatter_tiled(self, c: Contribution, var: str, comment: str, frame: tuple):
        """A contribution that writes one block of an adjoint its contributions tile (see
        tiles()): the block assigned once, ``out=`` its slice where the values allow."""
        occ = c.occurrence
        if c.first:
            self.flags["dtype"] = True
            self.emit(f"{var} = np.empty({self.shape_of(c.tensor)}, dtype=dtype)")
            self.owned.add(var)
        slices = self.window_slices(c.tensor, list(occ.indices), {}, c.scope)
        target = f"{var}[{', '.join(slices)}]"
        text = self.full(self.elementwise(c.body, frame, c.scope), c.body, frame, c.scope)
        free = tuple(s for ix in occ.indices for s in position_symbols(ix))
        held = self.memo.get(text) if self.options["share"] else None
        if held is not None or text.isidentifier() or tuple(frame) != free:
            self.emit(f"{target} = {self.align(held or text, tuple(frame), free)}", comment)
        else:
            self.emit(_assign_into(target, text), comment)
            self.memo[text] = target

    def scatter_plan(self, c: Contribution, frame: tuple):
        """How a window adjoint is added: the summed indices, the positions, the kernel offsets
        looped over, the other symbols, whether each position is a plain slice (else one
        np.add.at), whether the offsets go outermost, and the values' frame."""
        occ = c.occurrence
        red = tuple(i for i in c.over if i not in frame)
        positions = list(occ.indices)
        loop: list = []
        for ix in positions:
            syms = position_symbols(ix)
            if is_affine(ix) and len(syms) > 1:
                terms, _ = affine_terms(ix)
                # h in h*D + d picks a block: loop over the blocks, slice within one; else
                # slice along the output index (i in stride*i + p) and loop over the rest
                blocks = [s for coeff, s in terms if any(isinstance(f, Dim) for f in coeff.free_symbols)]
                inner = [s for s in syms if s not in blocks]
                if blocks and len(inner) == 1:
                    primary = inner[0]
                else:
                    primary = next((s for s in syms if s in c.outs), syms[0])
                loop += [s for s in syms if s != primary and s not in loop]
        free = [s for ix in positions for s in position_symbols(ix) if s not in loop]
        simple = len(free) == len(set(free)) and all(
            not isinstance(ix, sp.Indexed)
            and len([s for s in position_symbols(ix) if s not in loop]) <= 1
            for ix in positions
        )
        offsets = self.options["offset_scatter"] and simple and bool(loop)
        if offsets:
            # the kernel offsets outermost among the window's symbols: each offset's slice of
            # the values is a contiguous block, and a contraction yields them in that order
            rest = [s for s in frame if s not in loop]
            cut = next(
                (k for k, s in enumerate(rest) if any(
                    s in position_symbols(ix) and set(position_symbols(ix)) & set(loop)
                    for ix in positions)),
                len(rest),
            )
            frame = tuple(rest[:cut]) + tuple(s for s in frame if s in loop) + tuple(rest[cut:])
        return red, positions, loop, free, simple, offsets, frame

    def gather_form(self, c: Contribution):
        """The parts of a contribution that :meth:`gather_affine` lowers as a gather, as
        ``(info, pads, slot, const, w, i, a_factors, b_factors, a_idx, rows)``; None when it
        does not have that form."""
        occ, scope = c.occurrence, c.scope
        if not isinstance(occ, sp.Indexed) or c.target in self.regions or ELL in c.over:
            return None
        info = self.tensors[c.tensor]
        pads = self.spec.pads.get(c.tensor, {})
        slot, seen = None, set()
        for p, ix in enumerate(occ.indices):
            if is_index(ix):
                if p in pads or self.spec.index_dims.get((scope, ix)) != info.dims[p] or ix in seen:
                    return None
                seen.add(ix)
            elif isinstance(ix, sp.Indexed) or slot is not None:
                return None
            else:
                slot = p
        if slot is None:
            return None
        terms, const = affine_terms(occ.indices[slot])
        syms = [sym for _, sym in terms]
        if (
            len(terms) != 2
            or any(coeff != 1 for coeff, _ in terms)
            or set(syms) & seen
            or any(is_index(s) for s in const.free_symbols)
        ):
            return None
        if any(occurrence_name(o) in self.argidx for o in occurrences(c.body, self.arrays)):
            return None
        factors = sp.Mul.make_args(c.body)
        # the offset: an index the forward assignment sums over (a kernel offset) first
        for w, i in sorted([syms, syms[::-1]], key=lambda pair: pair[0] in c.outs):
            a_factors = [f for f in factors if w in free_indices(f)]
            a_idx = set().union(*(free_indices(f) for f in a_factors))
            b_factors = [f for f in factors if not free_indices(f) <= a_idx]
            b_idx = set().union(*(free_indices(f) for f in b_factors))
            if a_factors and i in b_idx and w not in b_idx:
                break
        else:
            return None
        a_factors = [f for f in factors if f not in b_factors]
        # one stack of matrix-vector products: nothing summed besides the offsets (a
        # convolution's dx, summed over channels too, keeps the scatter of one matrix
        # product's values: faster there), every index of the adjoint in the window, the band
        # over the window's indices only, and one index (the rows) the band does not carry
        lhs_plain = [ix for ix in occ.indices if is_index(ix)]
        rows = [ix for ix in lhs_plain if ix not in a_idx]
        if c.reduce or not set(lhs_plain) <= b_idx or not a_idx <= set(lhs_plain) | {i, w}:
            return None
        if i not in a_idx:
            rows.append(None)  # the adjoint's own position: the band does not vary along it
        if not rows:
            return None
        return info, pads, slot, const, w, i, a_factors, b_factors, a_idx, rows

    def gather_affine(self, c: Contribution, var: str, comment: str) -> bool:
        """The adjoint of a sliding read ``x[n, i + w + k, d]`` (one position the sum of two
        indices with unit coefficients, every other a plain index) as a gather: with ``s`` the
        position, ``dx[n, s, d] = Sum(A[n, s - w - k, w] * B[n, s - w - k, d], w)``, where A
        is the product of the factors that read ``w`` (and of those over A's indices only),
        B that of the rest, which reads ``i`` but not ``w``. A is computed once and copied
        skewed (the band seen from ``s``: ``A[n, s - w - k, w]``, a small array), B is
        zero-padded along ``i`` and read through a strided window, and one contraction over
        the offsets gives the adjoint (before: one slice-add over the whole adjoint per
        offset). Out-of-range positions read the zero padding. Returns False (nothing
        emitted) when the contribution does not have that form."""
        form = self.gather_form(c)
        if form is None:
            return False
        info, pads, slot, const, w, i, a_factors, b_factors, a_idx, rows = form
        occ, scope = c.occurrence, c.scope
        # sizes: the offsets (W), the read's index (T) and the adjoint's axis (S, padded)
        W = dim_symbol(self.spec.index_dims[(scope, w)])
        T = dim_symbol(self.spec.index_dims[(scope, i)])
        S = dim_symbol(info.dims[slot]) + 2 * pads.get(slot, 0)
        lo, hi = sp.expand(W - 1 + const), sp.expand(S - T - const)
        s_sym, j_sym = sp.Symbol("s", integer=True), sp.Symbol("j", integer=True)
        while {s_sym, j_sym} & (set(c.over) | set(c.reduce)) or s_sym == j_sym:
            s_sym = sp.Symbol(s_sym.name + "_", integer=True)
            j_sym = sp.Symbol(j_sym.name + "_", integer=True)
        names = {w: self.index_text(W, {}), i: self.index_text(T, {})}
        size = {s_sym: self.index_text(sp.expand(S), {}), j_sym: names[w]}
        first, last = self.index_text(lo, {}), self.index_text(hi, {})
        band = sp.Mul(*a_factors).xreplace({i: s_sym - w - const})
        shown = sp.Mul(*b_factors).xreplace({i: s_sym - w - const})
        lhs = tuple(s_sym if p == slot else ix for p, ix in enumerate(occ.indices))
        if comment:
            self.emit(f"# {comment}")
        self.emit(f"# as a gather over {w.name} (zero outside the band):")
        self.emit(
            f"#     {_lhs_text(c.target, lhs)} = "
            f"{equation_text(_Sum(band * shown, (w,) + tuple(c.reduce)))}"
        )

        def made(factors):  # the product of ``factors`` as one array, axes in storage order
            body = sp.Mul(*factors)
            idx = self.storage_order(body, c.over)
            text = self.full(self.elementwise(body, idx, scope), body, idx, scope)
            return (text if text.isidentifier() else self.held(text)), idx

        def padded(src, idx):  # zero-padded along i, lo before and hi after
            widths = ", ".join(f"({first}, {last})" if ix == i else "(0, 0)" for ix in idx)
            widths = f"({widths},)" if len(idx) == 1 else f"({widths})"
            return self.held(f"np.pad({src}, {widths})")

        def shape(idx):
            parts = [size.get(ix) or self.dimvar(scope, ix) for ix in idx]
            return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"

        # A[.., s, j] = A[.., s - W + 1 - k + j, W - 1 - j]: j = W - 1 - w runs the band the
        # way the window below does
        a_var, a_order = made(a_factors)
        if i in a_order:
            ap = padded(a_var, a_order)
            base = [f"{names[w]} - 1 :" if ix == w else ":" for ix in a_order]
            while base[-1] == ":":
                base.pop()
            strides = [
                f"{ap}.strides[{a_order.index(i)}]" if ix == i
                else f"{ap}.strides[{a_order.index(i)}] - {ap}.strides[{p}]" if ix == w
                else f"{ap}.strides[{p}]"
                for p, ix in enumerate(a_order)
            ]
            a_idx_new = tuple(s_sym if ix == i else j_sym if ix == w else ix for ix in a_order)
            a_text = self.held(
                f"np.ascontiguousarray(np.lib.stride_tricks.as_strided({ap}[{', '.join(base)}], "
                f"shape={shape(a_idx_new)}, strides=({', '.join(strides)}), writeable=False))"
            )
        else:
            flip = ", ".join("::-1" if ix == w else ":" for ix in a_order[: a_order.index(w) + 1])
            a_idx_new = tuple(j_sym if ix == w else ix for ix in a_order)
            a_text = self.held(f"{a_var}[{flip}]")
        # B[.., s, .., j] = B[.., s - W + 1 - k + j, ..]: a window of the padded B
        b_var, b_order = made(b_factors)
        bp = padded(b_var, b_order)
        b_idx_new = tuple(s_sym if ix == i else ix for ix in b_order) + (j_sym,)
        strides = [f"{bp}.strides[{p}]" for p in range(len(b_order))]
        strides.append(f"{bp}.strides[{b_order.index(i)}]")
        b_text = self.namer.temp()
        self.emit(
            f"{b_text} = np.lib.stride_tricks.as_strided({bp}, shape={shape(b_idx_new)}, "
            f"strides=({', '.join(strides)}), writeable=False)"
        )
        self._register(b_text)
        # the rows: the last index of the adjoint the band lacks; the others a batch
        row = s_sym if rows[-1] is None else rows[-1]
        result = [ix for ix in lhs if ix != row] + [row]
        perm = [b_idx_new.index(ix) for ix in result + [j_sym]]
        left = b_text if perm == sorted(perm) else f"{b_text}.transpose({', '.join(map(str, perm))})"
        right = self.align(a_text, a_idx_new, tuple(result[:-1]) + (j_sym,))
        text = f"({left} @ {_paren(right, '.')}[..., None])[..., 0]"
        if result != list(lhs):
            text += f".transpose({', '.join(str(result.index(ix)) for ix in lhs)})"
        self.flags["dtype"] = True
        own = not c.first and var in self.owned and var not in self.alias
        if c.first:
            self.emit(f"{var} = {text}")
            self.owned.add(var)
        elif own:
            self.emit(f"{var} += {text}")
        else:
            self.emit(f"{var} = {self.v(c.target)} + {_paren(text, '+')}")
            self.alias.pop(var, None)
            self.owned.add(var)
        return True

    def scatter_split(self, c: Contribution, var: str, comment: str) -> bool:
        """The adjoint of a read ``w[c, h*D + f]`` (see split_view): the values over
        ``(c, h, f)`` added at once into the split of the adjoint's axis (before: one slice-add
        per block). False when the read is no such split."""
        occ = c.occurrence
        probe = self.split_view(occ, c.scope, "_")
        if probe is None:
            return False
        _, frame = probe
        red = tuple(i for i in c.over if i not in frame)
        if red:
            text = self.reduction("sum", c.body, frame, red, c.scope)
        else:
            text = self.full(self.elementwise(c.body, frame, c.scope), c.body, frame, c.scope)
        if text in self.memo and self.options["share"]:
            text = self.memo[text]
        own = not c.first and var in self.owned and var not in self.alias
        into = var if (c.first or own) else self.namer.temp()
        self.flags["dtype"] = True
        if c.first and c.target in self.regions:  # a slice of a stacked buffer (zeros)
            self.emit(f"{into} = {self.region(c.target)}")
            key = self.regions[c.target]
            group = self.stacked_groups[key]
            self.made[into] = (group["buffer"], group["regions"].index(c.target))
        elif c.first or not own:
            self.emit(f"{into} = np.zeros({self.shape_of(c.tensor)}, dtype=dtype)")
        self.owned.add(into)
        target, _ = self.split_view(occ, c.scope, into, write=True)
        blocks = self.namer.temp()
        self.emit(f"{blocks} = {target}", comment)
        written = _written_into(text, blocks) if c.first and into == var else None
        self.emit(written or f"{blocks} += {text}")  # (written: into the zeros, no temporary)
        if not c.first and into != var:
            self.emit(f"{var} = {self.v(c.target)} + {into}")
            self.alias.pop(var, None)
            self.owned.add(var)
        return True

    def tiles(self, backward: list, skip: set) -> set[str]:
        """Adjoints whose contributions (none of them at a position in ``skip``) each write one
        block of the array, with plain positions and no sum, the blocks differing along one
        axis, where they are contiguous and cover it: ``dg[b, j + k*H]`` for k = 0, ..., 3
        over an axis of 4*H."""
        by: dict[str, list] = {}
        for k, c in enumerate(backward):
            by.setdefault(c.target, []).append((k, c))
        out = set()
        for target, kcs in by.items():
            cs = [c for _, c in kcs]
            if (
                len(cs) < 2
                or not cs[0].first
                or any(c.first for c in cs[1:])
                or any(k in skip for k, _ in kcs)
                or target in self.regions
            ):
                continue
            info = self.tensors[cs[0].tensor]
            boxes = []
            for c in cs:
                if (
                    c.reduce
                    or c.tensor != cs[0].tensor
                    or self.spec.pads.get(c.tensor)
                    or not self.needs_view(c.occurrence, c.scope)
                    or len(c.lhs) != len(info.dims)
                ):
                    break
                box = []
                for ix in c.lhs:
                    syms = position_symbols(ix)
                    if len(syms) != 1 or len(set(syms)) != 1:
                        break
                    sym = syms[0]
                    if not is_index(ix):
                        terms, _ = affine_terms(ix)
                        if dict((t, k) for k, t in terms).get(sym) != 1:
                            break
                    start = sp.expand(ix.subs(sym, 0))
                    box.append((start, dim_symbol(self.spec.index_dims[(c.scope, sym)])))
                else:
                    boxes.append(box)
                    continue
                break
            if len(boxes) != len(cs):
                continue
            whole = [(sp.S.Zero, _stacked_size(dname)) for dname in info.dims]
            axes = [p for p in range(len(whole)) if any(b[p] != whole[p] for b in boxes)]
            if len(axes) != 1:
                continue
            a = axes[0]
            spans = [b[a] for b in boxes]
            at, used = sp.S.Zero, set()
            while len(used) < len(spans):
                k = next(
                    (k for k, (s0, _) in enumerate(spans) if k not in used and sp.expand(s0 - at) == 0),
                    None,
                )
                if k is None:
                    break
                used.add(k)
                at = sp.expand(at + spans[k][1])
            if len(used) == len(spans) and sp.expand(at - whole[a][1]) == 0:
                out.add(target)
        return out

    def zeros_in(self, tensor: str, positions: list, loop: list, layout: tuple | None) -> str:
        """A zero array for ``tensor``'s adjoint; with ``layout`` (the order of the values it
        receives, one per position), its memory in that order and its axes transposed back, so
        that every slice-add runs through both arrays in one order (before: the values read
        across rows of the product)."""
        text = f"np.zeros({self.shape_of(tensor)}, dtype=dtype)"
        if layout is None:
            return text
        free = [[s for s in position_symbols(ix) if s not in loop] for ix in positions]
        if any(len(f) != 1 for f in free) or sorted(f[0].name for f in free) != sorted(
            s.name for s in layout
        ):
            return text
        mem = sorted(range(len(positions)), key=lambda p: layout.index(free[p][0]))
        if mem == list(range(len(positions))):
            return text
        parts = self.shape_parts(tensor)
        shape = ", ".join(parts[p] for p in mem)
        if len(positions) == 2:
            return f"np.zeros(({shape}), dtype=dtype).T"
        back = ", ".join(str(mem.index(p)) for p in range(len(positions)))
        return f"np.zeros(({shape}), dtype=dtype).transpose({back})"

    def scatter_gemm(self, body, frame: tuple, red: tuple, loop: list, scope: int):
        """The values a window's adjoint scatters, when they are one matrix product of two
        operands: in the order the product yields them (no transpose of its result), picking
        the orientation that leaves the longest contiguous runs in each kernel offset's slice.
        A convolution's dx values become ``(c, p, q, n, i, j)`` (before: ``n, i, j`` rows of
        the product, whose offset slices read one element per row). Returns the values'
        index order and their source (None: the plain reduction serves)."""
        coeff, operands, rest = self.factor(body, scope)
        if coeff != 1 or rest or len(operands) != 2:
            return frame, None
        (_, ia), (_, ib) = operands
        if any(i in ia and i in ib for i in frame) or set(ia) | set(ib) != set(frame) | set(red):
            return frame, None

        def runs(order):  # indices after the last kernel offset: one contiguous run
            last = max(k for k, s in enumerate(order) if s in loop)
            return len(order) - 1 - last

        best = frame
        for il, ir in ((ia, ib), (ib, ia)):
            order = tuple(i for i in il if i in frame) + tuple(i for i in ir if i in frame)
            if runs(order) > runs(best):
                best = order
        if best == frame:
            return frame, None
        text = self.grouped_matmul(operands, best, scope)
        return (best, text) if text is not None else (frame, None)

    def window_slices(self, tensor: str, positions: list, loop_vars: dict, scope: int) -> list:
        """Slices of ``tensor`` at index ``positions`` whose symbols in ``loop_vars`` are fixed
        (loop variables or constants) and whose others (at most one a position) run over their
        range: ``[:, :, p : p + stride * (OH - 1) + 1 : stride]``; trailing ``:`` dropped."""
        info = self.tensors[tensor] if tensor in self.tensors else self.tensors[self.adjoint_of[tensor]]
        slices = []
        for p, ix in enumerate(positions):
            syms = [s for s in position_symbols(ix) if s not in loop_vars]
            if not syms:
                slices.append(self.index_text(ix, loop_vars))
                continue
            sym = syms[0]
            terms, _ = ([(sp.S.One, ix)], None) if is_index(ix) else affine_terms(ix)
            coeff = dict((t, k) for k, t in terms)[sym]
            start_expr = ix.subs(sym, 0)
            padded = p in self.spec.pads.get(tensor, {})
            if start_expr == 0 and coeff == 1 and not padded and (
                self.spec.index_dims[(scope, sym)] == info.dims[p]
            ):
                slices.append(":")
                continue
            lo = "" if start_expr == 0 else self.index_text(start_expr, loop_vars)
            extent = dim_symbol(self.spec.index_dims[(scope, sym)])
            stop = self.index_text(start_expr + coeff * (extent - 1) + 1, loop_vars)
            step = "" if coeff == 1 else f":{self.index_text(coeff, loop_vars)}"
            slices.append(f"{lo}:{stop}{step}")
        while slices and slices[-1] == ":":
            slices.pop()
        return slices

    def offset_ok(self, expr: sp.Expr, fixed, scope: int) -> bool:
        """Whether ``expr`` can be evaluated with the indices ``fixed`` held at one value each:
        every occurrence reading them is then a plain slice (or an arg-max index test)."""
        fixed = set(fixed)
        for occ in occurrences(expr, self.arrays):
            if not isinstance(occ, sp.Indexed) or not set(plain_indices(occ)) & fixed:
                continue
            name = occurrence_name(occ)
            if name in self.argidx:
                continue
            primal = self.adjoint_of.get(name)
            if name not in self.tensors and (primal is None or self.spec.pads.get(primal)):
                return False  # (an adjoint reads like its tensor, when that is not padded)
            seen: set = set()
            for ix in occ.indices:
                syms = [s for s in position_symbols(ix) if s not in fixed]
                if isinstance(ix, sp.Indexed) or len(syms) > 1 or set(syms) & seen:
                    return False
                seen |= set(syms)
        return True

    def offset_slice(self, occ, scope: int) -> tuple[str, tuple]:
        """An occurrence with the indices of ``self.fixed`` held: a plain slice of its array,
        axes in the order of its remaining symbols."""
        var = self.v(occurrence_name(occ))
        positions = [ix.xreplace(self.fixed) for ix in occ.indices]
        slices = self.window_slices(occurrence_name(occ), positions, {}, scope)
        syms = tuple(s for s in plain_indices(occ) if s not in self.fixed)
        return (f"{var}[{', '.join(slices)}]" if slices else var), syms

    def argmax_test(self, occ, frame: tuple, scope: int) -> str:
        """An arg-max mask held as the flat index of each window's first maximum: the mask at
        a window position is ``index == flat position``."""
        window = self.argidx[occurrence_name(occ)]
        idx = tuple(occ.indices)
        lead, pos = idx[: len(idx) - len(window)], idx[len(idx) - len(window) :]
        flat = None
        for s in pos:
            if s in self.fixed:
                text = self.index_text(self.fixed[s], {})
            else:
                text = self.align(f"np.arange({self.dimvar(scope, s)})", (s,), frame)
            if flat is None:
                flat = text
            else:
                inner = flat if " " not in flat else f"({flat})"
                flat = f"{inner} * {self.dimvar(scope, s)} + {text}"
        return f"({self.align(self.v(occurrence_name(occ)), lead, frame)} == {flat})"

    def offset_max(self, a: Assign) -> bool:
        """Whether ``a`` is a Max over kernel offsets: its reduced indices occur only in affine
        positions of strided reads, each read a plain slice once the offsets are fixed."""
        if a.op != "max" or not self.options["running_max"] or not a.reduce:
            return False
        red = set(a.reduce)
        for occ in occurrences(a.expr, self.arrays):
            for ix in occurrence_indices(occ):
                syms = set(position_symbols(ix))
                if syms & red and not (is_affine(ix) and syms - red):
                    return False
        if red & (free_indices(a.expr) - self.covered(a.expr)):
            return False
        return self.covered(a.expr) >= red and self.offset_ok(a.expr, red, a.scope)

    def running_max(self, a: Assign, mask: Assign | None, comment: str):
        """A Max over kernel offsets as a running maximum over one slice per offset; with
        ``mask``, the flat offset of each window's first maximum is kept (a small integer)."""
        var = self.var[a.target]
        red = a.reduce
        names = {}
        for s in red:
            if s.name not in self.loop_names:
                self.loop_names[s.name] = self.namer.claim(s.name)
            names[s] = sp.Symbol(self.loop_names[s.name])  # a value, not an index
        self.fixed = {s: sp.S.Zero for s in red}
        try:
            first = self.full(self.elementwise(a.expr, a.indices, a.scope), a.expr, a.indices, a.scope)
        finally:
            self.fixed = {}
        if isinstance(a.expr, sp.Indexed) or first.startswith("np.broadcast_to("):
            first = f"{_paren(first, '.')}.copy()"
        self.emit(f"{var} = {first}", comment)
        extents = [self.dimvar(a.scope, s) for s in red]
        count = " * ".join(extents)
        if mask is not None:
            where = self.var[mask.target]
            self.argidx[mask.target] = tuple(red)
            self.emit(
                f"{where} = np.zeros({var}.shape, dtype=np.min_scalar_type({count} - 1))",
                f"{_lhs_text(mask.target, mask.indices[: len(mask.indices) - len(red)])} = the "
                f"flat offset ({', '.join(s.name for s in red)}) of the first maximum",
            )
        if len(red) == 1:
            k = names[red[0]].name
            self.emit(f"for {k} in range(1, {count}):")
        else:
            k = self.namer.claim("k")
            self.emit(f"for {k} in range(1, {count}):")
            targets = ", ".join(names[s].name for s in red)
            if len(red) == 2:
                self.emit(f"    {targets} = divmod({k}, {extents[1]})")
            else:
                self.emit(f"    {targets} = np.unravel_index({k}, ({count.replace(' * ', ', ')}))")
        start = len(self.phase.lines)
        self.fixed = names
        try:
            text = self.full(self.elementwise(a.expr, a.indices, a.scope), a.expr, a.indices, a.scope)
        finally:
            self.fixed = {}
        added = self.phase.lines[start:]
        del self.phase.lines[start:]
        for line in added:
            self.phase.lines.append(Line("    " + line.code, line.comment))
        if mask is None:
            self.emit(f"    np.maximum({var}, {text}, out={var})")
            return
        value, better = self.namer.temp(), self.namer.temp()
        self.emit(f"    {value} = {text}")
        self.emit(f"    {better} = {value} > {var}", "strictly greater: ties keep the first")
        self.emit(f"    np.maximum({var}, {value}, out={var})")
        self.emit(f"    np.copyto({where}, {k}, where={better})")

    def window_matrix(self, operands: list, out: tuple, red: tuple, scope: int) -> list:
        """A strided window contracted as one matrix product (no index of both operands in
        the result) whose occurrence the backward reads again: copied once into a contiguous
        array, its contracted axes and its kept axes each grouped (im2col), contracted here
        with one GEMM and cached for the backward instead of the window's base (before: this
        product copied the window, and the backward's product copied it again). The copy is
        the window's size (kernel size times its base, for a convolution)."""
        if len(operands) != 2:
            return operands
        if not self.reads_back:
            self.reads_back = backward_reads(self.d)
        (_, ia), (_, ib) = operands
        if ELL in ia + ib or len(set(ia)) != len(ia) or len(set(ib)) != len(ib):
            return operands
        contracted = [i for i in ia if i in ib and i in red]
        if (
            not contracted
            or any(i in ib and i in out for i in ia)  # a batch index
            or any(i not in out and i not in contracted for i in ia + ib)
            or not any(i in out for i in ia)
            or not any(i in out for i in ib)
        ):
            return operands
        result = list(operands)
        for k, (var, idx) in enumerate(operands):
            if var not in self.view_occ:
                continue
            occ, key = self.view_occ[var]
            if key not in self.reads_back or key in self.matrices or not _sliding(occ):
                continue
            summed = [i for i in idx if i in contracted]
            kept = [i for i in idx if i not in contracted]
            # the group holding the window's last axis goes last: the copy keeps its rows
            layout = summed + kept if idx[-1] in kept else kept + summed
            name = self.namer.claim(f"{_identifier(occurrence_name(occ))}_cols")
            perm = [idx.index(i) for i in layout]
            self.emit(
                f"{name} = np.ascontiguousarray({var}.transpose({', '.join(map(str, perm))}))",
                f"{equation_text(occ)} copied into one contiguous matrix (im2col), "
                f"kept for the backward",
            )
            self._register(name)
            self.matrices[key] = (name, tuple(layout))
            self.matrix_base[name] = occurrence_name(occ)
            result[k] = (name, tuple(layout))
        return result

    def grouped_matmul(self, operands: list, out: tuple, scope: int) -> str | None:
        """A two-operand contraction as one matrix product over grouped axes, as
        ``np.tensordot`` does but with batch indices: the indices only one operand carries
        merge into its rows (or columns), the contracted ones into one axis, indices of both
        operands and of the result stay a batch. Each operand is reshaped (one copy where its
        axes do not merge, e.g. im2col of a window view); the product is one large GEMM."""
        if len(operands) != 2:
            return None
        (va, ia), (vb, ib) = operands
        if len(set(ia)) != len(ia) or len(set(ib)) != len(ib) or ELL in ia + ib:
            return None
        contracted = [i for i in ia if i in ib and i not in out]
        if not contracted or any(i not in out and not (i in ia and i in ib) for i in ia + ib):
            return None
        batch = [i for i in out if i in ia and i in ib]
        views = {v for v, _ in self.views.values()} - self.splits
        matrices = {v for v, _ in self.matrices.values()}
        # a window copied into a matrix keeps its stored order: its groups follow it
        stored = next((idx for v, idx in operands if v in matrices), None)
        if stored is not None:
            contracted = [i for i in stored if i in contracted]
        best = None
        for (vl, il), (vr, ir) in (((va, ia), (vb, ib)), ((vb, ib), (va, ia))):
            left = [i for i in (il if vl in matrices else out) if i in out and i not in ir]
            right = [i for i in (ir if vr in matrices else out) if i in out and i not in il]
            if not left or not right:
                return None  # matrix-vector products: einsum's own loop serves
            result = batch + left + right
            moved = sum(x != y for x, y in zip(result, out))
            # BLAS reads a large matrix fastest in its stored order (not transposed)
            flips = (vl in matrices and list(il) != left + contracted) + (
                vr in matrices and list(ir) != contracted + right
            )
            if best is None or (flips, moved) < best[0]:
                best = ((flips, moved), vl, il, vr, ir, left, right, result)
        _, vl, il, vr, ir, left, right, result = best
        if not (len(left) > 1 or len(right) > 1 or len(contracted) > 1 or batch):
            return None  # a plain matrix product: the other paths serve
        for v, idx, last in ((vl, il, contracted[-1]), (vr, ir, right[-1])):
            if v in views and idx[-1] != last:
                return None  # its copy would not keep the window's rows whole: einsum's is faster
        a = self._group(vl, il, batch, left, contracted, views, scope)
        b = self._group(vr, ir, batch, contracted, right, views, scope)
        text = f"({a} @ {b})"
        if len(left) > 1 or len(right) > 1:
            dims = ", ".join(self.dimvar(scope, i) for i in result)
            text += f".reshape({dims})"
        if result != list(out):
            perm = [result.index(i) for i in out]
            text += f".transpose({', '.join(map(str, perm))})"
        return text

    def _group(self, var, idx, lead, first, second, views, scope) -> str:
        """``var`` as a stack of (first, second) matrices over ``lead`` (size 1 where it lacks a
        lead index): transposed into that order and reshaped, as ``np.tensordot`` does."""
        present = [i for i in lead if i in idx]
        perm = [idx.index(i) for i in present + first + second]
        if not present and len(idx) > 2 and var not in views and perm != list(range(len(idx))):
            rows, cols = (" * ".join(self.dimvar(scope, i) for i in g) for g in (first, second))
            if list(idx) == second + first:  # stored the other way round: a transposed view
                return f"{var}.reshape({cols}, {rows}).T"
            if idx[-1] in first:  # copied so that the stored last axis stays innermost
                swap = [idx.index(i) for i in second + first]
                copy = f"{var}.transpose({', '.join(map(str, swap))}).reshape({cols}, {rows})"
                return f"{self._copied(copy)}.T"
        text = var
        if perm != list(range(len(idx))):
            text = f"{var}.T" if len(idx) == 2 else f"{var}.transpose({', '.join(map(str, perm))})"
        shape = [self.dimvar(scope, i) if i in idx else "1" for i in lead]
        while shape and shape[0] == "1":
            shape.pop(0)
        shape += [" * ".join(self.dimvar(scope, i) for i in g) for g in (first, second)]
        if len(shape) != len(idx):
            text = f"{_paren(text, '.')}.reshape({', '.join(shape)})"
        if var in views:  # a window view: BLAS needs it copied into rows (im2col)
            text = f"np.ascontiguousarray({text})"
        elif perm != list(range(len(idx))) and ".reshape(" in text:
            return self._copied(text)
        return text

    def _copied(self, text: str) -> str:
        """A transposed copy of an operand (``a.transpose(...).reshape(...)``): made once and
        shared by every product of the function that reads it (switch 'share')."""
        if self.dry or not self.options["share"]:
            return text
        return self.held(text)


class _TempSymbols:
    """An endless iterator of CSE symbols whose names come from the module's namer."""

    def __init__(self, namer: Namer, names: dict, arrays: set):
        self.namer, self.names, self.arrays = namer, names, arrays

    def __iter__(self):
        return self

    def __next__(self):
        sym = sp.Dummy("cse")
        self.names[sym] = self.namer.temp()
        return sym


class _Sum(sp.Expr):
    """Display-only sum for comments."""

    def __new__(cls, body, idx):
        return sp.Expr.__new__(cls, body, sp.Tuple(*idx))

    def _sympystr(self, printer):
        idx = ", ".join(printer._print(i) for i in self.args[1])
        if len(self.args[1]) > 1:
            idx = f"({idx})"
        return f"Sum({printer._print(self.args[0])}, {idx})"


def _sliding(occ) -> bool:
    """Whether a read is a sliding window: a position sums two indices (``stride*i + p``),
    neither of them picking a block (``f + h*D`` only reshapes an axis)."""
    for ix in occ.indices:
        if isinstance(ix, sp.Indexed) or not is_affine(ix) or len(position_symbols(ix)) < 2:
            continue
        terms, _ = affine_terms(ix)
        if not any(any(isinstance(f, Dim) for f in coeff.free_symbols) for coeff, _ in terms):
            return True
    return False


def _in_arithmetic(expr: sp.Expr, symbol: sp.Symbol) -> bool:
    """Whether ``symbol`` occurs in ``expr`` outside comparisons (where integers serve)."""
    if expr == symbol:
        return True
    if isinstance(expr, sp.core.relational.Relational):
        return False
    return any(_in_arithmetic(a, symbol) for a in expr.args)


def _floats(expr: sp.Expr) -> sp.Expr:
    """Non-integer rationals as floats, so that ``1/2 * x`` prints as ``0.5 * x`` (exponents
    stay exact, so ``x**(1/2)`` still prints as ``np.sqrt(x)``)."""
    if expr.is_number and not expr.is_Integer and not expr.has(sp.zoo, sp.nan):
        # numeric constants become Python floats (weak scalars that keep the array's dtype)
        value = expr.evalf(17)
        if value.is_Number:
            return sp.Float(value, 17)
    if expr.is_Mul and not expr.is_number:
        num = sp.Mul(*[a for a in expr.args if a.is_number])
        rest = [_floats(a) for a in expr.args if not a.is_number]
        if num == 1:
            return sp.Mul(*rest)
        return sp.Mul(_floats(num), *rest)
    if expr.is_Pow:
        return sp.Pow(_floats(expr.base), expr.exp)
    if not expr.args or isinstance(expr, (sp.Indexed, sp.Symbol)):
        return expr
    return expr.func(*[_floats(a) for a in expr.args])


def _rhs_of(a: Assign):
    if a.op == "map":
        return a.expr
    if a.op == "sum":
        return _Sum(a.expr, a.reduce)
    return _Max(a.expr, a.reduce)


class _Max(_Sum):
    def _sympystr(self, printer):
        return super()._sympystr(printer).replace("Sum(", "Max(", 1)


def _lhs_text(name: str, idx: tuple) -> str:
    if not idx:
        return name
    return f"{name}[{', '.join(equation_text(i) for i in idx)}]"


def _identifier(name: str) -> str:
    factor, _, base = name.partition("*")
    if base and factor.isdigit():  # "4*H" -> "H_x4"
        return f"{_identifier(base)}_x{factor}"
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return out if out and not out[0].isdigit() else f"d_{out}"


def _paren(text: str, context: str = "*") -> str:
    """Parenthesize ``text`` unless it is a name, a call, a subscript or an attribute chain
    (or, after a ``+``, any arithmetic expression)."""
    depth = 0
    if context == "." and text.startswith("-"):  # -x.max() would negate after the call
        return f"({text})"
    ops = " <>=&|~" if context == "+" else " +-*/@%<>=&|~"
    if context == "+":
        text_ops = text.replace(" + ", "").replace(" - ", "").replace(" * ", "").replace(" / ", "")
        text_ops = text_ops.replace(" @ ", "").replace(" ** ", "")
        if not any(ch in text_ops for ch in " <>=&|~") or text_ops.count(" ") == 0:
            if not any(op in text for op in (" < ", " > ", " == ", " & ", " | ", " if ")):
                return text
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in ops:
            if ch == "-" and text.startswith("-") and text.count("-") == 1 and " " not in text:
                continue
            return f"({text})"
    return text


def _axes(axes: tuple) -> str:
    return str(axes[0]) if len(axes) == 1 else f"({', '.join(str(a) for a in axes)})"


def _letters(symbols) -> dict:
    """Einsum letters: the index's own name where it is one free letter, else an unused one."""
    out: dict = {}
    used: set[str] = set()
    pool = string.ascii_lowercase + string.ascii_uppercase
    for s in symbols:
        if s in out:
            continue
        name = "e" if s == ELL else s.name
        if len(name) == 1 and name in pool and name not in used:
            out[s] = name
            used.add(name)
    for s in symbols:
        if s not in out:
            letter = next(ch for ch in pool if ch not in used)
            out[s] = letter
            used.add(letter)
    return out


def _batched_matmul(operands, out, views=frozenset()):
    """The batched product in whichever operand order needs no transpose of the result."""
    first = _batched_matmul_ordered(operands, out, views)
    if first is not None and first.endswith(")") and ".transpose(" in first.rsplit(")", 2)[-2:][0]:
        second = _batched_matmul_ordered(operands[::-1], out, views)
        if second is not None and second.count(".transpose(") < first.count(".transpose("):
            return second
    return first


def _batched_matmul_ordered(operands, out, views=frozenset()):
    """``a @ b`` over stacked matrices when the contraction is a batch of matrix products:
    batch indices in both operands and the result, one contracted index, at most one free
    index on each side (attention's scores and weighted sums)."""
    if len(operands) != 2:
        return None
    (va, ia), (vb, ib) = operands
    batch = [i for i in out if i in ia and i in ib]
    contracted = [i for i in ia if i in ib and i not in out]
    fa = [i for i in ia if i not in ib]
    fb = [i for i in ib if i not in ia]
    if not batch or len(contracted) != 1 or len(fa) != 1 or len(fb) != 1:
        return None  # batched dot products and matrix-vector products: einsum's loop is faster
    if any(i not in out for i in fa + fb) or set(out) != set(batch + fa + fb):
        return None
    c = contracted[0]

    def arrange(var, idx, order):
        perm = [idx.index(i) for i in order]
        if perm == list(range(len(idx))):
            return var
        return f"{var}.transpose({', '.join(map(str, perm))})"

    left = arrange(va, ia, batch + fa + [c])
    right = arrange(vb, ib, batch + [c] + fb)
    # NumPy multiplies stacks of strided windows without BLAS: copy those first
    if va in views:
        left = f"np.ascontiguousarray({left})"
    if vb in views:
        right = f"np.ascontiguousarray({right})"
    if not fa:
        left += "[..., None, :]"
    if not fb:
        right += "[..., None]"
    text = f"({left} @ {right})"
    if not fa and not fb:
        text += "[..., 0, 0]"
    elif not fa:
        text += "[..., 0, :]"
    elif not fb:
        text += "[..., 0]"
    result = batch + fa + fb
    if result != list(out):
        perm = [result.index(i) for i in out]
        text += f".transpose({', '.join(map(str, perm))})"
    return text


def _matmul(operands, out):
    """``a @ b`` (with ``.T`` where needed) when the contraction is a plain matrix product."""
    if len(operands) != 2:
        return None
    (va, ia), (vb, ib) = operands
    if len(ia) > 2 or len(ib) > 2 or len(set(ia) & set(ib) & set(out)):
        return None
    common = [i for i in ia if i in ib]
    if len(common) != 1:
        return None
    c = common[0]
    fa = [i for i in ia if i != c]
    fb = [i for i in ib if i != c]
    if tuple(fa + fb) != tuple(out) and tuple(fb + fa) != tuple(out):
        return None
    if any(i not in out for i in fa + fb):
        return None

    def left(v, idx, free):  # as the left factor: (free, c)
        return v if not free or idx[-1] == c else f"{v}.T"

    def right(v, idx, free):  # as the right factor: (c, free)
        return v if not free or idx[0] == c else f"{v}.T"

    if tuple(fa + fb) == tuple(out):
        return f"{left(va, ia, fa)} @ {right(vb, ib, fb)}"
    return f"{left(vb, ib, fb)} @ {right(va, ia, fa)}"


#: merge_terms leaves backward programs of more contributions than this as they are, and
#: substitutes adjoints of at most this many operations into bodies of at most this many
#: (sums of up to 4x that)
_MERGE_LIMIT = 32


def _ops(expr) -> int:
    """The number of operations in ``expr``, counted up to the limit at most."""
    n = 0
    for node in sp.preorder_traversal(expr):
        n += bool(node.args)
        if n > 4 * _MERGE_LIMIT:
            break
    return n


def _factored(terms: list, frame: tuple) -> sp.Expr:
    """The sum of ``terms`` with the factors every term shares that span the whole ``frame``
    (full-size arrays) and the terms' common rational factor taken out: ``dy*a/2 + dy*b/2`` as
    ``dy*(a + b)/2``. (Smaller shared factors stay: a fused statement applies them with the
    other small operands at no extra pass.)"""
    full = set(frame)
    args = [sp.Mul.make_args(t) for t in terms]
    common = []
    for f in args[0]:
        if full and set(free_indices(f)) >= full and all(f in a for a in args[1:]):
            common.append(f)
    rest = []
    for a in args:
        a = list(a)
        for f in common:
            a.remove(f)
        rest.append(sp.Mul(*a))
    total = sp.Add(*rest)
    content, factored = total.primitive()

    def scalings(expr):  # the terms scaled by a number (a multiply each, a pass where alone)
        return sum(
            abs(sp.Mul(*[f for f in sp.Mul.make_args(t) if f.is_number])) != 1
            for t in sp.Add.make_args(expr)
        )

    if scalings(factored) + (abs(content) != 1) > scalings(total):  # t + c*u/2, not (2*t + c*u)/2
        content, factored = 1, total
    return sp.Mul(content, *common, factored)


#: The switch of each pass of the derive, lower and schedule stages, with its default (the
#: table and what each pass does: :mod:`symdl.passes`); ``lower(d, {"matmul": False})``
#: switches one off, so the tests can compare the fast path with the plain one.
OPTIMIZATIONS = defaults(LOWERING)


def lower(derivation: Derivation, options: dict | None = None, keep=()) -> Lowered:
    """Lower a derivation to NumPy statements (``options``: see OPTIMIZATIONS). ``keep``:
    adjoints whose final arrays the caller reads besides the gradients (Lowered.adjoint_vars),
    never overwritten by a fused statement."""
    options = resolve(options, OPTIMIZATIONS)
    try:
        try:
            return _lower(derivation, options, keep)
        except _Unspecialized:  # a statement the branches do not cover: the general path only
            return _lower(derivation, {**(options or {}), "specialize": False}, keep)
    except LowerError as err:
        raise err.with_context(f"layer {derivation.spec.name!r}") from None


def pass_effects(derivation: Derivation) -> list[tuple]:
    """What each pass of the derive, lower and schedule stages changes in ``derivation``'s
    lowering: ``(pass, on, changed, (forward, backward) lines with the pass on, the same with
    it off)`` in pipeline order, each pass flipped alone from the switches in effect."""
    from .passes import passes

    def counts(low: Lowered) -> tuple[int, int]:
        return tuple(
            sum(1 + line.code.count("\n") for line in lines if line.code.strip())
            for lines in (low.forward, low.backward)
        )

    base = lower(derivation)
    now = counts(base)
    out = []
    for p in passes(LOWERING):
        on = OPTIMIZATIONS[p.name]
        flipped = lower(derivation, {p.name: not on})
        same = [ln.code for ln in flipped.forward + flipped.backward] == [
            ln.code for ln in base.forward + base.backward
        ]
        other = now if same else counts(flipped)
        out.append((p, on, not same, now if on else other, other if on else now))
    return out


def _lower(d: Derivation, options: dict | None = None, keep=()) -> Lowered:
    """The pipeline of one layer: the derive stage's rewrites, the forward and the backward
    lowered, the gradients returned, then the schedule and the module description."""
    spec = d.spec
    d = _derive_stage(d, {**OPTIMIZATIONS, **(options or {})}, keep)
    lw = Lowerer(d, options)
    fwd = _forward_phase(lw, d)
    forward_needs_dtype = lw.flags["dtype"]
    d, same = _backward_phase(lw, d, keep)
    grads = _gradients(lw, d, same)
    bwd = lw.phase
    for name in lw.special:  # None on the plain path: read only inside the branches
        pattern = re.compile(rf"\b{re.escape(lw.var[name])}\b")
        if any(pattern.search(ln.code) and ln.branches is None for ln in fwd.lines + bwd.lines):
            raise _Unspecialized(name)
    for o in spec.outputs:
        bwd.dims.update(d.tensors[o].dims)
    for n in spec.args:
        bwd.dims.update(d.tensors[n].dims)
    backward_needs_dtype = lw.flags["dtype"]
    return _assemble(lw, d, fwd, bwd, grads, keep, forward_needs_dtype or backward_needs_dtype)


def _assemble(lw, d, fwd, bwd, grads, keep, needs_dtype) -> Lowered:
    """What is cached, the fused and blocked schedule of both functions, and the module
    description."""
    spec = d.spec

    def info(n):
        t = d.tensors[n]
        return ArgInfo(n, lw.var[n], t.kind, t.dims, t.role)

    has_ell = any("..." in d.tensors[n].dims for n in list(spec.args) + list(spec.consts))
    cache = [(n, lw.var[n]) for n in d.cached]
    if lw.matrices:  # windows kept as matrices: their bases only where the backward reads them
        code = "\n".join(ln.code for ln in bwd.lines if not ln.code.lstrip().startswith("#"))
        code += "\n" + "\n".join(text for _, text in grads)

        def read(var):
            return re.search(rf"\b{re.escape(var)}\b", code) is not None

        bases = set(lw.matrix_base.values())
        cache = [(n, v) for n, v in cache if n not in bases or n in spec.keep or read(v)]
        cache += [(v, v) for v, _ in lw.matrices.values() if read(v)]
    cache += [(n, lw.var[n]) for n in spec.hyper if n in bwd.hyper]
    if lw.options["fuse"]:  # write into dead buffers: never cached, returned or caller-owned
        kept = {v for _, v in cache} | {lw.var[o] for o in spec.outputs}
        finish(fwd.lines, kept, lw.shapes, lw.options["temporary_slices"])
        returned = {w for _, text in grads for w in re.findall(r"[A-Za-z_]\w*", text)}
        returned |= {lw.var[d.adjoints[o]] for o in spec.outputs} | {lw.v(a) for a in keep}
        finish(bwd.lines, returned, lw.shapes, lw.options["temporary_slices"])
        # long chains over large arrays: block by block in cache (after the buffers are chosen)
        hoist = lw.options["hoist"]
        if lw.options["blocked"] and (block(fwd.lines, hoist) | block(bwd.lines, hoist)):
            lw.helpers.add("_cache_blocks")
            code = "\n".join(ln.code for ln in fwd.lines + bwd.lines) + str(grads)
            if "_sigmoid(" not in code:  # (its passes written out in the blocks)
                lw.helpers.discard("_sigmoid")
    dims_order = [x for x in spec.dims]
    return Lowered(
        derivation=d,
        args=[info(n) for n in spec.args],
        consts=[info(n) for n in spec.consts],
        hyper=[(n, lw.var[n], v) for n, v in spec.hyper.items()],
        outputs=[(o, lw.var[o], d.tensors[o].dims) for o in spec.outputs],
        dim_vars=lw.dim_vars,
        forward=fwd.lines,
        backward=bwd.lines,
        forward_dims=[x for x in dims_order if x in fwd.dims],
        backward_dims=[x for x in dims_order if x in bwd.dims],
        cache=cache,
        grads=grads,
        dout_vars=[lw.var[d.adjoints[o]] for o in spec.outputs],
        helpers=set(lw.helpers),
        needs_dtype=needs_dtype,
        has_ell=has_ell,
        index_ranges=dict(spec.gathers),
        deferred=set(lw.deferred),
        adjoint_vars={c.target: lw.v(c.target) for c in d.backward},
        tensor_vars={n: lw.var[n] for n in d.tensors},
    )



def _derive_stage(d: Derivation, options: dict, keep=()) -> Derivation:
    """The passes of the derive stage that rewrite the derivation as a whole (see
    :mod:`symdl.passes`): cached values in the form the backward reads them, then the backward
    through later forward values."""
    if options["affine_cache"]:
        d = cache_affine(d)
    if options["output_reuse"]:
        d = reuse_outputs(d, keep)
    return d


def _forward_phase(lw: Lowerer, d: Derivation) -> _Phase:
    """The forward's statements, each assignment lowered knowing which tensors are dead after
    it."""
    spec = d.spec
    lw.phase = _Phase()
    live = set(spec.outputs) | set(d.cached) | set(spec.args) | set(spec.consts)
    dead_after = []
    for a in reversed(d.forward):
        dead_after.append(frozenset(set(d.tensors) - live))
        live |= {occurrence_name(o) for o in occurrences(a.expr, d.tensors)}
    if lw.options["stack_products"]:
        lw.stacked_products(d.forward)
    if lw.options["specialize"]:
        lw.find_special()
    for a, dead in zip(d.forward, reversed(dead_after)):
        lw.lower_assign(a, dead)
    fwd = lw.phase
    for o in spec.outputs:
        fwd.dims.update(d.tensors[o].dims)

    return fwd


def _backward_phase(lw: Lowerer, d: Derivation, keep=()) -> tuple[Derivation, dict]:
    """The backward's statements: contributions merged, shared factors and duplicate adjoints
    found, stacked and tiled adjoints, scatters moved later; the derivation as lowered and the
    duplicate adjoints (name -> the adjoint it equals)."""
    lw.phase = _Phase()
    lw.in_forward = False
    lw.views = {}
    lw.view_occ = {}
    lw.splits = set()
    lw.memo = {}
    lw.owned = set()
    lw.flags["dtype"] = False
    if lw.options["merge_terms"] and lw.options["fuse"]:  # (sums that fused statements apply)
        d = dataclasses.replace(d, backward=lw.merged_terms(d, keep))
        lw.d = d
    defined: set[str] = set()
    same = _same_adjoints(d) if lw.options["same_adjoint"] else {}
    shared_body: dict[int, sp.Expr] = {}
    last = {c.target: k for k, c in enumerate(d.backward)}
    complete = {}  # the position after which each duplicate's original holds its final value
    for dup, orig in same.items():
        complete.setdefault(last[orig], []).append(dup)
    common = _common_factors(d, same) if lw.options["common_factor"] else {}
    # (a scatter moves later only where no shared factor or duplicate adjoint is involved)
    frozen = set(common) | {u for _, _, users in common.values() for u in users}
    frozen |= {k for k, c in enumerate(d.backward) if c.target in same or c.target in same.values()}
    stacked = lw.stacked_adjoints(d, frozen, same) if lw.stacked_groups else {}
    frozen |= set(stacked)
    if lw.options["tile"]:
        skip = set(stacked) | {k for k, c in enumerate(d.backward) if c.target in same}
        lw.tiled = lw.tiles(d.backward, skip)
    order = lw.scatters_later(d.backward, frozen) if lw.options["fuse"] else enumerate(d.backward)
    for k, c in order:
        if k in stacked:  # a stacked product's backward, as one product
            if stacked[k] is not None:
                lw.stacked_contribution(*stacked[k], defined)
            continue
        if c.target not in same:
            if k in common:  # the factor several contributions share, computed once
                factor, idx, users = common[k]
                tmp = lw.namer.temp()
                text = lw.full(lw.elementwise(factor, idx, c.scope), factor, idx, c.scope)
                lw.emit(
                    f"{tmp} = {text}",
                    f"{_lhs_text(tmp, idx)} = {equation_text(factor)}, a factor of the "
                    f"{len(users)} contributions below",
                )
                lw._register(tmp)
                ref = sp.IndexedBase(tmp, real=True)[idx] if idx else sp.Symbol(tmp, real=True)
                for u in users:
                    body = d.backward[u].body
                    rest = [f for f in sp.Mul.make_args(body)]
                    for f in sp.Mul.make_args(factor):
                        rest.remove(f)
                    shared_body[u] = sp.Mul(ref, *rest)
            if k in shared_body:
                lw.lower_contribution(
                    dataclasses.replace(c, body=shared_body[k]), defined, shown=c.body
                )
            else:
                lw.lower_contribution(c, defined)
        for dup in complete.get(k, ()):  # the same array under the duplicate's name
            lw.alias[lw.var[dup]] = lw.v(same[dup])
    return d, same


def _gradients(lw: Lowerer, d: Derivation, same: dict) -> list:
    """``(argument, text)`` of each gradient returned: zeros where none flows, a copy where two
    arguments share one array, padded axes cropped back."""
    spec = d.spec
    grads = []
    returned: set[str] = set()
    for n in spec.args:
        adj = d.grads[n]
        if adj is None:
            lw.flags["dtype"] = True
            grads.append((n, f"np.zeros({lw.shape_of(n)}, dtype=dtype)"))
        else:
            text = lw.v(adj)
            if text in returned and (adj in same or adj in same.values()):  # one array each
                text = f"{text}.copy()"
            returned.add(text)
            pads = spec.pads.get(n, {})
            if pads:
                dims = d.tensors[n].dims
                parts = []
                for p, dname in enumerate(dims):
                    if p in pads:
                        w = lw.scalar(pads[p])
                        parts.append(f"{w}:{w} + {lw.dim_vars[dname]}")
                        lw.phase.dims.add(dname)
                    else:
                        parts.append(":")
                while parts and parts[-1] == ":":
                    parts.pop()
                text = f"{text}[{', '.join(parts)}]"
            grads.append((n, text))
    return grads

def _ordered_product(text: str, out: str) -> str | None:
    """``(a @ b).transpose(...)`` (a stack of matrix products, its result axes permuted) as
    ``np.matmul(a, b, out=...)`` writing through the permuted view of ``out``, an array in the
    result's own order; None for any other text."""
    if not re.fullmatch(r"\(.* @ .*\)\.transpose\([\d, ]+\)", text):
        return None
    return _written_into(text, out)


def _written_into(text: str, out: str) -> str | None:
    """``text`` (a product) as a call that writes its result into ``out``: ``(a @ b)`` as
    ``np.matmul(a, b, out=out)``, its transpose through the transposed ``out``, an einsum with
    ``out=``; None for anything else."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    perm = None
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "transpose" and not node.keywords
        and all(isinstance(a, ast.Constant) for a in node.args)
    ):
        perm = [a.value for a in node.args]
        node = node.func.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
        target = out
        if perm is not None:
            back = sorted(range(len(perm)), key=lambda p: perm[p])
            target = f"{out}.transpose({', '.join(map(str, back))})"
        return f"np.matmul({ast.unparse(node.left)}, {ast.unparse(node.right)}, out={target})"
    if (
        perm is None and isinstance(node, ast.Call) and ast.unparse(node.func) == "np.einsum"
        and not any(k.arg == "out" for k in node.keywords)
    ):
        return f"{text[:-1]}, out={out})"
    return None


class _Unspecialized(Exception):
    """A specialized tensor read outside the branches (see Lowerer.find_special)."""


def _number_text(value: sp.Expr) -> str:
    """A constant as written in a comment: 1.0 as 1."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _copy(value):
    """A shallow copy of a piece of lowering state (dict or set)."""
    return type(value)(value)


def _assign_into(target: str, text: str) -> str:
    """``target = text`` with the last operation of ``text`` writing into ``target``."""
    return written_into(ast.parse(text, mode="eval").body, target) or f"{target} = {text}"


def _stacked_size(dname: str) -> sp.Expr:
    """The size of dimension ``dname``: ``"3*E"`` is three times E."""
    factor, _, base = dname.partition("*")
    if base and factor.isdigit():
        return int(factor) * dim_symbol(base)
    return dim_symbol(dname)


def _affine_rank(const: sp.Expr, members: list) -> int:
    """The place of slice start ``const`` among the members' starts (symbolic: by how many
    starts it exceeds, a positive difference meaning larger)."""
    return sum(1 for m in members if sp.simplify(const - m[0]).is_positive)


def _fresh(text: str) -> bool:
    """Whether the code ``text`` makes a new array: a matrix product, or an einsum whose
    operands repeat no index (a repeated one can return a view of its operand)."""
    if re.fullmatch(r"[\w.]+ @ [\w.]+", text):
        return True
    # a grouped product: (a @ b), its result reshaped and transposed (views of the new array)
    if text.startswith("("):
        depth = 0
        for k, ch in enumerate(text):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        rest = text[k + 1 :]
        if " @ " in text[: k + 1] and re.fullmatch(
            r"(\.reshape\([\w *,]+\))?(\.transpose\([\d, ]+\))?", rest
        ):
            return True
    m = re.fullmatch(r'np\.einsum\("([a-zA-Z,]+)->([a-zA-Z]*)", [\w.,= ]+\)', text)
    if m is None:
        return False
    terms = m.group(1).split(",")
    return len(terms) >= 2 and all(len(set(t)) == len(t) for t in terms)


def _common_factors(d: Derivation, skipped: dict) -> dict[int, tuple]:
    """Products that several contributions of one forward assignment share, beyond the
    adjoint itself: ``dn * (1 - n**2)`` for the three arguments of GRU's ``n = tanh(...)``.
    Position of the first contribution -> (factor, its indices, positions of the users)."""
    groups: dict[tuple, list[int]] = {}
    for k, c in enumerate(d.backward):
        if c.target not in skipped:
            groups.setdefault((c.source, c.scope), []).append(k)
    out = {}
    for (_, _), ks in groups.items():
        if len(ks) < 2:
            continue
        factors = None
        for k in ks:
            fs = list(sp.Mul.make_args(d.backward[k].body))
            if factors is None:
                factors = fs
            else:
                keep = []
                for f in factors:
                    if f in fs:
                        fs.remove(f)
                        keep.append(f)
                factors = keep
        factors = [f for f in factors or [] if not f.is_number]
        arrays = set(d.tensors) | set(d.adjoints.values())
        big = [f for f in factors if not isinstance(f, (sp.Indexed, sp.Symbol))]
        if len(factors) < 2 or not big or not all(occurrences(f, arrays) for f in factors):
            continue  # a single factor (the adjoint) costs nothing to read again
        bodies = {d.backward[k].body for k in ks}
        if len(bodies) == 1:
            continue  # identical values: shared already
        factor = sp.Mul(*factors)
        c = d.backward[ks[0]]
        idx = ordered(free_indices(factor), c.over)
        out[ks[0]] = (factor, idx, ks)
    return out


def _same_adjoints(d: Derivation) -> dict[str, str]:
    """Adjoints built by exactly the same contributions (same index lists, bodies and sums) as
    an earlier one, mapped to that one: an LSTM's ``dgi`` and ``dgh`` (both gate projections
    feed the same pre-activations) are one array, computed once."""
    by_target: dict[str, list] = {}
    for c in d.backward:
        by_target.setdefault(c.target, []).append(c)
    outputs = {d.adjoints[o] for o in d.spec.outputs}
    seen: dict = {}
    same: dict[str, str] = {}
    for target, cs in by_target.items():
        tensor = cs[0].tensor
        info = d.tensors[tensor]
        if target in outputs or tensor in d.spec.pads:
            continue
        key = (
            info.dims,
            tuple(
                (c.lhs, c.body, c.reduce, c.over, c.scope, c.first, c.is_gather) for c in cs
            ),
        )
        if key in seen:
            same[target] = seen[key]
        else:
            seen[key] = target
    return same
