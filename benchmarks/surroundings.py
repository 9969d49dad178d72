"""What a user waits for beyond the optimisation steps (issue 24): the end-of-run pictures on MNIST, checkpoints as a
share of `fit` on digits, and a new local sqlite store's set-up.

- pictures: `final_pictures` of the canonical VAE (784-400-20) after one MNIST epoch, and `latent_plots` alone as it
  was (scikit-learn's t-SNE on all 2000 validation codes, 1000 iterations) and as it is (a sample per label);
- checkpoints: the same digits `fit` without a checkpoint, with one every epoch (CHECKPOINT_SECONDS = 0, as before)
  and with the throttle; the share is (with - without) / without, each the median of --repeats runs;
- store: MLflow's first access to a new `sqlite:///` store (as MLflow makes it, and as aetrack does: a copy of an
  empty store migrated once, `aetrack/tracking/store.py`) and to an existing one, each in a fresh process.

- command: whole `aetrack train` commands, each in a fresh process as a user runs them: the default digits job on a
  new store, on that store again, and with two torch threads (what torch picked before `memory.cpu_threads`), with the
  best validation loss and the samples picture of each (the same model?); the canonical MNIST VAE for one epoch, whose
  wall beyond its epoch is the fixed cost; and what each epoch spends beyond its optimisation steps (validation,
  metrics, pictures at their cadence, checkpoints), from the runs' own metrics: 1 - sum(epoch_time) / (wall between
  the first and the last epoch's metrics), on digits and over 3 MNIST epochs. The digits job (each time on a new
  store) and the MNIST epoch run --repeats times each, alternating with the same command whose cyclic collector is
  left at Python's defaults (`memory.start_up` and `memory.settle` replaced by nothing): medians of both, and of each
  run's wall beyond its epochs.

    python benchmarks/surroundings.py --data-dir /work/shared/data
    python benchmarks/surroundings.py --part checkpoints --epochs 60   (that part again, one torch thread)
    python benchmarks/surroundings.py --part command --data-dir /work/shared/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FILE = RESULTS / "surroundings.json"
STORE = """
import sys, time
import mlflow
from aetrack.tracking import store
mlflow.set_tracking_uri(sys.argv[1])
started = time.perf_counter()
if sys.argv[2:] == ["aetrack"]:
    store.prepare(sys.argv[1])
mlflow.MlflowClient().search_experiments(max_results=1)
print(time.perf_counter() - started)
"""
# `aetrack` with Python's cyclic collector at its defaults: the reference for `memory.start_up` and `memory.settle`.
COLLECTOR_DEFAULTS = """
import sys
from aetrack import memory
memory.start_up = memory.settle = lambda: None
from aetrack.cli import main
main(sys.argv[1:], prog_name="aetrack")
"""


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def pictures(data_dir: str) -> dict:
    import numpy as np
    import torch
    from sklearn.manifold import TSNE

    from aetrack import data as datasets, images
    from aetrack.config import TrainConfig
    from aetrack.tracking.run import final_pictures
    from aetrack.training import fit

    config = TrainConfig(dataset="mnist", hidden=(400,), latent_dim=20, epochs=1)
    splits = datasets.load_for(config, data_dir=data_dir)
    model, history = fit(config, splits, progress=False)
    images.latent_plots(np.random.default_rng(0).normal(size=(50, 3)), np.arange(50) % 2)  # imports, once
    with torch.no_grad():
        z = model.encode(splits.val_x[:2000], splits.val_y[:2000]).numpy()
    y = splits.val_y[:2000].numpy()
    before = seconds(lambda: TSNE(2, perplexity=30.0, init="pca", random_state=0).fit_transform(z))
    now = seconds(lambda: images.latent_plots(z, y, 0))
    total = seconds(lambda: final_pictures(model, splits, history, 0))
    return {"codes": len(z), "tsne_points": images.TSNE_POINTS, "tsne_iterations": images.TSNE_ITERATIONS,
            "tsne_angle": images.TSNE_ANGLE, "tsne_all_codes_s": round(before, 2),
            "latent_plots_s": round(now, 2), "final_pictures_s": round(total, 2), "epoch_s": round(history.epochs[0]["epoch_time"], 2)}


def checkpoint_share(epochs: int, repeats: int) -> dict:
    from aetrack import checkpoints, data as datasets, training
    from aetrack.config import TrainConfig

    import torch

    torch.set_num_threads(1)  # as benchmarks/training.py: on a loaded 2-core machine, torch's threads wait on each other
    config = TrainConfig(epochs=epochs, patience=0)
    splits = datasets.load_for(config)
    writes = []
    save = checkpoints.save
    checkpoints.save = lambda path, state: (writes.append(state["epoch"]), save(path, state))
    throttle = training.CHECKPOINT_SECONDS
    # The time spent inside the checkpoint code itself (copying the state each epoch, writing it): a direct share, which
    # a loaded machine's drift between whole fits does not blur.
    inside = [0.0]
    for name in ("epoch_end", "flush"):
        method = getattr(training.Checkpoints, name)

        def timed(self, *args, _method=method):
            started = time.perf_counter()
            try:
                return _method(self, *args)
            finally:
                inside[0] += time.perf_counter() - started
        setattr(training.Checkpoints, name, timed)
    shares = {"every": [], "throttled": []}

    def fit(every: float | None) -> tuple[float, int]:
        writes.clear()
        inside[0] = 0.0
        training.CHECKPOINT_SECONDS = throttle if every is None else every
        with tempfile.TemporaryDirectory() as tmp:
            path = None if every == -1 else Path(tmp) / "last.pt"
            wall = seconds(lambda: training.fit(config, splits, progress=False, checkpoint=path, run_id="r"))
        if every != -1:
            shares["throttled" if every is None else "every"].append(inside[0] / wall)
        return wall, len(writes)

    fit(-1)  # warm-up: the first fit of a process pays one-time costs
    runs = {"bare": [], "every": [], "throttled": []}
    for _ in range(repeats):  # alternating: a shared machine's load drifts
        for kind, every in (("bare", -1), ("every", 0.0), ("throttled", None)):
            runs[kind].append(fit(every))
    bare, every, throttled = (statistics.median(t for t, _ in runs[kind]) for kind in ("bare", "every", "throttled"))
    every_writes, throttled_writes = runs["every"][0][1], runs["throttled"][0][1]
    training.CHECKPOINT_SECONDS, checkpoints.save = throttle, save
    return {"epochs": epochs, "repeats": repeats, "checkpoint_seconds": throttle, "fit_without_s": round(bare, 2),
            "fit_every_epoch_s": round(every, 2), "writes_every_epoch": every_writes,
            "fit_throttled_s": round(throttled, 2), "writes_throttled": throttled_writes,
            "share_every_epoch": round((every - bare) / bare, 3), "share_throttled": round((throttled - bare) / bare, 3),
            "inside_share_every_epoch": round(statistics.median(shares["every"]), 4),
            "inside_share_throttled": round(statistics.median(shares["throttled"]), 4)}


def store(repeats: int) -> dict:
    """Seconds from setting the URI to MLflow's first answer, in a fresh process (imports not counted): a new store
    as MLflow makes it, a new store as an aetrack command makes it (the cached empty store is built first), and the
    same store again."""
    from aetrack.tracking import store as stores

    stores.template()
    times = {"new": [], "new_aetrack": [], "existing": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for kind, uri, how in (("new", f"sqlite:///{tmp}/a.db", []), ("new_aetrack", f"sqlite:///{tmp}/b.db", ["aetrack"]),
                                   ("existing", f"sqlite:///{tmp}/a.db", [])):
                done = subprocess.run([sys.executable, "-c", STORE, uri, *how], capture_output=True, text=True, check=True)
                times[kind].append(float(done.stdout.strip().splitlines()[-1]))
    return {"repeats": repeats, **{f"{kind}_store_s": round(statistics.median(t), 2) for kind, t in times.items()}}


def train_command(args: list[str], uri: str, workdir: str, threads: int | None = None,
                  collector_defaults: bool = False) -> dict:
    """One `aetrack train --no-register --quiet` in a fresh process: its wall, and what its run says."""
    import mlflow

    from aetrack.tracking import metric_names as names

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MLFLOW_TRACKING_URI")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    aetrack = [sys.executable, "-c", COLLECTOR_DEFAULTS] if collector_defaults else [sys.executable, "-m", "aetrack"]
    command = [*aetrack, "train", "--no-register", "--quiet", "--tracking-uri", uri,
               "--checkpoint-dir", f"{workdir}/checkpoints", *args]
    # In `workdir`: a sqlite store keeps its artifacts in ./mlruns, beside the command, not in the checkout.
    wall = seconds(lambda: subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=workdir))
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("aetrack").experiment_id], order_by=["start_time DESC"],
                             max_results=1)[0]
    history = client.get_metric_history(run.info.run_id, "system/epoch_time")
    # The metrics of an epoch are stamped when the loop hands them over: between the first and the last epoch's, the
    # epochs after the first took this long, of which their steps took sum(epoch_time).
    span = (history[-1].timestamp - history[0].timestamp) / 1000
    steps = sum(m.value for m in history[1:])
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.startswith("images/result~samples")
               and a.path.endswith(".png")]
    picture = Path(client.download_artifacts(run.info.run_id, samples[0], workdir)).read_bytes() if samples else b""
    return {"wall_s": round(wall, 2), "epochs": len(history), "epoch_steps_s": round(sum(m.value for m in history), 2),
            "per_epoch_work_share": round(1 - steps / span, 3) if span > 0 else None,
            "best_val_loss": run.data.metrics.get(names.BEST_VAL_LOSS), "samples_png_sha1": hashlib.sha1(picture).hexdigest()}


def median_run(runs: list[dict]) -> dict:
    """The run of median wall (the lower middle one of an even number), with every run's wall, and the median of
    each run's wall beyond its epochs' steps."""
    middle = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    beyond = sorted(r["wall_s"] - r["epoch_steps_s"] for r in runs)
    return {**middle, "walls_s": [r["wall_s"] for r in runs], "beyond_epochs_s": [round(b, 2) for b in beyond],
            "median_beyond_epochs_s": round(beyond[(len(runs) - 1) // 2], 2)}


def alternating(args: list[str], workdir: str, repeats: int, new_store: bool, uri: str = "") -> tuple[dict, dict]:
    """The command as it is and with the collector at Python's defaults, alternating, `repeats` times each; each run
    on a store of its own where `new_store`."""
    runs = {False: [], True: []}
    for repeat in range(repeats):
        for defaults in (True, False):
            where = f"sqlite:///{workdir}/new-{repeat}-{defaults}.db" if new_store else uri
            runs[defaults].append(train_command(args, where, workdir, collector_defaults=defaults))
    return median_run(runs[False]), median_run(runs[True])


def command(data_dir: str | None, repeats: int) -> dict:
    """Whole commands (see the module's docstring); the store template is built first, as any earlier aetrack
    command on this machine has built it."""
    from aetrack.tracking import store as stores

    stores.template()
    mnist = ["--dataset", "mnist", "--hidden", "400", "--latent-dim", "20", "--data-dir", str(data_dir)]
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/store.db"
        digits_new, digits_defaults = alternating([], tmp, repeats, new_store=True)
        digits_again = train_command([], f"sqlite:///{tmp}/new-0-False.db", tmp)
        digits_two = train_command([], uri, tmp, threads=2)
        if data_dir:
            mnist_one, mnist_defaults = alternating([*mnist, "--epochs", "1"], tmp, repeats, new_store=False, uri=uri)
            mnist_three = train_command([*mnist, "--epochs", "3"], uri, tmp)
    record = {"repeats": repeats, "digits_new_store": digits_new, "digits_existing_store": digits_again,
              "digits_collector_defaults": digits_defaults, "digits_two_threads": digits_two,
              "digits_same_model": all(run["best_val_loss"] == digits_new["best_val_loss"]
                                       and run["samples_png_sha1"] == digits_new["samples_png_sha1"]
                                       for run in (digits_again, digits_defaults, digits_two))}
    if data_dir:
        record.update(mnist_one_epoch=mnist_one, mnist_one_epoch_collector_defaults=mnist_defaults,
                      mnist_three_epochs=mnist_three, mnist_beyond_epoch_s=mnist_one["median_beyond_epochs_s"],
                      mnist_beyond_epoch_collector_defaults_s=mnist_defaults["median_beyond_epochs_s"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=100, help="digits epochs of each fit (checkpoint share)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=["all", "checkpoints", "command"], default="all",
                        help="measure that part again, keep the rest of the record")
    args = parser.parse_args()
    from aetrack.tracking.run import git_commit

    load_before = os.getloadavg()[0]
    if args.part != "all":
        record = json.loads(FILE.read_text())
        part = (checkpoint_share(args.epochs, args.repeats) if args.part == "checkpoints"
                else command(args.data_dir, args.repeats))
        record[args.part] = {**part, "git_commit": git_commit(), "load_average_1m_before": round(load_before, 2),
                             "load_average_1m_after": round(os.getloadavg()[0], 2)}
    else:
        record = {"git_commit": git_commit(), "pictures": pictures(args.data_dir),
                  "checkpoints": checkpoint_share(args.epochs, args.repeats), "store": store(args.repeats),
                  "command": command(args.data_dir, args.repeats),
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "load_average_1m_before": round(load_before, 2),
                              "load_average_1m_after": round(os.getloadavg()[0], 2)}}
    RESULTS.mkdir(exist_ok=True)
    FILE.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
