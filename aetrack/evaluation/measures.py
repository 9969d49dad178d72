"""Measures on a model: the estimators applied to a model over a data split, batched and seeded."""

from __future__ import annotations

import math

import torch

from aetrack.evaluation.metrics import iwae_nll, mse_per_image, psnr
from aetrack.losses import reconstruction_nll
from aetrack.models import REGISTRY
from aetrack.models.variational import LatentVariableModel
from aetrack.penalties import jacobian_frobenius_sq
from aetrack.samplers import LatentMixture, generate

DECODER_ROWS = 2048  # rows per decoder call in the IWAE estimate: samples x images, a block that stays in cache


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def slice_labels(y: torch.Tensor | None, index: slice) -> torch.Tensor | None:
    return None if y is None else y[index]


@torch.no_grad()
def nll_iw(model, x: torch.Tensor, y: torch.Tensor | None, samples: int, *, marginal_label: bool = False,
           num_classes: int = 0, seed: int = 0, rows: int = 50_000, block: int = DECODER_ROWS) -> torch.Tensor:
    """Per-image importance-weighted estimate of -log p(x) in nats, K = `samples` (Burda et al. 2015).

    Pass the labels of a conditional model to get -log p(x|y). With `marginal_label` (M2), the label is
    summed out: log p(x) = logsumexp_y log p(x, y), each term estimated with K samples; by Jensen the
    result is still, in expectation, an upper bound on -log p(x).

    `rows` bounds the images x samples drawn at once: min(K, rows) samples for max(1, rows // K) images (the
    draws, hence the estimates, of earlier versions). The decoder then sees `block` rows at a time (samples x
    images), whatever K: on two CPU cores a 2,048-row block costs about a quarter per row of a 50,000-row one.
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
                weights = [importance_log_weights(model, xb, yb, min(chunk, samples - done), block)
                           for done in range(0, samples, chunk)]
                per_label.append(-iwae_nll(torch.cat(weights)))
            out.append(-torch.logsumexp(torch.stack(per_label), dim=0))
    return torch.cat(out)


def importance_log_weights(model, x: torch.Tensor, y: torch.Tensor | None, samples: int,
                           block: int = DECODER_ROWS) -> torch.Tensor:
    """(samples, B) log-weights log p(x, z_k) - log q(z_k|x) (Burda et al. 2015): the model's `log_weights`, from
    the same draws, with the decoder run `block` rows at a time and log p(x|z) summed without copying x per sample.

    Models built on `LatentVariableModel` (vae, cvae, m2) take this path; any other model answers for itself.
    A semi-supervised model (M2) weighs log p(x, y) = log p(x|y, z) + log p(z) + log p(y) with p(y) = 1/classes
    uniform, reading y with its classifier when it is not given, as its own `log_weights` does.
    """
    body = getattr(model, "body", None)
    if not isinstance(body, LatentVariableModel):
        return model.log_weights(x, y, samples)
    semi_supervised = REGISTRY[model.config.model].semi_supervised
    if semi_supervised and y is None:
        y = model.classify(x)
    cond = model.cond(y)
    q = body.posterior(x, cond)
    z = q.rsample(samples)                                   # (K, B, D): the draws of model.log_weights
    target = x.flatten(1)
    per_block = max(1, block // len(x))                      # samples per decoder call
    weights = []
    for start in range(0, samples, per_block):
        zs = z[start:start + per_block]                      # (k, B, D)
        # Image-major rows (B, k): x . logits is then one batched matrix-vector product, without copies.
        flat = zs.transpose(0, 1).reshape(-1, zs.shape[-1])
        flat_cond = None if cond is None else cond.repeat_interleave(len(zs), dim=0)
        logits = body.decoder(flat, flat_cond).view(len(x), len(zs), -1)
        log_px = log_likelihood(logits, target, body.config.likelihood).T
        weights.append(log_px + body.prior.log_prob(zs) - q.log_prob(zs))
    log_w = torch.cat(weights)
    return log_w - math.log(model.num_classes) if semi_supervised else log_w


def log_likelihood(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """log p(x|z) per row, (B, K) from decoder logits (B, K, P) and images (B, P): aetrack.losses.reconstruction_nll
    negated, with each image used against its K rows instead of repeated K times. Overwrites `logits`.

    Bernoulli: sum_p x l + log sigmoid(-l), i.e. x l - softplus(l): a batched matrix-vector product and three cheap
    passes, where torch's log1p, softplus and log_sigmoid kernels cost 10-25 ns per pixel on CPU. sigmoid(-l)
    leaves float32's normal range beyond l = 80; a block with such a logit takes softplus instead.
    """
    x = x.to(logits.dtype)
    if likelihood == "bernoulli":
        dot = torch.bmm(logits, x.unsqueeze(-1)).squeeze(-1)
        if logits.amax() > 80:
            return dot - torch.nn.functional.softplus(logits).sum(-1)
        return dot + logits.neg_().sigmoid_().log_().sum(-1)
    # Gaussian with variance 1/2 (aetrack.losses): (x - mu)^2 + log(pi) / 2 per pixel.
    squared = logits.sigmoid_().sub_(x.unsqueeze(1)).pow_(2).sum(-1)
    return -(squared + 0.5 * math.log(math.pi) * x.shape[-1])


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


@torch.no_grad()
def denoising_matrix(model, x: torch.Tensor, kinds: tuple[str, ...], levels: tuple[float, ...], baseline=None,
                     seed: int = 0) -> list[dict]:
    """The robustness matrix: PSNR of the noisy input, the denoised output and a baseline's output against the clean
    image, for every noise kind and level, whatever noise the model was trained on."""
    from aetrack.models.autoencoders import corrupt

    table = []
    for kind in kinds:
        for level in levels:
            if kind != "gaussian" and level > 1:
                continue
            noisy = corrupt(x, kind, level, torch.Generator(x.device).manual_seed(seed))
            row = {"noise": kind, "noise_level": level, "psnr_noisy": float(psnr(noisy, x).mean()),
                   "psnr_denoised": float(psnr(model.reconstruct(noisy), x).mean())}
            if baseline is not None:
                row["psnr_baseline"] = float(psnr(baseline.reconstruct(noisy), x).mean())
            table.append(row)
    return table


@torch.no_grad()
def perturbed_reconstruction(model, x: torch.Tensor, y: torch.Tensor | None, level: float = 0.05, seed: int = 0,
                             batch_size: int = 1000) -> float:
    """Per-pixel MSE between the reconstruction of x + N(0, level^2) (clamped to [0, 1]) and the clean x: how much a
    small input perturbation moves the output (Rifai et al. 2011's robustness, measured rather than penalised)."""
    generator = torch.Generator(x.device).manual_seed(seed)
    errors = []
    for index in batches(len(x), batch_size):
        xb = x[index]
        noisy = (xb + level * torch.randn(xb.shape, generator=generator, device=x.device)).clamp(0, 1)
        errors.append(mse_per_image(model.reconstruct(noisy, slice_labels(y, index)), xb))
    return float(torch.cat(errors).mean())


def lifetime_sparsity(codes: torch.Tensor) -> float:
    """Treves-Rolls lifetime sparsity of each code unit over the inputs, averaged over units: 0 when a unit is equally
    active for every input, 1 when it answers a single one (Willmore & Tolhurst 2001)."""
    magnitude = codes.abs()
    n = len(codes)
    ratio = magnitude.mean(0) ** 2 / (magnitude.pow(2).mean(0)).clamp_min(1e-12)
    return float(((1 - ratio) / (1 - 1 / n)).clamp(0, 1).mean()) if n > 1 else 0.0


@torch.no_grad()
def aggregate_posterior_mismatch(model, x: torch.Tensor, y: torch.Tensor | None, samples: int = 1000,
                                 seed: int = 0) -> float:
    """Monte Carlo KL(q(z) || p(z)) in nats, q(z) = (1/N) sum_n q(z|x_n) the aggregate posterior over the N images of
    x (Hoffman & Johnson 2016, "ELBO surgery"): one draw z_j ~ q(z|x_j) for `samples` images, scored under every
    image's posterior. Biased upwards by the finite N; comparable between models on the same images."""
    body = model.body
    cond = model.cond(y)
    q = body.posterior(x, cond)
    generator = torch.Generator(x.device).manual_seed(seed)
    pick = torch.randperm(len(x), generator=generator, device=x.device)[:samples]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        z = q.rsample()[pick]                                   # (M, D)
    log_q = torch.cat([q.log_prob(z[index].unsqueeze(1)) for index in batches(len(z), 100)])  # (M, N)
    log_aggregate = torch.logsumexp(log_q, dim=1) - math.log(len(x))
    return float((log_aggregate - body.prior.log_prob(z)).mean())


def sample_confidence(reference, images: torch.Tensor, batch_size: int = 1000) -> float:
    """The reference classifier's mean top-class probability on generated images: blurred or ambiguous samples
    score low (the idea of the Inception score, without its class-balance term)."""
    probabilities = reference._apply(lambda xb: torch.softmax(reference.net(xb), -1).amax(-1), images, batch_size)
    return float(probabilities.mean())


@torch.no_grad()
def nearest_distance(images: torch.Tensor, pool: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per image, the root-mean-square pixel distance to its nearest image in `pool`."""
    flat_pool = pool.flatten(1).float()
    out = []
    for index in batches(len(images), batch_size):
        distances = torch.cdist(images[index].flatten(1).float(), flat_pool)
        out.append(distances.amin(1) / math.sqrt(flat_pool.shape[1]))
    return torch.cat(out)


def supervised_only_error(config, data, steps: int = 1000, check_every: int = 50) -> float:
    """Test error of M2's q(y|x) network (same architecture and widths) trained on the same `config.labeled` labelled
    images alone, with cross-entropy and Adam at `config.lr`, kept at its best validation error: the baseline that
    tells what M2's unlabelled images add (Kingma et al. 2014 compare against such a classifier)."""
    from aetrack.data import labeled_indices
    from aetrack.nets import Encoder

    device = data.test_y.device
    pick = labeled_indices(data.train_y, config.labeled, data.num_classes, config.seed).to(device)
    train_x, train_y = data.train_x[pick], data.train_y[pick]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        net = Encoder(data.shape, config.hidden, data.num_classes, config.arch, activation=config.activation).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    best, state = math.inf, None
    for step in range(1, steps + 1):
        net.train()
        loss = torch.nn.functional.cross_entropy(net(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % check_every == 0:
            error = classification_error(net, data.val_x, data.val_y)
            if error < best:
                best, state = error, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    return classification_error(net, data.test_x, data.test_y)


@torch.no_grad()
def classification_error(net, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    net.eval()
    wrong = torch.cat([net(x[index]).argmax(-1) != y[index] for index in batches(len(x), batch_size)])
    return float(wrong.float().mean())
