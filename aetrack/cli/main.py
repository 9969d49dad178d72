"""The `aetrack` group; each command lives in its own module."""

from __future__ import annotations

import click

from aetrack.cli.compare import compare
from aetrack.cli.evaluate import evaluate
from aetrack.cli.options import quiet_mlflow
from aetrack.cli.registry import generate, models, promote
from aetrack.cli.server import serve, server
from aetrack.cli.study import study
from aetrack.cli.train import train
from aetrack.cli.tune import tune


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aetrack")
def main():
    """aetrack: train, compare, tune and serve autoencoders, tracked in MLflow."""
    quiet_mlflow()


for command in (train, evaluate, compare, promote, models, generate, tune, study, server, serve):
    main.add_command(command)
