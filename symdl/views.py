"""The sections of a formula report, and the pages made of them: one self-contained HTML page
(MathML, inline SVG, no JavaScript, no network) or one standalone LaTeX document. A section
shows an entry's equations, its derived gradients, the chain rule step by step, its generated
code, and for an elementwise activation a plot of the function and of its derived derivative
computed by the generated module itself; a sequence layer's section shows its scan, an
optimizer's its update rule.

:func:`layer_view`, :func:`sequence_view` and :func:`optimizer_view` build a section from a
definition; symdl/registry.py picks the one for an entry's kind, and symdl/report.py (reports of
catalogue names) renders them with :func:`html_page` or :func:`tex_document`. Also
:class:`Show`, a layer that notebooks display (``_repr_html_``, ``_repr_latex_``).
"""

from __future__ import annotations

import builtins
import dataclasses
import html
import io
import keyword
import math
import re
import tokenize
import unicodedata

import jinja2
import numpy as np
from markupsafe import Markup

from . import __version__
from .derive import Derivation, derive
from .steps import (
    Equation,
    MathMLPrinter,
    Printers,
    Step,
    derivation_steps,
    expand,
    forward_equations,
    gradient_equations,
)
from .templating import new_environment
from .testing import load_module

__all__ = [
    "LayerView",
    "Show",
    "highlight_python",
    "html_page",
    "layer_view",
    "optimizer_view",
    "sequence_view",
    "tex_document",
]


# ---------------------------------------------------------------------------------------------
# Syntax highlighting (tokenize; no dependency)
# ---------------------------------------------------------------------------------------------

_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_"))
_KEYWORDS = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist)
_STRING_TYPES = {tokenize.STRING} | {
    getattr(tokenize, n)
    for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
    if hasattr(tokenize, n)
}


def highlight_python(source: str) -> Markup:
    """Python source as escaped HTML with ``<span class="...">`` around keywords (``kw``),
    builtins (``bi``), names being defined (``fn``), strings (``st``), numbers (``nu``) and
    comments (``cm``). Whitespace is kept exactly, so it belongs in a ``<pre>``."""
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def at(pos):
        row, col = pos
        return offsets[min(row - 1, len(lines))] + col

    out: list[str] = []
    done = 0
    prev = ""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):  # not Python after all: plain text
        return Markup(html.escape(source, quote=False))
    for tok in tokens:
        start, end = at(tok.start), at(tok.end)
        if start < done:
            continue
        if start > done:
            out.append(html.escape(source[done:start], quote=False))
        text = source[start:end]
        cls = None
        if tok.type == tokenize.NAME:
            if prev in ("def", "class"):
                cls = "fn"
            elif tok.string in _KEYWORDS:
                cls = "kw"
            elif tok.string in _BUILTINS:
                cls = "bi"
        elif tok.type in _STRING_TYPES:
            cls = "st"
        elif tok.type == tokenize.NUMBER:
            cls = "nu"
        elif tok.type == tokenize.COMMENT:
            cls = "cm"
        esc = html.escape(text, quote=False)
        out.append(f'<span class="{cls}">{esc}</span>' if cls and text else esc)
        done = max(done, end)
        if tok.type == tokenize.NAME:
            prev = tok.string
        elif tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = ""
    out.append(html.escape(source[done:], quote=False))
    return Markup("".join(out))


# ---------------------------------------------------------------------------------------------
# Plots of elementwise activations
# ---------------------------------------------------------------------------------------------


def is_elementwise(d: Derivation) -> bool:
    """An activation ``y[...] = f(x[...])``: one input, one output, every shape ``("...",)``,
    no constants, every hyperparameter with a numeric default."""
    spec = d.spec
    shapes = spec.shapes()
    return (
        len(spec.args) == 1
        and len(spec.outputs) == 1
        and not spec.consts
        and bool(shapes)
        and all(tuple(dims) == ("...",) for dims in shapes.values())
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec.hyper.values()
        )
    )


@dataclasses.dataclass
class Curve:
    """f and its derivative on a grid, as computed by the generated module."""

    x: np.ndarray
    y: np.ndarray
    dy: np.ndarray


def activation_curve(
    d: Derivation, source: str, lo: float = -4.0, hi: float = 4.0, n: int = 321
) -> Curve:
    """Call the generated module's forward and backward over a grid (the derivative is
    ``backward(ones)``, exact for an elementwise map)."""
    module = load_module(source, d.name)
    x = np.linspace(lo, hi, n)
    y, cache = module.forward(x)
    (dx,) = module.backward(np.ones_like(y), cache)
    return Curve(x, np.asarray(y, dtype=float), np.asarray(dx, dtype=float))


def _nice_step(span: float) -> float:
    raw = span / 6
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _y_range(c: Curve) -> tuple[float, float]:
    vals = np.concatenate([c.y[np.isfinite(c.y)], c.dy[np.isfinite(c.dy)]])
    lo, hi = float(np.min(vals, initial=0.0)), float(np.max(vals, initial=1.0))
    lo, hi = max(lo, -6.0), min(hi, 6.0)
    lo, hi = min(lo, 0.0), max(hi, 1.0)
    pad = 0.08 * (hi - lo)
    return lo - pad, hi + pad


def plot_svg(c: Curve, name: str, width: int = 520, height: int = 300) -> Markup:
    """An inline SVG of f (solid) and f' (dashed) with axes, grid and a legend."""
    ml, mr, mt, mb = 44, 14, 14, 30
    x0, x1 = float(c.x[0]), float(c.x[-1])
    y0, y1 = _y_range(c)

    def px(x):
        return ml + (x - x0) / (x1 - x0) * (width - ml - mr)

    def py(y):
        return mt + (y1 - y) / (y1 - y0) * (height - mt - mb)

    def polyline(ys, cls):
        parts, run = [], []
        for x, y in zip(c.x, ys):
            if np.isfinite(y) and y0 <= y <= y1:
                run.append(f"{px(x):.1f},{py(y):.1f}")
            elif run:
                parts.append(run)
                run = []
        if run:
            parts.append(run)
        return "".join(
            f'<polyline class="{cls}" points="{" ".join(r)}"/>' for r in parts if len(r) > 1
        )

    out = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(name)} and its derivative">'
        )
    ]
    step = _nice_step(y1 - y0)
    k = math.ceil(y0 / step)
    while k * step <= y1:
        v = k * step
        out.append(
            f'<line class="grid" x1="{ml}" x2="{width - mr}" y1="{py(v):.1f}" y2="{py(v):.1f}"/>'
        )
        out.append(
            f'<text class="tick" x="{ml - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>'
        )
        k += 1
    for v in range(math.ceil(x0), math.floor(x1) + 1):
        out.append(
            f'<line class="grid" x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{mt}" y2="{height - mb}"/>'
        )
        out.append(
            f'<text class="tick" x="{px(v):.1f}" y="{height - mb + 16}" text-anchor="middle">{v}</text>'
        )
    out.append(
        f'<line class="axis" x1="{ml}" x2="{width - mr}" y1="{py(0):.1f}" y2="{py(0):.1f}"/>'
    )
    out.append(
        f'<line class="axis" x1="{px(0):.1f}" x2="{px(0):.1f}" y1="{mt}" y2="{height - mb}"/>'
    )
    out.append(polyline(c.y, "f"))
    out.append(polyline(c.dy, "df"))
    lx, ly = ml + 12, mt + 14
    out.append(f'<line class="f" x1="{lx}" x2="{lx + 24}" y1="{ly}" y2="{ly}"/>')
    out.append(f'<text class="legend" x="{lx + 30}" y="{ly + 4}">{html.escape(name)}(x)</text>')
    out.append(f'<line class="df" x1="{lx}" x2="{lx + 24}" y1="{ly + 18}" y2="{ly + 18}"/>')
    out.append(f'<text class="legend" x="{lx + 30}" y="{ly + 22}">derived derivative</text>')
    out.append("</svg>")
    return Markup("".join(out))


def plot_tikz(c: Curve, name: str) -> str:
    """The same plot as a TikZ picture (for the LaTeX report)."""
    x0, x1 = float(c.x[0]), float(c.x[-1])
    y0, y1 = _y_range(c)
    sx, sy = 10.0 / (x1 - x0), 5.0 / (y1 - y0)

    def runs(ys):
        parts, run = [], []
        for x, y in zip(c.x[::2], ys[::2]):
            if np.isfinite(y) and y0 <= y <= y1:
                run.append(f"({(x - x0) * sx:.3f},{(y - y0) * sy:.3f})")
            elif run:
                parts.append(run)
                run = []
        if run:
            parts.append(run)
        return [r for r in parts if len(r) > 1]

    lines = [r"\begin{tikzpicture}"]
    lines.append(rf"\draw[gray!30] (0,0) rectangle ({(x1 - x0) * sx:.3f},{(y1 - y0) * sy:.3f});")
    lines.append(
        rf"\draw[gray] ({0:.3f},{-y0 * sy:.3f}) -- ({(x1 - x0) * sx:.3f},{-y0 * sy:.3f});"
    )
    lines.append(rf"\draw[gray] ({-x0 * sx:.3f},0) -- ({-x0 * sx:.3f},{(y1 - y0) * sy:.3f});")
    for v in range(math.ceil(x0), math.floor(x1) + 1):
        lines.append(rf"\node[below,font=\scriptsize] at ({(v - x0) * sx:.3f},0) {{{v}}};")
    for r in runs(c.y):
        lines.append(r"\draw[blue,thick] " + " -- ".join(r) + ";")
    for r in runs(c.dy):
        lines.append(r"\draw[red,thick,dashed] " + " -- ".join(r) + ";")
    top = (y1 - y0) * sy
    lines.append(
        rf"\draw[blue,thick] (0.3,{top - 0.3:.3f}) -- (0.9,{top - 0.3:.3f}) node[right,black,font=\small] {{{_tex_escape(name)}$(x)$}};"
    )
    lines.append(
        rf"\draw[red,thick,dashed] (0.3,{top - 0.8:.3f}) -- (0.9,{top - 0.8:.3f}) node[right,black,font=\small] {{derived derivative}};"
    )
    lines.append(r"\end{tikzpicture}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Per-layer content
# ---------------------------------------------------------------------------------------------


def _hyper_text(v) -> str:
    if v is None:
        return "required"
    if isinstance(v, type):
        return f"required {v.__name__}"
    if isinstance(v, str):
        return f"defaults to {v}"
    return f"= {v}"


@dataclasses.dataclass
class LayerView:
    """Everything one layer's section shows."""

    name: str
    anchor: str
    doc: str
    arguments: list[dict]
    forward: list
    gradients: list
    steps: list[Step]
    code: str
    plot: Curve | None
    expansion: list | None = None
    expansion_header: str = ""
    equations_title: str = "Equations"
    listing_title: str = ""
    listing: list[str] = dataclasses.field(default_factory=list)  # pseudo-code (a scan)

    @property
    def code_html(self) -> Markup:
        return highlight_python(self.code)

    @property
    def plot_svg(self) -> Markup | None:
        return plot_svg(self.plot, self.name) if self.plot is not None else None

    @property
    def plot_tikz(self) -> str | None:
        return plot_tikz(self.plot, self.name) if self.plot is not None else None


def layer_view(
    d: Derivation,
    style: str = "partial",
    *,
    steps: bool = True,
    code: bool = True,
    plot: bool = True,
    expand_sizes=None,
    source: str | None = None,
) -> LayerView:
    """A layer's section: its arguments, equations, derived gradients, the chain rule step by
    step, a worked instance at ``expand_sizes`` and the generated module (``source``, its
    text; default: generated here, with a header naming the layer)."""
    from .codegen import generate_source

    spec = d.spec
    P = Printers(d.adjoints, style)
    shapes = spec.shapes()
    arguments = [
        {"name": n, "role": spec.tensors[n].role, "shape": ", ".join(shapes[n]) or "scalar"}
        for n in spec.args + spec.consts
    ]
    arguments += [
        {"name": n, "role": "hyperparameter", "shape": _hyper_text(v)}
        for n, v in spec.hyper.items()
    ]
    if source is None:
        source = generate_source(d) if (code or plot) else ""
    curve = activation_curve(d, source) if plot and is_elementwise(d) else None
    view = LayerView(
        name=spec.name,
        anchor=f"layer-{spec.name}",
        doc=spec.doc,
        arguments=arguments,
        forward=forward_equations(d, P),
        gradients=gradient_equations(d, P),
        steps=derivation_steps(d, style) if steps else [],
        code=source if code else "",
        plot=curve,
    )
    if expand_sizes is not None:
        e = expand(d, expand_sizes)
        view.expansion = e.equations(style)
        view.expansion_header = e.header()
    return view


def _noted(eqs: list[Equation], note: str) -> list[Equation]:
    """``eqs`` with ``note`` on the first one (it says where the group runs)."""
    return [dataclasses.replace(e, note=note) if k == 0 else e for k, e in enumerate(eqs)]


def sequence_view(
    seq,
    style: str = "partial",
    *,
    steps: bool = True,
    code: bool = True,
    source: str | None = None,
) -> LayerView:
    """A sequence layer's section: the scan as pseudo-code, the equations of the part hoisted
    out of the time loop and of one step, their derived gradients (one step's backward runs
    for t = T - 1, ..., 0; the hoisted part's once), the chain rule of each part and the
    generated module (``source``, its text; default: generated here)."""
    from .scan import _bptt_text, scan_text, sequence_source

    hoisted, step = seq.derivations()
    if source is None:
        source = sequence_source(seq)
    module = load_module(source, seq.name)
    roles = {n: "input, one per time step" for n in seq.per_step}
    roles.update({n: "initial state" for n in seq.initial.values()})
    roles.update({n: "param" for n in seq.params})
    arguments = [
        {"name": n, "role": roles.get(n, "input"), "shape": ", ".join(module.SHAPES[n])}
        for n in module.ARGS
    ]
    forward, gradients, chain = [], [], []
    if hoisted is not None:
        P = Printers(hoisted.adjoints, style)
        forward += _noted(forward_equations(hoisted, P), "all time steps at once, before the loop")
    P = Printers(step.adjoints, style)
    forward += _noted(forward_equations(step, P), "at each time step t")
    gradients += _noted(gradient_equations(step, P), "at each step, for t = T - 1, ..., 0")
    if hoisted is not None:
        P = Printers(hoisted.adjoints, style)
        gradients += _noted(gradient_equations(hoisted, P), "once, after the loop")
    if steps:
        chain = derivation_steps(hoisted, style) if hoisted is not None else []
        chain += derivation_steps(step, style)
    listing = scan_text(seq) + ["", "backward, for t = T - 1, ..., 0, starting from:"]
    listing += [f"    {line}" for line in _bptt_text(seq, seq.parts())]
    return LayerView(
        name=seq.name,
        anchor=f"layer-{seq.name}",
        doc=seq.doc,
        arguments=arguments,
        forward=forward,
        gradients=gradients,
        steps=chain,
        code=source if code else "",
        plot=None,
        listing_title=f"The scan of {seq.cell.name} over time",
        listing=listing,
    )


def _greek(name: str) -> str | None:
    """``lambda`` -> λ, ``Delta`` -> Δ (None for a name that is no Greek letter)."""
    case = "CAPITAL" if name[:1].isupper() else "SMALL"
    letter = name.upper().replace("LAMBDA", "LAMDA")  # Unicode's spelling
    try:
        return unicodedata.lookup(f"GREEK {case} LETTER {letter}")
    except KeyError:
        return None


_TEX_NAME = re.compile(
    r"^(?:\\tilde\{(?P<tilde>\w)\}|\\mathrm\{(?P<rm>[^{}]+)\}|\\(?P<cmd>[A-Za-z]+)|(?P<plain>\w+))"
    r"(?:_\{(?P<sub>[^{}]+)\})?$"
)


class _NamedMathML(MathMLPrinter):
    """MathML of an optimizer's update: each symbol shown as its LaTeX name says (a Greek
    letter, a tilde, a subscript) with its time subscript (``m_{t-1}``)."""

    def __init__(self, tex: dict[str, str], times: dict[str, str | None]):
        super().__init__({}, "partial")
        self._settings["order"] = "none"
        self.tex, self.times = tex, times

    def name(self, name: str, time: str | None):
        m = _TEX_NAME.match(self.tex.get(name, ""))
        if m is None:
            node = self.mi(name)
        else:
            text = m["plain"] or (m["rm"] or "").replace("\\_", "_")
            if m["tilde"]:
                text = m["tilde"] + "\u0303"
            elif m["cmd"]:
                text = _greek(m["cmd"]) or m["cmd"]
            node = self.mi(text)
            if m["sub"]:
                node = self.el(
                    "msub", node, self.mn(m["sub"]) if m["sub"].isdigit() else self.mi(m["sub"])
                )
        if time:
            head = self.el("mrow", node) if node.tagName == "msub" else node
            base, minus, k = time.partition("-")
            sub = self.row(self.mi(base), self.mo("−"), self.mn(k)) if minus else self.mi(time)
            node = self.el("msub", head, sub)
        return node

    def _print_Symbol(self, sym, style="plain"):
        return self.name(sym.name, self.times.get(sym.name))

    _print_Dummy = _print_Symbol


def optimizer_view(opt, *, code: bool = True, source: str | None = None) -> LayerView:
    """An optimizer's section: its arguments, state and hyperparameters, the update rule in
    execution order (each equation sees what the ones above it assigned) and the generated
    module (``source``, its text; default: generated here). Nothing is derived, so there are no
    gradients and no chain rule."""
    from .optim import (
        ZEROS,
        display_order,
        equation_line,
        optimizer_latex,
        optimizer_source,
        timed_updates,
    )

    arguments = [
        {"name": "param", "role": "parameter, updated", "shape": "any"},
        {"name": "grad", "role": "gradient", "shape": "as param"},
    ]
    for n, init in opt.state.items():
        shape = (
            "as param, zeros at first" if init == ZEROS else f"scalar step count, {init} at first"
        )
        arguments.append({"name": n, "role": "state", "shape": shape})
    arguments += [
        {"name": n, "role": "hyperparameter", "shape": _hyper_text(v)}
        for n, v in opt.hyper.items()
    ]
    latex = optimizer_latex(opt)
    forward = []
    for lhs, rhs, times, lhs_time in timed_updates(opt):
        printer = _NamedMathML(opt.tex, times)
        counter = lhs.name in opt.state and lhs_time is None
        node = printer.row(
            printer.name(lhs.name, lhs_time),
            printer.mo("←" if counter else "="),
            printer._print(display_order(rhs)),
        )
        forward.append(Equation(equation_line(lhs, rhs), latex[lhs.name], printer.math(node)))
    return LayerView(
        name=opt.name,
        anchor=f"layer-{opt.name}",
        doc=opt.doc,
        arguments=arguments,
        forward=forward,
        gradients=[],
        steps=[],
        code=(source if source is not None else optimizer_source(opt)) if code else "",
        plot=None,
        equations_title="Update rule, in this order at every step",
    )


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _html_env() -> jinja2.Environment:
    return new_environment(autoescape=True)


_TEX_SPECIALS = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
    "%": r"\%", "_": r"\_", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}  # fmt: skip


def _tex_escape(text) -> str:
    return "".join(_TEX_SPECIALS.get(ch, ch) for ch in str(text))


def _tex_env() -> jinja2.Environment:
    env = new_environment(
        # LaTeX is full of braces: \VAR{...} and \BLOCK{...} instead of {{ }} and {% %}
        block_start_string=r"\BLOCK{",
        block_end_string="}",
        variable_start_string=r"\VAR{",
        variable_end_string="}",
        comment_start_string=r"\#{",
        comment_end_string="}",
        line_comment_prefix="%#",
    )
    env.filters["tex"] = _tex_escape
    return env


#: The title of a report page.
TITLE = "symdl: layers, derived gradients, step by step"


def html_page(views: list[LayerView], *, style: str = "partial", title: str = TITLE) -> str:
    """One self-contained HTML page (MathML formulas, inline SVG plots, inline CSS; no
    JavaScript, no network) with a table of contents and one section per view."""
    text = (
        _html_env()
        .get_template("report.html.j2")
        .render(page=True, title=title, version=__version__, layers=views, style=style)
    )
    return text.lstrip()


def tex_document(views: list[LayerView], *, style: str = "partial", title: str = TITLE) -> str:
    """A standalone LaTeX document (article; amsmath, listings, tikz, hyperref) with the same
    content as :func:`html_page`."""
    text = (
        _tex_env()
        .get_template("report.tex.j2")
        .render(title=title, version=__version__, layers=views, style=style)
    )
    return text.lstrip()


# ---------------------------------------------------------------------------------------------
# Notebooks
# ---------------------------------------------------------------------------------------------


class Show:
    """A layer (a :class:`~symdl.spec.Layer` or its :class:`Derivation`) for notebooks: the
    equations, derived gradients and (optionally) the steps and a worked instance, displayed as
    HTML with MathML or as LaTeX. :func:`symdl.report.show` makes one from a catalogue name."""

    def __init__(
        self,
        layer,
        *,
        style: str = "partial",
        steps: bool = True,
        code: bool = False,
        expand=None,
    ):
        self.derivation = layer if isinstance(layer, Derivation) else derive(layer)
        self.style = style
        self.view = layer_view(
            self.derivation, style, steps=steps, code=code, plot=True, expand_sizes=expand
        )

    def _repr_html_(self) -> str:
        env = _html_env()
        module = env.get_template("report.html.j2").make_module(
            {"page": False, "title": "", "version": __version__, "layers": [], "style": self.style}
        )
        return str(module.style()) + str(module.fragment(self.view))

    def _repr_latex_(self) -> str:
        v = self.view
        rows = [e.latex for e in v.forward] + [e.latex for e in v.gradients]
        for s in v.steps:
            rows += [e.latex for e in s.equations]
        if v.expansion:
            for _, eqs in v.expansion:
                rows += [e.latex for e in eqs]
        return r"$$\begin{gathered} " + r" \\ ".join(rows) + r" \end{gathered}$$"

    def __repr__(self) -> str:
        from .steps import steps_text

        text = repr(self.derivation)
        if self.view.steps:
            text += "\n" + steps_text(self.derivation, self.style)
        return text
