"""Start-up: how long `aetrack` takes to print its help or a usage error, as a user's shell sees it, and how long
`aetrack train` (digits) takes to reach its first optimisation step.

Each command runs as a fresh process (the console script of this environment) several times; the median
wall time is reported beside `python -c "import torch"`, the floor any command that imports torch pays.
Targets (issues 9 and 10): help under 1 s, a usage error under 2.5 s, the first optimisation step within 4 s,
on this project's 2-core machine.

The first step is timed by running the same CLI entry point in a process whose global optimizer pre-step hook
exits at the first `optimizer.step()`; it tracks to a fresh sqlite store in a temporary folder (MLflow's default
kind of store), created by the warm-up run, as a user's second run finds it.

    .venv/bin/python benchmarks/startup.py --runs 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
FIRST_STEP = """
import os, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
register_optimizer_step_pre_hook(lambda *args: os._exit(0))
from aetrack.cli import main
sys.argv = ["aetrack", *sys.argv[1:]]
main()
"""
COMMANDS = {
    "aetrack --help": ([str(BIN / "aetrack"), "--help"], 0, 1.0),
    "aetrack train --help": ([str(BIN / "aetrack"), "train", "--help"], 0, 1.0),
    "aetrack train --model ae --prior mog (usage error)": ([str(BIN / "aetrack"), "train", "--model", "ae", "--prior", "mog"], 2, 2.5),
    "aetrack train (digits) to its first optimisation step": (
        [sys.executable, "-c", FIRST_STEP, "train", "--epochs", "1", "--quiet", "--no-register"], 0, 4.0),
    'python -c "import torch" (reference)': ([sys.executable, "-c", "import torch"], 0, None),
}


def wall_time(command: list[str], expected: int, cwd: str | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"} if cwd else None)
    elapsed = time.perf_counter() - started
    if done.returncode != expected:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}, not {expected}: {done.stderr[-500:]}")
    return elapsed


def main(runs: int) -> None:
    rows = {}
    workdir = tempfile.mkdtemp(prefix="aetrack-startup-")  # where `aetrack train` keeps its store and checkpoints
    for name, (command, expected, target) in COMMANDS.items():
        cwd = workdir if "train (digits)" in name else None
        wall_time(command, expected, cwd)  # warm the file cache (and create the tracking store)
        times = [wall_time(command, expected, cwd) for _ in range(runs)]
        rows[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                      "max_s": round(max(times), 3), "runs": runs, "target_s": target}
        print(f"{name:55} median {rows[name]['median_s']:.3f} s  (min {rows[name]['min_s']:.3f}, max {rows[name]['max_s']:.3f})")
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version()}, "commands": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Start-up ({record['when']}, {os.cpu_count()} CPUs, load average {record['machine']['load_average']})", "",
             f"Median wall time of {runs} fresh processes, after one warm-up run: `python benchmarks/startup.py --runs {runs}`.", "",
             "| command | median | min | max | target |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        target = f"< {row['target_s']} s" if row["target_s"] else ""
        lines.append(f"| `{name}` | {row['median_s']:.2f} s | {row['min_s']:.2f} s | {row['max_s']:.2f} s | {target} |")
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    main(parser.parse_args().runs)
