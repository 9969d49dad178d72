"""Measures on a model: the estimators applied to a model over a data split, batched and seeded."""

from __future__ import annotations

import torch

from aetrack.evaluation.metrics import iwae_nll, mse_per_image, psnr
from aetrack.losses import reconstruction_nll
from aetrack.penalties import jacobian_frobenius_sq
from aetrack.samplers import LatentMixture, generate


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def slice_labels(y: torch.Tensor | None, index: slice) -> torch.Tensor | None:
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
        for index in batches(len(x), images):
            xb = x[index]
            per_label = []
            for label in labels:
                yb = slice_labels(y, index) if label is None else torch.full((len(xb),), label, device=x.device)
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
        for index in batches(len(x), batch_size):
            out = model(x[index], None if marginal_label else slice_labels(y, index))
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
    for index in batches(len(x), batch_size):
        xb = x[index]
        recon = model.reconstruct(xb, slice_labels(y, index))
        logits = torch.logit(recon.clamp(1e-7, 1 - 1e-7))  # decoders return sigmoid(logits)
        nll.append(reconstruction_nll(logits, xb, likelihood))
        mse.append(mse_per_image(recon, xb))
        peak.append(psnr(recon, xb))
    return {"recon_loss": float(torch.cat(nll).mean()), "mse": float(torch.cat(mse).mean()),
            "psnr": float(torch.cat(peak).mean())}


def jacobian_norm(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 500) -> float:
    """Mean ||d code / d x||_F^2 over x, exact (the contractive penalty without its weight)."""
    values = []
    for index in batches(len(x), batch_size):
        yb = slice_labels(y, index)
        values.append(jacobian_frobenius_sq(lambda xb: model.encode(xb, yb), x[index]).detach())
    return float(torch.cat(values).mean())


@torch.no_grad()
def kl_per_dimension(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([model.kl_per_dim(x[i], slice_labels(y, i)) for i in batches(len(x), batch_size)]).mean(0)


@torch.no_grad()
def generate_images(model, n: int, labels: torch.Tensor | None, sampler: LatentMixture | None, seed: int,
                    batch_size: int = 1000) -> torch.Tensor:
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    chunks = []
    for index in batches(n, batch_size):
        chunks.append(generate(model, index.stop - index.start, slice_labels(labels, index), generator, sampler=sampler))
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


def traversal_units(codes: torch.Tensor, dims: int = 8) -> list[int]:
    """The `dims` most variable latent units, most variable first: the rows of `traversal`."""
    return codes.var(0).argsort(descending=True)[:dims].tolist()


@torch.no_grad()
def traversal(model, x: torch.Tensor, y: torch.Tensor | None, codes: torch.Tensor, dims: int = 8, steps: int = 8) -> torch.Tensor:
    """One row per latent unit (the `dims` most variable), each swept from its 5th to 95th test percentile
    with the other units held at the code of the first test image."""
    order = traversal_units(codes, dims)
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
