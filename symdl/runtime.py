"""The runtime helpers a generated module carries: recorded as its code is written.

A generated module depends on NumPy alone, so the few functions its code calls beyond NumPy
(argument checks, ``_sigmoid``, ``_erf``, ...) are copied into it. Code that writes a call to
one records it in the module's :class:`Runtime` (:meth:`Runtime.call`, or :meth:`Runtime.use`
for names the lowering recorded), with the features the call needs; :meth:`Runtime.sources`
then gives the text of exactly those helpers and of the helpers they call, in a fixed order.
Layers, sequences and optimizers all go through it.

The helpers' text comes from templates/runtime.py.j2, rendered with the recorded features (a
module whose shapes have no "..." gets a shape binder without that code), and from
symdl/snippets/erf.py.
"""

from __future__ import annotations

import ast
import functools
import inspect
from pathlib import Path

from .errors import CodegenError
from .templating import environment

#: The features of templates/runtime.py.j2 (see its header), each False unless a call needs it.
FEATURES = ("const", "ellipsis", "stacked", "prebound", "integer")


class _SnippetSource:
    """The functions of a module of symdl/snippets as text, read from its file without importing
    it (the snippets import NumPy, which writing code does not need). ``hasattr`` tells whether
    the module defines a function; :func:`snippet` returns its text as ``inspect.getsource``
    does."""

    def __init__(self, name: str):
        self.__path = Path(__file__).resolve().parent / "snippets" / f"{name}.py"
        self.__texts: dict[str, str] | None = None

    def _texts(self) -> dict[str, str]:
        if self.__texts is None:
            self.__texts = _functions(self.__path.read_text(encoding="utf-8"))
        return self.__texts

    def __getattr__(self, name: str) -> str:
        try:
            return self._texts()[name]
        except KeyError:
            raise AttributeError(name) from None


erf_snippet = _SnippetSource("erf")
extras = _SnippetSource("extras")


def snippet(module, name: str) -> str:
    """The text of function ``name`` of a snippet module (or of an imported module)."""
    if isinstance(module, _SnippetSource):
        return getattr(module, name).rstrip() + "\n"
    return inspect.getsource(getattr(module, name)).rstrip() + "\n"


def _functions(text: str) -> dict[str, str]:
    """The top-level functions (and classes) of Python source ``text``, by name, in order."""
    lines = text.splitlines(True)
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = "".join(lines[first - 1 : node.end_lineno]).rstrip() + "\n"
    return out


@functools.cache
def _helpers(features: frozenset) -> dict[str, tuple[str, frozenset]]:
    """Every helper's text for ``features``, with the helpers it calls, in their fixed order."""
    flags = {f: f in features for f in FEATURES}
    texts = _functions(environment().get_template("runtime.py.j2").render(**flags))
    texts.update(erf_snippet._texts())
    out = {}
    for name, text in texts.items():
        called = {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}
        out[name] = (text, frozenset(called & texts.keys() - {name}))
    return out


class Runtime:
    """The helpers one generated module calls, and the features those calls need."""

    def __init__(self):
        self.used: set[str] = set()
        self.features: set[str] = set()

    def call(self, helper: str, args: str, *features: str) -> str:
        """The text ``helper(args)``, recorded with the ``features`` this call needs."""
        self.use(helper, *features)
        return f"{helper}({args})"

    def use(self, helper: str, *features: str) -> None:
        """Record that the module calls ``helper`` (written elsewhere) with ``features``."""
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise CodegenError(
                f"runtime features require names from {', '.join(FEATURES)}, "
                f"got {', '.join(sorted(unknown))}"
            )
        self.used.add(helper)
        self.features.update(features)

    def sources(self) -> list[str]:
        """The text of each helper called, and of the helpers those call, in a fixed order."""
        helpers = _helpers(frozenset(self.features))
        unknown = self.used - helpers.keys()
        if unknown:
            raise CodegenError(
                f"runtime helpers require names from {', '.join(helpers)}, "
                f"got {', '.join(sorted(unknown))}"
            )
        needed: set[str] = set()
        todo = list(self.used)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo += helpers[name][1]
        return [text for name, (text, _) in helpers.items() if name in needed]
