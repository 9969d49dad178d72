"""The training budget and recipes: `--epochs auto`, learning-rate schedules, KL warm-up, the decoder's output
bias, gradient clipping, and a default VAE that does not collapse."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re

import pytest
import torch
from click.testing import CliRunner

from aetrack import data as datasets
from aetrack import training
from aetrack.cli import main
from aetrack.config import AUTO_STEPS, ConfigError, TrainConfig
from aetrack.evaluation import active_units
from aetrack.models import build_model
from aetrack.nets import Decoder
from aetrack.training import MIN_LR_FRACTION, LearningRate, fit, init_output_biases, kl_scale


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


# The budgets that the README and `aetrack train --help` document, at batch 128 and --val-fraction 0.1.
DOCUMENTED_EPOCHS = {"digits": 546, "mnist": 50, "fashion-mnist": 50, "cifar10": 50}


@pytest.mark.parametrize("dataset", sorted(DOCUMENTED_EPOCHS))
def test_epochs_auto_resolves_to_the_documented_budget(dataset):
    n_train = round(datasets.POOL_SIZES[dataset] * 0.9)
    config = TrainConfig(dataset=dataset).resolve(n_train)
    assert config.epochs == DOCUMENTED_EPOCHS[dataset]
    assert config.epochs * config.steps_per_epoch(n_train) >= AUTO_STEPS
    assert config.patience == max(10, config.epochs // 5)
    assert config.kl_warmup == round(0.1 * config.epochs)
    # The same numbers are what --help and the README say.
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert f"{dataset} {DOCUMENTED_EPOCHS[dataset]}" in help_text


def test_digits_split_size_matches_the_documented_pool(digits):
    assert len(digits.train_x) + len(digits.val_x) == datasets.POOL_SIZES["digits"]


def test_explicit_settings_are_kept():
    config = TrainConfig(epochs=7, patience=0, kl_warmup=0).resolve(1293)
    assert (config.epochs, config.patience, config.kl_warmup) == (7, 0, 0)
    assert TrainConfig.from_params(TrainConfig().to_params()) == TrainConfig()
    assert TrainConfig().to_params()["epochs"] == "auto"


@pytest.mark.parametrize("schedule,final", [("cosine", MIN_LR_FRACTION), ("step", 0.01), ("constant", 1.0)])
def test_learning_rate_schedule_reaches_its_final_value(schedule, final):
    config = TrainConfig(lr_schedule=schedule, warmup_steps=10, epochs=5, patience=0)
    rate = LearningRate(config, total_steps=200)
    assert rate(0) == pytest.approx(0.1, rel=0.01)  # warm-up: step 1 of 10
    assert rate(9) == pytest.approx(1.0, rel=0.01)
    assert rate(199) == pytest.approx(final)
    factors = [rate(step) for step in range(10, 200)]
    assert all(a >= b - 1e-12 for a, b in zip(factors, factors[1:]))  # never rises after warm-up


def test_only_a_rate_that_moves_is_recorded_per_epoch(digits):
    constant = TrainConfig(model="ae", hidden=(32,), latent_dim=4, epochs=2, patience=0)
    assert all("lr" not in epoch for epoch in fit(constant, digits, progress=False)[1].epochs)
    warming = dataclasses.replace(constant, warmup_steps=5)
    assert all("lr" in epoch for epoch in fit(warming, digits, progress=False)[1].epochs)


def test_fit_ends_at_the_schedules_final_learning_rate(digits):
    config = TrainConfig(model="ae", hidden=(32,), latent_dim=4, epochs=6, patience=0, lr=2e-3, lr_schedule="cosine")
    _, history = fit(config, digits, progress=False)
    rates = [epoch["lr"] for epoch in history.epochs]
    assert rates[-1] == pytest.approx(2e-3 * MIN_LR_FRACTION, rel=1e-6)
    assert rates == sorted(rates, reverse=True)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_chooses_the_best_or_the_last_epochs_weights(digits, keep):
    class Record:
        """Keeps each epoch's weights; after epoch 3 of 4 it spoils them, so that the last epoch is not the best."""

        def __init__(self):
            self.states: dict[int, dict] = {}

        def on_epoch_end(self, epoch, model, metrics):
            self.states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
            if epoch == 3:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 5)

    config = TrainConfig(model="ae", hidden=(32,), latent_dim=4, epochs=4, patience=0, keep=keep)
    record = Record()
    model, history = fit(config, digits, progress=False, callbacks=[record])
    losses = [epoch["val_loss"] for epoch in history.epochs]
    assert losses[3] > min(losses[:3])  # the spoilt last epoch is worse than the best
    kept = 4 if keep == "last" else 1 + losses.index(min(losses))
    assert history.best_epoch == kept and history.best_val_loss == losses[kept - 1]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, record.states[kept][name])


def test_burda_schedule_has_eight_stages_of_three_to_the_i_epochs():
    # The published protocol: 3280 epochs, stage i of 3^i epochs at 10^(-i/7) (Burda et al. 2015, section 5).
    per_epoch = 3
    rate = LearningRate(TrainConfig(lr_schedule="burda", epochs=3280), total_steps=3280 * per_epoch)
    epoch_rates = [rate(epoch * per_epoch) for epoch in range(3280)]
    starts = [0, 1, 4, 13, 40, 121, 364, 1093]
    for stage, start in enumerate(starts):
        end = starts[stage + 1] if stage + 1 < len(starts) else 3280
        assert epoch_rates[start:end] == pytest.approx([10 ** (-stage / 7)] * (end - start))


def test_adam_epsilon_reaches_the_optimiser(digits, monkeypatch):
    seen = {}
    real = torch.optim.Adam

    def spy(params, **kwargs):
        seen.update(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    fit(TrainConfig(model="ae", hidden=(16,), latent_dim=2, epochs=1, adam_eps=1e-4), digits, progress=False)
    assert seen["eps"] == 1e-4
    with pytest.raises(Exception, match="--adam-eps must be positive"):
        TrainConfig(adam_eps=0).validate()


def test_plateau_schedule_halves_the_rate_when_validation_stalls():
    rate = LearningRate(TrainConfig(lr_schedule="plateau", patience=8), total_steps=100)
    assert rate(50) == 1.0
    for loss in (3.0, 2.0, 2.5, 2.6):  # two epochs without improvement: a quarter of the patience
        rate.epoch_end(loss)
    assert rate(50) == 0.5
    rate.epoch_end(1.0)
    assert rate(50) == 0.5


def test_kl_warmup_starts_at_zero_and_reaches_beta(digits):
    config = TrainConfig(kl_warmup=4)
    assert kl_scale(config, 0.0) == 0.0
    assert kl_scale(config, 2.0) == pytest.approx(0.5)
    assert kl_scale(config, 4.0) == kl_scale(config, 9.0) == 1.0
    assert kl_scale(TrainConfig(kl_warmup=0), 0.0) == 1.0
    config = TrainConfig(model="vae", hidden=(32,), latent_dim=2, epochs=6, kl_warmup=4, patience=0, beta=2.0)
    _, history = fit(config, digits, progress=False)
    assert [epoch["kl_scale"] for epoch in history.epochs] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_kl_warmup_weights_the_training_loss():
    config = TrainConfig(model="vae", hidden=(16,), latent_dim=2, beta=2.0)
    model = build_model(config, (1, 8, 8), 10)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        off, full = model(x, kl_scale=0.0), model(x, kl_scale=1.0)
    assert float(off.loss) == pytest.approx(float(off.parts["recon_loss"]), rel=1e-6)
    assert float(full.loss) == pytest.approx(float(full.parts["recon_loss"] + 2.0 * full.parts["kl"]), rel=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_decoder_output_starts_at_the_mean_image(digits, arch):
    config = TrainConfig(model="ae", arch=arch, hidden=(16, 8), latent_dim=4)
    model = build_model(config, digits.shape, 10)
    init_output_biases(model, digits.train_x)
    decoder = next(m for m in model.modules() if isinstance(m, Decoder))
    for layer in decoder.modules():  # weights off: what remains is the bias alone
        if isinstance(layer, (torch.nn.Linear, torch.nn.ConvTranspose2d)):
            torch.nn.init.zeros_(layer.weight)
    with torch.no_grad():
        image = torch.sigmoid(decoder(torch.zeros(1, 4)))[0]
    expected = digits.train_x.mean(0).clamp(1e-3, 1 - 1e-3)
    assert torch.allclose(image, expected, atol=1e-5)


def test_mean_bias_starts_from_a_lower_loss(digits):
    losses = {}
    for bias in ("zero", "mean"):
        config = TrainConfig(model="ae", hidden=(64,), latent_dim=4, decoder_bias=bias)
        torch.manual_seed(0)
        model = build_model(config, digits.shape, 10)
        if bias == "mean":
            init_output_biases(model, digits.train_x)
        with torch.no_grad():
            losses[bias] = float(model(digits.val_x).loss)
    assert losses["mean"] < losses["zero"] - 1.0


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_gradient_clipping_bounds_every_step(digits, monkeypatch, clip):
    norms = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    config = TrainConfig(model="ae", hidden=(32,), latent_dim=4, epochs=2, patience=0, grad_clip=clip)
    fit(config, digits, progress=False)
    assert len(norms) == 2 * config.steps_per_epoch(len(digits.train_x))
    if clip:
        assert max(norms) <= clip * (1 + 1e-4)
    else:
        assert max(norms) > 0.5  # unclipped gradients of a summed-over-pixels loss are far larger


@pytest.mark.slow
def test_default_vae_does_not_collapse(digits):
    """The README's first command, at a budget a test can afford: several active units and diverse samples."""
    config = TrainConfig(epochs=150)  # every other setting is the default
    model, history = fit(config, digits, progress=False)
    with torch.no_grad():
        units = active_units(model.encode(digits.test_x))
        samples = model.sample(64, generator=torch.Generator().manual_seed(0))
    assert units >= 3, f"only {units} active latent units: posterior collapse"
    # 64 copies of one blur have almost no spread across samples (0.03 after the old 10-epoch default); real
    # test digits have 0.22, and a VAE's samples, means of p(x|z), a little less.
    spread = float(samples.flatten(1).std(0).mean())
    assert spread > 0.5 * float(digits.test_x[:64].flatten(1).std(0).mean())
    assert history.best_val_loss < 27.0
    assert math.isfinite(history.best_val_loss)


@pytest.mark.slow
def test_latent_plots_skip_degenerate_codes_instead_of_crashing():
    import numpy as np

    from aetrack import images

    labels = np.arange(200) % 10
    assert images.latent_plots(np.ones((200, 16)), labels) == {}  # t-SNE on this would kill the process
    assert images.latent_plots(np.full((200, 16), np.nan), labels) == {}
    assert images.latent_plots(np.zeros((2, 16)), labels[:2]) == {}
    spread = np.random.default_rng(0).normal(size=(60, 3))
    assert set(images.latent_plots(spread, labels[:60])) == {"latent_pca", "latent_tsne"}


@pytest.mark.slow
def test_a_plain_autoencoder_generates_after_fit_alone(digits):
    """No MLflow: `fit`, then a latent mixture fitted to the training codes, and the autoencoder draws images."""
    from aetrack.samplers import fit_sampler, generate

    config = TrainConfig(model="ae", hidden=(32,), latent_dim=4, epochs=20, patience=0)
    model, _ = fit(config, digits, progress=False)
    sampler = fit_sampler(model, digits.train_x, seed=0, components=3)
    with torch.no_grad():
        images = generate(model, 16, generator=torch.Generator().manual_seed(0), sampler=sampler)
        again = generate(model, 16, generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert images.shape == (16, *digits.shape) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images, again) and float(images.flatten(1).std(0).mean()) > 0.01  # seeded, and not one image


@pytest.mark.slow
def test_progress_prints_about_fifty_epoch_lines_however_long_the_run(digits, capsys):
    config = TrainConfig(model="ae", hidden=(16,), latent_dim=2, epochs=300, patience=0, batch_size=1024)
    fit(config, digits, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ") and "val_loss" in line]
    assert 50 <= len(lines) <= 52
    assert lines[0].startswith("epoch 1:") and lines[-1].startswith("epoch 300:")


def test_the_progress_bar_shows_on_a_terminal_that_reports_no_size(tmp_path):
    """A pty without a window size (`script` started outside a terminal, `docker exec -t`, CI) says 0 x 0: tqdm drew
    a bar of no width there, i.e. nothing, for epochs of any length. The bar must show on every terminal."""
    pty = pytest.importorskip("pty")
    import os
    import subprocess
    import sys

    leader, follower = pty.openpty()
    assert tuple(os.get_terminal_size(follower)) == (0, 0)
    code = ("from aetrack import data; from aetrack.config import TrainConfig; from aetrack.training import fit; "
            "fit(TrainConfig(model='ae', hidden=(16,), latent_dim=2, epochs=2, batch_size=256), data.load('digits'), "
            "progress=True)")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    child = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower, env=env,
                             cwd=tmp_path)
    os.close(follower)
    output = bytearray()
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert child.wait(timeout=120) == 0, output.decode(errors="replace")[-2000:]
    text = output.decode(errors="replace")
    assert "epoch 1: val_loss" in text  # the epoch lines, as before
    assert re.search(r"epoch 1/2: +\d+%\|", text), text[:1000]  # and the bar, with its percentage


# --- precision, compile, devices ---

def short(config: TrainConfig, **settings) -> TrainConfig:
    return dataclasses.replace(config, hidden=(32, 16), latent_dim=4, epochs=2, patience=0, **settings)


def linear_output_dtypes(config: TrainConfig, digits) -> tuple[set[torch.dtype], torch.nn.Module, object]:
    """The dtypes the model's linear layers computed in while `fit` trained it, its model and history."""
    seen = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training:  # training steps, not validation
            seen.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        model, history = fit(config, digits, progress=False)
    finally:
        hook.remove()
    return seen, model, history


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_in_its_dtype_and_keeps_fp32_weights(digits, precision):
    """The training steps run under autocast in the reduced dtype (a no-op --precision fails here), the weights
    stay float32, and the run ends about where a float32 run ends."""
    base = short(TrainConfig(model="vae"))
    seen, model, history = linear_output_dtypes(dataclasses.replace(base, precision=precision), digits)
    assert seen == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}
    reference_seen, _, reference = linear_output_dtypes(base, digits)
    assert reference_seen == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(history.best_val_loss)
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


def test_compile_wraps_the_training_forward_pass_and_returns_the_plain_model(digits, monkeypatch):
    """torch.compile is wired to the training forward pass only: every training step goes through the compiled
    module, and the returned model is the plain module with its own parameter names. (Compiling itself is left to
    torch: here `torch.compile` is replaced by a wrapper that, as torch's does, holds the module as `_orig_mod`;
    benchmarks/training.py --part compile times the real thing.)"""
    steps = []

    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *args, **kwargs):
            steps.append(self._orig_mod.training)
            return self._orig_mod(*args, **kwargs)

    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return Compiled(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = short(TrainConfig(model="ae"), compile=True)
    model, history = fit(config, digits, progress=False)
    assert compiled == [model] and not isinstance(model, Compiled)
    assert not any(name.startswith("_orig_mod") for name in model.state_dict())
    assert len(steps) == config.epochs * config.steps_per_epoch(len(digits.train_y)) and all(steps)
    assert math.isfinite(history.best_val_loss)
    steps.clear()
    fit(short(TrainConfig(model="ae")), digits, progress=False)
    assert steps == []  # without --compile nothing is compiled


def test_cuda_is_refused_in_one_line_where_there_is_none():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(ConfigError, match="no CUDA device"):
        TrainConfig(device="cuda").validate()


def test_the_loop_reads_on_one_screen_and_its_state_goes_through_a_checkpoint_whole(digits):
    """Resume, checkpoints and divergence live in TrainingState, Checkpoints and train_one_epoch, not in fit's loop;
    a state saved and loaded into a fresh one saves the same again."""
    assert len(inspect.getsource(training.fit).splitlines()) <= 70
    config = TrainConfig(model="ae", hidden=(16,), latent_dim=2, epochs=2).resolve(len(digits.train_y))
    device = digits.train_images.device

    def state():
        torch.manual_seed(0)
        model = build_model(config, digits.shape, digits.num_classes, data=digits).to(device)
        return training.TrainingState(config, model, len(digits.train_y), device)

    trained = state()
    training.train_one_epoch(trained, digits, trained.model, digits.train_batch, None, False)
    trained.epoch += 1
    training.evaluate(trained, digits)
    trained.history.epochs.append({"epoch": 1, "val_loss": trained.history.best_val_loss})
    saved = training.frozen(trained.state_dict())
    saved["history"] = training.pack(saved["history"])
    loaded = state()
    loaded.load_state_dict(saved)
    again = loaded.state_dict()
    again["history"] = training.pack(again["history"])
    assert same(again, saved)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
