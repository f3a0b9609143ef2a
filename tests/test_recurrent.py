"""Recurrent cells and the sequence layers scanned from them: gradchecks, PyTorch (nn.RNNCell,
nn.GRUCell, nn.LSTMCell, nn.RNN, nn.GRU, nn.LSTM) in float64, a custom scanned cell, float32,
the module contract and the shape of the generated time loop."""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import references as R
from conftest import GENERATED, load_generated

from symdl import registry
from symdl.codegen import generate_source, is_hand_edited
from symdl.errors import SpecError
from symdl.parse import parse_layer
from symdl.scan import scan_layer, sequence_source
from symdl.testing import gradcheck, load_module

torch = pytest.importorskip("torch")

CELLS = ("rnn_cell", "gru_cell", "lstm_cell")
SEQS = ("rnn", "gru", "lstm")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
TORCH_CELL = {"rnn": "RNNCell", "gru": "GRUCell", "lstm": "LSTMCell"}
TORCH_SEQ = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}
WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
RTOL, ATOL = 1e-7, 1e-12

MGU = """
f[b,j] = sigmoid(Sum(x[b,i]*wf[j,i], i) + Sum(h[b,k]*uf[j,k], k) + bf[j])
n[b,j] = tanh(Sum(x[b,i]*wn[j,i], i) + Sum(f[b,k]*h[b,k]*un[j,k], k) + bn[j])
h1[b,j] = (1 - f[b,j])*h[b,j] + f[b,j]*n[b,j]
"""
MGU_PARAMS = ("wf", "uf", "bf", "wn", "un", "bn")


# ---- loading ---------------------------------------------------------------------------------


_modules: dict = {}


def _cell_layer(name):
    return registry.get(name, "layer").definition


def render(name):
    """The engine's text of the catalogue sequence ``name`` (nothing is written)."""
    return registry.source(registry.get(name, "sequence"))


def get(name):
    return registry.get(name, "sequence").definition


def cell_module(name):
    """generated/NAME.py by path; the engine's text when it has not been generated yet."""
    if name not in _modules:
        if (GENERATED / f"{name}.py").exists():
            _modules[name] = load_generated(name)
        else:
            _modules[name] = load_module(generate_source(_cell_layer(name)), name)
    return _modules[name]


def seq_module(name):
    if name not in _modules:
        if (GENERATED / f"{name}.py").exists():
            _modules[name] = load_generated(name)
        else:
            _modules[name] = load_module(render(name), name)
    return _modules[name]


def mgu_cell():
    return parse_layer("mgu_cell", MGU, inputs="x, h", params=",".join(MGU_PARAMS))


def mgu_module():
    if "mgu" not in _modules:
        seq = scan_layer(mgu_cell(), "mgu", per_step="x", state={"h": "h1"})
        _modules["mgu"] = load_module(sequence_source(seq), "mgu")
    return _modules["mgu"]


# ---- helpers ---------------------------------------------------------------------------------


def weights(rng, kind, I, H, dtype=np.float64):
    g = GATES[kind]
    scale = 1 / np.sqrt(H)
    shapes = [(g * H, I), (g * H, H), (g * H,), (g * H,)]
    return [rng.uniform(-scale, scale, s).astype(dtype) for s in shapes]


def torch_grads(outs, douts, leaves):
    loss = sum((o * torch.from_numpy(d)).sum() for o, d in zip(outs, douts))
    return [g.numpy() for g in torch.autograd.grad(loss, leaves)]


def close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=what)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


# ---- gradchecks --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CELLS)
def test_cell_gradcheck(name):
    result = gradcheck(cell_module(name))
    assert result.ok, str(result)


@pytest.mark.parametrize("name", SEQS)
def test_sequence_gradcheck(name):
    module = seq_module(name)
    result = gradcheck(module)
    assert result.ok, str(result)
    states = ("h0", "c0") if name == "lstm" else ("h0",)
    assert set(states) <= set(result.errors)  # the initial states' gradients were checked


@pytest.mark.parametrize("T, B", [(1, 1), (1, 3), (6, 1), (4, 3)])
@pytest.mark.parametrize("name", SEQS)
def test_sequence_gradcheck_sizes(name, T, B):
    module = seq_module(name)
    result = gradcheck(module, checks={"sizes": {"T": T, "B": B, "I": 3, "H": 4}})
    assert result.ok, str(result)


# ---- PyTorch, one step -------------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("kind", SEQS)
def test_cell_matches_torch(kind, B, rng):
    I, H = 3, 5
    module = cell_module(f"{kind}_cell")
    W = weights(rng, kind, I, H)
    x, h, c = rng.standard_normal((B, I)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    net = getattr(torch.nn, TORCH_CELL[kind])(I, H, dtype=torch.float64)
    with torch.no_grad():
        for n, w in zip(WEIGHTS, W):
            getattr(net, n).copy_(torch.from_numpy(w))
    xt, ht, ct = (torch.tensor(a, requires_grad=True) for a in (x, h, c))
    if kind == "lstm":
        outs_t = net(xt, (ht, ct))
        out, cache = module.forward(x, h, c, *W)
        leaves = [xt, ht, ct]
    else:
        outs_t = (net(xt, ht),)
        out, cache = module.forward(x, h, *W)
        leaves = [xt, ht]
    outs = as_tuple(out)
    for k, (a, b) in enumerate(zip(outs, outs_t)):
        close(a, b.detach().numpy(), f"{kind} cell output {k}")
    douts = [rng.standard_normal(o.shape) for o in outs]
    grads = module.backward(tuple(douts) if len(douts) > 1 else douts[0], cache)
    ref = torch_grads(outs_t, douts, leaves + [getattr(net, n) for n in WEIGHTS])
    assert len(grads) == len(module.ARGS) == len(ref)
    for n, a, b in zip(module.ARGS, grads, ref):
        close(a, b, f"{kind} cell gradient of {n}")


# ---- PyTorch, sequences ----------------------------------------------------------------------


def run_torch_sequence(kind, x, h0, c0, W):
    I, H = x.shape[2], h0.shape[1]
    net = getattr(torch.nn, TORCH_SEQ[kind])(I, H, dtype=torch.float64)
    with torch.no_grad():
        for n, w in zip(WEIGHTS, W):
            getattr(net, f"{n}_l0").copy_(torch.from_numpy(w))
    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    c0t = torch.tensor(c0, requires_grad=True)
    if kind == "lstm":
        y, (hT, cT) = net(xt, (h0t[None], c0t[None]))
        outs = (y, hT[0], cT[0])
        leaves = [xt, h0t, c0t]
    else:
        y, hT = net(xt, h0t[None])
        outs = (y, hT[0])
        leaves = [xt, h0t]
    return outs, leaves + [getattr(net, f"{n}_l0") for n in WEIGHTS]


@pytest.mark.parametrize("T, B", [(1, 1), (1, 4), (7, 1), (5, 3)])
@pytest.mark.parametrize("kind", SEQS)
def test_sequence_matches_torch(kind, T, B, rng):
    I, H = 3, 5  # hidden size differs from input size
    module = seq_module(kind)
    W = weights(rng, kind, I, H)
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    args = (x, h0, c0, *W) if kind == "lstm" else (x, h0, *W)
    out, cache = module.forward(*args)
    outs_t, leaves = run_torch_sequence(kind, x, h0, c0, W)
    assert len(out) == len(outs_t) == len(module.OUTPUTS)
    for n, a, b in zip(module.OUTPUTS, out, outs_t):
        assert a.shape == tuple(b.shape), n
        close(a, b.detach().numpy(), f"{kind} output {n}")
    douts = [rng.standard_normal(o.shape) for o in out]
    grads = module.backward(tuple(douts), cache)
    ref = torch_grads(outs_t, douts, leaves)
    assert len(grads) == len(module.ARGS) == len(ref)
    for n, a, b, arg in zip(module.ARGS, grads, ref, args):
        assert a.shape == arg.shape, n
        close(a, b, f"{kind} gradient of {n}")


@pytest.mark.parametrize("kind", SEQS)
def test_sequence_is_the_cell_in_a_loop(kind, rng):
    """The scan's split (hoisted part + step) computes what the cell computes step by step."""
    T, B, I, H = 4, 2, 3, 5
    seq, cell = seq_module(kind), cell_module(f"{kind}_cell")
    W = weights(rng, kind, I, H)
    x = rng.standard_normal((T, B, I))
    h, c = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    out, _ = seq.forward(*((x, h, c, *W) if kind == "lstm" else (x, h, *W)))
    for t in range(T):
        if kind == "lstm":
            (h, c), _ = cell.forward(x[t], h, c, *W)
        else:
            h, _ = cell.forward(x[t], h, *W)
        np.testing.assert_allclose(out[0][t], h, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out[1], h, rtol=1e-12, atol=1e-14)
    if kind == "lstm":
        np.testing.assert_allclose(out[2], c, rtol=1e-12, atol=1e-14)


def test_empty_sequence_returns_the_initial_state(rng):
    module = seq_module("lstm")
    B, I, H = 2, 3, 4
    W = weights(rng, "lstm", I, H)
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    (y, hT, cT), cache = module.forward(np.zeros((0, B, I)), h0, c0, *W)
    assert y.shape == (0, B, H)
    np.testing.assert_array_equal(hT, h0)
    np.testing.assert_array_equal(cT, c0)
    dh, dc = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    grads = module.backward((np.zeros((0, B, H)), dh, dc), cache)
    np.testing.assert_array_equal(grads[1], dh)
    np.testing.assert_array_equal(grads[2], dc)
    assert all(not np.any(g) for g in grads[3:])


# ---- a custom cell, scanned ------------------------------------------------------------------


def test_custom_cell_scan_gradcheck():
    module = mgu_module()
    assert module.ARGS == ("x", "h0", *MGU_PARAMS)
    assert module.OUTPUTS == ("y", "h_T")
    result = gradcheck(module)
    assert result.ok, str(result)


def test_custom_cell_scan_hoists_the_input_projections():
    seq = scan_layer(mgu_cell(), "mgu", per_step="x", state={"h": "h1"})
    parts = seq.parts()
    hoisted = [str(lhs.base.label) for lhs, _ in parts.hoisted.equations]
    assert len(hoisted) == 2 and parts.time_varying == tuple(hoisted)
    text = "\n".join(f"{lhs} = {rhs}" for lhs, rhs in parts.hoisted.equations)
    for name in ("wf", "bf", "wn", "bn"):  # x's projections and their biases
        assert name in text
    for name in ("uf", "un", "h["):  # nothing that reads the state
        assert name not in text


def test_custom_cell_scan_matches_torch(rng):
    T, B, I, H = 5, 3, 4, 6
    module = mgu_module()
    shapes = {"wf": (H, I), "uf": (H, H), "bf": (H,), "wn": (H, I), "un": (H, H), "bn": (H,)}
    P = [rng.uniform(-0.5, 0.5, shapes[n]) for n in MGU_PARAMS]
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((B, H))
    (y, hT), cache = module.forward(x, h0, *P)
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, h0, *P)]
    xt, h, wf, uf, bf, wn, un, bn = leaves
    ys = []
    for t in range(T):
        f = torch.sigmoid(xt[t] @ wf.T + h @ uf.T + bf)
        n = torch.tanh(xt[t] @ wn.T + (f * h) @ un.T + bn)
        h = (1 - f) * h + f * n
        ys.append(h)
    outs_t = (torch.stack(ys), h)
    close(y, outs_t[0].detach().numpy(), "mgu y")
    close(hT, outs_t[1].detach().numpy(), "mgu h_T")
    douts = [rng.standard_normal(y.shape), rng.standard_normal(hT.shape)]
    grads = module.backward(tuple(douts), cache)
    for n, a, b in zip(module.ARGS, grads, torch_grads(outs_t, douts, leaves)):
        close(a, b, f"mgu gradient of {n}")


def test_scan_general_roles():
    """Per-step inputs read both before and inside the loop, a parameter-only intermediate
    (computed once), several stacked outputs and a state that is not stacked."""
    seq = _mix_seq()
    parts = seq.parts()
    assert parts.invariant == ("q",)
    assert "g" in parts.step.inputs and "g" in parts.hoisted.inputs
    module = load_module(sequence_source(seq), "mix")
    assert module.ARGS == ("x", "g", "h0", "m0", "w", "u", "p", "v")
    assert module.OUTPUTS == ("y", "z", "h_T", "m_T")
    result = gradcheck(module)
    assert result.ok, str(result)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"per_step": "q"}, "per-step 'q'"),
        ({"state": {"h": "nope"}}, "state 'h'"),
        ({"state": {"x": "h1"}, "per_step": ()}, "cell input 'h'"),
        ({"outputs": {"y": "zz"}}, "output 'y'"),
        ({"final": {"h_T": "h", "x_T": "x"}}, "final"),
    ],
)
def test_scan_declaration_errors(kwargs, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        scan_layer(mgu_cell(), "bad", **kwargs)


# ---- dtype, contract, code shape ---------------------------------------------------------------


@pytest.mark.parametrize("name", CELLS + SEQS)
def test_float32_preserved(name, rng):
    kind = name.replace("_cell", "")
    module = cell_module(name) if name.endswith("_cell") else seq_module(name)
    I, H, T, B = 3, 4, 3, 2
    W = weights(rng, kind, I, H)
    x = rng.standard_normal((B, I) if name.endswith("_cell") else (T, B, I))
    states = [rng.standard_normal((B, H)) for _ in range(2 if kind == "lstm" else 1)]
    args64 = (x, *states, *W)
    args32 = tuple(a.astype(np.float32) for a in args64)
    out32, cache32 = module.forward(*args32)
    out64, cache64 = module.forward(*args64)
    for a, b in zip(as_tuple(out32), as_tuple(out64)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    douts = tuple(np.ones_like(o) for o in as_tuple(out32))
    grads32 = module.backward(douts if len(douts) > 1 else douts[0], cache32)
    grads64 = module.backward(
        tuple(d.astype(np.float64) for d in douts)
        if len(douts) > 1
        else douts[0].astype(np.float64),
        cache64,
    )
    for n, a, b in zip(module.ARGS, grads32, grads64):
        assert a.dtype == np.float32, n
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=n)


@pytest.mark.parametrize("name", SEQS)
def test_sequence_contract(name):
    text = render(name)
    module = seq_module(name)
    lstm = name == "lstm"
    assert module.NAME == name
    assert module.ARGS == ("x", "h0", *(("c0",) if lstm else ()), *WEIGHTS)
    assert module.PARAMS == WEIGHTS
    assert module.CONSTS == () and module.HYPERPARAMETERS == {} and module.INDEX_RANGES == {}
    assert module.OUTPUTS == ("y", "h_T", *(("c_T",) if lstm else ()))
    g = GATES[name]
    stacked = f"{g}*H" if g > 1 else "H"
    assert module.SHAPES["x"] == ("T", "B", "I")
    assert module.SHAPES["y"] == ("T", "B", "H")
    assert module.SHAPES["h0"] == module.SHAPES["h_T"] == ("B", "H")
    assert module.SHAPES["weight_ih"] == (stacked, "I")
    assert module.SHAPES["weight_hh"] == (stacked, "H")
    assert module.FORMULAS and all(isinstance(v, str) for v in module.FORMULAS.values())
    lines = text.splitlines()
    assert lines[0].startswith("# Generated by symdl ") and "symdl/layers/sequences.py" in lines[0]
    assert lines[1] == f"#     symdl generate {name}"
    assert not is_hand_edited(text)
    assert text == render(name)  # deterministic
    tree = ast.parse(text)
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported == {"numpy"}
    from symdl.codegen import format_source

    assert format_source(text) == text


@pytest.mark.parametrize("name", SEQS)
def test_sequence_bad_input_messages(name, rng):
    module = seq_module(name)
    I, H, T, B = 3, 4, 3, 2
    W = weights(rng, name, I, H)
    states = [np.zeros((B, H))] * (2 if name == "lstm" else 1)
    with pytest.raises(ValueError, match="'h0'"):
        module.forward(np.zeros((T, B, I)), np.zeros((B + 1, H)), *states[1:], *W)
    with pytest.raises(ValueError, match="'x'"):
        module.forward(np.zeros((B, I)), *states, *W)
    with pytest.raises(ValueError, match="weight_hh"):
        module.forward(np.zeros((T, B, I)), *states, W[0], W[1][:, :-1], *W[2:])
    out, cache = module.forward(np.zeros((T, B, I)), *states, *W)
    bad = (np.zeros((T + 1, B, H)),) + tuple(out[1:])
    with pytest.raises(ValueError, match="'y'"):
        module.backward(bad, cache)


def _function_source(text, fname):
    tree = ast.parse(text)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == fname)
    return ast.get_source_segment(text, fn)


def _contractions(src):
    """Matrix products in a function: ``@`` operators, np.matmul calls and einsum calls of two
    or more operands."""
    tree = ast.parse(src)
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            count += 1
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "matmul":
            count += 1
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "einsum":
            count += len(node.args) >= 3
    return count


@pytest.mark.parametrize("name", SEQS)
def test_blas_calls_per_sequence(name):
    """Input projections for all T steps are one GEMM forward and two backward (dW_ih over all
    T*B rows and dx); each step does one GEMM forward (h W_hh^T) and one backward (dh); dW_hh
    is one GEMM over all T*B rows after the loop."""
    text = render(name)
    assert _contractions(_function_source(text, "_hoisted_forward")) == 1
    assert _contractions(_function_source(text, "_hoisted_backward")) == 2
    assert _contractions(_function_source(text, "_step_forward")) == 1
    assert _contractions(_function_source(text, "_step_backward")) == 1
    assert _contractions(_function_source(text, "_step_param_grads")) == 1
    for public in ("forward", "backward"):
        src = _function_source(text, public)
        assert _contractions(src) == 0
        loop = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.For))
        calls = {
            n.func.id
            for stmt in loop.body
            for n in ast.walk(stmt)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert calls == {f"_step_{public}"}  # the loop allocates nothing itself
        assert "weight_ih" not in ast.get_source_segment(src, loop)


def test_sequence_cache_keeps_no_parameter_per_step(rng):
    module = seq_module("lstm")
    I, H, T, B = 3, 4, 5, 2
    W = weights(rng, "lstm", I, H)
    _, cache = module.forward(
        rng.standard_normal((T, B, I)), np.zeros((B, H)), np.zeros((B, H)), *W
    )
    assert len(cache["steps"]) == T
    for step in cache["steps"]:
        assert all(a.shape == (B, H) for a in step)  # the state and the gates of one step


def test_show_helpers():
    from symdl.scan import report, sequence_formulas

    seq = get("gru")
    text = report(seq)
    for part in ("scan of gru_cell", "hoisted out of the time loop", "gi[t, b, r]", "dweight_ih"):
        assert part in text
    module = load_module(render("gru"), "gru")
    assert module.FORMULAS == sequence_formulas(seq)


# ---- parameter gradients over all steps (the scan's "defer" optimization) -----------------------


def _mix_seq():
    cell = parse_layer(
        "mix_cell",
        """
        q[j] = exp(p[j])
        n[b,j] = tanh(Sum(x[b,i]*w[j,i], i) + Sum(h[b,k]*u[j,k], k) + sigmoid(g[b,j]))
        h1[b,j] = n[b,j] + g[b,j]*h[b,j]*q[j]
        m1[b,j] = m[b,j]*n[b,j] + Sum(x[b,i]*v[j,i], i)
        """,
        inputs="x, g, h, m",
        params="w, u, p, v",
        outputs="h1, m1",
    )
    return scan_layer(
        cell, "mix", per_step="x, g", state={"h": "h1", "m": "m1"}, outputs={"y": "h1", "z": "n"}
    )


def _two_seq():
    """A state that is not stacked (m) feeding a recurrent weight's gradient."""
    import sympy as sp

    from symdl.functions import Sum, sigmoid
    from symdl.spec import Layer, indices, tensors

    x, h, m, w, u, v, h1, m1 = tensors("x h m w u v h1 m1")
    b, i, j, k = indices("b i j k")
    cell = Layer(
        "two_cell",
        [
            (h1[b, j], sp.tanh(Sum(x[b, i] * w[j, i], i) + Sum(m[b, k] * u[j, k], k))),
            (m1[b, j], sigmoid(Sum(h[b, k] * v[j, k], k)) * m[b, j] + h1[b, j]),
        ],
        inputs="x h m",
        params="w u v",
        outputs="h1 m1",
        shapes={"x": ("B", "I"), "h": ("B", "H"), "m": ("B", "H"), "w": ("H", "I")},
    )
    return scan_layer(cell, "two", per_step="x", state={"h": "h1", "m": "m1"})


def _scans():
    return {
        **{name: get(name) for name in SEQS},
        "mgu": scan_layer(mgu_cell(), "mgu", per_step="x", state={"h": "h1"}),
        "mix": _mix_seq(),
        "two": _two_seq(),
    }


def _sequences_agree(fast, plain, rng):
    """The two sequence modules give the same outputs (rtol 1e-12) and gradients (rtol 1e-10,
    float64) on the same random arguments and incoming gradients; the arguments."""
    args = R.sequence_args(fast, rng)
    out_f, cache_f = fast.forward(*args)
    out_p, cache_p = plain.forward(*args)
    douts = tuple(rng.standard_normal(np.shape(o)) for o in out_f)
    for a, b in zip(out_f, out_p):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for n, a, b in zip(fast.ARGS, fast.backward(douts, cache_f), plain.backward(douts, cache_p)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=n)
    return args


@pytest.mark.parametrize("name", [*SEQS, "mgu", "mix", "two"])
def test_deferred_parameter_gradients_switch(name, rng):
    """With the scan's "defer" switch off the parameters' gradients are summed step by step in
    the loop (the plain scan); both give the same numbers, and on, no step computes one."""
    seq = _scans()[name]
    fast_text = sequence_source(seq)
    plain_text = sequence_source(seq, options={"defer": False})
    assert "def _step_param_grads" in fast_text and "def _step_param_grads" not in plain_text
    fast, plain = load_module(fast_text, name), load_module(plain_text, name)
    if name == "two":  # not gradchecked elsewhere
        result = gradcheck(fast)
        assert result.ok, str(result)
    args = _sequences_agree(fast, plain, rng)
    # T = 0: the sums over no steps are zero
    args0 = [
        np.zeros((0,) + a.shape[1:]) if n in ("x", "g") else a for n, a in zip(fast.ARGS, args)
    ]
    out0, cache0 = fast.forward(*args0)
    grads0 = fast.backward(tuple(np.zeros(np.shape(o)) for o in out0), cache0)
    for n, g in zip(fast.ARGS, grads0):
        if n in fast.PARAMS:
            assert g.shape == np.shape(args0[fast.ARGS.index(n)]) and not np.any(g), n


def _loop_of(src):
    return next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.For))


@pytest.mark.parametrize("name", [*SEQS, "mgu", "mix", "two"])
def test_no_parameter_gradient_inside_the_backward_loop(name):
    """dW_hh (and every recurrent weight's gradient) is one contraction over all T*B rows after
    the loop: the step's backward computes no parameter gradient, the loop accumulates nothing,
    and the contractions left in the step are those the state gradient needs."""
    seq = _scans()[name]
    text = sequence_source(seq)
    step = _function_source(text, "_step_backward")
    params = _function_source(text, "_step_param_grads")
    plain = sequence_source(seq, options={"defer": False})
    plain_step = _function_source(plain, "_step_backward")
    recurrent = [n for n in seq.cell.params if n in seq.parts().step.spec().params]
    assert recurrent
    for n in recurrent:  # dW is returned by the plain step, computed after the loop otherwise
        assert re.search(rf"^    (d{n} = |np\.\w+\(.*\bout=d{n}\))", plain_step, re.MULTILINE)
        assert not re.search(rf"\bd{n}\b", step)
        assert re.search(rf"^    d{n} = ", params, re.MULTILINE)
    loop = _loop_of(_function_source(text, "backward"))
    assert not any(isinstance(n, ast.AugAssign) for n in ast.walk(loop))
    plain_loop = _loop_of(_function_source(plain, "backward"))
    assert any(isinstance(n, ast.AugAssign) for n in ast.walk(plain_loop))
    weights_ = [n for n in recurrent if len(seq.cell.spec().tensors[n].dims) == 2]
    assert _contractions(step) <= _contractions(plain_step) - len(weights_)
    assert _contractions(params) >= len(weights_)


def test_shared_gate_gradient_is_one_array():
    """The LSTM's gradients with respect to the two gate projections are the same array: the
    step builds it once and one (T, B, 4H) buffer feeds dW_ih, dx, dW_hh and both biases."""
    text = render("lstm")
    step = _function_source(text, "_step_backward")
    assert step.count("np.zeros(") + step.count("[...] = 0") == 0  # blocks tile it
    code = [line for line in step.splitlines() if not line.strip().startswith("#")]
    writes = [line for line in code if re.search(r"^\s*dgh\[.*\] \+?= |out=dgh\[", line)]
    assert len(writes) == 4  # the four gate blocks, once
    backward = _function_source(text, "backward")
    assert backward.count("np.empty((T, B, H_x4)") == 1
    assert "_step_param_grads(dgi, " in backward and "_hoisted_backward(dgi, " in backward


def test_scan_unknown_option_is_an_error():
    with pytest.raises(SpecError, match="scan options require names"):
        sequence_source(_scans()["rnn"], options={"fast": True})


# ---- per-step arrays allocated once (the scan's "buffers" optimization) ------------------------


@pytest.mark.parametrize("defer", [True, False])
@pytest.mark.parametrize("name", [*SEQS, "mgu", "mix", "two"])
def test_step_buffers_switch(name, defer, rng):
    """With the scan's "buffers" switch on, the step writes its new arrays into arrays made once
    before the loop; off, every step allocates its own. The same numbers either way, for
    non-contiguous arguments too; no argument is written, a second forward does not overwrite
    the first one's outputs, and backward may run twice on one cache."""
    seq = _scans()[name]
    fast_text = sequence_source(seq, options={"defer": defer})
    plain_text = sequence_source(seq, options={"defer": defer, "buffers": False})
    assert "buffers" in fast_text and "buffers" not in plain_text
    fast, plain = load_module(fast_text, name), load_module(plain_text, name)
    args = R.sequence_args(fast, rng, T=5)
    args = [np.asfortranarray(a) if a.ndim >= 2 else a for a in args]  # non-contiguous steps
    kept = [a.copy() for a in args]
    out_f, cache_f = fast.forward(*args)
    out_p, cache_p = plain.forward(*args)
    first = [np.array(o) for o in out_f]
    fast.forward(*[rng.uniform(-0.8, 0.8, a.shape) for a in args])  # a second, other call
    douts = tuple(rng.standard_normal(np.shape(o)) for o in out_f)
    for a, b, c in zip(out_f, out_p, first):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(a, c)
    grads_f = fast.backward(douts, cache_f)
    again = fast.backward(douts, cache_f)
    grads_p = plain.backward(douts, cache_p)
    for n, a, b, c in zip(fast.ARGS, grads_f, grads_p, again):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=n)
        np.testing.assert_array_equal(a, c, err_msg=n)
    for n, a, b in zip(fast.ARGS, args, kept):
        np.testing.assert_array_equal(a, b, err_msg=n)


#: allocations of arrays of at least B*H elements by the steps over one forward and one backward
#: with T = 6 steps, with the per-step buffers (an upper bound) and without them (exact)
STEP_ALLOCATIONS = {
    "lstm": {"buffers": (6, 55), "plain": (54, 97)},
    "gru": {"buffers": (6, 49), "plain": (36, 85)},
}


@pytest.mark.parametrize("name", sorted(STEP_ALLOCATIONS))
def test_step_allocations(name, rng):
    """The step functions' new arrays, counted by routing every operation of the generated step
    functions through the pass counter of test_optimizations."""
    from test_optimizations import _Counter, _Passes

    seq = _scans()[name]

    def count(text):
        tree = ast.parse(text)
        namespace = {}
        exec(compile(text, "<module>", "exec"), namespace)
        module = load_module(text, name)
        args = R.sequence_args(module, rng, T=6, B=4)
        counter = _Counter(4 * 5)  # B * H
        namespace.update(__op=counter.op, __unary=counter.unary, __aug=counter.aug, __call=counter.call)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_step_"):
                fn = ast.fix_missing_locations(_Passes().visit(node))
                exec(compile(ast.Module([fn], []), "<counted>", "exec"), namespace)
        out, cache = namespace["forward"](*args)
        forward = counter.allocations
        counter.allocations = 0
        namespace["backward"](tuple(np.ones(np.shape(o)) for o in out), cache)
        return forward, counter.allocations

    fast = count(sequence_source(seq))
    plain = count(sequence_source(seq, options={"buffers": False}))
    print(f"{name}: step allocations (forward, backward): buffers {fast}, plain {plain}")
    bound = STEP_ALLOCATIONS[name]
    assert fast[0] <= bound["buffers"][0] and fast[1] <= bound["buffers"][1], fast
    assert plain == bound["plain"]  # the counter still counts what the plain steps allocate


@pytest.mark.parametrize("name", [*SEQS, "mgu", "mix", "two"])
def test_fold_switch(name, rng):
    """With the scan's "fold" switch on, a recurrent sum's parameter-only terms go into the
    hoisted tensor always added to it (the LSTM's b_hh into the input projection): the step
    no longer reads b_hh. The same numbers with it off, where each step adds b_hh."""
    seq = _scans()[name]
    on, off = sequence_source(seq), sequence_source(seq, options={"fold": False})
    fast, plain = load_module(on, name), load_module(off, name)
    _sequences_agree(fast, plain, rng)
    step_on = _function_source(on, "_step_forward")
    step_off = _function_source(off, "_step_forward")
    if name == "lstm":
        assert "bias_hh" in step_off and "bias_hh" not in step_on
        assert "bias_hh" in _function_source(on, "_hoisted_forward")
    elif name in ("gru", "rnn"):  # b_hn is multiplied by r (GRU); the RNN hoists it already
        assert on == off
