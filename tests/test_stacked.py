"""M1+M2 (Kingma et al. 2014): M2 trained on the latent means of a trained VAE, logged, evaluated and served."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from aetrack import data as datasets
from aetrack import modelio
from aetrack.cli import main
from aetrack.config import ConfigError, TrainConfig
from aetrack.evaluation.evaluate import Settings, evaluate_model
from aetrack.models import build_model, stacked
from aetrack.tracking.artifacts import model_uri_of
from aetrack.training import fit

M1 = TrainConfig(model="vae", hidden=(32,), latent_dim=6, epochs=15, kl_warmup=0, patience=0, batch_size=64)
M2 = TrainConfig(model="m1m2", hidden=(32,), latent_dim=2, epochs=3, labeled=50, batch_size=64, features="runs:/m1/vae")


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


@pytest.fixture(scope="module")
def m1(digits):
    return fit(M1, digits, progress=False)[0].eval()


def meta_of(config: TrainConfig, data) -> dict:
    return {"params": config.to_params(), "shape": list(data.shape), "classes": list(data.classes)}


def loader(m1, meta):
    """What aetrack.tracking.artifacts.load_model gives for the logged M1: a module of its own and its folder's meta."""
    import copy

    return lambda target: (copy.deepcopy(m1), meta)


def built(m1, digits, config=M2):
    return build_model(config, digits.shape, digits.num_classes, data=digits, load=loader(m1, meta_of(M1, digits)))


@pytest.mark.slow
def test_m2_models_the_active_units_of_the_frozen_vae(m1, digits):
    model = built(m1, digits)
    with torch.no_grad():
        codes = m1.encode(digits.train_x)
    active = (codes.var(0) > stacked.ACTIVE).nonzero().flatten()
    assert 0 < len(active) and model.units.tolist() == active.tolist()
    assert model.codes(digits.val_x[:5]).shape == (5, 1, 1, len(active))
    torch.testing.assert_close(model.codes(digits.val_x[:5]).flatten(1), m1.encode(digits.val_x[:5])[:, active])

    before = {k: v.clone() for k, v in model.m1.state_dict().items()}
    m2_before = [p.clone() for p in model.m2.parameters()]
    trained, history = fit(M2, digits, model=model, progress=False)
    assert all(math.isfinite(e["val_loss"]) for e in history.epochs) and "val_error" in history.epochs[-1]
    for key, value in trained.m1.state_dict().items():
        assert torch.equal(value, before[key]), f"M1's {key} changed"
    assert any(not torch.equal(a, b) for a, b in zip(m2_before, trained.m2.parameters()))
    assert not trained.m1.training  # frozen M1 stays in eval mode whatever the stack's mode


@pytest.mark.slow
def test_the_stack_takes_and_gives_images(m1, digits):
    model = built(m1, digits).eval()
    x = digits.test_x[:7]
    assert model.classify(x).shape == (7,)
    for images in (model.reconstruct(x), model.sample(7, generator=torch.Generator().manual_seed(0)),
                   model.sample(3, torch.tensor([0, 1, 2])), model(x, None).recon):
        assert images.shape[1:] == digits.shape and 0 <= images.min() and images.max() <= 1
    # A sample goes through M1's decoder: the codes M2 gives, with M1's inactive units at their mean.
    z = torch.zeros(2, M2.latent_dim)
    y = torch.tensor([3, 4])
    means = model.m2.body.decoder(z, model.m2.cond(y)).flatten(1)
    full = model.fill.expand(2, -1).clone()
    full[:, model.units] = means
    torch.testing.assert_close(model.decode(z, y), m1.decode(full))
    assert model.log_weights(x, None, 4).shape == (4, 7)


@pytest.mark.slow
def test_the_stack_trains_on_the_iwae_bound_of_its_codes(m1, digits):
    from dataclasses import replace

    x, y = digits.val_x[:64], digits.val_y[:64].clone()
    y[::2] = -1
    bounds = []
    for samples in (1, 20):
        torch.manual_seed(0)
        model = built(m1, digits, replace(M2, objective="iwae", train_samples=samples))
        out = model(x, y)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.m2.parameters() if p.grad is not None)
        assert all(p.grad is None for p in model.m1.parameters())  # M1 stays frozen
        with torch.no_grad():
            bounds.append(float(torch.stack([model(x, y).parts["unlabeled_bound"] for _ in range(20)]).mean()))
    assert bounds[1] < bounds[0], bounds


@pytest.mark.slow
def test_feature_draws_train_on_draws_from_m1s_posterior_and_evaluate_on_its_means(m1, digits):
    from dataclasses import replace

    x = digits.val_x[:8]
    with torch.no_grad():
        q = m1.body.posterior(x)
    means = built(m1, digits).train()
    torch.testing.assert_close(means.codes(x).flatten(1), q.mean[:, means.units])  # without the option: the means
    model = built(m1, digits, replace(M2, feature_draws=True))
    units = model.units
    torch.testing.assert_close(model.eval().codes(x).flatten(1), q.mean[:, units])
    model.train()
    torch.manual_seed(0)
    draws = torch.stack([model.codes(x).flatten(1) for _ in range(4000)])
    assert not torch.equal(draws[0], draws[1])
    # Draws from q(z|x): their mean and spread are q's on every active unit.
    torch.testing.assert_close(draws.mean(0), q.mean[:, units], atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.exp(0.5 * q.logvar)[:, units], atol=0.0, rtol=0.06)
    trained, history = fit(replace(M2, feature_draws=True), digits, model=model, progress=False)
    assert all(math.isfinite(e["val_loss"]) for e in history.epochs)
    with pytest.raises(ConfigError, match="--model m1m2 needs --features"):
        built(m1, digits, replace(M2, features="", feature_draws=True))


def test_the_code_likelihood_is_a_normal_density():
    likelihood = stacked.CodeLikelihood(5)
    with torch.no_grad():
        likelihood.log_scale.copy_(torch.linspace(-1, 1, 5))
    mean, codes = torch.randn(3, 1, 1, 5), torch.randn(3, 1, 1, 5)
    expected = -torch.distributions.Normal(mean.flatten(1), likelihood.log_scale.exp()).log_prob(codes.flatten(1)).sum(-1)
    torch.testing.assert_close(likelihood(mean, codes), expected)


@pytest.mark.slow
def test_a_saved_stack_loads_with_its_vae_inside(m1, digits, tmp_path):
    model = built(m1, digits).eval()
    info = modelio.ModelInfo(M2, digits.shape, digits.classes)
    modelio.save(model, info, tmp_path / "model")
    loaded, loaded_info, _ = modelio.load(tmp_path / "model")
    assert loaded_info.config.features == M2.features
    x = digits.test_x[:20]
    assert torch.equal(loaded.classify(x), model.classify(x))
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))
    torch.testing.assert_close(loaded.units, model.units)


def test_a_stack_saved_before_m1m2_was_a_variant_still_loads(m1, digits, tmp_path):
    """Folders (and runs) of M1+M2 from before issue 27 say `model: m2` with `features` set, and keep M1's meta under
    "features": they load as m1m2, with the same outputs."""
    import json

    model = built(m1, digits).eval()
    folder = modelio.save(model, modelio.ModelInfo(M2, digits.shape, digits.classes), tmp_path / "model")
    meta = json.loads((folder / modelio.CONFIG_FILE).read_text())
    meta["params"]["model"], meta["features"] = "m2", meta.pop("built_on")
    (folder / modelio.CONFIG_FILE).write_text(json.dumps(meta))
    loaded, info, _ = modelio.load(folder)
    assert info.config == M2  # model m1m2 again
    x = digits.test_x[:20]
    assert torch.equal(loaded.classify(x), model.classify(x))
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))


def test_m2_with_features_says_to_train_m1m2():
    result = CliRunner().invoke(main, ["train", "--model", "m2", "--features", "runs:/x/vae", "--epochs", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--features does not apply to --model m2 (it applies to m1m2)" in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(model="cvae"), "M1 must be a VAE"),
    (dict(dataset="mnist"), "M1 was trained on mnist"),
])
def test_a_wrong_m1_is_a_config_error(m1, digits, change, message):
    from dataclasses import replace

    with pytest.raises(ConfigError, match=message):
        build_model(M2, digits.shape, digits.num_classes, data=digits, load=loader(m1, meta_of(replace(M1, **change), digits)))


def test_an_m1_without_active_units_is_refused(digits):
    flat = build_model(M1, digits.shape, digits.num_classes)
    with torch.no_grad():
        for p in flat.body.encoder.parameters():
            p.zero_()
    with pytest.raises(ConfigError, match="no active unit"):
        build_model(M2, digits.shape, digits.num_classes, data=digits, load=loader(flat, meta_of(M1, digits)))


@pytest.mark.slow
def test_evaluation_reads_the_stacked_classifier_and_density(m1, digits):
    model = fit(M2, digits, model=built(m1, digits), progress=False)[0].eval()
    result = evaluate_model(model, M2, digits, settings=Settings(iw_samples=8, nll_images=40))
    expected = float((model.classify(digits.test_x) != digits.test_y).float().mean())
    assert result.metrics["error"] == pytest.approx(expected)
    assert "M1's code" in result.notes["nll_iw"] and "M1's code" in result.notes["neg_elbo"]
    assert math.isfinite(result.metrics["nll_iw"]) and math.isfinite(result.metrics["neg_elbo"])
    assert {"reconstructions", "samples", "traversals"} <= set(result.pictures)


@pytest.mark.slow
def test_m1_m2_from_the_command_line_is_logged_and_served(tmp_path, monkeypatch):
    from aetrack.tracking import artifacts

    loads = []
    load_model = artifacts.load_model
    monkeypatch.setattr(artifacts, "load_model", lambda target: loads.append(target) or load_model(target))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--hidden", "32", "--batch-size", "64", "--quiet", "--tracking-uri", uri, "--experiment", "stack",
              "--checkpoint-dir", str(tmp_path / "ckpt")]

    def train(*args):
        result = CliRunner().invoke(main, ["train", *args, *common], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return next(line.split()[-1] for line in result.output.splitlines() if line.startswith("run id:"))

    m1_run = train("--model", "vae", "--latent-dim", "6", "--epochs", "10", "--kl-warmup", "0")
    run_id = train("--model", "m1m2", "--latent-dim", "2", "--epochs", "2", "--labeled", "50", "--features", m1_run)
    assert loads == [m1_run]  # M1 is read once per run: the stack is built once
    mlflow.set_tracking_uri(uri)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["features"] == m1_run
    assert "-M1codes-" in run.info.run_name and "val/error" in run.data.metrics

    served = mlflow.pyfunc.load_model(model_uri_of(run_id))
    answer = served.predict(pd.DataFrame({"n": [4], "label": [7]}), params={"seed": 1, "output": "array"})
    pixels = np.stack(answer["pixels"].to_numpy())
    assert pixels.shape == (4, 64) and 0 <= pixels.min() and pixels.max() <= 1

    # A wrong M1 is one line and no run.
    for features, message in ((run_id, "M1 must be a VAE"), ("no-such-run", "cannot load a logged model")):
        result = CliRunner().invoke(main, ["train", "--model", "m1m2", "--epochs", "1", "--features", features, *common])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    runs = mlflow.search_runs(experiment_names=["stack"])
    assert len(runs) == 2


def test_an_m1_uri_that_names_one_model_is_read_once_per_process_and_each_build_gets_its_own_copy(monkeypatch):
    """A tuning worker builds an m1m2 per trial: a runs:/ or versioned M1 (or a run id: its model's runs:/ URI) is
    downloaded once; an alias or `latest` can name another model later, and is read each time."""
    from types import SimpleNamespace

    from aetrack.tracking import artifacts

    monkeypatch.setattr(artifacts, "_LOADED", {})
    reads = []

    def load_logged(target):
        reads.append(target)
        info = SimpleNamespace(config=TrainConfig(model="vae"), shape=(1, 8, 8), classes=tuple("0123456789"))
        return SimpleNamespace(model=torch.nn.Linear(2, 2), info=info, model_uri=target)

    monkeypatch.setattr(artifacts, "load_logged", load_logged)
    monkeypatch.setattr(artifacts, "model_uri_of", lambda target: target if ":/" in target else f"runs:/{target}/vae")
    fixed, moving = ["runs:/abc/vae", "models:/m1/3", "models:/m-0123"], ["models:/m1@champion", "models:/m1/latest"]
    for target in fixed:
        first, meta = artifacts.load_model(target)
        second, again = artifacts.load_model(target)
        assert first is not second and torch.equal(first.weight, second.weight) and meta == again
        weight = second.weight.detach().clone()
        first.weight.data.add_(1.0)  # what one build does to its copy, no other build sees
        second.weight.data.add_(1.0)
        assert torch.equal(artifacts.load_model(target)[0].weight, weight)
    for target in moving:
        artifacts.load_model(target)
        artifacts.load_model(target)
    artifacts.load_model("abc")  # a run id: the runs:/ URI of its model, read above
    assert reads == fixed + [target for target in moving for _ in (0, 1)]
