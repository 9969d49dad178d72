"""`aetrack evaluate`: test-set metrics and pictures of a trained run, logged to it."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from aetrack.cli.options import apply, data_options, device_option, friendly_errors, tracking_uri_option, use_tracking_uri
from aetrack.config import DEFAULT_NOISE_LEVELS


@click.command()
@click.argument("target", metavar="RUN_ID_OR_MODEL_URI")
@click.option("--iw-samples", type=click.IntRange(1), default=None,
              help="Importance samples K for test/nll_iw [default: about 1e6 / test images, 50..5000; 5000 is the published protocol].")
@click.option("--nll-images", type=click.IntRange(1), default=None, help="Estimate test/nll_iw on the first N test images only [default: all].")
@click.option("--samples", type=click.IntRange(2), default=None, help="Generated images scored by FCD and KID [default: test set size, at most 10000].")
@click.option("--baseline", default=None, metavar="RUN_ID", help="dae: a plain autoencoder's run to denoise the same noisy images.")
@click.option("--noise-levels", default=",".join(f"{v:g}" for v in DEFAULT_NOISE_LEVELS), show_default=True,
              help="dae: noise levels of the PSNR table (comma separated).")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Score samples with the data set's reference classifier (trained and registered on first use).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw of the evaluation.")
@device_option
@apply(data_options)
@tracking_uri_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-log", is_flag=True, help="Print only; log nothing to the run.")
@friendly_errors
def evaluate(target, iw_samples, nll_images, samples, baseline, noise_levels, reference, seed, device, data_dir, download,
             tracking_uri, as_json, no_log):
    """Test-set metrics and pictures of a trained run, logged to it as test/* metrics.

    \b
    Every model: test/recon_loss (nats/image, the model's likelihood), test/mse, test/psnr,
      test/probe_accuracy, test/knn_accuracy, test/jacobian_frobenius_sq.
    Autoencoders: test/mean_activation, test/fraction_near_zero.
    vae/cvae/m2: test/neg_elbo, test/elbo_recon_loss, test/kl, test/nll_iw, test/active_units, KL per unit.
    Every model that generates (AEs through their fitted latent mixture): test/fcd, test/kid.
    cvae/m2: test/label_accuracy, test/cas.   m2: test/error.   dae: PSNR per noise level.
    """
    try:
        levels = tuple(float(v) for v in noise_levels.split(",") if v.strip())
    except ValueError:
        raise click.UsageError(f"--noise-levels expects comma-separated numbers, got {noise_levels!r}") from None
    from aetrack.config import resolve_device
    from aetrack.evaluation import Settings, format_table
    from aetrack.tracking import metric_names as names
    from aetrack.tracking.evaluate import evaluate_run

    use_tracking_uri(tracking_uri)
    # MLflow prints "View run ..." lines to stdout; stdout is kept for the result alone.
    with contextlib.redirect_stdout(sys.stderr):
        settings = Settings(iw_samples, nll_images, samples, noise_levels=levels, seed=seed)
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
