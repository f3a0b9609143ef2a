"""The passes between a derivation and the printed module: one table.

Every optimization symdl applies after deriving a layer is a pass listed here once, with the
stage it belongs to, what it requires, whether it is on by default, and what it changes, as one
``before -> after`` line. The lowering, the scan and the cache read their switches from this
table; ``symdl show NAME --passes`` lists the passes applied to a layer and what each changed;
the tests switch each one off alone, and all of them, and compare with the default.

Stages, in pipeline order:

* ``derive``: rewrites of the derivation itself (what the backward reads and how adjoints are
  grouped), before any NumPy is chosen;
* ``lower``: how each indexed statement becomes NumPy (matrix products, views, scatters);
* ``schedule``: how the statements of one function share memory and passes (fused in-place
  chains, cache blocking);
* ``scan``: how a recurrent cell's steps run over time (sequence modules only).

This module imports nothing heavy: the disk cache reads the defaults without importing SymPy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from .errors import LowerError

STAGES = ("derive", "lower", "schedule", "scan")
#: The stages a layer's lowering takes options for (``symdl.lower.lower``).
LOWERING = ("derive", "lower", "schedule")


@dataclasses.dataclass(frozen=True)
class Pass:
    """One optimization: its switch name, stage, one-line ``before -> after``, default, and
    the passes it needs (off when any of them is off)."""

    name: str
    stage: str
    summary: str
    default: bool = True
    requires: tuple[str, ...] = ()


PASSES: tuple[Pass, ...] = (
    # ---- derive: the derivation rewritten ---------------------------------------------------
    Pass(
        "affine_cache",
        "derive",
        "the backward reads erf(x) only as 1 + erf(x) -> the forward caches (1 + erf(x))/2",
    ),
    Pass(
        "output_reuse",
        "derive",
        "dx from exp(x) and the sum again -> from the cached output (e = y s), adjoints held "
        "scaled so the other factors cancel",
    ),
    Pass(
        "common_factor",
        "derive",
        "the same product in several contributions of one adjoint -> computed once",
    ),
    Pass(
        "same_adjoint",
        "derive",
        "an adjoint built by the very same contributions as another -> that array, reused",
    ),
    # ---- lower: statements as NumPy ---------------------------------------------------------
    Pass("matmul", "lower", "np.einsum('ni,oi->no', x, w) -> x @ w.T"),
    Pass("batched_matmul", "lower", "a stack of matrix products in einsum -> a @ b on the stack"),
    Pass("absorb", "lower", "einsum(a, b * c) over a subset -> (a * b) contracted with c"),
    Pass(
        "factor_out",
        "lower",
        "Sum(f[n] * x[n, i], i) -> f[n] * Sum(x[n, i], i) (factors free of the summed index)",
    ),
    Pass("share", "lower", "an identical contraction or scatter value twice -> computed once"),
    Pass("views", "lower", "as_strided over a plain range -> a basic slice x[:, 1:]"),
    Pass(
        "grouped_matmul",
        "lower",
        "an einsum over several summed axes -> one reshaped a @ b",
        default=False,
    ),
    Pass(
        "window_matrix",
        "lower",
        "a window contracted by a product, read again by the backward -> copied once into a "
        "contiguous matrix (im2col) and cached",
    ),
    Pass(
        "scatter_gemm",
        "lower",
        "a window adjoint per kernel offset from separate products -> one product in the "
        "scatter's own order",
    ),
    Pass(
        "running_max",
        "lower",
        "Max over kernel offsets with a full arg-max mask -> a running maximum and an index",
    ),
    Pass(
        "offset_scatter",
        "lower",
        "np.add.at through a window -> slice-adds, looping over kernel offsets only",
    ),
    Pass(
        "gather_adjoint",
        "lower",
        "the adjoint of a sliding read as slice-adds per offset -> one gather and one product",
    ),
    Pass(
        "window_matvec",
        "lower",
        "matrix-vector products over a strided window in einsum -> matmul on the view",
    ),
    Pass("pairwise", "lower", "a sum over 3+ operands -> a chain of shared two-operand products"),
    Pass("inplace", "lower", "y = t + bias -> t += bias (t read nowhere else)"),
    Pass(
        "injective_scatter",
        "lower",
        "np.add.at into targets one per element -> a[i, j] += v",
    ),
    Pass(
        "stack_products",
        "lower",
        "products with adjacent slices w[k*E + c, i] -> one product over w, each a slice",
    ),
    Pass(
        "specialize",
        "lower",
        "masking passes on every call -> a branch: none when no mask is given",
    ),
    Pass(
        "split_reshape",
        "lower",
        "a position h*D + f read block by block -> a reshape of its axis (one GEMM)",
    ),
    Pass(
        "tile",
        "lower",
        "zeros, then one slice-add per block -> each block assigned once (out= its slice)",
    ),
    Pass(
        "ordered_product",
        "lower",
        "(p @ v).transpose(...) copied before the next product -> written in the result's order",
    ),
    Pass("erf_scale", "lower", "erf(c * x) -> _erf(x, c): the scaling inside the helper's blocks"),
    # ---- schedule: memory and passes over it -----------------------------------------------
    Pass(
        "fuse",
        "schedule",
        "dx = dy * y * (1 - y) (three temporaries) -> in-place ufunc chains into one buffer",
    ),
    Pass(
        "blocked",
        "schedule",
        "a chain of full-size passes over arrays beyond the cache -> a loop over cache-sized "
        "blocks",
        requires=("fuse",),
    ),
    Pass(
        "hoist",
        "schedule",
        "an operand of a blocked chain rebuilt per block -> computed once before the loop",
        requires=("blocked",),
    ),
    Pass(
        "masked_inplace",
        "schedule",
        "np.where(c, a, b) allocating -> np.copyto(buffer, value, where=c)",
        requires=("fuse",),
    ),
    Pass(
        "merge_terms",
        "schedule",
        "dx = a; dx += b; dx += c -> dx = one fused sum with its common factors taken out",
        requires=("fuse",),
    ),
    Pass(
        "temporary_slices",
        "schedule",
        "(t @ x[..., None])[..., 0] kept aside -> written in place by later chains",
        requires=("fuse",),
    ),
    # ---- scan: recurrent sequences ----------------------------------------------------------
    Pass(
        "defer",
        "scan",
        "a parameter gradient accumulated every step -> one product over all steps after the "
        "loop",
    ),
    Pass(
        "buffers",
        "scan",
        "each step allocating its arrays -> arrays made once before the loop, written with out=",
    ),
    Pass(
        "fold",
        "scan",
        "a recurrent sum's parameter-only term added every step -> folded into the hoisted "
        "input projection",
    ),
)

TABLE: dict[str, Pass] = {p.name: p for p in PASSES}


def _check_table() -> None:
    for p in PASSES:
        if p.stage not in STAGES:
            raise LowerError(f"pass {p.name!r} requires a stage from {STAGES}, got {p.stage!r}")
        for r in p.requires:
            if r not in TABLE or STAGES.index(TABLE[r].stage) > STAGES.index(p.stage):
                raise LowerError(
                    f"pass {p.name!r} requires passes of its stage or an earlier one, got {r!r}"
                )


_check_table()


def passes(stages: Iterable[str] = STAGES) -> list[Pass]:
    """The passes of ``stages``, in pipeline order: by stage, each after what it requires."""
    stages = tuple(stages)
    out: list[Pass] = []
    for stage in STAGES:
        if stage in stages:
            out += [p for p in PASSES if p.stage == stage]
    return _ordered(out)


def _ordered(items: list[Pass]) -> list[Pass]:
    done: list[Pass] = []
    names = {p.name for p in items}

    def visit(p: Pass, path=()):
        if p in done:
            return
        for r in p.requires:
            if r in names and r not in path:
                visit(TABLE[r], (*path, p.name))
        done.append(p)

    for p in items:
        visit(p)
    return done


def defaults(stages: Iterable[str] = LOWERING) -> dict[str, bool]:
    """Each switch of ``stages`` with its default."""
    return {p.name: p.default for p in passes(stages)}


def resolve(
    options: Mapping[str, bool] | None, base: Mapping[str, bool], what: str = "lowering"
) -> dict[str, bool]:
    """``base`` (the switches in effect) updated by ``options``; a pass whose requirement is
    off is off too. An unknown name is an error listing the known ones."""
    unknown = set(options or {}) - set(base)
    if unknown:
        raise LowerError(
            f"{what} options require names from {', '.join(base)}, got "
            f"{', '.join(sorted(unknown))}"
        )
    out = {**base, **(options or {})}
    changed = True
    while changed:
        changed = False
        for name, on in out.items():
            needs = TABLE[name].requires if name in TABLE else ()
            if on and any(not out.get(r, True) for r in needs):
                out[name] = False
                changed = True
    return out
