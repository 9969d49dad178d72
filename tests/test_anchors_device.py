"""benchmarks/anchors_device.py: planning rows into a borrowed GPU's minutes, archiving them, merging them back."""

from __future__ import annotations

import json
import sqlite3
import sys
import tarfile
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import anchors  # noqa: E402
import anchors_device as device  # noqa: E402


def test_the_epochs_planned_leave_time_to_start_measure_and_spare():
    figures = {"epoch": 2.0, "fixed": 20.0, "measure": 30.0}
    epochs = device.planned_epochs(figures, seconds_left=500)
    assert epochs == int(0.9 * (500 - 30 - 24 - 20) / 2.0)
    assert epochs * figures["epoch"] + 1.2 * figures["fixed"] + figures["measure"] + 20 < 500
    assert device.planned_epochs(figures, seconds_left=60) == 0  # no time: no epochs, not a negative number


def test_the_warm_up_keeps_its_share_of_the_schedule():
    assert device.scaled_warmup(100, 3280, 153) == 5  # burda-vae's 100 of 3280, over 153 epochs
    assert device.scaled_warmup(5, 300, 20) == 1  # never below one epoch
    assert device.scaled_warmup(0, 300, 20) is None and device.scaled_warmup(100, 3280, 3280) is None


def make_row(home: Path) -> tuple[str, str]:
    """A row's folder as a run leaves it: a probe and a run, each with artifacts, a checkpoint, a record, logs."""
    probe_run, run = "a" * 32, "b" * 32
    for run_id in (probe_run, run):
        (home / "mlruns" / "1" / run_id / "artifacts").mkdir(parents=True)
        (home / "mlruns" / "1" / run_id / "artifacts" / "model.bin").write_bytes(b"w" * 1000)
    (home / "checkpoints").mkdir()
    (home / "checkpoints" / "last.pt").write_bytes(b"c")
    with sqlite3.connect(home / "probe.db") as con:
        con.execute("create table runs (run_uuid text)")
        con.execute("insert into runs values (?)", (probe_run,))
        con.execute("create table metrics (key text, value real, step integer)")
        con.executemany("insert into metrics values ('system/epoch_time', ?, ?)", [(9.0, 1), (2.0, 2), (2.2, 3)])
    real = json.loads((REPO / "benchmarks" / "results" / "anchors.json").read_text())["iwae-5"]
    record = {**real, "value": 87.5, "train_seconds": 30.0, "wall_seconds": 33.0, "epochs_run": 3,
              "git_commit": "0" * 40 + "-dirty"}
    (home / "probe.log").write_text("a warning {not json}\n" + json.dumps(record, indent=2) + "\n")
    (home / "results").mkdir()
    (home / "results" / "anchors.json").write_text(json.dumps({"iwae-5": record}))
    return probe_run, run


def test_the_probe_gives_speed_fixed_cost_and_measurement(tmp_path):
    make_row(tmp_path / "iwae-5")
    figures = device.probe_figures(device.Row("iwae-5", tmp_path / "iwae-5"))
    assert figures["epoch"] == 2.2  # the median after the first epoch (CUDA's warm-up)
    assert figures["fixed"] == 30.0 - (9.0 + 2.0 + 2.2)
    assert figures["measure"] == 3.0 * device.TEST_IMAGES / device.PROBE_IMAGES


def test_the_archive_leaves_out_checkpoints_and_the_probes_artifacts(tmp_path):
    home = tmp_path / "iwae-5"
    probe_run, run = make_row(home)
    row = device.Row("iwae-5", home)
    assert device.archive(row, tmp_path / "with.tgz", artifacts=True)
    names = tarfile.open(tmp_path / "with.tgz").getnames()
    assert f"iwae-5/mlruns/1/{run}/artifacts/model.bin" in names and "iwae-5/results/anchors.json" in names
    assert not any(probe_run in name or "checkpoints" in name for name in names)
    assert device.archive(row, tmp_path / "without.tgz", artifacts=False)
    assert not any("mlruns" in name for name in tarfile.open(tmp_path / "without.tgz").getnames())


def test_merge_records_the_sent_commit_not_the_machines_stale_one(tmp_path, monkeypatch):
    home = tmp_path / "rows" / "iwae-5"
    home.mkdir(parents=True)
    make_row(home)
    device.archive(device.Row("iwae-5", home), tmp_path / "iwae-5.tgz", artifacts=False)
    monkeypatch.setattr(anchors, "RESULTS", tmp_path / "results")  # not the repository's results or README
    result = CliRunner().invoke(device.cli, ["merge", str(tmp_path / "iwae-5.tgz"), "--commit", "f" * 40,
                                             "--into", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "results" / "anchors.json").read_text())["iwae-5"]
    assert merged["git_commit"] == "f" * 40 and merged["value"] == 87.5
    assert "iwae-5: 87.50" in result.output
