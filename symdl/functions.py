"""The formula sheet: functions symdl knows, their derivatives, and how each is printed.

Goals of the rules below:

* Reuse forward values: every derivative is written through the function itself where the
  textbook does (sigmoid' = sigmoid (1 - sigmoid)), so the derivation stage can substitute the
  cached forward output instead of recomputing it.
* No dtype-promoting constants: the NumPy forms use only NumPy functions that keep the
  argument's dtype, with Python scalars (which NumPy treats as weak).
* Numerically stable forms: softplus through ``logaddexp``, sigmoid through ``exp(-softplus(-x))``;
  no overflow for |x| up to 1e3 in float32 or float64.

Derivatives SymPy already knows (exp, log, tanh, erf, Abs, Piecewise, ...) come from SymPy.
The reductions ``Sum`` and ``Max`` over index symbols are expressions of their own
(:class:`IndexSum`, :class:`IndexMax`); the derivation stage hoists each into a named
intermediate before any derivative is taken, so they never meet ``sympy.diff``.
"""

from __future__ import annotations

import sympy as sp

from .errors import SpecError

# ---------------------------------------------------------------------------------------------
# Elementwise functions SymPy lacks. One class each; ``fdiff`` is the formula-sheet entry.
# ---------------------------------------------------------------------------------------------


class _SheetFunction(sp.Function):
    """A formula-sheet function; ``_value`` gives its value at numbers (for ``evalf``)."""

    def _value(self):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _eval_evalf(self, prec):
        if not all(a.is_number for a in self.args):
            return None
        value = self._value().evalf(prec)
        return value if value.is_Number else None


class sigmoid(_SheetFunction):
    r"""The logistic function 1 / (1 + exp(-x))."""

    nargs = 1

    def _value(self):
        return 1 / (1 + sp.exp(-self.args[0]))

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class softplus(_SheetFunction):
    r"""log(1 + exp(x)), evaluated stably."""

    nargs = 1

    def _value(self):
        return sp.log(1 + sp.exp(self.args[0]))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class relu(_SheetFunction):
    r"""max(x, 0)."""

    nargs = 1

    def _value(self):
        return sp.Max(self.args[0], 0)

    def fdiff(self, argindex=1):
        return step(self.args[0])


class step(_SheetFunction):
    r"""The unit step: 1 for x > 0, else 0 (the derivative of relu, with step(0) = 0)."""

    nargs = 1

    def _value(self):
        return sp.S.One if self.args[0].evalf() > 0 else sp.S.Zero

    def fdiff(self, argindex=1):
        return sp.S.Zero


class isfinite(_SheetFunction):
    r"""1 where x is finite, 0 at an infinity or NaN (NumPy's ``isfinite``): a test of a value,
    such as the -inf of an additive mask, whose derivative is 0."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_number:
            return sp.S.One if x.is_finite else sp.S.Zero
        return None

    def _value(self):
        return sp.S.One if self.args[0].is_finite else sp.S.Zero

    def fdiff(self, argindex=1):
        return sp.S.Zero


class xlogy(_SheetFunction):
    r"""x * log(y), with the convention 0 * log(y) = 0 (PyTorch's ``xlogy``)."""

    nargs = 2

    def _value(self):
        a, b = self.args
        return sp.S.Zero if a.is_zero else a * sp.log(b)

    def fdiff(self, argindex=1):
        a, b = self.args
        return sp.log(b) if argindex == 1 else a / b


class stop_gradient(_SheetFunction):
    r"""The identity in the forward pass, a constant in the backward pass.

    Used for shift-invariant stabilisers such as the max subtracted inside a softmax, where the
    total derivative through the stabiliser is exactly zero.
    """

    nargs = 1

    def _value(self):
        return self.args[0]

    def fdiff(self, argindex=1):
        return sp.S.Zero


#: Name -> class of the elementwise functions above (the formula sheet).
FORMULA_SHEET: dict[str, type[sp.Function]] = {}


def register(cls: type[sp.Function]) -> type[sp.Function]:
    """Add a function to the formula sheet; a second function of the same name is an error."""
    name = cls.__name__
    if name in FORMULA_SHEET:
        raise SpecError(
            f"registering function {name!r} requires a new name, got one already registered; "
            f"registered: {', '.join(sorted(FORMULA_SHEET))}",
            name=name,
        )
    FORMULA_SHEET[name] = cls
    return cls


for _cls in (sigmoid, softplus, relu, step, isfinite, xlogy, stop_gradient):
    register(_cls)


# ---------------------------------------------------------------------------------------------
# Reductions over index symbols.
# ---------------------------------------------------------------------------------------------


class Reduction(sp.Expr):
    """A reduction of ``body`` over the index symbols ``indices`` (ranges come from shapes)."""

    is_commutative = True
    op_name = ""

    def __new__(cls, body, indices):
        body = sp.sympify(body)
        if not isinstance(indices, (tuple, list, sp.Tuple)):
            indices = (indices,)
        indices = sp.Tuple(*indices)
        return sp.Expr.__new__(cls, body, indices)

    @property
    def body(self):
        return self.args[0]

    @property
    def indices(self):
        return tuple(self.args[1])

    @property
    def free_symbols(self):
        return self.body.free_symbols - set(self.indices)

    def _sympystr(self, printer):
        idx = ", ".join(printer._print(i) for i in self.indices)
        return f"{self.op_name}({printer._print(self.body)}, {idx})"

    def _latex(self, printer):
        idx = ",".join(printer._print(i) for i in self.indices)
        body = printer._print(self.body)
        if isinstance(self.body, sp.Add):
            body = rf"\left({body}\right)"
        return rf"{self.latex_op}_{{{idx}}} {body}"


class IndexSum(Reduction):
    """``Sum(body, i)``: the sum of ``body`` over every value of the index ``i``."""

    op_name = "Sum"
    latex_op = r"\sum"


class IndexMax(Reduction):
    """``Max(body, i)``: the maximum of ``body`` over the index ``i``."""

    op_name = "Max"
    latex_op = r"\max"


class Size(sp.Function):
    """The number of values an index symbol takes; replaced by a dimension symbol once the
    shapes are known."""

    nargs = 1

    def _latex(self, printer, exp=None):
        text = rf"\left|{printer._print(self.args[0])}\right|"
        return f"{text}^{{{exp}}}" if exp is not None else text


def Sum(body, *indices):
    """``Sum(body, i)`` or ``Sum(body, (i, j))``: sum over index symbols."""
    return IndexSum(body, _flatten_indices(indices))


def Mean(body, *indices):
    """The mean of ``body`` over index symbols: ``Sum(body, i) / |i|``."""
    idx = _flatten_indices(indices)
    count = sp.Mul(*[Size(i) for i in idx])
    return IndexSum(body, idx) / count


def Max(body, *indices):
    """``Max(body, i)`` reduces over index symbols."""
    return IndexMax(body, _flatten_indices(indices))


def _flatten_indices(indices):
    out = []
    for item in indices:
        if isinstance(item, (tuple, list, sp.Tuple)):
            out.extend(item)
        else:
            out.append(item)
    if not out:
        raise SpecError("a reduction requires at least one index symbol, got none")
    return tuple(out)


#: Elementwise functions accepted in equations, by the name used in equation text.
ELEMENTWISE: dict[str, object] = {
    "exp": sp.exp,
    "log": sp.log,
    "sqrt": sp.sqrt,
    "tanh": sp.tanh,
    "sin": sp.sin,
    "cos": sp.cos,
    "erf": sp.erf,
    "abs": sp.Abs,
    "Abs": sp.Abs,
    "sign": sp.sign,
    "maximum": sp.Max,
    "minimum": sp.Min,
    **FORMULA_SHEET,
}

#: SymPy function classes allowed in an equation (checked for layers built from SymPy objects).
ALLOWED_FUNCTIONS = (
    sp.exp,
    sp.log,
    sp.tanh,
    sp.sin,
    sp.cos,
    sp.erf,
    sp.Abs,
    sp.sign,
    sp.Max,
    sp.Min,
    sp.Piecewise,
    sp.Heaviside,
    *FORMULA_SHEET.values(),
)
