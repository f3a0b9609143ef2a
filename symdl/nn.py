"""Train models with nothing but generated modules: a thin runtime over ``generated/``.

This module never differentiates anything. It loads generated modules, holds their parameters,
records which module ran on which arrays, and calls each module's own ``backward`` in reverse
order. Every gradient comes from a generated module; the only "gradients" written here are those
of glue (a reshape's backward is a reshape, a stack's is a split).

    from symdl import nn

    class MLP(nn.Model):
        def __init__(self, rng):
            self.fc1 = nn.Linear(64, 128, rng=rng)
            self.act = nn.Layer("relu")
            self.fc2 = nn.Linear(128, 10, rng=rng)
            self.loss = nn.Layer("cross_entropy")

        def forward(self, x, target):
            return self.loss(self.fc2(self.act(self.fc1(x))), target=target)

    model = MLP(np.random.default_rng(0))
    opt = nn.Optimizer("adam", model, lr=1e-3)
    loss = model(x, y)          # runs the modules' forward, records them on a tape
    opt.zero_grad()
    model.backward()            # runs the recorded modules' backward in reverse
    opt.step()                  # adam.step_inplace on every parameter

The pieces:

* :func:`load` imports ``NAME.py`` from a directory of generated modules by path (no install,
  no ``sys.path``): the ``generated/`` folder next to this package, or ``$SYMDL_GENERATED``, or
  ``./generated``, or a directory or file you name.
* :class:`Layer` holds the parameters (``PARAMS``) of one generated module plus fixed keywords
  (``stride=2``, ``kernel_size=2``); calling it runs the module's ``forward`` and, while a
  :class:`Tape` is active, records the call. ``layer.forward`` / ``layer.backward`` follow the
  module contract for hand-written loops. :class:`Linear`, :class:`Conv2d`, :class:`LSTMCell`,
  ... are layers with PyTorch's default initialisation.
* :class:`Model` is a base class: write ``forward`` by calling layers, losses and the glue
  functions :func:`reshape`, :func:`flatten`, :func:`stack`, :func:`add`; ``model(*inputs)``
  records a tape and ``model.backward()`` plays it back. :class:`Sequential` is a model that
  calls a list of layers in turn.
* :class:`Optimizer` applies a generated optimizer module's ``step_inplace`` to every parameter,
  with per-parameter state.
* :func:`check_gradients` compares a whole model's backward with central differences, in float64.

An array made outside the tape (by plain NumPy between layer calls) is a constant to the tape:
its gradient is not propagated. Route such steps through the glue functions, or record your own
with :func:`record`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from .registry import GENERATED, entries
from .testing import GradcheckResult

__all__ = [
    "LSTM",
    "BatchNorm",
    "Conv1d",
    "Conv2d",
    "Embedding",
    "GRUCell",
    "LSTMCell",
    "Layer",
    "LayerNorm",
    "Linear",
    "Model",
    "Optimizer",
    "Parameter",
    "RMSNorm",
    "RNNCell",
    "Sequential",
    "Tape",
    "add",
    "check_gradients",
    "flatten",
    "generated_directories",
    "load",
    "record",
    "reshape",
    "stack",
]

# ---- loading generated modules ----------------------------------------------------------------

#: The repository's ``generated/`` folder, next to the ``symdl`` package (an editable install or
#: a checkout), where the catalogue's modules are kept (symdl.registry.GENERATED); absent when
#: symdl is installed from a wheel.
PACKAGE_GENERATED = GENERATED

_LOADED: dict[Path, ModuleType] = {}


def generated_directories() -> list[Path]:
    """Where :func:`load` looks for ``NAME.py`` when no directory is given, in order:
    ``$SYMDL_GENERATED``, the ``generated/`` folder next to the package, ``./generated``."""
    out = []
    if os.environ.get("SYMDL_GENERATED"):
        out.append(Path(os.environ["SYMDL_GENERATED"]))
    out += [PACKAGE_GENERATED, Path.cwd() / "generated"]
    return out


def load(name: str | os.PathLike | ModuleType, directory: str | os.PathLike | None = None):
    """The generated module ``name``, imported from ``directory/NAME.py`` by path.

    ``name`` may also be the path of a ``.py`` file, or an already imported module (returned
    as is). Without ``directory`` the folders of :func:`generated_directories` are searched.
    A file is imported once per process; later calls return the same module object.
    """
    if isinstance(name, ModuleType):
        return name
    text = os.fspath(name)
    if text.endswith(".py") or os.sep in text or "/" in text:
        candidates = [Path(text)]
        stem = Path(text).stem
    else:
        if not text.isidentifier():
            raise ValueError(f"load requires a module name or a .py path, got {text!r}")
        folders = [Path(directory)] if directory is not None else generated_directories()
        candidates = [folder / f"{text}.py" for folder in folders]
        stem = text
    for path in candidates:
        if path.is_file():
            key = path.resolve()
            if key not in _LOADED:
                spec = importlib.util.spec_from_file_location(f"symdl_generated_{stem}", key)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _LOADED[key] = module
            return _LOADED[key]
    looked = ", ".join(str(p) for p in candidates)
    if stem in entries():
        how = f"`symdl generate {stem} -o DIR`"
    else:
        how = f"`symdl derive {stem} EQUATIONS ... -o DIR` ({stem!r} is not in `symdl list`)"
    raise FileNotFoundError(
        f"no generated module {stem!r} (looked for {looked}); write it with {how} and pass "
        f"directory=DIR"
    )


# ---- the tape ---------------------------------------------------------------------------------

_TAPES: list[Tape] = []


@dataclasses.dataclass
class _Record:
    inputs: tuple  # the arrays the call read (gradients flow back to these)
    outputs: tuple  # the arrays it returned
    several: bool  # whether the call returned a tuple (so backward takes a tuple)
    backward: Callable  # dout -> one gradient (or None) per input


class Tape:
    """A list of the module calls made while it is active (``with Tape() as tape: ...``).

    Each record holds the input and output arrays of one call and a function from the
    gradient of its outputs to the gradients of its inputs (the module's own ``backward`` with
    the call's cache). Arrays are matched by identity: an output array passed on unchanged to
    a later call connects the two.
    """

    def __init__(self):
        self.records: list[_Record] = []
        self.used = False

    def __enter__(self):
        _TAPES.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _TAPES.remove(self)

    def record(self, inputs: Sequence, outputs, backward: Callable) -> None:
        several = isinstance(outputs, tuple)
        outs = outputs if several else (outputs,)
        self.records.append(_Record(tuple(inputs), outs, several, backward))

    def backward(self, output, dout=None, wrt: Sequence = ()) -> tuple:
        """Play the records back in reverse from ``output`` (an array or tuple the tape
        produced), seeded with ``dout`` (default 1 for a 0-d output). Parameter gradients are
        accumulated into the layers; the return value holds the gradient of each array in
        ``wrt`` (zeros when no recorded path reaches it; None for an integer array)."""
        if self.used:
            raise RuntimeError("backward requires a fresh tape: this tape was played back already")
        self.used = True
        outs = output if isinstance(output, tuple) else (output,)
        if dout is None:
            if any(np.ndim(o) != 0 for o in outs):
                shapes = ", ".join(str(np.shape(o)) for o in outs)
                raise ValueError(f"backward requires dout for a non-scalar output, got {shapes}")
            douts = tuple(np.ones((), np.asarray(o).dtype) for o in outs)
        else:
            douts = dout if isinstance(output, tuple) else (dout,)
        adjoint: dict[int, np.ndarray] = {}
        for o, d in zip(outs, douts):
            _accumulate(adjoint, o, np.asarray(d))
        for rec in reversed(self.records):
            ds = [adjoint.get(id(o)) for o in rec.outputs]
            if all(d is None for d in ds):
                continue  # nothing downstream of this call reaches the output
            ds = [np.zeros_like(o) if d is None else d for o, d in zip(rec.outputs, ds)]
            grads = rec.backward(tuple(ds) if rec.several else ds[0])
            for x, g in zip(rec.inputs, grads):
                if g is not None:
                    _accumulate(adjoint, x, g)
        result = tuple(_gradient_of(adjoint, x) for x in wrt)
        self.records = []  # release the caches
        return result


def _accumulate(adjoint: dict, x, g) -> None:
    key = id(x)
    adjoint[key] = g if key not in adjoint else adjoint[key] + g


def _gradient_of(adjoint: dict, x):
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        return None
    return adjoint.get(id(x), np.zeros_like(x))


def record(inputs: Sequence, outputs, backward: Callable) -> None:
    """Record one call on the active tape (if any): ``backward(dout)`` must return one gradient
    (or None) per entry of ``inputs``; ``dout`` is a tuple when ``outputs`` is."""
    if _TAPES:
        _TAPES[-1].record(inputs, outputs, backward)


# ---- glue: shape changes, whose backward is the inverse shape change --------------------------


def reshape(x: np.ndarray, shape) -> np.ndarray:
    """``x.reshape(shape)``, recorded; its backward reshapes the gradient back."""
    y = np.reshape(x, shape)
    record((x,), y, lambda dy: (np.reshape(dy, np.shape(x)),))
    return y


def flatten(x: np.ndarray, start: int = 1) -> np.ndarray:
    """Merge the axes from ``start`` on into one (``(N, C, H, W) -> (N, C*H*W)``), recorded."""
    return reshape(x, np.shape(x)[:start] + (-1,))


def stack(arrays: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
    """``np.stack(arrays, axis)``, recorded; its backward splits the gradient."""
    arrays = tuple(arrays)
    y = np.stack(arrays, axis)
    record(arrays, y, lambda dy: tuple(np.moveaxis(dy, axis, 0)))
    return y


def add(*arrays: np.ndarray) -> np.ndarray:
    """The sum of arrays of one shape (e.g. a loss and a penalty), recorded."""
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"add requires arrays of one shape, got {sorted(shapes)}")
    y = arrays[0]
    for a in arrays[1:]:
        y = y + a
    y = np.array(y)  # a fresh array even for one argument, so the tape can tell them apart
    record(arrays, y, lambda dy: (dy,) * len(arrays))
    return y


# ---- layers -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Parameter:
    """One trainable array and its gradient buffer (both updated in place)."""

    name: str
    value: np.ndarray
    grad: np.ndarray


class Layer:
    """A generated module with its parameters.

    ``Layer("relu")``, ``Layer("max_pool2d", kernel_size=2)``,
    ``Layer("linear", {"weight": w, "bias": b})``. Keywords given here (constants,
    hyperparameters) are passed on every call; more can be given per call
    (``loss(logits, target=y)``). The module's non-parameter ``ARGS`` are the layer's inputs.

    ``layer(*inputs)`` returns the module's output and records the call on the active tape.
    ``layer.forward(*inputs)`` returns ``(out, cache)`` and ``layer.backward(dout, cache)``
    the gradients of the inputs, adding the parameter gradients into ``layer.grads``.
    Parameters are attributes too: ``layer.weight``.
    """

    def __init__(self, module, params: dict | None = None, *, directory=None, **keywords):
        self.module = load(module, directory)
        args, names = tuple(self.module.ARGS), tuple(self.module.PARAMS)
        name = self.module.NAME
        params = dict(params or {})
        if set(params) != set(names):
            raise ValueError(
                f"{name}: Layer requires the parameters ({', '.join(names)}), got "
                f"({', '.join(params)})"
            )
        allowed = set(self.module.CONSTS) | set(self.module.HYPERPARAMETERS)
        unknown = sorted(set(keywords) - allowed)
        if unknown:
            raise TypeError(
                f"{name}: unknown keyword {', '.join(unknown)}; the module takes "
                f"{', '.join(sorted(allowed)) or 'none'}"
            )
        self.inputs = tuple(a for a in args if a not in names)
        self.values = {n: np.array(params[n]) for n in names}
        self.grads = {n: np.zeros_like(v) for n, v in self.values.items()}
        self.keywords = keywords

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        parts = [f"{n}={v.shape}" for n, v in self.values.items()]
        parts += [f"{k}={v!r}" for k, v in self.keywords.items()]
        return f"{type(self).__name__}({', '.join([repr(self.module.NAME), *parts])})"

    def parameters(self, prefix: str = "") -> list[Parameter]:
        return [Parameter(prefix + n, v, self.grads[n]) for n, v in self.values.items()]

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g[...] = 0

    def forward(self, *inputs, **keywords):
        """The module's ``forward(*ARGS, **keywords) -> (out, cache)``, parameters filled in."""
        if len(inputs) != len(self.inputs):
            raise TypeError(
                f"{self.module.NAME}: the layer takes {len(self.inputs)} input(s) "
                f"({', '.join(self.inputs)}), got {len(inputs)}"
            )
        values = dict(zip(self.inputs, inputs), **self.values)
        args = [values[a] for a in self.module.ARGS]
        return self.module.forward(*args, **{**self.keywords, **keywords})

    def backward(self, dout, cache) -> tuple:
        """The module's backward: add the parameter gradients into ``grads``, return the
        gradients of the inputs."""
        grads = self.module.backward(dout, cache)
        out = []
        for name, g in zip(self.module.ARGS, grads):
            if name in self.grads:
                self.grads[name] += g
            else:
                out.append(g)
        return tuple(out)

    def __call__(self, *inputs, **keywords):
        out, cache = self.forward(*inputs, **keywords)
        record(inputs, out, lambda dout: self.backward(dout, cache))
        return out


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _uniform(rng, bound: float, shape, dtype) -> np.ndarray:
    return _rng(rng).uniform(-bound, bound, size=shape).astype(dtype)


def _kaiming_uniform(rng, shape, fan_in: int, dtype) -> np.ndarray:
    """PyTorch's default weight initialisation, ``kaiming_uniform_(w, a=sqrt(5))``: the bound
    gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + a^2)), which is 1 / sqrt(fan_in)."""
    gain = math.sqrt(2.0 / (1.0 + 5.0))
    return _uniform(rng, gain * math.sqrt(3.0 / fan_in), shape, dtype)


class Linear(Layer):
    """``generated/linear.py`` with ``nn.Linear``'s initialisation: weight (out, in)
    kaiming-uniform, bias uniform(+-1/sqrt(in))."""

    def __init__(self, in_features, out_features, *, rng=None, dtype=np.float64, directory=None):
        rng = _rng(rng)
        weight = _kaiming_uniform(rng, (out_features, in_features), in_features, dtype)
        bias = _uniform(rng, 1 / math.sqrt(in_features), (out_features,), dtype)
        super().__init__("linear", {"weight": weight, "bias": bias}, directory=directory)


class _Conv(Layer):
    """A convolution with PyTorch's initialisation; ``stride``, ``padding`` and ``dilation``
    are passed on to the module."""

    def __init__(self, module, channels, out_channels, kernel, rng, dtype, directory, hyper):
        rng = _rng(rng)
        fan_in = channels * math.prod(kernel)
        weight = _kaiming_uniform(rng, (out_channels, channels, *kernel), fan_in, dtype)
        bias = _uniform(rng, 1 / math.sqrt(fan_in), (out_channels,), dtype)
        super().__init__(module, {"weight": weight, "bias": bias}, directory=directory, **hyper)


class Conv1d(_Conv):
    """``generated/conv1d.py`` with ``nn.Conv1d``'s initialisation."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        rng=None,
        dtype=np.float64,
        directory=None,
    ):
        hyper = {"stride": stride, "padding": padding, "dilation": dilation}
        kernel = (kernel_size,)
        super().__init__("conv1d", in_channels, out_channels, kernel, rng, dtype, directory, hyper)


class Conv2d(_Conv):
    """``generated/conv2d.py`` with ``nn.Conv2d``'s initialisation (a square kernel)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        rng=None,
        dtype=np.float64,
        directory=None,
    ):
        hyper = {"stride": stride, "padding": padding, "dilation": dilation}
        kernel = (kernel_size,) * 2
        super().__init__("conv2d", in_channels, out_channels, kernel, rng, dtype, directory, hyper)


class _Recurrent(Layer):
    """A recurrent module with PyTorch's initialisation: every weight and bias
    uniform(+-1/sqrt(hidden_size)), ``gates`` blocks of rows stacked in PyTorch's order."""

    module_name = ""
    gates = 1

    def __init__(self, input_size, hidden_size, *, rng=None, dtype=np.float64, directory=None):
        rng = _rng(rng)
        rows, bound = self.gates * hidden_size, 1 / math.sqrt(hidden_size)
        params = {
            "weight_ih": _uniform(rng, bound, (rows, input_size), dtype),
            "weight_hh": _uniform(rng, bound, (rows, hidden_size), dtype),
            "bias_ih": _uniform(rng, bound, (rows,), dtype),
            "bias_hh": _uniform(rng, bound, (rows,), dtype),
        }
        super().__init__(self.module_name, params, directory=directory)


class RNNCell(_Recurrent):
    """``generated/rnn_cell.py``: ``cell(x, h) -> h1``."""

    module_name, gates = "rnn_cell", 1


class GRUCell(_Recurrent):
    """``generated/gru_cell.py``: ``cell(x, h) -> h1``."""

    module_name, gates = "gru_cell", 3


class LSTMCell(_Recurrent):
    """``generated/lstm_cell.py``: ``cell(x, h, c) -> (h1, c1)``."""

    module_name, gates = "lstm_cell", 4


class LSTM(_Recurrent):
    """``generated/lstm.py`` (a whole sequence): ``lstm(x (T, B, I), h0, c0) -> (y, h_T, c_T)``."""

    module_name, gates = "lstm", 4


class Embedding(Layer):
    """``generated/embedding.py`` with ``nn.Embedding``'s initialisation, N(0, 1):
    ``emb(indices=tokens) -> vectors``."""

    def __init__(self, num_embeddings, dim, *, rng=None, dtype=np.float64, directory=None):
        weight = _rng(rng).standard_normal((num_embeddings, dim)).astype(dtype)
        super().__init__("embedding", {"weight": weight}, directory=directory)


class _Norm(Layer):
    module_name = ""
    affine = ("weight", "bias")

    def __init__(self, size, *, eps=None, dtype=np.float64, directory=None):
        params = {"weight": np.ones(size, dtype), "bias": np.zeros(size, dtype)}
        params = {n: params[n] for n in self.affine}
        kw = {} if eps is None else {"eps": eps}
        super().__init__(self.module_name, params, directory=directory, **kw)


class LayerNorm(_Norm):
    """``generated/layer_norm.py`` over the last axis: weight ones, bias zeros."""

    module_name = "layer_norm"


class BatchNorm(_Norm):
    """``generated/batch_norm.py`` (training mode, batch statistics): weight ones, bias zeros."""

    module_name = "batch_norm"


class RMSNorm(_Norm):
    """``generated/rms_norm.py`` over the last axis: weight ones."""

    module_name, affine = "rms_norm", ("weight",)


# ---- models -----------------------------------------------------------------------------------


class Model:
    """Base class of a model written as plain Python: assign layers (and sub-models) as
    attributes, write ``forward(*inputs)`` by calling them.

    ``model(*inputs)`` runs ``forward`` under a fresh :class:`Tape` and returns its output;
    ``model.backward(dout=None)`` plays the tape back (seeded with 1 for a scalar loss),
    accumulating every parameter's gradient, and returns the gradients of the inputs. A model
    called inside another model's forward records onto the outer tape instead.
    """

    _tape = None

    def forward(self, *inputs, **keywords):
        raise NotImplementedError(f"{type(self).__name__} requires a forward method")

    def __call__(self, *inputs, **keywords):
        if _TAPES:
            return self.forward(*inputs, **keywords)
        with Tape() as tape:
            out = self.forward(*inputs, **keywords)
        self._tape, self._inputs, self._output = tape, inputs, out
        return out

    def backward(self, dout=None) -> tuple:
        if self._tape is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward requires a call first: model(*inputs)"
            )
        tape, inputs, output = self._tape, self._inputs, self._output
        self._tape = self._inputs = self._output = None
        return tape.backward(output, dout, wrt=inputs)

    def children(self) -> list[tuple[str, Layer | Model]]:
        """The layers and models held in attributes (or in lists, tuples and dicts of them),
        with their attribute paths, in assignment order."""
        out = []

        def visit(name, value):
            if isinstance(value, (Layer, Model)):
                out.append((name, value))
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    visit(f"{name}.{i}", v)
            elif isinstance(value, dict):
                for k, v in value.items():
                    visit(f"{name}.{k}", v)

        for name, value in vars(self).items():
            if not name.startswith("_"):
                visit(name, value)
        return out

    def layers(self) -> list[Layer]:
        """Every layer of the model and its sub-models, each once."""
        seen, out = set(), []
        for _, child in self.children():
            for layer in [child] if isinstance(child, Layer) else child.layers():
                if id(layer) not in seen:
                    seen.add(id(layer))
                    out.append(layer)
        return out

    def parameters(self, prefix: str = "") -> list[Parameter]:
        """Every parameter, named by attribute path (``fc1.weight``); a shared layer once."""
        seen, out = set(), []
        for name, child in self.children():
            for p in child.parameters(f"{prefix}{name}."):
                if id(p.value) not in seen:
                    seen.add(id(p.value))
                    out.append(p)
        return out

    def zero_grad(self) -> None:
        for layer in self.layers():
            layer.zero_grad()


class Sequential(Model):
    """Call each layer on the previous one's output (a layer here is a :class:`Layer`, a
    :class:`Model` or a glue function such as :func:`flatten`); backward runs in reverse."""

    def __init__(self, *layers):
        self.sequence = list(layers)

    def forward(self, x, **keywords):
        *body, last = self.sequence
        for layer in body:
            x = layer(x)
        return last(x, **keywords)  # keywords (a loss's target) go to the last layer

    def children(self):
        return [(str(i), v) for i, v in enumerate(self.sequence) if isinstance(v, (Layer, Model))]


class _Single(Model):
    def __init__(self, layer):
        self.layer = layer

    def forward(self, *inputs, **keywords):
        return self.layer(*inputs, **keywords)


# ---- optimizers -------------------------------------------------------------------------------


class Optimizer:
    """A generated optimizer module applied to every parameter, with per-parameter state:
    ``Optimizer("adam", model, lr=1e-3)``; ``step()`` calls ``step_inplace`` on each.
    ``parameters`` is a model, a layer or a list of :class:`Parameter`. The dict
    ``hyperparameters`` may be changed between steps (a learning-rate schedule)."""

    def __init__(self, module, parameters, *, directory=None, **hyperparameters):
        self.module = load(module, directory)
        name, defaults = self.module.NAME, self.module.HYPERPARAMETERS
        unknown = sorted(set(hyperparameters) - set(defaults))
        if unknown:
            raise TypeError(
                f"{name}: unknown hyperparameter {', '.join(unknown)}; the module takes "
                f"{', '.join(defaults)}"
            )
        missing = [h for h, v in defaults.items() if v is None and h not in hyperparameters]
        if missing:
            raise TypeError(f"{name}: Optimizer requires {', '.join(missing)}")
        if isinstance(parameters, (Model, Layer)):
            parameters = parameters.parameters()
        self.parameters = list(parameters)
        self.hyperparameters = hyperparameters
        self.state = [tuple(self.module.init_state(p.value)) for p in self.parameters]

    def step(self) -> None:
        for k, p in enumerate(self.parameters):
            state = self.module.step_inplace(
                p.value, p.grad, *self.state[k], **self.hyperparameters
            )
            self.state[k] = tuple(state)

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad[...] = 0


# ---- checking a whole model -------------------------------------------------------------------


def check_gradients(
    model: Model | Layer,
    inputs: Iterable,
    keywords: dict | None = None,
    *,
    eps: float = 1e-6,
    tol: float = 1e-6,
    directions: int = 2,
    rng=None,
) -> GradcheckResult:
    """Central-difference check of a composed model's backward, in float64.

    Runs ``model(*inputs, **keywords)``, plays back ``<v, out>`` for a random ``v``, and for
    each parameter and each floating-point input compares ``<u, gradient>`` with
    ``(<v, out(x + eps u)> - <v, out(x - eps u)>) / (2 eps)`` along ``directions`` random
    ``u``. Parameters are cast to float64 for the check and restored (with their gradients)
    afterwards. The model must be deterministic (fixed dropout masks).
    """
    name = model.module.NAME if isinstance(model, Layer) else type(model).__name__
    if isinstance(model, Layer):
        model = _Single(model)
    rng = _rng(0 if rng is None else rng)
    keywords = dict(keywords or {})
    xs = [
        np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating) else x
        for x in inputs
    ]
    layers = model.layers()
    saved = [(layer.values, layer.grads) for layer in layers]
    problems: list[str] = []
    errors: dict[str, float] = {}
    try:
        for layer in layers:
            layer.values = {n: v.astype(np.float64) for n, v in layer.values.items()}
            layer.grads = {n: np.zeros_like(v) for n, v in layer.values.items()}
        out = model(*xs, **keywords)
        outs = out if isinstance(out, tuple) else (out,)
        if not all(np.all(np.isfinite(o)) for o in outs):
            problems.append("forward: an output is not finite")
        vs = tuple(rng.standard_normal(np.shape(o)) for o in outs)
        input_grads = model.backward(vs if isinstance(out, tuple) else vs[0])

        def objective():
            o = model(*xs, **keywords)
            o = o if isinstance(o, tuple) else (o,)
            return sum(float(np.sum(v * oi)) for v, oi in zip(vs, o))

        def check(array, grad):
            worst, base = 0.0, array.copy()
            for _ in range(directions):
                u = rng.standard_normal(array.shape)
                array[...] = base + eps * u
                plus = objective()
                array[...] = base - eps * u
                minus = objective()
                array[...] = base
                numeric, analytic = (plus - minus) / (2 * eps), float(np.sum(u * grad))
                scale = max(abs(numeric), abs(analytic), 1e-8)
                worst = max(worst, abs(numeric - analytic) / scale)
            return worst

        for p in model.parameters():
            errors[p.name] = check(p.value, p.grad.copy())
        for k, (x, g) in enumerate(zip(xs, input_grads)):
            if g is not None:
                xs[k] = x.copy()  # perturb a copy, never the caller's array
                errors[f"input {k}"] = check(xs[k], g)
    finally:
        for layer, (values, grads) in zip(layers, saved):
            layer.values, layer.grads = values, grads
    return GradcheckResult(name, errors, tol, problems)
