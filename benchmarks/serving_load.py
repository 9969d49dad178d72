"""Load on a served aetrack model: several clients for a while, a mix of good and bad requests, no errors allowed.

A cvae trained on digits for one epoch is registered and served with
`mlflow models serve --env-manager local` (one uvicorn worker, loopback, the default body limit).
Each client posts back to back, cycling through MIX from its own starting point: samples, a decoded
latent, reconstructions of a PNG and of pixels, and two bad requests that must get their 4xx. An
error is any other status, a connection failure or a timeout; the run fails if there is one. The
report gives p50/p99 latency per kind and overall, throughput, and the server's memory.

    python benchmarks/serving_load.py        # 8 clients, 30 s; writes benchmarks/results/serving-load.json and .md
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serving import (log_and_register, memory_mb, new_store, png, reset_peak, scoring_process,  # noqa: E402
                          serve_model, stop_server, tracking)

from aetrack import data as datasets  # noqa: E402
from aetrack import modelio  # noqa: E402
from aetrack.config import TrainConfig  # noqa: E402
from aetrack.training import fit  # noqa: E402

RESULTS = Path(__file__).parent / "results"
JSON = {"Content-Type": "application/json"}


def mix(latent_dim: int, image: np.ndarray) -> list[tuple[str, bytes, dict, int]]:
    """(kind, body, headers, expected status) of each request a client cycles through; n=1 comes most often."""
    def body(rows, **params) -> bytes:
        return json.dumps({"dataframe_records": rows, "params": params}).encode()

    good = [
        ("n=1", body([{"n": 1, "label": 3}], seed=1), JSON, 200),
        ("n=16", body([{"n": 16, "label": 7}], seed=2), JSON, 200),
        ("latent", body([{"latent": [0.1] * latent_dim, "label": 5}], output="array"), JSON, 200),
        ("image", body([{"image": png(image), "label": 0}]), JSON, 200),
        ("pixels", body([{"pixels": image.ravel().tolist(), "label": 0}], output="array"), JSON, 200),
    ]
    bad = [
        ("ragged latent (400)", body([{"latent": [[0.0], [0.0, 0.0]]}]), JSON, 400),
        ("no Content-Type (415)", body([{"n": 1}]), {}, 415),
    ]
    return [good[0], good[1], good[0], good[2], bad[0], good[0], good[3], good[0], good[4], bad[1]]


def run_clients(url: str, requests_mix: list, clients: int, seconds: float, warmup: float) -> tuple[dict, list[str]]:
    """Clients post back to back for warmup + seconds; returns ({kind: latencies in s of requests
    wholly inside the measured window}, errors)."""
    latencies: dict[str, list[float]] = {kind: [] for kind, *_ in requests_mix}
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    def client(index: int) -> None:
        session, mine, wrong = requests.Session(), [], []
        k = index
        while (now := time.perf_counter()) < stop_at:
            kind, body, headers, expected = requests_mix[k % len(requests_mix)]
            k += 1
            try:
                response = session.post(f"{url}/invocations", data=body, headers=headers, timeout=30)
                done = time.perf_counter()
                if response.status_code != expected:
                    wrong.append(f"{kind}: HTTP {response.status_code}: {response.text[:200]}")
                    continue
            except requests.RequestException as err:
                wrong.append(f"{kind}: {type(err).__name__}: {err}")
                session = requests.Session()
                continue
            if now >= measure_from and done <= stop_at:
                mine.append((kind, done - now))
        with lock:
            for kind, latency in mine:
                latencies[kind].append(latency)
            errors.extend(wrong)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors


def summary(latencies: list[float], seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "req_per_s": round(len(ms) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`: {report['clients']} concurrent clients for {report['seconds']:g} s (after "
             f"{report['warmup']:g} s of warm-up) against `mlflow models serve --env-manager local` (1 worker) on "
             f"loopback; model `{report['model_uri']}` ({report['model']} on {report['dataset']}); {report['machine']}.", "",
             "| request | requests | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for kind, cell in report["kinds"].items():
        lines.append(f"| {kind} | {cell['requests']} | {cell['req_per_s']} | {cell['p50_ms']} | {cell['p99_ms']} |")
    for label, total in (("**all answered 200**", report["good"]), ("**all**", report["all"])):
        lines.append(f"| {label} | {total['requests']} | {total['req_per_s']} | {total['p50_ms']} | {total['p99_ms']} |")
    memory = report["server_memory_mb"]
    lines += ["", f"Errors (a status other than the one expected, a failed connection or a timeout): **{report['error_count']}**. "
              f"Server memory: {memory['before']:.0f} MB before, {memory['after']:.0f} MB after, "
              f"peak {memory['peak']:.0f} MB."]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--model", "variant", default="cvae", show_default=True, help="Variant to train, register and serve.")
@click.option("--dataset", default="digits", show_default=True)
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR")
@click.option("--clients", default=8, show_default=True, help="Concurrent clients.")
@click.option("--seconds", default=30.0, show_default=True, help="Measured seconds.")
@click.option("--warmup", default=2.0, show_default=True, help="Seconds of load before measuring.")
@click.option("--output", default=str(RESULTS / "serving-load"), show_default=True, help="Writes OUTPUT.json and OUTPUT.md.")
def main(variant, dataset, data_dir, clients, seconds, warmup, output):
    root = Path(tempfile.mkdtemp(prefix="aetrack-serving-load-"))
    name = f"aetrack-{dataset}-{variant}"
    process = None
    try:
        uri = new_store(root)
        with tracking(uri):
            splits = datasets.load(dataset, data_dir=data_dir)
            config = TrainConfig(model=variant, dataset=dataset, epochs=1)
            model, _ = fit(config, splits, progress=False)
            logged = log_and_register(model, modelio.ModelInfo(config, splits.shape, splits.classes), name)
        MlflowClient(uri).set_registered_model_alias(name, "champion", logged.registered_model_version)
        model_uri = f"models:/{name}@champion"
        url, process = serve_model(model_uri, root, uri)
        pid = scoring_process(process)
        requests_mix = mix(config.latent_dim, splits.test_x[0, 0].numpy())
        reset_peak(pid)
        before = memory_mb(pid)
        latencies, errors = run_clients(url, requests_mix, clients, seconds, warmup)
        after = memory_mb(pid)
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(root, ignore_errors=True)
    expected = {kind: status for kind, _, _, status in requests_mix}
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python benchmarks/serving_load.py", *sys.argv[1:]]),
        "model_uri": model_uri, "model": variant, "dataset": dataset,
        "clients": clients, "seconds": seconds, "warmup": warmup,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, mlflow {mlflow.__version__}",
        "kinds": {kind: summary(values, seconds) for kind, values in latencies.items()},
        "good": summary([value for kind, values in latencies.items() if expected[kind] == 200 for value in values], seconds),
        "all": summary([value for values in latencies.values() for value in values], seconds),
        "server_memory_mb": {"before": before["rss"], "after": after["rss"], "peak": after["peak"]},
        "errors": errors[:50],
        "error_count": len(errors),
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{output}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{output}.md").write_text(markdown(report))
    print(markdown(report))
    if errors:
        raise SystemExit(f"{len(errors)} errors, first: {errors[0]}")


if __name__ == "__main__":
    main()
