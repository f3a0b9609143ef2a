"""An MLP on scikit-learn's 8x8 digits, trained with nothing but generated modules.

linear -> relu -> linear -> cross_entropy, optimised by generated/adam.py; every gradient comes
from a generated module's backward. Run from the repository root:

    python examples/mlp_digits.py
"""

from __future__ import annotations

import _common  # first: one BLAS thread, symdl from this checkout, the Agg backend
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from symdl import nn


class MLP(nn.Model):
    def __init__(self, sizes, rng, dtype):
        self.fc1 = nn.Linear(sizes[0], sizes[1], rng=rng, dtype=dtype)
        self.act = nn.Layer("relu")
        self.fc2 = nn.Linear(sizes[1], sizes[2], rng=rng, dtype=dtype)
        self.loss = nn.Layer("cross_entropy")

    def logits(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x, target):
        return self.loss(self.logits(x), target=target)


def digits(dtype=np.float32):
    """The digits as (N, 64) pixels in [0, 1] and labels, split 80/20 (stratified, fixed)."""
    data = load_digits()
    x = (data.data / 16.0).astype(dtype)
    return train_test_split(x, data.target, test_size=0.2, random_state=0, stratify=data.target)


def accuracy(logits, y):
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    x_train, x_test, y_train, y_test = digits()
    # standardise each pixel by the training set's statistics (+0.1: corner pixels are ~constant)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 0.1
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    model = MLP((64, args.hidden, 10), rng, np.float32)
    opt = nn.Optimizer("adam", model, lr=args.lr)
    print(
        f"digits: {len(x_train)} train, {len(x_test)} test; MLP 64-{args.hidden}-10, adam "
        f"lr {args.lr}, batch {args.batch}, {args.epochs} epochs"
    )

    history, bar = _common.train(
        model,
        opt,
        (x_train, y_train, x_test, y_test),
        epochs=args.epochs,
        batch=args.batch,
        rng=rng,
    )

    test_acc = accuracy(model.logits(x_test), y_test)
    train_acc = accuracy(model.logits(x_train), y_train)
    _common.save_curves(
        args.out, "mlp_digits_loss.png", history, "epoch", "cross-entropy (nats)",
        "MLP on digits (symdl generated modules)",
    )  # fmt: skip
    print(
        f"mlp_digits: test accuracy {test_acc:.2%} ({round(test_acc * len(y_test))}/"
        f"{len(y_test)}), train accuracy {train_acc:.2%}, final test loss "
        f"{history['test loss'][1][-1]:.4f}, {bar.elapsed():.1f} s"
    )


if __name__ == "__main__":
    main()
