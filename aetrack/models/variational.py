"""Variational autoencoders: VAE (any prior, beta, KL warm-up), conditional VAE, and M2.

A beta-VAE is a VAE with `beta` set; a conditional VAE is a VAE whose encoder and
decoder see the one-hot label. M2 (Kingma et al. 2014) adds a classifier q(y|x)
and sums the label out for unlabelled examples.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from aetrack.losses import importance_weighted_nll, reconstruction_nll, to_image
from aetrack.data import labeled_indices
from aetrack.models import Output, register
from aetrack.nets import Decoder, Encoder
from aetrack.priors import build_prior


class LatentVariableModel(nn.Module):
    """p(z) p(x|z, c) with q(z|x, c): the part that VAE, CVAE and M2 share (c: optional condition)."""

    def __init__(self, config, shape, cond_dim: int, likelihood: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.cond_dim = cond_dim
        # -log p(x|z) per example from the decoder's output: the pixel likelihood the config names, or a model's own
        # (M1+M2's density over a VAE's codes, whose parameters then train with the rest).
        self.likelihood = likelihood or partial(reconstruction_nll, likelihood=config.likelihood)
        self.prior = build_prior(config.prior, config.latent_dim, config.prior_components, shape)
        self.encoder = Encoder(shape, config.hidden, 2 * config.latent_dim, config.arch, cond_dim, config.activation)
        self.decoder = Decoder(shape, config.hidden, config.latent_dim, config.arch, cond_dim, config.activation)
        if hasattr(self.prior, "bind"):
            # VampPrior: pseudo-inputs go through this encoder; a conditional one sees the uniform label mix.
            self.prior.bind(lambda u: self.posterior(u, self._uniform_cond(u)))

    def _uniform_cond(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.cond_dim:
            return None
        return torch.full((x.shape[0], self.cond_dim), 1.0 / self.cond_dim, device=x.device)

    def posterior(self, x: torch.Tensor, cond: torch.Tensor | None = None, features: torch.Tensor | None = None):
        """q(z|x, c); `features` (the encoder's `features(x)`, computed once) spares the pass through the body."""
        params = self.encoder(x, cond) if features is None else self.encoder.read_out(features, cond)
        return self.prior.posterior.from_params(params)

    def terms(self, x: torch.Tensor, cond: torch.Tensor | None = None, features: torch.Tensor | None = None):
        """Per-example reconstruction NLL and KL, from one reparameterised sample."""
        q = self.posterior(x, cond, features)
        z = q.rsample()
        logits = self.decoder(z, cond)
        return self.likelihood(logits, x), self.prior.kl(q, z), q, logits

    def importance_terms(self, x: torch.Tensor, samples: int, cond: torch.Tensor | None = None, stop_q: bool = False,
                         features: torch.Tensor | None = None):
        """For k samples z_k ~ q(z|x): log p(x|z_k) and log p(z_k) - log q(z_k|x), each (k, B); the decoder's
        logits (k * B, ...), q and the draws z (k, B, D). With `stop_q`, log q is taken with q's parameters held fixed
        (DReG: the encoder then learns through z alone)."""
        q = self.posterior(x, cond, features)
        z = q.rsample(samples)                                   # (k, B, D)
        flat = z.reshape(-1, z.shape[-1])
        flat_cond = None if cond is None else cond.repeat(samples, 1)
        logits = self.decoder(flat, flat_cond)
        target = x.repeat(samples, *([1] * (x.dim() - 1)))
        log_px = -self.likelihood(logits, target).view(samples, -1)
        return log_px, self.prior.log_prob(z) - (q.detached() if stop_q else q).log_prob(z), logits, q, z

    def log_weights(self, x: torch.Tensor, samples: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k|x) for k samples: the importance weights of Burda et al. 2015, shape (k, B)."""
        log_px, log_ratio, *_ = self.importance_terms(x, samples, cond)
        return log_px + log_ratio

    def importance_bound(self, x: torch.Tensor, kl_weight: float, cond: torch.Tensor | None = None,
                         features: torch.Tensor | None = None):
        """Per example, the IWAE loss -log (1/K) sum_k p(x|z_k) [p(z_k) / q(z_k|x)]^w, z_k ~ q(z|x) (Burda et al. 2015,
        eq. 8), with K = --train-samples and w = `kl_weight` (1: the bound itself; K = 1: the ELBO with a one-sample
        KL); with --objective iwae-dreg its gradient is DReG's. Returns the loss, the bound at w = 1 (neg_iwae), the
        one-sample parts -log p(x|z) and log q - log p averaged over the K draws, q, and the first draw's logits."""
        samples, dreg = self.config.train_samples, self.config.objective == "iwae-dreg"
        log_px, log_ratio, logits, q, z = self.importance_terms(x, samples, cond, stop_q=dreg, features=features)
        loss = importance_weighted_nll(log_px, log_ratio, kl_weight)
        if dreg and torch.is_grad_enabled():
            # DReG (Tucker et al. 2018): with w~ the normalised weights, the decoder and prior get sum_k w~ grad log w_k
            # (IWAE's gradient), the encoder sum_k w~^2 (d log w_k / d z_k)(d z_k / d phi): the surrogate gives the
            # first, and the hook on z weighs what flows into z by w~ once more. Its value is the IWAE loss's.
            log_w = log_px + kl_weight * log_ratio
            weights = torch.softmax(log_w.detach(), 0)
            if z.requires_grad:
                z.register_hook(lambda grad: grad * weights.unsqueeze(-1).to(grad.dtype))
            surrogate = -(weights * log_w).sum(0)
            loss = surrogate - surrogate.detach() + loss.detach()
        neg_iwae = importance_weighted_nll(log_px, log_ratio)
        return loss, neg_iwae, -log_px.mean(0), -log_ratio.mean(0), q, logits[:len(x)]

    def kl_weight(self, kl_scale: float = 1.0) -> float:
        """beta times the training loop's warm-up factor (1 outside training)."""
        return self.config.beta * kl_scale

    def sample_latent(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.prior.sample(n, generator=generator, temperature=temperature, device=device)


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(y.long(), num_classes).float()


def labels_for(y: torch.Tensor | None, z: torch.Tensor, num_classes: int, generator=None) -> torch.Tensor:
    """`y`, or where none is given a uniformly drawn label for each code of `z`."""
    return torch.randint(num_classes, (z.shape[0],), generator=generator, device=z.device) if y is None else y


@register("vae", scopes=("variational", "importance"), generative=True,
          description="variational autoencoder (any prior, beta, KL warm-up, ELBO or IWAE objective)")
@register("cvae", scopes=("variational", "importance"), generative=True, conditional=True, description="conditional VAE")
class VAE(nn.Module):
    def __init__(self, config, shape, num_classes, *, conditional: bool = False):
        super().__init__()
        self.config, self.num_classes, self.conditional = config, num_classes, conditional
        self.body = LatentVariableModel(config, shape, num_classes if conditional else 0)

    def cond(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return one_hot(y, self.num_classes) if self.conditional else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_scale: float = 1.0) -> Output:
        if self.config.objective in ("iwae", "iwae-dreg"):
            return self.importance_weighted(x, y, kl_scale)
        recon, kl, q, logits = self.body.terms(x, self.cond(y))
        recon_loss, kl = recon.mean(), kl.mean()
        loss = recon_loss + self.body.kl_weight(kl_scale) * kl
        # neg_elbo is the bound itself (beta = 1), whatever beta is trained with.
        parts = {"recon_loss": recon_loss, "kl": kl, "neg_elbo": recon_loss + kl}
        return Output(loss, parts, to_image(logits), q.mean)

    def importance_weighted(self, x: torch.Tensor, y: torch.Tensor | None, kl_scale: float) -> Output:
        """The IWAE loss (`LatentVariableModel.importance_bound`), its mean over the batch."""
        loss, neg_iwae, recon, kl, q, logits = self.body.importance_bound(x, self.body.kl_weight(kl_scale), self.cond(y))
        recon_loss, kl = recon.mean(), kl.mean()
        parts = {"recon_loss": recon_loss, "kl": kl, "neg_elbo": recon_loss + kl, "neg_iwae": neg_iwae.mean()}
        return Output(loss.mean(), parts, to_image(logits), q.mean)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.body.posterior(x, self.cond(y)).mean

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return to_image(self.body.decoder(z, self.cond(y)))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, y), y)

    def sample(self, n: int, y: torch.Tensor | None = None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        z = self.body.sample_latent(n, generator, temperature)
        return self.decode(z, labels_for(y, z, self.num_classes, generator) if self.conditional else y)

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, samples: int) -> torch.Tensor:
        """(k, B) importance log-weights of log p(x) (of log p(x|y) for the conditional VAE)."""
        return self.body.log_weights(x, samples, self.cond(y))

    def kl_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.body.prior.kl_per_dim(self.body.posterior(x, self.cond(y)))


@register("m2", scopes=("variational", "importance", "semi_supervised"), generative=True, conditional=True, semi_supervised=True,
          classifies=True, description="semi-supervised VAE (Kingma et al. 2014, M2)")
class M2(nn.Module):
    """Labels are y >= 0; unlabelled examples carry y = -1.

    Labelled:   L(x, y) = -log p(x|y, z) + KL - log p(y)  (with --objective iwae: Burda et al.'s K-sample bound)
    Unlabelled: U(x) = sum_y q(y|x) L(x, y) - H(q(y|x))   (a bound on -log p(x) for any L(x, y) that bounds -log p(x, y))
    Loss = mean L + mean U + alpha * mean CE(q(y|x), y) on labelled examples, alpha = classifier_weight * labeled
    (Kingma et al.'s alpha = 0.1 N weighs the mean CE in an objective summed over N images: 0.1 here, divided by N).
    """

    def __init__(self, config, shape, num_classes, likelihood: nn.Module | None = None):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.body = LatentVariableModel(config, shape, num_classes, likelihood)
        self.classifier = Encoder(shape, config.hidden, num_classes, config.arch, activation=config.activation)

    def cond(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return one_hot(y, self.num_classes)

    def _bound(self, x: torch.Tensor, y: torch.Tensor, kl_weight: float, features: torch.Tensor):
        """-log p(x, y) bounded per example (p(y) uniform): the ELBO's, or with --objective iwae the IWAE's; and the
        one-sample parts, q and logits."""
        if self.config.objective == "elbo":
            recon, kl, q, logits = self.body.terms(x, self.cond(y), features)
            loss = recon + kl_weight * kl
        else:
            loss, _, recon, kl, q, logits = self.body.importance_bound(x, kl_weight, self.cond(y), features)
        return loss + math.log(self.num_classes), recon, kl, q, logits

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_scale: float = 1.0) -> Output:
        if y is None:
            y = torch.full((x.shape[0],), -1, device=x.device, dtype=torch.long)
        kl_weight = self.body.kl_weight(kl_scale)
        labeled = y >= 0
        class_logits = self.classifier(x)
        # The encoder's body sees x alone; only its read-out sees the label, so x goes through the body once,
        # not once per label tried.
        features = self.body.encoder.features(x)
        zero = x.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        loss = zero
        # Per example, for the logged parts: the bound's terms at the true label where known, else at the
        # predicted one, from the passes the loss makes (no pass of its own).
        recon_image, recon_nll, kl_term = torch.empty_like(x), x.new_empty(len(x)), x.new_empty(len(x))
        code = x.new_empty(len(x), self.config.latent_dim)

        if labeled.any():
            bound, recon, kl, q, logits = self._bound(x[labeled], y[labeled], kl_weight, features[labeled])
            ce = F.cross_entropy(class_logits[labeled], y[labeled])
            alpha = self.config.classifier_weight * self.config.labeled
            loss = loss + bound.mean() + alpha * ce
            parts.update(labeled_bound=bound.mean(), classifier_loss=ce)
            recon_image[labeled], code[labeled] = to_image(logits).to(x.dtype), q.mean.to(x.dtype)
            recon_nll[labeled], kl_term[labeled] = recon.to(x.dtype), kl.to(x.dtype)
        if (~labeled).any():
            xu = x[~labeled]
            probs = torch.softmax(class_logits[~labeled], -1)
            n, k = xu.shape[0], self.num_classes
            # Sum the label out: evaluate the bound for every label of every example in one batch.
            ys = torch.arange(k, device=x.device).repeat_interleave(n)
            bound, recon, kl, q, logits = self._bound(xu.repeat(k, *([1] * (x.dim() - 1))), ys, kl_weight,
                                                      features[~labeled].repeat(k, 1))
            bound = bound.view(k, n).T
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
            unlabeled_bound = (probs * bound).sum(-1) - entropy
            loss = loss + unlabeled_bound.mean()
            parts["unlabeled_bound"] = unlabeled_bound.mean()
            at_best = (probs.argmax(-1), torch.arange(n, device=x.device))  # the predicted label's pass
            recon_image[~labeled] = to_image(logits.view(k, n, *x.shape[1:])[at_best]).to(x.dtype)
            recon_nll[~labeled], kl_term[~labeled] = recon.view(k, n)[at_best].to(x.dtype), kl.view(k, n)[at_best].to(x.dtype)
            code[~labeled] = q.mean.view(k, n, -1)[at_best].to(x.dtype)
        recon_nll, kl_term = recon_nll.detach(), kl_term.detach()
        parts.update(recon_loss=recon_nll.mean(), kl=kl_term.mean(), neg_elbo=(recon_nll + kl_term).mean())
        parts["error"] = (class_logits.argmax(-1) != y)[labeled].float().mean() if labeled.any() else zero
        return Output(loss, parts, recon_image, code)

    def training_batches(self, data, seed: int):
        """Each drawn batch is unlabelled; a labelled batch of the same size, drawn from `config.labeled`
        examples balanced over classes, joins it."""
        labeled = labeled_indices(data.train_y, self.config.labeled, data.num_classes, seed)
        size = min(self.config.batch_size, len(labeled))

        def draw(index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = data.train_batch(index, generator)
            pick = labeled[torch.randint(len(labeled), (size,), generator=generator, device=labeled.device)]
            xl, yl = data.train_batch(pick, generator)
            return torch.cat([x, xl]), torch.cat([torch.full_like(y, -1), yl])

        return draw

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x).argmax(-1)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = self.classify(x) if y is None else y
        return self.body.posterior(x, self.cond(y)).mean

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return to_image(self.body.decoder(z, self.cond(labels_for(y, z, self.num_classes))))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = self.classify(x) if y is None else y
        return self.decode(self.encode(x, y), y)

    def sample(self, n: int, y: torch.Tensor | None = None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        z = self.body.sample_latent(n, generator, temperature)
        return self.decode(z, labels_for(y, z, self.num_classes, generator))

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, samples: int) -> torch.Tensor:
        """(k, B) importance log-weights of log p(x, y) with p(y) uniform; y predicted when not given."""
        y = self.classify(x) if y is None else y
        return self.body.log_weights(x, samples, self.cond(y)) - math.log(self.num_classes)

    def kl_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = self.classify(x) if y is None else y
        return self.body.prior.kl_per_dim(self.body.posterior(x, self.cond(y)))
