"""Inspecting a derivation: the chain rule step by step, and worked instances on small sizes.

:func:`derivation_steps` walks the derivation the way a textbook does. For a tensor ``A`` and a
generic element ``A[a']`` of it:

1. the chain rule sums over the uses of ``A``: ``dL/dA[a'] = sum over uses T of
   Sum_I dL/dT[I] dT[I]/dA[a']``;
2. each use has a local partial, the scalar derivative of its right side with respect to the
   occurrence ``A[g]`` (``Contribution.partial``);
3. with respect to the generic element, the partial is that local partial times one Kronecker
   delta per index position, ``delta(g_k, a'_k)``; summing over the use's indices, each delta
   whose ``g_k`` is a plain index symbol eliminates that sum (the symbol becomes ``a'_k``), and
   the deltas of affine or gathered positions stay (a scatter-add);
4. the result is the engine's backward statement ``dA[g] (+)= Sum(dT[I] * partial, reduce)``.

The deltas are rendered from the occurrence's index pattern; no ``KroneckerDelta`` algebra is
done. Every equation is available as plain text, LaTeX and presentation MathML.

:func:`expand` evaluates the forward program and the derived backward program element by
element on small concrete sizes, with one SymPy symbol per input element, so that every output
element and every gradient element is an explicit scalar expression, as in a worked example.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import re
from collections.abc import Mapping
from xml.dom import minidom

import numpy as np
import sympy as sp
from sympy.printing.mathml import MathMLPresentationPrinter

from .derive import Contribution, Derivation, derive
from .errors import SymdlError
from .functions import IndexMax, IndexSum, stop_gradient
from .latex import GREEK, SymdlLatexPrinter
from .printing import EquationPrinter
from .spec import (
    ELL,
    Assign,
    Dim,
    integer_hyper,
    is_affine,
    is_index,
    occurrence_indices,
    occurrence_name,
    occurrences,
)

__all__ = [
    "Element",
    "Equation",
    "ExpandError",
    "Expansion",
    "Step",
    "derivation_steps",
    "expand",
    "parse_sizes",
    "steps_latex",
    "steps_text",
]

STYLES = ("partial", "bar")


class ExpandError(SymdlError):
    """A worked instance that cannot be built: sizes missing, or too many elements."""


def _derivation(obj) -> Derivation:
    if isinstance(obj, Derivation):
        return obj
    if isinstance(obj, str):  # names are the catalogue's (symdl/registry.py), a later stage
        raise SymdlError(
            f"steps require a Layer or a Derivation, got the name {obj!r} (the catalogue's "
            f"layer is symdl.registry.get({obj!r}).definition)"
        )
    return derive(obj)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise SymdlError(f"notation requires one of {', '.join(STYLES)}, got {style!r}")


# ---------------------------------------------------------------------------------------------
# Element symbols of worked instances
# ---------------------------------------------------------------------------------------------


class Element(sp.Symbol):
    """One element of a tensor in a worked instance: ``Element("x", (0, 1))`` is ``x[0, 1]``."""

    def __new__(cls, tensor: str, idx=()):
        idx = tuple(int(i) for i in idx)
        # an identifier, so that lambdify takes it as it is (no costly dummification)
        obj = super().__new__(cls, f"{tensor}__{'_'.join(map(str, idx))}", real=True)
        obj.tensor = tensor
        obj.idx = idx
        return obj

    def __getnewargs_ex__(self):
        return ((self.tensor, self.idx), {})

    def _sympystr(self, printer):
        if hasattr(printer, "tensor"):
            return printer.tensor(self.tensor, ", ".join(map(str, self.idx)))
        return f"{self.tensor}[{', '.join(map(str, self.idx))}]" if self.idx else self.tensor

    def _latex(self, printer):
        if hasattr(printer, "_tensor"):
            return printer._tensor(self.tensor, ",".join(map(str, self.idx)))
        return f"{self.tensor}_{{{','.join(map(str, self.idx))}}}" if self.idx else self.tensor


# ---------------------------------------------------------------------------------------------
# Printers: plain text, LaTeX, MathML, with one naming convention
# ---------------------------------------------------------------------------------------------


def _greek_digits(name: str):
    """``beta1`` -> ("beta", "1"): a Greek name with a numeric suffix, else None."""
    m = re.fullmatch(r"([A-Za-z]+?)(\d+)", name)
    if m and m.group(1) in GREEK:
        return m.group(1), m.group(2)
    return None


def _is_adjoint(f, adjoint_of) -> bool:
    if isinstance(f, sp.Indexed):
        return str(f.base.label) in adjoint_of
    if isinstance(f, Element):
        return f.tensor in adjoint_of
    return isinstance(f, sp.Symbol) and f.name in adjoint_of


def _split_adjoints(expr, adjoint_of, style):
    """A product with a denominator and an adjoint factor, as ``(sign, adjoints, rest)``: in
    the partial notation the adjoint is itself a fraction, so it goes in front instead of into
    a numerator (``dL/dy / s -> dL/dy 1/s``, before -> after); None for any other product."""
    if style != "partial":
        return None
    factors = sp.Mul.make_args(expr)
    adj = [f for f in factors if _is_adjoint(f, adjoint_of)]
    if not adj:
        return None
    rest = sp.Mul(*[f for f in factors if not _is_adjoint(f, adjoint_of)])
    if sp.fraction(rest)[1] == 1:
        return None
    sign = ""
    if rest.could_extract_minus_sign():
        sign, rest = "- ", -rest
    return sign, adj, rest


def _primes(sym) -> tuple[str, int]:
    base = sym.name.rstrip("'")
    return base, len(sym.name) - len(base)


class TextPrinter(EquationPrinter):
    """Equation text with adjoints written ``dL/dx[n, i]`` (or ``bar(x)[n, i]``)."""

    def __init__(self, adjoints: Mapping[str, str] | None = None, style: str = "partial"):
        super().__init__({"order": "none"})
        self.adjoint_of = {v: k for k, v in (adjoints or {}).items()}
        self.style = style

    def tensor(self, name: str, idx: str) -> str:
        sub = f"[{idx}]" if idx else ""
        if name in self.adjoint_of:
            base = self.adjoint_of[name]
            return f"bar({base}){sub}" if self.style == "bar" else f"dL/d{base}{sub}"
        return f"{name}{sub}"

    def _print_Indexed(self, expr):
        idx = ", ".join(self._print(i) for i in expr.indices)
        return self.tensor(str(expr.base.label), idx)

    def _print_Symbol(self, expr):
        if isinstance(expr, Element):
            return self.tensor(expr.tensor, ", ".join(map(str, expr.idx)))
        if expr.name in self.adjoint_of:
            return self.tensor(expr.name, "")
        return super()._print_Symbol(expr)

    _print_Dummy = _print_Symbol

    def _print_stop_gradient(self, expr):
        return f"stop_gradient({self._print(expr.args[0])})"


class LatexPrinter(SymdlLatexPrinter):
    """:class:`symdl.latex.SymdlLatexPrinter` with primed indices, element symbols, Greek
    names with numeric suffixes (``beta1`` -> ``\\beta_{1}``) and short floats."""

    def _name(self, name: str) -> str:
        gd = _greek_digits(name)
        if gd:
            return rf"\{gd[0]}_{{{gd[1]}}}"
        return super()._name(name)

    def _print_Symbol(self, expr, style="plain"):
        if isinstance(expr, Element):
            return self._tensor(expr.tensor, ",".join(map(str, expr.idx)))
        if isinstance(expr, Dim) and expr.name == "...":
            return r"\left|\ldots\right|"
        if is_index(expr) and expr.name.endswith("'"):
            base, k = _primes(expr)
            return base + "'" * k
        return super()._print_Symbol(expr, style)

    _print_Dummy = _print_Symbol

    def _print_Float(self, expr):
        return super()._print_Float(sp.Float(float(expr)))

    def _print_Mul(self, expr):
        split = _split_adjoints(expr, self.adjoint_of, self.style)
        if split is None:
            return super()._print_Mul(expr)
        sign, adj, rest = split
        parts = [self._print(a) for a in adj]
        if rest != 1:
            parts.append(self._print(rest))
        return sign + r" \, ".join(parts)

    def _print_Piecewise(self, expr):
        rows = []
        for e, c in expr.args:
            cond = r"\text{otherwise}" if c == sp.true else rf"\text{{if }} {self._print(c)}"
            rows.append(f"{self._print(e)} & {cond}")
        return r"\begin{cases} " + r" \\ ".join(rows) + r" \end{cases}"


_GREEK_CHARS = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν",
    "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ", "upsilon": "υ", "phi": "φ",
    "chi": "χ", "psi": "ψ", "omega": "ω", "eps": "ε", "lam": "λ",
}  # fmt: skip


class MathMLPrinter(MathMLPresentationPrinter):
    """Presentation MathML with the naming of :class:`LatexPrinter` (tensor names with index
    subscripts, adjoints as fractions or bars, Greek hyperparameters), serialized as
    well-formed XML with characters instead of named entities."""

    def __init__(self, adjoints: Mapping[str, str] | None = None, style: str = "partial"):
        super().__init__({"mul_symbol": None})
        self.adjoint_of = {v: k for k, v in (adjoints or {}).items()}
        self.style = style

    # -- DOM helpers
    def el(self, tag: str, *children, text: str | None = None, **attrs):
        node = self.dom.createElement(tag)
        for k, v in attrs.items():
            node.setAttribute(k.rstrip("_"), v)
        if text is not None:
            node.appendChild(self.dom.createTextNode(text))
        for c in children:
            node.appendChild(c)
        return node

    def mi(self, text, **attrs):
        return self.el("mi", text=text, **attrs)

    def mo(self, text, **attrs):
        return self.el("mo", text=text, **attrs)

    def mn(self, text):
        return self.el("mn", text=text)

    def row(self, *children):
        return children[0] if len(children) == 1 else self.el("mrow", *children)

    def fenced(self, node, left="(", right=")"):
        return self.el("mrow", self.mo(left), node, self.mo(right))

    def joined(self, nodes, sep=","):
        out = []
        for k, n in enumerate(nodes):
            if k:
                out.append(self.mo(sep))
            out.append(n)
        return self.row(*out) if out else self.el("mrow")

    # -- names
    def name_node(self, name: str):
        if name in _GREEK_CHARS and name not in ("pi",):
            return self.mi(_GREEK_CHARS[name])
        gd = _greek_digits(name)
        if gd:
            return self.el("msub", self.mi(_GREEK_CHARS[gd[0]]), self.mn(gd[1]))
        base, _, sub = name.partition("_")
        if base in _GREEK_CHARS:
            head = self.mi(_GREEK_CHARS[base])
        elif len(base) > 1 and base[-1].isdigit() and base[:-1].isalpha() and len(base[:-1]) == 1:
            head = self.el("msub", self.mi(base[:-1]), self.mn(base[-1]))
        else:
            head = self.mi(base)
        if sub:
            return self.el("msub", head, self.mi(sub))
        return head

    def tensor_node(self, name: str, idx_nodes):
        if name in self.adjoint_of:
            target = self.tensor_node(self.adjoint_of[name], idx_nodes)
            if self.style == "bar":
                base = self.el(
                    "mover", self.name_node(self.adjoint_of[name]), self.mo("¯"), accent="true"
                )
                return self.el("msub", base, self.joined(idx_nodes)) if idx_nodes else base
            return self.el(
                "mfrac",
                self.row(self.mo("∂"), self.mi("ℒ")),
                self.row(self.mo("∂"), target),
            )
        head = self.name_node(name)
        if not idx_nodes:
            return head
        if head.tagName == "msub":  # t_0 with indices: wrap, as {t_0}_{n,i}
            head = self.el("mrow", head)
        return self.el("msub", head, self.joined(idx_nodes))

    # -- printing methods
    def _print_Indexed(self, expr):
        return self.tensor_node(str(expr.base.label), [self._print(i) for i in expr.indices])

    def _print_Symbol(self, sym, style="plain"):
        if isinstance(sym, Element):
            return self.tensor_node(sym.tensor, [self.mn(str(i)) for i in sym.idx])
        if sym.name == "...":
            node = self.mi("…")
            if isinstance(sym, Dim):
                return self.fenced(node, "|", "|")
            return node
        if is_index(sym):
            base, k = _primes(sym)
            return self.mi(base + "′" * k, mathvariant="italic") if k else self.mi(base)
        if isinstance(sym, Dim):
            return self.mi(sym.name)
        return self.tensor_node(sym.name, [])

    _print_Dummy = _print_Symbol

    def _print_Float(self, expr):
        text = f"{float(expr):.15g}"
        if "e" in text:
            mant, exp = text.split("e")
            return self.row(
                self.mn(mant), self.mo("·"), self.el("msup", self.mn("10"), self.mn(str(int(exp))))
            )
        return self.mn(text)

    def _print_Mul(self, expr):
        split = _split_adjoints(expr, self.adjoint_of, self.style)
        if split is None:
            return super()._print_Mul(expr)
        sign, adj, rest = split
        nodes = [self.mo("-")] if sign else []
        for k, a in enumerate(adj + ([rest] if rest != 1 else [])):
            if k:
                nodes.append(self.mo("\u2062"))
            node = self._print(a)
            nodes.append(self.fenced(node) if isinstance(a, sp.Add) else node)
        return self.el("mrow", *nodes)

    def _reduction(self, expr, op):
        body = self._print(expr.body)
        if isinstance(expr.body, sp.Add):
            body = self.fenced(body)
        under = self.el("munder", self.mo(op), self.joined([self._print(i) for i in expr.indices]))
        return self.el("mrow", under, body)

    def _print_IndexSum(self, expr):
        return self._reduction(expr, "∑")

    def _print_IndexMax(self, expr):
        return self._reduction(expr, "max")

    def _print_stop_gradient(self, expr):
        return self.el("mrow", self.mi("sg"), self.fenced(self._print(expr.args[0])))

    def _print_Size(self, expr):
        return self.fenced(self._print(expr.args[0]), "|", "|")

    def _print_Piecewise(self, expr):
        rows = []
        for e, c in expr.args:
            cond = (
                self.mtext("otherwise")
                if c == sp.true
                else self.row(self.mtext("if\u00a0"), self._print(c))
            )
            rows.append(self.el("mtr", self.el("mtd", self._print(e)), self.el("mtd", cond)))
        table = self.el("mtable", *rows, columnalign="left", displaystyle="true")
        return self.el("mrow", self.mo("{"), table)

    def mtext(self, text):
        return self.el("mtext", text=text)

    def _print_Max(self, expr):
        return self.el(
            "mrow", self.mi("max"), self.fenced(self.joined([self._print(a) for a in expr.args]))
        )

    def _print_Min(self, expr):
        return self.el(
            "mrow", self.mi("min"), self.fenced(self.joined([self._print(a) for a in expr.args]))
        )

    def _print_Exp1(self, expr):
        return self.mi("e")

    def _print_exp(self, expr):
        return self.el("msup", self.mi("e"), self._print(expr.args[0]))

    def _print_BooleanTrue(self, expr):
        return self.mtext("true")

    def _print_BooleanFalse(self, expr):
        return self.mtext("false")

    def doprint(self, expr) -> str:
        return serialize(self._print(expr))

    def math(self, node, display: bool = True) -> str:
        """A complete ``<math>`` element around a DOM node."""
        attrs = {"xmlns": "http://www.w3.org/1998/Math/MathML"}
        if display:
            attrs["display"] = "block"
        _thin_products(node)
        return serialize(self.el("math", node, **attrs))


def _thin_products(node) -> None:
    """A thin space at every invisible times, as ``\\,`` in the LaTeX: ``i stride``, not
    ``istride`` (before -> after)."""
    if node.nodeType == minidom.Node.ELEMENT_NODE:
        if node.tagName == "mo" and len(node.childNodes) == 1:
            text = html.unescape(node.childNodes[0].data)
            if text == "\u2062":
                node.setAttribute("lspace", "0.17em")
        for c in node.childNodes:
            _thin_products(c)


_XML_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}


def _xml_text(text: str) -> str:
    text = html.unescape(text)  # SymPy's raw text nodes hold entities like &InvisibleTimes;
    return "".join(_XML_ESCAPES.get(ch, ch) for ch in text)


def serialize(node) -> str:
    """Well-formed XML of a minidom node (SymPy's own serializer writes raw ``<`` and entity
    names that XML does not define)."""
    if node.nodeType == minidom.Node.TEXT_NODE:
        return _xml_text(node.data)
    attrs = (
        "".join(f' {k}="{_xml_text(v)}"' for k, v in node.attributes.items())
        if node.attributes
        else ""
    )
    inner = "".join(serialize(c) for c in node.childNodes)
    return f"<{node.tagName}{attrs}>{inner}</{node.tagName}>"


@dataclasses.dataclass
class Printers:
    """The three printers of one derivation and notation."""

    adjoints: Mapping[str, str]
    style: str = "partial"

    def __post_init__(self):
        _check_style(self.style)
        self.text = TextPrinter(self.adjoints, self.style)
        self.latex = LatexPrinter(self.adjoints, self.style, mul_symbol=r"\,")
        self.mathml = MathMLPrinter(self.adjoints, self.style)


# ---------------------------------------------------------------------------------------------
# Formula nodes: a small tree rendered to text, LaTeX and MathML
# ---------------------------------------------------------------------------------------------


class Node:
    def text(self, P: Printers) -> str:
        raise NotImplementedError

    def latex(self, P: Printers) -> str:
        raise NotImplementedError

    def mathml(self, P: Printers):
        raise NotImplementedError

    needs_parens = False  # as a factor of a product


@dataclasses.dataclass
class Ex(Node):
    """A SymPy expression."""

    expr: sp.Expr

    @property
    def needs_parens(self):
        return isinstance(self.expr, sp.Add)

    def text(self, P):
        return P.text.doprint(self.expr)

    def latex(self, P):
        return P.latex.doprint(self.expr)

    def mathml(self, P):
        return P.mathml._print(self.expr)


@dataclasses.dataclass
class Partial(Node):
    """``d num / d den``; with ``body``, ``d/d den [body]`` (the derivative of a summand)."""

    num: sp.Expr | None
    den: sp.Expr
    body: sp.Expr | None = None

    def text(self, P):
        if self.body is not None:
            return f"d/d({P.text.doprint(self.den)}) [{P.text.doprint(self.body)}]"
        return f"d({P.text.doprint(self.num)})/d({P.text.doprint(self.den)})"

    def latex(self, P):
        den = P.latex.doprint(self.den)
        if self.body is not None:
            return rf"\frac{{\partial}}{{\partial {den}}}\left[{P.latex.doprint(self.body)}\right]"
        return rf"\frac{{\partial {P.latex.doprint(self.num)}}}{{\partial {den}}}"

    def mathml(self, P):
        m = P.mathml
        den = m.row(m.mo("∂"), m._print(self.den))
        if self.body is not None:
            return m.el(
                "mrow", m.el("mfrac", m.mo("∂"), den), m.fenced(m._print(self.body), "[", "]")
            )
        return m.el("mfrac", m.row(m.mo("∂"), m._print(self.num)), den)


@dataclasses.dataclass
class Delta(Node):
    """The Kronecker delta of two index expressions."""

    a: sp.Expr
    b: sp.Expr

    def text(self, P):
        return f"delta({P.text.doprint(self.a)}, {P.text.doprint(self.b)})"

    def latex(self, P):
        a, b = P.latex.doprint(self.a), P.latex.doprint(self.b)
        simple = is_index(self.a) and is_index(self.b)
        return rf"\delta_{{{a} {b}}}" if simple else rf"\delta_{{{a},\, {b}}}"

    def mathml(self, P):
        m = P.mathml
        sep = [] if (is_index(self.a) and is_index(self.b)) else [m.mo(",")]
        return m.el("msub", m.mi("δ"), m.el("mrow", m._print(self.a), *sep, m._print(self.b)))


@dataclasses.dataclass
class SumOver(Node):
    indices: tuple
    body: Node

    needs_parens = True

    def _body_parens(self):
        return isinstance(self.body, Plus) or (
            isinstance(self.body, Ex) and isinstance(self.body.expr, sp.Add)
        )

    def text(self, P):
        if not self.indices:
            return self.body.text(P)
        idx = ", ".join(P.text.doprint(i) for i in self.indices)
        idx = idx if len(self.indices) == 1 else f"({idx})"
        return f"Sum({self.body.text(P)}, {idx})"

    def latex(self, P):
        if not self.indices:
            return self.body.latex(P)
        body = self.body.latex(P)
        if self._body_parens():
            body = rf"\left({body}\right)"
        idx = ",".join(P.latex.doprint(i) for i in self.indices)
        return rf"\sum_{{{idx}}} {body}"

    def mathml(self, P):
        m = P.mathml
        body = self.body.mathml(P)
        if not self.indices:
            return body
        if self._body_parens():
            body = m.fenced(body)
        under = m.el("munder", m.mo("∑"), m.joined([m._print(i) for i in self.indices]))
        return m.el("mrow", under, body)


@dataclasses.dataclass
class Prod(Node):
    factors: list

    def _parts(self):
        out = []
        for k, f in enumerate(self.factors):
            paren = f.needs_parens and not (isinstance(f, SumOver) and k == len(self.factors) - 1)
            if isinstance(f, Ex) and k > 0 and f.expr.could_extract_minus_sign():
                paren = True
            out.append((f, paren))
        return out

    def text(self, P):
        return " * ".join(f"({f.text(P)})" if p else f.text(P) for f, p in self._parts())

    def latex(self, P):
        return " ".join(
            rf"\left({f.latex(P)}\right)" if p else f.latex(P) for f, p in self._parts()
        )

    def mathml(self, P):
        m = P.mathml
        nodes = []
        for k, (f, p) in enumerate(self._parts()):
            if k:
                nodes.append(m.mo("\u2062"))  # invisible times
            nodes.append(m.fenced(f.mathml(P)) if p else f.mathml(P))
        return m.row(*nodes)

    @property
    def needs_parens(self):
        return False


@dataclasses.dataclass
class Plus(Node):
    terms: list

    needs_parens = True

    def text(self, P):
        return " + ".join(t.text(P) for t in self.terms) if self.terms else "0"

    def latex(self, P):
        return " + ".join(t.latex(P) for t in self.terms) if self.terms else "0"

    def mathml(self, P):
        m = P.mathml
        if not self.terms:
            return m.mn("0")
        nodes = []
        for k, t in enumerate(self.terms):
            if k:
                nodes.append(m.mo("+"))
            nodes.append(t.mathml(P))
        return m.row(*nodes)


@dataclasses.dataclass
class Word(Node):
    """A word or two inside a formula ("given")."""

    words: str

    def text(self, P):
        return self.words

    def latex(self, P):
        return rf"\text{{{self.words}}}"

    def mathml(self, P):
        return P.mathml.mtext(self.words)


@dataclasses.dataclass
class Incoming(Node):
    """The gradient an output receives from outside the layer."""

    expr: sp.Expr

    def text(self, P):
        return f"{P.text.doprint(self.expr)} (incoming)"

    def latex(self, P):
        return rf"\left.{P.latex.doprint(self.expr)}\right|_{{\mathrm{{out}}}}"

    def mathml(self, P):
        m = P.mathml
        return m.el("msub", m.row(m._print(self.expr), m.mo("|")), m.mi("out"))


_REL = {"=": ("=", "=", "="), "+=": ("+=", r"\mathrel{+}=", "+=")}


@dataclasses.dataclass
class Rel(Node):
    """``parts[0] op parts[1] = parts[2] = ...``."""

    parts: list
    op: str = "="

    def text(self, P):
        out = self.parts[0].text(P)
        for k, p in enumerate(self.parts[1:]):
            out += f" {_REL[self.op][0] if k == 0 else '='} {p.text(P)}"
        return out

    def latex(self, P):
        out = self.parts[0].latex(P)
        for k, p in enumerate(self.parts[1:]):
            out += f" {_REL[self.op][1] if k == 0 else '='} {p.latex(P)}"
        return out

    def mathml(self, P):
        m = P.mathml
        nodes = [self.parts[0].mathml(P)]
        for k, p in enumerate(self.parts[1:]):
            nodes.append(m.mo(_REL[self.op][2] if k == 0 else "="))
            nodes.append(p.mathml(P))
        return m.row(*nodes)


@dataclasses.dataclass
class Lines(Node):
    """Several relations shown one below the other (accumulations into one adjoint)."""

    lines: list

    def text(self, P):
        return "; ".join(x.text(P) for x in self.lines)

    def latex(self, P):
        if len(self.lines) == 1:
            return self.lines[0].latex(P)
        return (
            r"\begin{gathered} "
            + r" \\ ".join(x.latex(P) for x in self.lines)
            + r" \end{gathered}"
        )

    def mathml(self, P):
        m = P.mathml
        if len(self.lines) == 1:
            return self.lines[0].mathml(P)
        rows = [m.el("mtr", m.el("mtd", x.mathml(P))) for x in self.lines]
        return m.el("mtable", *rows, columnalign="left", displaystyle="true")


# ---------------------------------------------------------------------------------------------
# Equations and steps
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Equation:
    """One displayed equation: plain text, LaTeX (without math delimiters) and a MathML
    ``<math>`` element; ``note`` says what the equation does."""

    text: str
    latex: str
    mathml: str
    note: str = ""


def render(node: Node, P: Printers, note: str = "") -> Equation:
    return Equation(node.text(P), node.latex(P), P.mathml.math(node.mathml(P)), note)


@dataclasses.dataclass(frozen=True)
class Step:
    """A titled group of equations with an explanation."""

    title: str
    equations: tuple[Equation, ...]
    explanation: str = ""


def _indexed(name: str, idx) -> sp.Expr:
    idx = tuple(idx)
    return sp.IndexedBase(name, real=True)[idx] if idx else sp.Symbol(name, real=True)


def _assign_rhs(a: Assign) -> sp.Expr:
    if a.op == "sum":
        return IndexSum(a.expr, a.reduce)
    if a.op == "max":
        return IndexMax(a.expr, a.reduce)
    return a.expr


def forward_equations(d: Derivation, P: Printers) -> list[Equation]:
    """The layer's equations as written."""
    return [render(Rel([Ex(lhs), Ex(rhs)]), P) for lhs, rhs in d.spec.equations]


def program_equations(d: Derivation, P: Printers) -> list[Equation]:
    """The forward program the engine differentiates: every reduction named, cached function
    values hoisted, arg-max masks recorded."""
    out = []
    for a in d.forward:
        lhs = _indexed(a.target, a.indices)
        if a.op == "argmax":
            window = ", ".join(i.name for i in a.reduce)
            note = f"1 at the first maximum of the window over ({window}), else 0"
            out.append(render(Rel([Ex(lhs), Word("[first arg-max]")]), P, note))
            continue
        out.append(render(Rel([Ex(lhs), Ex(_assign_rhs(a))]), P))
    return out


def _contribution_node(c: Contribution) -> Node:
    body = Ex(c.body)
    return SumOver(tuple(c.reduce), body) if c.reduce else body


def gradient_nodes(d: Derivation) -> dict[str, Node]:
    """One relation per adjoint, as :func:`symdl.latex.backward_latex` groups them."""
    groups: dict[str, list[Contribution]] = {}
    for c in d.backward:
        groups.setdefault(c.target, []).append(c)
    out = {}
    outputs = set(d.spec.outputs)
    for target, cs in groups.items():
        tensor, lhs_idx = cs[0].tensor, cs[0].lhs
        if all(c.lhs == lhs_idx and not c.is_gather for c in cs):
            terms = [_contribution_node(c) for c in cs]
            if tensor in outputs:
                terms.insert(0, Incoming(_indexed(d.adjoints[tensor], lhs_idx)))
            rhs = terms[0] if len(terms) == 1 else Plus(terms)
            out[target] = Rel([Ex(_indexed(target, lhs_idx)), rhs])
        else:
            out[target] = Lines(
                [Rel([Ex(_indexed(target, c.lhs)), _contribution_node(c)], "+=") for c in cs]
            )
    return out


def gradient_equations(d: Derivation, P: Printers) -> list[Equation]:
    """The derived gradients, one equation per adjoint, in the order the backward computes
    them."""
    return [render(n, P) for n in gradient_nodes(d).values()]


def _generic_indices(d: Derivation, tensor: str, cs: list[Contribution]) -> tuple:
    """Index symbols for a generic element ``A[a']``: a plain index symbol used at a position
    gives its primed name, else the dimension's name in lower case; ``...`` stays ``...``."""
    info = d.tensors[tensor]
    names: list[str] = []
    for k, dim in enumerate(info.dims):
        if dim == "...":
            names.append("...")
            continue
        cand = None
        for c in cs:
            ix = c.lhs[k] if k < len(c.lhs) else None
            if ix is not None and is_index(ix) and ix != ELL:
                cand = ix.name
                break
        if cand is None:
            cand = "".join(ch for ch in dim.lower() if ch.isalpha()) or "k"
        cand += "'"
        while cand in names:
            cand += "'"
        names.append(cand)
    return tuple(ELL if n == "..." else sp.Symbol(n, integer=True) for n in names)


def _is_exact_partial(a: Assign, c: Contribution, same_tensor: int) -> bool:
    """Whether ``d T[I] / d A[g]`` equals the derivative of the summand (the occurrence is the
    only one of A, and it fixes every summed index through a plain position)."""
    if same_tensor != 1:
        return False
    if a.op == "map":
        return True
    if a.op == "sum":
        plain = {ix for ix in c.lhs if is_index(ix)}
        return all(j in plain for j in a.reduce)
    return False


def _elimination(c: Contribution, generic: tuple):
    """The deltas of occurrence ``c.occurrence`` against the generic element, and the result
    of summing them out: ``(deltas, remaining sum indices, substitution, residual deltas)``."""
    deltas = []
    subs = {}
    residual_positions = []
    for k, (g, a) in enumerate(zip(c.lhs, generic)):
        if g == ELL:
            continue
        deltas.append((g, a))
        if is_index(g):
            subs[g] = a
        else:
            residual_positions.append((g, a))
    eliminated = set(subs) | ({ELL} if ELL in c.lhs else set())
    remaining = tuple(i for i in c.over if i not in eliminated)
    residual = [(g.xreplace(subs), a) for g, a in residual_positions]
    return deltas, remaining, subs, residual


def _tensor_step(d: Derivation, tensor: str, P: Printers) -> Step:
    spec = d.spec
    cs = [c for c in d.backward if c.tensor == tensor]
    role = d.tensors[tensor].role
    kind = {"input": "input", "param": "parameter"}.get(role, "intermediate")
    title = f"Gradient of the {kind} {tensor}"
    if not cs:
        idx = _generic_indices(d, tensor, [])
        eq = render(Rel([Ex(_indexed(d.adjoints[tensor], idx)), Ex(sp.S.Zero)]), P)
        return Step(
            title, (eq,), f"{tensor} does not reach the outputs (or only through stop_gradient)."
        )
    generic = _generic_indices(d, tensor, cs)
    adj_generic = _indexed(d.adjoints[tensor], generic)
    A_generic = _indexed(tensor, generic)

    uses: dict[int, list[Contribution]] = {}
    for c in cs:
        uses.setdefault(c.source, []).append(c)

    eqs: list[Equation] = []
    # 1. the chain rule over the uses
    terms: list[Node] = []
    if tensor in spec.outputs:
        terms.append(Incoming(adj_generic))
    for pos, cu in uses.items():
        a = d.forward[pos]
        T_I = _indexed(a.target, a.indices)
        dT_I = _indexed(d.adjoints[a.target], a.indices)
        terms.append(SumOver(tuple(a.indices), Prod([Ex(dT_I), Partial(T_I, A_generic)])))
    users = ", ".join(dict.fromkeys(d.forward[p].target for p in uses))
    eqs.append(
        render(
            Rel([Ex(adj_generic), terms[0] if len(terms) == 1 else Plus(terms)]),
            P,
            f"the chain rule: a sum over the uses of {tensor} (in {users})",
        )
    )
    # 2.-4. per use: local partial, deltas, elimination
    for pos, cu in uses.items():
        a = d.forward[pos]
        T_I = _indexed(a.target, a.indices)
        n_occ = len(cu)
        for c in cu:
            if _is_exact_partial(a, c, n_occ):
                local = Partial(T_I, c.occurrence)
                note = "the local partial"
            else:
                local = Partial(None, c.occurrence, a.expr)
                note = (
                    "the local partial of the summand"
                    if a.op in ("sum", "max")
                    else "the local partial through this occurrence"
                )
                if a.op == "max":
                    note += " (routed to the first arg-max)"
            eqs.append(render(Rel([local, Ex(c.partial)]), P, note))
        # the partial with respect to the generic element
        per_occ = []
        for c in cu:
            deltas, *_ = _elimination(c, generic)
            factors = [Delta(g, x) for g, x in deltas]
            if c.partial != 1 or not factors:
                factors.append(Ex(c.partial))
            per_occ.append(Prod(factors))
        inner = per_occ[0] if len(per_occ) == 1 else Plus(per_occ)
        reduce = tuple(a.reduce) if a.op in ("sum", "max") else ()
        eqs.append(
            render(
                Rel([Partial(T_I, A_generic), SumOver(reduce, inner) if reduce else inner]),
                P,
                "with respect to a generic element: one Kronecker delta per index position",
            )
        )
        # summing the deltas out
        for c in cu:
            deltas, remaining, subs, residual = _elimination(c, generic)
            before = SumOver(tuple(c.over), Prod([Delta(g, x) for g, x in deltas] + [Ex(c.body)]))
            after_body = Prod([Delta(g, x) for g, x in residual] + [Ex(c.body.xreplace(subs))])
            after = SumOver(remaining, after_body) if remaining else after_body
            gone = [i.name for i in c.over if i in subs or (i == ELL and ELL in c.lhs)]
            note = (
                f"the deltas eliminate the sums over {', '.join(gone)}"
                if gone
                else "no sum to eliminate"
            )
            if residual:
                note += "; the deltas of the affine or gathered positions remain (a scatter-add)"
            eqs.append(render(Rel([before, after] if gone else [before]), P, note))
    # 5. the derived statements
    for c in cs:
        op = "=" if c.first else "+="
        eqs.append(
            render(
                Rel([Ex(_indexed(c.target, c.lhs)), _contribution_node(c)], op),
                P,
                f"simplified: the derived statement (from the use in {d.forward[c.source].target})",
            )
        )
    total = gradient_nodes(d)[d.adjoints[tensor]]
    if len(cs) > 1 or tensor in spec.outputs:
        eqs.append(render(total, P, "all uses together"))
    times = {1: "once", 2: "twice"}.get(len(cs), f"{len(cs)} times")
    explanation = (
        f"{tensor} is used {times} (in {users}). Each use contributes one term: the gradient "
        f"of the tensor it feeds times the local partial, summed over the indices that the "
        f"occurrence of {tensor} does not fix."
    )
    return Step(title, tuple(eqs), explanation)


def derivation_steps(derivation, style: str = "partial") -> list[Step]:
    """The derivation of a layer (or :class:`Derivation`) walked the way a textbook does: the
    forward equations, the program of named reductions, the incoming gradient, then one step
    per argument (in ``ARGS`` order) and per intermediate (in the order the backward computes
    them): the chain rule over the uses, each local partial, the Kronecker deltas against a
    generic element and their elimination, and the derived result."""
    _check_style(style)
    d = _derivation(derivation)
    P = Printers(d.adjoints, style)
    spec = d.spec
    steps = [
        Step(
            "Forward equations",
            tuple(forward_equations(d, P)),
            f"{spec.name}: {spec.doc}" if spec.doc else spec.name,
        )
    ]
    same = len(d.forward) == len(spec.equations) and all(a.op == "map" for a in d.forward)
    if not same:
        steps.append(
            Step(
                "The forward program",
                tuple(program_equations(d, P)),
                "Each reduction is named (A-normal form) so that every statement is "
                "elementwise or one reduction; function values the backward reuses are cached.",
            )
        )
    seeds = []
    for o in spec.outputs:
        idx = tuple(d.forward[[a.target for a in d.forward].index(o)].indices)
        seeds.append(render(Rel([Ex(_indexed(d.adjoints[o], idx)), Word("given")]), P))
    steps.append(
        Step(
            "The incoming gradient",
            tuple(seeds),
            "The loss L is any scalar function of the outputs; the backward pass receives its "
            "gradient with respect to each output.",
        )
    )
    order = list(spec.args)
    for c in d.backward:
        if c.tensor not in order:
            order.append(c.tensor)
    for t in order:
        steps.append(_tensor_step(d, t, P))
    return steps


def steps_text(derivation, style: str = "partial") -> str:
    """The steps as plain text (for ``symdl show NAME --steps``)."""
    d = _derivation(derivation)
    lines = [f"{d.name}: the chain rule, step by step"]
    for k, s in enumerate(derivation_steps(d, style), 1):
        lines.append(f"{k}. {s.title}")
        if s.explanation:
            lines.append(f"   {s.explanation}")
        for eq in s.equations:
            lines.append(f"     {eq.text}" + (f"    [{eq.note}]" if eq.note else ""))
    return "\n".join(lines)


def steps_latex(derivation, style: str = "partial") -> str:
    """The steps as LaTeX: a ``%`` comment per step and note, one equation per line, without
    math delimiters (for ``symdl show NAME --steps --latex``)."""
    d = _derivation(derivation)
    lines = []
    for k, s in enumerate(derivation_steps(d, style), 1):
        lines.append(f"% {k}. {s.title}")
        for eq in s.equations:
            if eq.note:
                lines.append(f"% {eq.note}")
            lines.append(eq.latex)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Worked instances
# ---------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> dict[str, object]:
    """``"N=1,C=1,H=3,stride=2,eps=0.1"`` -> ``{"N": 1, ..., "eps": 0.1}`` (for ``--expand``).
    ``...`` takes a size like any dimension (``...=4``)."""
    out: dict[str, object] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or not value:
            raise ExpandError(f"a size requires the form NAME=VALUE, got {item!r}")
        try:
            out[name] = int(value)
        except ValueError:
            try:
                out[name] = float(value)
            except ValueError:
                raise ExpandError(
                    f"the size of {name!r} requires a number, got {value!r}"
                ) from None
    return out


@dataclasses.dataclass
class Expansion:
    """A worked instance: every output element and every gradient element of a layer on small
    concrete sizes, as scalar SymPy expressions of the input elements (:class:`Element`) and of
    the incoming gradient's elements.

    ``forward`` and ``backward`` list ``(element, expression)`` pairs in the order they are
    computed: with ``inline=True`` only the outputs and the gradients, written with the input
    elements alone; with ``inline=False`` also every element of the tensors the equations name
    and of their adjoints, each written with the elements computed before it (a worked
    back-propagation by hand).

    Hyperparameters that set sizes or index maps (stride, padding, kernel_size) are numbers;
    the others (eps, alpha, ...) stay symbols, with their values in ``hyper``."""

    derivation: Derivation
    sizes: dict[str, int]
    hyper: dict[str, object]
    symbols: dict[str, np.ndarray]  # argument or constant -> its elements (ints for indices)
    douts: dict[str, np.ndarray]  # output -> the incoming gradient's elements
    forward: list[tuple[sp.Symbol, sp.Expr]]
    backward: list[tuple[sp.Symbol, sp.Expr]]
    outputs: dict[str, np.ndarray]  # output -> its elements' expressions
    gradients: dict[str, np.ndarray]  # argument -> its gradient elements' expressions

    @property
    def name(self) -> str:
        return self.derivation.name

    def element(self, tensor: str, *idx) -> sp.Symbol:
        """The symbol of one element: ``element("x", 0, 1)``; adjoints by their name
        (``element("dy", 0, 1)``)."""
        return Element(tensor, idx)

    def equations(self, style: str = "partial") -> list[tuple[str, list[Equation]]]:
        """``[("forward", [...]), ("gradients", [...])]``, one equation per element."""
        P = Printers(self.derivation.adjoints, style)
        fw = [render(Rel([Ex(k), Ex(v)]), P) for k, v in self.forward]
        bw = [render(Rel([Ex(k), Ex(v)]), P) for k, v in self.backward]
        return [("forward", fw), ("gradients", bw)]

    def header(self) -> str:
        spec = self.derivation.spec
        given = ", ".join(
            f"{k}={v}"
            for k, v in self.sizes.items()
            if k not in spec.derived and k not in spec.hyper_dims
        )
        derived = ", ".join(f"{k}={self.sizes[k]}" for k in spec.derived if k in self.sizes)
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyper.items())
        ints = ", ".join(
            f"{k}={np.asarray(v).tolist()}" for k, v in self.symbols.items() if v.dtype != object
        )
        text = f"{self.name} with {given}"
        if derived:
            text += f" (so {derived})"
        if hyper:
            text += f"; {hyper}"
        if ints:
            text += f"; {ints}"
        return text

    def text(self, style: str = "partial") -> str:
        lines = [self.header()]
        for title, eqs in self.equations(style):
            lines.append("forward:" if title == "forward" else "gradients (derived):")
            lines += [f"  {e.text}" for e in eqs]
        return "\n".join(lines)

    def latex(self, style: str = "partial") -> str:
        lines = [f"% {self.header()}"]
        for title, eqs in self.equations(style):
            lines.append(f"% {title}")
            lines += [e.latex for e in eqs]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def evaluate(self, values: Mapping[str, object], dout=None, **hyper):
        """Numbers for every output and gradient element: ``values`` maps argument and float
        constant names to arrays of the expansion's sizes; ``dout`` is the incoming gradient
        (a tuple for several outputs; default ones); hyperparameters default to ``hyper``.
        Returns ``(outputs, gradients)``, dicts of float64 arrays."""
        from .testing import scalar_functions

        env: dict = {}
        for name, arr in self.symbols.items():
            if arr.dtype != object:
                continue
            if name not in values:
                raise ExpandError(
                    f"evaluating {self.name!r} requires a value of {name!r}, got none"
                )
            given = np.asarray(values[name], dtype=float)
            if given.shape != arr.shape:
                raise ExpandError(
                    f"the value of {name!r} requires shape {arr.shape} (the expansion's sizes), "
                    f"got {given.shape}"
                )
            env.update({arr[idx]: float(given[idx]) for idx in np.ndindex(arr.shape)})
        douts = dout if isinstance(dout, tuple) else (dout,) * len(self.douts)
        for (name, arr), dv in zip(self.douts.items(), douts):
            dv = np.broadcast_to(np.asarray(1.0 if dv is None else dv, dtype=float), arr.shape)
            env.update({arr[idx]: float(dv[idx]) for idx in np.ndindex(arr.shape)})
        for k, v in {**self.hyper, **hyper}.items():
            if v is None:
                raise ExpandError(f"evaluating requires a value of hyperparameter {k!r}, got none")
            env[sp.Symbol(k, real=True)] = float(v)
        funcs = scalar_functions()
        for pairs in (self.forward, self.backward):
            k = 0
            while k < len(pairs):  # one batch per tensor: its elements depend on earlier ones
                label = pairs[k][0].tensor
                batch = []
                while k < len(pairs) and pairs[k][0].tensor == label:
                    batch.append(pairs[k])
                    k += 1
                keys = list(env)
                # plain symbols of the same (identifier) names: lambdify prints them as they are
                args = [sp.Symbol(s.name) for s in keys]
                fn = sp.lambdify(args, [e for _, e in batch], modules=[funcs, "math"])
                for (sym, _), v in zip(batch, fn(*[env[s] for s in keys])):
                    env[sym] = float(v)
        outs = {
            n: np.array(
                [env[Element(n, idx)] for idx in np.ndindex(a.shape)], dtype=float
            ).reshape(a.shape)
            for n, a in self.outputs.items()
        }
        adj = self.derivation.adjoints
        grads = {
            n: np.array(
                [env.get(Element(adj[n], idx), 0.0) for idx in np.ndindex(a.shape)], dtype=float
            ).reshape(a.shape)
            for n, a in self.gradients.items()
        }
        return outs, grads


def _structural_hyper(spec) -> set[str]:
    """Hyperparameters that set sizes or index maps: they need numbers to expand."""
    return integer_hyper(spec)


def _size_hyper(spec) -> set[str]:
    """Hyperparameters in size formulas or index ranges (a stride, a kernel size) but not
    padding widths: they must be at least 1 (the generated module checks the same)."""
    names: set[str] = set(spec.hyper_dims.values())
    for f in spec.derived.values():
        names |= {s.name for s in f.free_symbols if s.name in spec.hyper}
    pads = {
        s.name for widths in spec.pads.values() for w in widths.values() for s in w.free_symbols
    }
    return names - pads


def _sizes_and_hyper(spec, sizes, hyper):
    """Every dimension's size and every hyperparameter's value for a worked instance."""
    given = dict(sizes or {})
    hyper_in = dict(hyper or {})
    for k in list(given):
        if k in spec.hyper:
            hyper_in.setdefault(k, given.pop(k))
    unknown = [k for k in given if k not in spec.dims]
    if unknown:
        raise ExpandError(
            f"expanding {spec.name!r} requires dimension or hyperparameter names, got "
            f"{unknown[0]!r}; dimensions: {', '.join(spec.dims)}"
            + (f"; hyperparameters: {', '.join(spec.hyper)}" if spec.hyper else "")
        )
    hv: dict[str, object] = {k: hyper_in.get(k, default) for k, default in spec.hyper.items()}
    for k, v in hv.items():  # a default naming another hyperparameter (stride = kernel_size)
        if isinstance(v, str):
            hv[k] = hv.get(v)
    structural = _structural_hyper(spec)
    for k in sorted(structural):
        v = hv.get(k)
        if v is None or isinstance(v, (type, str)):
            raise ExpandError(
                f"expanding {spec.name!r} requires a value of hyperparameter {k!r} (it sets a "
                f"size or an index map), got none; give it like {k}=2"
            )
        if isinstance(v, bool) or float(v) != int(float(v)) or int(float(v)) < 0:
            raise ExpandError(f"hyperparameter {k!r} requires a non-negative integer, got {v!r}")
        if k in _size_hyper(spec) and int(float(v)) < 1:  # a stride, a window size: 0 divides
            raise ExpandError(f"hyperparameter {k!r} requires a positive integer, got {v!r}")
        hv[k] = int(float(v))
    hsubs = {sp.Symbol(k, real=True): hv[k] for k in structural}
    for k, v in hv.items():  # flags (causal) are numbers too: their conditions then fold
        if isinstance(v, bool):
            hsubs[sp.Symbol(k, real=True)] = sp.Integer(int(v))

    sz: dict[str, int] = {}
    for k, v in given.items():
        if k == "..." and isinstance(v, (tuple, list)):
            v = int(np.prod(v))
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ExpandError(
                f"the size of dimension {k!r} requires a positive integer, got {v!r}"
            )
        sz[k] = int(v)
    for dname, h in spec.hyper_dims.items():
        sz[dname] = int(hv[h])
    for dname in spec.dims:  # a dimension named by a formula of others: "3*E"
        if dname in spec.derived or not re.search(r"[-+*/]", dname):
            continue
        try:
            f = sp.sympify(dname, locals={x: Dim(x) for x in spec.dims if x.isidentifier()})
            value = int(f.xreplace({Dim(k): v for k, v in sz.items() if k != dname}))
        except (sp.SympifyError, TypeError, ValueError, SyntaxError):
            continue
        if dname in sz and sz[dname] != value:
            raise ExpandError(
                f"dimension {dname!r} requires the size its name computes, {value}, got {sz[dname]}"
            )
        sz[dname] = value
    missing = [x for x in spec.dims if x not in sz and x not in spec.derived]
    if missing:
        raise ExpandError(
            f"expanding {spec.name!r} requires a size for every dimension, got none for "
            f"{', '.join(missing)}; give them like {','.join(f'{m}=2' for m in missing)}",
            missing=missing,
        )
    for dname, formula in spec.derived.items():
        if dname in given:
            raise ExpandError(
                f"dimension {dname!r} requires no size (it is derived: {formula}), got {given[dname]}"
            )
        sz[dname] = int(formula.xreplace({**{Dim(k): v for k, v in sz.items()}, **hsubs}))
        if sz[dname] < 1:
            raise ExpandError(
                f"dimension {dname!r} = {formula} requires at least 1, got {sz[dname]}: the "
                f"window does not fit the input"
            )
    for dname, bound in spec.bounds:
        b = int(bound.xreplace({**{Dim(k): v for k, v in sz.items()}, **hsubs}))
        if sz[dname] > b:
            raise ExpandError(f"dimension {dname!r} = {sz[dname]} requires at most {bound} = {b}")
    for k, v in hv.items():  # a default computed from sizes: scale = 1/sqrt(E)
        if isinstance(v, sp.Basic):
            v = v.xreplace({Dim(x): n for x, n in sz.items()})
            if not v.is_number:
                raise ExpandError(f"hyperparameter {k!r} requires a number, got {v}")
            hv[k] = float(v)
    return sz, hv, hsubs


def _strip_stop_gradient(e):
    """``stop_gradient(u) -> u``: the identity in value (before -> after)."""
    if isinstance(e, sp.Basic) and e.has(stop_gradient):
        return e.replace(lambda x: isinstance(x, stop_gradient), lambda x: x.args[0])
    return e


def expand(
    layer_or_derivation,
    sizes: Mapping[str, object],
    max_elements: int = 400,
    *,
    hyper: Mapping[str, object] | None = None,
    consts: Mapping[str, object] | None = None,
    inline: bool | None = None,
) -> Expansion:
    """A worked instance of a layer (a :class:`Layer` or :class:`Derivation`) on small sizes.

    ``sizes`` gives every dimension of the arguments (``{"N": 1, "C": 1, "H": 3, ...}``;
    ``"..."`` for batch dimensions) and may also give hyperparameters (``stride=2``), as may
    ``hyper``; sizes computed from affine index maps (``OH``) are derived. Integer constants
    (class targets, table indices) take ``consts[name]`` or the values ``0, 1, 2, ...`` modulo
    their range. The program is evaluated element by element with one symbol per element: the
    forward through ``derivation.forward``, the gradients through the derived backward
    statements, so the expressions are what symdl derived (not a fresh ``sympy.diff``).
    ``stop_gradient(u)`` is shown as ``u`` (its value).

    With ``inline=True`` every output and gradient element is written with the input elements
    alone; with ``inline=False`` the tensors the equations name and their adjoints are listed
    element by element too, and later elements refer to them (a worked back-propagation by
    hand, readable where inlining would repeat whole sub-expressions: softmax, attention). The
    default inlines a layer written as one equation and lists the others. ``max_elements`` bounds the total number of elements of the layer's tensors
    (arguments with their padding, intermediates, outputs); raises :class:`ExpandError` when
    it is exceeded or a size is missing.
    """
    return _Expander(layer_or_derivation, sizes, max_elements, hyper, inline).run(consts)


class _Expander:
    """The worked instance of :func:`expand`, one step per method: the arguments' elements,
    the forward element by element, the backward's contributions, the gradients."""

    def __init__(self, layer_or_derivation, sizes, max_elements, hyper, inline):
        self.d = d = _derivation(layer_or_derivation)
        self.spec = spec = d.spec
        self.sz, self.hv, self.hsubs = _sizes_and_hyper(spec, sizes, hyper)
        self.inline = len(spec.equations) == 1 if inline is None else inline
        counts = {t: int(np.prod(self.padded_shape(t))) for t in d.tensors}
        total = sum(counts.values())
        if total > max_elements:
            top = ", ".join(
                f"{t} {n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])[:5]
            )
            raise ExpandError(
                f"expanding {spec.name!r} requires at most {max_elements} elements, got {total} "
                f"({top}); choose smaller sizes or raise max_elements",
                total=total,
            )
        self.fixed = {**{Dim(k): v for k, v in self.sz.items()}, **self.hsubs}
        self.names = set(d.tensors) | set(d.adjoints.values())
        self.named = {
            lhs.base.label.name if isinstance(lhs, sp.Indexed) else lhs.name
            for lhs, _ in spec.equations
        }
        self.symbols: dict[str, np.ndarray] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.forward: list[tuple[sp.Symbol, sp.Expr]] = []
        self.backward: list[tuple[sp.Symbol, sp.Expr]] = []

    def run(self, consts) -> Expansion:
        self.argument_elements(dict(consts or {}))
        self.forward_program()
        douts = self.backward_program()
        gradients = self.gradients()
        outputs = {}
        for o in self.spec.outputs:
            out = np.empty(self.arrays[o].shape, dtype=object)
            for sym, e in self.forward:
                if sym.tensor == o:
                    out[sym.idx] = e
            outputs[o] = out
        shown = {k: v for k, v in self.hv.items() if not isinstance(v, type)}
        return Expansion(
            self.d, self.sz, shown, self.symbols, douts, self.forward, self.backward, outputs,
            gradients,
        )

    # ---- shapes ---------------------------------------------------------------------------
    def shape_of(self, name):
        return tuple(self.sz[x] for x in self.d.tensors[name].dims)

    def pad_width(self, name, p):
        return int(sp.sympify(self.spec.pads[name][p]).xreplace(self.hsubs))

    def padded_shape(self, name):
        widths = self.spec.pads.get(name, {})
        return tuple(
            n + 2 * self.pad_width(name, p) if p in widths else n
            for p, n in enumerate(self.shape_of(name))
        )

    def interior(self, name):
        widths = self.spec.pads.get(name, {})
        return tuple(
            slice(self.pad_width(name, p), self.pad_width(name, p) + n)
            if p in widths
            else slice(None)
            for p, n in enumerate(self.shape_of(name))
        )

    # ---- the elements of the arguments and constants ----------------------------------------
    def argument_elements(self, consts: dict) -> None:
        d, spec, sz = self.d, self.spec, self.sz
        for name in spec.args + spec.consts:
            shape = self.shape_of(name)
            if d.tensors[name].kind == "int":
                bound = sz[spec.gathers[name]] if name in spec.gathers else 2
                if name in consts:
                    vals = np.asarray(consts[name], dtype=int)
                    if vals.shape != shape:
                        raise ExpandError(
                            f"constant {name!r} requires shape {shape}, got {vals.shape}"
                        )
                    if vals.size and (vals.min() < 0 or vals.max() >= bound):
                        raise ExpandError(
                            f"constant {name!r} requires values in [0, {bound}), got "
                            f"{vals.tolist()}"
                        )
                else:
                    vals = (np.arange(int(np.prod(shape))) % bound).reshape(shape)
                self.symbols[name] = self.arrays[name] = vals
                continue
            arr = np.empty(shape, dtype=object)
            for idx in np.ndindex(shape):
                arr[idx] = Element(name, idx)
            self.symbols[name] = arr
            if spec.pads.get(name):
                value = spec.pad_values.get(name, 0.0)
                fill = {float("-inf"): -sp.oo, float("inf"): sp.oo}.get(value, sp.sympify(value))
                if fill == 0:
                    fill = sp.S.Zero
                big = np.full(self.padded_shape(name), fill, dtype=object)
                big[self.interior(name)] = arr
                self.arrays[name] = big
            else:
                self.arrays[name] = arr

    # ---- evaluation -------------------------------------------------------------------------
    def resolve(self, ix, env):
        if is_index(ix):
            return env[ix]
        if isinstance(ix, sp.Indexed):
            return int(self.arrays[occurrence_name(ix)][tuple(env[j] for j in ix.indices)])
        return int(ix.xreplace({**self.fixed, **env}))

    def ranges(self, scope, idx):
        return [range(self.sz[self.spec.index_dims[(scope, i)]]) for i in idx]

    def value_at(self, expr, env, occs, source):
        reps = {}
        for occ in occs:
            arr = source(occurrence_name(occ))
            key = tuple(self.resolve(ix, env) for ix in occurrence_indices(occ))
            reps[occ] = arr[key] if key else arr[()]
        # index symbols may also be values (t > l in a causal mask)
        return expr.xreplace(reps).xreplace(
            {**self.fixed, **{i: sp.Integer(v) for i, v in env.items()}}
        )

    def publish(self, label, out, pairs, keep):
        """Record the elements of ``out`` under ``label``; with ``keep`` the array is replaced by
        the element symbols (later expressions refer to them)."""
        sym = np.empty(out.shape, dtype=object)
        for idx in np.ndindex(out.shape):
            pairs.append((Element(label, idx), _strip_stop_gradient(sp.sympify(out[idx]))))
            sym[idx] = Element(label, idx)
        return sym if keep else out

    # ---- forward ----------------------------------------------------------------------------
    def argmax_mask(self, a, occs, shape):
        """1 at the first maximum of each window of a Max, 0 elsewhere."""
        out = np.empty(shape, dtype=object)
        outer = [i for i in a.indices if i not in a.reduce]
        for opoint in itertools.product(*self.ranges(a.scope, outer)):
            env = dict(zip(outer, opoint))
            window = []
            for rpoint in itertools.product(*self.ranges(a.scope, a.reduce)):
                env.update(zip(a.reduce, rpoint))
                window.append(
                    (
                        tuple(env[i] for i in a.indices),
                        self.value_at(a.expr, env, occs, self.arrays.__getitem__),
                    )
                )
            for k, (key, v) in enumerate(window):  # 1 at the first maximum of the window
                conds = [v > w for _, w in window[:k]] + [v >= w for _, w in window[k + 1 :]]
                out[key] = sp.Piecewise((1, sp.And(*conds)), (0, True))
        return out

    def forward_program(self) -> None:
        d, spec, sz = self.d, self.spec, self.sz
        for a in d.forward:
            occs = occurrences(a.expr, self.names)
            shape = tuple(sz[spec.index_dims[(a.scope, i)]] for i in a.indices)
            if a.op == "argmax":
                self.arrays[a.target] = self.argmax_mask(a, occs, shape)
                continue
            out = np.empty(shape, dtype=object)
            terms: dict[tuple, list] = {}
            for point in itertools.product(*self.ranges(a.scope, a.all_indices)):
                env = dict(zip(a.all_indices, point))
                key = tuple(env[i] for i in a.indices)
                terms.setdefault(key, []).append(
                    self.value_at(a.expr, env, occs, self.arrays.__getitem__)
                )
            for key in np.ndindex(shape):
                vals = terms.get(key, [])
                out[key] = (
                    sp.Add(*vals) if a.op == "sum" else sp.Max(*vals) if a.op == "max" else vals[0]
                )
            if a.target in spec.outputs or (not self.inline and a.target in self.named):
                out = self.publish(a.target, out, self.forward, keep=not self.inline)
            self.arrays[a.target] = out

    # ---- backward ---------------------------------------------------------------------------
    def backward_program(self) -> dict[str, np.ndarray]:
        """Every contribution of the derived backward, element by element; the incoming
        gradients' elements by output."""
        d, spec = self.d, self.spec
        douts: dict[str, np.ndarray] = {}
        self.pending: dict[str, dict[tuple, list]] = {}
        self.adj: dict[str, np.ndarray] = {}
        for o in spec.outputs:
            arr = np.empty(self.arrays[o].shape, dtype=object)
            for idx in np.ndindex(arr.shape):
                arr[idx] = Element(d.adjoints[o], idx)
            douts[o] = arr
            self.pending[o] = {idx: [arr[idx]] for idx in np.ndindex(arr.shape)}
        self.by_adjoint = {v: k for k, v in d.adjoints.items()}
        for c in d.backward:
            occs = occurrences(c.body, self.names)
            if c.tensor in self.adj:
                raise ExpandError(
                    f"the backward program of {spec.name!r} requires every contribution to "
                    f"{c.target} before its first use, got one after"
                )
            acc = self.pending.setdefault(c.tensor, {})
            for point in itertools.product(*self.ranges(d.forward[c.source].scope, c.over)):
                env = dict(zip(c.over, point))
                key = tuple(self.resolve(ix, env) for ix in c.lhs)
                acc.setdefault(key, []).append(self.value_at(c.body, env, occs, self.source))
        return douts

    def adjoint(self, tensor):
        """The adjoint of ``tensor``: its contributions summed, once all are known."""
        if tensor not in self.adj:
            out = np.empty(self.arrays[tensor].shape, dtype=object)
            acc = self.pending.get(tensor, {})
            for idx in np.ndindex(out.shape):
                out[idx] = sp.Add(*acc.get(idx, []))
            if not self.inline and tensor in self.named and tensor not in self.spec.outputs:
                out = self.publish(self.d.adjoints[tensor], out, self.backward, keep=True)
            self.adj[tensor] = out
        return self.adj[tensor]

    def source(self, name):
        if name in self.by_adjoint and name not in self.d.tensors:
            return self.adjoint(self.by_adjoint[name])
        return self.arrays[name]

    def gradients(self) -> dict[str, np.ndarray]:
        """Each argument's gradient, its padding cropped."""
        gradients: dict[str, np.ndarray] = {}
        for name in self.spec.args:
            if self.d.grads.get(name):
                full = self.adjoint(name)
            else:
                full = np.full(self.arrays[name].shape, sp.S.Zero, dtype=object)
            g = full[self.interior(name)]
            out = np.empty(g.shape, dtype=object)
            for idx in np.ndindex(g.shape):
                out[idx] = _strip_stop_gradient(sp.sympify(g[idx]))
                self.backward.append((Element(self.d.adjoints[name], idx), out[idx]))
            gradients[name] = out
        return gradients
