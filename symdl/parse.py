"""Equation text -> a :class:`~symdl.spec.Layer`, without evaluating any of it.

The text is parsed by Python's own parser (``ast.parse``, which only builds a tree) and the tree
is walked against a whitelist: tensor subscripts, index names, numbers, declared names,
``+ - * / **``, comparisons inside ``where``, and the functions of the formula sheet. Anything
else is rejected with a one-line :class:`~symdl.errors.ParseError` that gives the line and
column. Equations are ``lhs[indices] = rhs`` separated by ``;`` or newlines.
"""

from __future__ import annotations

import ast
import math

import sympy as sp

from .errors import ParseError
from .functions import ELEMENTWISE, IndexMax, IndexSum, Mean
from .spec import ELL, Layer, split_names

MAX_TEXT = 20_000  # characters of equation text
MAX_INT = 10**12  # largest integer literal
MAX_EXPONENT = 64  # largest exponent of a number raised to a number
MAX_NODES = 5_000  # syntax-tree nodes

REDUCTIONS = {"Sum", "Mean", "Max"}
SPECIAL = {"where"} | REDUCTIONS
CONSTANTS = {"pi": sp.pi}


def _at(node) -> str:
    return f"at line {getattr(node, 'lineno', 1)}, column {getattr(node, 'col_offset', 0) + 1}"


def _fail(message: str, node=None, **data):
    where = f" {_at(node)}" if node is not None else ""
    line = getattr(node, "lineno", None)
    col = getattr(node, "col_offset", None)
    raise ParseError(f"{message}{where}", line=line, column=None if col is None else col + 1, **data)


def _subscript_items(node: ast.Subscript) -> list:
    sl = node.slice
    return list(sl.elts) if isinstance(sl, ast.Tuple) else [sl]


class _Converter:
    def __init__(self, tensors: set[str], hyper: set[str], index_names: set[str]):
        self.tensors = tensors
        self.hyper = hyper
        self.index_names = index_names

    def index(self, node, gather_ok=True):
        if isinstance(node, ast.Constant) and node.value is Ellipsis:
            return ELL
        if isinstance(node, ast.Name):
            if node.id in self.tensors or node.id in self.hyper:
                _fail(
                    f"an index position requires an index name, got {node.id!r}, which is a "
                    f"tensor or hyperparameter",
                    node,
                )
            return sp.Symbol(node.id, integer=True)
        if gather_ok and isinstance(node, ast.Subscript):
            if not isinstance(node.value, ast.Name) or node.value.id not in self.tensors:
                _fail("a gathered index requires an integer tensor like target[n]", node)
            items = [self.index(i, gather_ok=False) for i in _subscript_items(node)]
            return sp.IndexedBase(node.value.id, real=True)[tuple(items)]
        if isinstance(node, (ast.BinOp, ast.Constant, ast.UnaryOp)):
            return self.affine(node)
        _fail(
            "an index position requires an index name, '...', an integer tensor like "
            f"target[n] or an affine expression like stride*i + p, got {ast.unparse(node)!r}",
            node,
        )

    def affine(self, node):
        """An affine index expression: index names, integer hyperparameters, integers, + - *."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int):
                _fail(f"an index expression requires integers, got {ast.unparse(node)!r}", node)
            if abs(node.value) > MAX_INT:
                _fail(f"an integer literal requires a magnitude <= {MAX_INT}, got a larger one", node)
            return sp.Integer(node.value)
        if isinstance(node, ast.Name):
            if node.id in self.hyper:
                return sp.Symbol(node.id, real=True)
            if node.id in self.tensors:
                _fail(f"an index expression requires index names, got tensor {node.id!r}", node)
            return sp.Symbol(node.id, integer=True)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.affine(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = self.affine(node.left), self.affine(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            return a * b
        _fail(f"an index expression requires + - * of indices and integers, got {ast.unparse(node)!r}", node)

    def reduction_indices(self, node):
        if isinstance(node, ast.Tuple):
            if not node.elts:
                _fail("a reduction requires at least one index", node)
            return tuple(self.index(e, gather_ok=False) for e in node.elts)
        return (self.index(node, gather_ok=False),)

    def value(self, node):
        """An expression that is a number (not a comparison, which only where() takes)."""
        out = self.expr(node)
        if isinstance(
            out,
            (
                sp.core.relational.Relational,
                sp.logic.boolalg.BooleanFunction,
                sp.logic.boolalg.BooleanAtom,
            ),
        ):
            _fail("a comparison requires where(condition, a, b) around it", node)
        return out

    def expr(self, node):
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                _fail(f"a number requires an int or float literal, got {ast.unparse(node)!r}", node)
            if isinstance(v, int):
                if abs(v) > MAX_INT:
                    _fail(f"an integer literal requires a magnitude <= {MAX_INT}, got a larger one", node)
                return sp.Integer(v)
            if v != v or v in (float("inf"), float("-inf")):
                _fail("a number requires a finite value", node)
            return sp.Float(repr(v), 17)
        if isinstance(node, ast.Name):
            name = node.id
            if name in self.tensors or name in self.hyper:
                return sp.Symbol(name, real=True)
            if name in CONSTANTS:
                return CONSTANTS[name]
            if name in self.index_names:
                return sp.Symbol(name, integer=True)
            if name in ELEMENTWISE or name in SPECIAL:
                _fail(f"function {name!r} requires a call like {name}(...), got the bare name", node)
            _fail(
                f"name {name!r} requires a declaration (--inputs, --params, --consts, --hyper) "
                f"or an equation defining it, got an unknown name",
                node,
            )
        if isinstance(node, ast.Subscript):
            if not isinstance(node.value, ast.Name):
                _fail(f"a subscript requires a tensor name, got {ast.unparse(node.value)!r}", node)
            name = node.value.id
            if name not in self.tensors:
                _fail(
                    f"tensor {name!r} requires a declaration or an equation defining it, got an "
                    f"unknown name",
                    node,
                )
            items = tuple(self.index(i) for i in _subscript_items(node))
            return sp.IndexedBase(name, real=True)[items]
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return -self.value(node.operand)
            if isinstance(node.op, ast.UAdd):
                return self.value(node.operand)
            _fail(f"operator {type(node.op).__name__} is not allowed in equations", node)
        if isinstance(node, ast.BinOp):
            value = self._binop(node)
            for number in value.atoms(sp.Number):
                if not math.isfinite(float(number)):
                    _fail(
                        f"a constant requires a value that fits a float, got {ast.unparse(node)!r}",
                        node,
                    )
            return value
        return self._other(node)

    def _binop(self, node):
        if True:
            op = type(node.op)
            if op in (ast.Add, ast.Sub, ast.Mult):
                return self._chain(node)
            a, b = self.value(node.left), self.value(node.right)
            if op is ast.Div:
                if b == 0:
                    _fail("a division requires a non-zero divisor, got 0", node)
                return a / b
            if op is ast.Pow:
                if b.is_number and (not b.is_real or abs(float(b)) > MAX_EXPONENT):
                    _fail(f"an exponent requires a magnitude <= {MAX_EXPONENT}, got {ast.unparse(node.right)!r}", node)
                if a == 0 and b.is_number and b.is_negative:
                    _fail("0 raised to a negative power is undefined", node)
                return a**b
            _fail(f"operator {type(node.op).__name__} is not allowed in equations (use + - * / **)", node)
    def _chain(self, node):
        """``a + b - c + ...`` or ``a * b * c ...`` built in one step: SymPy flattens a sum or
        product again at every binary operation, so a chain of k terms would cost O(k**2)."""
        family = (ast.Mult,) if isinstance(node.op, ast.Mult) else (ast.Add, ast.Sub)
        parts = []  # (operand node, negated), right to left
        while isinstance(node, ast.BinOp) and isinstance(node.op, family):
            parts.append((node.right, isinstance(node.op, ast.Sub)))
            node = node.left
        parts.append((node, False))
        values = [-self.value(n) if neg else self.value(n) for n, neg in reversed(parts)]
        return sp.Mul(*values) if family == (ast.Mult,) else sp.Add(*values)

    def _other(self, node):
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1:
                _fail("a comparison requires exactly two operands", node)
            a, b = self.value(node.left), self.value(node.comparators[0])
            ops = {ast.Lt: sp.Lt, ast.LtE: sp.Le, ast.Gt: sp.Gt, ast.GtE: sp.Ge}
            if type(node.ops[0]) not in ops:
                _fail("a comparison requires one of < <= > >=", node)
            return ops[type(node.ops[0])](a, b)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.BoolOp):  # conditions: a > 0 and b < c
            parts = [self.expr(v) for v in node.values]
            for part, v in zip(parts, node.values):
                if not isinstance(part, (sp.core.relational.Relational, sp.logic.boolalg.BooleanFunction)):
                    _fail("'and' / 'or' require comparisons on both sides", v)
            return sp.And(*parts) if isinstance(node.op, ast.And) else sp.Or(*parts)
        _fail(f"{type(node).__name__} is not allowed in equations", node)

    def call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            _fail(f"a call requires a function name, got {ast.unparse(node.func)!r}", node)
        name = node.func.id
        if node.keywords:
            _fail(f"function {name!r} requires positional arguments only", node)
        if any(isinstance(a, ast.Starred) for a in node.args):
            _fail(f"function {name!r} requires plain arguments, got a starred one", node)
        if name in REDUCTIONS:
            if len(node.args) != 2:
                _fail(f"{name}(expr, index) requires 2 arguments, got {len(node.args)}", node)
            body = self.value(node.args[0])
            idx = self.reduction_indices(node.args[1])
            if name == "Sum":
                return IndexSum(body, idx)
            if name == "Max":
                return IndexMax(body, idx)
            return Mean(body, idx)
        if name == "where":
            if len(node.args) != 3:
                _fail(f"where(cond, a, b) requires 3 arguments, got {len(node.args)}", node)
            cond = self.expr(node.args[0])
            if not isinstance(cond, (sp.core.relational.Relational, sp.logic.boolalg.BooleanFunction)):
                _fail("where(cond, a, b) requires a comparison as its condition", node.args[0])
            return sp.Piecewise((self.value(node.args[1]), cond), (self.value(node.args[2]), True))
        if name not in ELEMENTWISE:
            known = ", ".join(sorted(set(ELEMENTWISE) | SPECIAL))
            _fail(f"function {name!r} requires a name from the formula sheet ({known}), got an unknown function", node)
        fn = ELEMENTWISE[name]
        args = [self.value(a) for a in node.args]
        want = 2 if name in ("maximum", "minimum", "xlogy") else 1
        if len(args) != want:
            _fail(f"function {name!r} requires {want} argument(s), got {len(args)}", node)
        return fn(*args)


def _collect_indices(tree, tensors: set[str]) -> set[str]:
    names: set[str] = set()

    def visit_index(node):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.BinOp):
            visit_index(node.left)
            visit_index(node.right)
        elif isinstance(node, ast.UnaryOp):
            visit_index(node.operand)
        elif isinstance(node, ast.Subscript):
            for i in _subscript_items(node):
                visit_index(i)
        elif isinstance(node, ast.Tuple):
            for e in node.elts:
                visit_index(e)

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            for i in _subscript_items(node):
                visit_index(i)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in REDUCTIONS
            and len(node.args) == 2
        ):
            visit_index(node.args[1])
    return names - tensors


def parse_equations(text: str, tensors, hyper=()) -> list[tuple[sp.Expr, sp.Expr]]:
    """Parse equation text into ``(lhs, rhs)`` pairs; ``tensors`` are the declared tensor
    names (the left sides add to them) and ``hyper`` the hyperparameter names."""
    if not isinstance(text, str):
        raise ParseError(f"equations require text, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise ParseError(f"equation text requires at most {MAX_TEXT} characters, got {len(text)}")
    for k, ch in enumerate(text):
        if ord(ch) > 127 or (ord(ch) < 32 and ch not in "\n\t\r"):
            line = text.count("\n", 0, k) + 1
            col = k - (text.rfind("\n", 0, k) + 1) + 1
            raise ParseError(
                f"equation text requires ASCII characters, got {ch!r} at line {line}, column {col}",
                line=line,
                column=col,
            )
    # one equation per line: indentation carries no meaning here
    text = "\n".join(line.lstrip() for line in text.splitlines())
    try:
        tree = ast.parse(text, mode="exec")
    except SyntaxError as err:
        raise ParseError(
            f"equation text requires valid syntax, got {err.msg} at line {err.lineno}, "
            f"column {err.offset}",
            line=err.lineno,
            column=err.offset,
        ) from None
    except (RecursionError, MemoryError, ValueError) as err:
        raise ParseError(
            f"equation text requires less nesting, got too deep a nesting at line 1, column 1 "
            f"({type(err).__name__})",
            line=1,
            column=1,
        ) from None
    count = sum(1 for _ in ast.walk(tree))
    if count > MAX_NODES:
        raise ParseError(f"equation text requires at most {MAX_NODES} syntax nodes, got {count}")
    if not tree.body:
        raise ParseError("equation text requires at least one equation, got none")

    tensors = set(tensors)
    hyper = set(hyper)
    lhs_names = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
            _fail("an equation requires the form lhs[indices] = rhs", stmt)
        target = stmt.targets[0]
        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            lhs_names.append(target.value.id)
        elif isinstance(target, ast.Name):
            lhs_names.append(target.id)
        else:
            _fail("the left side requires a tensor like y[n, o] or a scalar name like L", target)
    for n in lhs_names:
        if n in hyper:
            _fail(f"the left side requires a tensor name, got hyperparameter {n!r}", tree.body[0])
    all_tensors = tensors | set(lhs_names)
    conv = _Converter(all_tensors, hyper, _collect_indices(tree, all_tensors | hyper))
    out = []
    for stmt in tree.body:
        target = stmt.targets[0]
        try:
            if isinstance(target, ast.Subscript):
                items = tuple(conv.index(i, gather_ok=False) for i in _subscript_items(target))
                lhs = sp.IndexedBase(target.value.id, real=True)[items]
            else:
                lhs = sp.Symbol(target.id, real=True)
            rhs = conv.value(stmt.value)
        except RecursionError:
            raise ParseError(f"equation {_at(stmt)} requires less nesting, got too deep a nesting") from None
        out.append((lhs, rhs))
    return out


def _hyper(value) -> dict[str, object]:
    """``"eps=1e-5,lam"`` -> ``{"eps": 1e-05, "lam": None}`` (a number literal or nothing)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, object] = {}
    for item in value.replace(" ", "").split(","):
        if not item:
            continue
        name, eq, default = item.partition("=")
        if not name.isidentifier():
            raise ParseError(f"a hyperparameter requires an identifier name, got {name!r}")
        if name in out:
            raise ParseError(f"hyperparameter {name!r} requires one declaration, got it twice")
        if eq:
            try:
                num = ast.literal_eval(default)
            except (ValueError, SyntaxError):
                num = None
            if isinstance(num, bool) or not isinstance(num, (int, float)) or not math.isfinite(num):
                raise ParseError(
                    f"hyperparameter {name!r} requires a finite number as default, got {default!r}"
                )
            out[name] = num
        else:
            out[name] = None
    return out


def parse_layer(
    name: str,
    text: str,
    *,
    inputs=(),
    params=(),
    consts=(),
    hyper=None,
    outputs=None,
    doc: str = "",
) -> Layer:
    """A layer from equation text, e.g.
    ``parse_layer("dense", "y[n,o] = tanh(Sum(x[n,i]*w[o,i], i) + b[o])", inputs="x", params="w,b")``.
    """
    inputs, params, consts = split_names(inputs), split_names(params), split_names(consts)
    hyper_d = _hyper(hyper)
    eqs = parse_equations(text, set(inputs) | set(params) | set(consts), set(hyper_d))
    return Layer(
        name,
        eqs,
        inputs=inputs,
        params=params,
        consts=consts,
        hyper=hyper_d,
        outputs=split_names(outputs) if outputs else None,
        doc=doc,
    )
