"""The lesson's questions, answered from converged runs: every `aetrack study`, on digits with three seeds per
setting and, for the generation and prior questions, on MNIST with one seed (the time on two CPU cores allows no
more). Results go to benchmarks/results/questions/STUDY@DATASET.json and questions.md; the study pages in docs/studies/
render their tables from them (`<!-- render: questions:STUDY@DATASET -->` blocks, benchmarks/render_docs.py).

    python benchmarks/questions.py                 # everything; resumes: finished, evaluated runs are reused
    python benchmarks/questions.py --only priors@digits --only generation@mnist
    python benchmarks/questions.py --docs-only     # rewrite the docs' tables from the results files
    python benchmarks/questions.py --pictures-only --only generation@digits   # copy the run pictures again

Each group of studies runs in its own process with its own MLflow store under --workdir, --jobs groups at a time,
and each study trains its grid in --workers processes (`aetrack study --workers`), one torch thread each: a long job
split into resumable legs, since runs already in a store are kept. The default, one group at a time with two
workers, keeps both cores busy to a study's end, so that each study's time on its page is its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Groups share an MLflow store (and so a reference classifier); groups run in parallel.
GROUPS = {
    "mnist": [("generation", "mnist", 1), ("priors", "mnist", 1)],
    "digits-a": [("latent-size", "digits", 3)],
    "digits-b": [("generation", "digits", 3), ("priors", "digits", 3), ("denoising", "digits", 3),
                 ("regularised", "digits", 3), ("conditional", "digits", 3)],
}


def run_group(group: str, workdir: Path, only: set[str], data_dir: str | None, workers: int) -> None:
    """In this process: every study of the group, results written one file per study."""
    import torch

    from aetrack.tracking.run import git_commit
    from aetrack.tracking.workflows.studies import STUDIES
    from aetrack.tracking.workflows.study_runner import run_study

    torch.set_num_threads(1)
    uri = f"sqlite:///{workdir / (group + '.db')}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    for name, dataset, seeds in GROUPS[group]:
        if only and f"{name}@{dataset}" not in only:
            continue
        started = time.time()
        result = run_study(STUDIES[name], dataset=dataset, seeds=seeds, data_dir=data_dir, workers=workers,
                           echo=lambda line: print(f"[{group}] {line}", flush=True))
        record = {**result.as_dict(), "table": result.markdown(), "seconds": round(time.time() - started),
                  "workers": workers, "git_commit": git_commit(), "pictures": copy_pictures(name, dataset, result.as_dict()["cells"]),
                  "store": uri, "machine": machine()}
        (RESULTS / "questions").mkdir(parents=True, exist_ok=True)
        (RESULTS / "questions" / f"{name}@{dataset}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"[{group}] {name}@{dataset} done in {record['seconds']} s", flush=True)


# The pictures each study page shows, from its first seed's runs: (the settings that pick a cell, the picture's key in
# the run's evaluation/ artifacts, what it shows). The picture of each matching cell is copied to docs/studies/runs/.
RUN_PICTURES = {
    "latent-size": [({"model": "vae", "arch": "mlp"}, "reconstructions", "test images (top) and their reconstructions")],
    "denoising": [({"model": "dae", "noise_level": 0.3, "arch": "mlp"}, "denoised",
                   "noisy, denoised and clean rows, on the noise the dae was trained on"),
                  ({"model": "dae", "noise_level": 0.3, "arch": "mlp"}, "robustness",
                   "the robustness matrix: denoised PSNR on every kind and level of noise")],
    "generation": [({}, "samples", "samples"), ({}, "nearest_training", "samples above their nearest training image"),
                   ({}, "reconstructions", "test images (top) and their reconstructions")],
    "priors": [({"latent_dim": 2}, "latent_prior", "test codes over the prior's density"),
               ({"latent_dim": 8}, "samples", "samples")],
    "conditional": [({}, "samples", "samples; one row per label where the model takes one")],
    "regularised": [({"model": "ae"}, "traversals", "latent traversals"),
                    ({"model": "sae", "sparsity_weight": 0.01}, "traversals", "latent traversals"),
                    ({"model": "cae", "contractive_weight": 0.1}, "traversals", "latent traversals"),
                    ({"model": "vae"}, "traversals", "latent traversals")],
}
PICTURES = ROOT / "docs" / "studies" / "runs"


def readable(value) -> bool:
    """A setting's value that names it to a reader (a number or a word), not a tuple of widths or a run reference."""
    return isinstance(value, (int, float)) or isinstance(value, str) and not any(c in value for c in "=:/")


def picture_label(setting: dict) -> str:
    """A cell's settings as a file name's part: its readable values."""
    return "-".join(str(v) for v in setting.values() if readable(v))


def copy_pictures(name: str, dataset: str, cells: list[dict]) -> list[dict]:
    """Each RUN_PICTURES picture of the study, from the first seed's run of every matching cell, into PICTURES: what
    the record lists, for the page to show. The study's earlier pictures there are removed first."""
    import mlflow

    client = mlflow.MlflowClient()
    PICTURES.mkdir(parents=True, exist_ok=True)
    for old in PICTURES.glob(f"{name}@{dataset}-*.png"):
        old.unlink()
    copied = []
    with tempfile.TemporaryDirectory() as folder:
        for match, key, caption in RUN_PICTURES.get(name, []):
            for cell in cells:
                setting = cell["setting"]
                if any(setting.get(k) != v for k, v in match.items()):
                    continue
                run_id = cell["run_ids"][0]
                target = PICTURES / f"{name}@{dataset}-{picture_label(setting)}-{key}.png"
                try:
                    path = client.download_artifacts(run_id, f"evaluation/{key}.png", folder)
                except Exception as err:  # noqa: BLE001 - a run without that picture: left out, and said
                    print(f"  no {key} picture in run {run_id}: {err}", file=sys.stderr)
                    continue
                shutil.move(path, target)
                copied.append({"setting": setting, "key": key, "caption": caption, "run_id": run_id,
                               "file": target.relative_to(ROOT / "docs" / "studies").as_posix()})
    return copied


def recopy_pictures(only: set[str]) -> None:
    """Each record's run pictures copied again from the MLflow store the record names, the record's list rewritten."""
    import mlflow

    for path in sorted((RESULTS / "questions").glob("*@*.json")):
        if only and path.stem not in only:
            continue
        record = json.loads(path.read_text())
        mlflow.set_tracking_uri(record["store"])
        record["pictures"] = copy_pictures(record["study"], record["dataset"], record["cells"])
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{path.stem}: {len(record['pictures'])} pictures")


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def collect() -> dict[str, dict]:
    folder = RESULTS / "questions"
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))} if folder.exists() else {}


def write_summary(results: dict[str, dict]) -> None:
    lines = ["# The questions, answered", "",
             "Produced by `python benchmarks/questions.py`: every study with aetrack's defaults (`--epochs auto`, "
             "early stopping), mean ± sample standard deviation over seeds.", ""]
    for key, record in results.items():
        lines += [f"## {record['study']} on {record['dataset']}", "", record["question"], "",
                  f"{len(record['cells'][0]['run_ids'])} seed(s); {record['seconds']} s on "
                  f"{record['machine']['cores']} cores ({record['machine']['date']}).", "", record["table"], ""]
    (RESULTS / "questions.md").write_text("\n".join(lines))


def rewrite_docs() -> list[str]:
    """Render the study pages' tables from the results (benchmarks/render_docs.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import render_docs

    return render_docs.write_pages()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], metavar="STUDY@DATASET")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--jobs", type=int, default=1, help="groups at a time")
    parser.add_argument("--workers", type=int, default=2, help="processes per study (aetrack study --workers)")
    parser.add_argument("--data-dir", default=os.environ.get("AETRACK_DATA_DIR"))
    parser.add_argument("--docs-only", action="store_true")
    parser.add_argument("--pictures-only", action="store_true",
                        help="copy each record's run pictures again from the store it names (RUN_PICTURES changed)")
    parser.add_argument("--group", help=argparse.SUPPRESS)  # internal: run one group in this process
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.group:
        run_group(args.group, args.workdir, set(args.only), args.data_dir, args.workers)
        return
    if args.pictures_only:
        recopy_pictures(set(args.only))
    elif not args.docs_only:
        groups = [g for g, studies in GROUPS.items()
                  if not args.only or any(f"{n}@{d}" in args.only for n, d, _ in studies)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}

        def launch(group: str) -> int:
            command = [sys.executable, __file__, "--group", group, "--workdir", str(args.workdir),
                       "--workers", str(args.workers)]
            command += [item for only in args.only for item in ("--only", only)]
            command += ["--data-dir", args.data_dir] if args.data_dir else []
            return subprocess.run(command, env=env).returncode

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            codes = dict(zip(groups, pool.map(launch, groups)))
        failed = [g for g, code in codes.items() if code]
        if failed:
            print(f"groups failed: {', '.join(failed)}", file=sys.stderr)
    results = collect()
    write_summary(results)
    print(f"pages rewritten: {', '.join(rewrite_docs()) or 'none'}")


if __name__ == "__main__":
    main()
