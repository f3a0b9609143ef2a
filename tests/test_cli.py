"""Tests of the ``symdl`` command line (symdl/cli.py): list, show, generate, check, derive.

Most tests call ``symdl.cli.main([...])`` in-process (it returns the exit code); a few run
``python -m symdl`` as a subprocess to cover the real entry point.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from symdl import registry
from symdl.cli import build_parser, main
from symdl.codegen import is_hand_edited
from symdl.testing import gradcheck

LAYER_NAMES = list(registry.definitions("layer"))
SEQUENCES = registry.definitions("sequence")
OPTIMIZERS = registry.definitions("optimizer")
CATALOGUE = list(registry.entries())
SUBCOMMANDS = ("list", "show", "generate", "check", "derive", "report")

DENSE = "y[n,o] = tanh(Sum(w[o,i]*x[n,i], i) + b[o]) + u[n,o]"


def run(capsys, *argv):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*argv, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "symdl", *[str(a) for a in argv]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def import_path(path: Path, name: str | None = None):
    """Import a generated module from its file path."""
    name = name or f"_symdl_test_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- list ----------------------------------------------------------------------------------


def test_catalogue_is_not_trivial():
    assert len(CATALOGUE) >= 5
    assert "linear" in CATALOGUE and "softmax" in CATALOGUE and "relu" in CATALOGUE


def test_list_prints_every_catalogue_name(capsys):
    code, out, err = run(capsys, "list")
    assert code == 0
    assert err == ""
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert sorted(names) == sorted(CATALOGUE)


def test_list_as_subprocess():
    proc = run_subprocess("list")
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert names == set(CATALOGUE)


# ---- show ----------------------------------------------------------------------------------


def test_show_linear_prints_forward_and_gradients(capsys):
    code, out, err = run(capsys, "show", "linear")
    assert code == 0
    assert err == ""
    # the forward equation
    assert re.search(
        r"^\s*y\[n, o\] = .*weight\[o, i\]\*x\[n, i\].*bias\[o\]", out, re.MULTILINE
    ), out
    # the derived gradients, one per argument
    for grad in ("dx", "dweight", "dbias"):
        assert re.search(rf"^\s*{grad}\[[^\]]*\] = ", out, re.MULTILINE), (grad, out)


def test_show_latex(capsys):
    code, out, err = run(capsys, "show", "linear", "--latex")
    assert code == 0
    assert err == ""
    assert r"\frac{\partial" in out
    assert r"\sum" in out
    assert r"\bar{" not in out


def test_show_latex_bar_notation(capsys):
    code, out, _ = run(capsys, "show", "linear", "--latex", "--notation", "bar")
    assert code == 0
    assert r"\bar{" in out
    assert r"\frac{\partial" not in out


@pytest.mark.parametrize("name", ["linear", "cross_entropy", "sigmoid"])
def test_show_stage_code_compiles(capsys, name):
    code, out, err = run(capsys, "show", name, "--stage", "code")
    assert code == 0
    assert err == ""
    compiled = compile(out, f"<{name}>", "exec")
    namespace: dict = {}
    exec(compiled, namespace)  # noqa: S102 - symdl's own generated output
    assert namespace["NAME"] == name
    assert callable(namespace["forward"]) and callable(namespace["backward"])
    for const in ("ARGS", "PARAMS", "CONSTS", "OUTPUTS", "SHAPES", "FORMULAS", "INDEX_RANGES"):
        assert const in namespace, const


def test_show_stage_lower(capsys):
    code, out, err = run(capsys, "show", "linear", "--stage", "lower")
    assert code == 0
    assert err == ""
    assert "# forward" in out and "# backward" in out
    forward, backward = out.split("# backward")
    assert "x" in forward and "weight" in forward
    for grad in ("dx", "dweight", "dbias"):
        assert re.search(rf"^{grad} = ", backward, re.MULTILINE), (grad, out)


def test_show_stage_spec(capsys):
    code, out, err = run(capsys, "show", "linear", "--stage", "spec")
    assert code == 0
    assert err == ""
    assert "linear" in out
    assert "y[n, o]" in out
    assert "dweight" not in out  # the spec stage precedes differentiation


def test_show_unknown_layer(capsys):
    code, out, err = run(capsys, "show", "no_such_layer")
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "no_such_layer" in lines[0]
    for name in CATALOGUE:
        assert name in lines[0], name


def test_show_unknown_layer_as_subprocess():
    proc = run_subprocess("show", "linearr")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "linearr" in lines[0]
    assert "linear" in lines[0].replace("linearr", "") and "softmax" in lines[0]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["lstm", "--steps"],
            ["--steps requires a layer", "sequence 'lstm'", "symdl show lstm_cell --steps"],
        ),
        (
            ["gru", "--expand", "T=2"],
            ["--expand requires a layer", "symdl show gru_cell --expand SIZES"],
        ),
        (["rnn", "--stage", "spec"], ["--stage spec requires a layer", "sequence 'rnn'"]),
        (["lstm", "--stage", "lower"], ["--stage lower requires a layer"]),
        (["adam", "--steps"], ["--steps requires a layer", "optimizer 'adam'"]),
        (["sgd", "--expand", "N=1"], ["--expand requires a layer", "optimizer 'sgd'"]),
        (["adamw", "--stage", "spec"], ["--stage spec requires a layer", "optimizer 'adamw'"]),
        (["linear", "--steps", "--expand", "N=1,in=1,out=1"], ["one at a time"]),
        (["linear", "--steps", "--stage", "code"], ["--steps requires no --stage"]),
        (
            ["linear", "--expand", "N=1,in=1,out=1", "--stage", "spec"],
            ["--expand requires no --stage"],
        ),
    ],
    ids=[
        "sequence-steps",
        "sequence-expand",
        "sequence-stage-spec",
        "sequence-stage-lower",
        "optimizer-steps",
        "optimizer-expand",
        "optimizer-stage-spec",
        "layer-steps-and-expand",
        "layer-steps-and-stage",
        "layer-expand-and-stage",
    ],
)
def test_show_options_that_do_not_apply_are_errors(capsys, argv, fragments):
    code, out, err = run(capsys, "show", *argv)
    assert_one_line_error(code, out, err, fragments)


@pytest.mark.parametrize("name", ["adam", "lstm"])
def test_show_stage_code_of_optimizers_and_sequences(capsys, name):
    for stage in ("code", "derive"):
        code, out, err = run(capsys, "show", name, "--stage", stage)
        assert code == 0 and err == "", err
        if stage == "code":
            namespace: dict = {}
            exec(compile(out, f"<{name}>", "exec"), namespace)  # noqa: S102 - symdl's own output
            assert namespace["NAME"] == name
        else:
            assert out.startswith(name) and "import numpy" not in out


# ---- report --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, written, fmt",
    [
        ([], "report.html", "html"),
        (["--format", "tex"], "report.tex", "tex"),
        (["-o", "out.tex"], "out.tex", "tex"),
        (["-o", "out.html"], "out.html", "html"),
        (["-o", "out.tex", "--format", "html"], "out.tex", "html"),
    ],
    ids=["default", "format-tex", "tex-suffix", "html-suffix", "format-wins"],
)
def test_report_output_name_follows_the_format(capsys, tmp_path, monkeypatch, argv, written, fmt):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "report", "relu", *argv)
    assert code == 0, err
    assert os.listdir(tmp_path) == [written]
    assert f"wrote {written}" in out and f"{fmt})" in out
    text = (tmp_path / written).read_text(encoding="utf-8")
    assert text.startswith(r"\documentclass" if fmt == "tex" else "<!DOCTYPE html>")


def _xml(page):
    import xml.etree.ElementTree as ET

    assert page.startswith("<!DOCTYPE html>")
    return ET.fromstring(page[page.index("<html") :])


def test_report_shows_sequences_and_optimizers(capsys, tmp_path):
    names = ["lstm", "adam", "sgd_momentum", "linear"]
    code, out, err = run(capsys, "report", *names, "-o", tmp_path / "r.html")
    assert code == 0, err
    assert "4 entries, html" in out
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    root = _xml(page)
    sections = {el.get("id"): el for el in root.iter() if el.tag.endswith("}section")}
    assert list(sections) == [f"layer-{n}" for n in names]

    def text_of(section):
        return "".join(section.itertext())

    lstm = text_of(sections["layer-lstm"])
    assert "The scan of lstm_cell over time" in lstm and "for t in 0, ..., T - 1:" in lstm
    assert "Derived gradients" in lstm and "at each step, for t = T - 1, ..., 0" in lstm
    assert "def forward(" in lstm  # the generated module
    adam = sections["layer-adam"]
    assert "Update rule, in this order at every step" in text_of(adam)
    assert "Derived gradients" not in text_of(adam)
    maths = ["".join(m.itertext()) for m in adam.iter() if m.tag.endswith("}math")]
    assert maths[0] == "t←t+1" and len(maths) == len(OPTIMIZERS["adam"].updates)
    assert any(m.startswith("mt=β1") for m in maths), maths  # m_t = beta_1 m_{t-1} + ...

    code, out, err = run(capsys, "report", *names, "--format", "tex", "-o", tmp_path / "r.tex")
    assert code == 0, err
    tex = (tmp_path / "r.tex").read_text(encoding="utf-8")
    for name in names:
        assert f"\\section{{{name.replace('_', chr(92) + '_')}}}" in tex, name
    assert r"m_{t} = \beta_{1} m_{t-1}" in tex and r"t \leftarrow t + 1" in tex
    assert tex.count(r"\begin{equation*}") == tex.count(r"\end{equation*}")
    assert tex.count(r"\begin{lstlisting}") == tex.count(r"\end{lstlisting}")


# ---- generate ------------------------------------------------------------------------------


def test_generate_writes_exactly_the_named_files_and_is_idempotent(capsys, tmp_path):
    out_dir = tmp_path / "gen"
    code, out, err = run(capsys, "generate", "-o", out_dir, "linear", "softmax")
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["linear.py", "softmax.py"]
    assert "2 written" in out
    for name in ("linear", "softmax"):
        text = (out_dir / f"{name}.py").read_text(encoding="utf-8")
        assert not is_hand_edited(text)
        module = import_path(out_dir / f"{name}.py")
        assert module.NAME == name

    # pretend the files are old, so a rewrite would be visible in the mtime
    old = 1_000_000_000
    before = {}
    for name in ("linear", "softmax"):
        path = out_dir / f"{name}.py"
        os.utime(path, ns=(old * 10**9, old * 10**9))
        st = path.stat()
        before[name] = (st.st_mtime_ns, st.st_ino, path.read_bytes())

    code, out, err = run(capsys, "generate", "-o", out_dir, "linear", "softmax")
    assert code == 0, err
    assert "0 written" in out and "2 unchanged" in out
    assert sorted(os.listdir(out_dir)) == ["linear.py", "softmax.py"]
    for name in ("linear", "softmax"):
        path = out_dir / f"{name}.py"
        st = path.stat()
        assert (st.st_mtime_ns, st.st_ino, path.read_bytes()) == before[name], name


def test_generate_check_detects_hand_edits(capsys, tmp_path):
    out_dir = tmp_path / "gen"
    assert run(capsys, "generate", "-o", out_dir, "linear", "softmax")[0] == 0
    linear = out_dir / "linear.py"
    original = linear.read_text(encoding="utf-8")

    code, out, err = run(capsys, "generate", "--check", "-o", out_dir, "linear", "softmax")
    assert code == 0, out + err

    with open(linear, "a", encoding="utf-8") as fh:
        fh.write("# a hand edit\n")
    edited = linear.read_text(encoding="utf-8")

    code, out, err = run(capsys, "generate", "--check", "-o", out_dir, "linear", "softmax")
    assert code == 1
    assert "linear" in out
    assert "edited by hand" in out
    assert "softmax (" not in out  # softmax is up to date and not reported
    assert linear.read_text(encoding="utf-8") == edited  # --check never writes

    # a plain generate keeps the hand-edited file and fails
    code, out, err = run(capsys, "generate", "-o", out_dir, "linear", "softmax")
    assert code == 1
    assert "linear" in out + err
    assert linear.read_text(encoding="utf-8") == edited

    # --force overwrites it with the engine's output
    code, out, err = run(capsys, "generate", "--force", "-o", out_dir, "linear", "softmax")
    assert code == 0, out + err
    assert linear.read_text(encoding="utf-8") == original
    assert run(capsys, "generate", "--check", "-o", out_dir, "linear", "softmax")[0] == 0


def test_generate_check_reports_missing_file(capsys, tmp_path):
    out_dir = tmp_path / "gen"
    assert run(capsys, "generate", "-o", out_dir, "linear", "softmax")[0] == 0
    (out_dir / "softmax.py").unlink()
    code, out, _err = run(capsys, "generate", "--check", "-o", out_dir, "linear", "softmax")
    assert code == 1
    assert "softmax" in out and "missing" in out
    assert "linear (" not in out
    assert not (out_dir / "softmax.py").exists()  # --check never writes


def test_generate_check_on_empty_directory(capsys, tmp_path):
    code, out, _err = run(capsys, "generate", "--check", "-o", tmp_path, "relu")
    assert code == 1
    assert "relu" in out and "missing" in out
    assert os.listdir(tmp_path) == []


def test_generate_whole_catalogue(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "-o", tmp_path)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.py" for name in CATALOGUE)
    assert f"{len(CATALOGUE)} written" in out


def test_generate_unknown_layer_writes_nothing(capsys, tmp_path):
    code, _out, err = run(capsys, "generate", "-o", tmp_path, "linear", "bogus_layer")
    assert code == 2
    assert len(err.splitlines()) == 1 and "bogus_layer" in err
    assert os.listdir(tmp_path) == []


# ---- check ---------------------------------------------------------------------------------


def test_check_two_layers(capsys):
    code, out, err = run(capsys, "check", "linear", "relu")
    assert code == 0, out + err
    lines = out.splitlines()
    for name in ("linear", "relu"):
        mine = [line for line in lines if line.startswith(f"{name}:")]
        assert len(mine) == 1, out
        assert "ok" in mine[0] and "FAILED" not in mine[0]
    assert "2 passed, 0 failed" in lines[-1]


@pytest.mark.parametrize("name", list(SEQUENCES) + list(OPTIMIZERS))
def test_check_sequences_and_optimizers(capsys, name):
    code, out, err = run(capsys, "check", name)
    assert code == 0, out + err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{name}: ok ("), out
    assert "1 passed, 0 failed" in lines[1]
    if name in OPTIMIZERS:
        assert "param" in lines[0] and all(s in lines[0] for s in OPTIMIZERS[name].state)
    else:
        assert all(a in lines[0] for a in SEQUENCES[name].args)


def test_check_optimizer_finds_a_wrong_step():
    from symdl.testing import check_optimizer, load_module

    opt = OPTIMIZERS["adam"]
    text = registry.source(registry.get("adam"))
    assert text.count("beta2 * exp_avg_sq") == 1
    wrong = load_module(text.replace("beta2 * exp_avg_sq", "beta1 * exp_avg_sq"), "adam")
    result = check_optimizer(wrong, opt)
    assert not result.ok
    assert result.errors["exp_avg_sq"] > 1e-3 and result.errors["param"] > 1e-6
    assert check_optimizer(load_module(text, "adam"), opt).ok


def test_check_defaults_to_everything_listed(capsys):
    code, out, err = run(capsys, "check")
    assert code == 0, out + err
    names = [line.split(":")[0] for line in out.splitlines()[:-1]]
    assert sorted(names) == sorted(CATALOGUE)
    assert f"{len(CATALOGUE)} passed, 0 failed" in out.splitlines()[-1]


# ---- derive --------------------------------------------------------------------------------


def test_derive_writes_an_importable_correct_module(capsys, tmp_path):
    code, out, err = run(
        capsys, "derive", "dense", DENSE, "--inputs", "u,x", "--params", "w,b", "-o", tmp_path
    )
    assert code == 0, err
    path = tmp_path / "dense.py"
    assert os.listdir(tmp_path) == ["dense.py"]
    assert str(path) in out
    module = import_path(path)
    assert module.NAME == "dense"
    assert module.ARGS == ("u", "x", "w", "b")
    assert module.PARAMS == ("w", "b")
    assert module.CONSTS == ()
    assert module.OUTPUTS == ("y",)
    assert not is_hand_edited(path.read_text(encoding="utf-8"))
    result = gradcheck(module)
    assert result.ok, str(result)
    assert set(result.errors) == {"u", "x", "w", "b"}


def test_derive_module_computes_the_equation(capsys, tmp_path):
    code, _, err = run(
        capsys, "derive", "dense", DENSE, "--inputs", "u,x", "--params", "w,b", "-o", tmp_path
    )
    assert code == 0, err
    module = import_path(tmp_path / "dense.py")
    rng = np.random.default_rng(1)
    u, x = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
    w, b = rng.standard_normal((5, 4)), rng.standard_normal(5)
    y, cache = module.forward(u, x, w, b)
    np.testing.assert_allclose(y, np.tanh(x @ w.T + b) + u, rtol=1e-12, atol=1e-12)
    du, dx, dw, db = module.backward(np.ones_like(y), cache)
    g = 1 - np.tanh(x @ w.T + b) ** 2
    np.testing.assert_allclose(du, np.ones_like(u))
    np.testing.assert_allclose(dx, g @ w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, g.T @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, g.sum(axis=0), rtol=1e-12, atol=1e-12)


def test_derive_check_and_show(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "derive",
        "dense",
        DENSE,
        "--inputs",
        "u,x",
        "--params",
        "w,b",
        "-o",
        tmp_path,
        "--check",
        "--show",
    )
    assert code == 0, err
    # --show: the derived gradients
    for grad in ("du", "dx", "dw", "db"):
        assert re.search(rf"^\s*{grad}\[[^\]]*\] = ", out, re.MULTILINE), (grad, out)
    # --check: a gradcheck line reporting ok
    assert re.search(r"^dense: ok\b", out, re.MULTILINE), out
    assert (tmp_path / "dense.py").exists()


def test_derive_hyperparameter_default(capsys, tmp_path):
    code, _out, err = run(
        capsys,
        "derive",
        "scaled",
        "y[n,o] = x[n,o] / (eps + Sum(x[n,i]*x[n,i], i))",
        "--inputs",
        "x",
        "--hyper",
        "eps=1e-3",
        "-o",
        tmp_path,
    )
    assert code == 0, err
    module = import_path(tmp_path / "scaled.py")
    assert module.ARGS == ("x",)
    assert module.HYPERPARAMETERS == {"eps": 1e-3}
    param = inspect.signature(module.forward).parameters["eps"]
    assert param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
    assert param.default == 1e-3
    x = np.random.default_rng(2).standard_normal((3, 4))
    y_default, _ = module.forward(x)
    y_explicit, _ = module.forward(x, eps=1e-3)
    y_other, _ = module.forward(x, eps=10.0)
    np.testing.assert_array_equal(y_default, y_explicit)
    np.testing.assert_allclose(y_default, x / (1e-3 + (x * x).sum(axis=1, keepdims=True)))
    assert not np.allclose(y_default, y_other)
    assert gradcheck(module).ok


STRIDED = "y[n,i] = x[n, s*i]"


@pytest.mark.parametrize("hyper", ["s=2.0", "s=2", "s"])
def test_derive_hyperparameter_in_an_index_is_an_integer(capsys, tmp_path, hyper):
    code, _out, err = run(
        capsys, "derive", "strided", STRIDED, "--inputs", "x", "--hyper", hyper, "-o", tmp_path
    )
    assert code == 0, err
    module = import_path(tmp_path / "strided.py")
    default = module.HYPERPARAMETERS["s"]
    assert default is None if hyper == "s" else (default == 2 and type(default) is int)
    x = np.arange(14.0).reshape(2, 7)
    for value in (2, 2.0, np.int64(2)):
        y, _ = module.forward(x, s=value)
        np.testing.assert_array_equal(y, x[:, ::2])
    if default is not None:
        np.testing.assert_array_equal(module.forward(x)[0], x[:, ::2])
    with pytest.raises(
        ValueError, match=r"strided: hyperparameter 's' requires an integer, got 2.5"
    ):
        module.forward(x, s=2.5)
    assert gradcheck(module, checks={"hyper": {"s": 3}}).ok


@pytest.mark.parametrize("default, shown", [("2.5", "2.5"), ("1e-3", "0.001")])
def test_derive_refuses_a_fractional_default_for_an_index(capsys, tmp_path, default, shown):
    code, out, err = run(
        capsys,
        "derive",
        "strided",
        STRIDED,
        "--inputs",
        "x",
        "--hyper",
        f"s={default}",
        "-o",
        tmp_path,
    )
    assert_one_line_error(code, out, err, ["'s'", "integer default", f"got {shown}"])
    assert os.listdir(tmp_path) == []


SCALED = "y[n,j] = x[n,j]*Dh"


def test_derive_check_asks_for_a_hyperparameter_without_default(capsys, tmp_path):
    argv = ["derive", "mh", SCALED, "--inputs", "x", "--hyper", "Dh", "--check", "-o", tmp_path]
    code, out, err = run(capsys, *argv)
    assert_one_line_error(
        code, out, err, ["'Dh'", "no default", "--check-hyper Dh=", "--hyper Dh="]
    )
    assert os.listdir(tmp_path) == []

    code, out, err = run(capsys, *argv, "--check-hyper", "Dh=4")
    assert code == 0, err
    assert re.search(r"^mh: ok\b", out, re.MULTILINE), out
    module = import_path(tmp_path / "mh.py")
    assert module.HYPERPARAMETERS == {"Dh": None}
    x = np.ones((2, 3))
    np.testing.assert_array_equal(module.forward(x, Dh=4.0)[0], 4 * x)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--check-hyper", "Dh"], ["NAME=NUMBER", "'Dh'"]),
        (["--check-hyper", "Dh=x"], ["NAME=NUMBER", "'Dh=x'"]),
        (["--check-hyper", "Dh=inf"], ["NAME=NUMBER"]),
        (["--check-hyper", "Dh=1,Q=2"], ["hyperparameters of the layer (Dh)", "'Q'"]),
    ],
    ids=["no-value", "not-a-number", "infinite", "unknown-name"],
)
def test_derive_check_hyper_bad_values(capsys, tmp_path, extra, fragments):
    argv = ["derive", "mh", SCALED, "--inputs", "x", "--hyper", "Dh", "--check", "-o", tmp_path]
    code, out, err = run(capsys, *argv, *extra)
    assert_one_line_error(code, out, err, fragments)
    assert os.listdir(tmp_path) == []


def test_derive_check_hyper_requires_check(capsys, tmp_path):
    argv = [
        "derive",
        "mh",
        SCALED,
        "--inputs",
        "x",
        "--hyper",
        "Dh",
        "--check-hyper",
        "Dh=2",
        "-o",
        tmp_path,
    ]
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, ["--check-hyper requires --check"])
    assert os.listdir(tmp_path) == []


def test_derive_check_hyper_overrides_a_default(capsys, tmp_path):
    # at the default the check passes; at Dh=-1 the log's argument is negative: not finite
    argv = [
        "derive",
        "lg",
        "y[n] = log(x[n]*x[n] + Dh)",
        "--inputs",
        "x",
        "--hyper",
        "Dh=1",
        "--check",
        "-o",
        tmp_path,
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    (tmp_path / "lg.py").unlink()
    code, out, err = run(capsys, *argv, "--check-hyper", "Dh=-1")
    assert code == 1
    assert "lg: FAILED" in out and "not finite" in out
    assert err == ""  # no NumPy warnings: the result line says what went wrong
    assert os.listdir(tmp_path) == []


def test_gradcheck_names_a_hyperparameter_without_value(capsys, tmp_path):
    assert (
        run(capsys, "derive", "mh", SCALED, "--inputs", "x", "--hyper", "Dh", "-o", tmp_path)[0]
        == 0
    )
    module = import_path(tmp_path / "mh.py")
    result = gradcheck(module)
    assert not result.ok
    assert "hyperparameter 'Dh' requires a value" in str(result) and "checks=" in str(result)
    assert gradcheck(module, checks={"hyper": {"Dh": 3.0}}).ok


def test_derive_consts_are_keyword_only(capsys, tmp_path):
    code, _out, err = run(
        capsys,
        "derive",
        "sq",
        "L = Sum((x[n] - target[n])**2, n)",
        "--inputs",
        "x",
        "--consts",
        "target",
        "-o",
        tmp_path,
    )
    assert code == 0, err
    module = import_path(tmp_path / "sq.py")
    assert module.ARGS == ("x",)
    assert module.CONSTS == ("target",)
    params = inspect.signature(module.forward).parameters
    assert params["target"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["target"].default is inspect.Parameter.empty
    x, t = np.array([1.0, 2.0, 3.0]), np.array([0.5, 2.0, 1.0])
    loss, cache = module.forward(x, target=t)
    assert float(loss) == pytest.approx(0.25 + 0.0 + 4.0)
    (dx,) = module.backward(np.array(1.0), cache)
    np.testing.assert_allclose(dx, 2 * (x - t))
    with pytest.raises(TypeError):
        module.forward(x, t)  # positional const is rejected
    assert gradcheck(module).ok


def test_derive_as_subprocess(tmp_path):
    proc = run_subprocess(
        "derive", "dense", DENSE, "--inputs", "u,x", "--params", "w,b", "-o", tmp_path, "--check"
    )
    assert proc.returncode == 0, proc.stderr
    module = import_path(tmp_path / "dense.py")
    assert module.ARGS == ("u", "x", "w", "b")
    assert gradcheck(module).ok


# ---- derive never destroys work ----------------------------------------------------------------

TANH = "y[n] = tanh(x[n])"


def test_derive_keeps_a_module_edited_by_hand(capsys, tmp_path):
    argv = ["derive", "act", TANH, "--inputs", "x", "-o", tmp_path]
    assert run(capsys, *argv)[0] == 0
    path = tmp_path / "act.py"
    original = path.read_text(encoding="utf-8")
    edited = original.replace("np.tanh(", "np.arctan(")
    assert edited != original
    path.write_text(edited, encoding="utf-8")
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, [str(path), "edited by hand", "--force"])
    assert path.read_text(encoding="utf-8") == edited
    code, out, err = run(capsys, *argv, "--force")
    assert code == 0, err
    assert path.read_text(encoding="utf-8") == original  # --force is not in the header


@pytest.mark.parametrize(
    "content",
    ["import numpy as np\n\nprint('my own module')\n", "", "\udcff"],
    ids=["python", "empty", "binary"],
)
def test_derive_keeps_a_file_symdl_did_not_write(capsys, tmp_path, content):
    path = tmp_path / "act.py"
    data = content.encode("utf-8", "surrogateescape")
    path.write_bytes(data)
    code, out, err = run(capsys, "derive", "act", TANH, "--inputs", "x", "-o", tmp_path)
    assert_one_line_error(code, out, err, [str(path), "not a module symdl generated", "--force"])
    assert path.read_bytes() == data
    assert os.listdir(tmp_path) == ["act.py"]
    code, out, err = run(capsys, "derive", "act", TANH, "--inputs", "x", "-o", tmp_path, "--force")
    assert code == 0, err
    assert not is_hand_edited(path.read_text(encoding="utf-8"))


def test_derive_replaces_an_unedited_module_and_keeps_an_unchanged_one(capsys, tmp_path):
    path = tmp_path / "act.py"
    assert run(capsys, "derive", "act", TANH, "--inputs", "x", "-o", tmp_path)[0] == 0
    old = 1_000_000_000
    os.utime(path, ns=(old * 10**9, old * 10**9))
    before = (path.stat().st_mtime_ns, path.stat().st_ino, path.read_bytes())
    code, out, err = run(capsys, "derive", "act", TANH, "--inputs", "x", "-o", tmp_path)
    assert code == 0, err
    assert "up to date" in out
    assert (path.stat().st_mtime_ns, path.stat().st_ino, path.read_bytes()) == before
    code, out, err = run(
        capsys, "derive", "act", "y[n] = sigmoid(x[n])", "--inputs", "x", "-o", tmp_path
    )
    assert code == 0, err
    assert "wrote" in out
    assert "sigmoid" in path.read_text(encoding="utf-8")


SHADOWING = [
    "numpy",
    "np",
    "sys",
    "math",
    "os",
    "json",
    "string",
    "symdl",
    "sympy",
    "torch",
    "scipy",
    "jinja2",
    "NumPy",
]


@pytest.mark.parametrize("name", SHADOWING)
def test_derive_refuses_a_name_that_shadows_a_module(capsys, tmp_path, name):
    code, out, err = run(capsys, "derive", name, TANH, "--inputs", "x", "-o", tmp_path)
    assert_one_line_error(code, out, err, [repr(name), "shadows no module", f"{name}_layer"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["numpy", "math"])
def test_names_that_shadow_a_module_from_python(name):
    from symdl import derive
    from symdl.errors import SpecError
    from symdl.optim import Optimizer
    from symdl.parse import parse_layer
    from symdl.scan import scan_layer

    with pytest.raises(
        SpecError, match=f"layer '{name}': a layer name requires a name that shadows no module"
    ):
        derive(parse_layer(name, TANH, inputs="x"))
    cell = parse_layer("cell", "h1[n] = tanh(x[n] + h[n])", inputs="x,h")
    with pytest.raises(SpecError, match="a sequence name requires a name that shadows no module"):
        scan_layer(cell, name, per_step="x", state={"h": "h1"})
    import sympy as sp

    param, grad = sp.symbols("param grad")
    with pytest.raises(
        SpecError, match="an optimizer name requires a name that shadows no module"
    ):
        Optimizer(name, [(param, param - grad)], hyper={})


# ---- every command for every catalogue entry -------------------------------------------------


def _catalogue_listed():
    """The names ``symdl list`` prints, read from its output."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list"]) == 0
    return [line.split()[0] for line in out.getvalue().splitlines() if line.strip()]


LISTED = _catalogue_listed()


@pytest.mark.parametrize("name", LISTED)
def test_every_command_for_every_listed_entry(capsys, tmp_path, name):
    """list, show (with each option), generate, check and report work for every entry
    ``symdl list`` prints, or say in one line (exit 2) why an option does not apply."""
    must_work = [
        ["show", name],
        ["show", name, "--latex"],
        ["show", name, "--stage", "code"],
        ["generate", name, "-o", tmp_path / "gen"],
        ["check", name],
        ["report", name, "-o", tmp_path / "r.html"],
        ["report", name, "--format", "tex", "-o", tmp_path / "r.tex"],
    ]
    may_refuse = [
        ["show", name, "--steps"],
        ["show", name, "--stage", "spec"],
        ["show", name, "--stage", "lower"],
    ]
    for argv in must_work:
        code, out, err = run_usage(capsys, argv)
        assert code == 0, (argv, out, err)
        assert err == "", (argv, err)
    assert os.listdir(tmp_path / "gen") == [f"{name}.py"]
    assert (tmp_path / "r.html").is_file() and (tmp_path / "r.tex").is_file()
    for argv in may_refuse:
        code, out, err = run_usage(capsys, argv)
        if code != 0:
            assert_one_line_error(code, out, err, [name])
        else:
            assert out and err == "", (argv, err)
    is_layer = name in LAYER_NAMES
    assert run_usage(capsys, ["show", name, "--steps"])[0] == (0 if is_layer else 2)


# ---- bad usage and bad input: one line, exit 2, nothing written ------------------------------

# (id, argv with {out} an empty output directory and {file} an existing plain file, fragments
#  the one-line message must contain)
BAD_USAGE = [
    ("missing-arguments", ["derive"], ["required: name, equations", "symdl derive --help"]),
    ("missing-equations", ["derive", "d"], ["required: equations"]),
    ("bad-choice", ["show", "linear", "--stage", "nope"], ["'nope'"]),
    ("negative-tol", ["check", "linear", "--tol", "-1"], ["--tol", "positive"]),
    ("text-tol", ["check", "linear", "--tol", "abc"], ["--tol", "'abc'"]),
    ("unknown-command", ["frobnicate"], ["'frobnicate'"]),
    ("unknown-show", ["show", "nope"], ["'nope'", "linear"]),
    ("unknown-generate", ["generate", "-o", "{out}", "nope"], ["'nope'"]),
    ("unknown-check", ["check", "nope"], ["'nope'"]),
    ("unknown-report", ["report", "-o", "{out}/r.html", "nope"], ["'nope'"]),
    (
        "hyper-twice",
        ["derive", "d", "y[n] = x[n]*a", "--inputs", "x", "--hyper", "a=1,a=2", "-o", "{out}"],
        ["'a'", "twice"],
    ),
    (
        "hyper-not-a-number",
        ["derive", "d", "y[n] = x[n]*a", "--inputs", "x", "--hyper", "a=b", "-o", "{out}"],
        ["'a'", "'b'"],
    ),
    (
        "hyper-no-name",
        ["derive", "d", "y[n] = x[n]*a", "--inputs", "x", "--hyper", "=3", "-o", "{out}"],
        ["identifier"],
    ),
    (
        "state-without-scan",
        ["derive", "d", "y[n] = x[n]", "--inputs", "x", "--state", "h=y", "-o", "{out}"],
        ["--state requires --scan"],
    ),
    (
        "stack-without-scan",
        ["derive", "d", "y[n] = x[n]", "--inputs", "x", "--stack", "y=y", "-o", "{out}"],
        ["--stack requires --scan"],
    ),
    (
        "derive-into-a-file",
        ["derive", "d", "y[n] = x[n]", "--inputs", "x", "-o", "{file}"],
        ["requires a directory", "file"],
    ),
    (
        "derive-under-a-file",
        ["derive", "d", "y[n] = x[n]", "--inputs", "x", "-o", "{file}/sub"],
        ["cannot write", "not a directory"],
    ),
    ("generate-into-a-file", ["generate", "relu", "-o", "{file}"], ["requires a directory"]),
    ("generate-under-a-file", ["generate", "relu", "-o", "{file}/sub"], ["cannot write"]),
    ("report-under-a-file", ["report", "relu", "-o", "{file}/sub/r.html"], ["cannot write"]),
    ("report-into-a-directory", ["report", "relu", "-o", "{out}"], ["directory"]),
    (
        "expand-zero-kernel",
        ["show", "max_pool2d", "--expand", "N=1,C=1,H=3,W=3,kernel_size=0"],
        ["'kernel_size'", "positive integer"],
    ),
]


def run_usage(capsys, argv):
    """Like :func:`run`, but an argparse error (SystemExit) gives its exit code too."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, fragments=()):
    assert code == 2, (code, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("label, argv, fragments", BAD_USAGE, ids=[c[0] for c in BAD_USAGE])
def test_bad_usage_is_one_line_exit_2(capsys, tmp_path, label, argv, fragments):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    plain = tmp_path / "plain"
    plain.write_text("not a directory\n", encoding="utf-8")
    argv = [a.format(out=out_dir, file=plain) for a in argv]
    code, out, err = run_usage(capsys, argv)
    assert_one_line_error(code, out, err, fragments)
    assert os.listdir(out_dir) == []
    assert plain.read_text(encoding="utf-8") == "not a directory\n"


def test_bad_usage_as_subprocess(tmp_path):
    proc = run_subprocess(
        "derive", "d", "y[n] = x[n]", "--inputs", "x", "-o", tmp_path / "a" / "b", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "plain").write_text("x", encoding="utf-8")
    for argv in (["derive"], ["derive", "d", "y[n] = x[n]", "--inputs", "x", "-o", "plain/sub"]):
        proc = run_subprocess(*argv, cwd=tmp_path)
        assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)


def test_unexpected_error_is_one_line_unless_asked(capsys, monkeypatch):
    import symdl.cli

    def broken(args):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(symdl.cli, "cmd_list", broken)
    monkeypatch.delenv("SYMDL_TRACEBACK", raising=False)
    code, out, err = run(capsys, "list")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "symdl list: internal error: RuntimeError: something went wrong "
        "(set SYMDL_TRACEBACK=1 to see the traceback)"
    ]
    monkeypatch.setenv("SYMDL_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="went wrong"):
        main(["list"])


# ---- help ----------------------------------------------------------------------------------


def test_subcommand_list_matches_parser():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(sub.choices) == set(SUBCOMMANDS)


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in SUBCOMMANDS]])
def test_help(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: symdl")
    if argv[0] != "--help":
        assert f"symdl {argv[0]}" in out.splitlines()[0]
    assert err == ""
