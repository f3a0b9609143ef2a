"""Formulas of a derivation as LaTeX (the plain text of a derivation is in symdl/derive.py).

Adjoints are written ``\\frac{\\partial \\mathcal{L}}{\\partial x_{n,i}}`` (``adjoint="partial"``,
the default) or ``\\bar{x}_{n,i}`` (``adjoint="bar"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy as sp
from sympy.printing.latex import LatexPrinter

if TYPE_CHECKING:  # a function of a derivation; derive itself never needs this module
    from .derive import Contribution, Derivation

#: Names (or the part before an underscore) written as Greek letters: ``alpha`` -> ``\\alpha``.
GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi",
    "omega",
}
_SHORT_GREEK = {"eps": r"\epsilon", "lam": r"\lambda"}


class SymdlLatexPrinter(LatexPrinter):
    """LaTeX with readable tensor names: ``\\mathrm{weight}_{o,i}``, Greek hyperparameters."""

    def __init__(
        self,
        adjoints: dict | None = None,
        style: str = "partial",
        scaled: dict | None = None,
        **settings,
    ):
        super().__init__(settings)
        self.adjoint_of = {v: k for k, v in (adjoints or {}).items()}
        self.style = style
        self.scaled = scaled or {}  # an adjoint held scaled: written as factor times adjoint

    def _name(self, name: str) -> str:
        if name in _SHORT_GREEK:
            return _SHORT_GREEK[name]
        base, _, sub = name.partition("_")
        if base in GREEK:
            head = "\\" + base
        elif len(base) == 1:
            head = base
        else:
            head = rf"\mathrm{{{base}}}"
        if sub:
            return rf"{head}_{{\mathrm{{{sub}}}}}"
        if len(base) > 1 and base[-1].isdigit() and base[:-1].isalpha() and len(base[:-1]) == 1:
            return rf"{base[:-1]}_{{{base[-1]}}}"
        return head

    def _tensor(self, name: str, idx: str) -> str:
        if name in self.adjoint_of:
            target = self._tensor(self.adjoint_of[name], idx)
            if self.style == "bar":
                base = self._tensor(self.adjoint_of[name], "")
                return rf"\bar{{{base}}}" + (f"_{{{idx}}}" if idx else "")
            return rf"\frac{{\partial \mathcal{{L}}}}{{\partial {target}}}"
        head = self._name(name)
        if not idx:
            return head
        if "_" in head and head.endswith("}") and not head.startswith(r"\frac"):
            return rf"{{{head}}}_{{{idx}}}"
        return f"{head}_{{{idx}}}"

    def _print_Indexed(self, expr):
        if str(expr.base.label) in self.scaled:
            return rf"\left({self.scaled_text(expr)}\right)"
        idx = ",".join(self._print(i) for i in expr.indices)
        return self._tensor(str(expr.base.label), idx)

    def scaled_text(self, expr):
        """The scaled adjoint ``de_s[n, c]`` as its factor times the adjoint:
        ``s_{n} \\frac{\\partial L}{\\partial e_{n,c}}``."""
        adj, factor, idx = self.scaled[str(expr.base.label)]
        f = factor.xreplace(dict(zip(idx, expr.indices)))
        text = self._print(f)
        if isinstance(f, sp.Add):  # (1 - g^2) times the adjoint, not 1 - g^2 times it
            text = rf"\left({text}\right)"
        return f"{text} {self._print(sp.IndexedBase(adj)[expr.indices])}"

    def _print_Symbol(self, expr, style="plain"):
        if expr.name == "...":
            return r"\ldots"
        if expr.is_integer and expr.is_positive:  # a dimension size
            return rf"\mathrm{{{expr.name}}}" if len(expr.name) > 1 else expr.name
        return self._tensor(expr.name, "")

    _print_Dummy = _print_Symbol

    def _print_stop_gradient(self, expr, exp=None):
        return rf"\operatorname{{sg}}\left({self._print(expr.args[0])}\right)"


def latex(expr, derivation: Derivation | None = None, style: str = "partial") -> str:
    adj = derivation.adjoints if derivation is not None else None
    scaled = derivation.scaled if derivation is not None else None
    return SymdlLatexPrinter(adj, style, scaled).doprint(expr)


def _lhs(name, idx, derivation, style):
    p = SymdlLatexPrinter(derivation.adjoints, style, derivation.scaled)
    if name in derivation.scaled:
        return p.scaled_text(sp.IndexedBase(name)[idx])
    if not idx:
        return p._tensor(name, "")
    return p._tensor(name, ",".join(p._print(i) for i in idx))


def forward_latex(derivation: Derivation, style: str = "partial") -> dict[str, str]:
    """The user's equations, one LaTeX string per defined tensor."""
    out = {}
    for lhs, rhs in derivation.spec.equations:
        name = str(lhs.base.label) if isinstance(lhs, sp.Indexed) else lhs.name
        idx = tuple(lhs.indices) if isinstance(lhs, sp.Indexed) else ()
        out[name] = f"{_lhs(name, idx, derivation, style)} = {latex(rhs, derivation, style)}"
    return out


def contribution_latex(c: Contribution, derivation: Derivation, style: str = "partial") -> str:
    body = latex(c.body, derivation, style)
    if c.reduce:
        idx = ",".join(latex(i) for i in c.reduce)
        if isinstance(c.body, sp.Add):
            body = rf"\left({body}\right)"
        body = rf"\sum_{{{idx}}} {body}"
    return body


def backward_latex(derivation: Derivation, style: str = "partial") -> dict[str, str]:
    """One equation per adjoint: the sum of its contributions."""
    groups: dict[str, list[Contribution]] = {}
    for c in derivation.backward:
        groups.setdefault(c.target, []).append(c)
    out = {}
    outputs = set(derivation.spec.outputs)
    for target, cs in groups.items():
        tensor = cs[0].tensor
        lhs_idx = cs[0].lhs
        terms = []
        for c in cs:
            if c.lhs != lhs_idx or c.is_gather:
                break
            terms.append(contribution_latex(c, derivation, style))
        else:
            if tensor in outputs:
                # an output that later equations also read: its incoming gradient comes first
                terms.insert(0, _incoming(tensor, lhs_idx, derivation, style))
            out[target] = f"{_lhs(target, lhs_idx, derivation, style)} = " + " + ".join(terms)
            continue
        # gathers or differing index patterns: one accumulation per contribution
        lines = []
        for c in cs:
            lhs = _lhs(target, tuple(c.lhs), derivation, style)
            lines.append(rf"{lhs} \mathrel{{+}}= {contribution_latex(c, derivation, style)}")
        out[target] = r" \\ ".join(lines)
    return out


def _incoming(tensor, idx, derivation, style):
    p = SymdlLatexPrinter({}, style)
    name = p._tensor(tensor, ",".join(p._print(i) for i in idx))
    return rf"\left.\frac{{\partial \mathcal{{L}}}}{{\partial {name}}}\right|_{{\mathrm{{out}}}}"


def formulas(derivation: Derivation, style: str = "partial") -> dict[str, str]:
    out = dict(forward_latex(derivation, style))
    out.update(backward_latex(derivation, style))
    return out


def latex_report(derivation: Derivation) -> str:
    """Every formula of ``derivation`` in one displayed LaTeX block."""
    f = formulas(derivation)
    body = r" \\ ".join(f.values())
    return rf"$\displaystyle \begin{{aligned}} {body.replace(' = ', ' &= ', 0)} \end{{aligned}}$".replace(
        r"\begin{aligned}", r"\begin{gathered}"
    ).replace(r"\end{aligned}", r"\end{gathered}")
