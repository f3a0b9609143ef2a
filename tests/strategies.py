"""Hypothesis strategies for tests/test_hypothesis.py.

* :func:`hostile_texts`: malformed and hostile equation text (payloads that would leave a trace
  if anything evaluated them, unbalanced brackets, huge numbers, lookalike characters, mutated
  valid equations, random text and token soup), each with declarations for ``parse_layer``.
* :func:`colliding_layers`: valid layers whose tensor, index, hyperparameter or layer names
  collide with Python keywords and builtins, NumPy, SymPy, and the generated module's own names.
* :func:`random_layers`: random *valid* layers (expression trees over the whitelisted functions,
  contractions, broadcasts, chains of intermediates, a parameter used twice, scalars, batch
  dimensions, hyperparameters, constants) as equation text, with every function argument kept
  in a safe interval by interval arithmetic, so that a gradcheck at tolerance 1e-6 is meaningful:
  inputs are drawn from (0.5, 1.5); ``log``, ``sqrt``, ``/`` and negative powers only ever see
  values >= 0.13; ``abs`` only values at least 0.2 away from 0; ``tanh``/``exp`` arguments stay
  in [-2, 2], ``sigmoid``/``softplus``/``sin``/``cos`` in [-3, 3], ``erf`` in [-1.5, 1.5].
"""

from __future__ import annotations

import builtins
import dataclasses
import keyword
import math
import os
import tempfile

from hypothesis import strategies as st

# ---- canaries --------------------------------------------------------------------------------

#: A file that a payload would create if any of it were evaluated (absolute, so it does not
#: depend on the working directory), the environment variable and the builtins/globals name a
#: payload would set.
CANARY_FILE = os.path.join(tempfile.gettempdir(), "symdl_hypothesis_canary")
CANARY_LOCAL = "SYMDL_CANARY_FILE"  # relative to the working directory
CANARY_NAME = "SYMDL_CANARY"

_F = repr(CANARY_FILE)
_L = repr(CANARY_LOCAL)

#: Expressions with a side effect if evaluated.
PAYLOADS = [
    f"__import__('os').system('touch {CANARY_FILE}')",
    f"__import__('os').system('touch {CANARY_LOCAL}')",
    f"open({_F}, 'w')",
    f"open({_L}, 'w').write('x')",
    f"__import__('pathlib').Path({_F}).touch()",
    f"__import__('os').environ.__setitem__('{CANARY_NAME}', '1')",
    f"__import__('os').environ.update({CANARY_NAME}='1')",
    f"setattr(__import__('builtins'), '{CANARY_NAME}', 1)",
    f"__builtins__.__setitem__('{CANARY_NAME}', 1)",
    f"globals().update({CANARY_NAME}=1)",
    f"exec(\"open({_F}, 'w')\")",
    f"eval(\"__import__('os').system('touch {CANARY_FILE}')\")",
    f"compile(\"open({_F}, 'w')\", 'f', 'exec')",
    f"(lambda: open({_F}, 'w'))()",
    f"(lambda q=open({_F}, 'w'): q)()",
    f"[open({_F}, 'w') for _ in (1,)]",
    f"{{open({_F}, 'w')}}",
    f"{{k: open({_F}, 'w') for k in (1,)}}",
    f"(open({_F}, 'w') for _ in (1,))",
    f"f'{{open({_F}, \"w\")}}'",
    f"({CANARY_NAME} := open({_F}, 'w'))",
    f"getattr(__import__('os'), 'system')('touch {CANARY_FILE}')",
    "x.__class__.__mro__[-1].__subclasses__()",
    "x[n].__class__.__base__.__subclasses__()",
    "().__class__.__bases__[0].__subclasses__()",
    "__import__('os')._exit(0)",
    "__import__('sys').exit(3)",
    "__import__('sys').setrecursionlimit(10)",
    "__import__('os').chdir('/')",
    "__import__('time').sleep(100)",
    f"type('', (), {{'__del__': lambda s: open({_F}, 'w')}})()",
    "breakpoint()",
    "input()",
    "help()",
    "exit()",
    "x if open(" + _F + ", 'w') else x",
    "x[n] @ open(" + _F + ", 'w')",
    "*open(" + _F + ", 'w')",
    "await open(" + _F + ", 'w')",
    "(yield open(" + _F + ", 'w'))",
]

#: Whole statements with a side effect if executed.
STATEMENTS = [
    f"import os; os.system('touch {CANARY_FILE}')",
    "from os import system",
    f"exec(\"open({_F}, 'w')\")",
    f"with open({_F}, 'w'): pass",
    "while True: pass",
    "for _ in iter(int, 1): pass",
    f"global {CANARY_NAME}; {CANARY_NAME} = 1",
    f"try:\n    open({_F}, 'w')\nexcept Exception:\n    pass",
    "def f(): pass",
    "class A: pass",
    "async def f(): pass",
    "@open\ndef f(): pass",
    "del x",
    f"assert open({_F}, 'w')",
    "raise SystemExit(3)",
    "lambda: 0",
    "x[n].__setitem__(0, 1)",
    f"y[n] = x[n]\nimport os; os.system('touch {CANARY_FILE}')",
    f"y[n] += open({_F}, 'w')",
    f"y[n]: open({_F}, 'w') = x[n]",
    f"y[n] = z[n] = open({_F}, 'w')",
    f"y[n], z[n] = x[n], open({_F}, 'w')",
    f"match x:\n    case _: open({_F}, 'w')",
    f"if open({_F}, 'w'): pass",
    f"print(open({_F}, 'w'))",
]

TEMPLATES = [
    "{p}",
    "y[n] = {p}",
    "y[n] = x[n] + {p}",
    "y[n] = x[n] * ({p})",
    "y[n] = exp({p})",
    "y[n] = Sum({p}, n)",
    "y[{p}] = x[n]",
    "y[n] = x[{p}]",
    "y[n] = x[n, {p}]",
    "y = Sum(x[n], {p})",
    "y = Sum(x[n], (n, {p}))",
    "y[n] = where({p} > 0, x[n], x[n])",
    "y[n] = where(x[n] > {p}, x[n], x[n])",
    "{p}[n] = x[n]",
    "y[n] = x[n]; {p}",
    "{p}; y[n] = x[n]",
    "y[n] = x[n]\n{p}",
    "h[n] = x[n]\ny[n] = h[n] * {p}",
    # comments are not code: these are valid layers, and must stay inert in generated modules
    "y[n] = x[n]  # {p}",
    "y[n] = x[n]\n# {p}\n",
    "# {p}\ny[n] = exp(x[n])",
    "h[n] = exp(x[n])\ny[n] = h[n]  # {p}\n#",
]

HUGE_NUMBERS = [
    "9**9**9",
    "10**100000",
    "10**10**10",
    "2**64**2",
    "(10**64)**64",
    "((2**64)**64)**64",
    "(((2**64)**64)**64)**64",
    "99999999999999999999",
    "1" * 400,
    "0x" + "f" * 100,
    "1e999",
    "-1e999",
    "1e308 * 10",
    "1e308 * 1e308",
    "1e200 ** 2",
    "999999999999 ** 64",
    "123456789012.5 ** 64",
    "(2 ** 0.5) ** 64",
    "0.5 ** 64 ** 2",
    "1e-400",
    "0." + "0" * 400 + "1",
    "1." + "0" * 3000 + "1",
    "x[n] ** (10**12)",
    "x[n] ** 1e12",
    "x[n] ** -64 ** -1",
    "x[n] ** 1e-300",
    "(-1) ** 0.5",
    "0 ** -1",
    "0.0 ** -2",
    "1 / 0",
    "1 / (1 - 1)",
    "1 / (x[n] - x[n])",
    "float('inf')",
    "1j",
    "True",
    "None",
    "...",
    "b'x'",
    "'x'",
]

UNBALANCED = [
    "y[n] = x[n",
    "y[n] = x[n]]",
    "y[n] = exp(x[n]",
    "y[n] = exp(x[n]))",
    "y[n = x[n]",
    "y[n]] = x[n]",
    "y[n] = )x[n](",
    "y[n] = [x[n]",
    "y[n] = {x[n]",
    "y[n] = x[n] +",
    "= x[n]",
    "y[n] =",
    "y[n] == x[n]",
    "y[n] = x[n] = z[n]",
    "((((",
    "]]]]",
    "y[n] = Sum(x[n, i], (i, j)",
    "y[n] = x[n]\nz[n] = (y[n]",
    "y[n] = x[n]\\",
    "y[n] = x[n] \\\n",
    "y[n] = '''",
    'y[n] = """',
    "y[n] = x[n] # (",
]

#: Characters that look like ASCII ones, controls, and invisible characters.
LOOKALIKES = [
    "y[n] = \u0445[n]",  # Cyrillic x
    "\u0443[n] = x[n]",  # Cyrillic y
    "y[n] = x[\u0578]",  # Armenian n
    "y[n] = \uff58[n]",  # fullwidth x
    "y[n] = \U0001d465[n]",  # mathematical italic x (NFKC-normalises to x)
    "y[n] = x[n] \u2212 1",  # minus sign
    "y[n]\u00a0= x[n]",  # no-break space
    "y[n] = x\u200b[n]",  # zero-width space
    "\ufeffy[n] = x[n]",  # byte-order mark
    "y[n] = x[n]\u202e",  # right-to-left override
    "y[n] = x\u0301[n]",  # combining accent
    "y[n] = exp\uff08x[n]\uff09",  # fullwidth parentheses
    "y[n] = x[n]\x00",
    "y[n] = x[n]\x0b",
    "y[n] = x[n]\x1b[31m",
    "y[n] = x[n]\x0c",
    "y[n] = x[n]\u2028z[n] = y[n]",  # line separator
    "y[n] = x[n]\x85",
    "y[n] = \u03bf[n]",  # Greek omicron
    "y[n] = x[n] \u00d7 2",  # multiplication sign
    "y[n] = \u2170[n]",  # small roman numeral one
]

MISC = [
    "",
    " ",
    "\n\n",
    ";",
    ";;",
    "#",
    "\t",
    "pass",
    "y[n] = x[n];;",
    "y[n] = x[n]\r\nz[n] = y[n]",
    "y[n] = x[n]\rz[n] = y[n]",
    "  y[n] = x[n]\n    z[n] = y[n]",
    "y[n] = x[n]\\\n + 1",
    "y[n] = np.exp(x[n])",
    "y[n] = x.T[n]",
    "y[n] = x[n].real",
    "y[n] = x[n:n]",
    "y[n] = x[::2]",
    "y[n] = x[-1]",
    "y[0] = x[0]",
    "y[n] = x[n][n]",
    "y[n] = x[n, ...]",
    "y[..., ...] = x[..., ...]",
    "y[n] = x[n] > 0",
    "y[n] = x[n] * (x[n] > 0)",
    "y[n] = x[n] and x[n]",
    "y[n] = not x[n]",
    "y[n] = x[n] // 2",
    "y[n] = x[n] % 2",
    "y[n] = ~x[n]",
    "y[n] = x[n] << 1",
    "y[n] = x[n] is x[n]",
    "y[n] = x[n] in x",
    "y[n] = exp()",
    "y[n] = exp(x[n], x[n])",
    "y[n] = exp(*x)",
    "y[n] = exp(**x)",
    "y[n] = exp(x=x[n])",
    "y[n] = Sum(x[n, i])",
    "y[n] = Sum(x[n, i], i, i)",
    "y = Sum(x[n], ())",
    "y = Sum(x[n], 1)",
    "y = Sum(x[n], (n, n))",
    "y[n] = Sum(x[n], n)",
    "y[n] = where(x[n], x[n], x[n])",
    "y[n] = where(0 < x[n] < 1, x[n], x[n])",
    "y[n] = where(x[n] == 0, x[n], 1)",
    "y[n] = sign(x[n])",
    "y[n] = x[n] * e",
    "y[n] = x[n] * E",
    "y[n] = x[n] * I",
    "y[n] = x[n] * oo",
    "y[n] = x[n] * nan",
    "y[n] = x[n] * zoo",
    "y[n] = x[__name__]",
    "y[__class__] = x[__class__]",
    "x[n] = x[n]",
    "y[n] = y[n]",
    "y[n] = exp(y[n])",
    "y[n] = x[n]; y[n] = x[n]",
    "y[n] = z[n]; z[n] = x[n]",
    "y[n, n] = x[n]",
    "y[n] = x[n, n]",
    "y[m] = x[n]",
    "y[n] = x[m]",
    "y[n] = x[n+1]",
    "y[n] = x[n*n]",
    "y[n] = x[x[n]]",
    "y[n] = x[t[t[n]]]",
    "y[n] = x[n] * 1e308 * 1e308",
    "y[n] = " + "x[n]**" * 12 + "2",
]

FRAGMENTS = (
    ["(", ")", "[", "]", ",", ";", "\n", "=", "**", "*", "/", "+", "-", ".", ":", "'", '"', "#"]
    + ["\\", "{", "}", "@", "...", "x", "n", "i", "w", "0", "1e999", "9**9**9", "__class__"]
    + ["lambda:", "import os", "Sum(", "exp(", "where(", ">", "<", "==", " if ", " for ", "\t"]
    + ["\u0445", "\uff08", "\x00", "__import__('os')", "open('" + CANARY_LOCAL + "', 'w')"]
    + [".__dict__", "[0]", "(" * 30, ")" * 30, "x[n]" * 3, "1" * 30]
)

TOKENS = (
    ["y", "x", "w", "b", "t", "n", "i", "o", "[", "]", "(", ")", ",", "=", "+", "-", "*", "/"]
    + ["**", ";", "\n", "Sum", "Mean", "Max", "exp", "log", "tanh", "where", ">", "0", "1", "2.5"]
    + ["...", "pi", "eps", "__import__", "'os'", ".", "lambda", ":", "if", "else", "for", "in"]
    + ["np", "cache", "dout", "sizes", "dtype", "batch_shape", "print", "exec", "open"]
)

#: Valid layers to mutate, with their declarations.
BASES = [
    ("y[n] = x[n]", {"inputs": "x"}),
    ("y[n, o] = Sum(x[n, i] * w[o, i], i) + b[o]", {"inputs": "x", "params": "w, b"}),
    ("h[n] = exp(x[n]); y[n] = h[n] * 2", {"inputs": "x"}),
    (
        "p[n] = Sum(x[n, i] * w[i], i); L = Mean((p[n] - t[n]) ** 2, n)",
        {"inputs": "x", "params": "w", "consts": "t"},
    ),
    ("y[n] = where(x[n] > 0, x[n], 0.1 * x[n])", {"inputs": "x"}),
    ("y[n, d] = w[idx[n], d] * x[n, d]", {"inputs": "x", "params": "w", "consts": "idx"}),
    (
        "y[n, i] = x[n, i] / sqrt(Mean(x[n, j] ** 2, j) + eps) * g[i]",
        {"inputs": "x", "params": "g", "hyper": "eps=1e-5"},
    ),
    ("y[..., o] = Sum(x[..., i] * w[o, i], i)", {"inputs": "x", "params": "w"}),
    (
        (
            "m[n] = stop_gradient(Max(x[n, c], c)); y[n, c] = exp(x[n, c] - m[n]) / "
            "Sum(exp(x[n, k] - m[n]), k)"
        ),
        {"inputs": "x"},
    ),
    (
        "y[n, f, i] = Sum(w[f, c, p] * x[n, c, s * i + p], (c, p))",
        {"inputs": "x", "params": "w", "hyper": "s=1"},
    ),
]

DEFAULT_DECL = {"inputs": "x"}


def _text_with(template):
    return st.sampled_from(PAYLOADS + STATEMENTS + HUGE_NUMBERS).map(
        lambda p: template.replace("{p}", p)
    )


@st.composite
def _templated(draw):
    template = draw(st.sampled_from(TEMPLATES))
    payload = draw(st.sampled_from(PAYLOADS + STATEMENTS + HUGE_NUMBERS))
    return template.replace("{p}", payload), dict(DEFAULT_DECL)


@st.composite
def _mutated(draw):
    """A valid base equation with 1-4 random edits (insert a fragment, delete, duplicate or
    replace a slice)."""
    text, decl = draw(st.sampled_from(BASES))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["insert", "delete", "duplicate", "replace", "insert"]))
        a = draw(st.integers(0, len(text)))
        b = draw(st.integers(a, min(len(text), a + 12)))
        if kind == "insert":
            frag = draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)))
            text = text[:a] + frag + text[a:]
        elif kind == "delete":
            text = text[:a] + text[b:]
        elif kind == "duplicate":
            text = text[:b] + text[a:b] + text[b:]
        else:
            text = text[:a] + draw(st.sampled_from(FRAGMENTS)) + text[b:]
    return text, dict(decl)


ASCII = "".join(chr(c) for c in range(32, 127)) + "\n\t"


def hostile_texts():
    """(text, declarations) pairs of hostile or malformed equation text."""
    fixed = st.sampled_from(
        [p for p in PAYLOADS]
        + STATEMENTS
        + [f"y[n] = x[n] * {h}" for h in HUGE_NUMBERS]
        + UNBALANCED
        + LOOKALIKES
        + MISC
    ).map(lambda t: (t, dict(DEFAULT_DECL)))
    random_ascii = st.text(alphabet=ASCII, max_size=60).map(lambda t: (t, dict(DEFAULT_DECL)))
    random_unicode = st.text(max_size=30).map(lambda t: (t, dict(DEFAULT_DECL)))
    soup = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=25).flatmap(
        lambda toks: st.sampled_from([" ", ""]).map(
            lambda sep: (sep.join(toks), dict(DEFAULT_DECL))
        )
    )
    return st.one_of(fixed, _templated(), _mutated(), random_ascii, random_unicode, soup)


# ---- names that collide with the host language and the generated module ----------------------

MODULE_NAMES = [
    "np",
    "numpy",
    "cache",
    "dout",
    "sizes",
    "dtype",
    "batch_shape",
    "batch",
    "NAME",
    "ARGS",
    "PARAMS",
    "CONSTS",
    "HYPERPARAMETERS",
    "OUTPUTS",
    "INDEX_RANGES",
    "SHAPES",
    "FORMULAS",
    "forward",
    "backward",
    "y",
    "dy",
    "dx",
    "t0",
    "t1",
    "dt0",
    "grad_dx",
    "argmax_y",
    "N",
    "I",
    "array",
    "value",
    "name",
    "shape",
    "self",
]
SYMPY_NAMES = [
    "E",
    "I",
    "S",
    "O",
    "Q",
    "N",
    "pi",
    "oo",
    "zoo",
    "nan",
    "inf",
    "e",
    "Symbol",
    "Integer",
    "Float",
    "Rational",
    "Function",
    "Lambda",
    "Sum",
    "Max",
    "Min",
    "Mean",
    "where",
    "exp",
    "log",
    "sqrt",
    "sigmoid",
    "softplus",
    "relu",
    "step",
    "xlogy",
    "erf",
    "sign",
    "maximum",
    "minimum",
    "stop_gradient",
    "Piecewise",
    "Heaviside",
    "DiracDelta",
    "Derivative",
    "beta",
    "gamma",
    "math",
    "sympy",
    "sp",
]
PY_NAMES = sorted(
    set(keyword.softkwlist)
    | {
        "int",
        "float",
        "range",
        "min",
        "max",
        "len",
        "sum",
        "abs",
        "print",
        "open",
        "exec",
        "eval",
        "tuple",
        "dict",
        "list",
        "object",
        "input",
        "format",
        "vars",
        "iter",
        "next",
        "map",
        "zip",
        "slice",
        "super",
        "id",
        "hash",
        "all",
        "any",
        "bool",
        "str",
        "set",
        "round",
        "pow",
        "isinstance",
        "globals",
        "locals",
        "compile",
        "exit",
        "quit",
        "help",
        "Ellipsis",
        "NotImplemented",
        "__import__",
        "__builtins__",
        "__name__",
        "_",
        "lambda",
        "None",
        "True",
        "class",
        "def",
        "import",
        "from",
    }
    | {n for n in dir(builtins) if not n.startswith("_")}
)

COLLIDING = MODULE_NAMES + SYMPY_NAMES + PY_NAMES


def _collision_case(name, role):
    """(layer name, equation text, declarations) using ``name`` in ``role``."""
    if role == "input":
        return "t", f"y[n] = exp({name}[n]) * {name}[n]", {"inputs": name}
    if role == "param":
        return "t", f"y[n, o] = Sum(x[n, i] * {name}[o, i], i)", {"inputs": "x", "params": name}
    if role == "const":
        return "t", f"y[n] = x[n] ** 2 * {name}[n]", {"inputs": "x", "consts": name}
    if role == "gather":
        return (
            "t",
            f"y[n, d] = w[{name}[n], d] * x[n, d]",
            {"inputs": "x", "params": "w", "consts": name},
        )
    if role == "hyper":  # exp(...) too: a hyperparameter named like a function
        return "t", f"y[n] = exp(x[n]) * x[n] * {name}", {"inputs": "x", "hyper": f"{name}=0.75"}
    if role == "scalar":
        return "t", f"y[n] = x[n] ** 2 * {name}", {"inputs": f"x, {name}"}
    if role == "intermediate":
        return "t", f"{name}[n] = exp(x[n]); y[n] = {name}[n] * x[n]", {"inputs": "x"}
    if role == "output":
        return "t", f"{name}[n] = exp(x[n]) * x[n]", {"inputs": "x"}
    if role == "scalar_output":
        return "t", f"{name} = Sum(x[n] ** 3, n)", {"inputs": "x"}
    if role == "index":
        return "t", f"y[{name}] = exp(x[{name}]) * x[{name}]", {"inputs": "x"}
    if role == "reduce_index":
        return (
            "t",
            f"y[n] = Sum(x[n, {name}] ** 2 * w[{name}], {name})",
            {"inputs": "x", "params": "w"},
        )
    if role == "batch_input":
        return "t", f"y[..., d] = exp({name}[..., d]) * {name}[..., d]", {"inputs": name}
    if role == "batch_intermediate":
        text = f"{name}[..., d] = exp(x[..., d]); y[..., d] = {name}[..., d] * x[..., d]"
        return "t", text, {"inputs": "x"}
    if role == "layer":
        return name, "y[n] = exp(x[n]) * x[n]", {"inputs": "x"}
    raise AssertionError(role)


ROLES = [
    "input",
    "param",
    "const",
    "gather",
    "hyper",
    "scalar",
    "intermediate",
    "output",
    "scalar_output",
    "index",
    "reduce_index",
    "batch_input",
    "batch_intermediate",
    "layer",
]


def colliding_layers():
    """(name, role, layer name, text, declarations) with ``name`` taken from COLLIDING."""
    return st.tuples(st.sampled_from(COLLIDING), st.sampled_from(ROLES)).map(
        lambda nr: (nr[0], nr[1], *_collision_case(*nr))
    )


# ---- random valid layers ---------------------------------------------------------------------

LETTERS = ("n", "i", "j", "k", "o", "p", "q", "r")
INPUT_NAMES = ("x", "u", "v", "s")
PARAM_NAMES = ("w", "b", "g", "f")
CONST_NAMES = ("c", "m", "t")
HYPER_NAMES = ("alpha",)
INTER_NAMES = ("h", "z", "a")
OUTPUT_NAME = "y"
BATCH = "B"  # the dimension id of '...'

#: function: (radius its argument is scaled into, the function on floats or None for sin/cos)
SQUASH = {
    "exp": (2.0, math.exp),
    "tanh": (2.0, math.tanh),
    "sigmoid": (3.0, lambda v: 1 / (1 + math.exp(-v))),
    "softplus": (3.0, lambda v: math.log1p(math.exp(v))),
    "erf": (1.5, math.erf),
    "sin": (3.0, None),
    "cos": (3.0, None),
}
NUMBERS = ("0.5", "2", "0.25", "3", "1.5", "0.1", "pi", "0.75")
BOUND = 50.0  # subexpressions larger than this are scaled down


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple  # dimension ids (ints, or BATCH)
    role: str  # input | param | const | hyper | intermediate
    lo: float = 0.5
    hi: float = 1.5


@dataclasses.dataclass(frozen=True)
class Node:
    """A subexpression: its text, an interval holding all its values, its free index letters
    and the tensors it reads."""

    text: str
    lo: float
    hi: float
    free: frozenset = frozenset()
    used: frozenset = frozenset()

    @property
    def mag(self) -> float:
        return max(abs(self.lo), abs(self.hi))


@dataclasses.dataclass
class RandomLayer:
    """A random valid layer: its text, declarations and the domain of every argument."""

    text: str
    decl: dict
    domains: dict
    style: str

    def __repr__(self) -> str:
        decl = ", ".join(f"{k}={v!r}" for k, v in self.decl.items())
        return f"RandomLayer({self.style}: parse_layer('fz', {self.text!r}, {decl}))"


def _g3(c: float) -> str:
    return f"{c:.3g}"


def _up(v: float) -> str:
    """A short decimal >= v."""
    return f"{math.ceil(v * 100) / 100:.2f}"


def _mul(a, b):
    ps = (a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])
    return min(ps), max(ps)


def _ipow(lo, hi, k):
    if k >= 0 and k % 2 == 0:
        if lo >= 0:
            return lo**k, hi**k
        if hi <= 0:
            return hi**k, lo**k
        return 0.0, max(lo**k, hi**k)
    if k > 0:
        return lo**k, hi**k
    return hi**k, lo**k  # a negative power of a positive base


def _paren(text):
    return f"({text})"


class _Builder:
    """Draws expressions for one layer. ``letters`` is the current equation's registry of index
    letters -> dimension ids: an index name means one dimension throughout its equation."""

    def __init__(self, draw, dims, tensors, reductions: bool):
        self.draw = draw
        self.dims = dims
        self.tensors = list(tensors)  # readable: arguments, hyperparameters, intermediates
        self.reductions = reductions
        self.letters: dict = {}

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def flag(self, p_of_4=1):
        """True with probability p/4 (shrinks towards False)."""
        return self.draw(st.integers(0, 3)) < p_of_4

    # -- letters -------------------------------------------------------------------------
    def fresh(self, scope: dict, d):
        """A letter for dimension ``d`` not visible in ``scope`` (registered for this equation)."""
        if d == BATCH:
            self.letters["..."] = BATCH
            return "..."
        options = [ell for ell in LETTERS if ell not in scope and self.letters.get(ell, d) == d]
        if not options:
            return None
        ell = self.choice(options)
        self.letters[ell] = d
        return ell

    def cover(self, scope: dict, t: Tensor) -> bool:
        """Add letters to ``scope`` until ``t`` can be read in it."""
        need: dict = {}
        for d in t.dims:
            need[d] = need.get(d, 0) + 1
        for d, k in need.items():
            have = sum(1 for dd in scope.values() if dd == d)
            for _ in range(k - have):
                ell = self.fresh(scope, d)
                if ell is None:
                    return False
                scope[ell] = d
        return True

    # -- nodes ---------------------------------------------------------------------------
    def scaled(self, node: Node, radius: float) -> Node:
        """``node`` times a constant, so that it lies in [-radius, radius]."""
        if node.mag <= radius:
            return node
        c = float(_g3(0.99 * radius / node.mag))
        return Node(f"{_g3(c)}*({node.text})", node.lo * c, node.hi * c, node.free, node.used)

    def bounded(self, node: Node) -> Node:
        return self.scaled(node, BOUND) if node.mag > BOUND else node

    def positive(self, node: Node) -> Node:
        """An expression >= 0.13 made from ``node``."""
        if node.lo >= 0.5 and node.hi <= BOUND:
            return node
        kind = self.choice(["exp", "square", "softplus", "sigmoid"])
        if kind == "exp":
            a = self.scaled(node, 2.0)
            return Node(f"exp({a.text})", math.exp(a.lo), math.exp(a.hi), a.free, a.used)
        a = self.scaled(node, 3.0)
        if kind == "square":
            lo, hi = _ipow(a.lo, a.hi, 2)
            return Node(f"(({a.text})**2 + 0.5)", lo + 0.5, hi + 0.5, a.free, a.used)
        f = SQUASH[kind][1]
        return Node(f"({kind}({a.text}) + 0.5)", f(a.lo) + 0.5, f(a.hi) + 0.5, a.free, a.used)

    def number(self) -> Node:
        text = self.choice(NUMBERS)
        v = math.pi if text == "pi" else float(text)
        return Node(text, v, v)

    def possible(self, t: Tensor, scope: dict) -> bool:
        need: dict = {}
        for d in t.dims:
            need[d] = need.get(d, 0) + 1
        return all(sum(1 for dd in scope.values() if dd == d) >= k for d, k in need.items())

    def read(self, t: Tensor, scope: dict, force=()) -> Node | None:
        """``t[letters]``, letters drawn from ``scope``, the ``force`` letters placed first."""
        if not t.dims:
            return Node(t.name, t.lo, t.hi, frozenset(), frozenset({t.name}))
        letters = [None] * len(t.dims)
        for f in force:
            spots = [p for p, d in enumerate(t.dims) if letters[p] is None and d == scope[f]]
            if not spots:
                return None
            letters[spots[0]] = f
        for p, d in enumerate(t.dims):
            if letters[p] is None:
                options = sorted(
                    ell for ell, dd in scope.items() if dd == d and ell not in letters
                )
                if not options:
                    return None
                letters[p] = self.choice(options)
        return Node(
            f"{t.name}[{', '.join(letters)}]", t.lo, t.hi, frozenset(letters), frozenset({t.name})
        )

    def leaf(self, scope) -> Node:
        readable = [t for t in self.tensors if self.possible(t, scope)]
        if readable and not self.flag(1):
            node = self.read(self.choice(readable), scope)
            if node is not None:
                return node
        return self.number()

    def expr(self, scope: dict, depth: int) -> Node:
        if depth <= 0:
            return self.leaf(scope)
        kinds = ["leaf", "unary", "binary", "unary", "binary"] + (
            ["reduce"] if self.reductions else []
        )
        kind = self.choice(kinds)
        if kind == "leaf":
            return self.leaf(scope)
        if kind == "unary":
            return self.unary(self.expr(scope, depth - 1))
        if kind == "binary":
            return self.binary(scope, depth)
        return self.reduction(scope, depth) or self.leaf(scope)

    def unary(self, a: Node) -> Node:
        fn = self.choice(
            [
                "tanh",
                "exp",
                "log",
                "sqrt",
                "sigmoid",
                "softplus",
                "sin",
                "cos",
                "erf",
                "abs",
                "square",
                "cube",
                "neg",
                "recip",
            ]
        )
        if fn in SQUASH:
            radius, f = SQUASH[fn]
            a = self.scaled(a, radius)
            lo, hi = (-1.0, 1.0) if f is None else (f(a.lo), f(a.hi))
            return Node(f"{fn}({a.text})", lo, hi, a.free, a.used)
        if fn in ("log", "sqrt"):
            p = self.positive(a)
            f = math.log if fn == "log" else math.sqrt
            return Node(f"{fn}({p.text})", f(p.lo), f(p.hi), p.free, p.used)
        if fn == "abs":  # always at least 0.2 away from the kink
            if a.lo >= 0.2 or a.hi <= -0.2:
                lo, hi = sorted((abs(a.lo), abs(a.hi)))
                return Node(f"abs({a.text})", lo, hi, a.free, a.used)
            if self.flag(2):  # abs of a negative value
                shift = _up(max(a.hi, 0.0) + 0.25)
                s = float(shift)
                return Node(f"abs({a.text} - {shift})", s - a.hi, s - a.lo, a.free, a.used)
            shift = _up(-a.lo + 0.25)
            s = float(shift)
            return Node(f"abs({a.text} + {shift})", a.lo + s, a.hi + s, a.free, a.used)
        if fn in ("square", "cube"):
            a = self.scaled(a, 3.0)
            k = 2 if fn == "square" else 3
            return Node(f"({a.text})**{k}", *_ipow(a.lo, a.hi, k), a.free, a.used)
        if fn == "neg":
            return Node(f"-({a.text})", -a.hi, -a.lo, a.free, a.used)
        p = self.positive(a)
        k = self.choice([-1, -2])
        return Node(f"({p.text})**{k}", *_ipow(p.lo, p.hi, k), p.free, p.used)

    def binary(self, scope, depth) -> Node:
        op = self.choice(["+", "*", "-", "/", "xlogy", "where", "*"])
        a = self.expr(scope, depth - 1)
        b = self.expr(scope, self.draw(st.integers(0, depth - 1)))
        if a.text == b.text or not (a.used or b.used):
            op = "+"  # no exact cancellation (x - x, x/x) that would drop an argument
        free, used = a.free | b.free, a.used | b.used
        if op == "+":
            node = Node(f"{a.text} + {b.text}", a.lo + b.lo, a.hi + b.hi, free, used)
        elif op == "-":
            node = Node(f"{a.text} - ({b.text})", a.lo - b.hi, a.hi - b.lo, free, used)
        elif op == "*":
            node = Node(f"({a.text})*({b.text})", *_mul((a.lo, a.hi), (b.lo, b.hi)), free, used)
        elif op == "/":
            p = self.positive(b)
            node = Node(
                f"({a.text})/({p.text})", *_mul((a.lo, a.hi), (1 / p.hi, 1 / p.lo)), free, used
            )
        elif op == "xlogy":
            p = self.positive(b)
            node = Node(
                f"xlogy({a.text}, {p.text})",
                *_mul((a.lo, a.hi), (math.log(p.lo), math.log(p.hi))),
                free,
                used,
            )
        else:  # a condition on a constant: smooth in every differentiable argument
            consts = [t for t in self.tensors if t.role == "const" and self.possible(t, scope)]
            c = self.read(self.choice(consts), scope) if consts else None
            if c is None:
                node = Node(f"{a.text} + {b.text}", a.lo + b.lo, a.hi + b.hi, free, used)
            else:
                node = Node(
                    f"where({c.text} > 1.0, {a.text}, {b.text})",
                    min(a.lo, b.lo),
                    max(a.hi, b.hi),
                    free | c.free,
                    used | c.used,
                )
        return self.bounded(node)

    def reduction(self, scope: dict, depth: int, top=False) -> Node | None:
        """Sum/Mean/Max over 1-2 new letters that a forced occurrence in the body reads."""
        carriers = [t for t in self.tensors if any(d != BATCH for d in t.dims)]
        if not carriers:
            return None
        t = self.choice(carriers)
        inner = dict(scope)
        new = []
        for d in t.dims:
            reuse = [ell for ell, dd in inner.items() if dd == d and ell not in new]
            if d == BATCH:
                if not reuse:
                    return None  # '...' is never reduced here
                continue
            if not reuse or not new or self.flag(2):
                ell = self.fresh(inner, d)
                if ell is None:
                    return None
                inner[ell] = d
                new.append(ell)
        core = self.read(t, inner, force=new) if new else None
        if core is None:
            return None
        body = core
        for _ in range(self.draw(st.integers(0, 2 if top else 1))):
            f = self.expr(inner, max(0, depth - 1))
            if self.flag(3):
                body = Node(
                    f"{body.text}*{_paren(f.text)}",
                    *_mul((body.lo, body.hi), (f.lo, f.hi)),
                    body.free | f.free,
                    body.used | f.used,
                )
            else:
                body = Node(
                    f"{body.text} + {_paren(f.text)}",
                    body.lo + f.lo,
                    body.hi + f.hi,
                    body.free | f.free,
                    body.used | f.used,
                )
        if self.flag(1):
            body = self.unary(body)
        op = self.choice(["Sum", "Sum", "Mean", "Max"])
        idx = new[0] if len(new) == 1 else "(" + ", ".join(new) + ")"
        lo, hi = body.lo, body.hi
        if op == "Sum":
            s = 4.0 ** len(new)  # dimensions have at most 4 elements
            lo, hi = min(lo, lo * s), max(hi, hi * s)
        node = Node(f"{op}({body.text}, {idx})", lo, hi, body.free - set(new), body.used)
        return self.bounded(node)


@st.composite
def random_layers(draw, style="mixed"):
    """A random valid layer. ``style``: "elementwise" (one equation, broadcasting, no
    reductions), "contraction" (one equation whose top is a Sum/Mean/Max of a product, often
    with a bias), "chain" (2-3 equations, each reading the one before), "mixed" (1-3
    equations, reductions anywhere)."""
    dims = list(range(draw(st.integers(1, 3))))
    if draw(st.integers(0, 6)) == 0:
        dims[0] = BATCH

    def tensor_dims(max_rank):
        out = []
        for _ in range(draw(st.integers(0, max_rank))):
            d = draw(st.sampled_from(dims))
            if d == BATCH and BATCH in out:
                continue
            if d in out and draw(st.integers(0, 3)) != 0:
                continue  # a repeated dimension (a square tensor) now and then
            out.append(d)
        return tuple(out)

    args = [Tensor("x", tensor_dims(3) or (dims[0],), "input")]
    pools = {
        "input": list(INPUT_NAMES[1:]),
        "param": list(PARAM_NAMES),
        "const": list(CONST_NAMES),
    }
    for _ in range(draw(st.integers(0, 3))):
        role = draw(st.sampled_from(["param", "input", "param", "const"]))
        args.append(Tensor(pools[role].pop(0), tensor_dims(2), role))
    hypers = []
    if draw(st.integers(0, 3)) == 0:
        value = draw(st.sampled_from([0.5, 1.25, 0.8]))
        hypers.append(Tensor(HYPER_NAMES[0], (), "hyper", value, value))

    if style in ("elementwise", "contraction"):
        n_eq = 1
    else:
        n_eq = draw(st.integers(2 if style == "chain" else 1, 3))
    b = _Builder(draw, dims, args + hypers, reductions=style != "elementwise")
    equations, intermediates, used = [], [], set()
    reuse_param = draw(st.integers(0, 2)) == 0
    for e in range(n_eq):
        last = e == n_eq - 1
        name = OUTPUT_NAME if last else INTER_NAMES[e]
        b.letters = {}
        scope: dict = {}
        forced = intermediates[-1] if intermediates else args[0]
        b.cover(scope, forced)
        for _ in range(draw(st.integers(0, 2))):
            ell = b.fresh(scope, draw(st.sampled_from(dims)))
            if ell is not None:
                scope[ell] = b.letters[ell]
        depth = draw(st.integers(1, 3))
        top_reduction = style == "contraction" or (style != "elementwise" and b.flag(1))
        rhs = (b.reduction(scope, depth, top=True) if top_reduction else None) or b.expr(
            scope, depth
        )
        must = [] if forced.name in rhs.used else [forced]
        if last:
            must += [a for a in args if a.name not in used | rhs.used and a is not forced]
            again = [a for a in args if a.role == "param" and a.name in used | rhs.used]
            if reuse_param and again:
                must.append(again[0])  # a parameter read twice
        for t in must:
            if not b.cover(scope, t):
                continue
            node = b.read(t, scope)
            if node is None:
                continue
            if draw(st.booleans()):
                rhs = Node(
                    f"{rhs.text} + {node.text}",
                    rhs.lo + node.lo,
                    rhs.hi + node.hi,
                    rhs.free | node.free,
                    rhs.used | node.used,
                )
            else:
                rhs = Node(
                    f"({rhs.text})*{node.text}",
                    *_mul((rhs.lo, rhs.hi), (node.lo, node.hi)),
                    rhs.free | node.free,
                    rhs.used | node.used,
                )
            rhs = b.bounded(rhs)
        used |= rhs.used
        frame = sorted(rhs.free)
        order = list(draw(st.permutations(frame))) if frame else []
        lhs = f"{name}[{', '.join(order)}]" if order else name
        equations.append(f"{lhs} = {rhs.text}")
        t = Tensor(
            name,
            tuple(b.letters.get(ell, scope.get(ell)) for ell in order),
            "intermediate",
            rhs.lo,
            rhs.hi,
        )
        intermediates.append(t)
        b.tensors.append(t)

    declared = [a for a in args if a.name in used]
    hypers = [h for h in hypers if h.name in used]
    decl = {
        "inputs": ", ".join(a.name for a in declared if a.role == "input"),
        "params": ", ".join(a.name for a in declared if a.role == "param"),
        "consts": ", ".join(a.name for a in declared if a.role == "const"),
        "hyper": ", ".join(f"{h.name}={h.lo!r}" for h in hypers),
    }
    if n_eq > 1 and draw(st.integers(0, 4)) == 0:
        decl["outputs"] = f"{intermediates[0].name}, {OUTPUT_NAME}"
    decl = {k: v for k, v in decl.items() if v}
    sep = draw(st.sampled_from(["; ", "\n"]))
    return RandomLayer(sep.join(equations), decl, {a.name: (0.5, 1.5) for a in declared}, style)
