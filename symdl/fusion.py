"""Fused elementwise statements: fewer passes over memory and fewer temporaries.

A full-size elementwise statement such as ``dx = dy * y * (1 - y)`` evaluates, in plain NumPy,
one operator at a time, each allocating a fresh full-size array. :class:`Chain` emits it instead
as a chain of ufunc calls into one buffer::

    dx = 1 - y
    dx *= dy
    dx *= y

* Operands that do not span the statement's frame (``rstd[:, None]``, ``weight``, scalars) are
  multiplied (or added) together first, so the big array is touched once per group of them:
  ``dxc = dy * (rstd * weight)[:, None]`` rather than twice.
* A product already computed by an earlier statement (a shared contraction operand such as
  ``t4 = dy * rstd[:, None]``) is started from instead of recomputed.
* A buffer whose value is dead after the statement (computed earlier in the same function by
  such a chain, read by no later statement, not cached, not returned, not viewed by another
  name) is written in place instead of allocating: :func:`finish` decides that once every
  statement of the function is known. Arrays the caller owns (arguments, incoming gradients)
  and cached arrays are never written.
"""

from __future__ import annotations

import ast
import re

import sympy as sp

from .functions import sigmoid

#: Functions with a NumPy ufunc that can write into its argument's buffer.
UFUNCS = {
    sp.exp: "np.exp",
    sp.log: "np.log",
    sp.tanh: "np.tanh",
    sp.sin: "np.sin",
    sp.cos: "np.cos",
    sp.Abs: "np.abs",
}


class Chain:
    """Plans elementwise expressions over one index frame as chains of in-place ufunc calls.

    ``names`` maps each operand symbol to its source (aligned to the frame), ``covers`` to the
    frame indices it varies over; ``known`` maps the source of a product computed earlier
    (``"dy * rstd[:, None]"``) to the temporary holding it; ``temp`` makes a fresh name."""

    def __init__(self, printer, names, covers, frame, temp, known, integers=frozenset(), shape=None):
        self.printer = printer
        self.shape = shape  # the result's shape, as dimension names (buffers of one shape swap)
        self.integers = set(integers)  # operands that may hold integers: no in-place float ops
        self.names = names
        self.covers = dict(covers)
        self.full = frozenset(frame)
        self.frame = tuple(frame)
        self.temp = temp
        self.known = known
        self.temps: list[str] = []  # names claimed for intermediate buffers, reused per render
        # a two-way Piecewise as its full-size branch's buffer with the other value written
        # where the condition says (np.copyto(buf, v, where=...)): no np.where allocating
        self.masked = True

    # ---- classification ----------------------------------------------------------------------
    def define(self, sym, expr):
        """Register a CSE symbol standing for ``expr``."""
        self.covers[sym] = self.cover(expr)

    def cover(self, expr) -> frozenset:
        out = frozenset()
        for s in expr.free_symbols:
            out |= self.covers.get(s, frozenset())
        return out

    def big(self, expr) -> bool:
        return bool(self.full) and self.cover(expr) >= self.full

    def leaf(self, expr) -> bool:
        return isinstance(expr, sp.Symbol) and expr in self.names

    def text(self, expr) -> str:
        return self.printer.doprint(expr)

    # ---- planning ----------------------------------------------------------------------------
    def fusable(self, expr) -> bool:
        """Whether ``expr`` is a full-size computation (not a lone operand)."""
        return self.big(expr) and not self.leaf(expr)

    def plan(self, expr, dest: str, reusable=frozenset(), spares=()):
        """Statements computing ``expr`` into ``dest`` (a fresh name, or a reused dead buffer),
        with ``fresh`` telling whether ``dest`` ends up holding an array of its own; None when
        the expression is not a full-size computation of several steps. ``reusable``: operands
        whose buffers are dead after the statement; ``spares``: dead buffers of the result's
        shape, which allocating operations write into instead (``out=``)."""
        if not self.fusable(expr):
            return None
        counts: dict = {}
        for s in sp.preorder_traversal(expr):
            if isinstance(s, sp.Symbol):
                counts[s] = counts.get(s, 0) + 1
        # a buffer may be overwritten only where the expression reads it once
        self.reusable_names = set(reusable)
        self.reusable = {
            s for s in expr.free_symbols
            if self.leaf(s) and self.names[s] in reusable and counts.get(s) == 1
        }
        self.lines: list[str] = []
        self.fresh = True
        self.ntemp = 0
        mentioned = any(
            re.search(rf"\b{re.escape(dest)}\b", self.names[s]) for s in expr.free_symbols if s in self.names
        )
        self.spares, self.taken, self.work = list(spares), set(), None
        buf = self.into(expr, _WORK)  # the result's buffer, named once known
        work = self.work or (self.new_temp() if mentioned else dest)
        self.lines = [re.sub(rf"\b{_WORK}\b", work, line) for line in self.lines]
        buf = work if buf == _WORK else buf
        if buf != dest:
            self.lines.append(f"{dest} = {buf}")
        return self.lines, self.fresh

    def take_spare(self) -> str | None:
        if not self.spares:
            return None
        self.taken.add(self.spares[0])
        return self.spares.pop(0)

    def new_temp(self) -> str:
        spare = self.take_spare()
        if spare is not None:
            return spare
        if self.ntemp == len(self.temps):
            self.temps.append(self.temp())
        name = self.temps[self.ntemp]
        self.ntemp += 1
        return name

    def emit(self, line: str):
        self.lines.append(line)

    def alloc(self, dest: str, text: str, call: str):
        """``dest = text``, or ``call`` writing into ``dest`` when that is the spare buffer."""
        if dest == _WORK and self.work is None and self.spares:
            self.work = self.take_spare()
        if dest in self.taken or (dest == _WORK and self.work is not None):
            self.emit(f"{call[:-1]}, out={dest})")
        else:
            self.emit(f"{dest} = {text}")

    def into(self, node, dest: str) -> str:
        """Compute ``node`` (full-size) into a fresh buffer ``dest`` (or a reusable operand's);
        return the name of the buffer holding the result."""
        if self.leaf(node) or not self.big(node):
            self.emit(f"{dest} = {self.text(node)}")
            self.fresh = False
            return dest
        if self.integer(node):
            return self.fallback(node, dest)
        if node.is_Add or node.is_Mul:
            return self.nary(node, dest)
        if node.is_Pow and self.big(node.base) and not self.big(node.exp):
            fn = {2: "np.square", sp.Rational(1, 2): "np.sqrt", -1: None}.get(node.exp, False)
            if fn is False:
                return self.fallback(node, dest)
            if fn is None:  # 1 / base
                if self.leaf(node.base):
                    base = self.text(node.base)
                    self.alloc(dest, f"1 / {base}", f"np.divide(1, {base})")
                    return dest
                buf = self.into(node.base, dest)
                self.emit(f"np.divide(1, {buf}, out={buf})")
                return buf
            return self.unary(fn, node.base, dest)
        if isinstance(node, sp.Function) and len(node.args) == 1 and self.big(node.args[0]):
            fn = UFUNCS.get(node.func)
            if node.func == sigmoid:
                self.printer.helpers.add("_sigmoid")
                fn = "_sigmoid"
            if fn is not None:
                return self.unary(fn, node.args[0], dest)
        if isinstance(node, sp.Piecewise):
            buf = self.masked_into(node, dest)
            if buf is not None:
                return buf
        return self.fallback(node, dest)

    def masked_into(self, node, dest: str) -> str | None:
        """``Piecewise((a, c), (b, True))`` with ``a`` (or ``b``) full-size and computed into a
        buffer of its own (or a dead operand's): that buffer, the other value copied into it
        where the condition says it applies. None (nothing emitted) when it does not serve:
        more branches, a condition that is no array, or a full-size branch that is a live
        operand (np.where makes its one copy then)."""
        if not self.masked or len(node.args) != 2 or node.args[1].cond != sp.true:
            return None
        (a, cond), (b, _) = node.args
        if not any(self.cover(s) for s in cond.free_symbols):  # a scalar test: no array mask
            return None

        def owned(x):  # a buffer the chain may write: computed here, or a dead operand's
            return self.big(x) and (not self.leaf(x) or x in self.reusable)

        if owned(a):
            big, other, test = a, b, f"~{_wrap(self.text(cond))}"
        elif owned(b):
            big, other, test = b, a, _bare(self.text(cond))
        else:
            return None
        if self.leaf(big):
            self.reusable.discard(big)
            buf = self.names[big]
        else:
            buf = self.into(big, dest)
        if self.big(other) and not self.leaf(other):
            value = self.into(other, self.new_temp())
        else:
            value = _bare(self.text(other))
        self.emit(f"np.copyto({buf}, {value}, where={test})")
        return buf

    def integer(self, node) -> bool:
        """Whether an operand may be an integer array (in-place float ops would fail)."""
        return bool(node.free_symbols & self.integers)

    def fallback(self, node, dest: str) -> str:
        text = self.text(node)
        self.emit(f"{dest} = {text}")
        if _maybe_view(text):
            self.fresh = False
        return dest

    def unary(self, fn: str, arg, dest: str) -> str:
        if self.leaf(arg):
            if arg in self.reusable:
                self.reusable.discard(arg)
                name = self.names[arg]
                self.emit(f"{fn}({name}, out={name})")
                return name
            self.alloc(dest, f"{fn}({self.text(arg)})", f"{fn}({self.text(arg)})")
            return dest
        buf = self.into(arg, dest)
        self.emit(f"{fn}({buf}, out={buf})")
        return buf

    def nary(self, node, dest: str) -> str:
        add = node.is_Add
        op, inv = ("+", "-") if add else ("*", "/")
        smalls, bigs = [], []  # bigs: (negated or inverted, core)
        for a in node.args:
            if not self.big(a):
                smalls.append(a)
                continue
            neg = False
            if add and a.is_Mul and a.args[0].is_Number and a.args[0] < 0:
                neg, a = True, -a
            elif not add and a.is_Pow and a.exp.is_Number and a.exp < 0:
                neg, a = True, sp.Pow(a.base, -a.exp)
            bigs.append((neg, a))
        groups = self.groups(smalls, add)
        # start from a product computed by an earlier statement
        if not add:
            for k, (neg, b) in enumerate(bigs):
                if neg or not self.leaf(b):
                    continue
                for g in list(groups):
                    if len(g) != 1 or g[0].is_Number:
                        continue
                    found = self.known.get(f"{self.names[b]} * {self.text(g[0])}")
                    # (only where something is left to do, or the product's buffer is free)
                    if found and (len(bigs) + len(groups) > 2 or found in self.reusable_names):
                        sym = sp.Dummy(found)
                        self.names[sym] = found
                        self.covers[sym] = self.full
                        if found in self.reusable_names:
                            self.reusable.add(sym)
                        bigs[k] = (False, sym)
                        groups.remove(g)
                        break
        items = [(neg, b, False) for neg, b in bigs] + [
            (False, sp.Add(*g) if add else sp.Mul(*g), True) for g in groups
        ]
        # the start: a dead operand's buffer, else the result of a compound operand
        start = next(
            (k for k, (neg, b, small) in enumerate(items) if not small and not neg and b in self.reusable),
            None,
        )
        if start is None:
            start = next(
                (k for k, (neg, b, small) in enumerate(items) if not small and not neg and not self.leaf(b)),
                None,
            )
        if start is None:
            start = next(
                (k for k, (neg, b, small) in enumerate(items) if not small and neg and not self.leaf(b)),
                None,
            )
        pending = False  # the buffer holds the negation (reciprocal) of what it should
        if start is not None:
            neg, b, _ = items.pop(start)
            if self.leaf(b):
                self.reusable.discard(b)
                buf = self.names[b]
            else:
                buf = self.into(b, dest)
            pending = neg
        else:  # operands and small groups only: one allocating binary operation first
            items.sort(key=lambda it: (it[0], it[2]))  # a positive big operand first
            # the first operation must make a full-size buffer for the in-place ones after it:
            # a pair of operands that together span the frame (x[n] * w[i] for y[i, n])
            pair = next(
                (
                    (i, j)
                    for i in range(len(items))
                    for j in range(i + 1, len(items))
                    if self.cover(items[i][1]) | self.cover(items[j][1]) >= self.full
                ),
                None,
            )
            if pair is None:  # no two operands span it: the plain expression
                return self.fallback(node, dest)
            items = [items[pair[0]], items[pair[1]]] + [
                it for k, it in enumerate(items) if k not in pair
            ]
            (na, a, sa), (nb, b, sb) = items[0], items[1]
            items = items[2:]
            ta, tb = self.operand_text(a, sa, add), self.operand_text(b, sb, add)
            if sb and not na:  # a small group applied inverted: x - m, x / s
                tb, nb = self.small_text(b, add)
                tb = _wrap(tb)
            fn, fi = ("np.add", "np.subtract") if add else ("np.multiply", "np.divide")
            ra, rb = _bare(ta), _bare(tb)  # call arguments need no parentheses
            if not add and sb and b == -1 and not na:
                self.alloc(dest, f"-{ta}", f"np.negative({ra})")
            elif not na and not nb:
                self.alloc(dest, f"{ta} {op} {tb}", f"{fn}({ra}, {rb})")
            elif not na:
                self.alloc(dest, f"{ta} {inv} {tb}", f"{fi}({ra}, {rb})")
            elif not nb:
                self.alloc(dest, f"{tb} {inv} {ta}", f"{fi}({rb}, {ra})")
            else:
                first = f"np.negative({ta})" if add else f"np.divide(1, {ta})"
                self.alloc(dest, first, first)
                self.emit(f"{dest} {inv}= {tb}")
            buf = dest
        if pending:
            first = next((k for k, (neg, b, small) in enumerate(items) if not neg and (small or self.leaf(b))), None)
            if first is not None:
                _, b, small = items.pop(first)
                fn = "np.subtract" if add else "np.divide"
                self.emit(f"{fn}({self.operand_text(b, small, add, wrap=False)}, {buf}, out={buf})")
            else:
                self.emit(f"np.negative({buf}, out={buf})" if add else f"np.divide(1, {buf}, out={buf})")
        for neg, b, small in items:
            if small and not add and b == -1:
                self.emit(f"np.negative({buf}, out={buf})")
                continue
            if small:
                text, neg = self.small_text(b, add)
            elif self.leaf(b):
                text = self.names[b]
            else:
                text = self.into(b, self.new_temp())
            self.emit(f"{buf} {inv if neg else op}= {text}")
        return buf

    def operand_text(self, expr, small: bool, add: bool, wrap: bool = True) -> str:
        if not small:
            return self.names[expr] if self.leaf(expr) else _wrap(self.text(expr))
        text = self.text(expr)
        return _wrap(text) if wrap else text

    def small_text(self, expr, add: bool):
        """The source of a small group and whether it is applied inverted (``-=`` / ``/=``)."""
        if add and expr.could_extract_minus_sign():
            return self.text(-expr), True
        if not add:
            num, den = sp.fraction(expr)
            if num == 1 and den != 1:
                return self.text(den), True
        return self.text(expr), False

    def groups(self, smalls: list, add: bool) -> list[list]:
        """Small operands grouped so that each group is applied in one pass: those whose indices
        all belong to another's are combined with it first."""
        out: list[tuple[frozenset, list]] = []
        for a in sorted(smalls, key=lambda e: (-len(self.cover(e)), sp.default_sort_key(e))):
            c = self.cover(a)
            for cov, members in out:
                if c <= cov:
                    members.append(a)
                    break
            else:
                out.append((c, [a]))
        return [members for _, members in out]


def _bare(text: str) -> str:
    """``text`` without parentheses around the whole of it."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for k, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and k < len(text) - 1:
            return text  # "(a) * (b)": the first pair closes early
    return text[1:-1]


def _wrap(text: str) -> str:
    """``text`` in parentheses unless it is an atom (a name, number, call or subscript)."""
    depth = 0
    if text.startswith("-"):
        return f"({text})"
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in " +-*/@%<>=&|~":
            return f"({text})"
    return text


_VIEW_METHODS = {"reshape", "transpose", "ravel", "view", "swapaxes", "squeeze", "astype"}
_VIEW_FUNCS = {
    "broadcast_to", "as_strided", "asarray", "ascontiguousarray", "expand_dims", "moveaxis",
    "squeeze", "atleast_1d", "atleast_2d", "ravel", "reshape", "transpose",
}


def _maybe_view(source: str, name: str | None = None) -> bool:
    """Whether the expression ``source`` may share memory with an array (with ``name``)."""
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        return True
    return _view_of(node, name)


def _temporary_slice(source: str) -> bool:
    """Whether ``source`` is a basic slice of a value it computes (``(t @ x[..., None])[..., 0]``):
    a view of memory no name holds."""
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        return False
    if not isinstance(node, ast.Subscript):
        return False
    while isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, (ast.BinOp, ast.Call)) and not _view_of(node, None)


def _view_of(node, name) -> bool:
    """Whether ``node`` may share memory with array ``name`` (None: with any array)."""
    if isinstance(node, ast.Name):
        return name is None or node.id == name
    if isinstance(node, ast.Subscript):
        return name is None or _view_of(node.value, name)
    if isinstance(node, ast.Attribute):
        return node.attr == "T" and (name is None or _view_of(node.value, name))
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in _VIEW_METHODS:
            return name is None or _view_of(f.value, name)
        if isinstance(f, ast.Attribute) and f.attr in _VIEW_FUNCS:
            return name is None or any(_view_of(a, name) for a in node.args)
    return False


class Statement:
    """One chain statement of generated code, rendered by :func:`finish` once the function's
    later statements are known."""

    def __init__(self, chain: Chain, expr, dest: str):
        self.chain, self.expr, self.dest = chain, expr, dest
        lines, self.fresh = chain.plan(expr, dest)
        self.taken = set(chain.taken)
        self.default = "\n".join(lines)
        # a float array of a known shape: its buffer may serve a later statement of that shape
        self.shape = chain.shape if not expr.free_symbols & chain.integers else None
        # the operands whose buffer could be written: names, and earlier products started from
        self.candidates = set(_NAME.findall(self.default))

    def render(self, reusable, spares=()) -> tuple[str, bool]:
        lines, fresh = self.chain.plan(self.expr, self.dest, reusable, spares)
        self.taken = set(self.chain.taken)  # spare buffers this rendering writes
        return "\n".join(lines), fresh


_WORK = "work_"  # placeholder for the buffer of a chain's result
_ASSIGN = re.compile(r"^(\w+) = (.*)$", re.S)
_NAME = re.compile(r"\b[A-Za-z_]\w*\b")


def finish(lines: list, protected: set, shapes: dict | None = None, slices: bool = True):
    """Render each chain statement of one function, writing into a dead buffer where one
    serves. ``protected``: names whose arrays outlive the function (cache, outputs, returns);
    ``shapes``: the shape of other float temporaries (as dimension names), which may serve as
    spare buffers too. A line with ``branches`` (an if/else block) runs one of them: each is
    rendered with the statements after the block as its future, and what both leave fresh
    stays fresh. ``slices``: a slice of a value computed in the statement itself (the
    ``(a @ b)[..., 0]`` of a matrix-vector product) counts as an array of its own: no other
    name reaches its memory."""
    # chain results' shapes (a name may be rebound)
    state = {"fresh": set(), "shapes": {}, "slices": slices}
    _finish(lines, [], protected, dict(shapes or {}), state)


def _line_facts(line) -> list:
    """Per statement: the names it mentions, and the name it binds without reading it (a
    block's bindings are no certain rebinding: the other branch may not make them)."""
    branches = getattr(line, "branches", None)
    if branches:
        return [(names, None) for lines in branches for ln in lines for names, _ in _line_facts(ln)]
    return [_facts(stmt) for stmt in line.code.split("\n")]


def _finish(lines: list, after: list, protected: set, known: dict, state: dict):
    fresh, shapes = state["fresh"], state["shapes"]
    facts = [_line_facts(line) for line in lines]
    for k, line in enumerate(lines):
        later = facts[k + 1 :] + after
        branches = getattr(line, "branches", None)
        if branches:
            outcomes = []
            for branch in branches:
                inner = {"fresh": set(fresh), "shapes": dict(shapes), "slices": state["slices"]}
                _finish(branch, later, protected, known, inner)
                outcomes.append(inner)
            a, b = outcomes
            fresh.clear()
            fresh |= a["fresh"] & b["fresh"]
            shapes.clear()
            shapes.update({n: v for n, v in a["shapes"].items() if b["shapes"].get(n) == v})
            line.render_block()
            continue
        chain = getattr(line, "chain", None)
        if chain is not None:
            reusable = {
                n for n in chain.candidates
                if n in fresh and n not in protected and (n == chain.dest or _dead(n, later))
            }
            mentioned = set().union(*[names for names, _ in facts[k]])
            spares = []
            if chain.shape is not None:
                spares = [
                    n for n in sorted(fresh - reusable)
                    if shapes.get(n, known.get(n)) == chain.shape and n not in mentioned
                    and n not in protected and _dead(n, later)
                ]
            line.code, is_fresh = chain.render(reusable, spares)
            shapes[chain.dest] = chain.shape
        stmts = [stmt.strip() for stmt in line.code.split("\n")]
        for j, stmt in enumerate(stmts):
            m = _ASSIGN.match(stmt)
            if not m:
                continue
            dest, src = m.group(1), m.group(2).strip()
            # a new name for a fresh array no later statement reads under its old name: the
            # array stays fresh under the new one (s = t3; sm = s)
            moved = (
                chain is None and src != dest and _NAME.fullmatch(src) is not None
                and src in fresh and src not in protected
                and _dead(src, [[_facts(s) for s in stmts[j + 1 :]]] + later)
            )
            fresh.discard(dest)
            if chain is None:  # no longer a chain's result
                shapes.pop(dest, None)
            computed = not _maybe_view(src) or (state["slices"] and _temporary_slice(src))
            if chain is None and computed:  # a computed array
                fresh.add(dest)
            # an array viewed under another name may not be overwritten
            for n in list(fresh):
                if re.search(rf"\b{n}\b", m.group(2)) and _maybe_view(m.group(2), n):
                    fresh.discard(n)
            if moved:
                fresh.add(dest)
                if src in shapes:
                    shapes[dest] = shapes[src]
        if chain is not None and is_fresh:
            fresh.add(chain.dest)


def _facts(stmt: str):
    stmt = stmt.strip()
    m = _ASSIGN.match(stmt)
    names = set(_NAME.findall(stmt))
    rebinds = m.group(1) if m and m.group(1) not in _NAME.findall(m.group(2)) else None
    return names, rebinds


def _dead(name: str, later: list) -> bool:
    """Whether no later statement reads ``name`` before rebinding it."""
    for stmts in later:
        for names, rebinds in stmts:
            if rebinds == name:
                return True
            if name in names:
                return False
    return True


#: Passes over memory a helper makes (the others: one per call or operator).
_HELPER_PASSES = {"_sigmoid": 4}
#: ``a op b`` as the NumPy function that can write it into a given array.
_UFUNC_OF = {
    ast.Add: "np.add", ast.Sub: "np.subtract", ast.Mult: "np.multiply", ast.Div: "np.divide",
    ast.Pow: "np.power", ast.MatMult: "np.matmul",
}
_BLOCK_NAMES = {"sl", "block"}
#: NumPy functions that take ``out=`` (ufuncs and matmul; not np.where, not methods).
_OUT_UFUNCS = frozenset(
    "add subtract multiply divide true_divide power negative reciprocal square sqrt exp expm1 "
    "log log1p tanh sinh cosh sin cos tan arctan abs absolute sign copysign maximum minimum "
    "logaddexp heaviside greater less greater_equal less_equal equal not_equal matmul".split()
)


def written_into(value: ast.expr, out: str) -> str | None:
    """The statement computing ``value`` straight into the array ``out``: its operator or its
    ufunc call (or the runtime's ``_sigmoid``) with ``out=``; None when it is neither."""
    if isinstance(value, ast.Call):
        func = ast.unparse(value.func)
        takes_out = (func.startswith("np.") and func[3:] in _OUT_UFUNCS) or func == "_sigmoid"
        if (
            not takes_out
            or any(k.arg == "out" for k in value.keywords)
            or any(isinstance(a, ast.Starred) for a in value.args)
        ):
            return None
        into = ast.keyword("out", ast.Name(out, ast.Load()))
        return ast.unparse(ast.Call(value.func, value.args, [*value.keywords, into]))
    if isinstance(value, ast.BinOp) and type(value.op) in _UFUNC_OF:
        fn = _UFUNC_OF[type(value.op)]
        return f"{fn}({ast.unparse(value.left)}, {ast.unparse(value.right)}, out={out})"
    if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub):
        return f"np.negative({ast.unparse(value.operand)}, out={out})"
    return None


def block(lines: list, hoist: bool = False, taken: set | None = None) -> bool:
    """Each rendered chain of two or more full-size passes run block by block: a loop over
    cache-sized slices along the frame's first axis (``_cache_blocks``, one slice of the whole
    for small arrays), the same statements on the slices, so the chain reads and writes memory
    once instead of once per pass. Operands that do not vary along that axis stay whole.
    ``hoist``: an operand computed from arrays that stay whole (a mask's factor from a
    (T, T) ``keep``) computed once before the loop, not once per block.
    Returns whether any chain was."""
    if _BLOCK_NAMES & set(_NAME.findall("\n".join(line.code for line in lines))):
        return False  # (the loop's names taken by the function's own)
    if taken is None:
        taken = set(_NAME.findall("\n".join(_all_code(lines))))
    done = False
    for line in lines:
        if getattr(line, "branches", None):
            for branch in line.branches:
                done |= block(branch, hoist, taken)
            line.render_block()
            continue
        if getattr(line, "chain", None) is not None:
            code = _blocked(line.chain, line.code, hoist and taken)
            if code is not None:
                taken |= set(_NAME.findall(code))
                line.code, done = code, True
    return done


def _blocked(statement: Statement, code: str, hoist=None) -> str | None:
    """``code`` (the rendering of ``statement``) as a loop over blocks; None where it does
    not apply: fewer than two passes, integer operands, operands along the first axis that
    are not plain names or slices of one, spare buffers as temporaries."""
    chain, expr = statement.chain, statement.expr
    if not chain.frame or expr.free_symbols & chain.integers or statement.taken - {statement.dest}:
        return None
    try:
        body = ast.parse(code).body
    except SyntaxError:
        return None
    # the buffer holding the result (``dest = buf`` last when it is an operand's)
    result, tail = statement.dest, []
    last = body[-1]
    if (
        len(body) > 1 and isinstance(last, ast.Assign) and isinstance(last.value, ast.Name)
        and last.targets[0].id == statement.dest
    ):
        result, tail, body = last.value.id, [ast.unparse(last)], body[:-1]
    # one pass over the frame per statement, more for a helper making several
    passes = len(body) + sum(
        _HELPER_PASSES.get(ast.unparse(n.func), 1) - 1
        for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Call)
    )
    if passes < 2:
        return None
    # operands: sliced along the first axis (bare names, slices of a name), or whole
    lead = chain.frame[0]
    bare, sliced, template = set(), set(), None
    for sym, text in chain.names.items():
        if lead not in chain.covers.get(sym, frozenset()):
            continue
        if text.isidentifier():
            bare.add(text)
            if (
                chain.covers[sym] >= chain.full and sym not in chain.integers and template is None
                and re.search(rf"\b{text}\b", code)
            ):
                template = text
        else:
            m = re.fullmatch(r"(\w+)\[:(, .*)?\]", text)
            if m is None:
                continue  # (checked below: a use of it declines)
            sliced.add(m.group(1))
    names = {n.id for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    if names & _BLOCK_NAMES or bare & sliced:
        return None
    assigned = {
        t.id for stmt in body if isinstance(stmt, ast.Assign) for t in stmt.targets
        if isinstance(t, ast.Name)
    }
    allocate = None
    first = body[0]
    if isinstance(first, ast.Assign) and first.targets[0].id == result:
        allocate, body = first.value, body[1:]
    elif result not in bare and result not in statement.taken:
        return None
    if template is None:
        return None
    # every other array along the first axis (a transposed view, a computed operand): as it is
    for sym, text in chain.names.items():
        if lead in chain.covers.get(sym, frozenset()) and text in code:
            if not text.isidentifier() and not re.fullmatch(r"(\w+)\[:(, .*)?\]", text):
                return None
    local = assigned - {result}

    class Slicer(ast.NodeTransformer):
        def visit_Subscript(self, node):
            if isinstance(node.value, ast.Name) and node.value.id in sliced:
                index = node.slice
                elts = list(index.elts) if isinstance(index, ast.Tuple) else [index]
                if isinstance(elts[0], ast.Slice) and elts[0].lower is None and elts[0].upper is None:
                    elts[0] = ast.Name("sl")
                    node.slice = ast.Tuple(elts) if len(elts) > 1 else elts[0]
                    return node
            return self.generic_visit(node)

        def visit_Name(self, node):
            if node.id == result:
                return ast.Name("block")
            if node.id in bare and node.id not in local:
                return ast.Subscript(ast.Name(node.id), ast.Name("sl"))
            if node.id in sliced:
                raise _Decline
            return node

    try:
        stmts = [ast.unparse(Slicer().visit(stmt)) for stmt in body]
        if allocate is not None:
            stmts.insert(0, _into_block(Slicer().visit(allocate)))
    except _Decline:
        return None
    out = []
    arrays = {text for sym, text in chain.names.items() if chain.covers.get(sym)}
    if hoist:  # (the names the function takes)
        stmts, out = _hoisted(stmts, hoist | names | assigned, arrays)
    # the logistic function's passes written out (one errstate for the loop, not one per block)
    steps = [_sigmoid_steps(s) for s in stmts]
    stmts = [ln for group in steps for ln in group]
    if allocate is not None:
        out.append(f"{result} = np.empty_like({template})")
    loop = [f"for sl in _cache_blocks({result}):  # the chain in cache, block by block"]
    loop.append(f"    block = {result}[sl]")
    loop += [f"    {s}" for s in stmts]
    if any(len(group) > 1 for group in steps):
        out.append('with np.errstate(over="ignore"):  # exp(-x) overflowing to inf: sigmoid 0')
        loop = [f"    {ln}" for ln in loop]
    return "\n".join(out + loop + tail)


def _hoisted(stmts: list, taken: set, arrays: set) -> tuple[list, list]:
    """The loop's statements with each largest subexpression that reads an array operand (a
    call, comparison or subscript on it) but neither the block, its slice nor a name the loop
    assigns computed once before the loop
    (``np.where(keep > 0, 1, 0).astype(dtype) / float(np.sqrt(D))``): the statements, and
    the assignments to put before the loop."""
    varying = _BLOCK_NAMES | {n for s in stmts for n in _assigned_names(s)}
    before, made = [], {}

    class Hoist(ast.NodeTransformer):
        def generic_visit(self, node):
            if (
                isinstance(node, ast.expr) and not isinstance(node, (ast.Name, ast.Constant))
                and not isinstance(node, (ast.Slice, ast.Tuple, ast.Starred))
            ):
                read = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                work = any(  # (a scalar such as dL / N costs nothing per block)
                    isinstance(n, (ast.Call, ast.Compare, ast.Subscript)) for n in ast.walk(node)
                )
                if work and not read & varying and read & arrays:
                    text = ast.unparse(node)
                    if text not in made:
                        name = next(
                            f"whole{k}" for k in range(len(taken) + len(made) + 1)
                            if f"whole{k}" not in taken and f"whole{k}" not in made.values()
                        )
                        made[text] = name
                        before.append(f"{name} = {text}")
                    return ast.Name(made[text])
            return super().generic_visit(node)

    out = []
    for stmt in stmts:
        tree = ast.parse(stmt)
        node = tree.body[0]
        # the statement's own call or target stays in the loop; its operands may move
        out.append(ast.unparse(_hoist_operands(node, Hoist())))
    return out, before


def _hoist_operands(node, hoist):
    """``node`` (a statement) with ``hoist`` applied to its operands, not to itself."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        call = node.value
        call.args = [hoist.visit(a) for a in call.args]
        for k in call.keywords:
            k.value = hoist.visit(k.value)
        return node
    if isinstance(node, ast.AugAssign):  # (read only: the whole right side may move)
        node.value = hoist.visit(node.value)
    elif isinstance(node, ast.Assign):  # (a name bound to a new array each block: its parts)
        for field, child in ast.iter_fields(node.value):
            if isinstance(child, ast.expr):
                setattr(node.value, field, hoist.visit(child))
            elif isinstance(child, list):
                setattr(node.value, field, [
                    hoist.visit(c) if isinstance(c, ast.expr) else c for c in child
                ])
        for k in getattr(node.value, "keywords", ()):
            k.value = hoist.visit(k.value)
    return node


def _all_code(lines: list) -> list:
    """The code of ``lines`` and of their branches."""
    out = []
    for line in lines:
        out.append(line.code)
        for branch in getattr(line, "branches", None) or ():
            out += _all_code(branch)
    return out


def _assigned_names(stmt: str) -> set:
    """Names a statement binds."""
    tree = ast.parse(stmt).body[0]
    targets = tree.targets if isinstance(tree, ast.Assign) else [getattr(tree, "target", None)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _sigmoid_steps(stmt: str) -> list:
    """``_sigmoid(a, out=b)`` as its four in-place passes (1 / (1 + exp(-a)) into ``b``)."""
    m = re.fullmatch(r"_sigmoid\((.+), out=(\w+(?:\[\w+\])?)\)", stmt)
    if m is None:
        return [stmt]
    a, b = m.groups()
    return [f"np.negative({a}, out={b})", f"np.exp({b}, out={b})", f"{b} += 1", f"np.divide(1, {b}, out={b})"]


class _Decline(Exception):
    pass


def _into_block(value) -> str:
    """The statement computing ``value`` into ``block``."""
    return written_into(value, "block") or f"block[...] = {ast.unparse(value)}"
