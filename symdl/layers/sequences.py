"""Sequence layers: the recurrent cells scanned over time, as PyTorch's ``nn.RNN``, ``nn.GRU``
and ``nn.LSTM`` (one layer, unidirectional, time-major ``x`` of shape (T, B, I); the weights
``weight_ih_l0``, ... map one to one to ``weight_ih``, ...).

Declarations only: which cell, which of its inputs are read per time step, which are carried
state (and which cell output feeds each at the next step), and which cell outputs are stacked
over time. Everything else, gradients included, comes from :mod:`symdl.scan`.
"""

from __future__ import annotations

from ..errors import unknown_name
from ..scan import Sequence, scan_layer, sequence_source
from .recurrent import LAYERS as _CELLS

SOURCE = "symdl/layers/sequences.py"

_cell = {layer.name: layer for layer in _CELLS}

SEQUENCES = [
    scan_layer(
        _cell["rnn_cell"],
        "rnn",
        per_step="x",
        state={"h": "h1"},
        outputs={"y": "h1"},
        doc="Elman RNN over time (nn.RNN, tanh): y[t] = h_t; returns (y, h_T)",
    ),
    scan_layer(
        _cell["gru_cell"],
        "gru",
        per_step="x",
        state={"h": "h1"},
        outputs={"y": "h1"},
        doc="GRU over time (nn.GRU, gates r, z, n): y[t] = h_t; returns (y, h_T)",
    ),
    scan_layer(
        _cell["lstm_cell"],
        "lstm",
        per_step="x",
        state={"h": "h1", "c": "c1"},
        outputs={"y": "h1"},
        doc="LSTM over time (nn.LSTM, gates i, f, g, o): y[t] = h_t; returns (y, h_T, c_T)",
    ),
]


def catalogue() -> dict[str, Sequence]:
    """Every built-in sequence layer by name."""
    return {seq.name: seq for seq in SEQUENCES}


def get(name: str) -> Sequence:
    seqs = catalogue()
    if name not in seqs:
        raise unknown_name("sequence", name, seqs)
    return seqs[name]


def render(name: str, command: str | None = None) -> str:
    """The module text of generated/NAME.py (nothing is written)."""
    return sequence_source(get(name), SOURCE, command or f"symdl generate {name}")
