"""The `aetrack` group; each command lives in its own module, and --help lists them in the order a user meets them."""

from __future__ import annotations

import cloup

from aetrack import memory
from aetrack.cli.compare import compare
from aetrack.cli.evaluate import evaluate
from aetrack.cli.options import quiet_mlflow
from aetrack.cli.registry import generate, models, promote
from aetrack.cli.server import serve, server
from aetrack.cli.study import study
from aetrack.cli.train import train
from aetrack.cli.tune import tune

SECTIONS = [
    cloup.Section("Train and look at the results", [train, evaluate, compare, study]),
    cloup.Section("Serve a model", [promote, models, serve, generate]),
    cloup.Section("Search hyperparameters", [tune]),
    cloup.Section("Run a team's MLflow server", [server]),
]


@cloup.group(sections=SECTIONS, context_settings={"help_option_names": ["-h", "--help"],
                                                  "formatter_settings": cloup.HelpFormatter.settings(max_width=110)})
@cloup.version_option(package_name="aetrack")
def main():
    """aetrack: train, compare, tune and serve autoencoders, tracked in MLflow.

    Start here: `aetrack train` trains the default VAE on the digits to convergence, registers it, and prints the
    command that shows it in the MLflow UI. Then `aetrack evaluate RUN_ID`. Each command's --help lists its options."""
    memory.start_up()
    quiet_mlflow()
