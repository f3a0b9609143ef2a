"""What the examples share: importing symdl from this checkout, one BLAS thread, a text
progress bar, and saving a curve as a PNG. None of it touches a gradient.

Import it before NumPy: the matrices here are small, and a multi-threaded BLAS spends longer
waking its threads than multiplying (35x slower per product on a busy 2-core machine);
set OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS, MKL_NUM_THREADS) yourself to override.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the examples use _common.plt

OUTPUT = ROOT / "examples" / "output"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument(
        "--out", type=Path, default=OUTPUT, help=f"folder for the PNGs (default {OUTPUT})"
    )
    return p


class Progress:
    """``[#####.....]  50% 120/240 loss 0.1234 (3.1 s)`` rewritten in place on one line."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.start = total, width, time.perf_counter()
        self.tty = sys.stdout.isatty()
        self.shown = -1

    def update(self, done: int, text: str = "") -> None:
        percent = 100 * done // self.total
        if not self.tty and percent // 10 == self.shown // 10 and done != self.total:
            return  # when piped, one line per 10% is enough
        self.shown = percent
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {percent:3d}% {done}/{self.total} {text} ({self.elapsed():.1f} s)"
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", flush=True)
        if self.tty and done == self.total:
            print()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def save_figure(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def save_curves(out: Path, name: str, curves: dict, xlabel: str, ylabel: str, title: str):
    """Plot each ``label -> (xs, ys)`` on one set of axes and save it as ``out/name``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out, name)


def train(
    model, opt, data, *, epochs: int, batch: int, rng, augment=None
) -> tuple[dict, Progress]:
    """Minibatch training of a loss-returning ``model`` (``model(x, y)`` -> loss, then
    ``model.backward()``) with optimizer ``opt`` over ``data = (x_train, y_train, x_test,
    y_test)``; ``augment(x, rng)`` transforms each training batch. Returns the loss curves
    (``label -> (xs, ys)``, for :func:`save_curves`) and the progress bar (for its time)."""
    x_train, y_train, x_test, y_test = data
    steps = (len(x_train) + batch - 1) // batch
    bar = Progress(epochs * steps)
    history = {"train loss": ([], []), "test loss": ([], [])}
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for k in range(steps):
            rows = order[k * batch : (k + 1) * batch]
            xb = x_train[rows] if augment is None else augment(x_train[rows], rng)
            loss = model(xb, y_train[rows])
            opt.zero_grad()
            model.backward()
            opt.step()
            step = epoch * steps + k + 1
            history["train loss"][0].append(step / steps)
            history["train loss"][1].append(float(loss))
            bar.update(step, f"epoch {epoch + 1} loss {float(loss):.4f}")
        history["test loss"][0].append(epoch + 1)
        history["test loss"][1].append(float(model(x_test, y_test)))
    return history, bar
