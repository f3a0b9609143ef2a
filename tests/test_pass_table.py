"""Every lowering switch off alone, and all of them off, against the default lowering: the
forward and the backward of every catalogue layer and sequence, in float64.

One table drives it: ``symdl.passes.PASSES``, through ``symdl.lower.OPTIMIZATIONS`` (and
``symdl.scan.OPTIMIZATIONS`` for the sequences). A switch that leaves an entry's module text
unchanged does not apply to it and is not run (every switch applies to some layer: a custom
layer covers the one no catalogue entry exercises); every other variant is imported and run on the entry's test inputs. The
modules are compared before formatting (formatting changes no value), which keeps the whole
table to a couple of seconds per entry. Optimizers are printed from their update equations
without a lowering, so they have no switch to turn off.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import references as R

from symdl import codegen, registry
from symdl.derive import derive
from symdl.lower import OPTIMIZATIONS
from symdl.scan import OPTIMIZATIONS as SCAN_OPTIMIZATIONS
from symdl.scan import sequence_source
from symdl.parse import parse_layer
from symdl.testing import load_module, random_inputs

LAYERS = registry.definitions("layer")
SEQUENCES = registry.definitions("sequence")


def _variants(switches) -> dict[str, dict[str, bool]]:
    """The default, each switch that is on by default turned off alone, and all turned off
    (a switch off by default, such as grouped_matmul, turned on alone)."""
    out = {"default": {}}
    for name, default in switches.items():
        out[f"{name}={not default}"] = {name: not default}
    out["all off"] = {name: False for name in switches}
    return out


@pytest.fixture
def unformatted(monkeypatch):
    monkeypatch.setattr(codegen, "format_source", lambda text: text)


def _outputs(module, args, kwargs, douts=None):
    out, cache = module.forward(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if douts is None:
        rng = np.random.default_rng(7)
        douts = tuple(rng.standard_normal(np.shape(o)) for o in outs)
    grads = module.backward(douts if isinstance(out, tuple) else douts[0], cache)
    return outs + tuple(grads), douts


def _compare(entry, variant, reference, result, names):
    problems = []
    for name, a, b in zip(names, reference, result):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            problems.append(f"{entry} with {variant}: {name} shape {b.shape} != {a.shape}")
            continue
        scale = 1.0 + float(np.max(np.abs(a), initial=0.0))
        if not np.allclose(b, a, rtol=1e-10, atol=1e-12 * scale, equal_nan=True):
            err = float(np.max(np.abs(b - a))) / scale
            problems.append(f"{entry} with {variant}: {name} differs (max rel. error {err:.1e})")
    return problems


#: Custom layers for passes that no catalogue entry exercises, so that every pass of the table
#: is compared with the default on at least one module.
EXTRA = {
    # a factor over a subset of the summed indices multiplied into an operand first (absorb)
    "scaled_contraction": ("y[n, o] = Sum(x[n, i] * w[o, i] * s[i], i)", {"inputs": "x", "params": "w, s"}),
}  # fmt: skip


def _layer(name):
    if name in EXTRA:
        text, decl = EXTRA[name]
        return parse_layer(name, text, **decl)
    return LAYERS[name]


def _inputs(name, module, rng):
    if name in EXTRA:
        return random_inputs(module, rng)
    return R.DOMAINS[name](rng)


@functools.cache
def _texts(name) -> dict[str, str]:
    """The unformatted module text of each variant of layer ``name`` (call under the
    ``unformatted`` fixture)."""
    d = derive(_layer(name))
    return {v: codegen.generate_source(d, options=o) for v, o in _variants(OPTIMIZATIONS).items()}


@pytest.mark.parametrize("name", sorted(LAYERS) + sorted(EXTRA))
def test_every_switch_on_every_layer(name, unformatted, rng):
    texts = _texts(name)
    default = load_module(texts["default"], name)
    args, kwargs = _inputs(name, default, rng)
    reference, douts = _outputs(default, args, kwargs)
    names = [*default.OUTPUTS, *(f"gradient of {a}" for a in default.ARGS)]
    problems = []
    for variant, text in texts.items():
        if variant == "default" or text == texts["default"]:
            continue
        result, _ = _outputs(load_module(text, name), args, kwargs, douts)
        problems += _compare(name, variant, reference, result, names)
    assert not problems, "\n".join(problems)


def test_every_switch_changes_some_layer(unformatted):
    """No pass of the lowering escapes the table: each, flipped alone, changes the module of
    at least one of the layers compared above."""
    changed = set()
    for name in sorted(LAYERS) + sorted(EXTRA):
        texts = _texts(name)
        changed |= {v for v, text in texts.items() if text != texts["default"]}
    unexercised = set(_variants(OPTIMIZATIONS)) - changed - {"default"}
    assert not unexercised, f"switches that change no module: {sorted(unexercised)}"


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_every_switch_on_every_sequence(name, unformatted, rng):
    seq = SEQUENCES[name]
    switches = {**OPTIMIZATIONS, **SCAN_OPTIMIZATIONS}
    texts = {v: sequence_source(seq, options=o) for v, o in _variants(switches).items()}
    default = load_module(texts["default"], name)
    args = R.sequence_args(default, rng)
    reference, douts = _outputs(default, args, {})
    names = [*default.OUTPUTS, *(f"gradient of {a}" for a in default.ARGS)]
    problems = []
    for variant, text in texts.items():
        if variant == "default" or text == texts["default"]:
            continue
        result, _ = _outputs(load_module(text, name), args, {}, douts)
        problems += _compare(name, variant, reference, result, names)
    assert not problems, "\n".join(problems)
    assert texts["all off"] != texts["default"]


def test_the_table_is_the_switches():
    """Every pass of the table is a switch of the lowering or the scan, and back; a pass whose
    requirement is off is off."""
    from symdl.passes import PASSES, resolve

    assert {p.name for p in PASSES} == set(OPTIMIZATIONS) | set(SCAN_OPTIMIZATIONS)
    assert all(p.summary and " -> " in p.summary for p in PASSES)
    off = resolve({"fuse": False}, OPTIMIZATIONS)
    assert not any(off[n] for n in ("blocked", "hoist", "masked_inplace", "merge_terms"))
    assert resolve({"blocked": False}, OPTIMIZATIONS)["hoist"] is False


def test_show_lists_the_passes_and_what_each_changed(capsys):
    from symdl.cli import main
    from symdl.passes import LOWERING, passes

    assert main(["show", "linear", "--stage", "lower"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[3]: line for line in out.splitlines() if line.startswith("#   ")}
    assert list(rows) == [p.name for p in passes(LOWERING)]
    assert "3/3 -> 3/3" in rows["matmul"]  # x @ weight.T against an einsum: same lines, changed
    assert rows["output_reuse"].split()[4] == "-"  # nothing to reuse in a linear layer
    assert rows["grouped_matmul"].split()[1] == "off"
