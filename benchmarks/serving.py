"""What aetrack adds to MLflow's own serving cost: a registered generator against an identity pyfunc.

Both models are served the same way, in the same run (`mlflow models serve --env-manager local`,
one uvicorn worker, loopback), and get the same requests from several concurrent clients:
{"dataframe_records": [{"n": N}], "params": {"seed": k}}. The identity model returns its input;
the generator draws N images and answers with base64 PNGs. Measurements alternate between the two
servers, round after round and in turn first, so that a busy machine slows both alike.

    python benchmarks/serving.py                                   # vae on digits
    python benchmarks/serving.py --dataset mnist --data-dir ../shared/data
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import mlflow
import numpy as np
import requests
import torch
from mlflow import MlflowClient
from mlflow.models.signature import ModelSignature

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serving import log_and_register, new_store, serve_model, stop_server, tracking  # noqa: E402

from aetrack import data as datasets  # noqa: E402
from aetrack import modelio  # noqa: E402
from aetrack.serving import generator as serving  # noqa: E402
from aetrack.config import TrainConfig  # noqa: E402
from aetrack.training import fit  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = {1: 0.8, 64: 0.5}  # the generator's throughput at n images per request, as a fraction of the identity model's

IDENTITY = '''"""A trivial pyfunc: the answer is the request."""
import mlflow


class Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Identity())
'''


def identity_model(root: Path) -> str:
    """Saved with the generator's input schema and ParamSchema, so that MLflow does the same work for both."""
    code = root / "identity.py"
    code.write_text(IDENTITY)
    path = root / "identity-model"
    mlflow.pyfunc.save_model(path, python_model=str(code), signature=ModelSignature(inputs=serving.INPUT_SCHEMA, params=serving.PARAMS))
    return str(path)


def load(url: str, n: int, clients: int, seconds: float, warmup: float) -> tuple[list[float], float]:
    """`clients` threads post requests back to back for warmup + seconds; returns the latencies (s)
    of the requests made wholly inside the measured window, and that window's length."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    def client(index: int) -> None:
        session, mine, k = requests.Session(), [], index
        while (now := time.perf_counter()) < stop_at:
            body = json.dumps({"dataframe_records": [{"n": n}], "params": {"seed": k}})
            response = session.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
            done = time.perf_counter()
            if response.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
            if now >= measure_from and done <= stop_at:
                mine.append(done - now)
            k += clients
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, seconds


def summary(latencies: list[float], seconds: float, n: int) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "req_per_s": round(len(ms) / seconds, 1), "images_per_s": round(n * len(ms) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def markdown(report: dict) -> str:
    lines = [f"Served with `mlflow models serve --env-manager local` (1 worker) on loopback, {report['clients']} concurrent "
             f"clients, {report['rounds']} alternating rounds of {report['seconds']:g} s per cell; "
             f"model `{report['model_uri']}` ({report['model']} on {report['dataset']}, {report['shape']}); "
             f"{report['machine']}; load average {report['load_average_before'][0]} before, "
             f"{report['load_average_after'][0]} after.", "",
             "| n | model | req/s | images/s | p50 ms | p99 ms | throughput ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        for name in ("identity", "aetrack"):
            cell = row[name]
            ratio = f"**{row['ratio']:.2f}**" if name == "aetrack" else ""
            lines.append(f"| {row['n']} | {name} | {cell['req_per_s']} | {cell['images_per_s']} | {cell['p50_ms']} | "
                         f"{cell['p99_ms']} | {ratio} |")
    for row in report["results"]:
        if row["n"] in TARGETS:
            verdict = "met" if row["ratio"] >= TARGETS[row["n"]] else "missed"
            lines += ["", f"Target: aetrack's n={row['n']} throughput at least {TARGETS[row['n']]:.0%} of the identity "
                          f"model's: **{verdict}** ({row['ratio']:.2f})."]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--model", "variant", default="vae", show_default=True, help="Variant to train, register and serve.")
@click.option("--dataset", default="digits", show_default=True)
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR")
@click.option("--epochs", default=1, show_default=True, help="Training epochs (weights do not change the cost).")
@click.option("--clients", default=4, show_default=True, help="Concurrent clients.")
@click.option("--seconds", default=5.0, show_default=True, help="Measured seconds per cell and round.")
@click.option("--rounds", default=4, show_default=True, help="Alternating rounds.")
@click.option("--sizes", default="1,64", show_default=True, help="Images per request (n).")
@click.option("--output", default=str(RESULTS / "serving"), show_default=True, help="Writes OUTPUT.json and OUTPUT.md.")
def main(variant, dataset, data_dir, epochs, clients, seconds, rounds, sizes, output):
    sizes = [int(size) for size in sizes.split(",")]
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="aetrack-serving-bench-"))
    uri = new_store(root)
    name = f"aetrack-{dataset}-{variant}"
    servers = {}
    try:
        with tracking(uri):
            splits = datasets.load(dataset, data_dir=data_dir)
            config = TrainConfig(model=variant, dataset=dataset, epochs=epochs)
            model, _ = fit(config, splits, progress=False)
            logged = log_and_register(model, modelio.ModelInfo(config, splits.shape, splits.classes), name)
            MlflowClient(uri).set_registered_model_alias(name, "champion", logged.registered_model_version)
            model_uri = f"models:/{name}@champion"
            servers["identity"] = serve_model(identity_model(root), root)
            servers["aetrack"] = serve_model(model_uri, root, uri)
        collected = {(who, n): ([], 0.0) for who in servers for n in sizes}
        for round_ in range(rounds):
            for n in sizes:
                order = list(servers.items()) if round_ % 2 == 0 else list(servers.items())[::-1]
                for who, (url, _) in order:
                    latencies, window = load(url, n, clients, seconds, warmup=1.0)
                    previous, total = collected[(who, n)]
                    collected[(who, n)] = (previous + latencies, total + window)
                    print(f"round {round_ + 1} n={n:<3} {who:8} {summary(latencies, window, n)}", flush=True)
    finally:
        for _, process in servers.values():
            stop_server(process)
        shutil.rmtree(root, ignore_errors=True)
    results = []
    for n in sizes:
        row = {"n": n, **{who: summary(*collected[(who, n)], n) for who in servers}}
        row["ratio"] = round(row["aetrack"]["req_per_s"] / row["identity"]["req_per_s"], 3)
        results.append(row)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python benchmarks/serving.py", *sys.argv[1:]]),
        "model_uri": model_uri, "model": variant, "dataset": dataset, "shape": "x".join(map(str, splits.shape)),
        "clients": clients, "seconds": seconds, "rounds": rounds,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, mlflow {mlflow.__version__}",
        "results": results,
        "target_met": {str(row["n"]): row["ratio"] >= TARGETS[row["n"]] for row in results if row["n"] in TARGETS},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{output}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{output}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
