"""Arguments that are views: every module in generated/ (layers, scanned sequences, optimizers)
and random layers from the property-based tests give the results of compact C-contiguous
arguments when every argument, constant and incoming gradient is a view, and modify none of them.

Layouts (each argument placed in one, its values unchanged):

* ``margin``: the middle of a buffer with two extra elements before and after on every axis;
* ``offset``: C-contiguous, but in the middle of a flat buffer (elements before and after it);
* ``strided``: every other element on every axis, in a buffer whose other elements are filler;
* ``reversed``: the same with negative strides on every axis;
* ``fortran``: Fortran order, inside a margin;
* ``transposed``: a copy in rotated axis order transposed back, inside a margin;
* ``mixed``: each argument in another of the layouts above.

The filler of float buffers is NaN, so a read outside an argument shows up as NaN in a result;
integer buffers are filled with the largest value of their dtype (an index out of any range) and
boolean ones with True. Outputs and all gradients (optimizers: the new parameter and state, from
``step`` and from ``step_inplace`` writing into the views) must equal those from compact
C-contiguous copies to 1e-12 relative in float64, and every buffer (argument and margins) must be
unchanged after forward and backward, except the views ``step_inplace`` writes.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import references as R
import strategies as S
from conftest import GENERATED, load_generated
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_hypothesis import BASE, KNOWN_BAD_LAYERS, _cancelled, build, n, note, time_limit
from test_optim import _problem

from symdl import registry
from symdl.errors import SymdlError
from symdl.testing import load_module, random_inputs

#: every module in generated/, by kind
MODULES = sorted(p.stem for p in GENERATED.glob("*.py"))
OPTIMIZERS = registry.definitions("optimizer")
FORWARD_BACKWARD = [name for name in MODULES if name not in OPTIMIZERS]

SINGLE_LAYOUTS = ("margin", "offset", "strided", "reversed", "fortran", "transposed")
LAYOUTS = SINGLE_LAYOUTS + ("mixed",)
MARGIN = 2
RTOL = 1e-12

#: (case label, layout) pairs that fail today, e.g. ("conv2d[dilated]", "strided") or
#: ("adam-1", "mixed"): strict xfails with the reason (none at present).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def test_the_generated_modules_are_the_catalogue():
    """Every file in generated/ is a catalogue layer, a scanned sequence or an optimizer."""
    expected = set(registry.entries())
    assert set(MODULES) == expected


# ---- placing an array in a layout ----------------------------------------------------------


def _filler(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return True
    return np.iinfo(dtype).max


class Placed:
    """``value`` placed as a view into ``buffer``; ``select(b)`` is that view of any array ``b``
    of the buffer's shape, so the buffer's margins can be compared without the view."""

    def __init__(self, value: np.ndarray, layout: str):
        a = np.asarray(value)
        self.layout = layout
        self.buffer, self.select = _place(a, layout)
        self.view = self.select(self.buffer)
        self.view[...] = a
        assert self.view.shape == a.shape
        assert a.size == 0 or np.shares_memory(self.view, self.buffer)
        self.before = self.buffer.copy()

    def untouched(self) -> bool:
        return np.array_equal(self.buffer, self.before, equal_nan=True)

    def margins_untouched(self) -> bool:
        """The buffer outside the view is unchanged (the view itself may have been written)."""
        after, before = self.buffer.copy(), self.before.copy()
        self.select(after)[...] = 0
        self.select(before)[...] = 0
        return np.array_equal(after, before, equal_nan=True)


def _place(a: np.ndarray, layout: str):
    """(buffer, select) for ``a`` in ``layout``; the buffer is filled with the filler."""
    shape, fill = a.shape, _filler(a.dtype)
    if a.ndim == 0 or layout == "offset":
        size = a.size
        buffer = np.full(size + 2 * MARGIN + 1, fill, dtype=a.dtype)
        return buffer, lambda b: b[MARGIN + 1 : MARGIN + 1 + size].reshape(shape)
    inner = tuple(slice(MARGIN, MARGIN + s) for s in shape)
    if layout == "margin":
        buffer = np.full(tuple(s + 2 * MARGIN for s in shape), fill, dtype=a.dtype)
        return buffer, lambda b: b[inner]
    if layout in ("strided", "reversed"):
        buffer = np.full(tuple(2 * s + 1 for s in shape), fill, dtype=a.dtype)
        every_other = tuple(slice(1, None, 2) for _ in shape)
        if layout == "strided":
            return buffer, lambda b: b[every_other]
        return buffer, lambda b: np.flip(b[every_other])
    if layout == "fortran":
        buffer = np.full(tuple(s + 2 * MARGIN for s in shape), fill, dtype=a.dtype, order="F")
        return buffer, lambda b: b[inner]
    if layout == "transposed":  # memory in axis order (1, 2, ..., 0)
        perm = tuple(range(1, a.ndim)) + (0,)
        inv = tuple(np.argsort(perm))
        stored = tuple(shape[p] + 2 * MARGIN for p in perm)
        buffer = np.full(stored, fill, dtype=a.dtype).transpose(inv)
        return buffer, lambda b: b[inner]
    raise AssertionError(layout)


def _layouts(layout: str, count: int, shift: int = 0) -> list[str]:
    """The layout of each of ``count`` arrays: ``layout``, or for "mixed" a different one each."""
    if layout != "mixed":
        return [layout] * count
    return [SINGLE_LAYOUTS[(k + shift) % len(SINGLE_LAYOUTS)] for k in range(count)]


def _compact(a):
    """A C-contiguous copy (np.ascontiguousarray would turn a 0-d array into shape (1,))."""
    return np.array(a, order="C", copy=True) if isinstance(a, np.ndarray) else a


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_same(actual, expected, what: str) -> None:
    """Shape, dtype, NaN nowhere it is not expected, values to RTOL relative to the array's
    largest magnitude (summation order may differ for strided operands)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    bad = np.isnan(actual) & ~np.isnan(expected)
    assert not bad.any(), f"{what}: NaN at {np.argwhere(bad)[:5].tolist()} (a read outside)"
    scale = float(np.max(np.abs(expected), initial=0.0, where=np.isfinite(expected)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


# ---- modules with forward and backward ----------------------------------------------------------


def check_views(module, args, kwargs, layout: str, rng) -> None:
    """forward and backward with every array argument (and the incoming gradient) placed in
    ``layout`` give the results of compact copies; no buffer is modified."""
    names = list(module.ARGS) + [k for k, v in kwargs.items() if isinstance(v, np.ndarray)]
    values = dict(zip(module.ARGS, args)) | {k: kwargs[k] for k in names[len(module.ARGS) :]}
    placed = {k: Placed(values[k], lay) for k, lay in zip(names, _layouts(layout, len(names)))}
    compact_kwargs = {k: _compact(v) for k, v in kwargs.items()}
    out, cache = module.forward(*(_compact(a) for a in args), **compact_kwargs)
    douts = tuple(rng.standard_normal(np.shape(o)) for o in _tuple(out))
    placed_douts = [
        Placed(d, lay) for d, lay in zip(douts, _layouts(layout, len(douts), shift=len(names)))
    ]
    compact_douts = tuple(_compact(d) for d in douts)
    grads = module.backward(compact_douts if isinstance(out, tuple) else compact_douts[0], cache)

    view_kwargs = {k: (placed[k].view if k in placed else v) for k, v in kwargs.items()}
    out_v, cache_v = module.forward(*(placed[k].view for k in module.ARGS), **view_kwargs)
    dout_v = tuple(p.view for p in placed_douts)
    grads_v = module.backward(dout_v if isinstance(out, tuple) else dout_v[0], cache_v)

    assert len(_tuple(out_v)) == len(_tuple(out))
    for name, a, b in zip(module.OUTPUTS, _tuple(out_v), _tuple(out)):
        assert_same(a, b, f"output {name}")
    assert len(grads_v) == len(grads) == len(module.ARGS)
    for name, a, b in zip(module.ARGS, grads_v, grads):
        assert_same(a, b, f"gradient of {name}")
    for name, p in placed.items():
        assert p.untouched(), f"argument {name!r} ({p.layout}) or its buffer was modified"
    for name, p in zip(module.OUTPUTS, placed_douts):
        assert p.untouched(), f"incoming gradient of {name!r} ({p.layout}) was modified"


def _inputs(name, module, rng):
    """The catalogue's test domains (tests/references.py); the scanned sequences have none, and
    take symdl.testing's random inputs (a distinct size per dimension)."""
    if name in R.DOMAINS:
        return R.DOMAINS[name](rng)
    return random_inputs(module, rng)


#: Hyperparameters (and optional constants, None: left out) that switch a module to another code
#: path, applied on top of the catalogue's test domain: id -> overrides.
VARIANTS: dict[str, dict[str, dict]] = {
    "scaled_dot_product_attention": {
        "causal": {"causal": True},
        "no-mask-scaled": {"mask": None, "scale": 0.3},
    },
    "multi_head_self_attention": {"causal": {"causal": True}, "one-head": {"num_heads": 1}},
    "local_attention": {"window-0": {"window": 0}, "window-9": {"window": 9, "scale": 0.4}},
    "conv1d": {"plain": {"stride": 1, "padding": 0, "dilation": 1}},
    "conv2d": {"dilated": {"stride": 1, "padding": 2, "dilation": 2}},
    "max_pool2d": {"non-overlapping": {"kernel_size": 2, "stride": None, "padding": 0}},
    "avg_pool2d": {"overlapping": {"kernel_size": 2, "stride": 1, "padding": 0}},
}


def _param(label, layout, *values):
    """A test case with id LABEL-LAYOUT, a strict xfail if KNOWN_FAILURES lists it."""
    reason = KNOWN_FAILURES.get((label, layout))
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(*values, marks=marks, id=f"{label}-{layout}")


def _cases(names):
    out = []
    for name in names:
        for variant in ["default", *VARIANTS.get(name, {})]:
            for layout in LAYOUTS:
                label = name if variant == "default" else f"{name}[{variant}]"
                out.append(_param(label, layout, name, variant, layout))
    return out


@functools.cache
def _module(name):
    return load_generated(name)


@pytest.mark.parametrize("name, variant, layout", _cases(FORWARD_BACKWARD))
def test_generated_module_views(name, variant, layout, rng):
    module = _module(name)
    args, kwargs = _inputs(name, module, rng)
    for key, value in VARIANTS.get(name, {}).get(variant, {}).items():
        if value is None and key in module.CONSTS:
            kwargs.pop(key, None)
        else:
            kwargs[key] = value
    check_views(module, args, kwargs, layout, rng)


# ---- optimizers -----------------------------------------------------------------------------


def _optimizer_cases():
    out = []
    for name, opt in OPTIMIZERS.items():
        for i, case in enumerate(opt.checks["cases"]):
            for layout in LAYOUTS:
                out.append(_param(f"{name}-{i}", layout, name, case, layout))
    return out


@pytest.mark.parametrize("name, case, layout", _optimizer_cases())
def test_optimizer_views(name, case, layout):
    """``step`` on views returns what it returns on compact copies and modifies nothing;
    ``step_inplace`` writes the compact results into the views and nothing outside them."""
    mod = _module(name)
    p, grad = _problem()
    state = mod.init_state(p)
    for k in range(2):  # a state that is not all zeros
        p, *state = mod.step(p, grad(p, k), *state, **case)
    g = grad(p, 2)
    arrays = [p, g] + [s for s in state if isinstance(s, np.ndarray)]
    labels = ["param", "grad"] + [k for k, s in zip(mod.STATE, state) if isinstance(s, np.ndarray)]

    def with_views(views):
        it = iter(views[2:])
        return [views[0], views[1]] + [next(it) if isinstance(s, np.ndarray) else s for s in state]

    expected = mod.step(p, g, *state, **case)
    placed = [Placed(a, lay) for a, lay in zip(arrays, _layouts(layout, len(arrays)))]
    got = mod.step(*with_views([q.view for q in placed]), **case)
    for what, a, b in zip(["param", *mod.STATE], got, expected):
        assert_same(a, b, f"step: {what}")
    for what, q in zip(labels, placed):
        assert q.untouched(), f"step modified {what} ({q.layout}) or its buffer"

    compact = [a.copy() for a in arrays]
    expected_state = mod.step_inplace(*with_views(compact), **case)
    placed = [Placed(a, lay) for a, lay in zip(arrays, _layouts(layout, len(arrays), shift=1))]
    got_state = mod.step_inplace(*with_views([q.view for q in placed]), **case)
    for what, a, b in zip(mod.STATE, got_state, expected_state):
        assert_same(a, b, f"step_inplace: returned {what}")
    for what, q, c in zip(labels, placed, compact):
        assert_same(q.view, c, f"step_inplace: {what} written in place")
        assert q.margins_untouched(), f"step_inplace wrote outside {what} ({q.layout})"
    assert placed[1].untouched(), f"step_inplace modified grad ({placed[1].layout})"


# ---- random layers from the property-based tests --------------------------------------------------


def check_random_layer(layer_case: S.RandomLayer, seed: int) -> None:
    """Derive and generate a random layer (tests/strategies.py, as tests/test_hypothesis.py
    does), then check_views in every layout on random inputs in the layer's domains."""
    note(repr(layer_case))
    with time_limit(f"random layer {layer_case.text[:80]!r}"):
        try:
            _, source = build(layer_case.text, layer_case.decl, "fz")
        except SymdlError as err:
            assume(not _cancelled(layer_case, err))  # a degenerate layer: SymPy cancelled a name
            raise
        module = load_module(source, "fz")
        rng = np.random.default_rng(seed)
        args, kwargs = random_inputs(module, rng, {"domains": layer_case.domains})
        for layout in LAYOUTS:
            note(f"layout {layout}")
            check_views(module, args, kwargs, layout, rng)


@pytest.mark.parametrize("style", ["elementwise", "contraction", "chain", "mixed"])
@settings(BASE, max_examples=n(40))
@given(data=st.data())
def test_random_layer_views(style, data):
    """Random layers of each style of tests/strategies.py (the project's Hypothesis profile)."""
    layer_case = data.draw(S.random_layers(style), label="layer")
    check_random_layer(layer_case, data.draw(st.integers(0, 2**32 - 1), label="seed"))


@pytest.mark.parametrize("label", list(KNOWN_BAD_LAYERS))
def test_fuzz_found_layer_views(label):
    """The random layers tests/test_hypothesis.py keeps as fixed cases."""
    check_random_layer(KNOWN_BAD_LAYERS[label], 0)
