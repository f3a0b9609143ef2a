"""Local (banded) attention against full attention with a band mask, as T grows.

    python benchmarks/local_attention_scaling.py [--window 64] [--lengths 512 1024 2048 4096]

Times forward+backward (median of a few runs) and the bytes kept in the cache for backward
(the memory that must live between the two passes) of generated/local_attention.py and of
generated/scaled_dot_product_attention.py given the band as its mask. Local attention's time
and cache grow linearly in T; full attention's grow quadratically.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "generated" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_bytes(cache):
    seen, total = set(), 0
    for value in cache.values():
        if isinstance(value, np.ndarray):
            base = value if value.base is None else value.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
    return total


def measure(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    local, full = load("local_attention"), load("scaled_dot_product_attention")
    rng = np.random.default_rng(0)
    print(f"window {args.window}, batch {args.batch}, embedding {args.embed}, float32")
    print(f"{'T':>6} {'local ms':>10} {'local cache MB':>15} {'full ms':>10} {'full cache MB':>14}")
    rows = []
    for t in args.lengths:
        q, k, v = (rng.standard_normal((args.batch, t, args.embed)).astype(np.float32) for _ in range(3))
        band = np.abs(np.arange(t)[:, None] - np.arange(t)[None, :]) <= args.window

        def run_local():
            out, cache = local.forward(q, k, v, window=args.window)
            local.backward(np.ones_like(out), cache)
            return cache_bytes(cache)

        def run_full():
            out, cache = full.forward(q, k, v, mask=band)
            full.backward(np.ones_like(out), cache)
            return cache_bytes(cache)

        lt, lb = measure(run_local, args.repeats)
        ft, fb = measure(run_full, args.repeats)
        rows.append((t, lt, lb, ft, fb))
        print(f"{t:>6} {lt * 1e3:>10.1f} {lb / 2**20:>15.1f} {ft * 1e3:>10.1f} {fb / 2**20:>14.1f}")
    first, last = rows[0], rows[-1]
    growth = last[0] / first[0]
    print(
        f"T grew {growth:.0f}x: local time {last[1] / first[1]:.1f}x, local cache "
        f"{last[2] / first[2]:.1f}x; full time {last[3] / first[3]:.1f}x, full cache "
        f"{last[4] / first[4]:.1f}x"
    )


if __name__ == "__main__":
    main()
