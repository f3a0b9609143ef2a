"""A GAN on a ring of 8 Gaussians, trained with nothing but generated modules.

Generator and discriminator are MLPs (linear, relu / leaky_relu); the losses are
generated/gan_discriminator_loss.py and generated/gan_generator_loss.py (non-saturating), each
network optimised by its own generated/adam.py. The generator's gradient passes through the
discriminator's generated backward. Mode coverage: a mode counts as covered when at least 1% of
the generated samples lie within 3 standard deviations of its centre. Run from the repository
root:

    python examples/gan_2d.py
"""

from __future__ import annotations

import itertools

import _common  # first: one BLAS thread, symdl from this checkout, the Agg backend
import numpy as np

from symdl import nn

MODES = 8
RADIUS = 2.0
STD = 0.02


def centres():
    angles = 2 * np.pi * np.arange(MODES) / MODES
    return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def sample_real(n, rng, dtype):
    """n points: a mode chosen uniformly, plus N(0, STD^2) noise."""
    return (centres()[rng.integers(0, MODES, n)] + STD * rng.standard_normal((n, 2))).astype(dtype)


class MLP(nn.Model):
    """linear -> activation -> linear -> activation -> linear."""

    def __init__(self, sizes, activation, rng, dtype, **keywords):
        self.fcs = [nn.Linear(a, b, rng=rng, dtype=dtype) for a, b in itertools.pairwise(sizes)]
        self.act = nn.Layer(activation, **keywords)

    def forward(self, x):
        *hidden, last = self.fcs
        for fc in hidden:
            x = self.act(fc(x))
        return last(x)


class DiscriminatorObjective(nn.Model):
    def __init__(self, discriminator):
        self.discriminator = discriminator
        self.loss = nn.Layer("gan_discriminator_loss")

    def forward(self, real, fake):
        return self.loss(self.discriminator(real), self.discriminator(fake))


class GeneratorObjective(nn.Model):
    def __init__(self, generator, discriminator):
        self.generator, self.discriminator = generator, discriminator
        self.loss = nn.Layer("gan_generator_loss")

    def forward(self, z):
        return self.loss(self.discriminator(self.generator(z)))


def coverage(samples, threshold=0.01):
    """Per-mode counts of samples within 3 STD of the centre, the covered modes, and the
    fraction of samples within 3 STD of some centre ("high quality")."""
    dist = np.linalg.norm(samples[:, None, :] - centres()[None], axis=2)  # (n, MODES)
    near = dist < 3 * STD
    counts = near.sum(axis=0)
    covered = int(np.sum(counts >= threshold * len(samples)))
    return counts, covered, float(near.any(axis=1).mean())


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--noise", type=int, default=4, help="size of the generator's input")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    dtype, h = np.float32, args.hidden
    generator = MLP((args.noise, h, h, 2), "relu", rng, dtype)
    discriminator = MLP((2, h, h, 1), "leaky_relu", rng, dtype, negative_slope=0.2)
    d_objective = DiscriminatorObjective(discriminator)
    g_objective = GeneratorObjective(generator, discriminator)
    d_opt = nn.Optimizer("adam", discriminator, lr=args.lr, beta1=0.5)
    g_opt = nn.Optimizer("adam", generator, lr=args.lr, beta1=0.5)
    print(
        f"data: {MODES} Gaussians (std {STD}) on a circle of radius {RADIUS}; G {args.noise}-{h}-"
        f"{h}-2 relu, D 2-{h}-{h}-1 leaky_relu(0.2); adam lr {args.lr} beta1 0.5, batch "
        f"{args.batch}, {args.steps} steps"
    )

    def noise(n):
        return rng.standard_normal((n, args.noise)).astype(dtype)

    bar = _common.Progress(args.steps)
    history = {"discriminator loss": ([], []), "generator loss": ([], [])}
    for step in range(1, args.steps + 1):
        # learning rate: linear decay from lr to lr / 20, so the samples settle on the modes
        for opt in (d_opt, g_opt):
            opt.hyperparameters["lr"] = args.lr * (1 - 0.95 * (step - 1) / args.steps)
        # discriminator: real -> 1, fake -> 0 (the fake batch is an input here, a constant)
        fake = generator(noise(args.batch))
        d_loss = d_objective(sample_real(args.batch, rng, dtype), fake)
        d_opt.zero_grad()
        d_objective.backward()
        d_opt.step()
        # generator: through the discriminator's backward to the generator's parameters
        g_loss = g_objective(noise(args.batch))
        g_opt.zero_grad()
        g_objective.backward()  # also fills the discriminator's gradients: zeroed before use
        g_opt.step()
        history["discriminator loss"][0].append(step)
        history["discriminator loss"][1].append(float(d_loss))
        history["generator loss"][0].append(step)
        history["generator loss"][1].append(float(g_loss))
        bar.update(step, f"D {float(d_loss):.3f} G {float(g_loss):.3f}")

    samples = generator(noise(2500)).astype(np.float64)
    counts, covered, quality = coverage(samples)
    _common.save_curves(
        args.out, "gan_2d_loss.png", history, "step", "loss (nats)",
        "GAN on 8 Gaussians (symdl generated modules)",
    )  # fmt: skip
    fig, ax = _common.plt.subplots(figsize=(5, 5))
    real = sample_real(2500, np.random.default_rng(1), np.float64)
    ax.scatter(*real.T, s=2, alpha=0.5, label="real")
    ax.scatter(*samples.T, s=2, alpha=0.5, label="generated")
    ax.set(aspect="equal", title=f"{covered}/{MODES} modes covered")
    ax.legend(loc="upper right", markerscale=4)
    _common.save_figure(fig, args.out, "gan_2d_samples.png")
    print(f"samples within 3 std of each mode (of 2500): {counts.tolist()}")
    print(
        f"gan_2d: {covered}/{MODES} modes covered, {quality:.1%} of samples within 3 std of a "
        f"mode, final D loss {float(d_loss):.3f}, G loss {float(g_loss):.3f}, "
        f"{bar.elapsed():.1f} s"
    )


if __name__ == "__main__":
    main()
