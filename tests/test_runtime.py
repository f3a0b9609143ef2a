"""The runtime helpers copied into generated modules: each module carries only the helpers it
calls (and those they call), and the helpers stay a small part of generated/."""

from __future__ import annotations

import ast
import itertools

import pytest
from conftest import GENERATED

from symdl.codegen import format_source
from symdl.errors import CodegenError
from symdl.runtime import FEATURES, Runtime, _helpers

#: The most of generated/'s lines that top-level private functions (names starting with "_") may
#: take: the runtime helpers plus a sequence's step functions and an optimizer's
#: ``_hyperparameters``. The floor is set by the argument checks themselves: every layer checks
#: its arguments' dtype, its shapes and its incoming gradient, each with its own message.
MAX_HELPER_FRACTION = 0.31

MODULES = sorted(GENERATED.glob("*.py"))


def _private_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_")
    }


def helper_lines() -> tuple[int, int]:
    """(lines of top-level private functions, all lines) over generated/*.py."""
    helpers = total = 0
    for path in MODULES:
        text = path.read_text(encoding="utf-8")
        total += len(text.splitlines())
        functions = _private_functions(ast.parse(text)).values()
        helpers += sum(f.end_lineno - f.lineno + 1 for f in functions)
    return helpers, total


def test_helpers_are_a_small_part_of_generated():
    helpers, total = helper_lines()
    assert helpers / total <= MAX_HELPER_FRACTION, (
        f"helpers take {helpers} of the {total} lines of generated/ "
        f"({helpers / total:.1%}, at most {MAX_HELPER_FRACTION:.0%} allowed)"
    )


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_every_helper_is_called(path):
    """Each private function is reached from the public functions (or module-level code)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    private = _private_functions(tree)

    def names_in(nodes) -> set[str]:
        return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}

    reached: set[str] = set()
    todo = (
        names_in(
            node
            for node in tree.body
            if not (isinstance(node, ast.FunctionDef) and node.name in private)
        )
        & private.keys()
    )
    while todo:
        name = todo.pop()
        reached.add(name)
        todo |= (names_in([private[name]]) & private.keys()) - reached
    assert set(private) == reached, f"never called: {sorted(set(private) - reached)}"


@pytest.mark.parametrize(
    "features",
    [f for r in range(len(FEATURES) + 1) for f in itertools.combinations(FEATURES, r)],
    ids=lambda f: "+".join(f) or "none",
)
def test_every_variant_is_formatted_python(features):
    """Each combination of features renders helpers that ruff format leaves unchanged."""
    helpers = _helpers(frozenset(features))
    text = 'import numpy as np\n\nNAME = "layer"\nSHAPES = {}\n'
    text += "".join(f"\n\n{source}" for source, _ in helpers.values())
    assert format_source(text) == text


def test_a_helper_brings_the_helpers_it_calls(monkeypatch):
    fake = {
        "_a": ("def _a():\n    return _c()\n", frozenset({"_c"})),
        "_b": ("def _b():\n    return 1\n", frozenset()),
        "_c": ("def _c():\n    return _b()\n", frozenset({"_b"})),
        "_d": ("def _d():\n    return 2\n", frozenset()),
    }
    monkeypatch.setattr("symdl.runtime._helpers", lambda features: fake)
    rt = Runtime()
    assert rt.call("_a", "") == "_a()"
    assert rt.sources() == [fake["_a"][0], fake["_b"][0], fake["_c"][0]]  # in their fixed order


def test_features_select_code():
    plain = _helpers(frozenset())["_bind_shapes"][0]
    full = _helpers(frozenset(FEATURES))["_bind_shapes"][0]
    assert '"..."' not in plain and "partition" not in plain and "sizes=None" not in plain
    assert '"..."' in full and "partition" in full and "sizes=None" in full


def test_unknown_helper_or_feature_is_an_error():
    rt = Runtime()
    with pytest.raises(CodegenError, match="runtime features require names from"):
        rt.call("_float_arg", "x", "bogus")
    rt.use("_no_such_helper")
    with pytest.raises(CodegenError, match="_no_such_helper"):
        rt.sources()


if __name__ == "__main__":  # python tests/test_runtime.py: the numbers
    helpers, total = helper_lines()
    print(f"generated/: {total} lines, {helpers} in helpers ({helpers / total:.1%})")
