"""Optimizers written as equations: generated modules against torch.optim, and their contract."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT

from symdl import registry
from symdl.cli import main
from symdl.codegen import is_hand_edited
from symdl.errors import SpecError, SymdlError
from symdl.optim import ZEROS, Optimizer, optimizer_latex, optimizer_source
from symdl.testing import load_module

OPTIMIZERS = registry.definitions("optimizer")
NAMES = list(OPTIMIZERS)
CASES = [
    pytest.param(name, case, id=f"{name}-{i}")
    for name, opt in OPTIMIZERS.items()
    for i, case in enumerate(opt.checks["cases"])
]
SHAPE = (3, 4)
STEPS = 20
RTOL = 1e-10


@pytest.fixture(scope="module")
def modules():
    """Each catalogue optimizer's module, generated in memory and loaded from its text."""
    out = {}
    for name, opt in OPTIMIZERS.items():
        text = optimizer_source(opt, "symdl/layers/optimizers.py", f"symdl generate {name}")
        out[name] = (text, load_module(text, f"optim_{name}"))
    return out


def _problem(seed=7):
    """A start point and a gradient that depends on the current parameter (a feedback loop,
    so any error in one step shows in all later ones) plus per-step noise."""
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=SHAPE)
    a = rng.normal(size=(SHAPE[0], SHAPE[0])) / 2
    noise = rng.normal(size=(STEPS, *SHAPE))

    def grad(p, k):
        return a @ p + 0.3 * np.sin(3 * p) + noise[k]

    return p0, grad


def _torch_kwargs(opt: Optimizer, case: dict) -> dict:
    hyper = {n: v for n, v in opt.hyper.items() if v is not None}
    hyper.update(case)
    if "beta1" in hyper:
        hyper["betas"] = (hyper.pop("beta1"), hyper.pop("beta2"))
    return hyper


def _torch_trajectory(torch, opt, case):
    p0, grad = _problem()
    cls = getattr(torch.optim, opt.checks["reference"].rsplit(".", 1)[1])
    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    torch_opt = cls([p], **_torch_kwargs(opt, case))
    out = []
    for k in range(STEPS):
        p.grad = torch.from_numpy(grad(p.detach().numpy().copy(), k))
        torch_opt.step()
        out.append(p.detach().numpy().copy())
    return out, torch_opt.state[p]


@pytest.mark.parametrize("name, case", CASES)
def test_trajectory_matches_torch(modules, name, case):
    torch = pytest.importorskip("torch")
    opt = OPTIMIZERS[name]
    mod = modules[name][1]
    expected, torch_state = _torch_trajectory(torch, opt, case)
    p, grad = _problem()
    state = mod.init_state(p)
    worst = 0.0
    for k in range(STEPS):
        p, *state = mod.step(p, grad(p, k), *state, **case)
        worst = max(worst, float(np.max(np.abs(p - expected[k]) / np.abs(expected[k]))))
        np.testing.assert_allclose(p, expected[k], rtol=RTOL, atol=0, err_msg=f"step {k + 1}")
    for key, value in zip(mod.STATE, state):
        if key == "t":  # SGD keeps no step count; Adam's is a tensor
            assert value == STEPS and int(torch_state.get("step", STEPS)) == STEPS
        else:
            np.testing.assert_allclose(value, torch_state[key].numpy(), rtol=RTOL, atol=0)
    print(f"{name} {case}: max relative difference from torch {worst:.2e}")


@pytest.mark.parametrize("name, case", CASES)
def test_step_inplace_agrees_with_step_exactly(modules, name, case):
    mod = modules[name][1]
    p, grad = _problem(seed=11)
    state = mod.init_state(p)
    q = p.copy()
    qstate = mod.init_state(q)
    buffers = [s for s in qstate if isinstance(s, np.ndarray)]
    for k in range(STEPS):
        g = grad(p, k)
        p, *state = mod.step(p, g, *state, **case)
        qstate = mod.step_inplace(q, g, *qstate, **case)
        assert isinstance(qstate, tuple) and len(qstate) == len(mod.STATE)
        assert np.array_equal(q, p), f"param differs at step {k + 1}"
        for key, a, b in zip(mod.STATE, state, qstate):
            assert np.array_equal(a, b), f"state {key!r} differs at step {k + 1}"
        # the same buffers, updated in place
        arrays = [s for s in qstate if isinstance(s, np.ndarray)]
        assert len(arrays) == len(buffers) and all(x is y for x, y in zip(arrays, buffers))


@pytest.mark.parametrize("name, case", CASES)
def test_float32_stays_float32(modules, name, case):
    mod = modules[name][1]
    p64, grad = _problem()
    p = p64.astype(np.float32)
    state = mod.init_state(p)
    q = p.copy()
    qstate = mod.init_state(q)
    for k in range(3):
        g = grad(p.astype(np.float64), k).astype(np.float32)
        p, *state = mod.step(p, g, *state, **case)
        qstate = mod.step_inplace(q, g, *qstate, **case)
        assert p.dtype == np.float32 and q.dtype == np.float32
        for s in (*state, *qstate):
            assert not isinstance(s, np.ndarray) or s.dtype == np.float32
    np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("name, case", CASES)
def test_step_does_not_modify_its_arguments(modules, name, case):
    mod = modules[name][1]
    p, grad = _problem()
    state = mod.init_state(p)
    for k in range(2):  # a non-trivial state first
        p, *state = mod.step(p, grad(p, k), *state, **case)
    g = grad(p, 2)
    args = [p, g, *state]
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    for a in args:
        if isinstance(a, np.ndarray):
            a.flags.writeable = False  # any write raises
    out = mod.step(*args, **case)
    for a, b in zip(args, before):
        assert np.array_equal(a, b)
    for a in out:  # nothing returned aliases an argument
        if isinstance(a, np.ndarray):
            assert not any(np.shares_memory(a, b) for b in args if isinstance(b, np.ndarray))


@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatch_names_both_shapes(modules, name):
    mod = modules[name][1]
    case = OPTIMIZERS[name].checks["cases"][0]
    p = np.zeros(SHAPE)
    state = mod.init_state(p)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        mod.step(p, np.zeros((4, 3)), *state, **case)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        mod.step_inplace(p, np.zeros((4, 3)), *state, **case)


def test_hyperparameter_checks(modules):
    sgdm = modules["sgd_momentum"][1]
    p = np.zeros(SHAPE)
    with pytest.raises(ValueError, match="nesterov"):
        sgdm.step(p, p, *sgdm.init_state(p), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(TypeError):  # momentum has no default
        sgdm.step(p, p, *sgdm.init_state(p), lr=0.1)
    adam = modules["adam"][1]
    with pytest.raises(ValueError, match="beta1"):
        adam.step(p, p, *adam.init_state(p), beta1=1.0)
    with pytest.raises(ValueError, match="lr"):
        modules["sgd"][1].step(p, p, lr=-1.0)


@pytest.mark.parametrize("name", NAMES)
def test_module_is_numpy_only_formatted_and_stamped(modules, name, tmp_path):
    text = modules[name][0]
    imports = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ImportFrom)
    }
    assert imports <= {"numpy", "math"}
    assert not is_hand_edited(text)
    path = tmp_path / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    ruff = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--isolated", "--line-length", "99",
         str(path)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    # it runs with symdl, sympy and torch unimportable
    script = textwrap.dedent(
        f"""
        import sys, importlib.util
        for blocked in ("symdl", "sympy", "torch", "jinja2"):
            sys.modules[blocked] = None
        spec = importlib.util.spec_from_file_location("m", {str(path)!r})
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        import numpy as np
        p = np.ones((2, 3))
        out = m.step(p, p, *m.init_state(p), **{OPTIMIZERS[name].checks["cases"][0]!r})
        assert out[0].shape == (2, 3)
        """
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("name", NAMES)
def test_formulas_are_the_latex_of_the_equations(modules, name):
    mod = modules[name][1]
    opt = OPTIMIZERS[name]
    assert mod.FORMULAS == optimizer_latex(opt)
    assert list(mod.FORMULAS) == [lhs.name for lhs, _ in opt.updates]
    assert mod.FORMULAS["param"].startswith(r"\theta_{t} = ")
    assert mod.NAME == name and mod.STATE == tuple(opt.state)
    assert list(mod.HYPERPARAMETERS) == list(opt.hyper)


def test_latex_marks_time_steps():
    tex = optimizer_latex(OPTIMIZERS["adam"])
    assert (
        tex["exp_avg"] == r"m_{t} = \beta_{1} m_{t-1} + \tilde{g}_{t} \left(1 - \beta_{1}\right)"
    )
    assert tex["t"] == r"t \leftarrow t + 1"
    assert r"\sqrt{v_{t}}" in tex["param"] and r"\epsilon" in tex["param"]


def test_generate_and_check(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["generate", "--no-cache", "-o", out, "sgd", "adam"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["adam.py", "sgd.py"]
    assert main(["generate", "--check", "-o", out, "sgd", "adam"]) == 0
    (tmp_path / "adam.py").write_text("# stale\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", "--check", "-o", out, "sgd", "adam", "rmsprop"]) == 1
    said = capsys.readouterr().out
    assert "2 of 3 modules" in said and "adam (" in said and "rmsprop (missing)" in said
    assert (tmp_path / "adam.py").read_text(encoding="utf-8") == "# stale\n"
    assert main(["generate", "-o", out, "adagrad"]) == 2
    assert "known: " in capsys.readouterr().err


def test_catalogue_optimizers_name_their_file():
    entry = registry.get("adam")
    text = registry.source(entry)
    assert text == optimizer_source(entry.definition, entry.source, "symdl generate adam")
    assert "from symdl/layers/optimizers.py" in text and "symdl generate adam" in text
    assert "from the optimizer 'adam'" in optimizer_source(entry.definition)
    with pytest.raises(SymdlError, match="requires a catalogue name"):
        registry.get("adagrad")


def test_the_declarations_use_the_engine_vocabulary():
    from symdl.layers import optimizers

    assert optimizers.ZEROS == ZEROS


def test_output_is_deterministic_across_hash_seeds(tmp_path):
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        argv = ["-m", "symdl", "generate", "--no-cache", "-o", str(out), *NAMES]
        subprocess.run([sys.executable, *argv], check=True, env=env, cwd=ROOT)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.py"))})
    assert outputs[0] == outputs[1] and len(outputs[0]) == len(NAMES)


def test_invalid_optimizers_are_rejected():
    import sympy as sp

    param, grad, lr = sp.symbols("param grad lr")
    with pytest.raises(SpecError, match="got 'oops'"):
        Optimizer("bad", [(param, param - lr * sp.Symbol("oops"))], hyper={"lr": 0.1})
    with pytest.raises(SpecError, match="got none for m"):
        Optimizer("bad", [(param, param - lr * grad)], hyper={"lr": 0.1}, state={"m": "zeros"})
    with pytest.raises(SpecError, match="'grad'"):
        Optimizer("bad", [(grad, 2 * grad), (param, param - grad)], hyper={})


@pytest.mark.parametrize("name", ["sgd_momentum", "rmsprop", "adam"])
def test_zero_weight_decay_is_skipped_like_torch(modules, name):
    # torch adds weight_decay * param only when weight_decay != 0: an inf in param must not
    # turn the gradient (and so the state) into nan through 0 * inf
    mod = modules[name][1]
    case = {k: v for k, v in OPTIMIZERS[name].checks["cases"][0].items() if k != "weight_decay"}
    p = np.array([[np.inf, 1.0]])
    out = mod.step(p, np.ones_like(p), *mod.init_state(p), weight_decay=0.0, **case)
    assert all(np.isfinite(s).all() for s in out[1:] if isinstance(s, np.ndarray))
