"""Error behaviour: bad equation text (API and CLI) and bad arrays given to generated modules."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from symdl import derive
from symdl.cli import main
from symdl.errors import ParseError, SymdlError
from symdl.parse import parse_layer

GENERATED = Path(__file__).resolve().parents[1] / "generated"

# ---- bad equation text ------------------------------------------------------------------
#
# (id, equation text, extra parse_layer/CLI options, substrings the message must contain:
#  the offending name or the position)

BAD_EQUATIONS = [
    ("unknown-function", "y[n] = foo(x[n])", {}, ["'foo'"]),
    ("index-one-side", "y[n] = x[n, j]", {}, ["index j"]),
    ("rank-mismatch-two-equations", "y[n] = x[n]; z[n] = x[n, n]", {}, ["'x'"]),
    ("rank-mismatch-one-equation", "y[n, i] = x[n] * x[n, i]", {}, ["'x'"]),
    ("dunder-import", "y[n] = __import__('os').system('touch CANARY')", {}, ["line 1, column"]),
    (
        "dunder-import-inside",
        "y[n] = x[n] + __import__('os').system('touch CANARY')",
        {},
        ["line 1, column 15"],
    ),
    ("attribute", "y[n] = x.T[n]", {}, ["x.T"]),
    ("lambda", "y[n] = (lambda a: a)(x[n])", {}, ["line 1, column"]),
    ("list-comprehension", "y[n] = x[n] + [a for a in x]", {}, ["line 1, column 15"]),
    ("f-string", "y[n] = x[n] + f'{x}'", {}, ["line 1, column 15"]),
    ("exec", 'y[n] = exec(\'open("CANARY", "w")\')', {}, ["'exec'"]),
    ("exec-statement", 'exec(\'open("CANARY", "w")\')', {}, ["line 1, column 1"]),
    ("open", "y[n] = x[n] + open('/etc/passwd')", {}, ["'open'"]),
    ("keyword-argument", "y[n] = exp(x=1)", {}, ["'exp'"]),
    ("conditional-expression", "y[n] = x[n] if 1 else 2", {}, ["line 1, column 8"]),
    ("walrus", "y[n] = (z := x[n])", {}, ["line 1, column"]),
    ("unbalanced-paren", "y[n] = exp(x[n]", {}, ["line 1, column"]),
    ("unbalanced-bracket", "y[n] = x[n]]", {}, ["line 1, column"]),
    ("unbalanced-second-line", "y[n] = x[n]\nz[n] = (y[n]", {}, ["line 2, column"]),
    ("fullwidth-identifier", "y[n] = \uff58[n]", {}, ["line 1, column 8"]),
    ("tower-of-powers", "y[n] = x[n] * 10**10**10", {}, ["line 1, column"]),
    ("huge-integer", "y[n] = x[n] * 99999999999999999999", {}, ["line 1, column 15"]),
    ("undeclared-tensor", "y[n] = x[n] + q[n]", {}, ["'q'"]),
    ("undeclared-name", "y[n] = x[n] + q", {}, ["'q'"]),
    ("assign-to-input", "x[n] = exp(x[n])", {}, ["'x'"]),
    ("assign-to-input-later", "y[n] = exp(x[n]); x[n] = y[n]", {}, ["'x'"]),
    ("assigned-twice", "y[n] = exp(x[n]); y[n] = x[n]", {}, ["'y'"]),
    ("unknown-output", "y[n] = exp(x[n])", {"outputs": "zzz"}, ["'zzz'"]),
]

IDS = [case[0] for case in BAD_EQUATIONS]


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run in an empty working directory, so a created canary file would be seen."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _no_canary(*dirs):
    for d in dirs:
        assert not (Path(d) / "CANARY").exists(), f"CANARY created in {d}"
    assert not (Path.cwd() / "CANARY").exists()


@pytest.mark.parametrize("label, text, options, fragments", BAD_EQUATIONS, ids=IDS)
def test_bad_equations_raise_symdl_errors(in_tmp_cwd, label, text, options, fragments):
    with pytest.raises(SymdlError) as exc:
        layer = parse_layer("bad", text, inputs="x", **options)
        derive(layer)
    err = exc.value
    assert type(err) is not SymdlError  # a stage-specific subclass
    message = str(err)
    assert message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    _no_canary(in_tmp_cwd)


@pytest.mark.parametrize("label, text, options, fragments", BAD_EQUATIONS, ids=IDS)
def test_bad_equations_through_cli(capsys, tmp_path, in_tmp_cwd, label, text, options, fragments):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["derive", "bad", text, "--inputs", "x", "-o", str(out_dir)]
    for key, value in options.items():
        argv += [f"--{key}", value]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert os.listdir(out_dir) == []
    _no_canary(in_tmp_cwd, out_dir)


@pytest.mark.parametrize(
    "text, hyper, message",
    [
        (
            "y[n,i] = x[n, s*i]",
            {"s": 2.5},
            "'s' sets a size or an index position, which requires an integer default, got 2.5",
        ),
        (
            "y[n,i] = x[n, i + s]",
            {"s": True},
            "'s' sets a size or an index position, which requires an integer default, got True",
        ),
        ("y[n,i] = x[n, s*i]", {"s": float}, "'s' sets a size or an index position"),
    ],
)
def test_fractional_default_of_an_index_hyperparameter(text, hyper, message):
    layer = parse_layer("strided", text, inputs="x", hyper=hyper)
    with pytest.raises(SymdlError, match=message) as exc:
        derive(layer)
    assert str(exc.value).startswith("layer 'strided': ")


def test_integral_float_default_of_an_index_hyperparameter_is_an_int():
    spec = parse_layer(
        "strided", "y[n,i] = q*x[n, s*i + p]", inputs="x", hyper="s=2.0,p,q=0.5"
    ).spec()
    assert spec.hyper == {"s": 2, "p": int, "q": 0.5} and type(spec.hyper["s"]) is int


def test_syntax_error_gives_line_and_column():
    with pytest.raises(ParseError) as exc:
        parse_layer("bad", "y[n] = x[n]\nz[n] = exp(y[n]", inputs="x")
    assert exc.value.data.get("line") == 2
    assert isinstance(exc.value.data.get("column"), int)
    assert "line 2, column" in str(exc.value)


def test_import_canary_through_subprocess(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for text in (
        "y[n] = __import__('os').system('touch CANARY')",
        "y[n] = x[n] * __import__('os').system('touch CANARY')",
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "symdl",
                "derive",
                "evil",
                text,
                "--inputs",
                "x",
                "-o",
                str(out_dir),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stdout == ""
        assert not (tmp_path / "CANARY").exists()
        assert os.listdir(out_dir) == []


# ---- generated modules under bad arrays ---------------------------------------------------


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"_symdl_generated_{name}", GENERATED / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mods():
    return {
        name: _load(name)
        for name in ("linear", "cross_entropy", "embedding", "mse_loss", "sigmoid", "softmax")
    }


def _rng():
    return np.random.default_rng(1234)


def _linear_args(dtype=np.float64, n=3):
    rng = _rng()
    return (
        rng.standard_normal((n, 4)).astype(dtype),
        rng.standard_normal((5, 4)).astype(dtype),
        rng.standard_normal(5).astype(dtype),
    )


@pytest.mark.parametrize(
    "module, args, kwargs, argname, shape",
    [
        (
            "linear",
            lambda: (np.zeros((3, 4, 1)), np.zeros((5, 4)), np.zeros(5)),
            {},
            "x",
            (3, 4, 1),
        ),
        (
            "linear",
            lambda: (np.zeros((3, 4)), np.zeros((5, 4)), np.zeros((5, 1))),
            {},
            "bias",
            (5, 1),
        ),
        ("linear", lambda: (np.zeros(4), np.zeros((5, 4)), np.zeros(5)), {}, "x", (4,)),
        (
            "cross_entropy",
            lambda: (np.zeros((3, 4)),),
            lambda: {"target": np.zeros((3, 2), dtype=np.int64)},
            "target",
            (3, 2),
        ),
        (
            "cross_entropy",
            lambda: (np.zeros(7),),
            lambda: {"target": np.zeros(7, dtype=np.int64)},
            "logits",
            (7,),
        ),
        (
            "embedding",
            lambda: (np.zeros((3, 4, 2)),),
            lambda: {"indices": np.zeros(2, dtype=np.int64)},
            "weight",
            (3, 4, 2),
        ),
    ],
)
def test_wrong_rank(mods, module, args, kwargs, argname, shape):
    kwargs = kwargs() if callable(kwargs) else kwargs
    with pytest.raises(ValueError) as exc:
        mods[module].forward(*args(), **kwargs)
    message = str(exc.value)
    assert repr(argname) in message, message
    assert str(shape) in message, message


def test_inconsistent_dimension(mods):
    with pytest.raises(ValueError) as exc:
        mods["linear"].forward(np.zeros((3, 17)), np.zeros((5, 23)), np.zeros(5))
    message = str(exc.value)
    assert "'weight'" in message
    assert "'in'" in message
    assert "17" in message and "23" in message


def test_inconsistent_dimension_bias(mods):
    with pytest.raises(ValueError) as exc:
        mods["linear"].forward(np.zeros((3, 4)), np.zeros((5, 4)), np.zeros(6))
    message = str(exc.value)
    assert "'bias'" in message and "'out'" in message
    assert "5" in message and "6" in message


def test_inconsistent_const_shape(mods):
    with pytest.raises(ValueError) as exc:
        mods["cross_entropy"].forward(np.zeros((3, 4)), target=np.zeros(5, dtype=np.int64))
    message = str(exc.value)
    assert "'target'" in message and "3" in message and "5" in message


@pytest.mark.parametrize(
    "module, call, argname",
    [
        (
            "linear",
            lambda m: m.forward(np.zeros((3, 4), dtype=np.int64), np.zeros((5, 4)), np.zeros(5)),
            "x",
        ),
        (
            "linear",
            lambda m: m.forward(np.zeros((3, 4)), np.zeros((5, 4), dtype=np.int32), np.zeros(5)),
            "weight",
        ),
        (
            "linear",
            lambda m: m.forward(np.zeros((3, 4)), np.zeros((5, 4)), np.zeros(5, dtype=bool)),
            "bias",
        ),
        ("sigmoid", lambda m: m.forward(np.arange(6).reshape(2, 3)), "x"),
        ("sigmoid", lambda m: m.forward([[1, 2], [3, 4]]), "x"),
        ("softmax", lambda m: m.forward(np.zeros((2, 3), dtype=np.int64)), "x"),
        (
            "cross_entropy",
            lambda m: m.forward(
                np.zeros((3, 4), dtype=np.int64), target=np.zeros(3, dtype=np.int64)
            ),
            "logits",
        ),
    ],
)
def test_integer_where_float_required(mods, module, call, argname):
    with pytest.raises(TypeError) as exc:
        call(mods[module])
    assert repr(argname) in str(exc.value), str(exc.value)


@pytest.mark.parametrize(
    "module, call, argname",
    [
        (
            "cross_entropy",
            lambda m: m.forward(np.zeros((3, 4)), target=np.array([0.0, 1.0, 2.0])),
            "target",
        ),
        ("cross_entropy", lambda m: m.forward(np.zeros((3, 4)), target=[0.0, 1.0, 2.0]), "target"),
        (
            "embedding",
            lambda m: m.forward(np.zeros((3, 4)), indices=np.array([0.0, 1.0])),
            "indices",
        ),
    ],
)
def test_float_where_indices_required(mods, module, call, argname):
    with pytest.raises(TypeError) as exc:
        call(mods[module])
    assert repr(argname) in str(exc.value), str(exc.value)


@pytest.mark.parametrize(
    "module, call, argname",
    [
        (
            "cross_entropy",
            lambda m: m.forward(np.zeros((3, 4)), target=np.array([0, 1, 4])),
            "target",
        ),
        (
            "cross_entropy",
            lambda m: m.forward(np.zeros((3, 4)), target=np.array([0, -1, 2])),
            "target",
        ),
        (
            "embedding",
            lambda m: m.forward(np.zeros((3, 4)), indices=np.array([[0, 3]])),
            "indices",
        ),
        ("embedding", lambda m: m.forward(np.zeros((3, 4)), indices=np.array([-1])), "indices"),
    ],
)
def test_out_of_range_index(mods, module, call, argname):
    with pytest.raises(ValueError) as exc:
        call(mods[module])
    assert repr(argname) in str(exc.value), str(exc.value)


def test_in_range_indices_are_accepted(mods):
    logits = _rng().standard_normal((3, 4))
    loss, _ = mods["cross_entropy"].forward(logits, target=np.array([0, 3, 2]))
    assert np.isfinite(loss)
    weight = _rng().standard_normal((3, 4))
    y, _ = mods["embedding"].forward(weight, indices=np.array([[0, 2], [1, 2]]))
    np.testing.assert_array_equal(y, weight[[[0, 2], [1, 2]]])


@pytest.mark.parametrize(
    "module, make, dout, outname",
    [
        ("linear", lambda m: m.forward(*_linear_args()), np.zeros((3, 6)), "y"),
        ("linear", lambda m: m.forward(*_linear_args()), np.zeros((5, 3)), "y"),
        ("linear", lambda m: m.forward(*_linear_args()), np.zeros(15), "y"),
        (
            "cross_entropy",
            lambda m: m.forward(np.zeros((3, 4)), target=np.array([0, 1, 2])),
            np.zeros(3),
            "L",
        ),
        (
            "mse_loss",
            lambda m: m.forward(np.zeros((3, 4)), target=np.ones((3, 4))),
            np.zeros((1,)),
            "L",
        ),
        ("sigmoid", lambda m: m.forward(np.zeros((2, 3))), np.zeros((3, 2)), "y"),
        (
            "embedding",
            lambda m: m.forward(np.zeros((3, 4)), indices=np.array([0, 1])),
            np.zeros((2, 5)),
            "y",
        ),
    ],
)
def test_backward_dout_wrong_shape(mods, module, make, dout, outname):
    _, cache = make(mods[module])
    with pytest.raises(ValueError) as exc:
        mods[module].backward(dout, cache)
    assert repr(outname) in str(exc.value), str(exc.value)


@pytest.mark.parametrize(
    "dtypes",
    [
        (np.float32, np.float64, np.float64),
        (np.float64, np.float32, np.float64),
        (np.float64, np.float64, np.float32),
    ],
)
def test_mixed_float_precision(mods, dtypes):
    args = [a.astype(d) for a, d in zip(_linear_args(), dtypes)]
    with pytest.raises(TypeError) as exc:
        mods["linear"].forward(*args)
    message = str(exc.value)
    assert "float32" in message and "float64" in message


# ---- memory layout, precision, empty batches -----------------------------------------------


def _assert_same_results(module, args, kwargs, dout_layout=None):
    """Forward and backward of ``args`` equal those of their contiguous copies."""
    contiguous = tuple(np.ascontiguousarray(a) for a in args)
    for a, c in zip(args, contiguous):
        np.testing.assert_array_equal(a, c)
    y1, cache1 = module.forward(*args, **kwargs)
    y2, cache2 = module.forward(*contiguous, **kwargs)
    assert np.shape(y1) == np.shape(y2)
    np.testing.assert_allclose(y1, y2, rtol=1e-13, atol=1e-13)
    dout = _rng().standard_normal(np.shape(y2))
    dout_view = dout_layout(dout) if dout_layout else dout
    g1 = module.backward(dout_view, cache1)
    g2 = module.backward(dout, cache2)
    assert len(g1) == len(g2) == len(module.ARGS)
    for a, b, x in zip(g1, g2, args):
        assert np.shape(a) == np.shape(b) == np.shape(x)
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def _transposed_view(dout):
    view = np.ascontiguousarray(dout.T).T
    assert not view.flags.c_contiguous or dout.ndim < 2
    return view


def test_noncontiguous_linear(mods):
    rng = _rng()
    x = rng.standard_normal((4, 3)).T  # transposed view, (3, 4)
    weight = np.asfortranarray(rng.standard_normal((5, 4)))
    bias = rng.standard_normal(10)[::2]  # strided slice
    assert not x.flags.c_contiguous and not weight.flags.c_contiguous
    assert not bias.flags.c_contiguous
    _assert_same_results(mods["linear"], (x, weight, bias), {}, _transposed_view)


def test_noncontiguous_linear_strided_rows(mods):
    rng = _rng()
    x = rng.standard_normal((6, 8))[::2, 1::2]  # (3, 4), strided both ways
    weight = rng.standard_normal((4, 5)).T  # (5, 4)
    bias = rng.standard_normal(5)
    _assert_same_results(mods["linear"], (x, weight, bias), {})


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_noncontiguous_activations(mods, name):
    rng = _rng()
    for x in (
        rng.standard_normal((4, 3)).T,
        rng.standard_normal((6, 8))[::2, ::2],
        np.asfortranarray(rng.standard_normal((3, 4))),
    ):
        _assert_same_results(mods[name], (x,), {}, _transposed_view)


def test_noncontiguous_cross_entropy(mods):
    rng = _rng()
    logits = rng.standard_normal((4, 3)).T  # (3, 4)
    target = np.array([0, 9, 3, 9, 2, 9])[::2]  # strided: [0, 3, 2]
    _assert_same_results(mods["cross_entropy"], (logits,), {"target": target})
    logits = np.asfortranarray(rng.standard_normal((3, 4)))
    _assert_same_results(
        mods["cross_entropy"], (logits,), {"target": np.ascontiguousarray(target)}
    )


def test_noncontiguous_embedding(mods):
    rng = _rng()
    weight = rng.standard_normal((4, 5)).T  # (5, 4) transposed view
    indices = np.array([[0, 4, 2], [1, 3, 0]]).T  # (3, 2) transposed view
    _assert_same_results(mods["embedding"], (weight,), {"indices": indices}, _transposed_view)


def test_noncontiguous_mse_loss(mods):
    rng = _rng()
    inp = np.asfortranarray(rng.standard_normal((3, 4)))
    target = rng.standard_normal((4, 3)).T
    _assert_same_results(mods["mse_loss"], (inp,), {"target": target})


def test_float32_in_float32_out(mods):
    rng = _rng()
    f32 = np.float32
    cases = [
        ("linear", _linear_args(f32), {}),
        ("sigmoid", (rng.standard_normal((2, 3)).astype(f32),), {}),
        ("softmax", (rng.standard_normal((2, 3)).astype(f32),), {}),
        (
            "cross_entropy",
            (rng.standard_normal((3, 4)).astype(f32),),
            {"target": np.array([0, 3, 1])},
        ),
        (
            "mse_loss",
            (rng.standard_normal((3, 4)).astype(f32),),
            {"target": rng.standard_normal((3, 4)).astype(f32)},
        ),
        (
            "embedding",
            (rng.standard_normal((5, 4)).astype(f32),),
            {"indices": np.array([[0, 4], [2, 2]])},
        ),
    ]
    for name, args, kwargs in cases:
        module = mods[name]
        out, cache = module.forward(*args, **kwargs)
        assert np.asarray(out).dtype == f32, name
        grads = module.backward(np.ones(np.shape(out), dtype=f32), cache)
        for g, a in zip(grads, args):
            assert g.dtype == f32, (name, g.dtype)
            assert g.shape == a.shape, name
        # close to the float64 result
        out64, _ = module.forward(*(a.astype(np.float64) for a in args), **kwargs)
        np.testing.assert_allclose(out, out64, rtol=1e-4, atol=1e-5)


def test_zero_size_batch_linear(mods):
    module = mods["linear"]
    rng = _rng()
    x = np.zeros((0, 4))
    weight, bias = rng.standard_normal((5, 4)), rng.standard_normal(5)
    y, cache = module.forward(x, weight, bias)
    assert y.shape == (0, 5)
    assert y.dtype == np.float64
    dx, dweight, dbias = module.backward(np.zeros((0, 5)), cache)
    assert dx.shape == (0, 4)
    assert dweight.shape == (5, 4)
    assert dbias.shape == (5,)
    np.testing.assert_array_equal(dweight, np.zeros((5, 4)))
    np.testing.assert_array_equal(dbias, np.zeros(5))
    for g in (dx, dweight, dbias):
        assert g.dtype == np.float64


def test_zero_size_batch_linear_float32(mods):
    module = mods["linear"]
    x, weight, bias = _linear_args(np.float32, n=0)
    y, cache = module.forward(x, weight, bias)
    assert y.shape == (0, 5) and y.dtype == np.float32
    grads = module.backward(np.zeros((0, 5), dtype=np.float32), cache)
    assert [g.shape for g in grads] == [(0, 4), (5, 4), (5,)]
    assert all(g.dtype == np.float32 for g in grads)


def test_masks_requires_a_floating_point_constant():
    from symdl.errors import SpecError
    from symdl.spec import Layer, indices, tensors

    x, m, y = tensors("x m y")
    n = indices("n")
    for masks in ("x", "y"):
        layer = Layer("bad_mask", [(y[n], x[n] + m[n])], inputs="x", consts="m", masks=masks)
        with pytest.raises(SpecError, match=f"masks names '{masks}', which requires a floating-point constant"):
            layer.spec()
    assert Layer("ok_mask", [(y[n], x[n] + m[n])], inputs="x", consts="m", masks="m").spec().masks == ("m",)
