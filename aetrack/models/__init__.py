"""The variant registry: `@register("name", ...)` on a class adds a variant.

Adding a variant touches one file: a module in this package. What a variant is and can do (its option
scopes and capability flags) is declared once, in its `@register` call, and read here from the source
without importing it: `aetrack --help` lists the variants without loading torch. The class itself is
imported when a model is first built. The CLI, the contract tests, evaluation, tracking and serving
read capabilities from here; nothing else names a variant.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from aetrack.config import ConfigError, TrainConfig, option_name

# Capability flags a `@register` call may set; everything else it passes goes to the class's constructor.
CAPABILITIES = ("generative", "conditional", "semi_supervised", "denoising", "classifies", "stacked")


@dataclass
class Output:
    """What every model's forward returns: the loss to minimise and what it is made of."""

    loss: Any                           # scalar tensor, mean over the batch
    parts: dict[str, Any]               # scalar parts, e.g. recon_loss, kl, penalty
    recon: Any                          # reconstruction in [0, 1], same shape as the input (None: not made in training)
    z: Any                              # latent code (posterior mean for VAEs)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the corrupted input of a dae


@dataclass(frozen=True)
class Variant:
    name: str
    module: str                  # where its class is registered, imported on first use
    scopes: frozenset[str]       # option groups of TrainConfig this variant accepts
    description: str
    generative: bool = False     # has a prior to sample from
    conditional: bool = False    # encoder and decoder see the label
    semi_supervised: bool = False  # trains on a few labels (its own training batches)
    denoising: bool = False      # sees a corrupted input, scored against the clean one
    classifies: bool = False     # predicts the label: `classify(x)`
    stacked: bool = False        # built on a logged model that it loads when built (M1+M2): built once per run

    @property
    def cls(self) -> type:
        return self._loaded()[0]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self._loaded()[1]

    def _loaded(self) -> tuple[type, dict[str, Any]]:
        if self.name not in _CLASSES:
            importlib.import_module(self.module)
        return _CLASSES[self.name]


@runtime_checkable
class OwnBatches(Protocol):
    """A model that draws its own training batches (M2 adds a labelled batch to each drawn one)."""

    def training_batches(self, data, seed: int) -> Callable: ...


_CLASSES: dict[str, tuple[type, dict[str, Any]]] = {}


def register(name: str, *, scopes: tuple[str, ...] = (), description: str = "", generative: bool = False,
             conditional: bool = False, semi_supervised: bool = False, denoising: bool = False, classifies: bool = False,
             stacked: bool = False, **kwargs) -> Callable[[type], type]:
    """Declare a variant. Its metadata must be literals: they are read from the source (see `_declared`)."""
    def add(cls: type) -> type:
        _CLASSES[name] = (cls, kwargs)
        return cls
    return add


def _declared() -> dict[str, Variant]:
    """Every `@register(...)` of this package's modules, read with `ast` (a few milliseconds, no torch)."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            for call in node.decorator_list:
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "register":
                    meta = {k.arg: ast.literal_eval(k.value) for k in call.keywords
                            if k.arg in ("scopes", "description", *CAPABILITIES)}
                    name = ast.literal_eval(call.args[0])
                    found[name] = Variant(name, f"{__name__}.{path.stem}", frozenset(meta.pop("scopes", ())),
                                          meta.pop("description", ""), **meta)
    return found


REGISTRY: dict[str, Variant] = _declared()


def build_model(config: TrainConfig, shape: tuple[int, int, int], num_classes: int, *, data=None, load=None,
                saved: dict | None = None):
    """The variant's network for this config; the capability flags its constructor names are passed to it, and so
    are `data` (the training splits), `load` (a logged model by run id or URI: a stacked variant's, e.g. M1+M2's VAE)
    and `saved` (what its `built_on()` wrote to a model folder), to a constructor that names them."""
    variant = REGISTRY[config.model]
    accepted = inspect.signature(variant.cls).parameters
    flags = {name: getattr(variant, name) for name in CAPABILITIES if name in accepted}
    given = {name: value for name, value in (("data", data), ("load", load), ("saved", saved)) if name in accepted}
    return variant.cls(config, shape, num_classes, **flags, **given, **variant.kwargs)


@runtime_checkable
class BuiltOn(Protocol):
    """A model built on another logged model (M1+M2 on its VAE): `built_on()` is what rebuilds that part's network from
    a model folder, given back to its constructor as `saved`; the part's weights are in the state dict."""

    def built_on(self) -> dict: ...


def check_options(model: str, explicit: set[str]) -> None:
    """Options given explicitly that `model` does not take are a ConfigError."""
    if model not in REGISTRY:
        raise ConfigError(f"unknown model {model!r}; choose from {', '.join(sorted(REGISTRY))}")
    variant = REGISTRY[model]
    for name, f in TrainConfig.__dataclass_fields__.items():
        scope = f.metadata["scope"]
        if scope and name in explicit and scope not in variant.scopes:
            users = sorted(n for n, v in REGISTRY.items() if scope in v.scopes)
            raise ConfigError(f"{option_name(name)} does not apply to --model {model} (it applies to {', '.join(users)})")
