"""Evaluating a trained model on its data set: every measure that applies to it.

Which measures apply is read from the variant's declared capabilities (generative, conditional,
classifies, denoising), never from its name or its attributes. No MLflow here: tracking/workflows/evaluate.py
loads a logged model and logs the result back to its run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from aetrack import images
from aetrack.config import DEFAULT_NOISE_LEVELS, TrainConfig  # noqa: F401 (DEFAULT_NOISE_LEVELS: re-exported)
from aetrack.evaluation_settings import NOISE_KINDS, Settings  # noqa: F401 (NOISE_KINDS: re-exported)
from aetrack.evaluation.measures import (aggregate_posterior_mismatch, batches, bound_terms, denoising_matrix,
                                         denoising_table, generate_images, jacobian_norm, kl_per_dimension,
                                         lifetime_sparsity, nearest_distance, nll_iw, perturbed_reconstruction,
                                         reconstruction_measures, sample_confidence, slice_labels, supervised_only_error,
                                         traversal, traversal_units)
from aetrack.evaluation.metrics import (active_units, code_statistics, frechet_distance, kernel_inception_distance,
                                        knn_accuracy, label_accuracy, probe_accuracy)
from aetrack.images import IMAGE_ROWS
from aetrack.models import REGISTRY
from aetrack.models.variational import LatentVariableModel
from aetrack.samplers import encode_all






def default_iw_samples(test_images: int) -> int:
    """About a million decoder passes over the test set, between 50 and 5000 samples per image."""
    return int(min(5000, max(50, 1_000_000 // max(test_images, 1))))


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
    _code_measures(result, model, config, data, codes, cond_y, settings)
    if variant.generative:
        _bound_measures(result, model, variant, data, codes, cond_y, settings)
    if variant.classifies:
        result.metrics["error"] = float(torch.cat([model.classify(x[i]) != y[i] for i in batches(len(x), 1000)]).float().mean())
        result.notes["error"] = f"q(y|x) test error, trained with {config.labeled} labels"
    if variant.semi_supervised and settings.supervised_baseline:
        result.metrics["supervised_error"] = supervised_only_error(config, data)
        result.notes["supervised_error"] = (f"test error of M2's q(y|x) network trained on the same {config.labeled} "
                                            f"labelled images alone (pixels), best of its validation checks")
    if variant.generative or sampler is not None:
        generator = torch.Generator(next(model.parameters()).device).manual_seed(settings.seed)
        result.pictures["samples"] = images.sample_grid(model, generator, conditional=variant.conditional,
                                                        num_classes=data.num_classes, sampler=sampler)
        if reference is not None:
            _generation_measures(result, model, variant, grey_data or data, reference, sampler, settings)
    if variant.denoising:
        _denoising_measures(result, model, config, x, settings, baseline)
    return result


def _code_measures(result: Evaluation, model, config, data, codes, cond_y, settings: Settings) -> None:
    """Every model: reconstructions from the code, what the code says about the label, how the encoder contracts."""
    variant, seed = REGISTRY[config.model], settings.seed
    result.metrics["parameters"] = sum(p.numel() for p in model.parameters())
    result.notes["parameters"] = "parameters of the whole model"
    x, y = data.test_x, data.test_y
    result.metrics.update(reconstruction_measures(model, x, cond_y, config.likelihood))
    # Training codes for the probes; with dynamic binarization, from one fixed draw of the training images.
    train_x, train_y = data.train_batch(torch.arange(len(data.train_y), device=x.device), torch.Generator(x.device).manual_seed(seed))
    train_codes = encode_all(model, train_x, train_y if variant.conditional else None)
    arrays = [t.cpu().numpy() for t in (train_codes, train_y, codes, y)]
    result.metrics["probe_accuracy"] = probe_accuracy(*arrays, seed=seed)
    result.metrics["knn_accuracy"] = knn_accuracy(*arrays)
    result.metrics["jacobian_frobenius_sq"] = jacobian_norm(model, x, cond_y)
    result.notes["jacobian_frobenius_sq"] = "mean ||d code / d x||_F^2 of the encoder (of its mean for VAEs)"
    result.metrics["perturbed_mse"] = perturbed_reconstruction(model, x, cond_y, settings.perturbation, seed)
    result.notes["perturbed_mse"] = f"per-pixel MSE of the reconstruction of x + N(0, {settings.perturbation:g}^2) against x"
    if not variant.generative:
        result.metrics.update(code_statistics(codes))
        result.metrics["lifetime_sparsity"] = lifetime_sparsity(codes)
        result.notes["fraction_near_zero"] = "code entries with |h| < 0.01"
        result.notes["lifetime_sparsity"] = "Treves-Rolls sparsity of each code unit over the test images, mean over units"
    first = slice(0, IMAGE_ROWS)
    result.pictures["reconstructions"] = images.rows(x[first], model.reconstruct(x[first], slice_labels(cond_y, first)),
                                                     labels=images.RECONSTRUCTION_ROWS)
    result.pictures["traversals"] = images.grid(traversal(model, x, cond_y, codes), IMAGE_ROWS,
                                                row_labels=[f"z{u}" for u in traversal_units(codes)],
                                                title="each unit from its 5th to its 95th test percentile")


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
    own = getattr(model, "bound_notes", {})  # a model whose density is not over pixels says what it is over (M1+M2)
    what = own.get("nll_iw", what)
    result.notes["neg_elbo"] = own.get("neg_elbo", result.notes["neg_elbo"])
    result.notes["nll_iw"] = f"{what}, K={k} importance samples, {n} of {len(x)} test images"
    result.metrics["active_units"] = active_units(codes)
    result.notes["active_units"] = f"of {codes.shape[1]} (Cov_x E_q[z_u] > 0.01)"
    if isinstance(getattr(model, "body", None), LatentVariableModel) and not getattr(model.config, "features", ""):
        result.metrics["aggregate_kl"] = aggregate_posterior_mismatch(model, x, cond_y, seed=settings.seed)
        result.notes["aggregate_kl"] = f"KL(q(z) || p(z)), q(z) the aggregate posterior of {len(x)} test images, Monte Carlo"
        if codes.shape[1] == 2:
            result.pictures["latent_prior"] = _latent_over_prior(codes, data.test_y, model.body.prior)
    kl = kl_per_dimension(model, x, cond_y).cpu().numpy()
    result.pictures["kl_per_dim"] = _bar_chart(kl, "latent unit", "KL (nats)", "KL per latent unit, test set")


def _generation_measures(result: Evaluation, model, variant, grey_data, reference, sampler, settings: Settings) -> None:
    """FCD and KID against the real test images in the reference classifier's feature space; for conditional
    models also the reference's accuracy on samples asked for a label, and the classification accuracy score."""
    from aetrack.evaluation.reference import train_classifier

    real_x, real_y = grey_data.test_x, grey_data.test_y
    n = settings.samples or min(max(len(real_x), 1000), 10_000)
    # Conditional models are asked for the test set's labels, so both sets have the same class balance.
    labels = real_y.repeat(math.ceil(n / len(real_y)))[:n] if variant.conditional else None
    fake = generate_images(model, n, labels, sampler, settings.seed)
    real_features, fake_features = reference.features(real_x).cpu().numpy(), reference.features(fake).cpu().numpy()
    result.metrics["fcd"] = frechet_distance(real_features, fake_features)
    result.metrics["kid"], _ = kernel_inception_distance(real_features, fake_features, subsets=100,
                                                         subset_size=min(1000, n, len(real_x)), seed=settings.seed)
    result.notes["fcd"] = result.notes["kid"] = (f"{n} samples vs {len(real_x)} test images, "
                                                 f"features of {reference.name} v{reference.version}")
    result.metrics["sample_confidence"] = sample_confidence(reference, fake)
    result.notes["sample_confidence"] = f"reference classifier's mean top-class probability on {n} samples"
    # Memorisation: a sample much nearer its nearest training image than a test image is to its own was copied.
    train_x = grey_data.train_x
    to_sample, to_test = nearest_distance(fake, train_x), nearest_distance(real_x, train_x)
    result.metrics["nearest_train_distance"] = float(to_sample.mean())
    result.metrics["memorisation_ratio"] = float(to_sample.mean() / to_test.mean().clamp_min(1e-12))
    result.notes["nearest_train_distance"] = "RMS pixel distance from a sample to its nearest training image, mean"
    result.notes["memorisation_ratio"] = "nearest_train_distance of samples / that of test images (< 1: nearer than real)"
    shown = fake[:IMAGE_ROWS]
    nearest = torch.cdist(shown.flatten(1), train_x.flatten(1).to(shown.dtype)).argmin(1)
    result.pictures["nearest_training"] = images.rows(shown, train_x[nearest], labels=("sample", "nearest training"))
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
    result.metrics.update(_psnr_metrics(table, kind=False))
    result.pictures["denoising"] = _denoising_plot(table, config.noise)
    if settings.robustness_kinds:
        matrix = denoising_matrix(model, x, settings.robustness_kinds, settings.robustness_levels, baseline, settings.seed)
        result.tables["robustness"] = matrix
        result.notes["robustness"] = f"trained on {config.noise} noise at {config.noise_level:g}; PSNR (dB) on every kind"
        result.metrics.update(_psnr_metrics(matrix, kind=True))
        result.pictures["robustness"] = _robustness_plot(matrix, config)
    fixed = x[:IMAGE_ROWS]
    noisy = model.corrupt(fixed, torch.Generator(x.device).manual_seed(settings.seed))
    result.pictures["denoised"] = images.rows(noisy, model.reconstruct(noisy), fixed, labels=images.DENOISING_ROWS)


def _psnr_metrics(rows: list[dict], kind: bool) -> dict[str, float]:
    """A denoising table's PSNRs as metrics: psnr_denoised_at_0.3, or with the noise's kind, psnr_denoised_masking_at_0.3."""
    return {f"{key}_{row['noise']}_at_{row['noise_level']:g}" if kind else f"{key}_at_{row['noise_level']:g}": row[key]
            for row in rows for key in ("psnr_noisy", "psnr_denoised", "psnr_baseline") if key in row}


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


def _robustness_plot(matrix: list[dict], config):
    """The robustness matrix as a heat map: denoised PSNR (and its gain over the noisy input) per kind and level."""
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(row["noise"] for row in matrix))
    levels = sorted({row["noise_level"] for row in matrix})
    grid = np.full((len(kinds), len(levels)), np.nan)
    gain = np.full_like(grid, np.nan)
    for row in matrix:
        i, j = kinds.index(row["noise"]), levels.index(row["noise_level"])
        grid[i, j], gain[i, j] = row["psnr_denoised"], row["psnr_denoised"] - row["psnr_noisy"]
    fig, ax = plt.subplots(figsize=(1.3 * len(levels) + 2.5, 0.7 * len(kinds) + 1.6))
    shown = ax.imshow(grid, cmap="viridis", aspect="auto")
    middle = np.nanmean([np.nanmin(grid), np.nanmax(grid)])
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):  # dark text on viridis' light end
            ax.text(j, i, f"{value:.1f}\n({gain[i, j]:+.1f})", ha="center", va="center", fontsize=8,
                    color="black" if value > middle else "white")
    ax.set(xticks=range(len(levels)), xticklabels=[f"{v:g}" for v in levels], yticks=range(len(kinds)), yticklabels=kinds,
           xlabel="noise level", title=f"denoised PSNR (dB, gain), trained on {config.noise} {config.noise_level:g}")
    fig.colorbar(shown, ax=ax)
    return images.figure_to_image(fig)


def _latent_over_prior(codes: torch.Tensor, labels: torch.Tensor, prior):
    """A 2-D code's test means, coloured by label, over the prior's density."""
    import matplotlib.pyplot as plt

    points = codes.detach().cpu().numpy()
    low, high = np.percentile(points, 0.5, axis=0), np.percentile(points, 99.5, axis=0)
    pad = 0.25 * (high - low) + 1e-3
    xs, ys = (np.linspace(low[k] - pad[k], high[k] + pad[k], 120) for k in (0, 1))
    mesh = torch.tensor(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), dtype=codes.dtype, device=codes.device)
    with torch.no_grad():
        density = prior.log_prob(mesh).exp().view(len(ys), len(xs)).cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.contourf(xs, ys, density, levels=12, cmap="Greys")
    shown = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6)
    ax.legend(*shown.legend_elements(), title="label", fontsize=7, loc="best")  # which colour is which digit
    ax.set(xlabel="z0", ylabel="z1", title="test codes over the prior's density")
    return images.figure_to_image(fig)


def format_table(evaluation: Evaluation) -> str:
    lines = [f"{'metric':32} {'value':>12}  how"]
    for name, value in evaluation.metrics.items():
        if "_at_" in name:  # one per noise level: the table below shows them
            continue
        note = evaluation.notes.get(name, "")
        # A count (active units) is a whole number: 6, not 6.0000.
        shown = f"{value:12d}" if isinstance(value, int) else f"{value:12.4f}"
        lines.append(f"{'test/' + name:32} {shown}  {note}".rstrip())
    for title, rows in evaluation.tables.items():
        lines += ["", f"{title}: {evaluation.notes.get(title, '')}", "  ".join(f"{k:>14}" for k in rows[0])]
        lines += ["  ".join(f"{v:14.3f}" for v in row.values()) for row in rows]
    return "\n".join(lines)
