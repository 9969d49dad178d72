"""The IWAE training objective (Burda et al. 2015): K = 1 is the ELBO, the bound tightens with K, gradients are
finite, and `aetrack train --objective iwae` trains and logs it."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from click.testing import CliRunner

from aetrack import data as datasets
from aetrack.cli.main import main
from aetrack.config import TrainConfig
from aetrack.models import build_model


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def twin(model, digits, **settings):
    """A model with `settings` and the weights of `model`."""
    config = TrainConfig(**{**model.config.__dict__, **settings})
    other = build_model(config, digits.shape, digits.num_classes)
    other.load_state_dict(model.state_dict())
    return other


# The two-stochastic-layer VAE (Burda et al.'s network, small): its z1 KL under a mixture prior is sampled the same way.
HVAE = {"model": "hvae", "hidden": (32,), "first_latent_dim": 8, "latent_hidden": (16,), "latent_dim": 4}


@pytest.mark.parametrize("settings", [{"prior": "mog"}, {"prior": "vamp"}, {**HVAE, "prior": "mog"}],
                         ids=["mog", "vamp", "hvae-mog"])
def test_with_one_sample_the_iwae_loss_is_the_elbo_on_the_same_draw(digits, settings):
    # These priors estimate the KL with the posterior sample itself, so the same draw gives the same number.
    torch.manual_seed(0)
    elbo = build_model(TrainConfig(**{"hidden": (32,), "latent_dim": 4, "prior_components": 3, **settings}),
                       digits.shape, 10)
    iwae = twin(elbo, digits, objective="iwae", train_samples=1)
    for kl_scale in (0.3, 1.0):
        torch.manual_seed(1)
        a = elbo(digits.val_x[:64], kl_scale=kl_scale).loss
        torch.manual_seed(1)
        b = iwae(digits.val_x[:64], kl_scale=kl_scale).loss
        assert torch.allclose(a, b, rtol=1e-5), (float(a), float(b))


def test_with_one_sample_the_iwae_loss_is_the_elbo_in_expectation(digits):
    # The normal prior's ELBO uses the closed-form KL: equal to IWAE's K = 1 on average, not draw by draw.
    torch.manual_seed(0)
    elbo = build_model(TrainConfig(hidden=(32,), latent_dim=4), digits.shape, 10)
    iwae = twin(elbo, digits, objective="iwae", train_samples=1)
    with torch.no_grad():
        a = torch.stack([elbo(digits.val_x).loss for _ in range(200)]).mean()
        b = torch.stack([iwae(digits.val_x).loss for _ in range(200)]).mean()
    assert abs(float(a - b)) < 0.05, (float(a), float(b))


def test_the_bound_tightens_with_more_samples(digits):
    torch.manual_seed(0)
    base = build_model(TrainConfig(prior="mog", hidden=(32,), latent_dim=4, prior_components=3), digits.shape, 10)
    bounds = []
    with torch.no_grad():
        for samples in (1, 5, 50):
            model = twin(base, digits, objective="iwae", train_samples=samples)
            bounds.append(float(torch.stack([model(digits.val_x).parts["neg_iwae"] for _ in range(30)]).mean()))
    assert bounds[0] > bounds[1] > bounds[2], bounds


@pytest.mark.parametrize("model_name, prior", [("vae", "normal"), ("vae", "uniform"), ("cvae", "vamp")])
def test_iwae_gradients_are_finite_and_training_lowers_the_bound(digits, model_name, prior):
    torch.manual_seed(0)
    config = TrainConfig(model=model_name, prior=prior, hidden=(32,), latent_dim=4, prior_components=3, objective="iwae",
                         train_samples=5)
    model = build_model(config, digits.shape, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for step in range(60):
        index = torch.randint(len(digits.train_x), (128,))
        out = model(digits.train_x[index], digits.train_y[index])
        optimizer.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        first = first if first is not None else float(out.loss)
        optimizer.step()
    with torch.no_grad():
        assert float(model(digits.val_x, digits.val_y).parts["neg_iwae"]) < first


@pytest.mark.slow
def test_aetrack_train_takes_the_objective_and_logs_the_bound(tmp_path):
    uri = f"sqlite:///{tmp_path}/iwae.db"
    result = CliRunner().invoke(main, ["train", "--objective", "iwae", "--train-samples", "5", "--epochs", "2",
                                       "--hidden", "32", "--latent-dim", "4", "--quiet", "--no-register",
                                       "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["aetrack"], output_format="list")[0]
    assert run.data.params["objective"] == "iwae" and run.data.params["train_samples"] == "5"
    assert run.data.metrics["val/neg_iwae"] <= run.data.metrics["val/neg_elbo"] + 0.5


@pytest.mark.parametrize("args, message", [
    (["--model", "dae", "--objective", "iwae"], "--objective does not apply to --model dae"),
    (["--train-samples", "5"], "--train-samples needs --objective iwae"),
    (["--objective", "iwae", "--train-samples", "0"], "--train-samples must be at least 1"),
])
def test_objective_settings_that_cannot_work_are_usage_errors(args, message):
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def grads(model, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x)
    out.loss.backward()
    return float(out.loss), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name, prior", [("vae", "normal"), ("vae", "mog"), ("m2", "normal")])
def test_dreg_has_the_iwae_value_and_decoder_gradient(digits, model_name, prior):
    torch.manual_seed(0)
    iwae = build_model(TrainConfig(model=model_name, prior=prior, hidden=(32,), latent_dim=4, prior_components=3,
                                   objective="iwae", train_samples=8), digits.shape, 10)
    dreg = twin(iwae, digits, objective="iwae-dreg")
    x = digits.val_x[:32]
    loss_a, a = grads(iwae, x, seed=3)
    loss_b, b = grads(dreg, x, seed=3)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert a.keys() == b.keys()
    for name in a:  # the decoder, the prior (and M2's classifier) learn as under IWAE; only the encoder's estimator differs
        if not name.startswith("body.encoder"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a[n], b[n]) for n in a if n.startswith("body.encoder"))


def test_dreg_encoder_gradient_has_less_variance_than_iwaes_at_large_k(digits):
    """Tucker et al. 2018's point: IWAE's encoder gradient gets noisier relative to its size as K grows; DReG's does not."""
    torch.manual_seed(0)
    base = build_model(TrainConfig(hidden=(32,), latent_dim=4, objective="iwae", train_samples=64), digits.shape, 10)
    x = digits.val_x[:16]
    spread = {}
    for objective in ("iwae", "iwae-dreg"):
        model = twin(base, digits, objective=objective)
        draws = torch.stack([grads(model, x, seed)[1]["body.encoder.head.weight"].flatten() for seed in range(40)])
        spread[objective] = float(draws.var(0).sum())
    assert spread["iwae-dreg"] < 0.5 * spread["iwae"], spread


@pytest.mark.slow
def test_dreg_trains_from_the_command_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, ["train", "--objective", "iwae-dreg", "--train-samples", "4", "--epochs", "2",
                                       "--hidden", "32", "--latent-dim", "4", "--quiet", "--tracking-uri", uri,
                                       "--checkpoint-dir", str(tmp_path / "ckpt")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = next(line.split()[-1] for line in result.output.splitlines() if line.startswith("run id:"))
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.params["objective"] == "iwae-dreg" and run.data.params["train_samples"] == "4"
    assert run.data.metrics["loss/val"] < 200


# --- M2: the bound of each label is the IWAE's, the label summed out as before ---

def half_labelled(digits, n=64):
    y = digits.val_y[:n].clone()
    y[::2] = -1
    return digits.val_x[:n], y


@pytest.mark.slow
def test_m2_with_one_sample_is_its_elbo_and_its_bounds_tighten_with_more(digits):
    torch.manual_seed(0)
    elbo = build_model(TrainConfig(model="m2", prior="mog", hidden=(32,), latent_dim=4, prior_components=3),
                       digits.shape, 10)
    x, y = half_labelled(digits)
    one = twin(elbo, digits, objective="iwae", train_samples=1)
    for kl_scale in (0.3, 1.0):
        torch.manual_seed(1)
        a = elbo(x, y, kl_scale=kl_scale)
        torch.manual_seed(1)
        b = one(x, y, kl_scale=kl_scale)
        for key in ("labeled_bound", "unlabeled_bound"):
            torch.testing.assert_close(a.parts[key], b.parts[key], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-4)
    bounds = {key: [] for key in ("labeled_bound", "unlabeled_bound")}
    with torch.no_grad():
        for samples in (1, 5, 50):
            model = twin(elbo, digits, objective="iwae", train_samples=samples)
            outs = [model(x, y) for _ in range(20)]
            for key in bounds:
                bounds[key].append(float(torch.stack([out.parts[key] for out in outs]).mean()))
    for key, values in bounds.items():
        assert values[0] > values[1] > values[2], (key, values)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["iwae", "iwae-dreg"])
def test_m2_trains_on_the_iwae_bound_with_finite_gradients(digits, objective):
    torch.manual_seed(0)
    model = build_model(TrainConfig(model="m2", hidden=(32,), latent_dim=4, objective=objective, train_samples=5),
                        digits.shape, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = half_labelled(digits, 256)
    with torch.no_grad():
        first = float(model(x, y).parts["unlabeled_bound"])
    for _ in range(60):
        index = torch.randint(len(digits.train_x), (128,))
        labels = digits.train_y[index].clone()
        labels[64:] = -1
        out = model(digits.train_x[index], labels)
        optimizer.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    with torch.no_grad():
        assert float(model(x, y).parts["unlabeled_bound"]) < first


@pytest.mark.slow
def test_m2_takes_the_objective_from_the_command_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, ["train", "--model", "m2", "--objective", "iwae", "--train-samples", "3",
                                       "--epochs", "1", "--hidden", "32", "--latent-dim", "4", "--quiet",
                                       "--no-register", "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    run_id = next(line.split()[-1] for line in result.output.splitlines() if line.startswith("run id:"))
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.params["objective"] == "iwae" and run.data.params["train_samples"] == "3"
    assert math.isfinite(run.data.metrics["loss/val"])
