"""Anchor rows side by side on one borrowed GPU machine, each with as many epochs as a fixed time allows.

    python benchmarks/anchors_device.py run --minutes 8 --out DIR ROW [ROW ...]
    python benchmarks/anchors_device.py merge DIR/ROW.tgz [...]

A GPU machine is lent for minutes, not hours, and comes back bare; so `run` plans the rows it is given to end
together before a deadline:

1. all rows are probed at once, as they will then run: three epochs, and the row's figure on 1000 test images
   (K=5000), give seconds per epoch, the fixed cost of a run (start, logging) and the measurement's cost;
2. each row then trains through `benchmarks/anchors.py` for the epochs that leave time to measure all 10000
   test images, its schedule planned for those epochs and its KL warm-up scaled with them (the recipe's warm-up
   is the same share of its own length); a row that runs late ends its leg at the deadline and is measured
   where it stopped (`--resume --finish`, which its record then says);
3. every row has its own MLflow store (SQLite) and results; DIR gets ROW.tgz (store, artifacts, record, log).

`merge`, back on the machine that holds the repository, adds each archive's record to anchors.json (the docs'
table rebuilt) with the commit of the tree that was sent: the machine's .git, where one travels, is the session's
first commit under the sent files, so the commit it reads there is not the code's.

An archive holds at most 15 MiB (what such a machine gives back per file): the probes' artifacts are left out, and
where the row's own still do not fit, the archive holds its store, record and logs only, and the log says so.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import anchors  # noqa: E402  (benchmarks/ is no package: the runner these rows go through)
ANCHORS = HERE / "anchors.py"
PROBE_EPOCHS, PROBE_IMAGES, TEST_IMAGES = 3, 1000, 10000
ARCHIVE_BYTES = 15 * 2**20


@dataclass
class Row:
    name: str
    home: Path
    device: str = "cuda"
    threads: int = 4
    args: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict:
        return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{self.home / 'mlflow.db'}",
                "AETRACK_ANCHORS_RESULTS": str(self.home / "results"), "OMP_NUM_THREADS": str(self.threads)}

    def start(self, extra: list[str], log: str) -> subprocess.Popen:
        out = open(self.home / log, "a")
        return subprocess.Popen([sys.executable, str(ANCHORS), self.name, *self.args, *extra, "--device", self.device],
                                cwd=self.home, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def record(self) -> dict | None:
        path = self.home / "results" / "anchors.json"
        return next(iter(json.loads(path.read_text()).values()), None) if path.exists() else None


def say(line: str, log: Path) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {line}"
    print(line, flush=True)
    with open(log, "a") as f:
        f.write(line + "\n")


def epoch_seconds(db: Path) -> list[float]:
    with sqlite3.connect(db) as con:
        return [v for (v,) in con.execute("select value from metrics where key = 'system/epoch_time' order by step")]


def probe_figures(row: Row) -> dict:
    """Seconds per epoch (the median after the first), fixed seconds, seconds for all test images' measurement."""
    text = (row.home / "probe.log").read_text()
    record = json.loads(text[text.index("{\n"):text.rindex("}") + 1])
    times = epoch_seconds(row.home / "probe.db")
    steady = sorted(times[1:])[len(times[1:]) // 2]
    return {"epoch": steady, "fixed": record["train_seconds"] - sum(times),
            "measure": (record["wall_seconds"] - record["train_seconds"]) * TEST_IMAGES / PROBE_IMAGES}


def planned_epochs(figures: dict, seconds_left: float) -> int:
    """The epochs that fit in `seconds_left` with the run's fixed cost (a fifth spare), its measurement and 20 s to
    spare, at nine tenths of the probed speed (the rows share the machine; a probe is short)."""
    return max(0, int(0.9 * (seconds_left - figures["measure"] - 1.2 * figures["fixed"] - 20) / figures["epoch"]))


def scaled_warmup(warmup: int, length: int, epochs: int) -> int | None:
    """The recipe's KL warm-up, the same share of `epochs` as of its own `length`; None where it stays as it is."""
    return max(1, round(warmup * epochs / length)) if warmup and epochs < length else None


def recipe_warmup(name: str) -> tuple[int, int]:
    spec = anchors.PROTOCOLS[name]
    config = spec.best or spec.config
    return config.kl_warmup or 0, config.epochs


@click.group()
def cli():
    pass


@cli.command()
@click.argument("rows", nargs=-1, required=True)
@click.option("--minutes", type=click.FloatRange(min=1), required=True, help="Everything ends within this, probes included.")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--work", type=click.Path(file_okay=False), default="/tmp/anchor-rows", show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
def run(rows, minutes, out, work, device):
    """Probe ROWS together, then train and measure each with the epochs that fit."""
    deadline = time.monotonic() + minutes * 60
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "driver.log"
    from aetrack import data

    data.load("mnist", data_dir=None)  # unpacked once here, not by the rows at once
    threads = max(1, (os.cpu_count() or 1) // (len(rows) + 1))  # a core for the driver and the GPU's feeding
    plan = [Row(name, work / name, device, threads) for name in rows]
    for row in plan:
        row.home.mkdir(parents=True, exist_ok=True)
    probes = [row.start(["--epochs", str(PROBE_EPOCHS), "--iw-samples", "5000", "--test-images", str(PROBE_IMAGES),
                         "--dry-run", "--tracking-uri", f"sqlite:///{row.home / 'probe.db'}", "--checkpoint-dir", "probe-ckpt"],
                        "probe.log") for row in plan]
    for row, proc in zip(plan, probes):
        say(f"{row.name}: probe exit {proc.wait()}", log)
    runs = {}
    for row in plan:
        try:
            figures = probe_figures(row)
        except (ValueError, KeyError, IndexError, sqlite3.Error) as err:
            say(f"{row.name}: no probe figures ({err}); see its probe.log", log)
            continue
        epochs = planned_epochs(figures, deadline - time.monotonic())
        say(f"{row.name}: {figures['epoch']:.2f} s an epoch, {figures['fixed']:.0f} s fixed, measuring "
            f"{figures['measure']:.0f} s: {epochs} epochs", log)
        if epochs < 5:
            continue
        warmup = scaled_warmup(*recipe_warmup(row.name), epochs)
        row.args = ["--epochs", str(epochs)] + (["--set", f"kl_warmup={warmup}"] if warmup is not None else [])
        leg = (deadline - time.monotonic() - figures["measure"] - 15) / 60
        runs[row.name] = (row, row.start(["--leg-minutes", f"{leg:.2f}"], "run.log"))
    for name, (row, proc) in runs.items():
        code = proc.wait()
        say(f"{name}: exit {code}", log)
        if code == 3:  # the leg ended at the deadline: measure the run where it stopped
            row.args = []
            say(f"{name}: finish exit {row.start(['--resume', '--finish'], 'run.log').wait()}", log)
    for row in plan:
        if not archive(row, out / f"{row.name}.tgz", artifacts=True):
            archive(row, out / f"{row.name}.tgz", artifacts=False)
            say(f"{row.name}: its artifacts exceed {ARCHIVE_BYTES >> 20} MiB; the archive holds store, record and logs", log)
        record = row.record()
        say(f"{row.name}: {json.dumps(record)[:400] if record else 'no record'}", log)


def archive(row: Row, path: Path, artifacts: bool) -> bool:
    """Tar the row's folder without checkpoints and the probe's artifacts (or any artifacts); False if too large."""
    probe_runs = set()
    if (row.home / "probe.db").exists():
        with sqlite3.connect(row.home / "probe.db") as con:
            probe_runs = {run for (run,) in con.execute("select run_uuid from runs")}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if len(parts) > 1 and parts[1] in {"checkpoints", "probe-ckpt"}:
            return None
        if len(parts) > 1 and parts[1] in {"mlruns", "mlartifacts"} and (not artifacts or probe_runs & set(parts)):
            return None
        return info

    with tarfile.open(path, "w:gz") as tar:
        tar.add(row.home, arcname=row.name, filter=keep)
    return path.stat().st_size <= ARCHIVE_BYTES


@cli.command()
@click.argument("archives", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--commit", required=True, help="The commit of the tree the machine ran (its own .git is stale).")
@click.option("--into", type=click.Path(file_okay=False), default="/tmp/anchor-rows-back", show_default=True)
def merge(archives, commit, into):
    """Add the records in ARCHIVES to anchors.json and rebuild the docs' tables."""
    for archive in archives:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
        name = Path(archive).name.removesuffix(".tgz")
        path = Path(into) / name / "results" / "anchors.json"
        if not path.exists():
            raise click.ClickException(f"{archive}: no record in it (see {Path(into) / name}/run.log)")
        for record in json.loads(path.read_text()).values():
            record["git_commit"] = commit
            anchors.update_results(record)
            click.echo(f"{record['protocol']}: {record['value']:.2f} ({record['epochs_run']} epochs, {record['machine']})")


if __name__ == "__main__":
    cli()
