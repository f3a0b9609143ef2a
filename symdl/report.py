"""Formula reports of catalogue entries and of your own layers: one self-contained HTML page
(MathML, inline SVG, no JavaScript, no network) or one standalone LaTeX document, a section per
layer, sequence layer or optimizer (symdl/views.py builds and renders the sections).

Also :func:`show`, a layer that notebooks display (``_repr_html_``, ``_repr_latex_``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import SymdlError
from .registry import entries, get, resolve, view
from .views import TITLE, Show, highlight_python, html_page, tex_document

__all__ = ["Show", "highlight_python", "report_html", "report_tex", "show", "write_report"]

FORMATS = ("html", "tex")


def _views(items, style: str, steps: bool, code: bool) -> list:
    """The sections of ``items``: catalogue names (everything ``symdl list`` prints), entries,
    Layers, Derivations, sequences or optimizers; None or empty: the whole catalogue."""
    if items is None or isinstance(items, str) or not isinstance(items, Iterable):
        items = [] if items is None else [items]
    chosen = [resolve(item) for item in items] or list(entries().values())
    return [view(e, style, steps=steps, code=code) for e in chosen]


def report_html(
    names_or_layers=None,
    *,
    style: str = "partial",
    title: str = TITLE,
    steps: bool = True,
    code: bool = True,
) -> str:
    """One self-contained HTML page with a table of contents and one section per entry.
    ``names_or_layers``: catalogue names, Layers, Derivations, sequences or optimizers
    (default: everything ``symdl list`` prints)."""
    return html_page(_views(names_or_layers, style, steps, code), style=style, title=title)


def report_tex(
    names_or_layers=None,
    *,
    style: str = "partial",
    title: str = TITLE,
    steps: bool = True,
    code: bool = True,
) -> str:
    """A standalone LaTeX document with the same content as :func:`report_html`."""
    return tex_document(_views(names_or_layers, style, steps, code), style=style, title=title)


def write_report(
    path, names: Iterable[str] | None = None, fmt: str = "html", *, style: str = "partial"
) -> Path:
    """Render the report of ``names`` (default: the catalogue) as ``fmt`` (``"html"`` or
    ``"tex"``) and write it to ``path`` atomically. Everything is rendered before anything is
    written. Returns the path."""
    from .cache import write_atomic

    if fmt not in FORMATS:
        raise SymdlError(f"report format requires one of {', '.join(FORMATS)}, got {fmt!r}")
    names = list(names or [])
    text = report_html(names, style=style) if fmt == "html" else report_tex(names, style=style)
    path = Path(path)
    write_atomic(path, text)
    return path


def show(
    name_or_layer, *, style: str = "partial", steps: bool = True, code: bool = False, expand=None
) -> Show:
    """``symdl.report.show("conv2d", expand={"N": 1, ...})`` in a notebook cell displays the
    layer's equations, gradients, steps (and worked instance) as MathML. ``name_or_layer``: a
    catalogue layer's name, a Layer or a Derivation."""
    layer = name_or_layer
    if isinstance(layer, str):
        layer = get(layer, "layer").definition
    return Show(layer, style=style, steps=steps, code=code, expand=expand)
