"""The `aetrack` command line: one module per command plus the shared options (options.py).

The only package that imports click, sets MLflow's tracking URI, or turns library errors into one-line
usage errors. Nothing imports it. Command modules import only light modules (config, the variant and
search-space declarations) at start-up; each command imports torch, MLflow or Optuna when it runs.
"""

from aetrack.cli.main import main

__all__ = ["main"]
