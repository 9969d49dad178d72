"""Estimators: pure functions of tensors or arrays, each citing where it comes from."""

from __future__ import annotations

import math

import numpy as np
import torch


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
