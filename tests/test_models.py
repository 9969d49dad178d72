"""The contract every registered variant keeps, run over the whole registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from aetrack import data as datasets
from aetrack import modelio
from aetrack.config import TrainConfig
from aetrack.data import Splits
from aetrack.models import REGISTRY, build_model
from conftest import STAND_IN_M1, stand_in_m1

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 10
# Every variant with its defaults, plus the settings that change its structure.
SETTINGS = [(name, {}) for name in sorted(REGISTRY)] + [
    ("vae", {"prior": "mog"}), ("vae", {"prior": "uniform"}), ("vae", {"prior": "vamp"}),
    ("vae", {"beta": 4.0, "kl_warmup": 2}), ("cvae", {"prior": "vamp"}), ("sae", {"sparsity": "kl"}),
    ("dae", {"noise": "masking"}), ("dae", {"noise": "salt-pepper"}), ("ae", {"likelihood": "gaussian"}),
    ("vae", {"activation": "tanh"}), ("vae", {"activation": "gated", "prior": "vamp"}), ("m2", {"activation": "softplus"}),
    ("cae", {"activation": "gated"}), ("hvae", {"objective": "iwae", "train_samples": 3}), ("hvae", {"prior": "vamp"}),
    ("hvae", {"prior": "uniform"}), ("hvae", {"activation": "tanh", "latent_hidden": (8, 4), "first_latent_dim": 5}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in extra.items()) for name, extra in SETTINGS]


def make(name: str, extra: dict, arch: str, shape) -> tuple[torch.nn.Module, TrainConfig]:
    hidden = (8, 16) if arch == "conv" else (32, 16)
    config = TrainConfig(model=name, arch=arch, hidden=hidden, latent_dim=3, prior_components=3, labeled=4, **extra)
    torch.manual_seed(0)
    if REGISTRY[name].stacked:  # M2 on a logged VAE's codes is an MLP: the arch asked for is the stand-in VAE's
        return make_stacked(config, shape), dataclasses.replace(config, arch="mlp", features=STAND_IN_M1)
    return build_model(config, shape, NUM_CLASSES), config


def make_stacked(config: TrainConfig, shape) -> torch.nn.Module:
    """A stacked variant (M1+M2) around a stand-in VAE of `config`'s arch, its active units measured on random images."""
    x, y = batch(shape, 64)
    data = Splits("random", x, y, x, y, x, y, tuple(str(c) for c in range(NUM_CLASSES)))
    return build_model(dataclasses.replace(config, arch="mlp", features=STAND_IN_M1), shape, NUM_CLASSES, data=data,
                       load=stand_in_m1(data, config.arch, config.hidden))


def batch(shape, n: int = 6):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, *shape, generator=generator)
    y = torch.arange(n) % NUM_CLASSES
    return x, y


def labels_for(name: str, y: torch.Tensor) -> torch.Tensor:
    # The semi-supervised variant sees a mix of labelled and unlabelled (-1) examples.
    return torch.where(torch.arange(len(y)) % 2 == 0, y, -1) if REGISTRY[name].semi_supervised else y


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "extra"), SETTINGS, ids=IDS)
def test_forward_shapes_and_finite_loss(name, extra, arch, shape):
    model, config = make(name, extra, arch, shape)
    x, y = batch(shape)
    out = model(x, labels_for(name, y), kl_scale=0.5)
    assert out.z.shape == (len(x), config.latent_dim)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert "recon_loss" in out.parts and all(torch.isfinite(v) for v in out.parts.values())
    with torch.no_grad():
        evaluated = model.eval()(x, labels_for(name, y))
    # In training a model may leave out a reconstruction the loss does not need (M1+M2's costs M1's decoder).
    for recon in (out.recon, evaluated.recon) if out.recon is not None else (evaluated.recon,):
        assert recon.shape == x.shape
        assert 0 <= float(recon.min()) and float(recon.max()) <= 1
    assert model.encode(x, y).shape == (len(x), config.latent_dim)
    assert model.decode(model.encode(x, y), y).shape == x.shape


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize(("name", "extra"), SETTINGS, ids=IDS)
def test_one_step_lowers_the_loss_on_a_fixed_batch(name, extra, arch):
    shape = (1, 8, 8)
    model, _ = make(name, extra, arch, shape)
    x, y = batch(shape, 16)
    y = labels_for(name, y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(7)  # the same noise (reparameterisation, corruption) before and after the step
        return model(x, y).loss

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize(("name", "extra"), SETTINGS, ids=IDS)
def test_save_and_reload_give_identical_outputs(tmp_path, name, extra, arch):
    shape = (1, 8, 8)
    model, config = make(name, extra, arch, shape)
    model.eval()
    x, y = batch(shape)
    info = modelio.ModelInfo(config, shape, tuple(str(c) for c in range(NUM_CLASSES)))
    modelio.save(model, info, tmp_path / "model", {"extra.tensor": torch.ones(2)})
    loaded, loaded_info, extra_state = modelio.load(tmp_path / "model")
    assert loaded_info == info
    assert torch.equal(extra_state["extra.tensor"], torch.ones(2))
    with torch.no_grad():
        assert torch.equal(model.encode(x, y), loaded.encode(x, y))
        assert torch.equal(model.reconstruct(x, y), loaded.reconstruct(x, y))
        if REGISTRY[name].generative:
            a = model.sample(4, y[:4], generator=torch.Generator().manual_seed(3))
            b = loaded.sample(4, y[:4], generator=torch.Generator().manual_seed(3))
            assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(n for n, v in REGISTRY.items() if v.generative))
def test_sampling_shapes_and_seeds(name, arch, shape):
    model, _ = make(name, {}, arch, shape)
    model.eval()
    with torch.no_grad():
        samples = model.sample(5, generator=torch.Generator().manual_seed(0))
        again = model.sample(5, generator=torch.Generator().manual_seed(0))
        other = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (5, *shape)
    assert torch.equal(samples, again) and not torch.equal(samples, other)
    if REGISTRY[name].conditional:
        labelled = model.sample(5, torch.full((5,), 3), generator=torch.Generator().manual_seed(0))
        assert labelled.shape == (5, *shape)


@pytest.mark.parametrize("name", sorted(n for n, v in REGISTRY.items() if v.conditional))
def test_conditional_models_depend_on_the_label(name):
    model, _ = make(name, {}, "mlp", (1, 8, 8))
    model.eval()
    z = torch.randn(1, 3).repeat(NUM_CLASSES, 1)
    with torch.no_grad():
        images = model.decode(z, torch.arange(NUM_CLASSES))
    # The same code decoded under every label: a model that ignores the label gives ten equal images.
    assert float(images.std(0).max()) > 1e-3


def test_config_round_trips_through_params():
    config = TrainConfig(model="vae", hidden=(64, 32, 16), beta=0.5, prior="mog", epochs=3)
    assert TrainConfig.from_params(config.to_params()) == config
    assert config.to_params()["hidden"] == "64,32,16"
    assert set(config.to_params()) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_kl_scale_scales_beta():
    model, _ = make("vae", {"beta": 2.0}, "mlp", (1, 8, 8))
    assert model.body.kl_weight(0.0) == 0.0
    assert model.body.kl_weight(0.5) == pytest.approx(1.0)
    assert model.body.kl_weight() == pytest.approx(2.0)


def test_denoising_autoencoder_scores_the_corrupted_input_against_the_clean_one():
    model, _ = make("dae", {"noise": "masking", "noise_level": 0.5}, "mlp", (1, 8, 8))
    x, _ = batch((1, 8, 8))
    out = model(x)
    noisy = out.extras["noisy"]
    assert not torch.equal(noisy, x)
    assert bool(((noisy == 0) | (noisy == x)).all())  # masking only zeroes pixels
    assert 0.3 < float((noisy != x).float().mean()) < 0.7


def test_hidden_units_are_the_activation_asked_for():
    from aetrack.nets import GatedLinear

    for activation, unit in (("relu", torch.nn.ReLU), ("tanh", torch.nn.Tanh), ("softplus", torch.nn.Softplus)):
        model, _ = make("vae", {"activation": activation}, "mlp", (1, 8, 8))
        kinds = {type(m) for m in model.modules()}
        assert unit in kinds and not ({torch.nn.ReLU, torch.nn.Tanh, torch.nn.Softplus} - {unit}) & kinds
    model, _ = make("vae", {"activation": "gated"}, "mlp", (1, 8, 8))
    gated = [m for m in model.modules() if isinstance(m, GatedLinear)]
    assert len(gated) == 4 and not any(isinstance(m, torch.nn.ReLU) for m in model.modules())  # 2 hidden layers each side
    layer, x = gated[0], torch.randn(5, 64)
    value, gate = layer.linear(x).chunk(2, -1)
    torch.testing.assert_close(layer(x), value * torch.sigmoid(gate))


def test_relu_networks_keep_the_parameter_names_saved_models_have():
    model, _ = make("vae", {}, "mlp", (1, 8, 8))
    assert {k for k in model.state_dict() if "encoder.features" in k} == {
        "body.encoder.features.1.0.weight", "body.encoder.features.1.0.bias",
        "body.encoder.features.1.2.weight", "body.encoder.features.1.2.bias"}
    assert "body.decoder.stem.4.bias" in model.state_dict()  # the output layer init_output_bias sets


def test_activation_is_for_mlps():
    from aetrack.config import ConfigError

    with pytest.raises(ConfigError, match="--activation applies to --arch mlp"):
        TrainConfig(arch="conv", activation="tanh").validate()


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_the_output_bias_is_set_where_the_model_is_not_where_the_data_is(arch):
    from aetrack.nets import Decoder

    # On a GPU the data is already there while the model is not yet; a model on "meta" stands in for it on CPU.
    decoder = Decoder((1, 28, 28), (32, 64), 8, arch).to("meta")
    decoder.init_output_bias(torch.full((1, 28, 28), 0.25))  # raised for conv before the fix (found on an H200)
    assert next(decoder.parameters()).device.type == "meta"


# --- M2: the loss rewritten in issue 10 gives what the old formulation gave ---

@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


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
