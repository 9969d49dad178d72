"""`aetrack evaluate`: test-set metrics and pictures of a trained run, logged to it."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from aetrack.cli.options import (apply, config_options, data_options, device_option, friendly_errors, tracking_uri_option,
                                 use_tracking_uri)
from aetrack.config import from_strings
from aetrack.evaluation_settings import Settings


@click.command()
@click.argument("target", metavar="RUN_ID_OR_MODEL_URI")
@config_options(Settings)
@click.option("--baseline", default=None, metavar="RUN_ID", help="dae: a plain autoencoder's run to denoise the same noisy images.")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Score samples with the data set's reference classifier (trained and registered on first use).")
@device_option
@apply(data_options)
@tracking_uri_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-log", is_flag=True, help="Print only; log nothing to the run.")
@friendly_errors
def evaluate(target, baseline, reference, device, data_dir, download, tracking_uri, as_json, no_log, **values):
    """Test-set metrics and pictures of a trained run, logged to it as test/* metrics.

    \b
    Every model: test/recon_loss (nats/image, the model's likelihood), test/mse, test/psnr,
      test/probe_accuracy, test/knn_accuracy, test/jacobian_frobenius_sq, test/parameters,
      test/perturbed_mse (reconstruction error under a small input perturbation).
    Autoencoders: test/mean_activation, test/fraction_near_zero, test/lifetime_sparsity.
    VAEs: test/neg_elbo, test/elbo_recon_loss, test/kl, test/nll_iw, test/active_units, test/aggregate_kl
      (one latent layer's aggregate posterior against the prior), KL per unit.
    Every model that generates (AEs through their fitted latent mixture): test/fcd, test/kid,
      test/sample_confidence, test/nearest_train_distance, test/memorisation_ratio.
    Conditional models: test/label_accuracy, test/cas.   m2/m1m2: test/error, test/supervised_error
      (the same classifier trained on the labels alone).   dae: PSNR per noise level and kind.
    """
    settings = from_strings(Settings, values).validate()
    from aetrack.config import resolve_device
    from aetrack.evaluation import format_table
    from aetrack.tracking import metric_names as names
    from aetrack.tracking.workflows.evaluate import evaluate_run

    use_tracking_uri(tracking_uri)
    # MLflow prints "View run ..." lines to stdout; stdout is kept for the result alone.
    with contextlib.redirect_stdout(sys.stderr):
        logged, result = evaluate_run(target, settings, use_reference=reference, baseline=baseline, data_dir=data_dir,
                                      download=download, device=resolve_device(device), log=not no_log,
                                      echo=lambda message: click.echo(message, err=True))
    config = logged.info.config
    if as_json:
        click.echo(json.dumps({"run_id": logged.run_id, "model_uri": logged.model_uri, "model": config.model,
                               "dataset": config.dataset, "metrics": {names.test(k): v for k, v in result.metrics.items()},
                               "notes": result.notes, "tables": result.tables}, indent=2))
        return
    click.echo(f"run {logged.run_id}: {config.model} on {config.dataset}" + ("" if no_log else " (metrics logged to the run)"))
    click.echo(format_table(result))
    if "reference" in result.notes:
        click.echo(f"\nreference classifier: {result.notes['reference']}")
