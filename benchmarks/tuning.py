"""Tuning benchmarks: pruning versus none (best value, epochs spent), and 2 workers versus 1 (trials per minute).

    .venv/bin/python benchmarks/tuning.py                 # both: 10-15 minutes on a busy 2-core machine
    .venv/bin/python benchmarks/tuning.py pruning --trials 20 --epochs 10
    .venv/bin/python benchmarks/tuning.py workers --trials 8 --epochs 4 --setups 1x1,2x1 --rounds 3

Every trial goes through the real path (`tune_study` / the `aetrack tune` console script, a child run in
MLflow, the model logged), so the figures include the per-trial tracking overhead. Results are merged into
benchmarks/results/tuning.json and rewritten as benchmarks/results/tuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import optuna

from aetrack.cli.options import quiet_mlflow
from aetrack.config import TrackingOptions, TrainConfig, TuneConfig
from aetrack.models import REGISTRY
from aetrack.tuning.space import build_space
from aetrack.tuning.storage import used_trials
from aetrack.tuning.study import tune_study

RESULTS = Path(__file__).resolve().parent / "results"
VENV_BIN = Path(sys.executable).parent
# A VAE on digits with one searched setting that matters a lot (lr over two decades) and one that matters less.
FIXED = {"model": "vae", "hidden": (64,), "latent_dim": 2, "batch_size": 64, "log_every": 50, "prior": "normal", "beta": 1.0}
SPACE = {"lr": "float:1e-4:1e-2:log", "hidden": "cat:32,64,128"}


def pruning(trials: int, epochs: int, seed: int, pruners: list[str], workdir: Path) -> dict:
    base = TrainConfig(**{**FIXED, "epochs": epochs})
    space = build_space(REGISTRY["vae"], base, overrides=SPACE, fixed=set(FIXED) - {"hidden"})
    rows = {}
    for pruner in pruners:
        started = time.perf_counter()
        mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
        search = TuneConfig(n_trials=trials, study_name=f"pruning-{pruner}", storage=f"sqlite:///{workdir}/optuna.db",
                            sampler="tpe", sampler_seed=seed, pruner=pruner, pruner_startup_trials=3, pruner_warmup_epochs=1,
                            threads=2)
        tracking = TrackingOptions(experiment="bench-pruning", checkpoint_dir=str(workdir / "checkpoints"))
        study = tune_study(base, space, search, tracking=tracking, echo=lambda line: None, summary=lambda line: None)
        done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        rows[pruner] = {
            "best_value": round(study.best_value, 3),
            "best_trial": study.best_trial.number,
            "best_params": {k: round(v, 6) if isinstance(v, float) else v for k, v in study.best_params.items()},
            "epochs_spent": sum(len(t.intermediate_values) for t in study.trials),
            "epochs_budget": trials * epochs,
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
            "complete": len(done),
            "wall_s": round(time.perf_counter() - started, 1),
        }
        print(f"pruner {pruner:9}  best {rows[pruner]['best_value']:.3f}  epochs {rows[pruner]['epochs_spent']}/{trials * epochs}"
              f"  pruned {rows[pruner]['pruned']}  {rows[pruner]['wall_s']:.0f}s", flush=True)
    command = f".venv/bin/python benchmarks/tuning.py pruning --trials {trials} --epochs {epochs} --seed {seed}"
    return {"settings": {"trials": trials, "epochs": epochs, "sampler": "tpe", "seed": seed, "median": "startup 3 trials, warmup 1 epoch",
                         "space": SPACE, "fixed": {k: str(v) for k, v in FIXED.items()}}, "results": rows, "command": command}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(root: Path, workers: int = 2) -> tuple[str, subprocess.Popen]:
    port = free_port()
    # By default two worker processes, as `aetrack server` starts it.
    process = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
                                "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                                "--workers", str(workers), "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
                               stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import requests

    for _ in range(300):
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return url, process
        except requests.RequestException:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-1000:])


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (the mlflow server and its uvicorn workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_setup(count: int, threads: int, trials: int, epochs: int, url: str, server: subprocess.Popen, storage_url: str,
              workdir: Path) -> dict:
    """`count` `aetrack tune` processes of `threads` torch threads on one fresh study; trials per minute and CPU."""
    study_name = f"workers-{count}x{threads}-{time.time_ns()}"
    args = [str(VENV_BIN / "aetrack"), "tune", "--model", "vae", "--hidden", "64", "--latent-dim", "2", "--prior", "normal",
            "--beta", "1", "--batch-size", "64", "--epochs", str(epochs), "--param", "lr=float:1e-3:1e-2:log",
            "--pruner", "none", "--n-trials", str(trials), "--study-name", study_name, "--storage", storage_url,
            "--tracking-uri", url, "--experiment", "bench-workers", "--no-register", "--quiet",
            "--threads", str(threads), "--checkpoint-dir", str(workdir / "checkpoints")]
    load = os.getloadavg()[0]
    children_before, server_before = resource.getrusage(resource.RUSAGE_CHILDREN), tree_cpu_seconds(server.pid)
    started = time.perf_counter()
    processes = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]
    codes = [p.wait() for p in processes]
    wall = time.perf_counter() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = children_after.ru_utime + children_after.ru_stime - children_before.ru_utime - children_before.ru_stime
    server_cpu = tree_cpu_seconds(server.pid) - server_before
    if any(codes):
        raise RuntimeError(f"a worker exited with {codes}")
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    finished = [t for t in study.trials if t.datetime_complete]
    # Trials per minute between the first trial's start and the last one's end: process start-up excluded.
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"trials": used_trials(study.trials), "trials_per_min": round(60 * len(finished) / span, 1),
            "trials_per_min_with_startup": round(60 * len(finished) / wall, 1), "span_s": round(span, 1),
            "wall_s": round(wall, 1),
            # CPU seconds per trial (the workers' start-up included), and the load average when the setup started:
            # other jobs on the same cores take from the second worker first.
            "worker_cpu_s_per_trial": round(worker_cpu / max(len(finished), 1), 2),
            "server_cpu_s_per_trial": round(server_cpu / max(len(finished), 1), 2),
            "load_average_1m_at_start": round(load, 2)}


def workers(trials: int, epochs: int, setups: list[tuple[int, int]], storage: str | None, workdir: Path,
            rounds: int = 1, server_workers: int = 2) -> dict:
    """Each setup is (worker processes, torch threads per worker); the setups run in turn, `rounds` times, in
    alternating order (forwards, then backwards), so that a change in the machine's load hits them alike. Each
    setup's figures are the medians over rounds; the ratio is the median of the rounds' ratios to the first setup."""
    cores = os.cpu_count() or 1
    url, server = mlflow_server(workdir, server_workers)
    storage_url = storage or f"sqlite:///{workdir}/workers.db"
    runs: dict[str, list[dict]] = {f"{c}x{t}": [] for c, t in setups}
    try:
        for round_ in range(rounds):
            for count, threads in (setups if round_ % 2 == 0 else setups[::-1]):
                row = run_setup(count, threads, trials, epochs, url, server, storage_url, workdir)
                runs[f"{count}x{threads}"].append(row)
                print(f"round {round_ + 1}: {count} worker(s) x {threads} thread(s)  {row['trials_per_min']} trials/min "
                      f"({row['trials_per_min_with_startup']} with start-up)  {row['wall_s']:.0f}s  CPU per trial: "
                      f"workers {row['worker_cpu_s_per_trial']} s, server {row['server_cpu_s_per_trial']} s  "
                      f"load {row['load_average_1m_at_start']:.1f}", flush=True)
    finally:
        server.terminate()
        server.wait(15)
    first = f"{setups[0][0]}x{setups[0][1]}"
    rows = {}
    for (count, threads), (key, measured) in zip(setups, runs.items()):
        median = {name: round(statistics.median(row[name] for row in measured), 2) for name in measured[0]}
        ratios = [row["trials_per_min"] / base["trials_per_min"] for row, base in zip(measured, runs[first])]
        rows[key] = {"workers": count, "threads_per_worker": threads, **median,
                     "ratio_to_" + first: round(statistics.median(ratios), 2), "rounds": measured}
    command = (f".venv/bin/python benchmarks/tuning.py workers --trials {trials} --epochs {epochs} "
               f"--setups {','.join(f'{c}x{t}' for c, t in setups)} --rounds {rounds}"
               + ("" if server_workers == 2 else f" --server-workers {server_workers}"))
    return {"settings": {"trials": trials, "epochs": epochs, "cores": cores, "storage": "sqlite" if storage is None else "given",
                         "tracking": f"mlflow server on loopback ({server_workers} processes)", "rounds": rounds,
                         "reference": first},
            "results": rows, "command": command}


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "optuna": optuna.__version__, "load_average_1m": round(os.getloadavg()[0], 2),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tuning.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Tuning benchmarks", "", "Produced by `benchmarks/tuning.py`; every trial is a real child run in MLflow.", ""]
    if "pruning" in results:
        p = results["pruning"]
        s = p["settings"]
        lines += [f"## Pruning ({s['trials']} trials x {s['epochs']} epochs, TPE seed {s['seed']}, vae on digits)", "",
                  f"`{p['command']}`  ({p['machine']['date']}, load average {p['machine']['load_average_1m']})", "",
                  "| pruner | best val_neg_elbo | best trial | epochs spent | pruned trials | wall time |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in p["results"].items():
            lines.append(f"| {name} | {row['best_value']:.3f} | #{row['best_trial']} | {row['epochs_spent']} / {row['epochs_budget']} "
                         f"({100 * row['epochs_spent'] / row['epochs_budget']:.0f}%) | {row['pruned']} | {row['wall_s']:.0f} s |")
        lines.append("")
    if "workers" in results:
        w = results["workers"]
        s = w["settings"]
        first = s.get("reference", "1x1")
        lines += [f"## Workers ({s['trials']} trials x {s['epochs']} epochs, {s['cores']} cores, {s['tracking']}, "
                  f"median of {s.get('rounds', 1)} alternating rounds)", "",
                  f"`{w['command']}`  ({w['machine']['date']}, load average {w['machine']['load_average_1m']} at the end)", "",
                  f"| workers | threads each | trials / min | ratio to {first} | trials / min incl. start-up | CPU s per trial: "
                  "workers | CPU s per trial: server | load average at start | wall time |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in w["results"].values():
            lines.append(f"| {row['workers']} | {row['threads_per_worker']} | {row['trials_per_min']} | "
                         f"{row.get('ratio_to_' + first, '')} | {row['trials_per_min_with_startup']} | "
                         f"{row.get('worker_cpu_s_per_trial', '')} | {row.get('server_cpu_s_per_trial', '')} | "
                         f"{row.get('load_average_1m_at_start', '')} | {row['wall_s']:.0f} s |")
        lines.append("")
    (RESULTS / "tuning.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", choices=["pruning", "workers"], default=["pruning", "workers"])
    parser.add_argument("--trials", type=int, default=None, help="default: 20 (pruning), 8 (workers)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 (pruning), 4 (workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruners", default="none,median,hyperband")
    parser.add_argument("--setups", default="1x1,2x1", help="workers x threads each, comma separated; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the workers benchmark (medians)")
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server processes (aetrack server: 2)")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL for the workers benchmark (default: an SQLite file)")
    args = parser.parse_args()
    results = json.loads((RESULTS / "tuning.json").read_text()) if (RESULTS / "tuning.json").exists() else {}
    workdir = Path(tempfile.mkdtemp(prefix="aetrack-bench-tuning-"))
    quiet_mlflow()  # as `aetrack tune` runs: no artifact progress bars, MLflow warnings only
    try:
        if "pruning" in args.which:
            results["pruning"] = {**pruning(args.trials or 20, args.epochs or 10, args.seed, args.pruners.split(","), workdir),
                                  "machine": machine()}
            write(results)
        if "workers" in args.which:
            setups = [tuple(int(n) for n in setup.split("x")) for setup in args.setups.split(",")]
            results["workers"] = {**workers(args.trials or 8, args.epochs or 4, setups, args.storage, workdir, args.rounds,
                                          args.server_workers),
                                  "machine": machine()}
            write(results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print((RESULTS / "tuning.md").read_text())


if __name__ == "__main__":
    main()
