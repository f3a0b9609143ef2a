"""symdl.nn: models built from generated modules train exactly like the same models in PyTorch,
and a composed model's backward agrees with finite differences."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest
from conftest import ROOT

from symdl import nn

RTOL = 1e-9
STEPS = 4


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


# ---- the models -------------------------------------------------------------------------------


class MLP(nn.Model):
    def __init__(self, rng, sizes=(12, 16, 5), dtype=np.float64):
        self.fc1 = nn.Linear(sizes[0], sizes[1], rng=rng, dtype=dtype)
        self.act = nn.Layer("relu")
        self.fc2 = nn.Linear(sizes[1], sizes[2], rng=rng, dtype=dtype)
        self.loss = nn.Layer("cross_entropy")

    def forward(self, x, target):
        return self.loss(self.fc2(self.act(self.fc1(x))), target=target)


class CNN(nn.Model):
    def __init__(self, rng, dtype=np.float64):
        self.conv = nn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=dtype)
        self.act = nn.Layer("relu")
        self.pool = nn.Layer("max_pool2d", kernel_size=2)
        self.fc = nn.Linear(3 * 3 * 2, 4, rng=rng, dtype=dtype)
        self.loss = nn.Layer("cross_entropy")

    def forward(self, x, target):  # x (N, 2, 6, 4)
        h = self.pool(self.act(self.conv(x)))
        return self.loss(self.fc(nn.flatten(h)), target=target)


class CharLSTM(nn.Model):
    """embedding -> LSTM (generated/lstm.py, or lstm_cell.py looped over time) -> linear."""

    def __init__(self, rng, vocab=7, dim=3, hidden=5, cell=False):
        self.embed = nn.Embedding(vocab, dim, rng=rng)
        self.rnn = nn.LSTMCell(dim, hidden, rng=rng) if cell else nn.LSTM(dim, hidden, rng=rng)
        self.out = nn.Linear(hidden, vocab, rng=rng)
        self.loss = nn.Layer("cross_entropy")
        self.cell, self.hidden = cell, hidden

    def forward(self, tokens, targets):
        h = c = np.zeros((tokens.shape[1], self.hidden))
        if self.cell:
            hs = []
            for t in range(len(tokens)):
                h, c = self.rnn(self.embed(indices=tokens[t]), h, c)
                hs.append(h)
            ys = nn.stack(hs)
        else:
            ys, h, c = self.rnn(self.embed(indices=tokens), h, c)
        logits = self.out(nn.reshape(ys, (-1, self.hidden)))
        return self.loss(logits, target=targets.reshape(-1))


class GAN:
    """A generator and a discriminator (with (N,) logits) and their two objectives."""

    def __init__(self, rng):
        self.g = nn.Sequential(
            nn.Linear(3, 6, rng=rng), nn.Layer("relu"), nn.Linear(6, 2, rng=rng)
        )
        self.d = nn.Sequential(
            nn.Linear(2, 5, rng=rng),
            nn.Layer("leaky_relu", negative_slope=0.2),
            nn.Linear(5, 1, rng=rng),
            _to_vector,
        )
        self.d_objective = _DObjective(self.d)
        self.g_objective = _GObjective(self.g, self.d)


def _to_vector(x):
    """(N, 1) logits -> (N,), recorded."""
    return nn.reshape(x, (-1,))


class _DObjective(nn.Model):
    def __init__(self, d):
        self.d, self.loss = d, nn.Layer("gan_discriminator_loss")

    def forward(self, real, fake):
        return self.loss(self.d(real), self.d(fake))


class _GObjective(nn.Model):
    def __init__(self, g, d):
        self.g, self.d, self.loss = g, d, nn.Layer("gan_generator_loss")

    def forward(self, z):
        return self.loss(self.d(self.g(z)))


def _train(model, opt, batches):
    losses = []
    for batch in batches:
        losses.append(float(model(*batch)))
        opt.zero_grad()
        model.backward()
        opt.step()
    return losses


def _torch_train(torch, loss_fn, params, opt, batches):
    losses = []
    for batch in batches:
        loss = loss_fn(*(torch.from_numpy(np.asarray(b)) for b in batch))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def _assert_same(model, torch_params, losses, torch_losses):
    np.testing.assert_allclose(losses, torch_losses, rtol=RTOL)
    ours = model.parameters()
    assert [p.name for p in ours] == list(torch_params)
    for p in ours:
        np.testing.assert_allclose(
            p.value, torch_params[p.name].detach().numpy(), rtol=RTOL, atol=1e-12, err_msg=p.name
        )


def _tensor(torch, array):
    return torch.nn.Parameter(torch.tensor(array, dtype=torch.float64))


# ---- training agrees with PyTorch -------------------------------------------------------------


def test_mlp_adam_matches_torch(torch, rng):
    model = MLP(rng)
    batches = [(rng.normal(size=(8, 12)), rng.integers(0, 5, 8)) for _ in range(STEPS)]
    tp = {p.name: _tensor(torch, p.value) for p in model.parameters()}

    def torch_loss(x, y):
        h = torch.relu(x @ tp["fc1.weight"].T + tp["fc1.bias"])
        return torch.nn.functional.cross_entropy(h @ tp["fc2.weight"].T + tp["fc2.bias"], y)

    torch_losses = _torch_train(
        torch, torch_loss, tp, torch.optim.Adam(tp.values(), lr=0.01), batches
    )
    losses = _train(model, nn.Optimizer("adam", model, lr=0.01), batches)
    _assert_same(model, tp, losses, torch_losses)


def test_cnn_sgd_momentum_matches_torch(torch, rng):
    model = CNN(rng)
    batches = [(rng.normal(size=(5, 2, 6, 4)), rng.integers(0, 4, 5)) for _ in range(STEPS)]
    tp = {p.name: _tensor(torch, p.value) for p in model.parameters()}
    F = torch.nn.functional

    def torch_loss(x, y):
        h = F.max_pool2d(F.relu(F.conv2d(x, tp["conv.weight"], tp["conv.bias"], padding=1)), 2)
        return F.cross_entropy(F.linear(h.flatten(1), tp["fc.weight"], tp["fc.bias"]), y)

    hyper = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    torch_opt = torch.optim.SGD(tp.values(), **hyper)
    torch_losses = _torch_train(torch, torch_loss, tp, torch_opt, batches)
    losses = _train(model, nn.Optimizer("sgd_momentum", model, **hyper), batches)
    _assert_same(model, tp, losses, torch_losses)


@pytest.mark.parametrize("cell", [False, True], ids=["lstm", "lstm_cell-loop"])
def test_char_lstm_adam_matches_torch(torch, rng, cell):
    if not cell:
        try:
            nn.load("lstm")
        except FileNotFoundError:
            pytest.skip("generated/lstm.py does not exist")
    model = CharLSTM(rng, cell=cell)
    batches = [(rng.integers(0, 7, (6, 3)), rng.integers(0, 7, (6, 3))) for _ in range(STEPS)]
    ours = model.parameters()
    names = ["embed.weight", *(f"rnn.{n}" for n in model.rnn.values), "out.weight", "out.bias"]
    assert [p.name for p in ours] == names
    embed = torch.nn.Embedding(7, 3).double()
    lstm = torch.nn.LSTM(3, 5).double()
    out = torch.nn.Linear(5, 7).double()
    theirs = [embed.weight, *(getattr(lstm, f"{n}_l0") for n in model.rnn.values), out.weight]
    theirs.append(out.bias)
    with torch.no_grad():
        for p, t in zip(ours, theirs):
            t.copy_(torch.from_numpy(p.value))

    def torch_loss(tokens, targets):
        ys, _ = lstm(embed(tokens))
        return torch.nn.functional.cross_entropy(out(ys.reshape(-1, 5)), targets.reshape(-1))

    torch_losses = _torch_train(
        torch, torch_loss, None, torch.optim.Adam(theirs, lr=0.05), batches
    )
    losses = _train(model, nn.Optimizer("adam", model, lr=0.05), batches)
    _assert_same(model, dict(zip(names, theirs)), losses, torch_losses)


def test_gan_steps_match_torch(torch, rng):
    gan = GAN(rng)
    tg = [_tensor(torch, p.value) for p in gan.g.parameters()]
    td = [_tensor(torch, p.value) for p in gan.d.parameters()]
    F = torch.nn.functional

    def g(z):
        return F.linear(F.relu(F.linear(z, tg[0], tg[1])), tg[2], tg[3])

    def d(x):
        return F.linear(F.leaky_relu(F.linear(x, td[0], td[1]), 0.2), td[2], td[3])[:, 0]

    hyper = {"lr": 0.01, "beta1": 0.5}
    g_opt, d_opt = nn.Optimizer("adam", gan.g, **hyper), nn.Optimizer("adam", gan.d, **hyper)
    tg_opt = torch.optim.Adam(tg, lr=0.01, betas=(0.5, 0.999))
    td_opt = torch.optim.Adam(td, lr=0.01, betas=(0.5, 0.999))
    for _ in range(STEPS):
        real, z1, z2 = rng.normal(size=(6, 2)), rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
        fake = gan.g(z1)
        d_loss = gan.d_objective(real, fake)
        d_opt.zero_grad()
        gan.d_objective.backward()
        d_opt.step()
        g_loss = gan.g_objective(z2)
        g_opt.zero_grad()
        gan.g_objective.backward()
        g_opt.step()

        real_logits, fake_logits = d(torch.from_numpy(real)), d(g(torch.from_numpy(z1)).detach())
        t_d_loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        td_opt.zero_grad()
        t_d_loss.backward()
        td_opt.step()
        t_g_loss = F.softplus(-d(g(torch.from_numpy(z2)))).mean()
        tg_opt.zero_grad()
        t_g_loss.backward()
        tg_opt.step()
        np.testing.assert_allclose([d_loss, g_loss], [t_d_loss.item(), t_g_loss.item()], rtol=RTOL)
    for p, t in zip(gan.g.parameters() + gan.d.parameters(), tg + td):
        np.testing.assert_allclose(p.value, t.detach().numpy(), rtol=RTOL, atol=1e-12)


def test_initialisation_follows_torch_bounds(rng):
    linear = nn.Linear(50, 40, rng=rng)
    conv = nn.Conv2d(3, 8, 5, rng=rng)
    lstm = nn.LSTMCell(6, 30, rng=rng)
    for array, bound in [
        (linear.weight, 50**-0.5),
        (linear.bias, 50**-0.5),
        (conv.weight, 75**-0.5),
        (conv.bias, 75**-0.5),
        *((v, 30**-0.5) for v in lstm.values.values()),
    ]:
        assert np.abs(array).max() <= bound
        assert np.abs(array).max() > 0.8 * bound  # spread over the whole interval
    assert lstm.weight_ih.shape == (120, 6) and lstm.weight_hh.shape == (120, 30)
    norm = nn.LayerNorm(7)
    assert np.all(norm.weight == 1) and np.all(norm.bias == 0)
    assert list(nn.RMSNorm(4).values) == ["weight"]


# ---- gradients of composed models -------------------------------------------------------------


def test_check_gradients_of_composed_models(rng):
    cnn = CNN(rng, dtype=np.float32)
    before = {p.name: (p.value.copy(), p.value.dtype) for p in cnn.parameters()}
    result = nn.check_gradients(cnn, (rng.normal(size=(3, 2, 6, 4)), rng.integers(0, 4, 3)))
    assert result.ok, str(result)
    assert set(result.errors) == {*before, "input 0"}
    for p in cnn.parameters():  # the float32 parameters are back, unchanged
        assert p.value.dtype == np.float32
        np.testing.assert_array_equal(p.value, before[p.name][0])

    lstm = CharLSTM(rng, cell=True)
    tokens = rng.integers(0, 7, (4, 2))
    assert nn.check_gradients(lstm, (tokens, rng.integers(0, 7, (4, 2)))).ok

    gan = GAN(rng)
    assert nn.check_gradients(gan.g_objective, (rng.normal(size=(5, 3)),)).ok
    result = nn.check_gradients(
        gan.d_objective, (rng.normal(size=(4, 2)), rng.normal(size=(3, 2)))
    )
    assert result.ok and {"input 0", "input 1"} <= set(result.errors)

    seq = nn.Sequential(nn.Linear(4, 5, rng=rng), nn.LayerNorm(5), nn.Layer("tanh"))
    assert nn.check_gradients(seq, (rng.normal(size=(3, 4)),)).ok
    state = (rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), rng.normal(size=(2, 2)))
    assert nn.check_gradients(nn.LSTMCell(3, 2, rng=rng), state).ok  # a layer on its own


def test_check_gradients_finds_a_wrong_backward(rng):
    class Wrong(nn.Model):
        def __init__(self):
            self.fc = nn.Linear(3, 2, rng=rng)

        def forward(self, x):
            h = self.fc(x)
            y = h + 0.0
            nn.record((h,), y, lambda dy: (2 * dy,))
            return y

    result = nn.check_gradients(Wrong(), (rng.normal(size=(4, 3)),))
    assert not result.ok
    assert result.errors["fc.weight"] > 0.1


# ---- the runtime's contract -------------------------------------------------------------------


def test_tape_and_model_rules(rng):
    model = MLP(rng)
    x, y = rng.normal(size=(3, 12)), rng.integers(0, 5, 3)
    with pytest.raises(RuntimeError, match="requires a call first"):
        model.backward()
    model(x, y)
    dx, dy = model.backward()
    assert dx.shape == x.shape and dy is None  # integer targets get no gradient
    with pytest.raises(RuntimeError, match="requires a call first"):
        model.backward()
    seq = nn.Sequential(nn.Linear(2, 3, rng=rng))
    seq(np.ones((4, 2)))
    with pytest.raises(ValueError, match="requires dout"):
        seq.backward()
    # a layer outside any tape just runs forward
    assert nn.Layer("relu")(np.array([-1.0, 2.0])).tolist() == [0.0, 2.0]


def test_gradients_accumulate_over_shared_layers(rng):
    fc = nn.Linear(3, 3, rng=rng)

    class Twice(nn.Model):
        def __init__(self):
            self.first, self.again = fc, fc

        def forward(self, x):
            return self.again(self.first(x))

    model = Twice()
    assert [p.name for p in model.parameters()] == ["first.weight", "first.bias"]
    assert nn.check_gradients(model, (rng.normal(size=(2, 3)),)).ok


def test_errors_name_the_problem(rng, tmp_path):
    with pytest.raises(FileNotFoundError, match="no generated module 'nonesuch'") as err:
        nn.load("nonesuch")
    assert "symdl derive nonesuch" in str(err.value)  # not in the catalogue: derive it
    with pytest.raises(FileNotFoundError, match="symdl generate lstm"):
        nn.load("lstm", directory=tmp_path)
    with pytest.raises(ValueError, match=r"requires the parameters \(weight, bias\)"):
        nn.Layer("linear", {"weight": np.ones((2, 2))})
    with pytest.raises(TypeError, match="unknown keyword kernel"):
        nn.Layer("relu", kernel=2)
    with pytest.raises(TypeError, match="requires lr"):
        nn.Optimizer("sgd", MLP(rng))
    with pytest.raises(TypeError, match="unknown hyperparameter betas"):
        nn.Optimizer("adam", MLP(rng), betas=(0.9, 0.99))
    with pytest.raises(TypeError, match=r"takes 1 input\(s\) \(x\), got 2"):
        nn.Layer("relu")(np.ones(2), np.ones(2))


def test_load_by_path_and_directory(tmp_path):
    source = ROOT / "generated" / "relu.py"
    copy = tmp_path / "relu.py"
    copy.write_text(source.read_text())
    by_dir = nn.load("relu", directory=tmp_path)
    assert by_dir is nn.load(str(copy))
    assert by_dir is not nn.load("relu")  # a different file is a different module
    assert nn.Layer(by_dir)(np.array([-3.0])).tolist() == [0.0]


# ---- the examples run -------------------------------------------------------------------------

EXAMPLES = {
    "mlp_digits": ["--epochs", "1"],
    "cnn_digits": ["--epochs", "1"],
    "char_lstm": ["--steps", "3", "--cell"],
    "gan_2d": ["--steps", "3"],
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs(name, tmp_path):
    for package in ("sklearn", "matplotlib"):
        if find_spec(package) is None:
            pytest.skip(f"the examples require {package} (pip install '.[examples]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--out", str(tmp_path)]
    done = subprocess.run(
        cmd + EXAMPLES[name], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(f"{name}: ")
    assert list(tmp_path.glob("*.png"))
