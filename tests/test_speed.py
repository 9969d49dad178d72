"""The faster formulations give the results of the slower ones they replace (issue 10). Speed itself is measured
in benchmarks/training.py; these tests only check that nothing changed but the time."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from aetrack import data as datasets
from aetrack.config import ConfigError, TrainConfig
from aetrack.losses import reconstruction_nll, to_image
from aetrack.models import build_model
from aetrack.penalties import hutchinson_frobenius_sq, jacobian_frobenius_sq
from aetrack.training import fit


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


# --- the Bernoulli likelihood ---

def test_bernoulli_nll_equals_torch_bce_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (4 * torch.randn(16, 1, 8, 8, dtype=torch.float64)).requires_grad_(True)
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    ours = reconstruction_nll(logits, x, "bernoulli")
    theirs = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(-1)
    assert ours.dtype == torch.float64  # double stays double (evaluation checks its sums in it)
    assert torch.allclose(ours, theirs.double(), rtol=1e-5, atol=1e-4)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    assert torch.allclose(grad_ours.double(), (torch.sigmoid(logits) - x).detach(), atol=1e-6)


def test_bernoulli_nll_is_finite_at_extreme_logits_and_twice_differentiable():
    logits = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]], requires_grad=True)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0]])
    nll = reconstruction_nll(logits, x, "bernoulli")
    assert torch.isfinite(nll).all()
    assert torch.allclose(nll, F.binary_cross_entropy_with_logits(logits, x, reduction="sum").view(1), rtol=1e-6)
    (grad,) = torch.autograd.grad(nll.sum(), logits, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), logits)
    p = torch.sigmoid(logits.detach())
    assert torch.allclose(second, p * (1 - p), atol=1e-6)  # d^2/dl^2 softplus(l) = sigmoid'(l)


# --- the contractive penalty ---

def old_jacobian_frobenius_sq(code_fn, x):
    """The penalty as it was before issue 10: the code recomputed from a fresh copy of x."""
    training = torch.is_grad_enabled()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        code = code_fn(x)
        basis = torch.eye(code.shape[-1], device=x.device, dtype=code.dtype)
        cotangents = basis.unsqueeze(1).expand(-1, code.shape[0], -1)
        (rows,) = torch.autograd.grad(code, x, cotangents, is_grads_batched=True, create_graph=training)
    return rows.pow(2).flatten(2).sum(-1).sum(0)


def cae(arch="mlp", **settings):
    config = TrainConfig(model="cae", arch=arch, hidden=(32, 16), latent_dim=6, contractive_weight=0.5, **settings)
    torch.manual_seed(0)
    return build_model(config, (1, 8, 8), 10)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_contractive_penalty_sharing_the_forward_pass_equals_the_old_one_in_value_and_gradient(digits, arch):
    model = cae(arch)
    x = digits.train_x[:32]
    out = model(x)
    old = 0.5 * old_jacobian_frobenius_sq(model.encode, x).mean()
    assert torch.allclose(out.parts["penalty"], old, rtol=1e-5)
    new_grads = torch.autograd.grad(out.parts["penalty"], list(model.encoder.parameters()))
    old_grads = torch.autograd.grad(old, list(model.encoder.parameters()))
    for new, before in zip(new_grads, old_grads):
        assert torch.allclose(new, before, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # validation: no graph from the forward pass, the code is recomputed
        assert torch.allclose(model(x).parts["penalty"], old.detach(), rtol=1e-5)


def test_contractive_penalty_does_not_change_the_reconstruction_gradient(digits):
    """x requires grad in the training pass now; the loss's gradients with respect to the weights must not move."""
    model = cae()
    x = digits.train_x[:32]
    out = model(x)
    grads = torch.autograd.grad(out.parts["recon_loss"], list(model.parameters()), allow_unused=True)
    code = model.encode(x)
    recon = reconstruction_nll(model.decoder(code), x, "bernoulli").mean()
    expected = torch.autograd.grad(recon, list(model.parameters()), allow_unused=True)
    for new, before in zip(grads, expected):
        assert (new is None and before is None) or torch.allclose(new, before, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_hutchinson_estimate_agrees_with_the_exact_norm(digits, arch):
    model = cae(arch)
    x = digits.train_x[:4]
    exact = jacobian_frobenius_sq(model.encode, x)
    probes = 4000  # each copy of an example gets its own probe; the mean's relative error is about 1 %
    copies = x.repeat(probes, 1, 1, 1)
    estimates = hutchinson_frobenius_sq(model.encode, copies, generator=torch.Generator().manual_seed(0))
    mean = estimates.view(probes, len(x)).mean(0)
    assert torch.allclose(mean, exact, rtol=0.05), (mean, exact)
    single = estimates.view(probes, len(x))[0]
    assert not torch.allclose(single, exact, rtol=1e-3)  # one probe is an estimate, not the value


def test_contractive_estimator_is_a_setting_the_model_uses(digits):
    with pytest.raises(ConfigError, match="contractive-estimator"):
        TrainConfig(model="cae", contractive_estimator="guess").validate()
    model = cae(contractive_estimator="hutchinson")
    out = model(digits.train_x[:8])
    out.loss.backward()
    assert torch.isfinite(out.parts["penalty"]) and model.encoder.head.weight.grad is not None
    assert TrainConfig.from_params(TrainConfig(contractive_estimator="hutchinson").to_params()).contractive_estimator == "hutchinson"


# --- M2 ---

def old_m2_forward(model, x, y, kl_scale=1.0):
    """M2's loss as it was before issue 10: the encoder's body run for every label, and a whole extra pass
    for the logged parts (which the loss does not use)."""
    kl_weight = model.body.kl_weight(kl_scale)
    labeled = y >= 0
    class_logits = model.classifier(x)
    loss = x.new_zeros(())
    parts = {}

    def bound_of(xs, ys):
        recon, kl, _, _ = model.body.terms(xs, model.cond(ys))
        return recon + kl_weight * kl + math.log(model.num_classes)

    if labeled.any():
        bound = bound_of(x[labeled], y[labeled])
        ce = F.cross_entropy(class_logits[labeled], y[labeled])
        loss = loss + bound.mean() + model.config.classifier_weight * model.config.labeled * ce
        parts.update(labeled_bound=bound.mean(), classifier_loss=ce)
    if (~labeled).any():
        xu = x[~labeled]
        probs = torch.softmax(class_logits[~labeled], -1)
        n, k = xu.shape[0], model.num_classes
        ys = torch.arange(k).repeat_interleave(n)
        bound = bound_of(xu.repeat(k, *([1] * (x.dim() - 1))), ys).view(k, n).T
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        unlabeled_bound = (probs * bound).sum(-1) - entropy
        loss = loss + unlabeled_bound.mean()
        parts["unlabeled_bound"] = unlabeled_bound.mean()
    return loss, parts


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("labels", ["mixed", "all", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_m2_loss_is_unchanged_by_the_rewrite(digits, arch, labels, seed):
    config = TrainConfig(model="m2", arch=arch, hidden=(32, 16), latent_dim=4, labeled=20)
    torch.manual_seed(seed)
    model = build_model(config, digits.shape, digits.num_classes)
    x, y = digits.train_x[:24], digits.train_y[:24].clone()
    y[{"mixed": slice(0, 16), "all": slice(0, 0), "none": slice(None)}[labels]] = -1
    torch.manual_seed(100 + seed)
    new = model(x, y, kl_scale=0.5)
    torch.manual_seed(100 + seed)  # the same reparameterisation noise, drawn in the same order
    old_loss, old_parts = old_m2_forward(model, x, y, kl_scale=0.5)
    assert torch.allclose(new.loss, old_loss, rtol=1e-5)
    for name, value in old_parts.items():
        assert torch.allclose(new.parts[name], value, rtol=1e-5), name
    new_grads = torch.autograd.grad(new.loss, list(model.parameters()), allow_unused=True)
    old_grads = torch.autograd.grad(old_loss, list(model.parameters()), allow_unused=True)
    for after, before in zip(new_grads, old_grads):
        assert (after is None) == (before is None)
        assert after is None or torch.allclose(after, before, rtol=1e-4, atol=1e-5)


def test_m2_logged_parts_come_from_the_loss_passes(digits):
    """recon_loss, kl and neg_elbo are the bound's terms at the known or predicted label, without an extra pass."""
    config = TrainConfig(model="m2", hidden=(32, 16), latent_dim=4, labeled=20)
    torch.manual_seed(0)
    model = build_model(config, digits.shape, digits.num_classes)
    x, y = digits.train_x[:16], digits.train_y[:16].clone()
    y[8:] = -1
    calls = []
    model.body.decoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    out = model(x, y)
    assert calls == [8, 8 * digits.num_classes]  # the labelled pass and the label sum; nothing else
    assert torch.allclose(out.parts["neg_elbo"], out.parts["recon_loss"] + out.parts["kl"])
    assert out.z.shape == (16, 4) and out.recon.shape == x.shape and torch.isfinite(out.z).all()
    predicted = model.classify(x[8:])
    with torch.no_grad():
        assert torch.allclose(out.z[8:], model.encode(x[8:], predicted), atol=1e-5)  # the posterior mean
        assert torch.allclose(out.z[:8], model.encode(x[:8], y[:8]), atol=1e-5)


# --- compact data ---

def test_images_are_held_as_uint8_and_batches_are_float(digits):
    assert digits.train_images.dtype == torch.uint8 and digits.levels == 16
    assert 4 * digits.train_images.nbytes == digits.train_x.nbytes  # a quarter of float32
    x, y = digits.train_batch(torch.tensor([0, 5, 7]))
    assert x.dtype == torch.float32 and torch.equal(x, digits.train_images[[0, 5, 7]].float() / 16)
    assert torch.allclose(digits.mean_image(chunk=100), digits.train_x.mean(0), atol=1e-6)


def test_static_binarization_is_stored_compactly_and_reads_as_zero_or_one():
    binary = datasets.load("digits", binarize="static")
    assert binary.train_images.dtype == torch.uint8
    assert set(binary.train_x.unique().tolist()) == {0.0, 1.0}
    assert set(binary.test_x.unique().tolist()) == {0.0, 1.0}


def test_dynamic_binarization_draws_per_batch_from_the_grey_levels():
    data = datasets.load("digits", binarize="dynamic")
    generator = torch.Generator().manual_seed(0)
    index = torch.arange(64)
    first, _ = data.train_batch(index, generator)
    second, _ = data.train_batch(index, generator)
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    assert torch.all(first <= (data.train_x[index] > 0).float())  # a black pixel is never drawn white


def test_dynamic_binarization_draws_each_pixel_with_its_grey_level_as_probability():
    grey = torch.linspace(0, 1, 17)  # 0 and 1 included: they must stay black and white
    draws = torch.stack([datasets.binary_draw(grey, generator=torch.Generator().manual_seed(seed)) for seed in range(4000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws[:, 0].sum() == 0 and draws[:, -1].sum() == len(draws)
    frequency = draws.mean(0)
    bound = 4 * torch.sqrt(grey * (1 - grey) / len(draws)) + 1e-6  # four standard errors of each frequency
    assert torch.all((frequency - grey).abs() <= bound), (frequency - grey).abs().max()
    bernoulli = torch.stack([torch.bernoulli(grey, generator=torch.Generator().manual_seed(seed)) for seed in range(4000)])
    assert torch.allclose(frequency, bernoulli.mean(0), atol=0.05)  # the same law as the sampler it replaces


# --- precision, compile, devices ---

def short(config: TrainConfig, **settings) -> TrainConfig:
    return replace(config, hidden=(32, 16), latent_dim=4, epochs=2, patience=0, **settings)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_and_keeps_fp32_weights(digits, precision):
    base = short(TrainConfig(model="vae"))
    model, history = fit(replace(base, precision=precision), digits, progress=False)
    _, reference = fit(base, digits, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(history.best_val_loss)
    assert history.epochs[-1]["val_loss"] < history.epochs[0]["val_loss"] + 1.0
    assert abs(history.best_val_loss - reference.best_val_loss) < 0.1 * reference.best_val_loss


def test_precision_and_compile_are_settings_with_cli_flags():
    from click.testing import CliRunner

    from aetrack.cli.train import train

    config = TrainConfig(precision="bf16", compile=True)
    assert TrainConfig.from_params(config.to_params()) == config
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8").validate()
    help_text = CliRunner().invoke(train, ["--help"]).output
    assert "--compile / --no-compile" in help_text and "--precision [fp32|bf16|fp16]" in help_text


def test_compile_trains_the_same_model(digits, monkeypatch):
    """torch.compile is wired to the training forward pass only: the returned model is the plain module with its
    own parameter names. (Compiling itself is left to torch; here `torch.compile` is observed, not run, to keep the
    suite fast on two cores: benchmarks/training.py --part compile times the real thing.)"""
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, history = fit(short(TrainConfig(model="ae"), compile=True), digits, progress=False)
    assert compiled == [model] and not any(name.startswith("_orig_mod") for name in model.state_dict())
    assert math.isfinite(history.best_val_loss)


def test_cuda_is_refused_in_one_line_where_there_is_none():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(ConfigError, match="no CUDA device"):
        TrainConfig(device="cuda").validate()
