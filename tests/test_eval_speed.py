"""The fast IWAE estimate (decoder in cache-sized blocks, log p(x|z) without repeating x) gives the same numbers
as the formula it replaced: the model's own `log_weights`, batch by batch, kept here as the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from aetrack import data as datasets
from aetrack.config import TrainConfig
from aetrack.evaluation import iwae_nll, nll_iw
from aetrack.evaluation.measures import batches, log_likelihood, slice_labels
from aetrack.losses import reconstruction_nll
from aetrack.models import REGISTRY
from aetrack.training import fit


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


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def trained(digits, model, **settings):
    config = TrainConfig(model=model, hidden=(32,), latent_dim=3, epochs=2, labeled=50, prior_components=4, **settings)
    return fit(config, digits, progress=False)[0].eval()


# A stacked variant (M1+M2) has no fast path to check: its importance weights are its own `log_weights`, over M1's codes.
GENERATIVE = sorted(name for name, variant in REGISTRY.items() if variant.generative and not variant.stacked)


@pytest.mark.parametrize("name", GENERATIVE)
@pytest.mark.parametrize("prior", ["normal", "mog", "vamp", "uniform"])
def test_fast_iwae_equals_the_models_own_log_weights(digits, name, prior):
    model = trained(digits, name, prior=prior)
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
    model = trained(digits, "m2")
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
