"""The variant registry: `@register("name", ...)` on a class adds a variant.

Adding a variant touches one file: a module in this package (every module here
is imported, which fills the registry). The CLI, the contract tests, tracking
and serving read the registry; nothing else names a variant.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Output:
    """What every model's forward returns: the loss to minimise and what it is made of."""

    loss: torch.Tensor                    # scalar, mean over the batch
    parts: dict[str, torch.Tensor]        # scalar parts, e.g. recon_loss, kl, penalty
    recon: torch.Tensor                   # reconstruction in [0, 1], same shape as the input
    z: torch.Tensor                       # latent code (posterior mean for VAEs)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. the corrupted input of a dae


@dataclass(frozen=True)
class Variant:
    name: str
    cls: type
    kwargs: dict[str, Any]
    scopes: frozenset[str]       # option groups of TrainConfig this variant accepts
    generative: bool             # has a prior to sample from
    conditional: bool            # encoder and decoder see the label
    semi_supervised: bool        # trains on a few labels: each step adds a labelled batch
    description: str


REGISTRY: dict[str, Variant] = {}


def register(name: str, *, scopes: tuple[str, ...] = (), generative: bool = False, conditional: bool = False,
             semi_supervised: bool = False, description: str = "", **kwargs) -> Callable[[type], type]:
    def add(cls: type) -> type:
        REGISTRY[name] = Variant(name, cls, kwargs, frozenset(scopes), generative, conditional, semi_supervised, description)
        return cls
    return add


def build_model(config, shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    variant = REGISTRY[config.model]
    return variant.cls(config, shape, num_classes, **variant.kwargs)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
