"""The estimators are right, not just running; `aetrack evaluate` end to end on a real MLflow server."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess

import mlflow
import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

from aetrack import data as datasets
from aetrack import evaluation as ev
from aetrack.evaluation import iwae_nll, nll_iw, reference
from aetrack.evaluation.measures import batches, log_likelihood, slice_labels
from aetrack.losses import reconstruction_nll
from aetrack.tracking import reference as registered_reference
from aetrack.cli import main
from aetrack.config import TrainConfig
from aetrack.models import REGISTRY, build_model
from aetrack.samplers import LatentMixture, encode_all
from aetrack.training import fit
from conftest import STAND_IN_M1, aetrack_command, stand_in_m1


@pytest.fixture(autouse=True)
def _tracking_uri_from_env():
    """In-process commands set MLflow's tracking URI globally (here and in other test modules): each test starts
    from the isolated $MLFLOW_TRACKING_URI of conftest and leaves no URI behind."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def trained(name: str, digits, epochs: int = 3, **settings):
    config = TrainConfig(model=name, hidden=(64,), latent_dim=4, epochs=epochs, labeled=50, prior_components=3, **settings)
    initial = None
    if REGISTRY[name].stacked:  # built on a logged VAE: a stand-in, built as a run builds it
        config = dataclasses.replace(config, features=STAND_IN_M1)
        torch.manual_seed(config.seed)
        initial = build_model(config, digits.shape, digits.num_classes, data=digits, load=stand_in_m1(digits))
    model, _ = fit(config, digits, model=initial, progress=False)
    return model, config


@pytest.fixture(scope="module")
def vae(digits):
    return trained("vae", digits, epochs=15)[0]


# --- importance-weighted NLL ------------------------------------------------------------------


def test_iwae_nll_is_exact_for_constant_weights_and_approaches_log_mean_weight():
    constant = torch.full((7, 3), -42.0)
    assert torch.allclose(ev.iwae_nll(constant), torch.full((3,), 42.0))
    # log w ~ N(mu, s^2): log E[w] = mu + s^2 / 2; small K is biased upwards (Jensen), large K is close.
    mu, s = -10.0, 0.8
    log_w = mu + s * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(ev.iwae_nll(log_w)) == pytest.approx(-(mu + s**2 / 2), abs=0.01)
    assert float(ev.iwae_nll(log_w.view(-1, 10_000)[:2]).mean()) > -(mu + s**2 / 2) + 0.1


@pytest.mark.slow
def test_iwae_estimate_is_below_the_negative_elbo_and_tightens_with_k(vae, digits):
    x = digits.test_x
    neg_elbo = ev.bound_terms(vae, x, None, seed=0)["neg_elbo"]
    nll = {k: float(ev.nll_iw(vae, x, None, k, seed=0).mean()) for k in (1, 10, 100, 300)}
    # K = 1 is the ELBO itself, estimated by one sample.
    assert nll[1] == pytest.approx(neg_elbo, abs=0.5)
    assert nll[10] < neg_elbo
    assert nll[1] > nll[10] > nll[100]
    # In expectation the bound keeps tightening, but from K=100 to 300 on a well-fitted posterior the gain is
    # smaller than the estimates' Monte Carlo noise (about 0.01 nat here).
    assert nll[300] < nll[100] + 0.01
    # Seeded: the same seed repeats the estimate exactly, another seed does not.
    assert float(ev.nll_iw(vae, x, None, 100, seed=0).mean()) == nll[100]
    assert float(ev.nll_iw(vae, x, None, 100, seed=1).mean()) != nll[100]
    # Splitting the K samples into chunks (rows bounds images x samples per decoder call) changes only the draws.
    few = x[:60]
    whole, chunked = ev.nll_iw(vae, few, None, 100, seed=0), ev.nll_iw(vae, few, None, 100, seed=0, rows=20)
    assert float(chunked.mean()) == pytest.approx(float(whole.mean()), abs=0.3) and not torch.equal(chunked, whole)


def test_m2_nll_sums_the_label_out(digits):
    model, _ = trained("m2", digits, epochs=1)
    x = digits.test_x[:20]
    marginal = ev.nll_iw(model, x, None, 20, marginal_label=True, num_classes=10, seed=0)
    # log p(x) = logsumexp_y log p(x, y) >= log p(x, y) for any single label.
    for label in (0, 7):
        joint = ev.nll_iw(model, x, torch.full((20,), label), 20, seed=0)
        assert (marginal <= joint + 1e-4).all()


# --- Frechet distance and KID -----------------------------------------------------------------


def features(n=2000, dim=16, seed=0, distribution=0):
    """n draws (by `seed`) from a correlated Gaussian (chosen by `distribution`)."""
    shape = np.random.default_rng(10_000 + distribution)
    mixing, mean = shape.normal(size=(dim, dim)) / np.sqrt(dim), shape.normal(size=dim)
    return np.random.default_rng(seed).normal(size=(n, dim)) @ mixing + mean


def scipy_frechet(a, b):
    """Independent computation: the matrix square root by scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_noise():
    a = features()
    assert abs(ev.frechet_distance(a, a)) < 1e-8
    noise = np.random.default_rng(1).normal(size=a.shape)
    distances = [ev.frechet_distance(a, a + scale * noise) for scale in (0.1, 0.3, 1.0, 3.0)]
    assert all(x < y for x, y in zip(distances, distances[1:]))
    for scale in (0.3, 3.0):
        assert ev.frechet_distance(a, a + scale * noise) == pytest.approx(scipy_frechet(a, a + scale * noise), rel=1e-6)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert ev.frechet_distance_from_statistics(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)


def biased_mmd(x, y):
    """The same kernel sums with the diagonals kept: the biased V-statistic."""
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


def test_kid_is_about_zero_for_one_distribution_and_positive_for_two():
    a, b = features(seed=1), features(seed=2)
    kid_same, _ = ev.kernel_inception_distance(a, b, subsets=20, subset_size=500)
    kid_shifted, _ = ev.kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=500)
    kid_other, _ = ev.kernel_inception_distance(a, features(seed=2, distribution=1), subsets=20, subset_size=500)
    assert abs(kid_same) < 0.05 * kid_shifted and abs(kid_same) < 0.05 * kid_other
    # Unbiased: over independent pairs of same-distribution sets the mean is zero within its standard error,
    # while the biased V-statistic on the same pairs is clearly above zero.
    pairs = [(features(200, seed=s), features(200, seed=s + 1000)) for s in range(40)]
    unbiased = [ev.kernel_inception_distance(x, y, subsets=1, subset_size=200)[0] for x, y in pairs]
    biased = [biased_mmd(x, y) for x, y in pairs]
    error = np.std(unbiased) / math.sqrt(len(pairs))
    assert abs(np.mean(unbiased)) < 3 * error
    assert np.mean(biased) > 5 * error


# --- latent quality, reconstruction and code statistics ---------------------------------------


def test_linear_probe_scores_100_percent_on_separable_codes_and_not_on_rings():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(10, 6))
    labels = np.arange(1000) % 10
    codes = centres[labels] + rng.normal(size=(1000, 6))
    assert ev.probe_accuracy(codes[:800], labels[:800], codes[800:], labels[800:]) == 1.0
    assert ev.knn_accuracy(codes[:800], labels[:800], codes[800:], labels[800:]) == 1.0
    # Two concentric rings: not linearly separable, yet neighbours agree.
    angle, ring = rng.uniform(0, 2 * np.pi, 1000), np.arange(1000) % 2
    rings = np.stack([np.cos(angle), np.sin(angle)], 1) * (1 + 2 * ring)[:, None]
    assert ev.probe_accuracy(rings[:800], ring[:800], rings[800:], ring[800:]) < 0.75
    assert ev.knn_accuracy(rings[:800], ring[:800], rings[800:], ring[800:]) > 0.97


def test_psnr_mse_active_units_and_code_statistics_on_known_values():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ev.mse_per_image(x + 0.1, x), torch.full((4,), 0.01))
    assert torch.allclose(ev.psnr(x + 0.1, x), torch.full((4,), 20.0))
    means = torch.randn(5000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.5, 0.05, 0.0])
    assert ev.active_units(means) == 2  # variances 1, 0.25, 0.0025, 0 against the 0.01 threshold
    stats = ev.code_statistics(torch.tensor([[0.0, 0.5], [0.005, -1.0]]))
    assert stats == {"mean_activation": pytest.approx(0.37625), "fraction_near_zero": 0.5}


def test_jacobian_norm_matches_autograd_jacobians(digits):
    model, _ = trained("cae", digits, epochs=1)
    x = digits.test_x[:3]
    exact = [torch.autograd.functional.jacobian(lambda v: model.encode(v.unsqueeze(0))[0], xi).pow(2).sum() for xi in x]
    assert ev.jacobian_norm(model, x, None, batch_size=2) == pytest.approx(float(torch.stack(exact).mean()), rel=1e-5)


@pytest.mark.slow
def test_denoising_autoencoder_beats_its_noisy_input(digits):
    config = TrainConfig(model="dae", hidden=(128,), latent_dim=16, epochs=30, noise="gaussian", noise_level=0.3)
    dae, _ = fit(config, digits, progress=False)
    table = ev.denoising_table(dae, digits.test_x, [0.3, 0.5], baseline=dae)
    for row in table:
        assert row["psnr_denoised"] > row["psnr_noisy"] + 1
        assert row["psnr_baseline"] == row["psnr_denoised"]  # same network, same noisy images
    assert table[0]["psnr_noisy"] > table[1]["psnr_noisy"]


# --- the reference classifier -----------------------------------------------------------------


@pytest.mark.slow
def test_reference_classifier_is_trained_once_registered_and_reused(digits, monkeypatch):
    monkeypatch.setitem(reference.EPOCHS, "digits", 15)  # the mechanics, not the recipe's last percent, are tested here
    client = mlflow.MlflowClient()
    first = registered_reference.reference_classifier("digits")
    second = registered_reference.reference_classifier("digits")
    name = registered_reference.registered_name("digits")
    assert first.name == second.name == name == "aetrack-digits-reference-classifier"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    runs = client.search_runs([client.get_experiment_by_name(registered_reference.EXPERIMENT).experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["test/accuracy"] > 0.9
    assert second.test_accuracy == pytest.approx(runs[0].data.metrics["test/accuracy"], abs=1e-4)
    # The reloaded network is the registered one: same features, same predictions.
    assert torch.allclose(first.features(digits.test_x), second.features(digits.test_x), atol=1e-5)
    assert second.features(digits.test_x).shape == (len(digits.test_x), 128)


# --- which measures apply to which model ------------------------------------------------------

CODES = {"mean_activation", "fraction_near_zero", "lifetime_sparsity"}
BOUND = {"neg_elbo", "elbo_recon_loss", "kl", "nll_iw", "active_units", "aggregate_kl"}
GENERATION = {"fcd", "kid", "sample_confidence", "nearest_train_distance", "memorisation_ratio"}
ROBUSTNESS = {f"psnr_{what}_{kind}_at_{level}" for what in ("noisy", "denoised") for level in (0.1, 0.3, 0.5)
              for kind in ("gaussian", "masking", "salt-pepper")}
EXPECTED = {
    "ae": GENERATION | CODES,
    "sae": GENERATION | CODES,
    "cae": GENERATION | CODES,
    "dae": GENERATION | CODES | {"psnr_denoised_at_0.3", "psnr_noisy_at_0.3"} | ROBUSTNESS,
    "vae": GENERATION | BOUND,
    "hvae": GENERATION | BOUND - {"aggregate_kl"},  # aggregate_kl: one stochastic layer's q(z|x) against the prior
    "cvae": GENERATION | BOUND | {"label_accuracy", "cas"},
    "m2": GENERATION | BOUND | {"label_accuracy", "cas", "error", "supervised_error"},
    "m1m2": GENERATION | BOUND - {"aggregate_kl"} | {"label_accuracy", "cas", "error", "supervised_error"},
}
EVERY_MODEL = {"recon_loss", "mse", "psnr", "probe_accuracy", "knn_accuracy", "jacobian_frobenius_sq", "parameters",
               "perturbed_mse"}


@pytest.fixture(scope="module")
def small_reference(digits):
    classifier = reference.train_classifier(digits.train_x, digits.train_y, digits.shape, 10, "digits", epochs=15)
    assert classifier.accuracy(digits.test_x, digits.test_y) > 0.9
    classifier.name, classifier.version = "test-reference", "0"
    return classifier


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cvae", "m2"])
def test_label_accuracy_is_high_for_conditional_samples_and_chance_for_unconditional_ones(name, digits, vae, small_reference):
    labels = torch.arange(10).repeat(30)
    unconditional = ev.label_accuracy(small_reference, ev.generate_images(vae, len(labels), labels, None, seed=0), labels)
    assert unconditional < 0.3  # the vae ignores the label it is given: about 1 in 10
    config = TrainConfig(model=name, hidden=(128,), latent_dim=4, epochs=10, lr=3e-3, labeled=100)
    model, _ = fit(config, digits, progress=False)
    assert ev.label_accuracy(small_reference, ev.generate_images(model, len(labels), labels, None, seed=0), labels) > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_evaluate_model_applies_the_measures_that_fit_each_variant(name, digits, small_reference):
    model, config = trained(name, digits, epochs=1)
    sampler = None if hasattr(model, "sample") else LatentMixture.fit(encode_all(model, digits.train_x), components=3)
    settings = ev.Settings(iw_samples=5, samples=100, cas_samples=200, noise_levels=(0.3,))
    result = ev.evaluate_model(model, config, digits, settings=settings, reference=small_reference, sampler=sampler)
    assert set(result.metrics) == EVERY_MODEL | EXPECTED[name]
    assert all(math.isfinite(v) for v in result.metrics.values())
    expected_pictures = {"reconstructions", "traversals", "samples", "nearest_training"}
    expected_pictures |= {"kl_per_dim"} if REGISTRY[name].generative else set()
    expected_pictures |= {"denoising", "denoised", "robustness"} if name == "dae" else set()
    assert set(result.pictures) == expected_pictures
    for key in ("probe_accuracy", "knn_accuracy") + (("label_accuracy", "cas") if REGISTRY[name].conditional else ()):
        assert 0 <= result.metrics[key] <= 1


# --- the command, end to end ------------------------------------------------------------------


def test_evaluate_command_end_to_end_on_a_real_mlflow_server(mlflow_server, digits, tmp_path):
    from aetrack.tracking.run import TrackingOptions, train_tracked

    config = TrainConfig(model="vae", hidden=(64,), latent_dim=4, epochs=5)
    mlflow.set_tracking_uri(mlflow_server)  # the caller sets the tracking URI (as the CLI does)
    run = train_tracked(config, digits, TrackingOptions(experiment="evaluate-e2e"), progress=False)

    small = ["--iw-samples", "50", "--samples", "200", "--tracking-uri", mlflow_server]
    done = subprocess.run([*aetrack_command(), "evaluate", run.run_id, "--json", *small], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    assert printed["run_id"] == run.run_id and printed["model"] == "vae"
    assert printed["metrics"]["test/nll_iw"] <= printed["metrics"]["test/neg_elbo"]
    assert "K=50 importance samples, 360 of 360 test images" in printed["notes"]["nll_iw"]

    client = mlflow.MlflowClient(mlflow_server)
    logged = client.get_run(run.run_id).data.metrics
    for key, value in printed["metrics"].items():
        assert logged[key] == pytest.approx(value), key
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "evaluation")}
    assert {"evaluation/samples.png", "evaluation/reconstructions.png", "evaluation/traversals.png",
            "evaluation/kl_per_dim.png", "evaluation/evaluation.json"} <= artifacts
    name = registered_reference.registered_name("digits")
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    # Again, by the registered model's URI: the reference is reused and the seeded figures repeat exactly.
    registered = f"models:/{run.registered_model}/{run.registered_version}"
    again = CliRunner().invoke(main, ["evaluate", registered, "--json", *small, "--no-log"])
    assert again.exit_code == 0, again.output
    repeated = json.loads(again.stdout)
    assert repeated["run_id"] == run.run_id
    assert repeated["metrics"] == pytest.approx(printed["metrics"])
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_evaluate_gives_one_line_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", "0123456789abcdef0123456789abcdef"])
    # (MLflow's own INFO lines about creating the store may come first.)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: MlflowException: Run with id=0123456789abcdef")
    result = runner.invoke(main, ["evaluate", "x", "--noise-levels", "a,b"])
    assert result.exit_code == 2 and "--noise-levels" in result.output


# --- what `aetrack evaluate` says --------------------------------------------------------------


def test_evaluate_help_names_the_metrics_as_they_are_logged():
    """The metrics are logged as test/<name> (MLflow's groups): --help named them test_<name>."""
    text = CliRunner().invoke(main, ["evaluate", "--help"], terminal_width=200).output
    assert not re.search(r"\btest_[a-z]", text), text
    logged = EVERY_MODEL.union(*EXPECTED.values())
    named = set(re.findall(r"\btest/([a-z_]+)", text))
    assert named == {name for name in logged if "_at_" not in name}  # every one, and no other


def test_a_count_prints_as_a_whole_number():
    result = ev.Evaluation(metrics={"neg_elbo": 27.25, "active_units": 6}, notes={"active_units": "of 8"})
    lines = {line.split()[0]: line.split()[1:] for line in ev.format_table(result).splitlines()[1:]}
    assert lines["test/active_units"] == ["6", "of", "8"]  # not 6.0000
    assert lines["test/neg_elbo"] == ["27.2500"]


# --- the fast IWAE estimate (decoder in cache-sized blocks, log p(x|z) without repeating x) gives the numbers of
# the formula it replaced: the model's own `log_weights`, batch by batch, kept here as the oracle ---

@torch.no_grad()
def oracle_nll_iw(model, x, y, samples, *, marginal_label=False, num_classes=0, seed=0, rows=50_000):
    """aetrack's nll_iw before it was made fast, word for word: the model's log_weights on the whole chunk."""
    labels = range(num_classes) if marginal_label else (None,)
    images = max(1, rows // samples)
    chunk = max(1, min(samples, rows // min(images, len(x))))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index in batches(len(x), images):
            xb = x[index]
            per_label = []
            for label in labels:
                yb = slice_labels(y, index) if label is None else torch.full((len(xb),), label, device=x.device)
                weights = [model.log_weights(xb, yb, min(chunk, samples - done)) for done in range(0, samples, chunk)]
                per_label.append(-iwae_nll(torch.cat(weights)))
            out.append(-torch.logsumexp(torch.stack(per_label), dim=0))
    return torch.cat(out)


def tiny(digits, model, **settings):
    config = TrainConfig(model=model, hidden=(32,), latent_dim=3, epochs=2, labeled=50, prior_components=4, **settings)
    return fit(config, digits, progress=False)[0].eval()


# A stacked variant (M1+M2) has no fast path to check: its importance weights are its own `log_weights`, over M1's codes.
GENERATIVE = sorted(name for name, variant in REGISTRY.items() if variant.generative and not variant.stacked)


# M2 (every label summed out) and the mog and uniform priors add minutes, not cases: they run with the slow tests.
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "m2" else name for name in GENERATIVE])
@pytest.mark.parametrize("prior", ["normal", "vamp", *(pytest.param(prior, marks=pytest.mark.slow) for prior in ("mog", "uniform"))])
def test_fast_iwae_equals_the_models_own_log_weights(digits, name, prior):
    model = tiny(digits, name, prior=prior)
    variant = REGISTRY[name]
    x, y = digits.test_x[:37], digits.test_y[:37]
    given = y if variant.conditional and not variant.semi_supervised else None
    marginal = dict(marginal_label=True, num_classes=digits.num_classes) if variant.semi_supervised else {}
    # rows=120 with K=50: 2 images per draw; block=7: the decoder sees 3 samples x 2 images at a time.
    for samples, rows, block in [(50, 120, 7), (50, 50_000, 2048), (1, 50_000, 5), (300, 100, 64)]:
        fast = nll_iw(model, x, given, samples, seed=3, rows=rows, block=block, **marginal)
        slow = oracle_nll_iw(model, x, given, samples, seed=3, rows=rows, **marginal)
        assert fast.shape == (len(x),)
        # Same draws, same formula: equal to float rounding (sums of ~50 nats over 64 pixels in another order).
        assert torch.allclose(fast, slow, rtol=0, atol=2e-4), (samples, rows, block, (fast - slow).abs().max())


def test_m2_with_a_given_label_weighs_the_joint(digits):
    model = tiny(digits, "m2")
    x = digits.test_x[:10]
    label = torch.full((10,), 4)
    assert torch.allclose(nll_iw(model, x, label, 20, seed=1), oracle_nll_iw(model, x, label, 20, seed=1), atol=2e-4)
    # Without a label and without summing it out, M2 weighs the label its classifier reads, as its log_weights does.
    assert torch.allclose(nll_iw(model, x, None, 20, seed=1), oracle_nll_iw(model, x, None, 20, seed=1), atol=2e-4)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("scale", [5.0, 40.0])
def test_log_likelihood_is_the_negated_reconstruction_nll_without_copies(likelihood, scale):
    generator = torch.Generator().manual_seed(0)
    # (B=4 images, K=6 samples, 25 pixels); scale 40 reaches logits beyond 80, where sigmoid(-l) would underflow.
    logits = torch.randn(4, 6, 1, 5, 5, generator=generator, dtype=torch.float64) * scale
    x = torch.rand(4, 1, 5, 5, generator=generator, dtype=torch.float64)
    x[0] = (x[0] > 0.5).double()
    expected = -reconstruction_nll(logits.flatten(0, 1), x.repeat_interleave(6, dim=0), likelihood).view(4, 6)
    got = log_likelihood(logits.flatten(2).clone(), x.flatten(1), likelihood)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-7)  # softplus(l) = l beyond l = 20: off by e^-20
    # In float32, the sums agree to float rounding.
    got32 = log_likelihood(logits.float().flatten(2), x.float().flatten(1), likelihood)
    assert torch.allclose(got32.double(), expected, rtol=1e-6, atol=1e-3)


def test_iwae_logsumexp_is_stable_for_log_weights_far_below_zero():
    # Log-weights of -100,000 nats: exp underflows to 0, the log-sum-exp must not.
    log_w = torch.tensor([[-1e5], [-1e5 - math.log(3)]], dtype=torch.float64)
    assert float(iwae_nll(log_w)) == pytest.approx(1e5 - math.log((1 + 1 / 3) / 2), rel=1e-9)


def test_the_supervised_only_baseline_learns_from_the_same_labelled_images_as_m2(monkeypatch):
    """M2's q(y|x) trained on M2's own labelled images alone: it learns (far below chance on the digits) and it is
    given exactly the images `labeled_indices` picks for M2 with that seed."""
    from aetrack import data as data_module
    from aetrack.config import TrainConfig
    from aetrack.evaluation.measures import supervised_only_error

    digits = datasets.load("digits", seed=0)
    config = TrainConfig(model="m2", labeled=50, hidden=(64,), seed=1)
    picked = []
    pick = data_module.labeled_indices
    monkeypatch.setattr(data_module, "labeled_indices", lambda *args: picked.append(pick(*args)) or picked[-1])
    error = supervised_only_error(config, digits, steps=200)
    assert torch.equal(picked[0], pick(digits.train_y, 50, 10, 1))  # M2's labelled images of seed 1
    assert error < 0.35, error  # chance is 0.9
    assert supervised_only_error(config, digits, steps=200) == error  # the seed fixes it
