"""The `aetrack` group; each command lives in its own module."""

from __future__ import annotations

import logging
import os

import click

from aetrack.cli.compare import compare
from aetrack.cli.evaluate import evaluate
from aetrack.cli.options import tidy_warnings
from aetrack.cli.registry import generate, models, promote
from aetrack.cli.server import serve, server
from aetrack.cli.study import study
from aetrack.cli.train import train
from aetrack.cli.tune import tune


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aetrack")
def main():
    """aetrack: train, compare, tune and serve autoencoders, tracked in MLflow."""
    # MLflow's INFO lines and artifact progress bars would bury aetrack's own output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow retries an absent server for about 250 s per request by default. A few seconds here: requests that
    # must arrive (metrics, pictures, the model) are retried by aetrack itself, with a line saying it waits.
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    tidy_warnings()


for command in (train, evaluate, compare, promote, models, generate, tune, study, server, serve):
    main.add_command(command)
