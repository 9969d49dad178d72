"""Closed forms against independent computations: KLs and mixture densities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from aetrack import priors
from aetrack.priors import Box, DiagonalGaussian, MixtureOfGaussians, StandardNormal, Uniform, VampPrior


def test_gaussian_kl_matches_its_monte_carlo_estimate():
    torch.manual_seed(0)
    q = DiagonalGaussian(torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[-0.5, 0.3, -2.0]]))
    prior = StandardNormal(3)
    closed = prior.kl(q, None)
    z = q.rsample(200_000)
    monte_carlo = (q.log_prob(z) - prior.log_prob(z)).mean(0)
    assert float(closed) == pytest.approx(float(monte_carlo), rel=0.01)
    # And against torch.distributions, computed independently.
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mu, torch.exp(0.5 * q.logvar)), torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(closed, reference, atol=1e-5)


def test_uniform_prior_kl_is_finite_exact_and_matches_torch():
    torch.manual_seed(0)
    q = Box.from_params(torch.randn(5, 8))
    assert bool(((q.center - q.width / 2) >= -1).all()) and bool(((q.center + q.width / 2) <= 1).all())
    prior = Uniform(4)
    closed = prior.kl(q, None)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Uniform(q.center - q.width / 2, q.center + q.width / 2),
        torch.distributions.Uniform(-torch.ones(4), torch.ones(4))).sum(-1)
    assert torch.isfinite(closed).all()
    assert torch.allclose(closed, reference, atol=1e-5)
    # Samples stay inside the prior's support, so log p(z) is finite and the Monte Carlo KL agrees.
    z = q.rsample(1000)
    assert torch.isfinite(prior.log_prob(z)).all()
    assert torch.allclose((q.log_prob(z) - prior.log_prob(z)).mean(0), closed, atol=1e-4)


def test_mixture_prior_log_density_matches_scipy():
    torch.manual_seed(0)
    prior = MixtureOfGaussians(latent_dim=3, components=4)
    with torch.no_grad():
        prior.logvars.copy_(torch.randn(4, 3) * 0.3)
        prior.logits.copy_(torch.randn(4))
    z = torch.randn(6, 3)
    weights = torch.softmax(prior.logits, -1).detach().numpy()
    expected = np.log(sum(
        w * multivariate_normal(mean=m, cov=np.diag(np.exp(lv))).pdf(z.numpy())
        for w, m, lv in zip(weights, prior.means.detach().numpy(), prior.logvars.detach().numpy())))
    assert np.allclose(prior.log_prob(z).detach().numpy(), expected, atol=1e-4)
    # Samples follow the mixture: their mean is the weighted mean of the component means.
    samples = prior.sample(100_000, torch.Generator().manual_seed(1))
    assert np.allclose(samples.mean(0).numpy(), weights @ prior.means.detach().numpy(), atol=0.03)


def test_vamp_prior_is_the_mean_of_the_encoded_pseudo_inputs():
    torch.manual_seed(0)
    prior = VampPrior(latent_dim=2, components=3, input_shape=(1, 4, 4))
    encoder = torch.nn.Linear(16, 4)
    prior.bind(lambda u: DiagonalGaussian.from_params(encoder(u.flatten(1))))
    z = torch.randn(5, 2)
    q = prior.components()
    densities = [multivariate_normal(mean=m, cov=np.diag(np.exp(lv))).pdf(z.numpy())
                 for m, lv in zip(q.mu.detach().numpy(), q.logvar.detach().numpy())]
    expected = np.log(np.mean(densities, axis=0))
    assert np.allclose(prior.log_prob(z).detach().numpy(), expected, atol=1e-4)
    assert "pseudo_logits" in dict(prior.named_parameters()) and len(list(prior.parameters())) == 1


def test_component_densities_at_vampprior_scale_match_the_direct_sum_in_float64():
    """500 narrow and wide components in 40 dimensions, draws near and far, leading dimensions (k, B): the expanded
    square loses nothing that matters, in value or in gradient."""
    torch.manual_seed(0)
    mu = torch.randn(500, 40, dtype=torch.float64)
    logvar = (torch.rand(500, 40, dtype=torch.float64) * 6 - 5)  # variances from e^-5 to e^1
    z = torch.cat([mu[:50] + 0.01 * torch.randn(50, 40, dtype=torch.float64), 4 * torch.randn(50, 40, dtype=torch.float64)])
    z = z.view(5, 20, 40)
    direct = -0.5 * (priors.LOG_2PI + logvar + (z.unsqueeze(-2) - mu) ** 2 / logvar.exp()).sum(-1)
    zf, muf, lvf = (t.float().requires_grad_() for t in (z, mu, logvar))
    fast = priors.log_normal_components(zf, muf, lvf)
    assert fast.shape == (5, 20, 500)
    reference = torch.logsumexp(direct, -1)
    mixture = torch.logsumexp(fast, -1)
    assert torch.allclose(mixture.double(), reference, atol=1e-3, rtol=1e-5), (mixture.double() - reference).abs().max()
    mixture.sum().backward()
    zd = z.clone().requires_grad_()
    torch.logsumexp(-0.5 * (priors.LOG_2PI + logvar + (zd.unsqueeze(-2) - mu) ** 2 / logvar.exp()).sum(-1), -1).sum().backward()
    torch.testing.assert_close(zf.grad.double(), zd.grad, rtol=1e-3, atol=1e-3)


def test_the_codes_over_the_prior_picture_says_which_colour_is_which_label(monkeypatch):
    """The 2-D codes drawn over the prior's density carry a legend of their labels, as the latent scatter does."""
    from aetrack import images
    from aetrack.evaluation import evaluate

    drawn = []
    monkeypatch.setattr(images, "figure_to_image", drawn.append)
    codes, labels = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)), torch.arange(200) % 10
    evaluate._latent_over_prior(codes, labels, StandardNormal(2))
    legend = drawn[0].axes[0].get_legend()
    assert legend is not None and legend.get_title().get_text() == "label"
    assert [t.get_text() for t in legend.get_texts()] == [f"$\\mathdefault{{{d}}}$" for d in range(10)]
