"""Inspecting derivations: the chain rule step by step, worked instances on small sizes, the
HTML/LaTeX formula report and the notebook display."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from symdl import derive, registry
from symdl.codegen import generate_source
from symdl.errors import SymdlError
from symdl.parse import parse_layer
from symdl.report import highlight_python, report_html, report_tex, show, write_report
from symdl.steps import (
    ExpandError,
    derivation_steps,
    expand,
    parse_sizes,
    steps_latex,
    steps_text,
)
from symdl.testing import load_module

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = registry.definitions("layer")


def custom_layer():
    return parse_layer(
        "dense_tanh",
        "h[n,o] = Sum(x[n,i]*w[o,i], i) + b[o]; y[n,o] = tanh(h[n,o]) * beta1",
        inputs="x",
        params="w,b",
        hyper="beta1=0.5",
    )


def layer(name):
    if name == "custom":
        return custom_layer()
    if name not in CATALOGUE:
        pytest.skip(f"{name} is not in the catalogue")
    return CATALOGUE[name]


# name: (sizes, hyperparameters, inline modes to check)
INSTANCES = {
    "linear": ({"N": 2, "in": 3, "out": 2}, {}),
    "conv2d": (
        {"N": 1, "C": 2, "H": 4, "W": 3, "F": 2, "KH": 2, "KW": 2},
        {"stride": 2, "padding": 1},
    ),
    "softmax": ({"N": 2, "C": 3}, {}),
    "custom": ({"N": 2, "I": 3, "O": 2}, {}),
    "lstm_cell": ({"B": 1, "I": 2, "H": 2}, {}),
    "scaled_dot_product_attention": ({"N": 1, "L": 2, "E": 2, "S": 3, "Ev": 2}, {}),
}


# ---- steps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(INSTANCES))
def test_steps_walk_every_argument(name):
    lay = layer(name)
    d = derive(lay)
    steps = derivation_steps(d)
    titles = [s.title for s in steps]
    assert titles[0] == "Forward equations"
    assert "The incoming gradient" in titles
    spec = d.spec
    arg_steps = [
        t for t in titles if t.startswith(("Gradient of the input", "Gradient of the parameter"))
    ]
    assert [t.split()[-1] for t in arg_steps] == list(spec.args)  # in ARGS order
    for s in steps:
        for eq in s.equations:
            assert eq.text and eq.latex and eq.mathml.startswith("<math")
    text = steps_text(d)
    assert "the chain rule" in text and "delta(" in text
    assert steps_latex(d).count(r"\delta_{") >= len(spec.args)


def test_steps_of_linear_read_like_a_textbook():
    text = steps_text(CATALOGUE["linear"])
    # the chain rule over the uses, the local partial, the deltas, their elimination, the result
    assert "dL/dweight[o', i'] = Sum(dL/dt0[n, o] * d(t0[n, o])/d(weight[o', i']), (n, o))" in text
    assert "d(t0[n, o])/d(weight[o, i]) = x[n, i]" in text
    assert "d(t0[n, o])/d(weight[o', i']) = Sum(delta(o, o') * delta(i, i') * x[n, i], i)" in text
    assert "= Sum(dL/dt0[n, o']*x[n, i'], n)" in text
    assert "dL/dweight[o, i] = Sum(dL/dt0[n, o]*x[n, i], n)" in text
    latex = steps_latex(CATALOGUE["linear"])
    assert r"\delta_{o o'}" in latex
    assert r"\frac{\partial \mathcal{L}}{\partial \mathrm{weight}_{o',i'}}" in latex


def test_steps_keep_the_deltas_of_affine_positions():
    text = steps_text(CATALOGUE["conv2d"])
    assert "delta(dilation*p + stride*i, h')" in text
    assert "scatter-add" in text


def test_notation_and_greek_hyperparameters():
    bar = steps_latex(CATALOGUE["linear"], "bar")
    assert r"\bar{\mathrm{weight}}_{o',i'}" in bar and r"\frac{\partial \mathcal{L}" not in bar
    assert "bar(weight)[o', i']" in steps_text(CATALOGUE["linear"], "bar")
    assert r"\epsilon" in steps_latex(CATALOGUE["layer_norm"])
    assert r"\lambda" in steps_latex(CATALOGUE["l2_penalty"])
    assert r"\alpha" in steps_latex(CATALOGUE["elu"])
    assert r"\beta_{1}" in steps_latex(custom_layer())
    with pytest.raises(SymdlError, match="notation requires one of partial, bar"):
        derivation_steps(CATALOGUE["linear"], "hat")


# ---- worked instances -------------------------------------------------------------------------


def test_conv2d_expansion_is_the_textbook_one():
    e = expand(CATALOGUE["conv2d"], {"N": 1, "C": 1, "H": 3, "W": 3, "KH": 2, "KW": 2, "F": 1})
    assert e.sizes["OH"] == 2 and e.sizes["OW"] == 2
    x = e.symbols["x"][0, 0]
    w = e.symbols["weight"][0, 0]
    b = e.symbols["bias"][0]
    dy = e.douts["y"][0, 0]
    assert (
        e.outputs["y"][0, 0, 0, 0]
        == x[0, 0] * w[0, 0] + x[0, 1] * w[0, 1] + x[1, 0] * w[1, 0] + x[1, 1] * w[1, 1] + b
    )
    assert (
        e.outputs["y"][0, 0, 1, 1]
        == x[1, 1] * w[0, 0] + x[1, 2] * w[0, 1] + x[2, 1] * w[1, 0] + x[2, 2] * w[1, 1] + b
    )
    g = e.gradients
    assert (
        g["weight"][0, 0, 0, 1]
        == dy[0, 0] * x[0, 1] + dy[0, 1] * x[0, 2] + dy[1, 0] * x[1, 1] + dy[1, 1] * x[1, 2]
    )
    assert g["bias"][0] == dy[0, 0] + dy[0, 1] + dy[1, 0] + dy[1, 1]
    assert g["x"][0, 0, 0, 0] == dy[0, 0] * w[0, 0]
    assert (
        g["x"][0, 0, 1, 1]
        == dy[0, 0] * w[1, 1] + dy[0, 1] * w[1, 0] + dy[1, 0] * w[0, 1] + dy[1, 1] * w[0, 0]
    )
    # the derived gradient is the derivative of L = sum(dy * y), element by element
    L = sum(dy[idx] * e.outputs["y"][(0, 0) + idx] for idx in np.ndindex(dy.shape))
    for name in ("x", "weight", "bias"):
        for idx in np.ndindex(e.symbols[name].shape):
            assert sp.expand(sp.diff(L, e.symbols[name][idx]) - g[name][idx]) == 0
    assert e.element("x", 0, 0, 1, 2) == x[1, 2]
    text = e.text()
    assert "y[0, 0, 0, 0] = " in text and "dL/dweight[0, 0, 0, 0] = " in text
    assert r"\frac{\partial \mathcal{L}}{\partial x_{0,0,0,0}}" in e.latex()


def _random_values(lay, e, rng):
    vals = {}
    for n in lay.spec().args + lay.spec().consts:
        arr = e.symbols[n]
        if arr.dtype != object:
            vals[n] = arr
            continue
        lo, hi = lay.checks.get("domains", {}).get(n, (-1.0, 1.0))
        vals[n] = rng.uniform(lo, hi, arr.shape)
    return vals


@pytest.mark.parametrize("inline", [None, False], ids=["default", "program"])
@pytest.mark.parametrize("name", list(INSTANCES))
def test_expanded_gradients_equal_the_generated_backward(name, inline, rng):
    lay = layer(name)
    sizes, hyper = INSTANCES[name]
    if inline is None and name in ("lstm_cell", "scaled_dot_product_attention"):
        inline = False  # inlining these would repeat whole sub-expressions
    e = expand(lay, sizes, max_elements=1000, hyper=hyper, inline=inline)
    module = load_module(generate_source(lay), lay.name)
    spec = lay.spec()
    vals = _random_values(lay, e, rng)
    kwargs = {n: vals[n] for n in spec.consts}
    kwargs.update({k: e.hyper[k] for k in spec.hyper if e.hyper.get(k) is not None})
    out, cache = module.forward(*[vals[n] for n in spec.args], **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    dout = tuple(rng.standard_normal(np.shape(o)) for o in outs)
    grads = module.backward(dout if len(dout) > 1 else dout[0], cache)
    e_outs, e_grads = e.evaluate(vals, dout if len(dout) > 1 else dout[0])
    for o, ref in zip(spec.outputs, outs):
        np.testing.assert_allclose(e_outs[o], ref, rtol=1e-10, atol=1e-12, err_msg=f"forward {o}")
    for n, g in zip(spec.args, grads):
        np.testing.assert_allclose(
            e_grads[n], g, rtol=1e-10, atol=1e-12, err_msg=f"gradient of {n}"
        )


def test_softmax_program_mode_lists_the_named_tensors():
    e = expand(CATALOGUE["softmax"], {"N": 1, "C": 2}, inline=False)
    text = e.text()
    assert "s[0] = e[0, 0] + e[0, 1]" in text
    assert "dL/dx[0, 0] = dL/de[0, 0]*e[0, 0]" in text
    assert "stop_gradient" not in text  # shown as its value


def test_expand_errors():
    with pytest.raises(
        ExpandError, match=r"requires a size for every dimension, got none for H, W"
    ):
        expand(CATALOGUE["conv2d"], {"N": 1, "C": 1, "F": 1, "KH": 2, "KW": 2})
    with pytest.raises(ExpandError, match=r"requires at most 400 elements, got \d+"):
        expand(CATALOGUE["linear"], {"N": 20, "in": 20, "out": 20})
    with pytest.raises(ExpandError, match="requires dimension or hyperparameter names, got 'Q'"):
        expand(CATALOGUE["linear"], {"N": 1, "in": 1, "out": 1, "Q": 2})
    with pytest.raises(ExpandError, match="requires no size"):
        expand(CATALOGUE["conv2d"], {"N": 1, "C": 1, "H": 3, "W": 3, "F": 1, "KH": 2, "KW": 2, "OH": 5})
    with pytest.raises(ExpandError, match="requires a value of hyperparameter 'kernel_size'"):
        expand(CATALOGUE["max_pool2d"], {"N": 1, "C": 1, "H": 3, "W": 3})
    with pytest.raises(ExpandError, match="window does not fit"):
        expand(CATALOGUE["conv2d"], {"N": 1, "C": 1, "H": 1, "W": 1, "F": 1, "KH": 2, "KW": 2})
    with pytest.raises(SymdlError, match=r"registry.get\('linear'\).definition"):
        expand("linear", {"N": 1, "in": 1, "out": 1})  # names belong to the catalogue
    assert issubclass(ExpandError, SymdlError)


def test_parse_sizes():
    assert parse_sizes("N=1, C=1,H=3,stride=2,eps=0.5") == {
        "N": 1,
        "C": 1,
        "H": 3,
        "stride": 2,
        "eps": 0.5,
    }
    e = expand(CATALOGUE["max_pool2d"], parse_sizes("N=1,C=1,H=3,W=3,kernel_size=2,stride=1"))
    assert e.sizes["OH"] == 2
    with pytest.raises(ExpandError, match="NAME=VALUE"):
        parse_sizes("N")
    with pytest.raises(ExpandError, match="requires a number"):
        parse_sizes("N=x")


# ---- reports ----------------------------------------------------------------------------------

REPORT_LAYERS = ["linear", "conv2d", "softmax", "tanh"]


@pytest.fixture(scope="module")
def page():
    return report_html(REPORT_LAYERS)


def _xml(page):
    assert page.startswith("<!DOCTYPE html>")
    return ET.fromstring(page[page.index("<html") :])


def test_html_report_is_well_formed_and_self_contained(page):
    root = _xml(page)
    tags = [el.tag.rsplit("}", 1)[-1] for el in root.iter()]
    assert tags.count("math") > 50
    sections = [el for el in root.iter() if el.tag.endswith("}section")]
    assert [s.get("id") for s in sections] == [f"layer-{n}" for n in REPORT_LAYERS]
    assert "script" not in tags
    links = [el.get("href") for el in root.iter() if el.get("href")]
    assert links and all(h.startswith("#") for h in links)  # the table of contents, nothing remote
    assert not any(el.get("src") for el in root.iter())
    # one plot, for the elementwise activation, drawn from the generated module
    svgs = [s for s in sections if any(el.tag.endswith("}svg") for el in s.iter())]
    assert [s.get("id") for s in svgs] == ["layer-tanh"]
    # the generated code, highlighted
    assert '<span class="kw">def</span> <span class="fn">forward</span>' in page


def test_tex_report_is_a_document():
    tex = report_tex(["linear", "tanh"])
    assert tex.startswith(r"\documentclass")
    assert r"\begin{document}" in tex and tex.rstrip().endswith(r"\end{document}")
    assert r"\section{linear}" in tex and r"\section{tanh}" in tex
    assert r"\begin{tikzpicture}" in tex  # the activation's plot
    assert tex.count(r"\begin{equation*}") == tex.count(r"\end{equation*}")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_tex_report_compiles(tmp_path):
    path = write_report(
        tmp_path / "report.tex", ["linear", "conv2d", "softmax", "tanh"], fmt="tex"
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", path.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "report.pdf").stat().st_size > 10_000


def test_write_report(tmp_path):
    path = write_report(tmp_path / "out" / "r.html", ["tanh"])
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and 'id="layer-tanh"' in text
    with pytest.raises(SymdlError, match="report format requires one of html, tex, got 'pdf'"):
        write_report(tmp_path / "r.pdf", ["tanh"], fmt="pdf")
    with pytest.raises(SymdlError, match="requires a catalogue name"):
        write_report(tmp_path / "r.html", ["no_such_layer"])
    assert not (tmp_path / "r.html").exists()


def test_show_for_notebooks():
    s = show("conv2d", expand={"N": 1, "C": 1, "H": 3, "W": 3, "KH": 2, "KW": 2, "F": 1})
    frag = s._repr_html_()
    root = ET.fromstring(f"<div>{frag}</div>")
    assert any(el.tag.endswith("math") for el in root.iter())
    assert "A worked instance" in frag
    tex = s._repr_latex_()
    assert tex.startswith("$$") and tex.endswith("$$") and r"\delta_{" in tex
    assert "conv2d" in repr(s)
    assert show(custom_layer(), steps=False)._repr_html_().count("<math") >= 2


def test_highlighting_keeps_the_source():
    source = generate_source(CATALOGUE["softmax"])
    marked = str(highlight_python(source))
    assert html.unescape(re.sub(r"<[^>]+>", "", marked)) == source
    assert '<span class="cm"># ' in marked and '<span class="st">' in marked


# ---- every LaTeX string parses (KaTeX, when installed) -----------------------------------------


def _katex_dir():
    node = shutil.which("node")
    if node is None:
        return None
    proc = subprocess.run(
        [node, "-e", "process.stdout.write(require.resolve('katex'))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout if proc.returncode == 0 and proc.stdout else None


KATEX_CHECK = r"""
const katex = require('katex');
const items = JSON.parse(require('fs').readFileSync(process.argv[1], 'utf8'));
const bad = [];
for (const [where, tex] of items) {
  try { katex.renderToString(tex, {throwOnError: true, displayMode: true}); }
  catch (e) { bad.push(where + ': ' + e.message + ' in ' + tex.slice(0, 200)); }
}
console.log(JSON.stringify(bad));
"""


@pytest.mark.skipif(_katex_dir() is None, reason="node or the katex npm package is not installed")
def test_every_formula_parses_with_katex(tmp_path):
    items = []
    for name, lay in list(CATALOGUE.items()) + [("custom", custom_layer())]:
        for style in ("partial", "bar") if name in INSTANCES else ("partial",):
            for s in derivation_steps(lay, style):
                items += [(f"{name}/{style}/{s.title}", eq.latex) for eq in s.equations]
    for name, (sizes, hyper) in INSTANCES.items():
        if name in CATALOGUE or name == "custom":
            e = expand(layer(name), sizes, max_elements=1000, hyper=hyper, inline=False)
            for title, eqs in e.equations():
                items += [(f"{name}/expansion/{title}", eq.latex) for eq in eqs]
    data = tmp_path / "formulas.json"
    data.write_text(json.dumps(items))
    proc = subprocess.run(
        [shutil.which("node"), "-e", KATEX_CHECK, str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    bad = json.loads(proc.stdout)
    assert not bad, "\n".join(bad[:20])
