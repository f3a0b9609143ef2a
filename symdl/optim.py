"""Optimizers: update rules written once as SymPy equations, rendered into NumPy modules.

An :class:`Optimizer` is a short straight-line program of elementwise assignments
``target = expression`` over the symbols ``param`` and ``grad`` (arrays), its state (arrays
that start at zero, or a scalar step counter that starts at 0), intermediates (a name assigned
once, array or scalar) and hyperparameters (Python scalars). Later equations see the values
assigned by earlier ones, as in ``torch.optim``'s in-place code. A ``Piecewise`` whose
conditions involve scalars only (``Eq(t, 1)``, a boolean hyperparameter) becomes an ``if``.

From the same equations come two functions of the generated module:

- ``step``: pure; every assignment rebinds a local name, nothing passed in is modified.
- ``step_inplace``: ``param`` and each array state are written into their own buffers. An
  assignment ``x = c*x + rest`` becomes ``x *= c; x += rest`` (``x -= ...`` for a negative
  rest), any other one ``x[...] = expr``; the pure form is printed with the same association,
  so both functions compute bit-identical values.

Scalar subexpressions (bias corrections, step sizes) are hoisted into Python-float temporaries
``t0, t1, ...`` computed once per step; they never touch NumPy, so a float32 ``param`` stays
float32 under any NumPy promotion rules.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.precedence import PRECEDENCE

from . import __version__
from .errors import CodegenError, SpecError
from .printing import Namer, NumpyPrinter, equation_text
from .spec import check_module_name
from .templating import environment

#: Initial value of an array state (``np.zeros_like(param)``).
ZEROS = "zeros"

#: LaTeX of the names used across the optimizer catalogue (an optimizer's ``tex`` overrides).
TEX = {
    "param": r"\theta",
    "grad": "g",
    "lr": r"\eta",
    "weight_decay": r"\lambda",
    "momentum": r"\mu",
    "dampening": r"\tau",
    "nesterov": r"\mathrm{nesterov}",
    "alpha": r"\alpha",
    "beta1": r"\beta_{1}",
    "beta2": r"\beta_{2}",
    "eps": r"\epsilon",
    "t": "t",
}

#: Names the generated module defines itself; an optimizer symbol may not take them.
_MODULE_NAMES = {
    "step", "step_inplace", "init_state", "math", "NAME", "STATE", "HYPERPARAMETERS",
    "FORMULAS", "param", "grad",
}  # fmt: skip


class Optimizer:
    """An update rule: ordered elementwise equations plus what the generated module needs.

    ``updates``: ``[(symbol, expression), ...]`` in execution order; ``param`` must be assigned,
    every state exactly once, an intermediate at most once and before it is read.
    ``hyper``: hyperparameter name -> default, in signature order (``None``: required).
    ``state``: state name -> initial value, ``ZEROS`` (an array like ``param``) or ``0`` (a
    scalar step counter). ``tex``: LaTeX of state/intermediate/hyperparameter names.
    ``requires``: SymPy conditions on hyperparameters, checked on every call.
    ``checks``: what the tests need (the reference implementation, cases to run).
    """

    def __init__(
        self,
        name: str,
        updates,
        *,
        hyper: dict,
        state: dict | None = None,
        doc: str = "",
        tex: dict | None = None,
        requires=(),
        checks: dict | None = None,
    ):
        self.name = name
        self.doc = doc
        self.updates = [(lhs, sp.sympify(rhs)) for lhs, rhs in updates]
        self.hyper = dict(hyper)
        self.state = dict(state or {})
        self.tex = {**TEX, **(tex or {})}
        self.requires = [sp.sympify(c) for c in requires]
        self.checks = dict(checks or {})
        self._validate()

    # -- structure -------------------------------------------------------------------------

    def _validate(self) -> None:
        where = f"optimizer {self.name!r}"
        if not self.name.isidentifier():
            raise SpecError(f"{where}: a name requires a Python identifier, got {self.name!r}")
        try:
            check_module_name(self.name, "optimizer")
        except SpecError as err:
            raise err.with_context(where) from None
        for n, init in self.state.items():
            if not (init == ZEROS or (isinstance(init, int) and not isinstance(init, bool))):
                raise SpecError(
                    f"{where}: state {n!r} requires an initial value 'zeros' or an int, "
                    f"got {init!r}"
                )
        declared = ["param", "grad", *self.state, *self.hyper]
        clash = sorted({n for n in declared if declared.count(n) > 1})
        if clash:
            raise SpecError(f"{where}: names require uniqueness, got {', '.join(clash)} twice")
        taken = sorted((set(self.state) | set(self.hyper)) & _MODULE_NAMES)
        if taken:
            raise SpecError(
                f"{where}: state and hyperparameter names require names the module does not "
                f"define, got {', '.join(taken)}"
            )
        self.symbols: dict[str, sp.Symbol] = {}
        known = {"param", "grad", *self.state, *self.hyper}
        assigned: set[str] = set()
        self.intermediates: list[str] = []
        self.arrays: set[sp.Symbol] = set()

        def bind(sym):
            if not isinstance(sym, sp.Symbol):
                raise SpecError(f"{where}: an assignment requires a Symbol target, got {sym!r}")
            other = self.symbols.setdefault(sym.name, sym)
            if other != sym:
                raise SpecError(
                    f"{where}: symbol {sym.name!r} requires one set of assumptions, got two"
                )

        for n in ("param", "grad"):
            self.symbols[n] = sp.Symbol(n)
        for lhs, rhs in self.updates:
            for s in sorted(rhs.free_symbols, key=sp.default_sort_key):
                bind(s)
                if s.name not in known:
                    raise SpecError(
                        f"{where}: the equation for {lhs} requires known symbols (param, grad, "
                        f"state, hyperparameters, earlier intermediates), got {s.name!r}"
                    )
            bind(lhs)
            n = lhs.name
            if n in assigned:
                raise SpecError(f"{where}: each target requires one equation, got {n!r} twice")
            if n == "grad" or n in self.hyper:
                raise SpecError(
                    f"{where}: an assignment requires a param, state or new name, got {n!r}"
                )
            if n not in known:
                if n in _MODULE_NAMES:
                    raise SpecError(
                        f"{where}: an intermediate requires a name the module does not define, "
                        f"got {n!r}"
                    )
                self.intermediates.append(n)
                known.add(n)
            assigned.add(n)
        missing = [n for n in ["param", *self.state] if n not in assigned]
        if missing:
            raise SpecError(
                f"{where}: param and every state require an equation, got none for "
                f"{', '.join(missing)}"
            )
        for c in self.requires:
            for s in c.free_symbols:
                if s.name not in self.hyper:
                    raise SpecError(
                        f"{where}: a requirement requires hyperparameters only, got {s.name!r}"
                    )
                bind(s)
        for n in ["param", "grad", *self.state, *self.hyper]:
            self.symbols.setdefault(n, sp.Symbol(n))
        self.arrays = {self.symbols["param"], self.symbols["grad"]}
        self.arrays |= {self.symbols[n] for n, init in self.state.items() if init == ZEROS}
        for lhs, rhs in self.updates:
            if lhs.name in self.intermediates and rhs.free_symbols & self.arrays:
                self.arrays.add(lhs)
        for lhs, rhs in self.updates:
            if lhs not in self.arrays and rhs.free_symbols & self.arrays:
                raise SpecError(
                    f"{where}: scalar {lhs.name!r} requires a scalar expression, got one of arrays"
                )

    def is_array(self, expr) -> bool:
        return bool(expr.free_symbols & self.arrays)

    def __repr__(self) -> str:
        lines = [
            f"Optimizer {self.name!r}: {self.doc}" if self.doc else f"Optimizer {self.name!r}"
        ]
        lines += [f"  {equation_line(lhs, rhs)}" for lhs, rhs in self.updates]
        lines.append("  state: " + (", ".join(f"{n}={v}" for n, v in self.state.items()) or "-"))
        lines.append(
            "  hyperparameters: " + ", ".join(f"{n}={v!r}" for n, v in self.hyper.items())
        )
        return "\n".join(lines)


# ---- printing ------------------------------------------------------------------------------


class _ScalarPrinter(NumpyPrinter):
    """Scalar expressions as plain Python (floats, ints, bools): ``** 0.5``, ``math.*``,
    ``and``/``or``/``not``, ``a if c else b``; never a NumPy call."""

    def _module_format(self, fqn, register=True):
        import math

        text = super()._module_format(fqn, register)
        if text.startswith("np."):
            fn = text[3:]
            if not hasattr(math, fn):
                raise CodegenError(
                    f"a scalar expression requires a function the math module has, got {fn!r}"
                )
            self.flags["math"] = True
            return "math." + fn
        return text

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.as_base_exp()
        if exp.is_Rational and not exp.is_Integer:
            b = self.parenthesize(base, PRECEDENCE["Pow"], strict=True)
            if exp < 0:
                return f"1 / {b} ** {float(-exp)!r}"
            return f"{b} ** {float(exp)!r}"
        return super()._print_Pow(expr, rational=rational)

    def _print_Piecewise(self, expr):
        pairs = list(expr.args)
        if pairs[-1].cond != sp.true:
            raise CodegenError("a Piecewise requires a final 'otherwise' branch, got none")
        text = self._print(pairs[-1].expr)
        for e, c in reversed(pairs[:-1]):
            text = f"({self._print(e)} if {self._print(c)} else {text})"
        return text

    def _print_Relational(self, expr):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"{self._print(expr.lhs)} {op} {self._print(expr.rhs)}"

    def _bool_arg(self, arg):
        text = self._print(arg)
        return f"({text})" if isinstance(arg, (sp.And, sp.Or, sp.Not)) else text

    def _print_And(self, expr):
        return " and ".join(self._bool_arg(a) for a in expr.args)

    def _print_Or(self, expr):
        return " or ".join(self._bool_arg(a) for a in expr.args)

    def _print_Not(self, expr):
        return f"not {self._bool_arg(expr.args[0])}"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"


def equation_line(lhs, rhs) -> str:
    """``lhs = rhs`` as text, a scalar-condition Piecewise as Python's ``a if c else b``."""
    return f"{lhs.name} = {_text(rhs)}"


def display_order(expr):
    """A top-level sum with its constant last (``t + 1``, not ``1 + t``), for text and LaTeX."""
    if isinstance(expr, sp.Add) and any(a.is_Number for a in expr.args):
        terms = [a for a in expr.args if not a.is_Number] + [a for a in expr.args if a.is_Number]
        return sp.Add(*terms, evaluate=False)
    return expr


def _text(expr) -> str:
    if isinstance(expr, sp.Piecewise):
        *branches, (last, _) = expr.args
        out = "".join(f"{_text(e)} if {_cond_text(c)} else " for e, c in branches)
        return out + _text(last)
    return equation_text(display_order(expr))


def _cond_text(cond) -> str:
    return _ScalarPrinter({}, set(), set(), {"dtype": False}).doprint(cond)


def _scalar_condition(opt: Optimizer, expr) -> bool:
    return isinstance(expr, sp.Piecewise) and not any(opt.is_array(c) for _, c in expr.args)


class _Emitter:
    """Turns the equations into the bodies of ``step`` and ``step_inplace``."""

    def __init__(self, opt: Optimizer):
        self.opt = opt
        self.namer = Namer(taken=_MODULE_NAMES)
        self.names = {}
        for n in ["param", "grad", *opt.state, *opt.hyper, *opt.intermediates]:
            sym = opt.symbols[n]
            self.names[sym] = n if n in ("param", "grad") else self.namer.claim(n)
        self.arrays = set(opt.arrays)
        self.flags = {"dtype": False}
        self.helpers: set = set()
        self.array_printer = NumpyPrinter(self.names, self.arrays, self.helpers, self.flags)
        self.scalar_printer = _ScalarPrinter(self.names, self.arrays, self.helpers, self.flags)
        for printer in (self.array_printer, self.scalar_printer):
            printer._settings["order"] = "none"  # SymPy's stored order: 1 - lr*weight_decay
        self.temps: dict = {}  # scalar expression -> temporary symbol (one equation's scope)
        self.temp_lines: list[str] = []
        self._taken = set(self.namer.taken)
        self._later_targets: set = set()

    # -- scalar hoisting -------------------------------------------------------------------

    def _temp(self, expr):
        expr = sp.sympify(expr)
        if expr in self.temps:
            return self.temps[expr]
        name = self.namer.temp()
        sym = sp.Dummy(name)
        self.names[sym] = name
        self.temps[expr] = sym
        self.temp_lines.append(f"{name} = {self.scalar_printer.doprint(expr)}")
        return sym

    @staticmethod
    def _python_safe(expr) -> bool:
        """Only +, *, integer or symbolic powers of symbols and numbers: safe to print inline."""
        for node in sp.preorder_traversal(expr):
            if isinstance(node, (sp.Symbol, sp.Number, sp.Add, sp.Mul)):
                continue
            if isinstance(node, sp.Pow) and (node.exp.is_Integer or node.exp.is_Symbol):
                continue
            return False
        return True

    def _factor(self, c):
        """A scalar factor of an array product, inline when simple, else a temporary."""
        if c.is_Atom or (c.is_Add and self._python_safe(c)):
            return c
        num, den = sp.fraction(c)
        if num == 1 and den != 1:
            return 1 / self._factor(den)
        return self._temp(c)

    def hoist(self, expr):
        """``expr`` with its non-trivial scalar subexpressions replaced by temporaries."""
        opt = self.opt
        if expr.is_Atom:
            return expr
        if not opt.is_array(expr):
            if expr.is_Mul and len(expr.args) == 2 and all(a.is_Atom for a in expr.args):
                return expr  # -lr, 2*eps
            return self._temp(expr)
        if isinstance(expr, sp.Mul):
            coeff, rest = expr.as_coeff_Mul()
            arrays = [self.hoist(a) for a in sp.Mul.make_args(rest) if opt.is_array(a)]
            scalars = [a for a in sp.Mul.make_args(rest) if not opt.is_array(a)]
            factor = self._factor(sp.Mul(*scalars)) if scalars else sp.S.One
            return sp.Mul(coeff, factor, *arrays)
        if isinstance(expr, sp.Add):
            arrays = [self.hoist(a) for a in expr.args if opt.is_array(a)]
            scalars = sp.Add(*[a for a in expr.args if not opt.is_array(a)])
            return sp.Add(self.hoist(scalars) if scalars != 0 else 0, *arrays)
        if isinstance(expr, sp.Pow):
            base, exp = expr.as_base_exp()
            exp = exp if exp.is_Atom or opt.is_array(exp) else self._temp(exp)
            return sp.Pow(self.hoist(base), self.hoist(exp) if opt.is_array(exp) else exp)
        if isinstance(expr, sp.Piecewise):
            return sp.Piecewise(
                *[(self.hoist(e), self.hoist(c) if opt.is_array(c) else c) for e, c in expr.args]
            )
        if isinstance(expr, sp.core.relational.Relational):
            return expr.func(self.hoist(expr.lhs), self.hoist(expr.rhs))
        if isinstance(expr, (sp.Function, sp.And, sp.Or, sp.Not)):
            return expr.func(*[self.hoist(a) for a in expr.args])
        raise CodegenError(f"an update requires elementwise operations, got {expr}")

    # -- printing helpers ------------------------------------------------------------------

    def arr(self, expr) -> str:
        return self.array_printer.doprint(expr)

    def scal(self, expr) -> str:
        return self.scalar_printer.doprint(expr)

    def paren(self, expr, level) -> str:
        return self.array_printer.parenthesize(expr, level, strict=True)

    # -- one assignment --------------------------------------------------------------------

    def _linear_split(self, target, expr):
        """``expr == c*target + rest`` with ``c`` scalar and ``rest`` free of target where
        ``c != 1``; returns ``(c, rest)`` or ``None``."""
        terms = list(expr.args) if isinstance(expr, sp.Add) else [expr]
        hits = [
            (i, term.as_independent(target, as_Add=False))
            for i, term in enumerate(terms)
            if target in term.free_symbols
        ]
        hits = [(i, c) for i, (c, dep) in hits if dep == target and not self.opt.is_array(c)]
        if not hits:
            return None
        i, c = hits[0]
        rest = sp.Add(*[t for j, t in enumerate(terms) if j != i])
        if c != 1 and target in rest.free_symbols:
            return None
        if c == 1 and rest == 0:
            return None
        return c, rest

    def assign(self, target, expr, inplace: bool, fresh: set) -> list[str]:
        """Code for ``target = expr`` (no ``if``). ``fresh`` holds the arrays known not to
        alias an argument, so the pure ``step`` copies only when it must."""
        name = self.names[target]
        opt = self.opt
        array_target = target in self.arrays
        if not array_target:  # a scalar: the step counter or a scalar intermediate
            return [f"{name} = {self.scal(display_order(expr))}"]
        if target.name in opt.intermediates:
            text = self.arr(self.hoist(expr))
            if expr in self.arrays:  # an alias of another array
                if inplace and expr in self._later_targets:
                    text += ".copy()"
                if expr in fresh:
                    fresh.add(target)
            else:
                fresh.add(target)
            return [f"{name} = {text}"]
        if expr == target:
            return ["pass  # unchanged"]
        if expr in self.arrays:  # a copy of another array
            src = self.names[expr]
            if inplace:
                return [f"{name}[...] = {src}"]
            copy = "" if expr in fresh else ".copy()"
            fresh.add(target)
            return [f"{name} = {src}{copy}"]
        fresh.add(target)
        if not opt.is_array(expr):
            value = self.scal(expr)
            return [
                f"{name}[...] = {value}" if inplace else f"{name} = np.full_like(param, {value})"
            ]
        split = self._linear_split(target, expr)
        if split is None:
            text = self.arr(self.hoist(expr))
            return [f"{name}[...] = {text}" if inplace else f"{name} = {text}"]
        # target = c*target + rest  ->  target *= c; target += rest (same association in both)
        c, rest = split
        lines, pure = [], name
        if c != 1:
            factor = self._factor(c)
            lines.append(f"{name} *= {self.scal(factor)}")
            pure = f"{self.paren(factor, PRECEDENCE['Mul'])} * {name}"
        if rest != 0:
            negative = rest.could_extract_minus_sign()
            body = self.hoist(-rest if negative else rest)
            op = "-" if negative else "+"
            lines.append(f"{name} {op}= {self.arr(body)}")
            pure = f"{pure} {op} {self.paren(body, PRECEDENCE['Add'])}"
        return lines if inplace else [f"{name} = {pure}"]

    # -- the whole program -----------------------------------------------------------------

    def body(self, inplace: bool) -> list[str]:
        """The statements of ``step`` (pure) or ``step_inplace``, one comment per equation."""
        opt = self.opt
        self.namer.taken, self.namer.counter = set(self._taken), 0  # t0, t1, ... per function
        fresh: set = set()
        out: list[str] = []
        for k, (lhs, rhs) in enumerate(opt.updates):
            self._later_targets = {
                target
                for target, _ in opt.updates[k + 1 :]
                if target in self.arrays and target.name not in opt.intermediates
            }
            if not _scalar_condition(opt, rhs):
                self.temps, self.temp_lines = {}, []
                code = self.assign(lhs, rhs, inplace, fresh)
                out.append(f"# {equation_line(lhs, rhs)}")
                out += self.temp_lines + code
                continue
            # a Piecewise on scalars only: an if/elif/else, each branch lowered on its own
            after: set | None = None
            for j, (expr, cond) in enumerate(rhs.args):
                self.temps, self.temp_lines = {}, []
                branch = set(fresh)
                code = self.assign(lhs, expr, inplace, branch)
                if cond == sp.true:
                    out.append("else:")
                else:
                    out.append(f"{'elif' if j else 'if'} {self.scal(cond)}:")
                out.append(f"    # {equation_line(lhs, expr)}")
                out += ["    " + line for line in self.temp_lines + code]
                after = branch if after is None else after & branch
            fresh.clear()
            fresh |= after or set()
        return out


# ---- the module ----------------------------------------------------------------------------


def _tuple(items, bare: bool = True) -> str:
    """Python tuple syntax: ``()``, ``(a,)``/``a,``, ``a, b``/``(a, b)``."""
    if not items:
        return "()"
    text = ", ".join(items) + ("," if len(items) == 1 else "")
    return text if bare and len(items) > 1 else f"({text})"


def _default_text(value) -> str:
    return repr(value if isinstance(value, bool) else float(value))


def timed_updates(opt: Optimizer) -> list[tuple[sp.Symbol, sp.Expr, dict, str | None]]:
    """Each update ``(lhs, rhs, times, lhs_time)`` with the time subscript of every name in
    ``rhs`` (``"t-1"`` for an array before its update in this step, ``"t"`` after it and for
    the gradient and array intermediates, None for scalars) and of the target (None for the
    step counter's own update, written ``t \\leftarrow t + 1``)."""
    state_arrays = {"param", *(n for n, v in opt.state.items() if v == ZEROS)}
    updated: set[str] = set()

    def time(name: str) -> str | None:
        if name in state_arrays:
            return "t" if name in updated else "t-1"
        if name == "grad" or (name in opt.intermediates and opt.symbols[name] in opt.arrays):
            return "t"
        return None

    out = []
    for lhs, rhs in opt.updates:
        times = {s.name: time(s.name) for s in rhs.free_symbols}
        if lhs.name in opt.state and lhs.name not in state_arrays:
            out.append((lhs, rhs, times, None))
        else:
            updated.add(lhs.name)
            out.append((lhs, rhs, times, time(lhs.name)))
    return out


def optimizer_latex(opt: Optimizer) -> dict[str, str]:
    """LaTeX of each update equation, keyed by its target: ``m_{t} = \\beta_{1} m_{t-1} + ...``.

    Arrays carry ``_{t-1}`` before their update in the step and ``_{t}`` after; the step
    counter's own update is written ``t \\leftarrow t + 1``.
    """
    out: dict[str, str] = {}

    def tex_of(name: str, time: str | None) -> str:
        escaped = name.replace("_", "\\_")
        base = opt.tex.get(name) or rf"\mathrm{{{escaped}}}"
        return f"{base}_{{{time}}}" if time else base

    for lhs, rhs, times, lhs_time in timed_updates(opt):
        names = {s: tex_of(s.name, times[s.name]) for s in rhs.free_symbols}
        body = sp.latex(display_order(rhs), symbol_names=names, order="none")
        if lhs.name in opt.state and lhs_time is None:
            out[lhs.name] = f"{tex_of(lhs.name, None)} \\leftarrow {body}"
        else:
            out[lhs.name] = f"{tex_of(lhs.name, lhs_time)} = {body}"
    return out


def optimizer_source(opt: Optimizer, source: str | None = None, command: str | None = None) -> str:
    """The complete, formatted and hash-stamped text of the generated module for ``opt``; its
    header names ``source`` (default: the optimizer itself) and ``command``."""
    from .codegen import format_source, stamp  # ruff: only when rendering
    from .runtime import Runtime

    source = source or f"the optimizer {opt.name!r}"
    command = command or f"symdl generate {opt.name}"

    em = _Emitter(opt)
    pure = em.body(inplace=False)
    inplace = em.body(inplace=True)
    names = em.names
    sym = opt.symbols
    state_vars = [names[sym[n]] for n in opt.state]
    hyper_vars = [names[sym[n]] for n in opt.hyper]
    kwonly = [
        v if opt.hyper[n] is None else f"{v}={_default_text(opt.hyper[n])}"
        for n, v in zip(opt.hyper, hyper_vars)
    ]
    signature = ", ".join(["param", "grad", *state_vars] + (["*", *kwonly] if kwonly else []))

    rt = Runtime()
    for name in em.helpers:  # recorded by the printers as they wrote the calls
        rt.use(name)

    def prepare(inplace: bool) -> list[str]:
        lines = ["param, grad = " + rt.call("_arrays", f"param, grad, inplace={inplace}")]
        for n, v in zip(opt.state, state_vars):
            if opt.state[n] == ZEROS:
                call = rt.call("_state_array", f'"{n}", {v}, param, inplace={inplace}')
            else:
                call = rt.call("_counter", f'"{n}", {v}')
            lines.append(f"{v} = {call}")
        if hyper_vars:
            lines.append(
                f"{_tuple(hyper_vars, bare=True)} = _hyperparameters({', '.join(hyper_vars)})"
            )
        if em.flags.get("dtype"):
            lines.append("dtype = param.dtype")
        return lines

    prepare_pure, prepare_inplace = prepare(False), prepare(True)
    conversions = [
        f"{v} = {'bool' if isinstance(opt.hyper[n], bool) else 'float'}({v})"
        for n, v in zip(opt.hyper, hyper_vars)
    ]
    checks = []
    for cond in opt.requires:
        shown = sorted(cond.free_symbols, key=lambda s: list(opt.hyper).index(s.name))
        got = ", ".join(f"{s.name}={{{names[s]}!r}}" for s in shown)
        checks.append(
            (em.scal(cond), f"{{NAME}}: hyperparameters require {_cond_text(cond)}, got {got}")
        )
    inits = [
        "np.zeros_like(param)" if opt.state[n] == ZEROS else repr(opt.state[n]) for n in opt.state
    ]
    state_doc = [
        f"{n}: {'zeros like param' if v == ZEROS else f'the step count, {v} at first'}"
        for n, v in opt.state.items()
    ]
    hyper_doc = ", ".join(
        n if v is None else f"{n}={_default_text(v)}" for n, v in opt.hyper.items()
    )
    summary = (
        f"{opt.name}: {opt.doc}" if opt.doc else f"{opt.name}: an optimizer generated by symdl."
    )
    defaults = {
        n: v if v is None or isinstance(v, bool) else float(v) for n, v in opt.hyper.items()
    }
    context = {
        "version": __version__,
        "source": source,
        "command": command,
        "digest": "{digest}",
        "summary": summary,
        "equations": [equation_line(lhs, rhs) for lhs, rhs in opt.updates],
        "state_doc": state_doc,
        "hyper_doc": hyper_doc,
        "reference": opt.checks.get("reference"),
        "name": opt.name,
        "state_names": tuple(opt.state),
        "hyper_defaults": defaults,
        "formulas": list(optimizer_latex(opt).items()),
        "uses_math": bool(em.flags.get("math")),
        "signature": signature,
        "init_return": _tuple(inits),
        "prepare_pure": prepare_pure,
        "prepare_inplace": prepare_inplace,
        "hyper_vars": hyper_vars,
        "hyper_return": _tuple(hyper_vars),
        "conversions": conversions,
        "checks": checks,
        "pure": pure,
        "inplace": inplace,
        "returns_pure": _tuple(["param", *state_vars]),
        "returns_pure_doc": _tuple(["param", *(["*STATE"] if opt.state else [])], bare=False),
        "returns_state": _tuple(state_vars),
        "has_arrays": any(v == ZEROS for v in opt.state.values()),
        "helpers": rt.sources(),
    }
    text = environment().get_template("optimizer.py.j2").render(**context)
    return stamp(format_source(text))
