"""The catalogue: every built-in layer, sequence layer and optimizer by name, and the one place
that knows what symdl does with each kind of entry.

The definitions are data in symdl/layers/: the layer families' equations (``FAMILIES``), the
sequence declarations (scans of recurrent cells, built here with :func:`symdl.scan.scan_layer`)
and the optimizers' update rules (built here into :class:`symdl.optim.Optimizer` objects).
:func:`entries` gives them in ``symdl list`` order as :class:`Entry` objects; a name is unique
across the three kinds. What differs between the kinds (the module text, the check, what
``symdl show`` prints, the report's section) is a method of the entry's :class:`Kind`; the
command line, :mod:`symdl.report`, :mod:`symdl.nn` and the cache call the functions here and
never test an object's type themselves.

Pipeline stage: after codegen/scan/optim, testing and the report's views (symdl/views.py);
before the front ends (symdl/cli.py, symdl/report.py, symdl/nn.py). This module imports nothing
heavy itself: each function imports the stage it calls.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path

from .errors import SpecError, SymdlError, unknown_name

#: Where the catalogue's generated modules are kept: ``generated/`` beside the package (a source
#: checkout or an editable install; ``symdl generate`` writes them there by default).
GENERATED = Path(__file__).resolve().parent.parent / "generated"


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
    """One catalogue entry: its ``name`` (also its module's name), its ``kind`` ("layer",
    "sequence" or "optimizer"), its ``definition`` (a :class:`~symdl.spec.Layer` or a
    :class:`~symdl.derive.Derivation`, a :class:`~symdl.scan.Sequence`, an
    :class:`~symdl.optim.Optimizer`), the ``source`` file it is defined in (written into its
    module's header; None for an object outside the catalogue) and its one-line ``doc``."""

    name: str
    kind: str
    definition: object = dataclasses.field(repr=False)
    source: str | None
    doc: str = dataclasses.field(repr=False)

    @property
    def command(self) -> str:
        """The command that regenerates its module (written into the module's header)."""
        return f"symdl generate {self.name}"

    @property
    def summary(self) -> str:
        """Its line in ``symdl list``, after the name."""
        return KINDS[self.kind].label + self.doc


# ---- the kinds -------------------------------------------------------------------------------


class Kind:
    """What symdl does with one kind of entry.

    ``stages``: what ``symdl show --stage`` has for it; ``tools``: the other ``show`` options
    it supports (``steps``, ``expand``); ``label``: the prefix of its line in ``symdl list``.
    """

    name = ""
    label = ""
    stages: tuple[str, ...] = ("derive", "code")
    tools: tuple[str, ...] = ()

    def render(self, entry: Entry, command: str) -> str:
        """The text of the entry's generated module."""
        raise NotImplementedError

    def check(self, module, entry: Entry, tol: float):
        """The check of the entry's module (a result with ``ok`` and a one-line ``str``)."""
        raise NotImplementedError

    def text(self, entry: Entry) -> str:
        """What ``symdl show NAME`` prints."""
        raise NotImplementedError

    def formulas(self, entry: Entry, style: str) -> dict[str, str]:
        """LaTeX by name: what ``symdl show NAME --latex`` prints."""
        raise NotImplementedError

    def view(self, entry: Entry, style: str, steps: bool, code: bool):
        """The entry's section of a report (a :class:`symdl.views.LayerView`), with its module
        as :meth:`render` writes it."""
        raise NotImplementedError

    def refusal(self, entry: Entry, option: str) -> str:
        """Why ``symdl show NAME --OPTION`` does not apply: what the entry is, and what to do."""
        return f"the {self.name} {entry.name!r}"


def _derivation(entry: Entry):
    from .derive import Derivation, derive

    d = entry.definition
    return d if isinstance(d, Derivation) else derive(d)


class LayerKind(Kind):
    name = "layer"
    stages = ("spec", "derive", "lower", "code")
    tools = ("steps", "expand")

    def render(self, entry, command):
        from .codegen import generate_source

        return generate_source(entry.definition, entry.source, command)

    def check(self, module, entry, tol):
        from .testing import gradcheck

        checks = getattr(entry.definition, "checks", {})  # (a Derivation has none)
        return gradcheck(module, checks=checks, tol=tol)

    def text(self, entry):
        return repr(_derivation(entry))

    def formulas(self, entry, style):
        from .latex import formulas

        return formulas(_derivation(entry), style=style)

    def view(self, entry, style, steps, code):
        from .codegen import generate_source
        from .views import layer_view

        d = _derivation(entry)  # derived once, for the section and its module
        text = generate_source(d, entry.source, entry.command)
        return layer_view(d, style, steps=steps, code=code, source=text)


class SequenceKind(Kind):
    name = "sequence"

    def render(self, entry, command):
        from .scan import sequence_source

        return sequence_source(entry.definition, entry.source, command)

    def check(self, module, entry, tol):
        from .testing import gradcheck

        return gradcheck(module, checks=entry.definition.checks, tol=tol)

    def text(self, entry):
        from .scan import report

        return report(entry.definition)

    def formulas(self, entry, style):
        from .scan import sequence_formulas

        return sequence_formulas(entry.definition, style=style)

    def view(self, entry, style, steps, code):
        from .views import sequence_view

        text = self.render(entry, entry.command)
        return sequence_view(entry.definition, style, steps=steps, code=code, source=text)

    def refusal(self, entry, option):
        cell = entry.definition.cell.name
        hint = f"--{option}" + (" SIZES" if option == "expand" else "")
        return (
            f"the sequence {entry.name!r} (a scan of the cell {cell!r}: try 'symdl show {cell} "
            f"{hint}')"
        )


class OptimizerKind(Kind):
    name = "optimizer"
    label = "optimizer: "

    def render(self, entry, command):
        from .optim import optimizer_source

        return optimizer_source(entry.definition, entry.source, command)

    def check(self, module, entry, tol):
        from .testing import check_optimizer

        return check_optimizer(module, entry.definition, tol=tol)

    def text(self, entry):
        """The module's docstring: the update rule, its state and hyperparameters."""
        return source(entry).split('r"""', 1)[1].split('"""', 1)[0].strip()

    def formulas(self, entry, style):
        from .optim import optimizer_latex

        return optimizer_latex(entry.definition)

    def view(self, entry, style, steps, code):
        from .views import optimizer_view

        text = self.render(entry, entry.command) if code else None
        return optimizer_view(entry.definition, code=code, source=text)

    def refusal(self, entry, option):
        return (
            f"the optimizer {entry.name!r} (an update rule, nothing is derived: 'symdl show "
            f"{entry.name}' prints it, --latex as LaTeX, --stage code its module)"
        )


#: The kinds by name, in ``symdl list`` order.
KINDS: dict[str, Kind] = {k.name: k for k in (LayerKind(), SequenceKind(), OptimizerKind())}


def kind(entry: Entry) -> Kind:
    """The :class:`Kind` of ``entry``."""
    return KINDS[entry.kind]


def kind_of(definition) -> str:
    """The kind of ``definition``: a Layer or a Derivation is a "layer", a Sequence a
    "sequence", an Optimizer an "optimizer" (the only place that tells them apart by type)."""
    from .derive import Derivation
    from .optim import Optimizer
    from .scan import Sequence
    from .spec import Layer

    if isinstance(definition, (Layer, Derivation)):
        return "layer"
    if isinstance(definition, Sequence):
        return "sequence"
    if isinstance(definition, Optimizer):
        return "optimizer"
    raise SymdlError(
        "a catalogue entry requires a name, a Layer, a Derivation, a Sequence or an Optimizer, "
        f"got a {type(definition).__name__}"
    )


# ---- the catalogue ---------------------------------------------------------------------------


def _file(module) -> str:
    """``symdl/layers/dense.py`` for the module symdl.layers.dense."""
    return module.__name__.replace(".", "/") + ".py"


def by_name(found: Iterable[Entry]) -> dict[str, Entry]:
    """``found`` by name, in order; a name given twice is an error naming both entries."""
    out: dict[str, Entry] = {}
    for entry in found:
        first = out.get(entry.name)
        if first is not None:
            raise SpecError(
                f"catalogue names require uniqueness, got {entry.name!r} twice: the {first.kind} "
                f"in {first.source} and the {entry.kind} in {entry.source}",
                name=entry.name,
                entries=[first, entry],
            )
        out[entry.name] = entry
    return out


def build() -> dict[str, Entry]:
    """The catalogue built afresh from the definitions in symdl/layers/ (:func:`entries` builds
    it once per process)."""
    from .layers import FAMILIES, optimizers, sequences
    from .optim import Optimizer
    from .scan import scan_layer

    found = [
        Entry(layer.name, "layer", layer, _file(family), layer.doc)
        for family in FAMILIES
        for layer in family.LAYERS
    ]
    cells = {e.name: e.definition for e in found}
    for declared in sequences.SEQUENCES:
        keywords = dict(declared)
        cell, name = keywords.pop("cell"), keywords.pop("name")
        if cell not in cells:
            raise unknown_name("layer", cell, cells).with_context(f"the cell of sequence {name!r}")
        seq = scan_layer(cells[cell], name, **keywords)
        found.append(Entry(name, "sequence", seq, _file(sequences), seq.doc))
    for declared in optimizers.OPTIMIZERS:
        opt = Optimizer(**declared)
        found.append(Entry(opt.name, "optimizer", opt, _file(optimizers), opt.doc))
    return by_name(found)


_catalogue = functools.cache(build)


def entries() -> dict[str, Entry]:
    """Every entry by name, in ``symdl list`` order: the layers family by family, the sequence
    layers, the optimizers. Built once per process."""
    return dict(_catalogue())


def get(name: str, kind: str | None = None) -> Entry:
    """The entry ``name`` (of ``kind``, when given); an unknown name is an error listing the
    known ones."""
    known = {n: e for n, e in _catalogue().items() if kind is None or e.kind == kind}
    if name not in known:
        raise unknown_name(kind or "entry", name, known, SymdlError)
    return known[name]


def definitions(kind: str | None = None) -> dict[str, object]:
    """Every definition by name (of ``kind``, when given), in ``symdl list`` order."""
    return {n: e.definition for n, e in _catalogue().items() if kind is None or e.kind == kind}


def layers() -> dict:
    """Every built-in layer by name (``symdl.catalogue()``)."""
    return definitions("layer")


def resolve(item) -> Entry:
    """``item`` as an entry: a name is looked up, an :class:`Entry` is itself, a definition is
    the catalogue's entry holding it, or an entry outside the catalogue (``source`` None)."""
    if isinstance(item, Entry):
        return item
    if isinstance(item, str):
        return get(item)
    found_kind = kind_of(item)
    known = _catalogue().get(item.name)
    if known is not None and known.definition is item:
        return known
    doc = item.doc if hasattr(item, "doc") else item.spec.doc  # a Derivation: its layer's doc
    return Entry(item.name, found_kind, item, None, doc)


# ---- what the commands do with an entry ------------------------------------------------------


def source(entry: Entry, command: str | None = None) -> str:
    """The text of ``entry``'s generated module (nothing is written); its header names
    ``entry.source`` and ``command`` (default: ``symdl generate NAME``)."""
    return kind(entry).render(entry, command or entry.command)


def cached_source(entry: Entry, use_cache: bool = True) -> str:
    """:func:`source` through the disk cache (symdl/cache.py): an unchanged entry is read back
    instead of derived again."""
    from . import cache

    def parts():
        return {
            "entry": cache.canonical(entry.definition),
            "source": entry.source,
            "command": entry.command,
        }

    return cache.cached("generate", parts, lambda: (source(entry), {}), use=use_cache)[0]


def check(entry: Entry, tol: float = 1e-6):
    """A layer or a sequence gradchecked against finite differences; an optimizer's step
    against its update equations evaluated one by one. Returns the result (``ok``, and a
    one-line ``str``); a failure is reported there, never raised."""
    import numpy as np

    from .testing import load_module

    module = load_module(source(entry), entry.name)
    with np.errstate(all="ignore"):
        return kind(entry).check(module, entry, tol)


def text(entry: Entry) -> str:
    """What ``symdl show NAME`` prints: the equations and what is derived from them."""
    return kind(entry).text(entry)


def formulas(entry: Entry, style: str = "partial") -> dict[str, str]:
    """LaTeX of the entry's equations (and derived gradients) by name."""
    return kind(entry).formulas(entry, style)


def view(entry: Entry, style: str = "partial", *, steps: bool = True, code: bool = True):
    """The entry's section of a report (:class:`symdl.views.LayerView`)."""
    return kind(entry).view(entry, style, steps, code)
