"""Benchmark symdl's generated NumPy layers against hand-written NumPy and PyTorch CPU eager.

    python benchmarks/run.py [--quick] [--only NAME ...] [--dtype float32|float64|both]

For every workload whose generated module exists (generated/NAME.py, imported by file path), the
script times forward, backward and forward+backward of three implementations in one process:
symdl's generated module, the hand-written NumPy baseline in benchmarks/reference_numpy.py and
PyTorch eager (skipped when torch is not importable). The three are interleaved round by round,
after warm-up, and the median of the rounds is reported. The same run measures the machine's GEMM
peak and memory bandwidth, so each workload also gets a fraction of the relevant roof.

A "generation" section times the engine itself, each run in a fresh process: `symdl generate`
of the whole catalogue without the cache (cold) and from a filled cache (warm), and `symdl
derive` of one custom layer, cold and cached. `--only generation` runs that section alone;
`--no-generation` skips it.

Prints a table and writes benchmarks/RESULTS.md. See benchmarks/README.md for the columns.
Needs NumPy; PyTorch and threadpoolctl are optional.
"""

import argparse
import ctypes
import gc
import importlib.util
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # the PyTorch column is skipped
    torch = None


def load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = load_by_path("reference_numpy", HERE / "reference_numpy.py")


# ============================================================================ workloads


@dataclass
class Workload:
    """One benchmark case: inputs, a PyTorch twin and a cost model."""

    label: str  # shown in the table
    module: str  # generated/<module>.py and reference_numpy.<module>_forward
    make: object  # make(dtype, rng) -> (args list, kw dict)
    torch_fn: object  # torch_fn(targs list, tkw dict) -> tensor or tuple of tensors
    bound: str  # "gemm" or "mem"
    cost: object  # cost(args, kw, itemsize) -> (fwd, bwd) in FLOPs (gemm) or bytes (mem)
    torch_kw: object = None  # kw (numpy) -> kw for torch_fn (defaults to tensors of arrays)
    tol: dict = field(default_factory=lambda: {"float32": 2e-4, "float64": 1e-9})


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def uniform(rng, shape, dtype, bound):
    return rng.uniform(-bound, bound, shape).astype(dtype)


def _elementwise(name, n=4 * 1024 * 1024, torch_fn=None):
    return Workload(
        label=name,
        module=name,
        make=lambda dt, rng: ([randn(rng, (n,), dt, 2.0)], {}),
        torch_fn=torch_fn or (lambda a, k: getattr(TF, name)(a[0])),
        bound="mem",
        cost=lambda a, k, s: (2 * a[0].size * s, 3 * a[0].size * s),  # x->y; dy,y->dx
    )


def _linear():
    B, I, O = 256, 1024, 1024

    def make(dt, rng):
        b = 1 / math.sqrt(I)
        return [randn(rng, (B, I), dt), uniform(rng, (O, I), dt, b), uniform(rng, (O,), dt, b)], {}

    return Workload(
        "linear", "linear", make, lambda a, k: TF.linear(*a), "gemm",
        lambda a, k, s: (2 * B * I * O, 4 * B * I * O),
    )


def _conv2d(stride):
    N, C, H, W, F, K = 32, 16, 32, 32, 32, 3

    def make(dt, rng):
        b = 1 / math.sqrt(C * K * K)
        args = [randn(rng, (N, C, H, W), dt), uniform(rng, (F, C, K, K), dt, b),
                uniform(rng, (F,), dt, b)]
        return args, {"stride": stride, "padding": 1}

    def cost(a, k, s):
        OH = (H + 2 - K) // stride + 1
        f = 2 * N * F * OH * OH * C * K * K
        return f, 2 * f

    return Workload(
        f"conv2d s{stride}", "conv2d", make,
        lambda a, k: TF.conv2d(*a, stride=k["stride"], padding=k["padding"]), "gemm", cost,
    )


def _max_pool2d():
    def make(dt, rng):
        return [randn(rng, (32, 16, 32, 32), dt)], {"kernel_size": 2}

    return Workload(
        "max_pool2d", "max_pool2d", make, lambda a, k: TF.max_pool2d(a[0], k["kernel_size"]),
        "mem", lambda a, k, s: (1.25 * a[0].size * s, 1.25 * a[0].size * s),  # x->y/4; dy/4->dx
    )


def _cross_entropy():
    N, C = 512, 1000

    def make(dt, rng):
        return [randn(rng, (N, C), dt, 3.0)], {"target": rng.integers(0, C, N)}

    return Workload(
        "cross_entropy", "cross_entropy", make,
        lambda a, k: TF.cross_entropy(a[0], k["target"]), "mem",
        lambda a, k, s: (N * C * s, 2 * N * C * s),  # read logits; read cache, write dlogits
        torch_kw=lambda kw: {"target": torch.from_numpy(kw["target"]).long()},
    )


def _softmax():
    N, C = 512, 1000
    return Workload(
        "softmax", "softmax", lambda dt, rng: ([randn(rng, (N, C), dt, 3.0)], {}),
        lambda a, k: torch.softmax(a[0], dim=-1), "mem",
        lambda a, k, s: (2 * N * C * s, 3 * N * C * s),
    )


def _layer_norm():
    N, D = 4096, 512

    def make(dt, rng):
        return [randn(rng, (N, D), dt), 1 + randn(rng, (D,), dt, 0.1), randn(rng, (D,), dt, 0.1)], {}

    return Workload(
        "layer_norm", "layer_norm", make, lambda a, k: TF.layer_norm(a[0], (D,), a[1], a[2]),
        "mem", lambda a, k, s: (2 * N * D * s, 3 * N * D * s),
    )


def _batch_norm():
    shape = (64, 64, 16, 16)
    C = shape[1]

    def make(dt, rng):
        return [randn(rng, shape, dt), 1 + randn(rng, (C,), dt, 0.1), randn(rng, (C,), dt, 0.1)], {}

    n = math.prod(shape)
    return Workload(
        "batch_norm", "batch_norm", make,
        lambda a, k: TF.batch_norm(a[0], None, None, a[1], a[2], training=True), "mem",
        lambda a, k, s: (2 * n * s, 3 * n * s),
    )


T_RNN, B_RNN, I_RNN, H_RNN = 50, 32, 128, 256


def _recurrent(name, gates):
    T, B, I, H = T_RNN, B_RNN, I_RNN, H_RNN

    def make(dt, rng):
        b = 1 / math.sqrt(H)
        args = [randn(rng, (T, B, I), dt), randn(rng, (B, H), dt, 0.5)]
        if name == "lstm":
            args.append(randn(rng, (B, H), dt, 0.5))
        args += [uniform(rng, (gates * H, I), dt, b), uniform(rng, (gates * H, H), dt, b),
                 uniform(rng, (gates * H,), dt, b), uniform(rng, (gates * H,), dt, b)]
        return args, {}

    def run_torch(a, k):
        if name == "lstm":
            x, h0, c0, wih, whh, bih, bhh = a
            y, hT, cT = torch._VF.lstm(x, (h0[None], c0[None]), [wih, whh, bih, bhh],
                                       True, 1, 0.0, True, False, False)
            return y, hT[0], cT[0]
        x, h0, wih, whh, bih, bhh = a
        y, hT = torch._VF.gru(x, h0[None], [wih, whh, bih, bhh], True, 1, 0.0, True, False, False)
        return y, hT[0]

    f = 2 * T * B * (I + H) * gates * H
    return Workload(name, name, make, run_torch, "gemm", lambda a, k, s: (f, 2 * f))


def _mhsa(causal):
    N, T, E, heads = 8, 128, 256, 4

    def make(dt, rng):
        b = 1 / math.sqrt(E)
        args = [randn(rng, (N, T, E), dt), uniform(rng, (3 * E, E), dt, b),
                uniform(rng, (3 * E,), dt, b), uniform(rng, (E, E), dt, b),
                uniform(rng, (E,), dt, b)]
        return args, {"num_heads": heads, "causal": causal}

    mask = {}

    def run_torch(a, k):
        x, w_in, b_in, w_out, b_out = a
        T_ = x.shape[1]
        m = None
        if k["causal"]:
            m = mask.get(T_)
            if m is None:
                m = mask[T_] = torch.triu(torch.ones(T_, T_, dtype=torch.bool), 1)
        xt = x.transpose(0, 1)  # what nn.MultiheadAttention(batch_first=True) does
        y, _ = TF.multi_head_attention_forward(
            xt, xt, xt, E, k["num_heads"], w_in, b_in, None, None, False, 0.0, w_out, b_out,
            training=True, need_weights=False, attn_mask=m, is_causal=k["causal"])
        return y.transpose(0, 1)

    # dense implementations: projections 4 GEMMs of (NT x E x E), scores and A@V of (T x T x d)
    f = 2 * N * T * E * 4 * E + 4 * N * T * T * E
    return Workload(
        "mhsa causal" if causal else "mhsa", "multi_head_self_attention", make, run_torch,
        "gemm", lambda a, k, s: (f, 2 * f),
        torch_kw=lambda kw: dict(kw),
    )


def _local_attention():
    N, T, E, w = 8, 1024, 64, 16

    def make(dt, rng):
        return [randn(rng, (N, T, E), dt) for _ in range(3)], {"window": w}

    band = {}

    def run_torch(a, k):
        q, kk, v = a
        T_ = q.shape[1]
        m = band.get(T_)
        if m is None:
            i = torch.arange(T_)
            m = band[T_] = (i[:, None] - i[None, :]).abs() <= k["window"]
        return TF.scaled_dot_product_attention(q, kk, v, attn_mask=m)  # dense O(T^2) + mask

    f = 4 * N * T * (2 * w + 1) * E  # useful (banded) FLOPs
    return Workload("local_attention", "local_attention", make, run_torch, "gemm",
                    lambda a, k, s: (f, 2 * f), torch_kw=lambda kw: dict(kw))


WORKLOADS = [
    _linear(),
    _elementwise("tanh"),
    _elementwise("sigmoid"),
    _elementwise("gelu"),
    _elementwise("gelu_tanh", torch_fn=lambda a, k: TF.gelu(a[0], approximate="tanh")),
    _cross_entropy(),
    _conv2d(1),
    _conv2d(2),
    _max_pool2d(),
    _layer_norm(),
    _batch_norm(),
    _softmax(),
    _recurrent("lstm", 4),
    _recurrent("gru", 3),
    _mhsa(False),
    _mhsa(True),
    _local_attention(),
]


# ============================================================================ machine facts


def _openblas_ctypes():
    """(description, set_threads) straight from the OpenBLAS that NumPy loaded, or None."""
    try:
        with open("/proc/self/maps") as maps:
            libs = sorted({line.split()[-1] for line in maps
                           if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    # NumPy's own copy first (numpy.libs/ or numpy/.libs), then any other
    libs.sort(key=lambda path: "numpy" not in path)
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pre, suf in (("scipy_", "64_"), ("scipy_", ""), ("", "64_"), ("", "")):
            try:
                get_config = getattr(lib, f"{pre}openblas_get_config{suf}")
                core = getattr(lib, f"{pre}openblas_get_corename{suf}")
                nthreads = getattr(lib, f"{pre}openblas_get_num_threads{suf}")
                setter = getattr(lib, f"{pre}openblas_set_num_threads{suf}")
            except AttributeError:
                continue
            get_config.restype = core.restype = ctypes.c_char_p

            def describe(get_config=get_config, core=core, nthreads=nthreads, path=path):
                return (f"{get_config().decode().strip()}; core {core().decode()}; "
                        f"{nthreads()} threads; {Path(path).name}")

            return describe, (lambda n, setter=setter: setter(int(n)))
    return None


_THREADPOOL_LIMITS = []  # keeps a threadpoolctl limiter alive


def blas_info(set_threads=None):
    """Describe NumPy's BLAS (and first set its thread count when asked).

    Uses OpenBLAS's own entry points when NumPy's OpenBLAS is found in the process, else
    threadpoolctl when installed, else numpy.show_config."""
    found = _openblas_ctypes()
    if found is not None:
        describe, setter = found
        if set_threads:
            setter(set_threads)
        return describe()
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        if set_threads:
            _THREADPOOL_LIMITS.append(threadpool_limits(set_threads, user_api="blas"))
        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        infos.sort(key=lambda i: "numpy" not in i.get("filepath", ""))
        if infos:
            i = infos[0]
            return (f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}), "
                    f"{i.get('num_threads')} threads, {Path(i.get('filepath', '')).name}")
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')} (thread count unknown)"
    except Exception:
        return "unknown"


def cpu_model():
    """Model name from /proc/cpuinfo, with family/model and the widest SIMD (VMs hide names)."""
    try:
        info = {}
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # first processor only
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
        flags = info.get("flags", "").split()
        simd = next((f for f in ("avx512f", "avx2", "avx", "asimd", "neon") if f in flags), "")
        extra = [f"family {info['cpu family']} model {info['model']}"] if "model" in info else []
        extra += [simd.upper()] if simd else []
        extra += [f"cache {info['cache size']}"] if "cache size" in info else []
        return f"{info.get('model name', platform.machine())} ({', '.join(extra)})"
    except OSError:
        return platform.processor() or platform.machine()


def best_time(fn, reps):
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_roofs(dtypes, quick):
    """GEMM GFLOP/s per dtype (NumPy's BLAS, all threads) and memory GB/s (best of the run)."""
    roofs = {"gemm": {}, "gemm_torch": {}}
    n = 2048
    reps = 2 if quick else 5
    rng = np.random.default_rng(0)
    for dt in dtypes:
        a = rng.standard_normal((n, n)).astype(dt)
        b = rng.standard_normal((n, n)).astype(dt)
        c = np.empty((n, n), dt)
        gemm = lambda a=a, b=b, c=c: np.matmul(a, b, out=c)
        roofs["gemm"][dt] = 2 * n**3 / best_time(gemm, reps) / 1e9
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            tgemm = lambda ta=ta, tb=tb: torch.mm(ta, tb)
            roofs["gemm_torch"][dt] = 2 * n**3 / best_time(tgemm, reps) / 1e9
    # bandwidth: 256 MB arrays, far beyond the caches; bytes = logical reads + writes
    m = 32 * 1024 * 1024
    x = np.ones(m, np.float64)
    y = np.empty_like(x)
    z = np.empty_like(x)
    roofs["copy"] = 2 * x.nbytes / best_time(lambda: np.copyto(y, x), reps + 1) / 1e9
    roofs["add"] = 3 * x.nbytes / best_time(lambda: np.add(x, y, out=z), reps + 1) / 1e9
    roofs["bw"] = max(roofs["copy"], roofs["add"])
    if torch is not None:
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        roofs["copy_torch"] = 2 * x.nbytes / best_time(lambda: ty.copy_(tx), reps + 1) / 1e9
    return roofs


# ============================================================================ generation time

#: The custom layer of the derive timings, and the targets of the generation section (seconds).
DERIVE_LAYER = ("dense_tanh", "y[n,o] = tanh(Sum(w[o,i]*x[n,i], i) + b[o])", "--inputs", "x",
                "--params", "w,b")
GENERATION_TARGETS = {"generate": 20.0, "derive": 1.0}


def _symdl_seconds(argv, env):
    """Wall time of ``python -m symdl ARGV`` in a fresh process (from the repository root)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "symdl", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"symdl {' '.join(argv[:2])} failed: {proc.stderr.strip()[-500:]}")
    return took


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.py"))}


def generation_times(quick):
    """Cold and cached ``symdl generate`` (whole catalogue) and ``symdl derive`` (one custom
    layer), each in a fresh process, in a private cache directory; rows for the table."""
    rounds = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="symdl-bench-"))
    try:
        env = dict(os.environ, SYMDL_CACHE_DIR=str(tmp / "cache"))
        env.pop("SYMDL_NO_CACHE", None)
        # Time symdl's work, not Python compiling symdl's sources on every start: an installed
        # package has its bytecode compiled by `pip install`; here it is compiled once first
        # (symdl/__pycache__, ignored by git), whatever PYTHONDONTWRITEBYTECODE says.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "symdl")],
                       env=env, check=True)
        derive = ["derive", *DERIVE_LAYER]
        cases = {  # name: (argv, output dir, fills the cache first)
            "generate cold": (["generate", "--no-cache", "-o"], "cold", False),
            "generate cached": (["generate", "-o"], "warm", True),
            # one output directory: the module's header records the command, -o included
            "derive cold": ([*derive, "--no-cache", "-o"], "derive", False),
            "derive cached": ([*derive, "-o"], "derive", True),
        }
        times = {name: [] for name in cases}
        for name, (argv, out, fill) in cases.items():
            if fill:  # the first run writes the cache; it is not timed
                _symdl_seconds(argv + [str(tmp / out)], env)
        texts = {}
        for _ in range(rounds):  # interleaved, so load drifts hit every case alike
            for name, (argv, out, _fill) in cases.items():
                times[name].append(_symdl_seconds(argv + [str(tmp / out)], env))
                texts[name] = _files(tmp / out)
        same = {kind: texts[f"{kind} cold"] == texts[f"{kind} cached"]
                for kind in ("generate", "derive")}
        modules = len(texts["generate cold"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, ts in times.items():
        kind = name.split()[0]
        what = f"{modules} modules" if kind == "generate" else f"1 layer ({DERIVE_LAYER[0]})"
        med = statistics.median(ts)
        rows.append([name, what, f"{med:.2f}", f"{min(ts):.2f}", str(len(ts)),
                     f"< {GENERATION_TARGETS[kind]:g} s: {'yes' if med < GENERATION_TARGETS[kind] else 'NO'}",
                     "yes" if same[kind] else "NO (differs)"])
    cold, warm = statistics.median(times["generate cold"]), statistics.median(times["generate cached"])
    rows.append(["generate speed-up", "cold / cached", f"{cold / warm:.1f}x", "", "", "", ""])
    return rows


GENERATION_HEAD = ["case", "what", "median s", "best s", "runs", "target", "same bytes as cold"]


# ============================================================================ measurement


def _owner(array):
    """The array that owns the memory a view looks at (through as_strided's DummyArray too)."""
    while True:
        base = array.base
        if isinstance(base, np.ndarray):
            array = base
        elif isinstance(getattr(base, "base", None), np.ndarray):  # stride_tricks DummyArray
            array = base.base
        else:
            return array


def cache_nbytes(obj, seen=None):
    """Bytes of array memory a cache keeps alive (dicts, lists, tuples walked recursively).

    A view counts as the array owning its memory, and each owner counts once: a strided window
    view of a padded input costs the padded input, not its (much larger) logical size."""
    seen = set() if seen is None else seen
    if isinstance(obj, np.ndarray):
        owner = _owner(obj)
        if id(owner) in seen:
            return 0
        seen.add(id(owner))
        return owner.nbytes
    if isinstance(obj, dict):
        return sum(cache_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(cache_nbytes(v, seen) for v in obj)
    return 0


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


class NumpyImpl:
    def __init__(self, name, forward, backward, args, kw):
        self.name, self.forward, self.backward = name, forward, backward
        self.args, self.kw = args, kw

    def run(self, douts, measure_cache=False):
        """Returns (t_forward, t_backward, out, grads[, cache MB])."""
        t0 = time.perf_counter()
        out, cache = self.forward(*self.args, **self.kw)
        t1 = time.perf_counter()
        mb = cache_nbytes(cache) / 1e6 if measure_cache else None
        grads = self.backward(douts if isinstance(out, tuple) else douts[0], cache)
        t2 = time.perf_counter()
        return (t1 - t0, t2 - t1, out, grads) + ((mb,) if measure_cache else ())


class TorchImpl:
    name = "torch"

    def __init__(self, fn, args, kw, torch_kw):
        self.fn = fn
        self.args = [torch.from_numpy(np.array(a)).requires_grad_() for a in args]
        self.kw = torch_kw(kw) if torch_kw else kw
        self._douts = None

    def run(self, douts, measure_cache=False):
        """As NumpyImpl.run; the cache is what autograd saves for backward (each tensor once)."""
        if self._douts is None:
            self._douts = tuple(torch.from_numpy(np.array(d)) for d in douts)
        seen, total = set(), [0]

        def pack(t):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total[0] += t.nbytes
            return t

        if measure_cache:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = as_tuple(self.fn(self.args, self.kw))
            t0 = t1 = 0.0
        else:
            t0 = time.perf_counter()
            out = as_tuple(self.fn(self.args, self.kw))
            t1 = time.perf_counter()
        grads = torch.autograd.grad(out, self.args, self._douts)
        t2 = time.perf_counter()
        out = tuple(o.detach().numpy() for o in out)
        res = (t1 - t0, t2 - t1, out, tuple(g.numpy() for g in grads))
        return res + ((total[0] / 1e6,) if measure_cache else ())


def max_rel_err(got, want):
    """max |got - want| / max |want| over the outputs and gradients, worst case."""
    worst = 0.0
    for g, w in zip(got, want):
        g = np.asarray(g, np.float64)
        w = np.asarray(w, np.float64)
        if g.shape != w.shape:
            return math.inf
        scale = max(np.abs(w).max(initial=0.0), 1e-30)
        worst = max(worst, float(np.abs(g - w).max(initial=0.0)) / scale)
    return worst


def check_reference(wl, dtype):
    """max relative error of the hand-written NumPy reference against PyTorch (no timing)."""
    args, kw = wl.make(dtype, np.random.default_rng(1234))
    fwd, bwd = ref.REFERENCES[wl.module]
    impl = NumpyImpl("numpy", fwd, bwd, args, kw)
    out, _ = fwd(*args, **kw)
    rng = np.random.default_rng(5)
    douts = tuple(np.asarray(1.0, dtype) if o.ndim == 0 else randn(rng, o.shape, dtype)
                  for o in as_tuple(out))
    _, _, o, g = impl.run(douts)
    _, _, to, tg = TorchImpl(wl.torch_fn, args, kw, wl.torch_kw).run(douts)
    return max_rel_err(tuple(as_tuple(o)) + tuple(g), tuple(to) + tuple(tg))


def bench_workload(wl, dtype, opts):
    module_path = opts.generated / f"{wl.module}.py"
    rng = np.random.default_rng(1234)
    args, kw = wl.make(dtype, rng)
    gen = load_by_path(f"symdl_generated_{wl.module}", module_path)
    impls = [NumpyImpl("symdl", gen.forward, gen.backward, args, kw)]
    if wl.module in ref.REFERENCES:
        fwd, bwd = ref.REFERENCES[wl.module]
        impls.append(NumpyImpl("numpy", fwd, bwd, args, kw))
    if torch is not None and not opts.no_torch:
        impls.append(TorchImpl(wl.torch_fn, args, kw, wl.torch_kw))

    # douts: random for every output, 1 for scalar losses (same for all implementations)
    out, _ = gen.forward(*args, **kw)
    douts = tuple(np.asarray(1.0, dtype) if o.ndim == 0 else randn(rng, o.shape, dtype)
                  for o in as_tuple(out))
    del out

    # correctness (and cache size) first; this run also serves as the first warm-up
    results, cache_mb = {}, {}
    for impl in impls:
        _, _, o, g, cache_mb[impl.name] = impl.run(douts, measure_cache=True)
        results[impl.name] = tuple(as_tuple(o)) + tuple(g)
    base = "numpy" if "numpy" in results else ("torch" if "torch" in results else None)
    errs = {}
    if base:
        for name in results:
            if name != base:
                errs[name] = max_rel_err(results[name], results[base])
        if "torch" in results and base != "torch":
            errs["numpy"] = max_rel_err(results["numpy"], results["torch"])
    del results

    # warm-up, then a round count sized to a time budget, rounds interleaved across impls
    est = 0.0
    for impl in impls:
        for _ in range(max(opts.warmup - 1, 1)):
            tf, tb, _, _ = impl.run(douts)
        est += tf + tb
    reps = max(opts.min_reps, min(opts.max_reps, math.ceil(opts.budget / max(est, 1e-9))))
    times = {impl.name: ([], [], []) for impl in impls}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(impls)
            for impl in impls[k:] + impls[:k]:  # rotate the order every round
                tf, tb, _, _ = impl.run(douts)
                t = times[impl.name]
                t[0].append(tf)
                t[1].append(tb)
                t[2].append(tf + tb)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()

    row = {"workload": wl.label, "dtype": np.dtype(dtype).name, "reps": reps, "bound": wl.bound,
           "errs": errs}
    cost_f, cost_b = wl.cost(args, kw, np.dtype(dtype).itemsize)
    roof = opts.roofs["gemm"][dtype] * 1e9 if wl.bound == "gemm" else opts.roofs["bw"] * 1e9
    for impl in impls:
        tf, tb, tt = (statistics.median(v) for v in times[impl.name])
        q1, _, q3 = statistics.quantiles(times[impl.name][2], n=4) if reps >= 4 else (tt, tt, tt)
        row[impl.name] = {
            "fwd": tf * 1e3, "bwd": tb * 1e3, "total": tt * 1e3,
            "best": min(times[impl.name][2]) * 1e3,
            "spread": (q3 - q1) / tt,
            "roof": (cost_f + cost_b) / tt / roof,
            "bwd_fwd": tb / tf,
            "cache_mb": cache_mb[impl.name],
        }
    return row


# ============================================================================ reporting

IMPLS = ("symdl", "numpy", "torch")


def fmt(x, nd=2):
    if x is None:
        return "-"
    if x == math.inf:
        return "inf"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}f}"


def table_rows(rows):
    head = ["workload", "dtype",
            "symdl f", "b", "f+b",
            "numpy f", "b", "f+b",
            "torch f", "b", "f+b",
            "sym/np", "sym/pt", "best sym/np", "sym/pt",
            "roof", "%roof sym", "np", "pt",
            "b/f sym", "np", "pt",
            "cache MB sym", "np", "pt",
            "err sym", "err pt", "rounds", "iqr sym"]
    out = []
    for row in rows:
        if "error" in row:
            out.append([row["workload"], row["dtype"], "ERROR: " + row["error"]] + [""] * (len(head) - 3))
            continue
        r = [row["workload"], row["dtype"]]
        for impl in IMPLS:
            d = row.get(impl)
            r += [fmt(d["fwd"]), fmt(d["bwd"]), fmt(d["total"])] if d else ["-"] * 3
        sym = row["symdl"]["total"]
        r.append(fmt(sym / row["numpy"]["total"]) + "x" if "numpy" in row else "-")
        r.append(fmt(sym / row["torch"]["total"]) + "x" if "torch" in row else "-")
        best = row["symdl"]["best"]
        r.append(fmt(best / row["numpy"]["best"]) + "x" if "numpy" in row else "-")
        r.append(fmt(best / row["torch"]["best"]) + "x" if "torch" in row else "-")
        r.append("GEMM" if row["bound"] == "gemm" else "BW")
        r += [f"{100 * row[i]['roof']:.0f}%" if i in row else "-" for i in IMPLS]
        r += [fmt(row[i]["bwd_fwd"]) if i in row else "-" for i in IMPLS]
        r += [fmt(row[i]["cache_mb"], 1) if i in row else "-" for i in IMPLS]
        errs = row["errs"]
        r += [f"{errs['symdl']:.0e}" if "symdl" in errs else "-",
              f"{errs['torch']:.0e}" if "torch" in errs else "-"]
        r += [str(row["reps"]), f"{100 * row['symdl']['spread']:.0f}%"]
        out.append(r)
    return head, out


def print_table(head, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else []
    line = "  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        if r[2].startswith("ERROR"):
            print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
            continue
        print("  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(r, widths))))


def markdown(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(lines)


def machine_facts(opts, roofs):
    facts = [
        ("CPU", f"{cpu_model()}, {os.cpu_count()} logical CPUs"),
        ("Python", platform.python_version()),
        ("NumPy", np.__version__),
        ("NumPy BLAS", opts.blas),
        ("PyTorch", f"{torch.__version__}, {torch.get_num_threads()} threads"
         if torch is not None else "not installed (column skipped)"),
        ("OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE",
         f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')} / "
         f"{os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}"),
        ("thread env", ", ".join(f"{k}={os.environ[k]}" for k in
                                 ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                                 if k in os.environ) or "(none set)"),
    ]
    for dt, g in roofs.get("gemm", {}).items():
        t = roofs["gemm_torch"].get(dt)
        facts.append((f"GEMM peak {np.dtype(dt).name}",
                      f"{g:.1f} GFLOP/s (NumPy 2048^3 matmul, best of run)"
                      + (f"; torch.mm {t:.1f}" if t else "")))
    if "bw" in roofs:
        facts.append(("memory bandwidth",
                      f"{roofs['bw']:.1f} GB/s (best of NumPy copy {roofs['copy']:.1f}, "
                      f"add {roofs['add']:.1f}; 256 MB arrays, single thread like every ufunc)"
                      + (f"; torch copy_ {roofs['copy_torch']:.1f}" if "copy_torch" in roofs
                         else "")))
    facts.append(("reference gelu erf", ref.ERF_SOURCE))
    facts.append(("load average (start -> end)", opts.load))
    return facts


def write_results(path, opts, roofs, head, rows, elapsed, generation=None):
    facts = machine_facts(opts, roofs)
    text = [
        "# symdl benchmark results",
        "",
        f"Command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"({'quick' if opts.quick else 'full'} run, {elapsed:.0f} s."
        + (" Times in ms, each the median over the number of interleaved rounds in the `rounds` "
           "column; see README.md for the columns.)" if rows else ")"),
        "",
    ]
    if rows:
        text += [markdown(head, rows), ""]
    if generation:
        text += [
            "## Generation time",
            "",
            ("Wall time of `python -m symdl ...` in a fresh process, seconds: the whole catalogue "
             "generated without the cache (`--no-cache`) and from a filled cache, and `symdl "
             f"derive` of one custom layer (`{DERIVE_LAYER[1]}`) cold and cached. symdl's "
             "bytecode is compiled once before timing, as `pip install` does."),
            "",
            markdown(GENERATION_HEAD, generation),
            "",
        ]
    text += [
        "## Machine",
        "",
        "| fact | value |",
        "|---|---|",
    ]
    text += [f"| {k} | {v} |" for k, v in facts]
    text += ["", "Generated by benchmarks/run.py; do not edit by hand.", ""]
    path.write_text("\n".join(text))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (>= 3), short warm-up")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="workloads to run, by label or module name (e.g. conv2d, 'conv2d s2', mhsa); "
                        "'generation' selects the generation-time section")
    p.add_argument("--no-generation", action="store_true",
                   help="skip the generation-time section (symdl generate / derive timings)")
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="PyTorch and BLAS threads (default 2)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    p.add_argument("--generated", type=Path, default=ROOT / "generated",
                   help="directory of the generated modules (default: ROOT/generated)")
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--check-references", action="store_true",
                   help="only compare every hand-written NumPy reference with PyTorch (needs "
                        "torch; also for workloads whose generated module does not exist yet)")
    opts = p.parse_args(argv)

    if opts.check_references:
        if torch is None:
            p.error("--check-references needs PyTorch")
        torch.set_num_threads(opts.threads)
        failed = 0
        for dt in {"float32": [np.float32], "float64": [np.float64],
                   "both": [np.float32, np.float64]}[opts.dtype]:
            for wl in WORKLOADS:
                if opts.only and not ({wl.label, wl.module, wl.label.split()[0]} & set(opts.only)):
                    continue
                err = check_reference(wl, dt)
                tol = wl.tol[np.dtype(dt).name]
                failed += err > tol
                print(f"{wl.label:<16} {np.dtype(dt).name:<8} max rel err {err:.1e} "
                      f"{'ok' if err <= tol else f'FAIL (tol {tol:g})'}")
        return 1 if failed else 0

    opts.warmup = 1 if opts.quick else 2
    opts.min_reps = 3 if opts.quick else 10
    opts.max_reps = 10 if opts.quick else 60
    opts.budget = 0.3 if opts.quick else 1.5  # seconds of timed rounds per workload, all impls

    start = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if torch is not None:
        torch.set_num_threads(opts.threads)
    opts.blas = blas_info(set_threads=opts.threads)

    dtypes = {"float32": [np.float32], "float64": [np.float64],
              "both": [np.float32, np.float64]}[opts.dtype]
    want_generation = not opts.no_generation and (not opts.only or "generation" in opts.only)
    wanted = [w for w in WORKLOADS
              if not opts.only or w.label in opts.only or w.module in opts.only
              or w.label.split()[0] in opts.only]
    present = [w for w in wanted if (opts.generated / f"{w.module}.py").exists()]
    missing = sorted({w.module for w in wanted if w not in present})
    print(f"symdl benchmarks: {len(present)} workloads, dtype {opts.dtype}, "
          f"{'quick' if opts.quick else 'full'}; torch "
          f"{torch.__version__ if torch is not None else 'not installed'}")
    if missing:
        print(f"skipped (no generated module yet): {', '.join(missing)}")
    print(f"NumPy BLAS: {opts.blas}")
    if load0 > 0.5:
        print(f"warning: the machine is busy (1-minute load average {load0:.2f} on "
              f"{os.cpu_count()} CPUs): multi-threaded BLAS calls on small matrices can be many "
              "times slower and noisier than on an idle machine; compare the 'best' columns, "
              "rerun when idle, or try --threads 1")

    roofs = measure_roofs(dtypes, opts.quick) if present else {}
    opts.roofs = roofs
    if present:
        for dt in dtypes:
            print(f"GEMM peak {np.dtype(dt).name}: {roofs['gemm'][dt]:.1f} GFLOP/s", end="; ")
        print(f"memory bandwidth: {roofs['bw']:.1f} GB/s")
    print()

    rows = []
    for dt in dtypes:
        for wl in present:
            t = time.perf_counter()
            try:
                row = bench_workload(wl, dt, opts)
            except Exception as exc:  # report and keep going
                row = {"workload": wl.label, "dtype": np.dtype(dt).name,
                       "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            tol = wl.tol[np.dtype(dt).name]
            bad = [k for k, v in row.get("errs", {}).items() if v > tol]
            print(f"  {wl.label:<16} {np.dtype(dt).name:<8} {time.perf_counter() - t:5.1f} s"
                  + (f"  MISMATCH {bad} (tol {tol:g})" if bad else "")
                  + (f"  {row['error']}" if "error" in row else ""), flush=True)
    print()

    generation = None
    if want_generation:
        t = time.perf_counter()
        print("generation time (fresh processes: symdl generate, symdl derive) ...", flush=True)
        try:
            generation = generation_times(opts.quick)
        except (RuntimeError, OSError) as exc:  # report and keep going
            generation = [["ERROR", f"{type(exc).__name__}: {exc}", "", "", "", "", ""]]
        print(f"  generation       {time.perf_counter() - t:5.1f} s\n")

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    opts.load = f"{load0:.2f} -> {load1:.2f} (1-minute; > 0 means other work shared the CPUs)"
    head, table = table_rows(rows)
    if table:
        print_table(head, table)
    if generation:
        print("\ngeneration time, seconds (fresh processes)")
        print_table(GENERATION_HEAD, generation)
    elapsed = time.perf_counter() - start
    write_results(opts.output, opts, roofs, head, table, elapsed, generation)
    print(f"\nwrote {opts.output} ({elapsed:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
