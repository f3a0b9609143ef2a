"""The disk cache of generated modules (symdl/cache.py): a hit is byte-identical to a fresh
generation, anything the text depends on changes the key, a damaged entry is rebuilt, and
``--no-cache`` or an unusable cache directory changes nothing but speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp
from conftest import ROOT

from symdl import cache, cli, registry
from symdl.cli import main
from symdl.spec import Layer

DENSE = "y[n,o] = tanh(Sum(w[o,i]*x[n,i], i) + b[o])"
SOME = ("linear", "softmax", "layer_norm", "rnn", "adam")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache directory of this test alone."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SYMDL_CACHE_DIR", str(path))
    monkeypatch.delenv("SYMDL_NO_CACHE", raising=False)
    return path


def entries(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.rglob("*.json"))}


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.py"))}


def generate(capsys, out, *names, extra=()):
    code = main(["generate", "-o", str(out), *extra, *names])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    return read_dir(out)


def derive(capsys, out, equations=DENSE, extra=()):
    argv = ["derive", "dense", equations, "--inputs", "x", "--params", "w,b", "-o", str(out)]
    code = main([*argv, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "3 gradient(s) derived for x, w, b" in captured.out
    return (out / "dense.py").read_bytes()


def fail(*args, **kw):
    raise AssertionError("the layer was derived again instead of read from the cache")


# ---- hits are byte-identical ----------------------------------------------------------------


def test_generate_hit_is_byte_identical_to_an_uncached_run(
    tmp_path, cache_dir, capsys, monkeypatch
):
    plain = generate(capsys, tmp_path / "plain", *SOME, extra=["--no-cache"])
    first = generate(capsys, tmp_path / "first", *SOME)
    assert len(entries(cache_dir)) == len(SOME)
    monkeypatch.setattr(registry, "source", fail)  # a miss now fails the test
    second = generate(capsys, tmp_path / "second", *SOME)
    assert plain == first == second
    assert set(plain) == {f"{n}.py" for n in SOME}


def test_derive_hit_is_byte_identical_to_an_uncached_run(tmp_path, cache_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    plain = derive(capsys, out, extra=["--no-cache"])
    first = derive(capsys, out)
    assert len(entries(cache_dir)) == 1
    monkeypatch.setattr(cli, "_derive_text", fail)
    second = derive(capsys, out)
    assert plain == first == second
    assert b"--no-cache" not in plain  # the header records the command, less the cache switch


def test_derive_scan_is_cached_too(tmp_path, cache_dir, capsys, monkeypatch):
    argv = [
        "derive", "elman", "h1[b,o] = tanh(x[b,o] + a[o]*h[b,o])",
        "--inputs", "x,h", "--params", "a", "--scan", "x", "--state", "h=h1",
        "-o", str(tmp_path),
    ]  # fmt: skip
    assert main([*argv, "--no-cache"]) == 0
    plain = (tmp_path / "elman.py").read_bytes()
    assert main(argv) == 0
    monkeypatch.setattr(cli, "_derive_text", fail)
    assert main(argv) == 0
    assert "a sequence layer" in capsys.readouterr().out
    assert (tmp_path / "elman.py").read_bytes() == plain


def test_keys_do_not_depend_on_the_hash_seed(tmp_path, cache_dir):
    """Two processes with different PYTHONHASHSEED find each other's entries."""
    for seed in ("1", "4242"):
        subprocess.run(
            [sys.executable, "-m", "symdl", "generate", "-o", str(tmp_path / seed), *SOME],
            check=True, capture_output=True, cwd=ROOT,
            env=dict(os.environ, PYTHONHASHSEED=seed),
        )  # fmt: skip
        assert len(entries(cache_dir)) == len(SOME)
    assert read_dir(tmp_path / "1") == read_dir(tmp_path / "4242")


def test_a_cached_derive_does_not_import_sympy(tmp_path, cache_dir):
    argv = ["derive", "dense", DENSE, "--inputs", "x", "--params", "w,b", "-o", str(tmp_path)]
    probe = (
        "import sys; from symdl.cli import main; code = main(sys.argv[1:]); "
        "print('heavy:', sorted({'sympy', 'jinja2', 'numpy'} & set(sys.modules))); sys.exit(code)"
    )
    command = [sys.executable, "-c", probe, *argv]
    runs = [
        subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert "heavy: ['jinja2', 'sympy']" in runs[0].stdout  # a miss derives (NumPy: not needed)
    assert "heavy: []" in runs[1].stdout  # a hit only copies the text


# ---- what the key depends on ----------------------------------------------------------------


def layer_key(layer, source="symdl/layers/dense.py"):
    return cache.key("generate", {"entry": cache.canonical(layer), "source": source})


def dense_layer(rhs=None, **kw):
    x, w, b, y = sp.IndexedBase("x"), sp.IndexedBase("w"), sp.IndexedBase("b"), sp.IndexedBase("y")
    n, o, i = sp.symbols("n o i")
    rhs = sp.tanh(sp.Sum(w[o, i] * x[n, i], (i, 0, 1)) + b[o]) if rhs is None else rhs
    return Layer("dense", [(y[n, o], rhs)], inputs="x", params="w, b", **kw)


def test_changing_an_equation_misses():
    x, w, b = sp.IndexedBase("x"), sp.IndexedBase("w"), sp.IndexedBase("b")
    n, o, i = sp.symbols("n o i")
    same = layer_key(dense_layer()), layer_key(dense_layer())
    assert same[0] == same[1]  # equal layers, built twice: one key
    other = dense_layer(sp.sinh(sp.Sum(w[o, i] * x[n, i], (i, 0, 1)) + b[o]))
    assert layer_key(other) != same[0]
    assert layer_key(dense_layer(doc="another docstring")) != same[0]
    half, quarter = dense_layer(hyper={"alpha": 0.5}), dense_layer(hyper={"alpha": 0.25})
    assert layer_key(half) != layer_key(quarter)
    assert layer_key(dense_layer(), source="elsewhere.py") != same[0]


def test_derive_text_change_misses(tmp_path, cache_dir, capsys):
    first = derive(capsys, tmp_path)
    second = derive(capsys, tmp_path, DENSE.replace("tanh", "sigmoid"))
    assert first != second
    assert len(entries(cache_dir)) == 2


def test_every_catalogue_entry_has_its_own_key():
    everything = registry.definitions()
    keys = {layer_key(layer, source="") for layer in everything.values()}
    assert len(keys) == len(everything)


def test_changing_the_version_or_the_engine_misses(monkeypatch):
    before = layer_key(dense_layer())
    monkeypatch.setattr(cache, "__version__", "999.0")
    cache.engine_fingerprint.cache_clear()
    try:
        assert layer_key(dense_layer()) != before
        monkeypatch.undo()
        cache.engine_fingerprint.cache_clear()
        assert layer_key(dense_layer()) == before
        monkeypatch.setattr(cache, "_version_of", lambda dist: "0.0.1")  # another SymPy, ruff
        cache.engine_fingerprint.cache_clear()
        assert layer_key(dense_layer()) != before
    finally:
        monkeypatch.undo()
        cache.engine_fingerprint.cache_clear()


def test_changing_a_template_misses(tmp_path, monkeypatch):
    before = layer_key(dense_layer())
    copy = tmp_path / "templates"
    copy.mkdir()
    for path in cache._templates().iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(cache, "_templates", lambda: copy)
    cache.engine_fingerprint.cache_clear()
    try:
        assert layer_key(dense_layer()) == before  # the same files: the same key
        (copy / "module.py.j2").write_text((copy / "module.py.j2").read_text() + "# changed\n")
        cache.engine_fingerprint.cache_clear()
        assert layer_key(dense_layer()) != before
    finally:
        monkeypatch.undo()
        cache.engine_fingerprint.cache_clear()


def test_changing_a_lowering_switch_misses(monkeypatch):
    from symdl.lower import OPTIMIZATIONS

    assert cache.switches() == "default"
    before = layer_key(dense_layer())
    monkeypatch.setitem(OPTIMIZATIONS, "matmul", False)
    assert cache.switches() == {**OPTIMIZATIONS, "matmul": False}
    assert layer_key(dense_layer()) != before


def test_a_value_without_canonical_text_is_not_cached(tmp_path, cache_dir):
    layer = dense_layer(checks={"reference": object()})
    with pytest.raises(cache.Uncacheable):
        cache.canonical(layer)
    calls = []
    text, _ = cache.cached(
        "generate", lambda: {"e": cache.canonical(layer)}, lambda: (calls.append(1) or "t", {})
    )
    assert text == "t" and calls == [1]
    assert not cache_dir.exists()


# ---- damaged entries, no cache, unusable directories ----------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"",  # empty
        lambda raw: raw[: len(raw) // 2],  # truncated JSON
        lambda raw: b"\xff\xfe not json",
        lambda raw: json.dumps([1, 2]).encode(),  # JSON of another shape
        # the text altered: its hash no longer matches
        lambda raw: json.dumps({**json.loads(raw), "text": "import os\n"}).encode(),
        # a valid entry stored under another key
        lambda raw: json.dumps({**json.loads(raw), "key": "0" * 64}).encode(),
    ],
    ids=["empty", "truncated", "binary", "list", "text-altered", "wrong-key"],
)
def test_a_damaged_entry_is_rebuilt(tmp_path, cache_dir, capsys, damage):
    out = tmp_path / "out"
    good = derive(capsys, out)
    [path] = list(cache_dir.rglob("*.json"))
    intact = path.read_bytes()
    path.write_bytes(damage(intact))
    (out / "dense.py").unlink()
    assert derive(capsys, out) == good
    assert path.read_bytes() == intact  # rebuilt and stored again


def test_no_cache_writes_nothing(tmp_path, cache_dir, capsys, monkeypatch):
    generate(capsys, tmp_path / "g", "linear", extra=["--no-cache"])
    derive(capsys, tmp_path / "d", extra=["--no-cache"])
    assert not cache_dir.exists()
    monkeypatch.setenv("SYMDL_NO_CACHE", "1")
    generate(capsys, tmp_path / "g2", "linear")
    derive(capsys, tmp_path / "d2")
    assert not cache_dir.exists()
    monkeypatch.setenv("SYMDL_NO_CACHE", "0")  # "0" means: use the cache
    derive(capsys, tmp_path / "d3")
    assert len(entries(cache_dir)) == 1


def test_no_cache_does_not_read_either(tmp_path, cache_dir, capsys, monkeypatch):
    good = derive(capsys, tmp_path)
    [path] = list(cache_dir.rglob("*.json"))
    entry = json.loads(path.read_bytes())
    calls = []
    real = cli._derive_text
    monkeypatch.setattr(cli, "_derive_text", lambda *a: calls.append(1) or real(*a))
    assert derive(capsys, tmp_path, extra=["--no-cache"]) == good
    assert calls == [1]
    assert json.loads(path.read_bytes()) == entry


def test_an_unusable_cache_directory_still_works(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SYMDL_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    plain = derive(capsys, tmp_path / "a", extra=["--no-cache"])
    assert derive(capsys, tmp_path / "a") == plain
    assert generate(capsys, tmp_path / "g", "linear") == generate(
        capsys, tmp_path / "h", "linear", extra=["--no-cache"]
    )
    assert blocker.read_text() == "not a directory"


def test_entries_are_written_atomically(tmp_path, cache_dir, capsys):
    derive(capsys, tmp_path)
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert [p.suffix for p in files] == [".json"]  # no temporary file left behind
    entry = json.loads(files[0].read_bytes())
    assert entry["key"] == files[0].stem
    assert entry["text"].encode() == (tmp_path / "dense.py").read_bytes()


# ---- where ----------------------------------------------------------------------------------


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("SYMDL_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SYMDL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "symdl"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "symdl"


def test_symdl_names_stay_the_same():
    """``import symdl`` is lazy; ``symdl.derive`` is still the function after the submodule
    symdl/derive.py is imported."""
    import symdl
    import symdl.codegen  # imports symdl/derive.py
    from symdl.derive import derive as the_function

    assert symdl.derive is the_function
    assert symdl.Layer is Layer
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, symdl; print('sympy' in sys.modules)"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert proc.stdout.strip() == "False"
