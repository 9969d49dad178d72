"""Which training recipes earn their place as defaults: the VAE on digits under each recipe, at the `--epochs auto`
budget and at 50 epochs, over seeds, scored by the test-set importance-weighted NLL (K=1000), the best validation
loss and the active units. A recipe is a default only where it measurably helps.

    python benchmarks/recipes.py [--seeds 0,1,2] [--jobs 2]

Results: benchmarks/results/recipes.json (one record per run, appended; reruns skip what is there) and recipes.md.
Runs use `fit` alone (no MLflow), one torch thread each, `--jobs` at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FILE = RESULTS / "recipes.jsonl"
# Each recipe against the recipe before it; "old" is aetrack's former default (constant rate, zero bias, no warm-up).
RECIPES = {
    "old": {"lr_schedule": "constant", "decoder_bias": "zero", "kl_warmup": 0},
    "cosine": {"lr_schedule": "cosine", "decoder_bias": "zero", "kl_warmup": 0},
    "cosine+bias": {"lr_schedule": "cosine", "decoder_bias": "mean", "kl_warmup": 0},
    "cosine+bias+warmup": {"lr_schedule": "cosine", "decoder_bias": "mean"},
    "cosine+bias+warmup+clip5": {"lr_schedule": "cosine", "decoder_bias": "mean", "grad_clip": 5.0},
    "constant+bias": {"lr_schedule": "constant", "decoder_bias": "mean", "kl_warmup": 0},
    "constant+bias+warmup (default)": {"lr_schedule": "constant", "decoder_bias": "mean"},
}
BUDGETS = ("auto", 50)


def one(recipe: str, budget, seed: int) -> dict:
    """In this process: train, score, return the record."""
    import torch

    from aetrack import data as datasets
    from aetrack.config import TrainConfig
    from aetrack.evaluation import active_units, nll_iw
    from aetrack.training import fit

    torch.set_num_threads(1)
    settings = {"model": "vae", "patience": 0, "seed": seed, **RECIPES[recipe]}
    if budget != "auto":
        settings["epochs"] = budget
    data = datasets.load("digits", seed=seed)
    started = time.perf_counter()
    model, history = fit(TrainConfig(**settings), data, progress=False)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        units = active_units(model.encode(data.test_x))
        nll = float(nll_iw(model, data.test_x, None, 1000).mean())
    return {"recipe": recipe, "budget": budget, "seed": seed, "seconds": round(seconds, 1),
            "best_val_loss": round(history.best_val_loss, 3), "best_epoch": history.best_epoch,
            "epochs": len(history.epochs), "active_units": units, "test_nll_iw": round(nll, 3)}


def records() -> list[dict]:
    return [json.loads(line) for line in FILE.read_text().splitlines()] if FILE.exists() else []


def summary(rows: list[dict]) -> str:
    lines = ["# Training recipes: the VAE on digits", "",
             "Produced by `python benchmarks/recipes.py`: test NLL by importance sampling (K=1000, 360 test images), "
             "mean ± standard deviation over seeds; lower is better. Active units of 8.", "",
             "| recipe | budget | seeds | test_nll_iw (nats) | best val loss | active units |", "| --- | --- | --- | --- | --- | --- |"]
    for budget in BUDGETS:
        for recipe in RECIPES:
            group = [r for r in rows if r["recipe"] == recipe and r["budget"] == budget]
            if not group:
                continue

            def stat(key: str) -> str:
                values = [r[key] for r in group]
                spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
                return f"{statistics.fmean(values):.2f}{spread}"

            epochs = "auto (546 epochs)" if budget == "auto" else f"{budget} epochs"
            lines.append(f"| {recipe} | {epochs} | {len(group)} | {stat('test_nll_iw')} | {stat('best_val_loss')} "
                         f"| {stat('active_units')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: recipe, budget, seed
    args = parser.parse_args()
    if args.one:
        recipe, budget, seed = args.one
        print(json.dumps(one(recipe, budget if budget == "auto" else int(budget), int(seed))))
        return
    done = {(r["recipe"], r["budget"], r["seed"]) for r in records()}
    todo = [(recipe, budget, int(seed)) for seed in args.seeds.split(",") for budget in BUDGETS for recipe in RECIPES
            if (recipe, budget, int(seed)) not in done]

    def launch(job) -> str:
        command = [sys.executable, __file__, "--one", job[0], str(job[1]), str(job[2])]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    RESULTS.mkdir(exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, FILE.open("a") as out:
        for line in pool.map(launch, todo):
            out.write(line + "\n")
            out.flush()
    (RESULTS / "recipes.md").write_text(summary(records()))
    print((RESULTS / "recipes.md").read_text())


if __name__ == "__main__":
    main()
