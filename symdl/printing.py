"""Printers: SymPy expressions to NumPy source, to plain equation text, and names.

:class:`NumpyPrinter` turns an elementwise expression whose tensor occurrences have already
been replaced by symbols (each standing for an array aligned to the statement's index frame)
into NumPy source. It prints only NumPy functions that keep the dtype of their array argument.

Powers of arrays are printed as NumPy computes them fast: ``np.power`` has no fast path for
integer exponents other than 2 (for 4M float64 ``x**3`` takes 12 ms on positive and 500 ms on
negative values, ``x * x * x`` 3 ms), so integer and half-integer exponents up to
:data:`MAX_PRODUCT_POWER` become multiplications, squares (``**2``, which NumPy computes as
``np.square``), ``np.sqrt`` and one division: ``x * x * x``, ``(x**2)**2 * x``,
``1 / (x * x * x)``, ``x * np.sqrt(x)``. A power of a compound base is written this way only
where the base appears once (``((a + b)**2)**2``); otherwise it stays a power, as do powers of
scalars (Python numbers and NumPy scalars have no such slow path).
"""

from __future__ import annotations

import ast
import keyword

import sympy as sp
from sympy.printing.numpy import NumPyPrinter as _SympyNumPyPrinter
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.str import StrPrinter

from .functions import isfinite, relu, sigmoid, softplus, step, stop_gradient, xlogy

#: Names the generated code itself uses; a user name equal to one of these gets a suffix.
RESERVED = frozenset(
    set(keyword.kwlist)
    | set(keyword.softkwlist)
    | {"np", "cache", "dout", "sizes", "dtype", "batch_shape"}
    # the module-level names and builtins the generated functions themselves call
    | {"NAME", "ARGS", "PARAMS", "CONSTS", "OUTPUTS", "SHAPES", "FORMULAS", "HYPERPARAMETERS"}
    | {"INDEX_RANGES", "float", "int", "bool", "range", "min", "max", "len", "tuple", "dict"}
    | {"ValueError", "TypeError", "isinstance", "None", "True", "False"}
)


#: The largest |exponent| of an array power written as multiplications (then ``np.power``).
MAX_PRODUCT_POWER = 8


def _primary(text: str) -> bool:
    """Whether ``text`` is one operand that binds tighter than ``*`` and ``**`` (a name, a
    subscript, an attribute or a call), so it can be repeated without parentheses."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return False
    return isinstance(node, (ast.Name, ast.Subscript, ast.Attribute, ast.Call))


class Namer:
    """One source of Python names for a module: user names kept where possible, temporaries
    ``t0, t1, ...`` that cannot collide with any name already taken."""

    def __init__(self, taken=()):
        self.taken: set[str] = set(RESERVED) | set(taken)
        self.counter = 0

    def claim(self, name: str) -> str:
        cand = name
        while cand in self.taken:
            cand = f"{cand}_"
        self.taken.add(cand)
        return cand

    def temp(self) -> str:
        while f"t{self.counter}" in self.taken:
            self.counter += 1
        name = f"t{self.counter}"
        self.taken.add(name)
        self.counter += 1
        return name


class NumpyPrinter(_SympyNumPyPrinter):
    """SymPy -> NumPy source with ``np.`` prefixes, float literals, stable special functions."""

    def __init__(self, names: dict, arrays: set, helpers: set, flags: dict):
        super().__init__({"fully_qualified_modules": True, "allow_unknown_functions": False})
        self.names = names  # Symbol -> source text
        self.arrays = arrays  # Symbols standing for arrays
        self.helpers = helpers  # helper functions used (filled while printing)
        self.flags = flags  # {"dtype": bool} whether the code needs the dtype variable

    def _print(self, expr, **kwargs):
        text = super()._print(expr, **kwargs)
        # a NumPy function of scalars returns a NumPy scalar, which would promote float32
        # arrays; as a Python float it stays weak
        if (
            isinstance(expr, sp.Basic)
            and (text.startswith("np.") or text.startswith("_sigmoid(") or text.startswith("_erf("))
            and text not in ("np.pi", "np.e")
            and not text.startswith("np.where")
            and not self._is_array(expr)
        ):
            return f"float({text})"
        return text

    def _module_format(self, fqn, register=True):
        text = super()._module_format(fqn, register)
        return "np." + text[len("numpy.") :] if text.startswith("numpy.") else text

    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        return super()._print_Symbol(expr)

    _print_Dummy = _print_Symbol

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Rational(self, expr):
        return repr(float(expr))

    def _print_Half(self, expr):
        return "0.5"

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Pi(self, expr):
        return "np.pi"

    def _print_Exp1(self, expr):
        return "np.e"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.as_base_exp()
        array = self._array_power(base, exp)
        if array is not None:
            return array[0]
        if exp == -1:
            return f"1 / {self.parenthesize(base, PRECEDENCE['Mul'] + 1)}"
        if exp == sp.Rational(1, 2):
            return f"np.sqrt({self._print(base)})"
        if exp == sp.Rational(-1, 2):
            return f"1 / np.sqrt({self._print(base)})"
        if exp.is_Integer and exp < 0:
            return f"1 / {self.parenthesize(base, PRECEDENCE['Pow'])}**{int(-exp)}"
        return super()._print_Pow(expr, rational=rational)

    def _array_power(self, base, exp):
        """``(text, precedence)`` of ``base**exp`` for an array base and an integer or
        half-integer exponent of at most MAX_PRODUCT_POWER, as multiplications, squares, one
        square root and one division; None for the other powers (printed as before)."""
        if not (exp.is_Number and self._is_array(base)):
            return None
        twice = float(2 * exp)
        if not twice.is_integer() or abs(exp) > MAX_PRODUCT_POWER:
            return None
        k, half = divmod(abs(int(twice)), 2)  # |exp| = k + half / 2
        if k < 2 and not (k == 1 and half):  # x**(+-1/2), 1 / x: as before; (x**2: fast)
            return None
        if k == 2 and not half:
            if exp > 0:
                return None  # x**2: NumPy's fast path (np.square)
            return f"1 / {self.parenthesize(base, PRECEDENCE['Pow'])}**2", PRECEDENCE["Mul"]
        text = self._print(base) if base.is_Symbol else None
        if text is None or not _primary(text):
            # a compound base is not repeated: only squares of squares of it
            if half or k & (k - 1):
                return None
            text = self.parenthesize(base, PRECEDENCE["Pow"])
        prod, prec = self._product_power(text, k)
        if half:
            prod, prec = f"{prod} * np.sqrt({text})", PRECEDENCE["Mul"]
        if exp < 0:
            return f"1 / {prod if prec > PRECEDENCE['Mul'] else f'({prod})'}", PRECEDENCE["Mul"]
        return prod, prec

    @staticmethod
    def _product_power(x: str, k: int):
        """``x**k`` (k >= 1) by squaring: ``x * x * x``, ``(x**2)**2``, ``(x * x * x)**2 * x``;
        with its precedence."""
        if k == 1:
            return x, PRECEDENCE["Atom"]
        if k == 3:
            return f"{x} * {x} * {x}", PRECEDENCE["Mul"]
        if k % 2:
            text, prec = NumpyPrinter._product_power(x, k - 1)
            return f"{text} * {x}", PRECEDENCE["Mul"]
        text, prec = NumpyPrinter._product_power(x, k // 2)
        return (f"({text})**2" if prec <= PRECEDENCE["Pow"] else f"{text}**2"), PRECEDENCE["Pow"]

    def parenthesize(self, item, level, strict=False):
        # an array power printed as a product or a quotient binds like one
        prec = precedence(item)
        if isinstance(item, sp.Pow):
            array = self._array_power(*item.as_base_exp())
            if array is not None:
                prec = array[1]
            elif item.exp in (-1, sp.Rational(-1, 2)) or (item.exp.is_Integer and item.exp < 0):
                prec = PRECEDENCE["Mul"]  # 1 / x, 1 / np.sqrt(x), 1 / x**2
        if prec < level or (not strict and prec <= level):
            return f"({self._print(item)})"
        return self._print(item)

    def _print_sigmoid(self, expr):
        self.helpers.add("_sigmoid")
        return f"_sigmoid({self._print(expr.args[0])})"

    def _print_softplus(self, expr):
        return f"np.logaddexp(0, {self._print(expr.args[0])})"

    def _print_relu(self, expr):
        return f"np.maximum({self._print(expr.args[0])}, 0)"

    def _print_step(self, expr):
        return f"np.heaviside({self._print(expr.args[0])}, 0)"

    def _print_isfinite(self, expr):
        return f"np.isfinite({self._print(expr.args[0])})"

    def _print_Heaviside(self, expr):
        h0 = expr.args[1] if len(expr.args) > 1 else sp.Rational(1, 2)
        return f"np.heaviside({self._print(expr.args[0])}, {self._print(h0)})"

    def _print_xlogy(self, expr):
        a, b = (self._print(x) for x in expr.args)
        if not self._is_array(expr.args[1]):  # a constant b: no where() array to promote a
            return f"({self.parenthesize(expr.args[0], 50)} * float(np.log({b})))"
        return f"({self.parenthesize(expr.args[0], 50)} * np.log(np.where({a} == 0, 1, {b})))"

    def _print_stop_gradient(self, expr):
        return self._print(expr.args[0])

    def _print_erf(self, expr):
        self.helpers.add("_erf")
        arg = expr.args[0]
        coeff, rest = arg.as_coeff_Mul()
        if self.flags.get("erf_scale") and coeff.is_Number and coeff != 1 and not rest.is_Number:
            # erf(c*x): the helper scales block by block (no full-size c*x array)
            return f"_erf({self._print(rest)}, {self._print(sp.Float(coeff))})"
        return f"_erf({self._print(arg)})"

    def _print_Abs(self, expr):
        return f"np.abs({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        return f"np.sign({self._print(expr.args[0])})"

    def _nested(self, fn, args):
        args = sorted(args, key=sp.default_sort_key)
        text = self._print(args[0])
        for a in args[1:]:
            text = f"{fn}({text}, {self._print(a)})"
        return text

    def _print_Max(self, expr):
        return self._nested("np.maximum", expr.args)

    def _print_Min(self, expr):
        return self._nested("np.minimum", expr.args)

    def _is_array(self, expr):
        return any(s in self.arrays for s in expr.free_symbols)

    def _print_Piecewise(self, expr):
        pairs = list(expr.args)
        if pairs[-1].cond != sp.true:
            raise ValueError("a Piecewise requires a final 'otherwise' branch")
        text = self._print(pairs[-1].expr)
        for e, c in reversed(pairs[:-1]):
            cond = self._print(c)
            if isinstance(c, sp.core.relational.Relational):
                cond = cond[1:-1]
            text = f"np.where({cond}, {self._print(e)}, {text})"
        if not any(self._is_array(e) for e, _ in pairs):
            self.flags["dtype"] = True
            text = f"{text}.astype(dtype)"
        return text

    def _print_Relational(self, expr):
        if isinstance(expr.lhs, isfinite) and expr.rel_op == ">" and expr.rhs == 0:
            return f"({self._print(expr.lhs)})"  # isfinite(x) > 0 -> np.isfinite(x)
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"({self._print(expr.lhs)} {op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr):
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Not(self, expr):
        return f"~({self._print(expr.args[0])})"


class EquationPrinter(StrPrinter):
    """Equations as text, in the syntax ``symdl derive`` reads (used for code comments)."""

    def _print_Indexed(self, expr):
        idx = ", ".join(self._print(i) for i in expr.indices)
        return f"{self._print(expr.base.label)}[{idx}]"

    def _print_Symbol(self, expr):
        if expr.name == "..." and expr.is_positive:
            return "Size(...)"
        return expr.name

    def _print_Float(self, expr):
        return repr(float(expr))


def equation_text(expr) -> str:
    return EquationPrinter({"order": "none"}).doprint(expr)


# keep these names importable from one place for the printer's method lookup
__all__ = ["Namer", "NumpyPrinter", "EquationPrinter", "equation_text", "RESERVED"]
_ = (isfinite, relu, sigmoid, softplus, step, stop_gradient, xlogy)
