import numpy as np


def _erf(x, scale=1.0):
    """Vectorized error function erf(scale * x), NumPy only, with no branch on the values:
    the same passes over every element, no masks, gathers or scatters.

    For a = min(|scale * x|, XMAX), where XMAX is 6 in float64 and 4 in float32 (beyond it
    erf rounds to 1):

        erf(a) = G + A (1 - G),    A = -expm1(-a^2),    G = a + a P(a) / Q(a),

    with G(a) ~ 1 - erfcx(a) = 1 - exp(a^2) erfc(a), and the sign of x restored at the end
    (bitwise: erf(-0.0) = -0.0). Both terms are >= 0, so nothing cancels; an error in G
    reaches erf only as exp(-a^2) times that error; and a P / Q is about a tenth of G for
    small a. P / Q ~ G(a) / a - 1 is a rational fit, near-minimax in the relative error it
    causes in erf, made by benchmarks/fit_erf.py, which regenerates the coefficients below.
    Max error: 2 ulp (3.1e-16 relative) in float64, 2.05 ulp in float32 (all float32 inputs).

    float32 input is computed in float32, other input in float64; the result has the input's
    floating dtype (float64 for non-float input) and shape, always as an ndarray (0-d for
    scalar input). erf(+-inf) = +-1, erf(nan) = nan, and no overflow, invalid or
    divide-by-zero floating-point warning occurs for any input. ``scale`` is applied block by
    block (no full-size temporary for the scaled argument), with the same result as
    ``_erf(scale * x)``.
    """
    x = np.asarray(x)
    out_dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    # Coefficients from degree 0 upwards; Q is monic and P's leading coefficient is -1 (neither
    # stored): both of degree 7 in float64, 4 in float32.
    if out_dtype == np.float32:
        work, bits, xmax = np.dtype(np.float32), np.uint32, 4.0
        p = (1.5844811, -9.338971, -11.822731, -5.5419126)
        q = (12.342198, 23.393404, 17.808483, 6.5413613)
    else:
        work, bits, xmax = np.dtype(np.float64), np.uint64, 6.0
        p = (
            71.94443849398584,
            -381.56123496293833,
            -773.901003507441,
            -645.3957850283145,
            -302.83376228906707,
            -85.26751114646967,
            -13.746651731780492,
        )
        q = (
            560.4058674135191,
            1393.0969992781356,
            1539.4174120045213,
            983.5199567416935,
            393.9651749314381,
            99.44988281497989,
            14.74665471474452,
        )
    sign_bit = bits(1) << bits(8 * work.itemsize - 1)
    s = abs(float(scale))

    # Blocks of the flattened input (a loop over blocks, not over elements): the temporaries
    # stay in cache, which makes the ~35 passes several times faster on large arrays.
    xf = x.ravel()
    y = np.empty(xf.shape, dtype=out_dtype)
    step = 1 << 15
    size = min(step, xf.size)
    a_buf, z_buf, num_buf, den_buf = np.empty((4, size), dtype=work)
    sign_buf = np.empty(size, dtype=bits)
    for k in range(0, xf.size, step):
        block = xf[k : k + step]
        if block.dtype != work:
            block = block.astype(work)
        n = block.size
        a, z, num, den, sign = a_buf[:n], z_buf[:n], num_buf[:n], den_buf[:n], sign_buf[:n]
        np.bitwise_and(block.view(bits), sign_bit, out=sign)
        # a = min(|s x|, xmax), s x never overflowing (clamped first when s > 1)
        np.abs(block, out=a)
        if s > 1.0:
            np.minimum(a, xmax, out=a)
        if s != 1.0:
            a *= s
        np.minimum(a, xmax, out=a)
        # G = a + a P(a) / Q(a), by Horner's scheme
        np.subtract(p[-1], a, out=num)
        for c in p[-2::-1]:
            num *= a
            num += c
        np.add(a, q[-1], out=den)
        for c in q[-2::-1]:
            den *= a
            den += c
        num /= den
        num *= a
        num += a
        # erf = G - m (1 - G), m = expm1(-a^2) = -A
        np.multiply(a, a, out=z)
        np.negative(z, out=z)
        np.expm1(z, out=z)
        np.subtract(1.0, num, out=den)
        den *= z
        out = y[k : k + n] if out_dtype == work else num
        np.subtract(num, den, out=out)
        np.bitwise_or(out.view(bits), sign, out=out.view(bits))
        if out_dtype != work:
            y[k : k + n] = out
    if scale < 0:
        np.negative(y, out=y)
    return y.reshape(x.shape)
