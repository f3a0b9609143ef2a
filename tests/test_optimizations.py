"""Each lowering optimization can be switched off; the plain lowering computes the same values.

The fast path (matrix products, shared contractions, factored sums, plain slices) and the plain
one (einsum and strided views everywhere) are generated from the same derivation and compared
on the catalogue's test inputs, forward and backward, in float64."""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

import numpy as np
import pytest
import references as R

from symdl import derive, registry
from symdl.codegen import generate_source
from symdl.errors import LowerError
from symdl.lower import OPTIMIZATIONS, lower
from symdl.testing import load_module

LAYERS = registry.definitions("layer")
PLAIN = {name: False for name in OPTIMIZATIONS}
NAMES = [
    "linear",
    "bilinear",
    "softmax",
    "layer_norm",
    "batch_norm",
    "conv2d",
    "max_pool2d",
    "lstm_cell",
    "gru_cell",
    "scaled_dot_product_attention",
    "multi_head_self_attention",
    "local_attention",
    "cross_entropy",
    "embedding",
]


def _run(module, args, kwargs, rng):
    out, cache = module.forward(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    douts = tuple(np.random.default_rng(1).standard_normal(np.shape(o)) for o in outs)
    grads = module.backward(douts if isinstance(out, tuple) else douts[0], cache)
    return outs, grads


def _agree(on, off, name, rng):
    """Load two sources of catalogue layer ``name``, run both on its domain's arguments and
    assert the same outputs and gradients (float64, rtol 1e-12); the first one's gradients."""
    fast, plain = load_module(on, name), load_module(off, name)
    args, kwargs = R.DOMAINS[name](rng)
    outs_f, grads_f = _run(fast, args, kwargs, rng)
    outs_p, grads_p = _run(plain, args, kwargs, rng)
    for x, y in zip(outs_f + tuple(grads_f), outs_p + tuple(grads_p)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    return grads_f


def _mha_switch_agrees(on_text, off_text, dtype, causal, rng):
    """Run two multi-head attention sources on non-contiguous arguments (a strided x, a
    transposed out_proj_weight, a strided dout); assert the same forward and gradients in
    ``dtype`` and the forward against the independent NumPy version. Returns the two modules
    and the arguments."""
    on, off = load_module(on_text, "mha"), load_module(off_text, "mha")
    N, T, E = 2, 5, 6
    x = rng.standard_normal((N, 2 * T, E))[:, ::2]
    args = [x, rng.standard_normal((3 * E, E)), rng.standard_normal(3 * E),
            rng.standard_normal((E, E)).T, rng.standard_normal(E)]
    args = [a.astype(dtype) for a in args]
    kwargs = {"num_heads": 3, "causal": causal}
    dout = rng.standard_normal((N, T, 2 * E)).astype(dtype)[:, :, ::2]
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    res = []
    for m in (on, off):
        y, cache = m.forward(*args, **kwargs)
        res.append((y, *m.backward(dout, cache)))
    for a, b in zip(*res):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(
        res[0][0], R.NUMPY["multi_head_self_attention"](*args, **kwargs), rtol=rtol, atol=rtol
    )
    return on, off, args, kwargs


@pytest.mark.parametrize("name", NAMES)
def test_plain_lowering_agrees(name, rng):
    d = derive(LAYERS[name])
    fast = load_module(generate_source(d), name)
    plain_text = generate_source(d, options=PLAIN)
    plain = load_module(plain_text, name)
    args, kwargs = R.DOMAINS[name](rng)
    for a, b in zip(*(_run(m, args, kwargs, rng) for m in (fast, plain))):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("option", list(OPTIMIZATIONS))
def test_each_switch_alone(option, rng):
    d = derive(LAYERS["multi_head_self_attention"])
    module = load_module(generate_source(d, options={option: False}), "mha")
    args, kwargs = R.DOMAINS["multi_head_self_attention"](rng)
    reference = R.NUMPY["multi_head_self_attention"](*args, **kwargs)
    out, _ = module.forward(*args, **kwargs)
    np.testing.assert_allclose(out, reference, rtol=1e-10)


def test_plain_lowering_has_no_matrix_products():
    text = generate_source(derive(LAYERS["linear"]), options=PLAIN)
    assert " @ " not in text and "np.einsum" in text
    assert " @ " in generate_source(derive(LAYERS["linear"]))


def test_unknown_option_is_an_error():
    with pytest.raises(LowerError, match="lowering options require names"):
        lower(derive(LAYERS["linear"]), {"fast": True})


WINDOW_SWITCHES = {
    "running_max": ["max_pool2d"],
    "offset_scatter": ["max_pool2d", "avg_pool2d", "conv2d", "local_attention"],
    "grouped_matmul": ["conv1d", "conv2d", "additive_attention", "multi_head_self_attention"],
    "window_matrix": ["conv1d", "conv2d"],
    "scatter_gemm": ["conv1d", "conv2d", "multi_head_self_attention"],
    "gather_adjoint": ["local_attention"],
    "window_matvec": ["local_attention"],
}
# switches whose products would otherwise already be grouped ones (or whose scatters would be
# gathers, or the heads' per-block scatter one add under split_reshape): off while testing these
UNDER = {
    "grouped_matmul": {"window_matrix": False, "scatter_gemm": False},
    "offset_scatter": {"gather_adjoint": False},
    "scatter_gemm": {"split_reshape": False},
}


@pytest.mark.parametrize(
    "option, name", [(o, n) for o, names in WINDOW_SWITCHES.items() for n in names]
)
def test_window_switches_on_and_off_agree(option, name, rng):
    """Running maxima, per-offset scatters and grouped matrix products compute what the
    lowering without them computes (float64, forward and backward)."""
    d = derive(LAYERS[name])
    under = UNDER.get(option, {})
    on_text = generate_source(d, options={**under, option: True})
    off_text = generate_source(d, options={**under, option: False})
    assert on_text != off_text, f"{option} changes nothing in {name}"
    on, off = load_module(on_text, name), load_module(off_text, name)
    args, kwargs = R.DOMAINS[name](rng)
    for a, b in zip(*(_run(m, args, kwargs, rng) for m in (on, off))):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1), (3, 1)])
def test_running_max_ties_and_overlaps(stride, padding):
    """Windows full of ties (integer-valued input) and overlapping windows: the running
    maximum sends each window's gradient to its first maximum, as the arg-max mask does."""
    d = derive(LAYERS["max_pool2d"])
    on = load_module(generate_source(d), "max_pool2d")
    off = load_module(generate_source(d, options={"running_max": False}), "max_pool2d")
    assert "np.maximum(" in generate_source(d) and "_argmax_mask" not in generate_source(d)
    x = np.random.default_rng(3).integers(0, 3, (2, 3, 7, 8)).astype(np.float64)
    kw = {"kernel_size": 3, "stride": stride, "padding": padding}
    (y1, c1), (y2, c2) = on.forward(x, **kw), off.forward(x, **kw)
    np.testing.assert_array_equal(y1, y2)
    dy = np.random.default_rng(4).standard_normal(y1.shape)
    np.testing.assert_array_equal(on.backward(dy, c1)[0], off.backward(dy, c2)[0])


def _einsum_operand_counts(text):
    import re

    return [
        spec.split("->")[0].count(",") + 1 for spec in re.findall(r'np\.einsum\("([^"]+)"', text)
    ]


# attention with the normalization inside the contraction: o = Sum(e / z * v, t)
FUSED_ATTENTION = (
    "s[n, l, t] = Sum(q[n, l, d]*k[n, t, d], d)\ne[n, l, t] = exp(s[n, l, t])\n"
    "z[n, l] = Sum(e[n, l, t], t)\no[n, l, f] = Sum(e[n, l, t]/z[n, l]*v[n, t, f], t)"
)


@pytest.mark.parametrize("name", ["fused_attention", "bilinear"])
def test_pairwise_contractions(name, rng):
    """Sums over three operands become two-operand contractions (sharing one computed earlier
    where there is one); with the switch off, a three-operand einsum is left."""
    from symdl.parse import parse_layer

    if name == "bilinear":
        d = derive(LAYERS[name])
        args, kwargs = R.DOMAINS[name](rng)
    else:
        d = derive(parse_layer(name, FUSED_ATTENTION, inputs="q k v"))
        args, kwargs = tuple(rng.standard_normal((2, 5, 3)) for _ in range(3)), {}
    on, off = generate_source(d), generate_source(d, options={"pairwise": False})
    three = [_einsum_operand_counts(t).count(3) for t in (on, off)]
    assert three[0] < three[1], three  # (bilinear's dweight keeps one: n is in every operand)
    a, b = (_run(load_module(t, name), args, kwargs, rng) for t in (on, off))
    for x, y in zip(a, b):
        for u, w in zip(x, y):
            np.testing.assert_allclose(u, w, rtol=1e-10, atol=1e-12)


# ---- fused elementwise statements (OPTIMIZATIONS["fuse"]) -------------------------------------

FUSED = sorted(n for n in LAYERS if n in R.DOMAINS)


def _snapshot(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(v) for v in value)
    return value


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", FUSED)
def test_fuse_switch_agrees(name, rng):
    """In-place chains compute what the one-expression statements compute (float64), and never
    write into the caller's arrays or the cache: a second backward gives the same gradients."""
    d = derive(LAYERS[name])
    fused = load_module(generate_source(d), name)
    plain = load_module(generate_source(d, options={"fuse": False}), name)
    args, kwargs = R.DOMAINS[name](rng)
    before = _snapshot((args, kwargs))
    out, cache = fused.forward(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    douts = tuple(np.random.default_rng(1).standard_normal(np.shape(o)) for o in outs)
    dout = douts if isinstance(out, tuple) else douts[0]
    saved = _snapshot((douts, cache))
    grads = fused.backward(dout, cache)
    _assert_same(_snapshot((args, kwargs)), before)  # inputs untouched
    _assert_same(_snapshot((douts, cache)), saved)  # incoming gradients and cache untouched
    _assert_same(fused.backward(dout, cache), grads)
    want_outs, want_grads = _run(plain, args, kwargs, rng)
    for x, y in zip(outs + tuple(grads), tuple(want_outs) + tuple(want_grads)):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "gelu", "layer_norm", "batch_norm", "softmax", "gru_cell"])
def test_fuse_keeps_float32(name, rng):
    """The in-place chains keep the arguments' dtype and agree with the plain lowering."""
    d = derive(LAYERS[name])
    fused = load_module(generate_source(d), name)
    plain = load_module(generate_source(d, options={"fuse": False}), name)
    args, kwargs = R.DOMAINS[name](rng)
    args = [a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args]
    for (a, b) in zip(*(_run(m, args, kwargs, rng) for m in (fused, plain))):
        for x, y in zip(a, b):
            assert np.asarray(x).dtype == np.float32
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


def test_fuse_writes_in_place():
    text = generate_source(LAYERS["sigmoid"], options={"blocked": False})
    backward = text.split("def backward")[1].split("\ndef ")[0]
    assert "dx = 1 - y\n    dx *= dy\n    dx *= y" in backward
    plain = generate_source(LAYERS["sigmoid"], options={"fuse": False})
    assert "dx = dy * y * (1 - y)" in plain


# ---- array passes -----------------------------------------------------------------------------


class _Passes(ast.NodeTransformer):
    """Routes every operator, augmented assignment and call of a function through a counter."""

    def visit_BinOp(self, node):
        self.generic_visit(node)
        return _call("__op", ast.Constant(type(node.op).__name__), node.left, node.right)

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return _call("__unary", ast.Constant(type(node.op).__name__), node.operand)

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        if not isinstance(node.target, ast.Name):
            return node
        value = _call("__aug", ast.Constant(type(node.op).__name__), ast.Name(node.target.id, ast.Load()), node.value)
        return ast.copy_location(ast.Assign([node.target], value), node)

    def visit_Call(self, node):
        self.generic_visit(node)
        return ast.Call(ast.Name("__call", ast.Load()), [node.func] + node.args, node.keywords)


def _call(name, *args):
    return ast.Call(ast.Name(name, ast.Load()), list(args), [])


class _Counter:
    """A pass: an operation that writes a full-size array (a fresh one, or one in place) or
    reads one into something smaller (a reduction); an allocation: a fresh full-size array.
    Views and no-op conversions are free."""

    def __init__(self, full):
        self.full, self.passes, self.allocations = full, 0, 0

    def record(self, operands, result, inplace=None):
        arrays = [a for a in operands if isinstance(a, np.ndarray)]
        if isinstance(inplace, np.ndarray) and inplace.size >= self.full:
            self.passes += 1
            return
        if isinstance(result, np.ndarray) and any(np.may_share_memory(result, a) for a in arrays):
            return  # a view or the argument itself
        fresh = isinstance(result, np.ndarray) and result.size >= self.full
        if fresh or any(a.size >= self.full for a in arrays):
            self.passes += 1
        self.allocations += fresh

    def op(self, name, a, b):
        result = getattr(operator, _OPS[name])(a, b)
        self.record([a, b], result)
        return result

    def unary(self, name, a):
        result = {"USub": operator.neg, "UAdd": operator.pos, "Not": operator.not_, "Invert": operator.invert}[name](a)
        self.record([a], result)
        return result

    def aug(self, name, a, b):
        result = getattr(operator, "i" + _OPS[name])(a, b)
        self.record([a, b], result, inplace=a if result is a else None)
        return result

    def call(self, fn, *args, **kwargs):
        result = fn(*args, **kwargs)
        if fn in (np.empty, np.empty_like):  # an allocation, its memory untouched: no pass
            self.allocations += result.size >= self.full
            return result
        if getattr(fn, "__name__", "") == "_cache_blocks":  # slices from the shape alone
            return result
        operands = list(args) + list(kwargs.values()) + [getattr(fn, "__self__", None)]
        self.record(operands, result, inplace=kwargs.get("out"))
        return result


_OPS = {"Add": "add", "Sub": "sub", "Mult": "mul", "Div": "truediv", "Pow": "pow", "MatMult": "matmul",
        "FloorDiv": "floordiv", "Mod": "mod", "BitAnd": "and_", "BitOr": "or_"}


def _count_passes(source, args, kwargs):
    """((passes, allocations) of forward, of backward) of a generated module, counting arrays
    the size of ``args[0]``."""
    tree = ast.parse(source)
    namespace = {}
    exec(compile(source, "<module>", "exec"), namespace)
    counter = _Counter(np.size(args[0]))
    namespace.update(__op=counter.op, __unary=counter.unary, __aug=counter.aug, __call=counter.call)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("forward", "backward"):
            fn = ast.fix_missing_locations(_Passes().visit(node))
            exec(compile(ast.Module([fn], []), "<counted>", "exec"), namespace)
    out, cache = namespace["forward"](*args, **kwargs)
    forward = (counter.passes, counter.allocations)
    counter.passes = counter.allocations = 0
    namespace["backward"](np.ones_like(out), cache)
    return forward, (counter.passes, counter.allocations)


def _normalization_inputs(name, rng):
    if name == "softmax":
        return (rng.standard_normal((64, 50)),), {}
    if name == "layer_norm":
        return (rng.standard_normal((64, 48)), rng.standard_normal(48), rng.standard_normal(48)), {}
    if name == "gelu":
        return (rng.standard_normal((64, 48)),), {}
    return (rng.standard_normal((16, 8, 5, 6)), rng.standard_normal(8), rng.standard_normal(8)), {}


#: (passes, allocations) of full-size arrays in the generated forward and backward with the
#: fused statements (an upper bound: fewer is fine), and without them (exact).
PASSES = {
    "gelu": {"fused": ((4, 2), (7, 1)), "plain": ((4, 4), (9, 9))},
    "layer_norm": {"fused": ((6, 2), (9, 2)), "plain": ((7, 5), (9, 5))},
    "softmax": {"fused": ((5, 1), (3, 1)), "plain": ((5, 3), (3, 2))},
    "batch_norm": {"fused": ((5, 2), (7, 2)), "plain": ((6, 4), (8, 5))},
}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_fused_array_passes(name, rng):
    d = derive(LAYERS[name])
    args, kwargs = _normalization_inputs(name, rng)
    fused = _count_passes(generate_source(d), args, kwargs)
    plain = _count_passes(generate_source(d, options={"fuse": False}), args, kwargs)
    print(f"{name}: (passes, allocations) of (forward, backward): fused {fused}, plain {plain}")
    for got, bound in zip(fused, PASSES[name]["fused"]):
        assert got[0] <= bound[0] and got[1] <= bound[1], (fused, PASSES[name]["fused"])
    assert plain == PASSES[name]["plain"]  # the counter itself still counts what it did
    committed = Path(__file__).resolve().parents[1] / "generated" / f"{name}.py"
    assert _count_passes(committed.read_text(), args, kwargs) == fused  # the committed code too


def test_fuse_never_writes_a_broadcast_view(rng):
    """dt1 is a read-only broadcast (np.broadcast_to) of a smaller array: the fused sum into
    ``du`` must not write into it."""
    from symdl.parse import parse_layer

    layer = parse_layer(
        "fz", "y[p, r] = (Mean(x[j] + c*u[r, p]*cos(u[r, j]), j))*v", inputs="x, u, v", consts="c"
    )
    d = derive(layer)
    fused = load_module(generate_source(d), "fz")
    plain = load_module(generate_source(d, options={"fuse": False}), "fz")
    args = (rng.uniform(0.5, 1.5, 4), rng.uniform(0.5, 1.5, (3, 4)), 1.2)
    for a, b in zip(*(_run(m, args, {"c": 0.7}, rng) for m in (fused, plain))):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-12)
@pytest.mark.parametrize("name", ["lstm_cell", "rnn_cell"])
def test_same_adjoint_switch(name, rng):
    """An adjoint built by the same contributions as another is that array (the LSTM's dgi is
    dgh; the Elman cell's two bias gradients are one sum, returned as two arrays); switched
    off, both are built and the numbers agree."""
    d = derive(LAYERS[name])
    # (tiled blocks are assigned, not added into zeros: off for both sides)
    on = generate_source(d, options={"tile": False})
    off = generate_source(d, options={"same_adjoint": False, "tile": False})
    grads_f = _agree(on, off, name, rng)
    ids = [id(g) for g in grads_f]
    assert len(set(ids)) == len(ids)  # every gradient its own array
    if name == "lstm_cell":
        assert "dgi = np.zeros" in off and "dgi = np.zeros" not in on
        assert on.count("] += ") < off.count("] += ")
    else:
        assert on.count(".sum(") + on.count("np.einsum(") < off.count(".sum(") + off.count(
            "np.einsum("
        )


@pytest.mark.parametrize("name", ["lstm_cell", "gru_cell"])
def test_tile_switch(name, rng):
    """The gate pre-activations' gradient is built from one contribution per gate block, the
    blocks tiling the (B, k*H) array: each block is assigned once (the last operation writing
    into its slice), with no array of zeros added into; switched off, zeros and slice-adds.
    Same numbers, and every gradient its own array."""
    d = derive(LAYERS[name])
    on, off = generate_source(d), generate_source(d, options={"tile": False})
    grads_f = _agree(on, off, name, rng)
    ids = [id(g) for g in grads_f]
    assert len(set(ids)) == len(ids)
    back_on = on[on.index("def backward") :]
    back_off = off[off.index("def backward") :]
    assert "dgh = np.zeros(" in back_off and "dgh = np.zeros(" not in back_on
    assert re.search(r"out=dgh\[:, 2 \* H : 3 \* H\]\)", back_on)
    assert back_on.count("] += ") < back_off.count("] += ")


@pytest.mark.parametrize("name", ["linear", "conv2d", "multi_head_self_attention"])
def test_inplace_switch(name, rng):
    """A bias is added into the matrix product's own array (``t += bias``) when nothing else
    reads the product; switched off it is a new array. Same numbers, and no argument is
    modified."""
    d = derive(LAYERS[name])
    # (the fused statements add into a dead product's array too: off for the plain side)
    on, off = generate_source(d), generate_source(d, options={"inplace": False, "fuse": False})
    assert re.search(r"^    t\d+ \+= ", on, re.MULTILINE) and not re.search(
        r"^    t\d+ \+= ", off, re.MULTILINE
    )
    fast, plain = load_module(on, name), load_module(off, name)
    args, kwargs = R.DOMAINS[name](rng)
    before = [np.array(a, copy=True) for a in args]
    outs_f, grads_f = _run(fast, args, kwargs, rng)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)
    outs_p, grads_p = _run(plain, args, kwargs, rng)
    for x, y in zip(outs_f + tuple(grads_f), outs_p + tuple(grads_p)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_common_factor_switch(rng):
    """GRU's n = tanh(gi + r * gh) passes dn * (1 - n**2) to its three arguments: computed
    once with the switch on, three times off; the same numbers."""
    d = derive(LAYERS["gru_cell"])
    on, off = generate_source(d), generate_source(d, options={"common_factor": False})

    def code(text):
        return "\n".join(
            line for line in text.splitlines() if not line.strip().startswith(("#", 'r"', "'"))
        )

    backward = code(on[on.index("def backward") :])
    plain = code(off[off.index("def backward") :])
    def squares(text):  # n**2, or np.square(n) in a fused statement (of a block of n)
        return text.count("n**2") + text.count("np.square(n)") + text.count("np.square(n[sl]")

    assert squares(backward) == 1 and squares(plain) == 3
    _agree(on, off, "gru_cell", rng)


@pytest.mark.parametrize("name", ["conv1d", "conv2d"])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (2, 2, 2)])
def test_window_matrix_switch(name, stride, padding, dilation):
    """A convolution's input window is copied once into a contiguous matrix in the forward,
    contracted by one matrix product there and cached: the backward reads the matrix, never
    the strided view of the input (nor the input itself). Off, the backward makes the view
    again. Same numbers (float64, forward and backward)."""
    d = derive(LAYERS[name])
    on, off = generate_source(d), generate_source(d, options={"window_matrix": False})
    back_on = on[on.index("def backward(") :].split("\ndef _float_arg")[0]
    back_off = off[off.index("def backward(") :].split("\ndef _float_arg")[0]
    cached = re.search(r"    cache = \{(.*?)\n    \}", on, re.DOTALL).group(1)
    assert "as_strided" not in back_on and '"x_cols": x_cols' in cached
    assert not re.search(r'cache\["x"\]', back_on) and '"x":' not in cached
    assert "as_strided" in back_off and "x_cols" not in off
    assert "np.ascontiguousarray(" in on and " @ " in on
    rng = np.random.default_rng(7)
    spatial = (9,) if name == "conv1d" else (9, 8)
    kernel = (3,) if name == "conv1d" else (3, 2)
    x = rng.standard_normal((2, 3, *spatial))
    w = rng.standard_normal((4, 3, *kernel))
    b = rng.standard_normal(4)
    kw = {"stride": stride, "padding": padding, "dilation": dilation}
    fast, plain = load_module(on, name), load_module(off, name)
    (y1, c1), (y2, c2) = fast.forward(x, w, b, **kw), plain.forward(x, w, b, **kw)
    np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-13)
    dy = rng.standard_normal(y1.shape)
    for g1, g2 in zip(fast.backward(dy, c1), plain.backward(dy, c2)):
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "name", ["local_attention", "max_pool2d", "avg_pool2d", "multi_head_self_attention"]
)
def test_window_matrix_leaves_other_windows(name):
    """Windows read with a batch index (local attention's band), reduced without a matrix
    product (pooling) or only reshaping an axis (heads) are left as views."""
    d = derive(LAYERS[name])
    assert generate_source(d) == generate_source(d, options={"window_matrix": False})


def test_scatter_gemm_values_in_product_order(rng):
    """conv2d's dx values come from one matrix product in its own (c, p, q, n, i, j) order,
    added into a (C, N, ...) buffer seen as (N, C, ...), so each kernel offset's add runs
    through both in one order; off, an einsum whose result is a transposed view of
    (n, i, j, c, p, q), added into an (N, C, ...) buffer. Same numbers (float64)."""
    d = derive(LAYERS["conv2d"])
    on, off = generate_source(d), generate_source(d, options={"scatter_gemm": False})
    back_on = on[on.index("def backward(") :]
    back_off = off[off.index("def backward(") :]
    assert ".reshape(C, KH, KW, N, OH, OW)" in back_on and "np.einsum(" not in back_on
    assert "dx = np.zeros((C, N, " in back_on  # the buffer in the values' order, transposed
    assert 'np.einsum("nfij,fcpq->ncpqij"' in back_off and "dx = np.zeros((N, C, " in back_off
    args, kwargs = R.DOMAINS["conv2d"](rng)
    a, b = (_run(load_module(t, "conv2d"), args, kwargs, rng) for t in (on, off))
    for x, y in zip(a, b):
        for u, w in zip(x, y):
            np.testing.assert_allclose(u, w, rtol=1e-12, atol=1e-13)


# ---- products over adjacent slices of one array (OPTIMIZATIONS["stack_products"]) ---------------


def _in_projection_products(text: str, function: str) -> list[str]:
    """The statements of ``function`` that multiply by ``in_proj_weight``."""
    body = text.split(f"\ndef {function}(", 1)[1].split("\ndef ", 1)[0]
    return [
        line.strip() for line in body.splitlines()
        if not line.strip().startswith("#") and "in_proj_weight" in line.split(" = ", 1)[-1]
        and ("np.einsum(" in line or " @ " in line)
    ]


def test_stack_products_in_projection():
    """The q, k and v projections read adjacent slices of in_proj_weight with x in common: one
    product over the whole weight (in the committed module too); the backward's dx and
    din_proj_weight one product each with the stacked gradient; switched off, three each."""
    d = derive(LAYERS["multi_head_self_attention"])
    on, off = generate_source(d), generate_source(d, options={"stack_products": False})
    committed = (Path(__file__).parent.parent / "generated" / "multi_head_self_attention.py").read_text()
    assert len(_in_projection_products(committed, "forward")) == 1
    forward = _in_projection_products(on, "forward")
    assert len(forward) == 1 and "in_proj_weight[" not in forward[0]
    assert len(_in_projection_products(off, "forward")) == 3
    backward = _in_projection_products(on, "backward")
    assert len(backward) == 1 and "in_proj_weight[" not in backward[0]  # dx
    assert len([ln for ln in on.splitlines() if ln.strip().startswith("din_proj_weight = ")]) == 1
    assert len(_in_projection_products(off, "backward")) == 3
    assert "np.concatenate" not in on  # the adjoints were made in the stacked array


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stack_products_switch(causal, dtype, rng):
    d = derive(LAYERS["multi_head_self_attention"])
    on = load_module(generate_source(d), "mha")
    off = load_module(generate_source(d, options={"stack_products": False}), "mha")
    N, T, E = 2, 5, 6
    args = [rng.standard_normal((N, T, E)), rng.standard_normal((3 * E, E)),
            rng.standard_normal(3 * E), rng.standard_normal((E, E)), rng.standard_normal(E)]
    args = [a.astype(dtype) for a in args]
    kwargs = {"num_heads": 3, "causal": causal}
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    res = [_run(m, args, kwargs, rng) for m in (on, off)]
    for a, b in zip(*res):
        for x, y in zip(a, b):
            assert x.dtype == dtype
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol)
    # against the independent NumPy implementation
    np.testing.assert_allclose(
        res[0][0][0], R.NUMPY["multi_head_self_attention"](*args, **kwargs), rtol=rtol, atol=rtol
    )


def _stacked_pair():
    """Two projections of x through the halves of one weight, combined elementwise: the
    adjoints of the halves are made elementwise (not in a stacked array), so the backward
    joins them before the merged products."""
    import sympy as sp

    from symdl.functions import Sum
    from symdl.spec import Dim, Layer, indices, tensors

    x, w, g, u, v, y = tensors("x w g u v y")
    b, i, j = indices("b i j")
    H = Dim("H")
    return Layer(
        "stacked_pair",
        [
            (v[b, j], Sum(x[b, i] * w[H + j, i], i)),
            (u[b, j], Sum(x[b, i] * w[j, i], i)),
            (y[b, j], u[b, j] * sp.tanh(v[b, j]) * g[j]),
        ],
        inputs="x",
        params="w g",
        shapes={"x": ("B", "I"), "w": ("2*H", "I"), "g": ("H",)},
    )


def test_stack_products_joins_adjoints(rng):
    from symdl.testing import gradcheck

    d = derive(_stacked_pair())
    on_text = generate_source(d)
    # one product over the whole weight forward, one for dx (and one for dw)
    assert on_text.count("x @ w.T\n") == 1 and on_text.count(" @ w\n") == 1
    code = on_text.split("def forward(")[1].split("def _float_arg")[0].splitlines()
    assert not [ln for ln in code if "w[" in ln and not ln.strip().startswith("#")]
    assert "np.concatenate((du, dv), axis=1)" in on_text  # ordered by slice, not equation
    on = load_module(on_text, "stacked_pair")
    off = load_module(generate_source(d, options={"stack_products": False}), "stacked_pair")
    args = (rng.standard_normal((3, 4)), rng.standard_normal((10, 4)), rng.standard_normal(5))
    for a, b in zip(*(_run(m, args, {}, rng) for m in (on, off))):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    x, w, g = args
    u, v = x @ w[:5].T, x @ w[5:].T
    np.testing.assert_allclose(on.forward(*args)[0], u * np.tanh(v) * g, rtol=1e-12)
    result = gradcheck(on, list(args), {}, rng=rng, tol=1e-7)
    assert result.ok, result


def test_stack_products_needs_the_whole_axis():
    """Slices that leave part of the axis out are not merged (the product would be larger)."""
    from symdl.functions import Sum
    from symdl.spec import Dim, Layer, indices, tensors

    x, w, u, v, y = tensors("x w u v y")
    b, i, j = indices("b i j")
    H = Dim("H")
    layer = Layer(
        "partial_pair",
        [
            (u[b, j], Sum(x[b, i] * w[j, i], i)),
            (v[b, j], Sum(x[b, i] * w[H + j, i], i)),
            (y[b, j], u[b, j] * v[b, j]),
        ],
        inputs="x",
        params="w",
        shapes={"x": ("B", "I"), "w": ("3*H", "I"), "y": ("B", "H")},
    )
    text = generate_source(derive(layer))
    assert "slices of one product" not in text
    assert text.count("x @ w[") == 2


@pytest.mark.parametrize("name", ["conv1d", "conv2d"])
def test_transposed_copy_made_once(name, rng):
    """The weight and input gradients both read dy as an (F, N*OH*OW) matrix: that transposed
    copy is made once and shared (switch 'share'); without sharing each product makes its own."""
    d = derive(LAYERS[name])
    on, off = generate_source(d), generate_source(d, options={"share": False})
    backward = lambda text: text.split("def backward")[1].split("\ndef _")[0]  # noqa: E731
    assert backward(on).count("dy.transpose(") == 1
    assert backward(off).count("dy.transpose(") == 2
    args, kwargs = R.DOMAINS[name](rng)
    a, b = (_run(load_module(t, name), args, kwargs, rng) for t in (on, off))
    for x, y in zip(a, b):
        for u, w in zip(x, y):
            np.testing.assert_allclose(u, w, rtol=1e-10, atol=1e-12)


# ---- adjoints of sliding reads as gathers (OPTIMIZATIONS["gather_adjoint"]) ------------------


@pytest.mark.parametrize("window, T", [(0, 5), (1, 6), (3, 5), (6, 4)])
def test_gather_adjoint_switch(window, T):
    """local_attention's dk and dv (adjoints of the band reads k[n, i + w, d], v[n, i + w, f])
    as one contraction over the offsets of a skewed copy of the band and a window of the
    zero-padded other factor; off, a slice-add per offset. Same numbers (float64, windows
    wider than the sequence included, non-contiguous inputs)."""
    d = derive(LAYERS["local_attention"])
    on, off = generate_source(d), generate_source(d, options={"gather_adjoint": False})
    back_on = on[on.index("def backward(") :].split("\ndef _float_arg")[0]
    back_off = off[off.index("def backward(") :].split("\ndef _float_arg")[0]
    assert "for w in range(W)" not in back_on and back_on.count("np.ascontiguousarray(") == 2
    assert back_off.count("for w in range(W)") == 2
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, T, 6))[:, :, ::2] for _ in range(3))
    dy = rng.standard_normal((2, T, 3))
    fast, plain = load_module(on, "local_attention"), load_module(off, "local_attention")
    (y1, c1), (y2, c2) = (m.forward(q, k, v, window=window) for m in (fast, plain))
    np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-14)
    for g1, g2 in zip(fast.backward(dy, c1), plain.backward(dy, c2)):
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-14)
    # against an independent dense computation: position i attends to |i - j| <= window
    dense = _dense_local_attention(q, k, v, window)
    np.testing.assert_allclose(y1, dense, rtol=1e-12, atol=1e-14)


def _dense_local_attention(q, k, v, window):
    """Dense masked softmax attention in plain NumPy (O(T^2))."""
    T = q.shape[1]
    s = np.einsum("nid,njd->nij", q, k) / np.sqrt(q.shape[2])
    allowed = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]) <= window
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    return np.einsum("nij,njf->nif", p, v)


def test_gather_adjoint_in_a_depthwise_correlation(rng):
    """The band factor need not read the position: y[n, c, i] = Sum(w[c, p] * x[n, c, i + p], p)
    gives dx[n, c, s] = Sum(w[c, p] * dy[n, c, s - p], p) (the kernel reversed, a window of
    the padded dy); a correlation summed over channels too keeps the scatter. Gradients
    checked in float64 and against the plain scatter."""
    from symdl.functions import Sum
    from symdl.spec import Layer, indices, tensors
    from symdl.testing import gradcheck

    x, w, y = tensors("x w y")
    n, c, f, i, p = indices("n c f i p")
    shapes = {"x": ("N", "C", "L"), "w": ("C", "K")}
    depthwise = Layer("dw", [(y[n, c, i], Sum(w[c, p] * x[n, c, i + p], p))], inputs="x",
                      params="w", shapes=shapes)
    full = Layer("cw", [(y[n, f, i], Sum(w[f, c, p] * x[n, c, i + p], (c, p)))], inputs="x",
                 params="w", shapes={"x": ("N", "C", "L"), "w": ("F", "C", "K")})
    d = derive(depthwise)
    on, off = generate_source(d), generate_source(d, options={"gather_adjoint": False})
    assert "as a gather over p" in on and "for p in range(K)" not in on
    assert "for p in range(K)" in off
    assert generate_source(derive(full)) == generate_source(
        derive(full), options={"gather_adjoint": False}
    )
    fast, plain = load_module(on, "dw"), load_module(off, "dw")
    xs, ws = rng.standard_normal((2, 3, 9)), rng.standard_normal((3, 4))
    assert gradcheck(fast, (xs, ws), {}, rng=rng).ok
    (y1, c1), (y2, c2) = fast.forward(xs, ws), plain.forward(xs, ws)
    np.testing.assert_array_equal(y1, y2)
    dy = rng.standard_normal(y1.shape)
    for g1, g2 in zip(fast.backward(dy, c1), plain.backward(dy, c2)):
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["gelu", "silu", "mish", "softsign", "layer_norm", "cross_entropy"])
def test_merge_terms_switch(name, rng):
    """Elementwise contributions to one adjoint are one fused sum with the full-size factors
    they share taken out, and an adjoint read once by another elementwise contribution is
    substituted there: GELU's dx = dy*(cdf + c*x*exp(-x**2/2)) is one statement into one
    array (7 passes, 1 allocation; 9 and 3 switched off). Same numbers either way."""
    d = derive(LAYERS[name])
    on, off = generate_source(d), generate_source(d, options={"merge_terms": False})
    _agree(on, off, name, rng)
    back_on = on[on.index("def backward(") :].split("\ndef _")[0]
    back_off = off[off.index("def backward(") :].split("\ndef _")[0]
    assert back_on.count("\n    # ") < back_off.count("\n    # ")  # fewer statements
    if name == "gelu":
        x = (rng.standard_normal((64, 48)),)
        assert _count_passes(on, x, {})[1] == (7, 1)
        assert _count_passes(off, x, {})[1] == (9, 3)


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_injective_scatter_switch(name, rng):
    """A scatter-add whose values each have a target element of their own (row n's class
    target[n]) is a fancy-indexed ``-=``/``+=``, not np.add.at (which stays where values meet:
    the embedding's rows). Same numbers, with repeated classes across rows too."""
    d = derive(LAYERS[name])
    on, off = generate_source(d), generate_source(d, options={"injective_scatter": False})
    assert "np.add.at(" not in on and "np.add.at(" in off
    assert "np.add.at(" in generate_source(derive(LAYERS["embedding"]))
    fast, plain = load_module(on, name), load_module(off, name)
    args, kwargs = R.DOMAINS[name](rng)
    kwargs = dict(kwargs, target=np.zeros_like(kwargs["target"]))  # every row the same class
    for kw in (R.DOMAINS[name](rng)[1], kwargs):
        outs_f, grads_f = _run(fast, args, kw, rng)
        outs_p, grads_p = _run(plain, args, kw, rng)
        for x, y in zip(outs_f + tuple(grads_f), outs_p + tuple(grads_p)):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_erf_scale_switch(dtype, rng):
    """erf(x/sqrt(2)) is _erf(x, 0.7071...): the helper scales each block, no full-size x/sqrt(2)
    array (one pass fewer). Bitwise the same values as the scaled argument switched off."""
    d = derive(LAYERS["gelu"])
    on, off = generate_source(d), generate_source(d, options={"erf_scale": False})
    assert "_erf(x, 0.7071067811865476)" in on and "_erf(0.7071067811865476 * x)" in off
    x = (4 * rng.standard_normal((3, 70000))).astype(dtype)  # more than one block
    outs_f, grads_f = _run(load_module(on, "gelu"), (x,), {}, rng)
    outs_p, grads_p = _run(load_module(off, "gelu"), (x,), {}, rng)
    for a, b in zip(outs_f + tuple(grads_f), outs_p + tuple(grads_p)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    x = (rng.standard_normal((64, 48)),)
    assert _count_passes(on, x, {})[0][0] == _count_passes(off, x, {})[0][0] - 1


@pytest.mark.parametrize(
    "name, text, cached, dropped",
    [
        ("softmax", None, ("y",), "e"),
        ("scaled_dot_product_attention", None, ("q", "k", "v", "keep", "z", "p"), "e"),
        # a weighted normalization: e = y * w * s, no function in the inverse
        (
            "wnorm",
            "e[n, c] = exp(x[n, c] + w[c])\ns[n] = Sum(e[n, c], c)\ny[n, c] = e[n, c]/(w[c]*s[n])",
            ("w", "y"),
            "e",
        ),
        # xhat = xc * rstd: xc = xhat / rstd, the division cancelled by drstd held times rstd
        ("layer_norm", None, ("weight", "rstd", "xhat"), "xc"),
        ("rms_norm", None, ("weight", "rstd", "xhat"), "x"),
    ],
)
def test_output_reuse_switch(name, text, cached, dropped, rng):
    """With the switch on, the backward of y = e / s reads y alone (e through y * s, the
    adjoints of e and s held scaled by s); off, it reads e and s (attention: p = e / zs, and
    z for the mask of empty rows). The same numbers, and no argument or incoming gradient is
    modified."""
    from symdl.parse import parse_layer

    layer = LAYERS[name] if text is None else parse_layer(name, text, inputs="x", params="w")
    d = derive(layer)
    on, off = lower(d), lower(d, {"output_reuse": False})
    assert on.derivation.cached == cached and dropped in off.derivation.cached
    assert dropped not in on.derivation.cached
    assert on.derivation.scaled and not off.derivation.scaled
    fast = load_module(generate_source(d), name)
    plain = load_module(generate_source(d, options={"output_reuse": False}), name)
    if text is None:
        args, kwargs = R.DOMAINS[name](rng)
    else:
        args, kwargs = (rng.standard_normal((6, 5)), rng.uniform(0.5, 1.5, 5)), {}
    before = [np.array(a, copy=True) for a in args]
    out, cache = fast.forward(*args, **kwargs)
    dout = np.random.default_rng(1).standard_normal(np.shape(out))
    dout_before = dout.copy()
    grads_f = fast.backward(dout, cache)
    for a, b in zip(list(args) + [dout], before + [dout_before]):
        np.testing.assert_array_equal(a, b)
    out_p, cache_p = plain.forward(*args, **kwargs)
    grads_p = plain.backward(dout, cache_p)
    np.testing.assert_allclose(out, out_p, rtol=1e-12)
    for x, y in zip(grads_f, grads_p):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_affine_cache_switch(dtype, rng):
    """GELU: with the switch on, the forward caches the normal CDF (1 + erf(x/sqrt 2))/2 and
    takes y = x * cdf from it, the backward dx = dy * (cdf + x * pdf) has two passes fewer;
    off, it caches the erf. The same numbers (against each other and PyTorch), and no
    argument or incoming gradient is modified."""
    import torch

    d = derive(LAYERS["gelu"])
    on, off = lower(d), lower(d, {"affine_cache": False})
    assert on.derivation.cached == ("x", "t1") and off.derivation.cached == ("x", "t0")
    fast = load_module(generate_source(d), "gelu")
    plain = load_module(generate_source(d, options={"affine_cache": False}), "gelu")
    x = (rng.standard_normal((64, 48)) * 3).astype(dtype)[:, ::2]  # (non-contiguous)
    dout = rng.standard_normal(x.shape).astype(dtype)
    x0, dout0 = x.copy(), dout.copy()
    y, cache = fast.forward(x)
    (dx,) = fast.backward(dout, cache)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dout, dout0)
    y_p, cache_p = plain.forward(x)
    (dx_p,) = plain.backward(dout, cache_p)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(y, y_p, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dx_p, rtol=tol, atol=tol)
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(t).backward(torch.tensor(dout, dtype=torch.float64))
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=10 * tol, atol=10 * tol)
    passes = [
        _count_passes(generate_source(d, options=o), (x,), {})[1][0]
        for o in ({}, {"affine_cache": False})
    ]
    assert passes[0] == passes[1] - 2


def test_output_reuse_adds_no_division():
    """The LSTM's h1 = o * tanh(c1) would give tanh(c1) = h1 / o, not finite where the gate o
    underflows to 0: its backward keeps reading tanh(c1)."""
    from symdl.derive import reuse_outputs

    d = derive(LAYERS["lstm_cell"])
    assert reuse_outputs(d) is d
    assert lower(d).derivation.cached == d.cached


# ---- a position numbering blocks as a split of its axis (OPTIMIZATIONS["split_reshape"]) -----


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_split_reshape_switch(causal, dtype, rng):
    """The heads h*D + f as a reshape of the embedding axis: the output projection and its
    adjoints are single products, the per-head slice-adds are gone; switched off, the strided
    views and per-head loops come back. Both agree, on non-contiguous arguments too (a
    transposed weight, a strided x, a strided dout)."""
    d = derive(LAYERS["multi_head_self_attention"])
    on_text = generate_source(d)
    off_text = generate_source(d, options={"split_reshape": False})
    assert "for h in range(" not in on_text and "as_strided" not in on_text
    assert "for h in range(" in off_text and "as_strided" in off_text
    assert "reshape(E, num_heads, D" in on_text
    _mha_switch_agrees(on_text, off_text, dtype, causal, rng)


def _blocks():
    """y[b, h, f] = x[b, h*D + f] * g[h, f] + x[b, h*D + f]**2: blocks of the first H*D
    entries of a longer axis (K), read twice."""
    from symdl.spec import Dim, Layer, indices, tensors

    x, g, y = tensors("x g y")
    b, h, f = indices("b h f")
    D = Dim("D")
    return Layer(
        "blocks",
        [(y[b, h, f], x[b, h * D + f] * g[h, f] + x[b, h * D + f] ** 2)],
        inputs="x",
        params="g",
        ranges={"h": "H", "f": "D"},
        shapes={"x": ("B", "K"), "g": ("H", "D"), "y": ("B", "H", "D")},
    )


def test_split_reshape_partial_axis(rng):
    """A split that covers only the first H*D entries of its axis: a slice, then the reshape;
    the adjoint adds into that slice and leaves the rest zero. Gradcheck and on/off agree."""
    from symdl.testing import gradcheck

    d = derive(_blocks())
    on_text = generate_source(d)
    off_text = generate_source(d, options={"split_reshape": False})
    assert ".reshape(B, H, D)" in on_text and "_blocks(dx[:, : H * D], B, H, D)" in on_text
    on, off = load_module(on_text, "blocks"), load_module(off_text, "blocks")
    x = rng.standard_normal((3, 2 * 11))[:, ::2]  # K = 11 > H*D = 6, not contiguous
    g = rng.standard_normal((2, 3))
    res = [_run(m, [x, g], {}, rng) for m in (on, off)]
    for a, b in zip(*res):
        for u, w in zip(a, b):
            np.testing.assert_allclose(u, w, rtol=1e-12, atol=1e-13)
    dx = res[0][1][0]
    assert np.all(dx[:, 6:] == 0) and np.all(dx[:, :6] != 0)
    result = gradcheck(on, [x, g], {}, tol=1e-6)
    assert result.ok, result


# ---- paths specialized to absent optional inputs (OPTIMIZATIONS["specialize"]) ----------------


def _sdpa_args(rng, dtype):
    q, k, v = (rng.standard_normal((2, 5, 4)).astype(dtype) for _ in range(3))
    return [q, k, v]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_specialize_sdpa(dtype, rng):
    """No mask and causal off: no masking pass (the mask is never filled); any mask or causal:
    the general path. Both agree with the switch off, forward and backward, and the arguments
    and the cached arrays are left as they were."""
    d = derive(LAYERS["scaled_dot_product_attention"])
    on_text = generate_source(d)
    off_text = generate_source(d, options={"specialize": False})
    assert "if keep is not None:" in on_text and "keep is not None" not in off_text
    forward_on = on_text.split("\ndef forward(", 1)[1].split("\ndef ", 1)[0]
    assert "if causal or mask is not None:" in forward_on
    # the fill only in the statements that read the mask (keep and bias), never up front
    assert forward_on.count("np.full(") == 2
    assert "np.full(" not in forward_on.split("if causal or mask is not None:", 1)[0]
    on, off = load_module(on_text, "sdpa"), load_module(off_text, "sdpa")
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    additive = np.where(rng.random((5, 5)) > 0.3, rng.uniform(-2, 2, (5, 5)), -np.inf)
    masks = [None, rng.random((5, 5)) > 0.3, np.ones((5, 5), bool), additive.astype(dtype)]
    for mask in masks:
        for causal in (False, True):
            args = _sdpa_args(rng, dtype)
            copies = [a.copy() for a in args]
            kwargs = {"mask": mask, "causal": causal}
            res = []
            for m in (on, off):
                out, cache = m.forward(*args, **kwargs)
                kept = {k: np.array(v) for k, v in cache.items() if isinstance(v, np.ndarray)}
                dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
                grads = m.backward(dout, cache)
                for k, v in kept.items():
                    np.testing.assert_array_equal(cache[k], v)
                res.append((out, *grads))
            for a, b in zip(*res):
                assert a.dtype == dtype
                np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
            for a, b in zip(args, copies):
                np.testing.assert_array_equal(a, b)
    # no mask and an all-True mask: one result by either path
    args = _sdpa_args(rng, dtype)
    y0, c0 = on.forward(*args)
    y1, c1 = on.forward(*args, mask=np.ones((5, 5), bool))
    assert c0["keep"] is None and c1["keep"] is not None
    np.testing.assert_allclose(y0, y1, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("causal", [False, True])
def test_specialize_mhsa(causal, rng):
    d = derive(LAYERS["multi_head_self_attention"])
    on_text = generate_source(d)
    assert "if causal:" in on_text and on_text.count("if keep is not None:") == 3
    on = load_module(on_text, "mha")
    off = load_module(generate_source(d, options={"specialize": False}), "mha")
    args, _ = R.DOMAINS["multi_head_self_attention"](rng)
    kwargs = {"num_heads": 2, "causal": causal}
    copies = [np.array(a) for a in args]
    res = [_run(m, args, kwargs, rng) for m in (on, off)]
    for a, b in zip(*res):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
    for a, b in zip(args, copies):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        res[0][0][0], R.NUMPY["multi_head_self_attention"](*args, **kwargs), rtol=1e-10, atol=1e-12
    )


def _optional_scale():
    """m[i] = 2 * mask[i] (mask optional, 0.5 when absent: m is 1), read by the output and by
    the backward: y = x * m + x**2."""
    from symdl.spec import Layer, indices, tensors

    x, mask, m, y = tensors("x mask m y")
    n, i = indices("n i")
    return Layer(
        "optional_scale",
        [(m[i], 2 * mask[i]), (y[n, i], x[n, i] * m[i] + x[n, i] ** 2)],
        inputs="x",
        consts="mask",
        optional={"mask": 0.5},
        shapes={"x": ("N", "I"), "mask": ("I",)},
    )


def test_specialize_custom_layer(rng):
    """Any layer: a tensor made constant by an absent optional constant is computed only when
    the constant is given, its readers (the output, the gradient) branch; gradcheck on both
    paths, and the same values as the lowering without the switch."""
    from symdl.testing import gradcheck

    d = derive(_optional_scale())
    on_text = generate_source(d)
    off_text = generate_source(d, options={"specialize": False})
    assert "if m is not None:" in on_text and "m = None" in on_text
    on, off = load_module(on_text, "opt"), load_module(off_text, "opt")
    x = rng.standard_normal((3, 4))
    for kwargs in ({}, {"mask": rng.standard_normal(4)}, {"mask": np.full(4, 0.5)}):
        res = [_run(mod, [x], kwargs, rng) for mod in (on, off)]
        for a, b in zip(*res):
            for u, w in zip(a, b):
                np.testing.assert_allclose(u, w, rtol=1e-12, atol=1e-13)
        y, _ = on.forward(x, **kwargs)
        assert y is not x and not np.shares_memory(y, x)
        result = gradcheck(on, [x], kwargs, tol=1e-6)
        assert result.ok, result


# ---- masked Piecewise statements in place (OPTIMIZATIONS["masked_inplace"]) ---------------------


@pytest.mark.parametrize("name", ["local_attention", "elu", "huber_loss", "leaky_relu"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_masked_inplace_switch(name, dtype, rng):
    """A two-way Piecewise over the full frame writes its other value into the full-size
    branch's buffer (np.copyto(..., where=...)) instead of np.where; off, np.where. Same
    numbers as the plain lowering, arguments and cache untouched, in the arguments' dtype."""
    d = derive(LAYERS[name])
    on_text = generate_source(d)
    off_text = generate_source(d, options={"masked_inplace": False})
    assert "np.copyto(" in on_text and "np.copyto(" not in off_text
    on, off = load_module(on_text, name), load_module(off_text, name)
    args, kwargs = R.DOMAINS[name](rng)
    args = [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args]
    before = _snapshot((args, kwargs))
    out, cache = on.forward(*args, **kwargs)
    dout = np.random.default_rng(1).standard_normal(np.shape(out)).astype(dtype)
    saved = _snapshot(cache)
    grads = on.backward(dout, cache)
    _assert_same(_snapshot((args, kwargs)), before)
    _assert_same(_snapshot(cache), saved)
    out2, cache2 = off.forward(*args, **kwargs)
    grads2 = off.backward(dout, cache2)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
    for x, y in zip((out, *grads), (out2, *grads2)):
        assert np.asarray(x).dtype == dtype
        np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("causal", [False, True])
def test_masked_inplace_mhsa(causal, rng):
    """The causal mask written into the score buffer (np.copyto where the key is in the future),
    the softmax numerator's masked entries likewise: agrees with the plain lowering and with
    the independent NumPy reference."""
    d = derive(LAYERS["multi_head_self_attention"])
    on_text = generate_source(d)
    assert on_text.count("np.copyto(") == 2
    on = load_module(on_text, "mha")
    off = load_module(generate_source(d, options={"masked_inplace": False}), "mha")
    args, _ = R.DOMAINS["multi_head_self_attention"](rng)
    kwargs = {"num_heads": 2, "causal": causal}
    res = [_run(m, args, kwargs, rng) for m in (on, off)]
    for a, b in zip(*res):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        res[0][0][0], R.NUMPY["multi_head_self_attention"](*args, **kwargs), rtol=1e-10, atol=1e-12
    )


# ---- slices of computed values as arrays of their own (OPTIMIZATIONS["temporary_slices"]) -----


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_temporary_slices_switch(dtype, rng):
    """local_attention's scores and dp are (t @ x[..., None])[..., 0], a slice of a product no
    other name holds: later chains write them in place (t0 *= scale, dp += ...); off, new
    arrays. Same numbers, arguments and cache untouched, against the dense computation too."""
    d = derive(LAYERS["local_attention"])
    on_text = generate_source(d)
    off_text = generate_source(d, options={"temporary_slices": False})
    assert "t0 *= scale" in on_text and "dp += " in on_text
    assert "t0 *= scale" not in off_text and "dp += " not in off_text
    on, off = load_module(on_text, "la"), load_module(off_text, "la")
    q, k, v = (rng.standard_normal((2, 7, 6)).astype(dtype)[:, :, ::2] for _ in range(3))
    before = _snapshot((q, k, v))
    y, cache = on.forward(q, k, v, window=2)
    dy = rng.standard_normal(y.shape).astype(dtype)
    saved = _snapshot(cache)
    grads = on.backward(dy, cache)
    _assert_same(_snapshot((q, k, v)), before)
    _assert_same(_snapshot(cache), saved)
    y2, cache2 = off.forward(q, k, v, window=2)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip((y, *grads), (y2, *off.backward(dy, cache2))):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **tol)
    np.testing.assert_allclose(y, _dense_local_attention(q, k, v, 2), **tol)


# ---- chains over cache-sized blocks (OPTIMIZATIONS["blocked"]) --------------------------------


def _blocked_args(name, dtype, rng):
    """Arguments larger than the block threshold (1 MiB), the first a non-contiguous view."""
    rows = 1200 if dtype == np.float32 else 600
    if name == "batch_norm":
        x = rng.standard_normal((rows // 10, 6, 30, 60)).astype(dtype)[..., ::2]
        return x, rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    x = rng.standard_normal((rows, 701)).astype(dtype)[:, ::2]
    if name == "layer_norm":
        return x, rng.standard_normal(351).astype(dtype), rng.standard_normal(351).astype(dtype)
    return (x,)


@pytest.mark.parametrize(
    "name", ["tanh", "sigmoid", "gelu", "silu", "elu", "leaky_relu", "layer_norm", "batch_norm"]
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocked_switch(name, dtype, rng):
    """Chains of two or more passes run as a loop over cache-sized blocks of the first axis
    (several blocks for these > 1 MiB arrays, one for small ones); off, whole-array chains.
    Same numbers (the same operations per element), arguments and cache untouched, the
    arguments' dtype kept; the small-array path agrees too."""
    d = derive(LAYERS[name])
    on_text = generate_source(d)
    off_text = generate_source(d, options={"blocked": False})
    assert "for sl in _cache_blocks(" in on_text and "_cache_blocks" not in off_text
    on, off = load_module(on_text, name), load_module(off_text, name)
    args = _blocked_args(name, dtype, rng)
    kwargs = {"negative_slope": 0.2} if name == "leaky_relu" else {}
    assert len(on._cache_blocks(args[0])) > 1 and len(on._cache_blocks(args[0][:20])) == 1
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    for args in (args, (args[0][:3],) + args[1:]):  # large (blocks), small (one slice)
        before = _snapshot((args, kwargs))
        out, cache = on.forward(*args, **kwargs)
        dout = rng.standard_normal(np.shape(out)).astype(dtype)
        saved = _snapshot((dout, cache))
        grads = on.backward(dout, cache)
        _assert_same(_snapshot((args, kwargs)), before)
        _assert_same(_snapshot((dout, cache)), saved)
        out2, cache2 = off.forward(*args, **kwargs)
        grads2 = off.backward(dout, cache2)
        for x, y in zip((out, *grads), (out2, *grads2)):
            assert np.asarray(x).dtype == dtype and np.shape(x) == np.shape(y)
            np.testing.assert_allclose(x, y, **tol)


def test_cache_blocks_slices():
    """_cache_blocks covers the first axis exactly once, in blocks of about 256 KiB; arrays of
    at most 1 MiB, a single row, or no elements as one slice of the whole."""
    blocks = load_module(generate_source(derive(LAYERS["tanh"])), "tanh")._cache_blocks
    for shape in [((1 << 17) + 1,), (1 << 19,), (1000, 333), (3, 1 << 19), ((1 << 18) + 7,)]:
        a = np.zeros(shape)
        hits = np.zeros(shape[0], int)
        for sl in blocks(a):
            hits[sl] += 1
            assert a[sl].nbytes <= max(1 << 18, a[0].nbytes)
        assert (hits == 1).all()
        assert len(blocks(a)) > 1  # (all of these larger than 1 MiB)
    for shape in [(0,), (0, 5), (1, 1 << 20), (100,)]:
        assert blocks(np.zeros(shape)) == (slice(None),)


# ---- a permuted stack of products written in its own order (OPTIMIZATIONS["ordered_product"]) --


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ordered_product_switch(causal, dtype, rng):
    """The heads' outputs a[n, l, h, f] = Sum(p[n, h, l, t] * v[n, t, h*D + f], t): one
    batched matmul writing through a permuted view of a (N, T, heads, D) array, so a is
    contiguous and the output projection's reshape copies nothing; switched off, the product's
    transposed result (a view) is kept. Both agree on forward and every gradient, on
    non-contiguous arguments too, and the forward matches the independent NumPy reference."""
    d = derive(LAYERS["multi_head_self_attention"])
    on_text = generate_source(d)
    off_text = generate_source(d, options={"ordered_product": False})
    assert "a = np.empty((N, T, num_heads, D), dtype=dtype)" in on_text
    assert "out=a.transpose(0, 2, 1, 3))" in on_text
    assert re.search(r"a = \(p @ .*\)\.transpose\(0, 2, 1, 3\)", off_text)
    assert "a = np.empty(" not in off_text
    on, off, args, kwargs = _mha_switch_agrees(on_text, off_text, dtype, causal, rng)
    assert on.forward(*args, **kwargs)[1]["a"].flags.c_contiguous
    assert not off.forward(*args, **kwargs)[1]["a"].flags.c_contiguous


# ---- a blocked chain's whole operands computed before the loop (OPTIMIZATIONS["hoist"]) ------


@pytest.mark.parametrize(
    "name", ["multi_head_self_attention", "scaled_dot_product_attention", "local_attention"]
)
def test_hoist_switch(name, rng):
    """The causal/band mask's factor (np.where(keep > 0, ...) of a (T, T) keep) in a chain run
    block by block: computed once before the loop with the switch on, once per block off
    (arrays above 1 MiB so the loop has several blocks). Both agree on forward and gradients,
    in float64 and float32."""
    d = derive(LAYERS[name])
    on_text = generate_source(d)
    off_text = generate_source(d, options={"hoist": False})
    hoisted = re.findall(r"\n( *)whole0 = (.*)\n\1for sl in _cache_blocks", on_text)
    assert hoisted and all("keep" in text for _, text in hoisted)
    assert "whole0" not in off_text
    assert re.search(r"for sl in _cache_blocks.*\n(.*\n){1,3}.*keep > 0", off_text)
    on, off = load_module(on_text, name), load_module(off_text, name)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        if name == "multi_head_self_attention":
            N, T, E = 8, 128, 8
            args = [rng.standard_normal((N, T, E)), rng.standard_normal((3 * E, E)) / 3,
                    rng.standard_normal(3 * E), rng.standard_normal((E, E)), rng.standard_normal(E)]
            kwargs = {"num_heads": 2, "causal": True}
        elif name == "scaled_dot_product_attention":
            args = [rng.standard_normal((8, 200, 4)) for _ in range(3)]
            kwargs = {"causal": True}
        else:
            args = [rng.standard_normal((8, 2048, 4)) for _ in range(3)]
            kwargs = {"window": 4}
        args = [a.astype(dtype) for a in args]
        res = []
        for m in (on, off):
            outs, cache = m.forward(*args, **kwargs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            dout = [np.random.default_rng(1).standard_normal(o.shape).astype(dtype) for o in outs]
            res.append((*outs, *m.backward(dout[0] if len(dout) == 1 else dout, cache)))
        for a, b in zip(*res):
            assert a.dtype == dtype
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
