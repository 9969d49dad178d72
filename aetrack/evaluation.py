"""Test-set evaluation: small estimators (pure functions on tensors), the measures that
apply them to a model, and `aetrack evaluate`, which picks those that fit the model and
logs them to its run as `test_<name>` metrics and `evaluation/*.png` pictures.

Which measures apply is read from the model's capabilities and its registry entry
(generative, conditional, a classifier, a denoiser), never from its name.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch

from aetrack.cliutils import friendly_errors, tracking_uri_option
from aetrack import images
from aetrack.losses import reconstruction_nll
from aetrack.models import REGISTRY
from aetrack.samplers import LatentMixture, encode_all, generate

# ----------------------------------------------------------------------------------------------
# Estimators: pure functions of tensors or arrays.
# ----------------------------------------------------------------------------------------------


def iwae_nll(log_weights: torch.Tensor) -> torch.Tensor:
    """-log(1/K sum_k w_k) per example from (K, B) log-weights: the IWAE bound of Burda et al. 2015 (eq. 8)."""
    return -(torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0]))


def mse_per_image(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel, one value per image."""
    return (estimate - target).pow(2).flatten(1).mean(-1)


def psnr(estimate: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(range^2 / MSE), MSE floored at 1e-10 (100 dB)."""
    return 10 * torch.log10(data_range**2 / mse_per_image(estimate, target).clamp_min(1e-10))


def active_units(means: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent units whose posterior mean varies over the data: Cov_x(E_q[z_u]) > 0.01 (Burda et al. 2015, sec. 5.2)."""
    return int((means.double().var(0) > threshold).sum())


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017; Preuer et al. 2018 with a classifier's features).

    tr (S1 S2)^(1/2) = sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD
    matrix: no complex square roots and no singular-matrix fix-ups.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(inner.clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the kernel (a.b / d + 1)^3, mean and std over random subsets (Binkowski et al. 2018)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    dim = a.shape[1]
    estimates = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3, (x @ y.T / dim + 1) ** 3
        # The diagonals are left out of the within-set means: that is what makes the estimate unbiased.
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        estimates.append(within - 2 * kxy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


def probe_accuracy(train_z, train_y, test_z, test_y, seed: int = 0) -> float:
    """Accuracy of a logistic regression fitted on (standardised) training codes: how linearly the label can be read."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    probe.fit(np.asarray(train_z), np.asarray(train_y))
    return float(probe.score(np.asarray(test_z), np.asarray(test_y)))


def knn_accuracy(train_z, train_y, test_z, test_y, neighbours: int = 5) -> float:
    """Accuracy of k nearest neighbours in code space: how well same-label images cluster, linearly or not."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(neighbours, len(train_y)))
    knn.fit(np.asarray(train_z), np.asarray(train_y))
    return float(knn.score(np.asarray(test_z), np.asarray(test_y)))


def code_statistics(codes: torch.Tensor, threshold: float = 0.01) -> dict[str, float]:
    """Mean |activation| of the code and the fraction of its entries below `threshold` (near zero)."""
    magnitude = codes.abs()
    return {"mean_activation": float(magnitude.mean()), "fraction_near_zero": float((magnitude < threshold).float().mean())}


def label_accuracy(reference, images: torch.Tensor, labels: torch.Tensor) -> float:
    """How often the reference classifier sees the label that each image was generated for."""
    return float((reference.predict(images) == labels).float().mean())


# ----------------------------------------------------------------------------------------------
# Measures on a model: batched, seeded, no MLflow.
# ----------------------------------------------------------------------------------------------


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _labels(y: torch.Tensor | None, index: slice) -> torch.Tensor | None:
    return None if y is None else y[index]


@torch.no_grad()
def nll_iw(model, x: torch.Tensor, y: torch.Tensor | None, samples: int, *, marginal_label: bool = False,
           num_classes: int = 0, seed: int = 0, rows: int = 50_000) -> torch.Tensor:
    """Per-image importance-weighted estimate of -log p(x) in nats, K = `samples` (Burda et al. 2015).

    Pass the labels of a conditional model to get -log p(x|y). With `marginal_label` (M2), the label is
    summed out: log p(x) = logsumexp_y log p(x, y), each term estimated with K samples; by Jensen the
    result is still, in expectation, an upper bound on -log p(x). `rows` bounds the decoder batch (memory).
    """
    labels = range(num_classes) if marginal_label else (None,)
    images = max(1, rows // samples)
    chunk = max(1, min(samples, rows // min(images, len(x))))
    out = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for index in _batches(len(x), images):
            xb = x[index]
            per_label = []
            for label in labels:
                yb = _labels(y, index) if label is None else torch.full((len(xb),), label, device=x.device)
                weights = [model.log_weights(xb, yb, min(chunk, samples - done)) for done in range(0, samples, chunk)]
                per_label.append(-iwae_nll(torch.cat(weights)))
            out.append(-torch.logsumexp(torch.stack(per_label), dim=0))
    return torch.cat(out)


@torch.no_grad()
def bound_terms(model, x: torch.Tensor, y: torch.Tensor | None, *, marginal_label: bool = False, seed: int = 0,
                batch_size: int = 1000) -> dict[str, float]:
    """Test-set means of the negative ELBO (beta = 1) and its parts, from the model's own forward pass.

    With `marginal_label` (M2) the labels are withheld: neg_elbo is then the bound U(x) on -log p(x)
    with the label summed out under q(y|x), and recon_loss and kl are those under the predicted label.
    """
    totals: dict[str, float] = {}
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for index in _batches(len(x), batch_size):
            out = model(x[index], None if marginal_label else _labels(y, index))
            parts = dict(out.parts)
            if marginal_label:
                parts["neg_elbo"] = parts["unlabeled_bound"]
            for name in ("neg_elbo", "recon_loss", "kl"):
                totals[name] = totals.get(name, 0.0) + float(parts[name]) * (index.stop - index.start)
    return {name: total / len(x) for name, total in totals.items()}


@torch.no_grad()
def reconstruction_measures(model, x: torch.Tensor, y: torch.Tensor | None, likelihood: str,
                            batch_size: int = 1000) -> dict[str, float]:
    """From the deterministic code (posterior mean): -log p(x|z) per image, per-pixel MSE and PSNR."""
    nll, mse, peak = [], [], []
    for index in _batches(len(x), batch_size):
        xb = x[index]
        recon = model.reconstruct(xb, _labels(y, index))
        logits = torch.logit(recon.clamp(1e-7, 1 - 1e-7))  # decoders return sigmoid(logits)
        nll.append(reconstruction_nll(logits, xb, likelihood))
        mse.append(mse_per_image(recon, xb))
        peak.append(psnr(recon, xb))
    return {"recon_loss": float(torch.cat(nll).mean()), "mse": float(torch.cat(mse).mean()),
            "psnr": float(torch.cat(peak).mean())}


def jacobian_norm(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 500) -> float:
    """Mean ||d code / d x||_F^2 over x, exact (the contractive penalty without its weight)."""
    from aetrack.models.autoencoders import jacobian_frobenius_sq

    values = []
    for index in _batches(len(x), batch_size):
        yb = _labels(y, index)
        values.append(jacobian_frobenius_sq(lambda xb: model.encode(xb, yb), x[index]).detach())
    return float(torch.cat(values).mean())


@torch.no_grad()
def kl_per_dimension(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([model.kl_per_dim(x[i], _labels(y, i)) for i in _batches(len(x), batch_size)]).mean(0)


@torch.no_grad()
def generate_images(model, n: int, labels: torch.Tensor | None, sampler: LatentMixture | None, seed: int,
                    batch_size: int = 1000) -> torch.Tensor:
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    chunks = []
    for index in _batches(n, batch_size):
        chunks.append(generate(model, index.stop - index.start, _labels(labels, index), generator, sampler=sampler))
    return torch.cat(chunks)


@torch.no_grad()
def denoising_table(model, x: torch.Tensor, levels: list[float], baseline=None, seed: int = 0) -> list[dict[str, float]]:
    """PSNR against the clean image, per noise level: of the noisy input, the denoised output and a baseline's output."""
    table = []
    for level in levels:
        generator = torch.Generator(x.device).manual_seed(seed)
        noisy = model.corrupt(x, generator, level)
        row = {"noise_level": level, "psnr_noisy": float(psnr(noisy, x).mean()),
               "psnr_denoised": float(psnr(model.reconstruct(noisy), x).mean())}
        if baseline is not None:
            row["psnr_baseline"] = float(psnr(baseline.reconstruct(noisy), x).mean())
        table.append(row)
    return table


@torch.no_grad()
def traversal(model, x: torch.Tensor, y: torch.Tensor | None, codes: torch.Tensor, dims: int = 8, steps: int = 8) -> torch.Tensor:
    """One row per latent unit (the `dims` most variable), each swept from its 5th to 95th test percentile
    with the other units held at the code of the first test image."""
    order = codes.var(0).argsort(descending=True)[:dims]
    low, high = codes.quantile(0.05, dim=0), codes.quantile(0.95, dim=0)
    t = torch.linspace(0, 1, steps, device=codes.device)
    rows = []
    for unit in order:
        z = codes[:1].repeat(steps, 1)
        z[:, unit] = low[unit] + t * (high[unit] - low[unit])
        rows.append(z)
    z = torch.cat(rows)
    label = None if y is None else y[:1].repeat(len(z))
    return model.decode(z, label)


# ----------------------------------------------------------------------------------------------
# Evaluating a model on its data set.
# ----------------------------------------------------------------------------------------------

DEFAULT_NOISE_LEVELS = (0.1, 0.2, 0.3, 0.5, 0.7)
IMAGE_ROWS = 8


def default_iw_samples(test_images: int) -> int:
    """About a million decoder passes over the test set, between 50 and 5000 samples per image."""
    return int(min(5000, max(50, 1_000_000 // max(test_images, 1))))


@dataclass(frozen=True)
class Settings:
    iw_samples: int | None = None       # None: default_iw_samples
    nll_images: int | None = None       # the NLL on the first N test images only (None: all)
    samples: int | None = None          # generated images scored by FCD and KID (None: the test set's size, <= 10000)
    cas_samples: int = 20_000           # at most this many generated training images for the CAS classifier
    noise_levels: tuple[float, ...] = DEFAULT_NOISE_LEVELS
    seed: int = 0


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)      # without the test_ prefix
    notes: dict[str, str] = field(default_factory=dict)          # how a metric was measured
    tables: dict[str, list[dict]] = field(default_factory=dict)
    pictures: dict[str, object] = field(default_factory=dict)    # name -> PIL image


def evaluate_model(model, config, data, *, settings: Settings = Settings(), reference=None, sampler=None,
                   baseline=None, grey_data=None) -> Evaluation:
    """Every measure that applies to `model`. `data` is the run's data set as it was trained on; `grey_data` the same
    images before binarization, the reference classifier's input (default: `data`)."""
    variant = REGISTRY[config.model]
    model.eval()
    result = Evaluation()
    x, y = data.test_x, data.test_y
    cond_y = y if variant.conditional else None  # conditional models encode and decode with the true label
    codes = encode_all(model, x, cond_y)
    _code_measures(result, model, config, data, codes, cond_y, settings.seed)
    if variant.generative:
        _bound_measures(result, model, variant, data, codes, cond_y, settings)
    if hasattr(model, "classify"):
        result.metrics["error"] = float(torch.cat([model.classify(x[i]) != y[i] for i in _batches(len(x), 1000)]).float().mean())
        result.notes["error"] = f"q(y|x) test error, trained with {config.labeled} labels"
    if hasattr(model, "sample") or sampler is not None:
        result.pictures["samples"] = _sample_grid(model, variant, data.num_classes, sampler, settings.seed)
        if reference is not None:
            _generation_measures(result, model, variant, grey_data or data, reference, sampler, settings)
    if getattr(model, "denoising", False):
        _denoising_measures(result, model, config, x, settings, baseline)
    return result


def _code_measures(result: Evaluation, model, config, data, codes, cond_y, seed: int) -> None:
    """Every model: reconstructions from the code, what the code says about the label, how the encoder contracts."""
    variant = REGISTRY[config.model]
    x, y = data.test_x, data.test_y
    result.metrics.update(reconstruction_measures(model, x, cond_y, config.likelihood))
    # Training codes for the probes; with dynamic binarization, from one fixed draw of the training images.
    train_x, train_y = data.train_batch(torch.arange(len(data.train_x), device=x.device), torch.Generator(x.device).manual_seed(seed))
    train_codes = encode_all(model, train_x, train_y if variant.conditional else None)
    arrays = [t.cpu().numpy() for t in (train_codes, train_y, codes, y)]
    result.metrics["probe_accuracy"] = probe_accuracy(*arrays, seed=seed)
    result.metrics["knn_accuracy"] = knn_accuracy(*arrays)
    result.metrics["jacobian_frobenius_sq"] = jacobian_norm(model, x, cond_y)
    result.notes["jacobian_frobenius_sq"] = "mean ||d code / d x||_F^2 of the encoder (of its mean for VAEs)"
    if not variant.generative:
        result.metrics.update(code_statistics(codes))
        result.notes["fraction_near_zero"] = "code entries with |h| < 0.01"
    first = slice(0, IMAGE_ROWS)
    result.pictures["reconstructions"] = images.rows(x[first], model.reconstruct(x[first], _labels(cond_y, first)))
    result.pictures["traversals"] = images.grid(traversal(model, x, cond_y, codes), IMAGE_ROWS)


def _bound_measures(result: Evaluation, model, variant, data, codes, cond_y, settings: Settings) -> None:
    """VAEs: the negative ELBO and its parts, the importance-weighted NLL, active units, KL per unit."""
    x = data.test_x
    marginal = variant.semi_supervised  # M2 sums its label out
    terms = bound_terms(model, x, data.test_y, marginal_label=marginal, seed=settings.seed)
    result.metrics.update(neg_elbo=terms["neg_elbo"], elbo_recon_loss=terms["recon_loss"], kl=terms["kl"])
    result.notes["neg_elbo"] = ("bound U(x), label summed out under q(y|x)" if marginal
                                else "-ELBO of log p(x|y)" if variant.conditional else "-ELBO, beta = 1")
    # The default K keeps about a million decoder passes; summing a label out multiplies them by the classes.
    k = settings.iw_samples or default_iw_samples(len(x) * (data.num_classes if marginal else 1))
    n = min(settings.nll_images or len(x), len(x))
    nll = nll_iw(model, x[:n], None if cond_y is None else cond_y[:n], k, marginal_label=marginal,
                 num_classes=data.num_classes, seed=settings.seed)
    result.metrics["nll_iw"] = float(nll.mean())
    what = "-log p(x), label summed out" if marginal else "-log p(x|y)" if variant.conditional else "-log p(x)"
    result.notes["nll_iw"] = f"{what}, K={k} importance samples, {n} of {len(x)} test images"
    result.metrics["active_units"] = active_units(codes)
    result.notes["active_units"] = f"of {codes.shape[1]} (Cov_x E_q[z_u] > 0.01)"
    kl = kl_per_dimension(model, x, cond_y).cpu().numpy()
    result.pictures["kl_per_dim"] = _bar_chart(kl, "latent unit", "KL (nats)", "KL per latent unit, test set")


def _generation_measures(result: Evaluation, model, variant, grey_data, reference, sampler, settings: Settings) -> None:
    """FCD and KID against the real test images in the reference classifier's feature space; for conditional
    models also the reference's accuracy on samples asked for a label, and the classification accuracy score."""
    from aetrack.reference import train_classifier

    real_x, real_y = grey_data.test_x, grey_data.test_y
    n = settings.samples or min(len(real_x), 10_000)
    # Conditional models are asked for the test set's labels, so both sets have the same class balance.
    labels = real_y.repeat(math.ceil(n / len(real_y)))[:n] if variant.conditional else None
    fake = generate_images(model, n, labels, sampler, settings.seed)
    real_features, fake_features = reference.features(real_x).cpu().numpy(), reference.features(fake).cpu().numpy()
    result.metrics["fcd"] = frechet_distance(real_features, fake_features)
    result.metrics["kid"], _ = kernel_inception_distance(real_features, fake_features, subsets=100,
                                                         subset_size=min(1000, n, len(real_x)), seed=settings.seed)
    result.notes["fcd"] = result.notes["kid"] = (f"{n} samples vs {len(real_x)} test images, "
                                                 f"features of {reference.name} v{reference.version}")
    if not variant.conditional:
        return
    result.metrics["label_accuracy"] = label_accuracy(reference, fake, labels)
    result.notes["label_accuracy"] = f"reference classifier's accuracy on {n} samples asked for a label"
    # CAS (Ravuri & Vinyals 2019): the reference recipe trained on generated images only, tested on real ones.
    count = min(settings.cas_samples, len(grey_data.train_y))
    pick = torch.randperm(len(grey_data.train_y), generator=torch.Generator().manual_seed(settings.seed))[:count]
    train_labels = grey_data.train_y[pick.to(real_y.device)]
    generated = generate_images(model, count, train_labels, sampler, settings.seed + 1)
    classifier = train_classifier(generated, train_labels, grey_data.shape, grey_data.num_classes, grey_data.name, settings.seed)
    result.metrics["cas"] = classifier.accuracy(real_x, real_y)
    result.notes["cas"] = f"reference recipe trained on {count} generated images only, tested on the real test set"


def _denoising_measures(result: Evaluation, model, config, x, settings: Settings, baseline) -> None:
    levels = sorted({*settings.noise_levels, config.noise_level})
    table = denoising_table(model, x, levels, baseline, settings.seed)
    result.tables["denoising"] = table
    result.notes["denoising"] = f"{config.noise} noise; PSNR (dB) against the clean test image"
    for row in table:
        for key in ("psnr_noisy", "psnr_denoised", "psnr_baseline"):
            if key in row:
                result.metrics[f"{key}_at_{row['noise_level']:g}"] = row[key]
    result.pictures["denoising"] = _denoising_plot(table, config.noise)
    fixed = x[:IMAGE_ROWS]
    noisy = model.corrupt(fixed, torch.Generator(x.device).manual_seed(settings.seed))
    result.pictures["denoised"] = images.rows(noisy, model.reconstruct(noisy), fixed)


def _sample_grid(model, variant, num_classes: int, sampler, seed: int):
    """8 x 8 samples; for conditional models one row per label."""
    device = next(model.parameters()).device
    labels = torch.arange(num_classes, device=device).repeat_interleave(IMAGE_ROWS) if variant.conditional else None
    count = IMAGE_ROWS * IMAGE_ROWS if labels is None else len(labels)
    return images.grid(generate_images(model, count, labels, sampler, seed), IMAGE_ROWS)


def _bar_chart(values: np.ndarray, xlabel: str, ylabel: str, title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(values) + 2), 3))
    ax.bar(np.arange(len(values)), values)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return images.figure_to_image(fig)


def _denoising_plot(table: list[dict], noise: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    levels = [row["noise_level"] for row in table]
    for key, label in (("psnr_noisy", "noisy input"), ("psnr_denoised", "denoising AE"), ("psnr_baseline", "plain AE (baseline)")):
        if key in table[0]:
            ax.plot(levels, [row[key] for row in table], marker="o", label=label)
    ax.set(xlabel=f"{noise} noise level", ylabel="PSNR (dB)", title="denoising, test set")
    ax.grid(alpha=0.3)
    ax.legend()
    return images.figure_to_image(fig)


# ----------------------------------------------------------------------------------------------
# Loading what a run logged, and logging the evaluation back to it.
# ----------------------------------------------------------------------------------------------


@dataclass
class LoggedModel:
    run_id: str
    model_uri: str
    model: torch.nn.Module
    info: object                        # modelio.ModelInfo
    sampler: LatentMixture | None       # the autoencoder's fitted latent mixture, if any
    params: dict[str, str]


def model_uri_of(target: str) -> str:
    """A run id, or any MLflow model URI (runs:/, models:/, m-...)."""
    return target if ":/" in target else f"runs:/{target}/model"


def load_logged(target: str, device: str | torch.device = "cpu") -> LoggedModel:
    """The model as logged (the modelio folder inside the pyfunc model) and its run's params."""
    import mlflow

    from aetrack import modelio
    from aetrack.reference import pyfunc_artifact

    uri = model_uri_of(target)
    run_id = mlflow.models.get_model_info(uri).run_id
    if not run_id:
        raise click.ClickException(f"{uri} was not logged by a run; evaluate needs the run to log the metrics to")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        model, info, extra = modelio.load(pyfunc_artifact(local, "model"), device)
    params = mlflow.MlflowClient().get_run(run_id).data.params
    return LoggedModel(run_id, uri, model, info, LatentMixture.from_state(extra), params)


def log_evaluation(run_id: str, evaluation: Evaluation) -> None:
    """Metrics as test_<name>; pictures, tables and notes under evaluation/ in the run's artifacts."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    client, now = mlflow.MlflowClient(), get_current_time_millis()
    metrics = [Metric(f"test_{k}", float(v), now, 0) for k, v in evaluation.metrics.items() if math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    for name, picture in evaluation.pictures.items():
        client.log_image(run_id, picture, artifact_file=f"evaluation/{name}.png")
    client.log_dict(run_id, {"metrics": evaluation.metrics, "notes": evaluation.notes, "tables": evaluation.tables},
                    "evaluation/evaluation.json")


def format_table(evaluation: Evaluation) -> str:
    lines = [f"{'metric':32} {'value':>12}  how"]
    for name, value in evaluation.metrics.items():
        if "_at_" in name:  # one per noise level: the table below shows them
            continue
        note = evaluation.notes.get(name, "")
        lines.append(f"{'test_' + name:32} {value:12.4f}  {note}".rstrip())
    for title, rows in evaluation.tables.items():
        lines += ["", f"{title}: {evaluation.notes.get(title, '')}", "  ".join(f"{k:>14}" for k in rows[0])]
        lines += ["  ".join(f"{v:14.3f}" for v in row.values()) for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------


def load_data(config, data_dir: str | None, download: bool, device) -> tuple[object, object]:
    """The run's data set as trained on, and its grey-level version for the reference classifier."""
    from aetrack import data as datasets

    def load(binarize: str):
        try:
            return datasets.load(config.dataset, data_dir=data_dir, download=download, binarize=binarize,
                                 val_fraction=config.val_fraction, seed=config.seed, device=device)
        except datasets.DataError as err:
            raise click.ClickException(str(err)) from None

    splits = load(config.binarize)
    return splits, splits if config.binarize == "none" else load("none")


@click.command()
@click.argument("target", metavar="RUN_ID_OR_MODEL_URI")
@click.option("--iw-samples", type=click.IntRange(1), default=None,
              help="Importance samples K for test_nll_iw [default: about 1e6 / test images, 50..5000; 5000 is the published protocol].")
@click.option("--nll-images", type=click.IntRange(1), default=None, help="Estimate test_nll_iw on the first N test images only [default: all].")
@click.option("--samples", type=click.IntRange(2), default=None, help="Generated images scored by FCD and KID [default: test set size, at most 10000].")
@click.option("--baseline", default=None, metavar="RUN_ID", help="dae: a plain autoencoder's run to denoise the same noisy images.")
@click.option("--noise-levels", default=",".join(f"{v:g}" for v in DEFAULT_NOISE_LEVELS), show_default=True,
              help="dae: noise levels of the PSNR table (comma separated).")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Score samples with the data set's reference classifier (trained and registered on first use).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw of the evaluation.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR", show_envvar=True,
              help="Folder holding the torchvision data sets (as for train).")
@click.option("--download", is_flag=True, help="Let torchvision fetch missing data set files (needs a network).")
@tracking_uri_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-log", is_flag=True, help="Print only; log nothing to the run.")
@friendly_errors
def evaluate(target, iw_samples, nll_images, samples, baseline, noise_levels, reference, seed, device, data_dir, download,
             tracking_uri, as_json, no_log):
    """Test-set metrics and pictures of a trained run, logged to it as test_* metrics.

    \b
    Every model: test_recon_loss (nats/image, the model's likelihood), test_mse, test_psnr,
      test_probe_accuracy, test_knn_accuracy, test_jacobian_frobenius_sq.
    Autoencoders: test_mean_activation, test_fraction_near_zero.
    vae/cvae/m2: test_neg_elbo, test_elbo_recon_loss, test_kl, test_nll_iw, test_active_units, KL per unit.
    Every model that generates (AEs through their fitted latent mixture): test_fcd, test_kid.
    cvae/m2: test_label_accuracy, test_cas.   m2: test_error.   dae: PSNR per noise level.
    """
    import mlflow

    from aetrack.training import resolve_device

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        levels = tuple(float(v) for v in noise_levels.split(",") if v.strip())
    except ValueError:
        raise click.UsageError(f"--noise-levels expects comma-separated numbers, got {noise_levels!r}") from None
    # MLflow prints "View run ..." lines to stdout; stdout is kept for the result alone.
    with contextlib.redirect_stdout(sys.stderr):
        settings = Settings(iw_samples, nll_images, samples, noise_levels=levels, seed=seed)
        logged, result = evaluate_run(target, settings, use_reference=reference, baseline=baseline, data_dir=data_dir,
                                      download=download, device=resolve_device(device), log=not no_log)
    config = logged.info.config
    if as_json:
        click.echo(json.dumps({"run_id": logged.run_id, "model_uri": logged.model_uri, "model": config.model,
                               "dataset": config.dataset, "metrics": {f"test_{k}": v for k, v in result.metrics.items()},
                               "notes": result.notes, "tables": result.tables}, indent=2))
        return
    click.echo(f"run {logged.run_id}: {config.model} on {config.dataset}" + ("" if no_log else " (metrics logged to the run)"))
    click.echo(format_table(result))
    if "reference" in result.notes:
        click.echo(f"\nreference classifier: {result.notes['reference']}")


def evaluate_run(target: str, settings: Settings = Settings(), *, use_reference: bool = True, baseline: str | None = None,
                 data_dir: str | None = None, download: bool = False, device="cpu", log: bool = True):
    """Load a logged model and its data set, evaluate it, and (with `log`) log the result to its run."""
    from aetrack.reference import reference_classifier

    logged = load_logged(target, device)
    config = logged.info.config
    data, grey = load_data(config, data_dir, download, device)
    other = None
    if baseline:
        if not getattr(logged.model, "denoising", False):
            raise click.UsageError("--baseline applies to a denoising autoencoder (dae) only")
        other = load_logged(baseline, device)
        if other.info.config.dataset != config.dataset:
            raise click.UsageError(f"--baseline was trained on {other.info.config.dataset}, not {config.dataset}")
    can_generate = hasattr(logged.model, "sample") or logged.sampler is not None
    classifier = None
    if use_reference and can_generate:
        classifier = reference_classifier(config.dataset, data_dir=data_dir, download=download, device=device,
                                          log=lambda message: click.echo(message, err=True))
    result = evaluate_model(logged.model, config, data, settings=settings, reference=classifier, sampler=logged.sampler,
                            baseline=None if other is None else other.model, grey_data=grey)
    if classifier is not None and classifier.test_accuracy is not None:
        result.notes["reference"] = f"{classifier.name} v{classifier.version}, test accuracy {classifier.test_accuracy:.4f}"
    if log:
        log_evaluation(logged.run_id, result)
    return logged, result
