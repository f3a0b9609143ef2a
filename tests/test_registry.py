"""The catalogue (symdl/registry.py): one list of layers, sequence layers and optimizers, names
unique across the kinds, each entry naming the file it is defined in, and one dispatch on the
kind for what the commands do with an entry."""

from __future__ import annotations

import contextlib
import io

import pytest
import sympy as sp
from conftest import ROOT

from symdl import registry
from symdl.cli import main
from symdl.errors import SpecError, SymdlError
from symdl.layers import optimizers, sequences
from symdl.optim import Optimizer
from symdl.parse import parse_layer
from symdl.scan import Sequence
from symdl.spec import Layer

ENTRIES = registry.entries()


def test_entries_are_what_symdl_list_prints_in_its_order():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list"]) == 0
    assert [line.split()[0] for line in out.getvalue().splitlines()] == list(ENTRIES)
    kinds = [e.kind for e in ENTRIES.values()]
    assert kinds == sorted(kinds, key=list(registry.KINDS).index)  # layers, sequences, optimizers
    assert {"layer", "sequence", "optimizer"} == set(kinds)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_an_entry_names_the_file_that_defines_it(name):
    entry = ENTRIES[name]
    assert entry.name == entry.definition.name == name
    assert registry.kind_of(entry.definition) == entry.kind
    assert entry.source.startswith("symdl/layers/") and (ROOT / entry.source).is_file()
    assert f'"{name}"' in (ROOT / entry.source).read_text(encoding="utf-8")
    assert entry.doc and entry.doc in entry.summary
    assert registry.get(name) is entry and registry.resolve(name) is entry
    assert registry.resolve(entry.definition) is entry


def test_the_definitions_are_built_from_the_declarations():
    seq = registry.get("lstm").definition
    assert isinstance(seq, Sequence) and seq.cell is registry.get("lstm_cell").definition
    assert isinstance(registry.get("adam").definition, Optimizer)
    assert isinstance(registry.get("linear").definition, Layer)
    assert list(registry.definitions("sequence")) == [d["name"] for d in sequences.SEQUENCES]
    assert list(registry.definitions("optimizer")) == [d["name"] for d in optimizers.OPTIMIZERS]
    assert registry.layers() == registry.definitions("layer")
    import symdl

    assert symdl.catalogue() == registry.layers()


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(SymdlError, match="entry 'nope' requires a catalogue name") as err:
        registry.get("nope")
    assert "linear" in str(err.value) and "lstm" in str(err.value) and "adam" in str(err.value)
    with pytest.raises(SymdlError, match="layer 'lstm' requires a catalogue name") as err:
        registry.get("lstm", "layer")
    assert "adam" not in str(err.value) and "lstm_cell" in str(err.value)


def test_a_name_given_twice_is_an_error_naming_both(monkeypatch):
    param, grad = sp.symbols("param grad")
    relu = {"name": "relu", "updates": [(param, param - grad)], "hyper": {}}
    monkeypatch.setattr(optimizers, "OPTIMIZERS", [*optimizers.OPTIMIZERS, relu])
    with pytest.raises(SpecError) as err:
        registry.build()
    assert str(err.value) == (
        "catalogue names require uniqueness, got 'relu' twice: the layer in "
        "symdl/layers/activations.py and the optimizer in symdl/layers/optimizers.py"
    )


def test_a_sequence_of_an_unknown_cell_is_an_error(monkeypatch):
    bad = {**sequences.SEQUENCES[0], "cell": "nope_cell", "name": "nope"}
    monkeypatch.setattr(sequences, "SEQUENCES", [bad])
    with pytest.raises(SymdlError, match="the cell of sequence 'nope': layer 'nope_cell'"):
        registry.build()


def test_an_object_outside_the_catalogue_is_an_entry_without_a_file():
    layer = parse_layer("mine", "y[n] = tanh(x[n])", inputs="x")
    entry = registry.resolve(layer)
    assert (entry.name, entry.kind, entry.source) == ("mine", "layer", None)
    text = registry.source(entry)
    assert "from the layer 'mine'" in text and "symdl generate mine" in text
    with pytest.raises(SymdlError, match="requires a name, a Layer, .* got a int"):
        registry.resolve(3)


@pytest.mark.parametrize("name", ["tanh", "rnn", "sgd"])
def test_one_dispatch_for_every_kind(name):
    entry = registry.get(name)
    text = registry.source(entry)
    assert f"from {entry.source}" in text and f"symdl generate {name}" in text
    assert registry.cached_source(entry, use_cache=False) == text
    assert registry.check(entry).ok
    assert registry.text(entry).strip() and registry.formulas(entry)
    view = registry.view(entry, code=True)
    assert view.name == name and view.code == text
