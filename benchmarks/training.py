"""Training throughput per variant, and what MLflow tracking costs on top of the bare loop.

The reference is the same `fit` with no logging at all, measured in the same run:
ratio = (training time inside an MLflow run, logging to a real `mlflow server` over HTTP the way
`aetrack train` does) / (bare training time). The wait for the last batch after training is
reported on its own (`final_flush_seconds`).

    python benchmarks/training.py --dataset mnist --data-dir ../shared/data --epochs 2
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import start_mlflow_server, stop  # noqa: E402

from aetrack import data as datasets  # noqa: E402
from aetrack.config import TrainConfig  # noqa: E402
from aetrack.models import REGISTRY  # noqa: E402
from aetrack.tracking import MetricBuffer  # noqa: E402
from aetrack.training import fit  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed_fit(config, splits, log=None) -> float:
    started = time.perf_counter()
    fit(config, splits, log=log, progress=False)
    return time.perf_counter() - started


@click.command()
@click.option("--dataset", default="digits")
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR")
@click.option("--epochs", default=2)
@click.option("--repeats", default=3, help="Alternating bare/tracked repeats; the median is kept.")
@click.option("--throughput/--no-throughput", default=True, help="Also time every variant once.")
def main(dataset, data_dir, epochs, repeats, throughput):
    torch.set_num_threads(torch.get_num_threads())
    splits = datasets.load(dataset, data_dir=data_dir)
    base = TrainConfig(dataset=dataset, epochs=epochs, hidden=(400,), latent_dim=20, log_every=20)
    rows = []
    for name in sorted(REGISTRY) if throughput else []:
        config = replace(base, model=name, labeled=100)
        seconds = timed_fit(config, splits)
        rows.append({"model": name, "samples_per_sec": round(epochs * len(splits.train_x) / seconds)})
        print(rows[-1], flush=True)

    root = Path(tempfile.mkdtemp())
    url, server = start_mlflow_server(root)
    try:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("benchmark-logging")
        config = replace(base, model="vae")
        bare, tracked, flushes = [], [], []
        timed_fit(config, splits)  # warm-up: the first fit of a process pays for allocator and kernel set-up
        for _ in range(repeats):
            bare.append(timed_fit(config, splits))
            with mlflow.start_run() as run:
                buffer = MetricBuffer(run.info.run_id)  # exactly what `aetrack train` logs with
                tracked.append(timed_fit(config, splits, log=buffer))
                # Waiting for the last batch to reach the server happens once, after training.
                flush_started = time.perf_counter()
                buffer.flush()
                mlflow.flush_async_logging()
                flushes.append(time.perf_counter() - flush_started)
    finally:
        stop(server)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    logging = {"dataset": dataset, "epochs": epochs, "bare_seconds": round(median(bare), 2),
               "tracked_seconds": round(median(tracked), 2), "ratio": round(median(tracked) / median(bare), 3),
               "final_flush_seconds": round(median(flushes), 2)}
    print(logging)
    RESULTS.mkdir(exist_ok=True)
    if not throughput:
        previous = RESULTS / f"training-{dataset}.json"
        rows = json.loads(previous.read_text())["throughput"] if previous.exists() else []
    (RESULTS / f"training-{dataset}.json").write_text(json.dumps({"throughput": rows, "logging": logging}, indent=2))


if __name__ == "__main__":
    main()
