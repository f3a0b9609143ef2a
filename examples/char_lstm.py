"""A character-level LSTM language model, trained with nothing but generated modules.

The text is the docstrings of a few standard-library modules (it ships with Python). The model
is embedding -> LSTM -> linear -> cross_entropy, optimised by generated/adam.py. The LSTM is
generated/lstm.py when that module exists; otherwise generated/lstm_cell.py called once per time
step, so that the tape plays the cell's backward in reverse over time (backpropagation through
time: the loop is glue, every gradient is the cell's own). Run from the repository root:

    python examples/char_lstm.py
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections import Counter

import _common  # first: one BLAS thread, symdl from this checkout, the Agg backend
import numpy as np

from symdl import nn

MODULES = ("textwrap", "string", "json", "collections", "functools", "heapq", "bisect")
MODULES += ("fractions", "statistics", "random", "difflib", "shlex", "fnmatch", "calendar")


def corpus(modules=MODULES) -> str:
    """Each module's docstring, then those of its public functions and classes, by name."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            public = not attr.startswith("_") and getattr(obj, "__module__", None) == name
            if public and (inspect.isfunction(obj) or inspect.isclass(obj)):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


class CharLSTM(nn.Model):
    def __init__(self, vocab, dim, hidden, rng, dtype, cell=False):
        self.embed = nn.Embedding(vocab, dim, rng=rng, dtype=dtype)
        self.lstm = self.cell = None
        if not cell:
            try:  # the whole sequence in one generated module
                self.lstm = nn.LSTM(dim, hidden, rng=rng, dtype=dtype)
            except FileNotFoundError:
                cell = True
        if cell:  # loop the cell over time (same parameters, same initialisation)
            self.cell = nn.LSTMCell(dim, hidden, rng=rng, dtype=dtype)
        self.out = nn.Linear(hidden, vocab, rng=rng, dtype=dtype)
        self.loss = nn.Layer("cross_entropy")
        self.hidden, self.dtype = hidden, dtype

    def run(self, tokens, h, c):
        """tokens (T, B) -> hidden states (T, B, H) and the final (h, c)."""
        if self.lstm is not None:
            return self.lstm(self.embed(indices=tokens), h, c)
        hs = []
        for t in range(len(tokens)):
            h, c = self.cell(self.embed(indices=tokens[t]), h, c)
            hs.append(h)
        return nn.stack(hs), h, c

    def zeros(self, batch):
        return np.zeros((batch, self.hidden), self.dtype), np.zeros(
            (batch, self.hidden), self.dtype
        )

    def forward(self, tokens, targets):
        """Mean cross-entropy of predicting targets (T, B) (the next characters) from tokens."""
        ys, _, _ = self.run(tokens, *self.zeros(tokens.shape[1]))
        logits = self.out(nn.reshape(ys, (-1, self.hidden)))
        return self.loss(logits, target=targets.reshape(-1))

    def sample(self, prompt_ids, length, rng, temperature=0.8):
        """Feed the prompt, then draw ``length`` characters one at a time (no tape: forward only)."""
        h, c = self.zeros(1)
        ids = list(prompt_ids)
        _, h, c = self.run(np.array(ids[:-1], dtype=np.int64)[:, None], h, c)
        for _ in range(length):
            ys, h, c = self.run(np.array([[ids[-1]]]), h, c)
            logits = self.out(ys[0]).astype(np.float64)[0] / temperature
            p = np.exp(logits - logits.max())
            ids.append(int(rng.choice(len(p), p=p / p.sum())))
        return ids


def windows(data, starts, length):
    """Inputs (T, B) and next-character targets (T, B) for windows starting at ``starts``."""
    idx = starts[None, :] + np.arange(length + 1)[:, None]
    chunk = data[idx]
    return chunk[:-1], chunk[1:]


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seq", type=int, default=32, help="characters per window (BPTT length)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dim", type=int, default=32, help="embedding size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--cell", action="store_true",
        help="loop generated/lstm_cell.py over time even when generated/lstm.py exists",
    )  # fmt: skip
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    text = corpus()
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    data = np.array([index[ch] for ch in text], dtype=np.int64)
    # every tenth block of 1000 characters is held out for validation
    held_out = (np.arange(len(data)) // 1000) % 10 == 9
    train, valid = data[~held_out], data[held_out]
    counts = Counter(train.tolist())
    unigram = -sum(n / len(train) * math.log(n / len(train)) for n in counts.values())
    valid_starts = np.arange(0, len(valid) - args.seq - 1, args.seq)
    valid_x, valid_y = windows(valid, valid_starts, args.seq)

    model = CharLSTM(len(chars), args.dim, args.hidden, rng, np.float32, cell=args.cell)
    opt = nn.Optimizer("adam", model, lr=args.lr)
    kind = "generated/lstm.py" if model.lstm is not None else "generated/lstm_cell.py over time"
    print(
        f"text: {len(text)} characters of stdlib docstrings ({', '.join(MODULES[:3])}, ...), "
        f"{len(chars)} distinct; {len(train)} train, {len(valid)} validation"
    )
    print(
        f"model: embedding {args.dim} -> LSTM {args.hidden} ({kind}) -> linear {len(chars)}; "
        f"adam lr {args.lr}, {args.steps} steps of {args.batch} windows x {args.seq} characters"
    )
    print(f"unigram entropy of the training text: {unigram:.3f} nats/char")

    bar = _common.Progress(args.steps)
    history = {"train loss": ([], []), "validation loss": ([], []), "unigram entropy": ([], [])}
    every = max(1, args.steps // 15)
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(train) - args.seq - 1, args.batch)
        loss = model(*windows(train, starts, args.seq))
        opt.zero_grad()
        model.backward()
        opt.step()
        history["train loss"][0].append(step)
        history["train loss"][1].append(float(loss))
        if step % every == 0 or step == args.steps:
            history["validation loss"][0].append(step)
            history["validation loss"][1].append(float(model(valid_x, valid_y)))
        smooth = np.mean(history["train loss"][1][-50:])
        bar.update(step, f"loss {smooth:.3f}")
    history["unigram entropy"] = ([1, args.steps], [unigram, unigram])

    prompt = "Return the "
    ids = model.sample([index[ch] for ch in prompt], 300, np.random.default_rng(args.seed))
    print("sample (temperature 0.8), prompt " + repr(prompt) + ":\n")
    print("".join(chars[i] for i in ids))
    print()
    _common.save_curves(
        args.out, "char_lstm_loss.png", history, "step", "cross-entropy (nats/char)",
        "Character LSTM on stdlib docstrings (symdl generated modules)",
    )  # fmt: skip
    final_train = float(np.mean(history["train loss"][1][-50:]))
    final_valid = history["validation loss"][1][-1]
    print(
        f"char_lstm: train loss {final_train:.3f}, validation loss {final_valid:.3f} nats/char "
        f"vs unigram entropy {unigram:.3f} ({final_valid / math.log(2):.2f} vs "
        f"{unigram / math.log(2):.2f} bits/char), {bar.elapsed():.1f} s"
    )


if __name__ == "__main__":
    main()
