"""Pieces every command shares: one-line errors and the data and tracking options.

They live apart from cli.py because cli.py imports the command modules, which use them.
"""

from __future__ import annotations

import functools
import os

import click


def friendly_errors(func):
    """Known failures become one line on stderr and exit 1; AETRACK_DEBUG=1 shows the traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - the boundary where errors become messages
            if os.environ.get("AETRACK_DEBUG"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise click.ClickException(f"{type(err).__name__}: {message}") from None

    return wrapper


data_options = [
    click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR", show_envvar=True,
                 help="Folder holding the torchvision data sets (MNIST/, FashionMNIST/, cifar-10-batches-py/)."),
    click.option("--download", is_flag=True, help="Let torchvision fetch missing data set files (needs a network)."),
]

tracking_uri_option = click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's local default).")

tracking_options = [
    tracking_uri_option,
    click.option("--experiment", default="aetrack", show_default=True, help="MLflow experiment name."),
    click.option("--run-name", default=None, help="MLflow run name."),
]


def apply(options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate
