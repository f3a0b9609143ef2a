"""Regenerate the coefficients of the NumPy erf helper (symdl/snippets/erf.py).

The helper evaluates, for a = min(|x|, XMAX) (XMAX: erf rounds to 1 beyond it in that dtype),

    erf(a) = G + A * (1 - G),    A = -expm1(-a^2),    G = a + a * P(a) / Q(a),

where G(a) = 1 - erfcx(a) = 1 - exp(a^2) erfc(a). Both terms are >= 0 (no cancellation), the
result depends on G only through exp(-a^2) dG (small where G is large), and the correction
a * P / Q is about a tenth of G for small a, so the rounding errors of P / Q hardly show.

The rational function is fitted here: P0 / Q0 ~ G(a) / a on [0, XMAX], near-minimax in the
error it causes in erf: a relative error e of G / a changes erf by e * w(a) relatively, with
w(a) = exp(-a^2) G(a) / erf(a) (1 at 0, 0.25 at 1, 0.014 at 2), so e is weighted by w (floored
at sqrt(machine epsilon), which keeps the fit sane where erf no longer sees it); this buys two
degrees over a plain relative fit. The fit is linearised weighted least squares
(Sanathanan-Koerner: residual (P0 - f Q0) / Q0_previous) on Chebyshev points followed by
Lawson's reweighting towards the minimax solution, in mpmath at 40 digits. Then
Q = Q0 / (leading coefficient of Q0) is monic (its leading 1 is not stored: one multiply less in
Horner's scheme) and P = P0 / (the same) - Q, whose leading coefficient is -1 as P0 has the
lower degree (not stored either). Coefficients are listed from degree 0 upwards; float32's are
rounded to float32 (the helper computes float32 input in float32).

    python benchmarks/fit_erf.py      # prints the coefficients and the fit errors (about 1 min)

Needs mpmath (SymPy depends on it) and NumPy.
"""

import mpmath as mp
import numpy as np

mp.mp.dps = 40

#: dtype -> (degree of P0, degree of Q0, XMAX)
CASES = {"float64": (6, 7, 6.0), "float32": (3, 4, 4.0)}


def g_over_a(a):
    """(1 - erfcx(a)) / a, with its limit 2 / sqrt(pi) at 0."""
    if a == 0:
        return 2 / mp.sqrt(mp.pi)
    return (1 - mp.exp(a * a) * mp.erfc(a)) / a


def weight(a, floor):
    """exp(-a^2) G(a) / erf(a), at least ``floor``: how much of a relative error of G / a
    reaches erf."""
    if a == 0:
        return mp.mpf(1)
    return max(mp.exp(-a * a) * a * g_over_a(a) / mp.erf(a), mp.mpf(floor))


def fit(f, w, hi, m, n, points=150, linearised=8, lawson=30):
    """(worst weighted relative error, P0, Q0): P0 of degree m, Q0 of degree n with Q0(0) = 1,
    P0 / Q0 ~ f on [0, hi] with the relative error times w near-minimal; coefficients from
    degree 0 upwards."""
    xs = [hi / 2 * (1 - mp.cos(mp.pi * k / (points - 1))) for k in range(points)]
    fs = [f(x) for x in xs]
    ws = [w(x) for x in xs]
    lawson_w = [mp.mpf(1)] * points
    q_prev = [mp.mpf(1)] * points
    best = None
    for it in range(linearised + lawson):
        rows, rhs = [], []
        for x, fx, wx, lw, qp in zip(xs, fs, ws, lawson_w, q_prev):
            s = mp.sqrt(lw) * wx / (qp * fx)
            rows.append(
                [s * x**j for j in range(m + 1)] + [-s * fx * x**j for j in range(1, n + 1)]
            )
            rhs.append(s * fx)
        sol, _ = mp.qr_solve(mp.matrix(rows), mp.matrix(rhs))
        p = [sol[j] for j in range(m + 1)]
        q = [mp.mpf(1)] + [sol[m + j] for j in range(1, n + 1)]
        q_prev = [mp.polyval(q[::-1], x) for x in xs]
        err = [
            wx * (mp.polyval(p[::-1], x) / qx - fx) / fx
            for x, fx, wx, qx in zip(xs, fs, ws, q_prev)
        ]
        worst = max(abs(e) for e in err)
        if best is None or worst < best[0]:
            best = (worst, p, q)
        if it >= linearised:  # Lawson: each point's weight times its share of the error
            total = sum(lw * abs(e) for lw, e in zip(lawson_w, err))
            lawson_w = [lw * abs(e) / total for lw, e in zip(lawson_w, err)]
    return best


def helper_coefficients(dtype, m, n, xmax):
    """(worst weighted relative error of the fit, P, Q) as the helper stores them."""
    assert m < n, "the numerator's degree must be the lower: P's leading coefficient is -1"
    floor = mp.sqrt(mp.mpf(float(np.finfo(dtype).eps)))
    worst, p0, q0 = fit(g_over_a, lambda a: weight(a, floor), mp.mpf(xmax), m, n)
    lead = q0[-1]
    q = [c / lead for c in q0]
    p = [c / lead for c in p0] + [mp.mpf(0)] * (n - m)
    p = [a - b for a, b in zip(p, q)]
    assert p[-1] == -1 and q[-1] == 1
    rounded = np.float32 if dtype == "float32" else np.float64
    return worst, [rounded(float(c)) for c in p[:-1]], [rounded(float(c)) for c in q[:-1]]


def main():
    for dtype, (m, n, xmax) in CASES.items():
        worst, p, q = helper_coefficients(dtype, m, n, xmax)
        print(
            f"# {dtype}: P0/Q0 of degrees {m}/{n} on [0, {xmax}], max weighted relative "
            f"error {mp.nstr(worst, 3)}"
        )
        print(f"p = ({', '.join(str(c) for c in p)})")
        print(f"q = ({', '.join(str(c) for c in q)})")


if __name__ == "__main__":
    main()
