"""How fast studies run: the share of a study's time per run that is not training (tracking, evaluation, the report),
and the speed-up of `aetrack study latent-size --workers 2` over one worker, one torch thread each. Records to
benchmarks/results/studies-speed.json.

    python benchmarks/studies_speed.py                  # the digits defaults (minutes of two cores)
    python benchmarks/studies_speed.py --set epochs=5   # a quick look; the record says which settings it ran

Targets (issue 25): overhead at most 30 % of a digits run; two workers at least 1.7x faster than one on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "studies-speed.json"
sys.path.insert(0, str(Path(__file__).parent))


def timed_study(args: list[str], workdir: Path, name: str) -> float:
    """Seconds of one `aetrack study` process on a fresh MLflow store (the reference classifier not needed)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / (name + '.db')}", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aetrack", "study", *args], env=env, check=True, cwd=workdir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def bare_training(settings: dict[str, str], grid: tuple[dict, ...]) -> float:
    """Seconds of training the same settings with the training loop alone, one thread, no tracking."""
    import dataclasses

    import torch

    from aetrack import data as datasets
    from aetrack.config import TrainConfig, from_strings
    from aetrack.training import fit

    torch.set_num_threads(1)
    base = from_strings(TrainConfig, settings)
    data = datasets.load("digits")
    started = time.perf_counter()
    for setting in grid:
        fit(dataclasses.replace(base, **setting), data, progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="", help="training settings every run shares, e.g. epochs=5")
    args = parser.parse_args()
    from aetrack.config import parse_settings
    from aetrack.tracking.run import git_commit
    from aetrack.tracking.workflows.studies import STUDIES

    settings = parse_settings((args.set,)) if args.set else {}
    shared = ["--set", args.set] if args.set else []
    grid = STUDIES["latent-size"].grid
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        one = timed_study(["latent-size", "--seeds", "1", "--workers", "1", *shared], workdir, "one")
        two = timed_study(["latent-size", "--seeds", "1", "--workers", "2", *shared], workdir, "two")
    bare = bare_training(settings, grid)
    record = {"settings": settings or "defaults", "runs": len(grid), "one_worker_s": round(one, 1),
              "two_workers_s": round(two, 1), "speedup": round(one / two, 2), "bare_training_s": round(bare, 1),
              "overhead_share": round((one - bare) / one, 3), "cores": os.cpu_count(),
              "load_average_1m": round(os.getloadavg()[0], 2), "git_commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
