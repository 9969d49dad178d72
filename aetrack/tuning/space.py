"""Search spaces: `name=int:LOW:HIGH[:log|:STEP]`, `name=float:LOW:HIGH[:log|:STEP]`, `name=cat:A,B,...`;
the default space of each variant; which settings may be searched. Sizes of a tuple setting (`hidden`)
are joined by "-" inside one choice: `hidden=cat:128,256-128`.

A new searchable setting's default range is one line here (DEFAULT_SPACE or SCOPE_SPACES). Imports
neither Optuna nor torch: a trial only has to answer `suggest_int`, `suggest_float`, `suggest_categorical`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from aetrack.config import MIXTURE_PRIORS, PRIORS, ConfigError, TrainConfig, field_scope, parse_value
from aetrack.models import Variant
from aetrack.tracking.metric_names import champion_metric
from aetrack.tuning import TuningError

TYPES = typing.get_type_hints(TrainConfig)


class SpaceError(TuningError, ConfigError):
    """A search-space spec that cannot be used."""


FIXED_ONLY = ("model", "dataset", "binarize", "val_fraction", "seed", "epochs", "device", "log_every", "patience")


SPEC_HELP = "expected int:LOW:HIGH[:log|:STEP], float:LOW:HIGH[:log|:STEP] or cat:A,B,..."


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                                   # "int", "float" or "cat"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[str, tuple] | None = None       # (other setting, its values): only searched then

    @property
    def spec(self) -> str:
        if self.kind == "cat":
            return "cat:" + ",".join(str(c) for c in self.choices)
        tail = ":log" if self.log else f":{_number(self.step)}" if self.step else ""
        return f"{self.kind}:{_number(self.low)}:{_number(self.high)}{tail}"

    def suggest(self, trial):
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        return trial.suggest_categorical(self.name, list(self.choices))

    def extremes(self) -> list:
        return list(self.choices) if self.kind == "cat" else [self.low, self.high]


def config_value(name: str, value):
    """A sampled value as the config field holds it ("256-128" -> (256, 128))."""
    if typing.get_origin(TYPES[name]) is tuple:
        return tuple(int(part) for part in str(value).split("-"))
    return parse_value(TYPES[name], value) if isinstance(value, str) else TYPES[name](value)


def parse_param(name: str, spec, when: tuple | None = None) -> Param:
    """One `NAME=SPEC` (or a YAML list of choices) -> Param; SpaceError says what is wrong in one line."""
    name = name.strip().replace("-", "_")
    if name not in TYPES:
        raise SpaceError(f"unknown parameter {name!r}; searchable: {', '.join(n for n in TYPES if n not in FIXED_ONLY)}")
    if name in FIXED_ONLY:
        raise SpaceError(f"{name} cannot be searched (it changes the data, the split or a trial's budget); "
                         f"set it with --{name.replace('_', '-')}")
    hint, meta = TYPES[name], TrainConfig.__dataclass_fields__[name].metadata
    if isinstance(spec, (list, tuple)):
        kind, rest = "cat", ",".join("-".join(map(str, c)) if isinstance(c, (list, tuple)) else str(c) for c in spec)
    else:
        kind, _, rest = str(spec).strip().partition(":")
    shown = f"{name}={spec}"
    if kind == "cat":
        raw = [c.strip() for c in rest.split(",") if c.strip()]
        if not raw:
            raise SpaceError(f"{shown}: cat needs at least one choice")
        choices = []
        for text in raw:
            try:
                choices.append(_choice(hint, text))
                config_value(name, choices[-1])
            except ValueError:
                raise SpaceError(f"{shown}: {text!r} is not a valid {name} ({_type_name(hint)})") from None
        choices = tuple(choices)
        if meta["choices"] and (bad := [c for c in choices if c not in meta["choices"]]):
            raise SpaceError(f"{shown}: {bad[0]!r} is not one of {', '.join(meta['choices'])}")
        return Param(name, "cat", choices=choices, when=when)
    if kind not in ("int", "float"):
        raise SpaceError(f"{shown}: {SPEC_HELP}")
    if hint is not {"int": int, "float": float}[kind]:
        use = f"{hint.__name__}:LOW:HIGH" if hint in (int, float) else "cat:A,B,..."
        raise SpaceError(f"{shown}: {name} takes {_type_name(hint)}; use {use}")
    parts = rest.split(":")
    number = int if kind == "int" else float
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        low, high = number(parts[0]), number(parts[1])
        log = len(parts) == 3 and parts[2] == "log"
        step = number(parts[2]) if len(parts) == 3 and not log else None
    except ValueError:
        raise SpaceError(f"{shown}: {SPEC_HELP}") from None
    if low > high:
        raise SpaceError(f"{shown}: LOW is above HIGH")
    if log and low <= 0:
        raise SpaceError(f"{shown}: a log scale needs LOW > 0")
    if step is not None and step <= 0:
        raise SpaceError(f"{shown}: STEP must be positive")
    return Param(name, kind, low, high, log, step, when=when)


def _choice(hint, text: str):
    if typing.get_origin(hint) is tuple:
        return "-".join(str(int(size)) for size in text.replace("x", "-").split("-"))
    return parse_value(hint, text)


def _type_name(hint) -> str:
    return "sizes joined by -" if typing.get_origin(hint) is tuple else getattr(hint, "__name__", str(hint))


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# The default spaces: what applies to every variant, then one block per option group (Variant.scopes).
DEFAULT_SPACE = {"lr": "float:1e-4:1e-2:log", "latent_dim": "int:2:32:log"}
HIDDEN_CHOICES = {"mlp": "cat:128,256-128,512-256", "conv": "cat:16-32,32-64,64-128"}
SCOPE_SPACES = {
    # The uniform prior changes the posterior too (a box, not a Gaussian): chosen by hand, never searched by default.
    "variational": {"beta": "float:0.25:2:log", "prior": "cat:" + ",".join(p for p in PRIORS if p != "uniform"),
                    "prior_components": "int:2:20"},
    "noise": {"noise_level": "float:0.05:0.5"},
    "sparsity": {"sparsity_weight": "float:1e-5:1e-1:log"},
    "contractive": {"contractive_weight": "float:1e-4:1:log"},
    "semi_supervised": {"classifier_weight": "float:0.01:1:log"},
}
CONDITIONS = {"prior_components": ("prior", MIXTURE_PRIORS)}
# `--sampler grid`: "try several latent sizes and architectures".
GRID_SPACE = {"latent_dim": "cat:2,4,8,16,32"}


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    def sample(self, trial, base: TrainConfig) -> TrainConfig:
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.when and chosen.get(param.when[0], getattr(base, param.when[0])) not in param.when[1]:
                continue
            chosen[param.name] = config_value(param.name, param.suggest(trial))
        return dataclasses.replace(base, **chosen)

    def grid(self) -> dict[str, list]:
        """GridSampler's space; every parameter must be a list of choices."""
        ranges = [p for p in self.params if p.kind != "cat"]
        if ranges:
            raise SpaceError(f"--sampler grid needs cat:A,B,... for every parameter, got {ranges[0].name}={ranges[0].spec}")
        return {p.name: list(p.choices) for p in self.params}

    def size(self) -> int:
        return math.prod(len(p.choices) for p in self.params) if all(p.kind == "cat" for p in self.params) else 0

    def as_dict(self) -> dict[str, str]:
        return {p.name: p.spec for p in self.params}

    def to_yaml(self) -> str:
        lines = []
        for p in self.params:
            note = f"  # only when {p.when[0]} is {' or '.join(p.when[1])}" if p.when else ""
            lines.append(f"{p.name}: {p.spec}{note}")
        return "\n".join(lines)


def default_space(variant: Variant, base: TrainConfig, grid: bool = False) -> dict[str, str]:
    specs = {**DEFAULT_SPACE, "hidden": HIDDEN_CHOICES[base.arch]}
    for scope in sorted(variant.scopes):
        specs.update(SCOPE_SPACES.get(scope, {}))
    return {**GRID_SPACE, "hidden": HIDDEN_CHOICES[base.arch]} if grid else specs


def build_space(variant: Variant, base: TrainConfig, *, overrides: dict | None = None, fixed: set[str] = frozenset(),
                grid: bool = False) -> SearchSpace:
    """The default space less the settings fixed on the command line, with `overrides` (None removes a name)."""
    specs: dict[str, Any] = {k: v for k, v in default_space(variant, base, grid).items() if k not in fixed}
    for name, spec in (overrides or {}).items():
        name = name.strip().replace("-", "_")
        if name in fixed:
            raise SpaceError(f"{name} is both fixed by --{name.replace('_', '-')} and searched by --param; drop one")
        if spec is None:
            specs.pop(name, None)
            continue
        scope = field_scope(name)
        if scope and scope not in variant.scopes:
            raise SpaceError(f"{name} does not apply to --model {variant.name}")
        specs[name] = spec
    params = [parse_param(name, spec, CONDITIONS.get(name)) for name, spec in specs.items()]
    # A conditional setting whose condition is fixed to a value that excludes it is not searched at all.
    return SearchSpace(tuple(p for p in params if not p.when or p.when[0] in specs or getattr(base, p.when[0]) in p.when[1]))


def parse_param_options(items: tuple[str, ...]) -> dict[str, str]:
    """`--param NAME=SPEC` (repeatable; ';' separates several in one value, as MLproject passes them)."""
    overrides = {}
    for item in items:
        for pair in filter(None, (part.strip() for part in item.split(";"))):
            name, sep, spec = pair.partition("=")
            if not sep or not name.strip():
                raise SpaceError(f"--param expects NAME=SPEC, got {pair!r}")
            overrides[name.strip()] = spec.strip()
    return overrides


def load_space_file(path: str) -> dict:
    """A YAML mapping NAME: SPEC (or a list of choices; null drops a default)."""
    import yaml

    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SpaceError(f"cannot read the search space file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise SpaceError(f"{path}: expected a mapping NAME: SPEC, e.g. 'latent_dim: int:2:64:log'")
    return {str(k): v for k, v in content.items()}


def default_metric(variant: Variant) -> str:
    """What a study optimises unless told: the figure that ranks the variant's models for the champion."""
    return champion_metric(variant)


def available_metrics(config: TrainConfig, data) -> list[str]:
    """The validation metrics a model reports, from one forward pass on two examples."""
    import torch

    from aetrack.tracking.run import build  # with M1+M2's VAE loaded from its run

    with torch.no_grad():
        out = build(config, data).to(data.val_x.device)(data.val_x[:2], data.val_y[:2])
    return ["val_loss", *(f"val_{name}" for name in out.parts)]


def check_extremes(space: SearchSpace, base: TrainConfig) -> None:
    """Every end of every range must make a valid config: an impossible value fails now, not in trial 12."""
    for param in space.params:
        for value in param.extremes():
            try:
                dataclasses.replace(base, **{param.name: config_value(param.name, value)}).validate()
            except ConfigError as err:
                raise SpaceError(f"--param {param.name}={param.spec}: {value} is impossible ({err})") from None


def space_for(variant: Variant, base: TrainConfig, *, sampler: str, param_specs: tuple[str, ...] = (),
              space_file: str | None = None, fixed: set[str] = frozenset()) -> SearchSpace:
    """The space of `aetrack tune`: the default less the fixed settings, with the file's and --param's specs."""
    overrides = {**(load_space_file(space_file) if space_file else {}), **parse_param_options(param_specs)}
    space = build_space(variant, base, overrides=overrides, fixed=fixed, grid=sampler == "grid")
    if sampler == "grid":
        space.grid()
    check_extremes(space, base)
    return space
