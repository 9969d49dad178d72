"""Quality anchors: aetrack on the protocols the literature reports, with epochs and samples as parameters.

    python benchmarks/anchors.py ROW [--epochs N] [--iw-samples K] [--test-images N] [--leg-minutes M] [--resume]

Long rows run as resumable legs: `--leg-minutes M` stops training after M minutes exactly as SIGTERM would (the
MLflow run is KILLED with its checkpoint kept, benchmarks/results/anchors-progress.json remembers it), and
`--resume` goes on with that same MLflow run from its checkpoint, leg after leg, until the row is measured.

Each protocol trains through aetrack's own tracked training (one MLflow run), reloads the model from
what the run logged, measures the protocol's figure with aetrack.evaluation, logs it to the run as a
test_* metric, and records it in benchmarks/results/anchors.json; anchors.md is rebuilt from that file.
Defaults are the published settings (thousands of epochs); pass fewer to fit a machine, and the
record says how many were used. Nothing is extrapolated: a figure is what the run measured.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import click
import mlflow
import torch

from aetrack import data as datasets
from aetrack import evaluation
from aetrack.tracking import artifacts
from aetrack.tracking import evaluate as tracked_evaluation
from aetrack.config import TrainConfig
from aetrack.tracking.run import RunStopped, TrackingOptions, git_commit, open_checkpoint, train_tracked

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Protocol:
    name: str
    config: TrainConfig              # the published settings, epochs included
    metric: str                      # what is measured: neg_elbo, nll_iw or error
    published: str                   # the published figure(s), as cited
    source: str
    differences: str                 # where aetrack's protocol departs from the paper's, said once
    iw_samples: int = 0              # for nll_iw


# One stochastic layer as Burda et al. 2015 train it (784-200-200-50, batch 20, 3280 epochs), and the VampPrior's
# (Tomczak & Welling 2018): each is the base of the rows that vary it.
BURDA_MLP = TrainConfig(model="vae", dataset="mnist", binarize="dynamic", hidden=(200, 200), latent_dim=50, batch_size=20,
                        lr=1e-3, epochs=3280, patience=0, kl_warmup=0)
VAMPPRIOR = TrainConfig(model="vae", dataset="mnist", binarize="dynamic", prior="vamp", prior_components=500,
                        hidden=(300, 300), latent_dim=40, batch_size=100, lr=5e-4, kl_warmup=100, epochs=2000, patience=50)

PROTOCOLS = {p.name: p for p in [
    Protocol(
        "pytorch-example",
        TrainConfig(model="vae", dataset="mnist", binarize="none", hidden=(400,), latent_dim=20, likelihood="bernoulli",
                    batch_size=128, lr=1e-3, epochs=10, patience=0, kl_warmup=0, decoder_bias="zero"),
        "neg_elbo", "~105.6 nats/image test loss after 10 epochs",
        "pytorch/examples vae/main.py (MLP 784-400-20, BCE summed + KL, batch 128, Adam 1e-3)",
        "trains on 54000 images (10 % held out for validation; the example trains on all 60000) and keeps the epoch "
        "with the best validation loss; the test loss is the single-sample negative ELBO, as in the example"),
    Protocol(
        "burda-vae",
        BURDA_MLP,
        "nll_iw", "VAE 86.76 nats; IWAE (k=50) 84.78 nats", "Burda et al. 2015, table 1 (one stochastic layer)",
        "ReLU instead of tanh units, constant learning rate (the published 3^i-epoch schedule and Adam epsilon are "
        "rows iwae-5 and iwae-50, and `--lr-schedule burda --adam-eps 1e-4`); the test images are one fixed "
        "binarization", iw_samples=5000),
    Protocol(
        "iwae-5",
        replace(BURDA_MLP, adam_eps=1e-4, lr_schedule="burda", objective="iwae", train_samples=5, decoder_bias="zero"),
        "nll_iw", "IWAE k=5 85.54 nats; VAE 86.76", "Burda et al. 2015, table 1 (IWAE, k=5, one stochastic layer)",
        "ReLU instead of tanh units; the test images are one fixed binarization", iw_samples=5000),
    Protocol(
        "iwae-50",
        replace(BURDA_MLP, adam_eps=1e-4, lr_schedule="burda", objective="iwae", train_samples=50, decoder_bias="zero"),
        "nll_iw", "IWAE k=50 84.78 nats", "Burda et al. 2015, table 1 (IWAE, k=50, one stochastic layer)",
        "ReLU instead of tanh units; the test images are one fixed binarization", iw_samples=5000),
    Protocol(
        "vampprior-static",
        replace(VAMPPRIOR, binarize="static"),
        "nll_iw", "standard prior 88.56, VampPrior 85.57 nats (static MNIST)",
        "Tomczak & Welling 2018, table 2 (VAE + VampPrior, one stochastic layer, static binarization)",
        "ReLU MLP instead of gated dense layers; one fixed binarization of MNIST, not the Larochelle static MNIST files",
        iw_samples=5000),
    Protocol(
        "vampprior",
        VAMPPRIOR,
        "nll_iw", "VampPrior 85.57 nats", "Tomczak & Welling 2018, table 2 (VAE + VampPrior, one stochastic layer)",
        "ReLU MLP instead of gated dense layers; the test images are one fixed binarization", iw_samples=5000),
    Protocol(
        "m2-100",
        TrainConfig(model="m2", dataset="mnist", binarize="dynamic", hidden=(500,), latent_dim=50, labeled=100,
                    classifier_weight=0.1, batch_size=100, lr=3e-4, epochs=1000, patience=0, kl_warmup=0),
        "error", "M2 11.97 % test error with 100 labels; M1+M2 3.33 %", "Kingma et al. 2014, table 1",
        "Adam instead of RMSProp with momentum, ReLU instead of softplus; aetrack has no M1+M2 stack, so that row "
        "has no aetrack figure"),
]}


def measure(protocol: Protocol, run_id: str, data, iw_samples: int, test_images: int | None, seed: int) -> tuple[float, str]:
    """Reload the logged model and measure the protocol's figure; log it to the run as test_<metric>."""
    logged = artifacts.load_logged(run_id, data.test_y.device)
    model, x, y = logged.model, data.test_x, data.test_y
    n = min(test_images or len(x), len(x))
    result = evaluation.Evaluation()
    if protocol.metric == "neg_elbo":
        result.metrics.update(evaluation.bound_terms(model, x, None, seed=seed))
        how = f"single-sample negative ELBO on all {len(x)} test images"
    elif protocol.metric == "nll_iw":
        result.metrics["nll_iw"] = float(evaluation.nll_iw(model, x[:n], None, iw_samples, seed=seed).mean())
        how = f"IWAE estimate, K={iw_samples}, on the first {n} of {len(x)} test images"
    else:
        result.metrics["error"] = float((model.classify(x) != y).float().mean()) * 100
        how = f"q(y|x) error (%) on all {len(x)} test images"
    tracked_evaluation.log_evaluation(run_id, result)
    return result.metrics[protocol.metric], how


def update_results(record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "anchors.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[record["protocol"]] = record
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "anchors.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    lines = ["# Quality anchors: measured figures", "",
             "Written by `benchmarks/anchors.py`; each row is one run, nothing extrapolated. Wall time covers training,",
             "MLflow logging and the measurement on the machine named (on a shared machine, an upper bound).", "",
             "| protocol | published | aetrack measured | epochs run (of published) | how measured | time | command |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in PROTOCOLS:
        if name not in results:
            continue
        r, warmup = results[name], PROTOCOLS[name].config.kl_warmup
        unit = " %" if r["metric"] == "error" else " nats"
        epochs = f"{r['epochs_run']} (best {r['best_epoch']}) of {r['epochs_published']}"
        if r["epochs_run"] < warmup:
            epochs += f", all inside the {warmup}-epoch KL warm-up"
        threads = f"{r['torch_threads']} torch thread{'s' if r['torch_threads'] != 1 else ''}"
        cells = [name, r["published"], f"**{r['value']:.2f}{unit}** ({r['metric']})", epochs, r["how"],
                 f"{r['wall_seconds'] / 60:.1f} min wall, {r['cpu_seconds'] / 60:.1f} min CPU ({threads}) on {r['machine']}",
                 f"`{r['command']}`"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "Where the protocol departs from the paper:", ""]
    lines += [f"- **{name}**: {PROTOCOLS[name].differences}. Source: {PROTOCOLS[name].source}." for name in PROTOCOLS if name in results]
    return "\n".join(lines) + "\n"


PROGRESS = RESULTS / "anchors-progress.json"  # rows whose run stopped after a leg: run id, legs, seconds so far
NOT_YET = {"m1m2-100": "aetrack has no M1+M2 stack yet (M2 on the latent means of a trained VAE)",
           "best-one-layer": "aetrack's best one-layer recipe has not been measured yet"}


def progress(row: str | None = None, update: dict | None = None) -> dict:
    state = json.loads(PROGRESS.read_text()) if PROGRESS.exists() else {}
    if row is not None:
        if update is None:
            state.pop(row, None)
        else:
            state[row] = update
        PROGRESS.parent.mkdir(parents=True, exist_ok=True)
        if state:
            PROGRESS.write_text(json.dumps(state, indent=2) + "\n")
        else:
            PROGRESS.unlink(missing_ok=True)
    return state


@click.command()
@click.argument("protocol", type=click.Choice(sorted([*PROTOCOLS, *NOT_YET])))
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs to train [default: the published number].")
@click.option("--iw-samples", type=click.IntRange(1), default=None, help="Importance samples for the NLL [default: the published 5000].")
@click.option("--test-images", type=click.IntRange(1), default=None, help="Estimate the NLL on the first N test images [default: all 10000].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR", show_envvar=True)
@click.option("--tracking-uri", default=None, help="Where the runs go [default: $MLFLOW_TRACKING_URI, else MLflow's default].")
@click.option("--leg-minutes", type=click.FloatRange(min=0.1), default=None,
              help="Stop training after this many minutes, as SIGTERM would (KILLED, checkpoint kept); --resume goes on.")
@click.option("--resume", is_flag=True, help="Go on with this row's stopped run (from anchors-progress.json).")
@click.option("--checkpoint-dir", default="checkpoints", show_default=True)
@click.option("--dry-run", is_flag=True, help="Train and measure, but do not write benchmarks/results.")
def main(protocol, epochs, iw_samples, test_images, seed, device, data_dir, tracking_uri, leg_minutes, resume,
         checkpoint_dir, dry_run):
    """Train ROW's model and measure its published figure (one MLflow run per row, in legs if need be)."""
    if protocol in NOT_YET:
        raise click.UsageError(f"{protocol}: {NOT_YET[protocol]}")
    spec = PROTOCOLS[protocol]
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    state, before = None, {"legs": 0, "seconds": 0.0, "cpu_seconds": 0.0}
    if resume:
        before = progress().get(protocol)
        if before is None:
            raise click.UsageError(f"{protocol}: no stopped run to resume in {PROGRESS}")
        state = open_checkpoint(before["run_id"], checkpoint_dir)
        config = TrainConfig.from_params(state["config"])
    else:
        config = replace(spec.config, epochs=epochs or spec.config.epochs, seed=seed, device=device)
    started = time.perf_counter()
    from aetrack.config import resolve_device

    data = datasets.load(config.dataset, data_dir=data_dir, binarize=config.binarize, val_fraction=config.val_fraction,
                         seed=config.seed, device=resolve_device(config.device))
    options = TrackingOptions(experiment="aetrack-anchors", run_name=f"anchor-{protocol}", register=False,
                              checkpoint_dir=checkpoint_dir)
    if leg_minutes:  # the end of a leg is a SIGTERM: the run is closed exactly as `timeout` would have it
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        signal.alarm(max(1, round(leg_minutes * 60)))
    try:
        result = train_tracked(config, data, options, data_dir=data_dir, progress=sys.stderr.isatty(), resume=state)
    except RunStopped as stop:
        if stop.epoch == 0:
            progress(protocol, None)
            raise click.ClickException(f"{protocol}: the leg ended before its first epoch did; give --leg-minutes more time")
        seconds = before["seconds"] + time.perf_counter() - started
        progress(protocol, {"run_id": stop.run_id, "legs": before["legs"] + 1, "epoch": stop.epoch,
                            "epochs": stop.epochs, "seconds": round(seconds, 1),
                            "cpu_seconds": round(before["cpu_seconds"] + time.process_time(), 1)})
        click.echo(f"{protocol}: leg {before['legs'] + 1} ended after epoch {stop.epoch} of {stop.epochs} "
                   f"({seconds / 60:.1f} min so far); continue with: python benchmarks/anchors.py {protocol} --resume", err=True)
        sys.exit(3)
    finally:
        signal.alarm(0)
    trained = time.perf_counter()
    k = iw_samples or spec.iw_samples
    value, how = measure(spec, result.run_id, data, k, test_images, config.seed)
    record = {
        "protocol": protocol, "metric": spec.metric, "value": value, "published": spec.published, "source": spec.source,
        "epochs_run": len(result.history.epochs), "best_epoch": result.history.best_epoch,
        "epochs_published": spec.config.epochs, "iw_samples": k if spec.metric == "nll_iw" else None,
        "test_images": min(test_images or len(data.test_y), len(data.test_y)), "how": how,
        "legs": before["legs"] + 1,
        "train_seconds": round(before["seconds"] + trained - started, 1),
        "wall_seconds": round(before["seconds"] + time.perf_counter() - started, 1),
        "cpu_seconds": round(before["cpu_seconds"] + time.process_time(), 1), "torch_threads": torch.get_num_threads(),
        "machine": f"{os.cpu_count()} CPU cores" if data.test_y.device.type == "cpu" else torch.cuda.get_device_name(),
        "platform": platform.platform(), "torch": torch.__version__, "git_commit": git_commit(),
        "run_id": result.run_id, "tracking_uri": result.tracking_uri,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/anchors.py " + shlex.join(sys.argv[1:]),
    }
    click.echo(json.dumps(record, indent=2))
    progress(protocol, None)
    if not dry_run:
        update_results(record)


if __name__ == "__main__":
    main()
