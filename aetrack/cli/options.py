"""What every command shares: options generated from the config dataclasses, the data, device and tracking
options, reading --set, and the boundary where library errors become one-line messages."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import re
import sys
import typing
import warnings
from pathlib import Path

import click
import cloup

from aetrack.config import (DEVICES, AUTO_STEPS, POOL_SIZES, ConfigError, TrainConfig, UserError, format_value, from_strings,
                            hints, optional_type, option_name, parse_settings)
from aetrack.models import REGISTRY, check_options


def friendly_errors(func):
    """Known failures become one line on stderr: a ConfigError is a usage error (exit 2), another UserError
    exits 1 with its message; anything else exits 1 with its type and first line. AETRACK_DEBUG=1 shows the
    traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except ConfigError as err:
            raise click.UsageError(str(err)) from None
        except UserError as err:
            raise click.ClickException(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the boundary where errors become messages
            if os.environ.get("AETRACK_DEBUG"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise click.ClickException(f"{type(err).__name__}: {message}") from None

    return wrapper


# MLflow's warnings that an aetrack user cannot act on: aetrack's models are "models from code" with a signature
# (no type hints needed) and the reference classifier is logged without an input example on purpose.
UNACTIONABLE_WARNINGS = (r".*Add type hints to the `predict` method", r".*An input example was not provided")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def quiet_mlflow() -> None:
    """The process-wide settings every aetrack command (and benchmark) runs MLflow with."""
    # MLflow's INFO lines and artifact progress bars would bury aetrack's own output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow's "🏃 View run / 🧪 View experiment" lines, at every run's end (every trial of a study): aetrack says once
    # where to look.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow retries an absent server for about 250 s per request by default. A few seconds here: requests that
    # must arrive (metrics, pictures, the model) are retried by aetrack itself, with a line saying it waits.
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    tidy_warnings()


def tidy_warnings(stream=None) -> None:
    """Drop MLflow's unactionable warnings; show the others on one line, `warning: ...`, in yellow on a terminal
    and without MLflow's raw colour codes elsewhere (a log file, CI)."""
    for pattern in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)

    def show(message, category, filename, lineno, file=None, line=None):
        out = file or stream or sys.stderr
        text = ANSI.sub("", str(message)).strip()
        if any(re.match(pattern, text) for pattern in UNACTIONABLE_WARNINGS):  # MLflow may reset the filters
            return
        if getattr(out, "isatty", lambda: False)():
            text = f"\x1b[33m{text}\x1b[0m"
        try:
            out.write(f"warning: {text} ({category.__name__}, {Path(filename).name}:{lineno})\n")
        except OSError:
            pass

    warnings.showwarning = show


def apply(options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


data_options = [
    click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR", show_envvar=True,
                 help="Folder holding the torchvision data sets (MNIST/, FashionMNIST/, cifar-10-batches-py/)."),
    click.option("--download", is_flag=True, help="Let torchvision fetch missing data set files (needs a network)."),
]
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
tracking_uri_option = click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's local default).")
settings_option = click.option("--set", "settings", multiple=True, metavar="NAME=VALUE[,...]",
                               help="Set training options by name (as MLproject passes them; empty: the default).")


def run_made_by_mlflow_run() -> str | None:
    """The run `mlflow run` made for this command (MLFLOW_RUN_ID), read at the edge and passed on as a parameter.
    Taken out of the environment: MLflow's start_run would otherwise resume it for the next run this process starts
    (a tuning trial's child run)."""
    return os.environ.pop("MLFLOW_RUN_ID", None) or None


def use_tracking_uri(uri: str | None) -> None:
    """Point MLflow at `uri` for this command (else $MLFLOW_TRACKING_URI or MLflow's default); a tracking server
    that does not answer is a one-line error within seconds, not MLflow's minutes of retries."""
    import mlflow

    from aetrack.tracking.lifecycle import check_server

    from aetrack.tracking import store

    if uri:
        mlflow.set_tracking_uri(uri)
    check_server(mlflow.get_tracking_uri())
    store.prepare(mlflow.get_tracking_uri())  # a new local store: copied, not migrated (seconds)


def ui_hint(tracking_uri: str, page: str) -> str:
    """How to look at `page` (`#/experiments/1/runs/ID`): a tracking server's URL opens in the browser as it is;
    a local store (sqlite:///..., a folder) needs `mlflow ui` started on it first."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/{page}"
    import shutil
    import sys
    from pathlib import Path

    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = "mlflow"
    if mlflow_bin.exists() and shutil.which("mlflow") != str(mlflow_bin):  # the venv is not activated
        relative = os.path.relpath(mlflow_bin)
        command = relative if not relative.startswith("..") else str(mlflow_bin)
    return f"{command} ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000/{page})"


def auto_epochs_help() -> str:
    """What `--epochs auto` resolves to on each data set, at the default batch size and validation fraction."""
    default = TrainConfig()
    budgets = [f"{name} {default.resolve(round(size * (1 - default.val_fraction))).epochs}"
               for name, size in POOL_SIZES.items()]
    return (f" auto = about {AUTO_STEPS} optimiser steps, as epochs at batch {default.batch_size}: "
            + ", ".join(budgets) + ".")


def models_taking(scope: str) -> list[str]:
    """The variants that accept the options of `scope` (what `--help` puts in brackets)."""
    return sorted(name for name, variant in REGISTRY.items() if scope in variant.scopes)


def config_options(cls):
    """One click option per field of a config dataclass, with its default, choices and help."""
    types = hints(cls)

    def decorate(func):
        for f in reversed([f for f in dataclasses.fields(cls) if "help" in f.metadata]):  # option() fields only
            hint, meta = types[f.name], f.metadata
            name_or_unset = optional_type(hint) is str  # `str | None`: None is "not given", not `auto`
            if cls is TrainConfig and f.name == "model":
                kind = click.Choice(sorted(REGISTRY))
            elif meta["choices"]:
                kind = click.Choice(meta["choices"])
            elif typing.get_origin(hint) is tuple or optional_type(hint):
                kind = str
            else:
                kind = hint
            extra = auto_epochs_help() if cls is TrainConfig and f.name == "epochs" else ""
            scope = f" [{', '.join(models_taking(meta['scope']))}]" if meta["scope"] else ""
            if hint is bool:  # an on/off setting is a flag pair: --compile / --no-compile
                func = click.option(f"{option_name(f.name)}/--no-{option_name(f.name)[2:]}", f.name, default=f.default,
                                    show_default=True, help=meta["help"] + scope)(func)
                continue
            func = click.option(option_name(f.name), f.name, type=kind,
                                default=format_value(f.default) if kind is str and not name_or_unset else f.default,
                                metavar="auto|N" if optional_type(hint) and not name_or_unset else None,
                                show_default=f.default != "",
                                envvar=meta["envvar"], show_envvar=bool(meta["envvar"]),
                                help=meta["help"] + extra + scope)(func)
        return func
    return decorate


# `aetrack train --help` in the groups a user thinks in. A TrainConfig field with a scope (options only some variants
# take) goes to "Variant options" by its metadata; the others, and the command's own options, are named here once.
VARIANT_OPTIONS = "Variant options (the models each takes are in brackets)"
TRAIN_HELP_GROUPS = {
    "Model": ("model", "arch", "hidden", "latent_dim", "activation", "likelihood", "decoder_bias"),
    VARIANT_OPTIONS: (),
    "Data": ("dataset", "data_dir", "download", "binarize", "val_fraction"),
    "Optimisation and schedule": ("epochs", "patience", "keep", "batch_size", "lr", "lr_schedule", "warmup_steps",
                                  "adam_eps", "grad_clip", "seed"),
    "Device and speed": ("device", "precision", "compile"),
    "Tracking": ("tracking_uri", "experiment", "run_name", "register", "registered_model", "log_every", "quiet"),
    "Resume": ("resume_run", "checkpoint_dir"),
    "Any option by name": ("settings",),
}


def help_group(name: str) -> str | None:
    """The --help group of a `train` option (by its parameter name); None: cloup's "Other options", where
    tests/test_docs.py finds it and asks for a group."""
    found = TrainConfig.__dataclass_fields__.get(name)
    if found is not None and found.metadata["scope"]:
        return VARIANT_OPTIONS
    return next((title for title, names in TRAIN_HELP_GROUPS.items() if name in names), None)


class GroupedHelp(cloup.Command):
    """A command whose --help shows its options in TRAIN_HELP_GROUPS' groups, in that order (cloup lays them out)."""

    def __init__(self, *args, params=None, **kwargs):
        if kwargs.get("help"):  # click dedents a docstring only in its own formatter
            kwargs["help"] = inspect.cleandoc(kwargs["help"])
        groups = {title: cloup.OptionGroup(title) for title in TRAIN_HELP_GROUPS}
        for param in params or []:
            if isinstance(param, click.Option) and help_group(param.name):
                param.group = groups[help_group(param.name)]
        super().__init__(*args, params=params, **kwargs)
        order = list(groups.values())
        self.option_groups.sort(key=order.index)
        for group in self.option_groups:
            names = TRAIN_HELP_GROUPS[group.title]
            if names:
                group.options = sorted(group.options, key=lambda option: names.index(option.name))


def explicit_options(ctx: click.Context, cls, settings: dict[str, str] = {}) -> set[str]:
    """The fields of `cls` given on the command line or by --set, not left at their defaults."""
    return {f.name for f in dataclasses.fields(cls) if f.name in settings
            or ctx.get_parameter_source(f.name) not in (click.core.ParameterSource.DEFAULT, None)}


def train_config(ctx: click.Context, values: dict, settings: tuple[str, ...] = ()) -> tuple[TrainConfig, set[str]]:
    """The training config of a command's options and --set, validated, and the names set explicitly.
    Options that do not apply to the model, and impossible values, are ConfigErrors."""
    given = parse_settings(settings)
    values = {**values, **given}
    explicit = explicit_options(ctx, TrainConfig, given)
    check_options(values["model"], explicit)
    return from_strings(TrainConfig, values).validate(), explicit
