"""A small CNN on scikit-learn's 8x8 digits, trained with nothing but generated modules.

conv2d -> relu -> max_pool2d -> flatten -> linear -> cross_entropy, optimised by
generated/adam.py, on training images shifted at random by up to one pixel. The flatten
between the pooling and the linear layer is a reshape (its backward reshapes back); every other
gradient comes from a generated module's backward. Run from the repository root:

    python examples/cnn_digits.py
"""

from __future__ import annotations

import _common  # first: one BLAS thread, symdl from this checkout, the Agg backend
import numpy as np
from mlp_digits import accuracy, digits

from symdl import nn


class CNN(nn.Model):
    """(N, 1, 8, 8) -> conv 3x3, padding 1 -> (N, C, 8, 8) -> relu -> max-pool 2x2 ->
    (N, C, 4, 4) -> flatten -> (N, 16 C) -> linear -> (N, 10)."""

    def __init__(self, rng, dtype, channels=32):
        self.conv = nn.Conv2d(1, channels, 3, padding=1, rng=rng, dtype=dtype)
        self.relu = nn.Layer("relu")
        self.pool = nn.Layer("max_pool2d", kernel_size=2)
        self.fc = nn.Linear(channels * 4 * 4, 10, rng=rng, dtype=dtype)
        self.loss = nn.Layer("cross_entropy")

    def logits(self, x):
        return self.fc(nn.flatten(self.pool(self.relu(self.conv(x)))))

    def forward(self, x, target):
        return self.loss(self.logits(x), target=target)


def shift(images, rng, background):
    """Each (1, 8, 8) image moved by -1, 0 or 1 pixel along each axis (data, not gradients)."""
    n = len(images)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=background)
    dy, dx = rng.integers(0, 3, n), rng.integers(0, 3, n)
    rows = dy[:, None] + np.arange(8)  # (n, 8)
    cols = dx[:, None] + np.arange(8)
    return padded[np.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    x_train, x_test, y_train, y_test = digits()
    # images (N, 1, 8, 8), centred and scaled by the training set's mean and std
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = ((x.reshape(-1, 1, 8, 8) - mean) / std for x in (x_train, x_test))
    background = (0 - mean) / std  # a blank pixel, after the scaling
    model = CNN(rng, np.float32)
    opt = nn.Optimizer("adam", model, lr=args.lr)
    print(
        f"digits: {len(x_train)} train, {len(x_test)} test; CNN conv32-relu-pool-linear, "
        f"adam lr {args.lr}, batch {args.batch}, {args.epochs} epochs"
    )

    history, bar = _common.train(
        model,
        opt,
        (x_train, y_train, x_test, y_test),
        epochs=args.epochs,
        batch=args.batch,
        rng=rng,
        augment=lambda x, r: shift(x, r, background),
    )

    test_acc = accuracy(model.logits(x_test), y_test)
    train_acc = accuracy(model.logits(x_train), y_train)
    _common.save_curves(
        args.out, "cnn_digits_loss.png", history, "epoch", "cross-entropy (nats)",
        "CNN on digits (symdl generated modules)",
    )  # fmt: skip
    print(
        f"cnn_digits: test accuracy {test_acc:.2%} ({round(test_acc * len(y_test))}/"
        f"{len(y_test)}), train accuracy {train_acc:.2%}, final test loss "
        f"{history['test loss'][1][-1]:.4f}, {bar.elapsed():.1f} s"
    )


if __name__ == "__main__":
    main()
