"""What the defaults give, checked from outside as a user would: `aetrack train` with no options (its time,
active units and FCD through `aetrack evaluate`), the conditional VAE's label accuracy, M2's test error, and for
every variant whether the default budget has converged: its best validation loss against the same variant
trained five times longer (same seed, the same KL warm-up in epochs, no early stopping).

    python benchmarks/defaults.py                  # everything (resumable: finished parts are kept)
    python benchmarks/defaults.py --part timing    # one part: timing, targets, convergence

Results: benchmarks/results/defaults.json and defaults.md. Runs go to an MLflow store under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from aetrack.tracking import metric_names as names
from aetrack.tracking import tags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FILE = RESULTS / "defaults.json"
VARIANTS = ("ae", "dae", "sae", "cae", "vae", "cvae", "m2")
BIN = Path(sys.executable).parent


def aetrack(*args: str, uri: str, env: dict | None = None) -> tuple[str, float]:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "aetrack"), *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"aetrack {' '.join(args)} failed: {done.stderr[-1500:]}")
    return done.stdout, seconds


def run_id_of(output: str) -> str:
    return next(line.split()[-1] for line in output.splitlines() if line.startswith("run id:"))


def train_and_evaluate(model: str, uri: str, *extra: str, evaluate: bool = True) -> dict:
    from mlflow import MlflowClient

    output, seconds = aetrack("train", "--model", model, "--quiet", "--no-register", *extra, uri=uri)
    run_id = run_id_of(output)
    run = MlflowClient(uri).get_run(run_id)
    history = MlflowClient(uri).get_metric_history(run_id, names.EPOCH_TIME)
    record = {"run_id": run_id, "command_seconds": round(seconds, 1),
              "training_seconds": round(sum(m.value for m in history), 1), "epochs_run": len(history),
              "epochs": int(run.data.tags[tags.RESOLVED.format("epochs")]), "best_epoch": int(run.data.metrics[names.BEST_EPOCH]),
              "best_val_loss": run.data.metrics[names.BEST_VAL_LOSS]}
    if evaluate:
        output, _ = aetrack("evaluate", run_id, "--json", uri=uri)
        record["test"] = json.loads(output)["metrics"]
    return record


def timing(uri: str) -> dict:
    """The README's first command, exactly: `aetrack train` (no options; the machine's default threads), with the
    commit of the code that ran it."""
    output, seconds = aetrack("train", "--quiet", uri=uri)
    from mlflow import MlflowClient

    run_id = run_id_of(output)
    epochs = MlflowClient(uri).get_metric_history(run_id, names.EPOCH_TIME)
    run = MlflowClient(uri).get_run(run_id)
    evaluated, _ = aetrack("evaluate", run_id, "--json", uri=uri)
    metrics = json.loads(evaluated)["metrics"]
    from aetrack.tracking.run import git_commit

    return {"run_id": run_id, "command_seconds": round(seconds, 1), "training_seconds": round(sum(m.value for m in epochs), 1),
            "epochs_run": len(epochs), "epochs": int(run.data.tags[tags.RESOLVED.format("epochs")]),
            "best_epoch": int(run.data.metrics[names.BEST_EPOCH]), "best_val_loss": run.data.metrics[names.BEST_VAL_LOSS],
            "test_active_units": metrics[names.test("active_units")],
            "test_fcd": metrics[names.test("fcd")], "test_nll_iw": metrics[names.test("nll_iw")], "git_commit": git_commit()}


def targets(uri: str) -> dict:
    out = {}
    for model in ("m2", "cvae"):
        out[model] = train_and_evaluate(model, uri)
    return out


def convergence(uri: str, results: dict, variants: tuple[str, ...] = VARIANTS) -> dict:
    rows = results.get("convergence", {})
    for model in variants:
        if model in rows and "longer" in rows[model]:
            continue
        # The targets' default run (cvae, m2) is the same command: reuse it rather than train it twice.
        default = (rows.get(model, {}).get("default") or results.get("targets", {}).get(model)
                   or train_and_evaluate(model, uri, evaluate=False))
        rows[model] = {"default": default}
        save({**results, "convergence": rows})
        kl = ["--kl-warmup", str(round(0.1 * default["epochs"]))] if model in ("vae", "cvae", "m2") else []
        longer = train_and_evaluate(model, uri, "--epochs", str(5 * default["epochs"]), "--patience", "0", *kl,
                                    evaluate=False)
        rows[model] = {"default": default, "longer": longer,
                       "gap_percent": round(100 * (default["best_val_loss"] - longer["best_val_loss"])
                                            / abs(longer["best_val_loss"]), 2)}
        save({**results, "convergence": rows})
        print(f"{model}: default {default['best_val_loss']:.3f}, 5x {longer['best_val_loss']:.3f} "
              f"({rows[model]['gap_percent']:+.2f} %)", flush=True)
    return rows


def recorded(test: dict, name: str) -> float:
    """A test metric of a record, under today's name (`test/error`) or the one older records hold (`test_error`)."""
    return test[names.test(name)] if names.test(name) in test else test[f"test_{name}"]


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_average_1m": round(os.getloadavg()[0], 2)}


def save(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    FILE.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(merged())


def merged() -> dict:
    """defaults.json with the parts that other processes (--file) measured."""
    results: dict = {}
    for path in sorted(RESULTS.glob("defaults*.json")):
        part = json.loads(path.read_text())
        for key, value in part.items():
            if key == "convergence":
                results.setdefault("convergence", {}).update({k: v for k, v in value.items() if "longer" in v})
            elif key == "targets":
                results.setdefault("targets", {}).update(value)
            else:
                results[key] = value
    return results


def write_markdown(results: dict) -> None:
    lines = ["# What the defaults give", "", "Produced by `python benchmarks/defaults.py` (digits, two CPU cores).", ""]
    if "timing" in results:
        t = results["timing"]
        lines += ["## `aetrack train`, no options", "",
                  f"- whole command {t['command_seconds']} s, training {t['training_seconds']} s over {t['epochs_run']} epochs",
                  f"- test/active_units {t['test_active_units']:.0f} of 8, test/fcd {t['test_fcd']:.1f}, "
                  f"test/nll_iw {t['test_nll_iw']:.2f} nats (run {t['run_id']})", ""]
    targets_done = results.get("targets", {})
    if "cvae" in targets_done or "m2" in targets_done:
        lines += ["## Conditional and semi-supervised defaults", ""]
        if "cvae" in targets_done:
            c = targets_done["cvae"]
            lines.append(f"- cvae: test_label_accuracy {recorded(c['test'], 'label_accuracy'):.3f} (run {c['run_id']})")
        if "m2" in targets_done:
            m = targets_done["m2"]
            lines.append(f"- m2 (100 labels): test_error {recorded(m['test'], 'error'):.3f} (run {m['run_id']})")
        lines.append("")
    if results.get("convergence"):
        lines += ["## Converged? Default budget against five times longer", "",
                  "| model | epochs (default) | best val loss | epochs (5x) | best val loss (5x) | gap |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for model, row in results["convergence"].items():
            if "longer" not in row:
                continue
            d, longer = row["default"], row["longer"]
            lines.append(f"| {model} | {d['epochs_run']} of {d['epochs']} (best {d['best_epoch']}) | {d['best_val_loss']:.3f} "
                         f"| {longer['epochs']} (best {longer['best_epoch']}) | {longer['best_val_loss']:.3f} | {row['gap_percent']:+.2f} % |")
    lines.append("")
    (RESULTS / "defaults.md").write_text("\n".join(lines))


def rewrite_docs() -> None:
    """The docs' pages render their defaults tables from the results (benchmarks/render_docs.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import render_docs

    render_docs.write_pages()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", action="append", choices=("timing", "targets", "convergence"))
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--redo", action="store_true", help="Measure parts again even where results exist.")
    parser.add_argument("--docs", action="store_true", help="Only rewrite the docs' tables from the results.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Convergence: these variants only.")
    parser.add_argument("--file", default="defaults.json",
                        help="Results file under benchmarks/results/ (another process can measure other parts at once; "
                             "defaults.md merges every defaults*.json).")
    args = parser.parse_args()
    global FILE
    FILE = RESULTS / args.file
    if args.docs:
        rewrite_docs()
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.workdir / Path(args.file).with_suffix('.db').name}"
    results = json.loads(FILE.read_text()) if FILE.exists() else {}
    for part in args.part or ("timing", "targets", "convergence"):
        if part in results and not args.redo and part != "convergence":
            continue
        if part == "timing":
            results["timing"] = {**timing(uri), "machine": machine()}
        elif part == "targets":
            results["targets"] = {**targets(uri), "machine": machine()}
        else:
            results["convergence"] = convergence(uri, results, tuple(args.variants.split(",")))
        save(results)
    write_markdown(merged())
    rewrite_docs()
    print((RESULTS / "defaults.md").read_text())


if __name__ == "__main__":
    main()
