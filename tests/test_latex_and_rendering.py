"""Every LaTeX string symdl emits parses with a real TeX parser (KaTeX, run with Node), and the
HTML report lays out in headless Chromium. `.ci/run` installs both where missing; the tests
skip (saying why) on a machine without them."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib

import pytest
from conftest import GENERATED, ROOT, load_generated

from symdl import registry
from symdl.cli import main
from symdl.derive import derive
from symdl.latex import formulas


def _katex_available() -> bool:
    node = shutil.which("node")
    if node is None:
        return False
    proc = subprocess.run(
        [node, "-e", "require.resolve('katex')"], cwd=ROOT, capture_output=True, check=False
    )
    return proc.returncode == 0


CHECK = r"""
const katex = require('katex');
const items = JSON.parse(require('fs').readFileSync(process.argv[1], 'utf8'));
const bad = [];
for (const [where, tex] of items) {
  try { katex.renderToString(tex, {throwOnError: true, displayMode: true}); }
  catch (e) { bad.push(where + ': ' + e.message); }
}
console.log(JSON.stringify(bad));
"""


def _emitted_latex(capsys):
    items = []
    for path in sorted(GENERATED.glob("*.py")):  # FORMULAS of every generated module
        module = load_generated(path.stem)
        items += [(f"{path.stem}.FORMULAS[{k}]", v) for k, v in module.FORMULAS.items()]
    for entry in registry.entries().values():  # symdl show NAME --latex
        for notation in ("partial", "bar"):
            assert main(["show", entry.name, "--latex", "--notation", notation]) == 0
            out = capsys.readouterr().out
            tex = [line for line in out.splitlines() if line and not line.startswith("%")]
            items += [(f"show {entry.name} --latex ({notation})", t) for t in tex]
    for name in ("linear", "softmax"):
        items += [(f"formulas({name}, bar)", v) for v in formulas(derive(registry.get(name).definition), "bar").values()]
    return items


@pytest.mark.skipif(not _katex_available(), reason="node or the katex npm package is not installed")
def test_every_emitted_formula_parses_with_katex(tmp_path, capsys):
    items = _emitted_latex(capsys)
    assert len(items) > 300
    data = tmp_path / "formulas.json"
    data.write_text(json.dumps(items))
    proc = subprocess.run(
        [shutil.which("node"), "-e", CHECK, str(data)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
    )
    bad = json.loads(proc.stdout)
    assert not bad, "\n".join(bad[:20])


def _png_pixels(path):
    """Decode an 8-bit RGB(A) PNG far enough to count distinct scanline bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return header, zlib.decompress(idat)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", "linear", "sigmoid", "conv2d", "lstm_cell", "-o", str(page)]) == 0
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
            "--v=0", "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert shot.exists(), proc.stderr[-2000:]
    console_errors = [
        line for line in proc.stderr.splitlines() if "CONSOLE" in line and "error" in line.lower()
    ]
    assert not console_errors, console_errors
    header, raw = _png_pixels(shot)
    width, height = header[0], header[1]
    assert (width, height) == (1200, 1600)
    assert len(set(raw[:: max(1, len(raw) // 200000)])) > 20, "the screenshot is blank"
