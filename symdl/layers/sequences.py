"""Sequence layers: the recurrent cells scanned over time, as PyTorch's ``nn.RNN``, ``nn.GRU``
and ``nn.LSTM`` (one layer, unidirectional, time-major ``x`` of shape (T, B, I); the weights
``weight_ih_l0``, ... map one to one to ``weight_ih``, ...).

Declarations only: which cell (a catalogue layer, by name), which of its inputs are read per
time step, which are carried state (and which cell output feeds each at the next step), and
which cell outputs are stacked over time; the keywords of :func:`symdl.scan.scan_layer`.
Everything else, gradients included, comes from :mod:`symdl.scan` (symdl/registry.py builds
the sequences from these declarations).
"""

SEQUENCES = [
    {
        "cell": "rnn_cell",
        "name": "rnn",
        "per_step": "x",
        "state": {"h": "h1"},
        "outputs": {"y": "h1"},
        "doc": "Elman RNN over time (nn.RNN, tanh): y[t] = h_t; returns (y, h_T)",
    },
    {
        "cell": "gru_cell",
        "name": "gru",
        "per_step": "x",
        "state": {"h": "h1"},
        "outputs": {"y": "h1"},
        "doc": "GRU over time (nn.GRU, gates r, z, n): y[t] = h_t; returns (y, h_T)",
    },
    {
        "cell": "lstm_cell",
        "name": "lstm",
        "per_step": "x",
        "state": {"h": "h1", "c": "c1"},
        "outputs": {"y": "h1"},
        "doc": "LSTM over time (nn.LSTM, gates i, f, g, o): y[t] = h_t; returns (y, h_T, c_T)",
    },
]
