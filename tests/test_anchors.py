"""benchmarks/anchors.py: the published protocols' runner, its records, and the docs' table rebuilt from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from aetrack.training import History

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import anchors  # noqa: E402
from anchors import main as anchors_main  # noqa: E402

DATA = os.environ.get("AETRACK_TEST_DATA_DIR")


def first_leg(command: list[str], env: dict, checkpoints: Path) -> str:
    """`command` ended as --leg-minutes ends a leg (SIGTERM) once it has saved a checkpoint; its stderr."""
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*/last.pt")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)  # what --leg-minutes does at the end of a leg
    _, err = first.communicate(timeout=120)
    assert first.returncode == 3, err
    return err


def test_the_docs_table_is_the_one_anchors_json_gives():
    import render_docs

    results = json.loads((REPO / "benchmarks" / "results" / "anchors.json").read_text())
    page = (REPO / "docs" / "anchors.md").read_text()
    assert "<!-- render: anchors-table -->" in page
    assert render_docs.render(page) == page, "docs/anchors.md and anchors.json differ: python benchmarks/anchors.py --rebuild"
    assert (REPO / "benchmarks" / "results" / "anchors.md").read_text() == anchors.markdown(results)
    keys = {*anchors.PROTOCOLS, *(f"{row}@published" for row in anchors.PROTOCOLS)}
    assert set(results) <= keys | {anchors.on_paper_m1(key) for key in keys if key.startswith("m1m2-100")}


def test_every_row_of_the_issue_has_a_protocol():
    assert {"pytorch-example", "burda-vae", "best-one-layer", "iwae-5", "iwae-50", "vampprior-static", "m2-100",
            "m1m2-100"} <= set(anchors.PROTOCOLS)
    assert anchors.PROTOCOLS["m1m2-100"].config.features == anchors.M1_FROM_ROW
    assert anchors.PROTOCOLS["iwae-50"].config.train_samples == 50
    for k in (5, 50):  # aetrack's recipe for the IWAE rows is the VAE row's, with their objective
        assert anchors.PROTOCOLS[f"iwae-{k}"].best == replace(anchors.BURDA_BEST, objective="iwae", train_samples=k)
        assert anchors.PROTOCOLS[f"iwae-{k}"].config.lr_schedule == "burda"  # --recipe published: Burda's


def test_the_two_layer_rows_are_the_one_layer_rows_with_a_second_stochastic_layer():
    two_layers = {"model": "hvae", "first_latent_dim": 100, "latent_hidden": (100, 100)}
    vae, iwae = anchors.PROTOCOLS["burda-hvae"], anchors.PROTOCOLS["hvae-iwae-5"]
    assert vae.config == replace(anchors.BURDA_MLP, **two_layers) and vae.best == replace(anchors.BURDA_BEST, **two_layers)
    assert iwae.config == replace(vae.config, objective="iwae", train_samples=5)
    assert iwae.best == replace(vae.best, objective="iwae", train_samples=5)
    assert (vae.target, iwae.target) == (85.33, 83.89)  # Burda et al. 2015, table 1, two stochastic layers
    assert vae.config.epochs == iwae.config.epochs == 3280 and vae.iw_samples == iwae.iw_samples == 5000


def test_a_row_without_a_record_is_listed_as_not_yet_run():
    table = anchors.body({})
    for row in anchors.PROTOCOLS:
        assert f"| {row} |" in table and f"`python benchmarks/anchors.py {row}`" in table
    assert table.count("not yet run |") == len(anchors.PROTOCOLS)


def test_the_curve_is_continued_by_the_power_law_it_follows():
    law = lambda t: 80 + 40 * t ** -0.6  # noqa: E731
    history = History(epochs=[{"val_loss": law(t)} for t in range(1, 61)])
    curve = anchors.learning_curve(history, "nll_iw", warmup=0)
    assert curve["fit"]["epochs"] == [31, 60] and curve["fit"]["rmse"] < 1e-3
    record = {"value": 90.0, "epochs_run": 60, "epochs_published": 3280, "curve": curve}
    assert anchors.projected(record) == pytest.approx(90.0 + law(3280) - law(60), abs=0.05)
    assert anchors.projected({**record, "epochs_published": 60}) is None  # nothing to continue
    short = anchors.learning_curve(History(epochs=[{"val_loss": 1.0}] * 10), "nll_iw", warmup=0)
    assert "fit" not in short  # too few epochs to fit anything: no projection is made up


def test_a_classifier_row_follows_its_validation_error_in_percent():
    history = History(epochs=[{"val_loss": 5.0, "val_error": 0.5 / t} for t in range(1, 21)])
    curve = anchors.learning_curve(history, "error", warmup=0)
    assert curve["key"] == "val_error" and curve["values"][0] == 50.0


def test_the_recorded_command_names_no_local_place():
    assert anchors.portable(["m2-100", "--epochs", "3", "--checkpoint-dir", "/tmp/x", "--tracking-uri=sqlite:///a",
                             "--data-dir", "/d", "--leg-minutes", "6.5"]) == ["m2-100", "--epochs", "3"]


@pytest.mark.skipif(not DATA, reason="set AETRACK_TEST_DATA_DIR to the folder that holds MNIST/")
def test_m1m2_row_runs_in_two_legs_on_a_logged_vae(tmp_path):
    """M1 from a run; M2 on its codes stopped after its first epoch (as a leg's end is), resumed, measured, recorded."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "AETRACK_DATA_DIR": DATA,
           "AETRACK_ANCHORS_RESULTS": str(tmp_path / "results")}
    m1 = subprocess.run([sys.executable, "-m", "aetrack", "train", "--model", "vae", "--dataset", "mnist",
                         "--binarize", "dynamic", "--hidden", "32", "--latent-dim", "4", "--epochs", "1", "--quiet",
                         "--no-register", "--checkpoint-dir", str(tmp_path / "ckpt")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert m1.returncode == 0, m1.stderr
    m1_run = next(line.split()[-1] for line in m1.stdout.splitlines() if line.startswith("run id:"))
    row = [sys.executable, str(REPO / "benchmarks" / "anchors.py"), "m1m2-100", "--features", m1_run,
           "--epochs", "3", "--set", "hidden=32,latent_dim=4,batch_size=500", "--checkpoint-dir", str(tmp_path / "ckpt")]
    err = first_leg(row, env, tmp_path / "ckpt")
    assert "continue with: python benchmarks/anchors.py m1m2-100 --resume" in err
    progress = json.loads((tmp_path / "results" / "anchors-progress.json").read_text())
    assert 1 <= progress["m1m2-100"]["epoch"] < 3

    second = subprocess.run([sys.executable, str(REPO / "benchmarks" / "anchors.py"), "m1m2-100", "--resume",
                             "--checkpoint-dir", str(tmp_path / "ckpt")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "Downloading artifacts" not in second.stderr  # MLflow's progress bars stay out of a runner's log
    record = json.loads((tmp_path / "results" / "anchors.json").read_text())["m1m2-100"]
    assert record["legs"] == 2 and record["epochs_run"] == 3 and record["run_id"] == progress["m1m2-100"]["run_id"]
    assert record["features"] == m1_run and record["metric"] == "error" and 0 <= record["value"] <= 100
    m1 = record["m1"]  # what the M1 was, read from its run: the row's table says it
    assert (m1["run_id"], m1["hidden"], m1["latent_dim"], m1["epochs_run"], m1["paper_m1"]) == (m1_run, "32", "4", 1, False)
    assert "M1 784-32-4 " in (tmp_path / "results" / "anchors.md").read_text()
    assert len(record["curve"]["values"]) == 3 and "--set" in record["command"]
    assert not (tmp_path / "results" / "anchors-progress.json").exists()
    assert "m1m2-100" in (tmp_path / "results" / "anchors.md").read_text()


@pytest.mark.skipif(not DATA, reason="set AETRACK_TEST_DATA_DIR to the folder that holds MNIST/")
def test_a_stopped_row_can_be_finished_where_it_stopped_and_is_measured_saying_so(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "AETRACK_DATA_DIR": DATA,
           "AETRACK_ANCHORS_RESULTS": str(tmp_path / "results")}
    anchors = [sys.executable, str(REPO / "benchmarks" / "anchors.py"), "pytorch-example"]
    refused = CliRunner().invoke(anchors_main, ["pytorch-example", "--finish"])  # in process: no torch import to wait for
    assert refused.exit_code == 2 and "--finish ends a stopped run: pass it with --resume" in refused.output
    first_leg([*anchors, "--epochs", "50", "--set", "hidden=16,batch_size=1000", "--checkpoint-dir", str(tmp_path / "ckpt")],
              env, tmp_path / "ckpt")
    stopped = json.loads((tmp_path / "results" / "anchors-progress.json").read_text())["pytorch-example"]["epoch"]

    finished = subprocess.run([*anchors, "--resume", "--finish", "--test-images", "500", "--checkpoint-dir", str(tmp_path / "ckpt")],
                              env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    record = json.loads((tmp_path / "results" / "anchors.json").read_text())["pytorch-example"]
    assert 1 <= stopped < 50 and record["epochs_run"] == stopped and record["legs"] == 2
    assert record["note"] == f"ended with --finish after epoch {stopped} of the 50 its schedule was planned for"
    assert record["value"] > 0 and "--epochs 50" in record["command"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert mlflow.get_run(record["run_id"]).info.status == "FINISHED"
    assert f"ended with --finish after epoch {stopped}" in (tmp_path / "results" / "anchors.md").read_text()


@pytest.mark.skipif(not DATA, reason="set AETRACK_TEST_DATA_DIR to the folder that holds MNIST/")
def test_an_m2_recipe_is_swept_in_legs_and_read_on_the_validation_split_only(tmp_path):
    """benchmarks/m2_sweep.py: a leg ended as --leg-minutes ends it, the next one resumed; the record holds both legs,
    the validation curve of every epoch, and the run measured nothing on the test set."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "AETRACK_DATA_DIR": DATA,
           "AETRACK_ANCHORS_RESULTS": str(tmp_path / "results")}
    sweep = [sys.executable, str(REPO / "benchmarks" / "m2_sweep.py"), "pyro", "--checkpoint-dir", str(tmp_path / "ckpt")]
    err = first_leg([*sweep, "--epochs", "3", "--set", "hidden=16,latent_dim=4,batch_size=1000"], env, tmp_path / "ckpt")
    assert "continue with: python benchmarks/m2_sweep.py pyro --resume" in err
    stopped = json.loads((tmp_path / "results" / "m2-sweep.json").read_text())["pyro"]
    assert not stopped["complete"] and len(stopped["legs"]) == 1 and 1 <= stopped["epochs_run"] < 3

    second = subprocess.run([*sweep, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    record = json.loads((tmp_path / "results" / "m2-sweep.json").read_text())["pyro"]
    assert record["complete"] and record["run_id"] == stopped["run_id"] and len(record["legs"]) == 2
    assert record["legs"][0] == stopped["legs"][0] and record["legs"][1]["epochs_to"] == 3
    assert len(record["curve"]) == record["epochs_run"] == 3 and record["curve"][:len(stopped["curve"])] == stopped["curve"]
    assert record["val_error_last"] == record["curve"][-1] and record["val_error_best"] == min(record["curve"])
    assert record["settings"]["classifier_weight"] == "0.46" and record["settings"]["hidden"] == "16"
    assert record["command"] == ("python benchmarks/m2_sweep.py pyro --epochs 3 "
                                 "--set hidden=16,latent_dim=4,batch_size=1000")  # no local place in it
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    metrics = mlflow.get_run(record["run_id"]).data.metrics
    assert "val/error" in metrics and not [name for name in metrics if name.startswith("test/")]


def test_a_sweep_leg_recorded_in_the_repository_must_run_committed_code(monkeypatch):
    import m2_sweep

    import aetrack.tracking.run

    monkeypatch.setattr(aetrack.tracking.run, "git_commit", lambda: "0c5ee05-dirty")
    monkeypatch.setattr(m2_sweep, "RESULTS", m2_sweep.DEFAULT_RESULTS)
    refused = CliRunner().invoke(m2_sweep.main, ["pyro"])
    assert refused.exit_code == 2 and "the code differs from its commit (0c5ee05-dirty)" in refused.output
    monkeypatch.setattr(m2_sweep, "RESULTS", Path("elsewhere"))  # a scratch record may come from any code
    refused = CliRunner().invoke(m2_sweep.main, ["pyro", "--resume"])
    assert refused.exit_code == 2 and "pyro: no stopped run to resume" in refused.output


def test_the_m2_sweep_table_names_the_recipe_lowest_on_validation_and_the_legs_still_to_run(tmp_path, monkeypatch):
    import render_docs

    (tmp_path / "anchors.json").write_text((anchors.DEFAULT_RESULTS / "anchors.json").read_text())
    row = json.loads((tmp_path / "anchors.json").read_text())["m2-100"]["curve"]["values"][-1]

    def recipe(name, last, epochs, planned):
        curve = [30.0] * (epochs - 1) + [last]
        return {"recipe": name, "complete": epochs == planned, "epochs_run": epochs, "epochs_planned": planned,
                "val_error_last": last, "val_error_best": last, "best_epoch": epochs, "val_error_last_10_mean": 25.0,
                "curve": curve, "legs": [{"git_commit": "abcdef0123", "epochs_to": epochs, "seconds": 600.0}],
                "command": f"python benchmarks/m2_sweep.py {name}"}

    def block(pyro: float) -> str:
        records = {"pyro": recipe("pyro", pyro, 50, 50), "classifier-0.001": recipe("classifier-0.001", row + 1, 150, 150),
                   "constant-1000": recipe("constant-1000", 20.0, 200, 1000)}
        (tmp_path / "m2-sweep.json").write_text(json.dumps(records))
        return render_docs.block_anchors_m2_sweep()

    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    text = block(pyro=row - 2)
    assert f"**pyro** reads lowest on validation at its last epoch ({row - 2:.2f} %, against {row:.2f} % for the " \
           "m2-100 row's recipe): its test figure is measured next" in text
    assert "`constant-1000` has run 200 of its 1000 epochs in 1 leg(s)" in text and "| 200 of 1000, stopped |" in text
    # each recipe's command beside what it changes, not in a table column (a wide column scrolls the table away)
    assert "- **constant-1000** (`python benchmarks/m2_sweep.py constant-1000`, then `--resume`):" in text
    assert all(line.count("|") == 8 for line in text.splitlines() if line.startswith("|"))
    assert "Still falling at its last epoch (its best): pyro, classifier-0.001;" in text
    text = block(pyro=row + 2)
    assert "**the m2-100 row's recipe** reads lowest" in text and "no recipe swept so far beats the row's own" in text


def test_an_m1m2_row_on_the_papers_m1_is_a_row_of_its_own_beside_the_smaller_m1s(tmp_path, monkeypatch):
    import render_docs

    assert anchors.on_paper_m1("m1m2-100") == "m1m2-100@paper-m1"
    assert anchors.on_paper_m1("m1m2-100@published") == "m1m2-100@published+paper-m1"
    assert anchors.order("m1m2-100@paper-m1")[0] == anchors.order("m1m2-100")[0]  # listed with its protocol
    assert anchors.resume_command("m1m2-100@paper-m1") == "python benchmarks/anchors.py m1m2-100 --resume"
    assert (anchors.resume_command("m1m2-100@published+paper-m1")
            == "python benchmarks/anchors.py m1m2-100 --recipe published --resume")
    results = json.loads((anchors.DEFAULT_RESULTS / "anchors.json").read_text())
    smaller = results["m1m2-100"]
    m1 = {"run_id": "a173b3fceb24491ca614a255db89cd49", "hidden": "600,600", "activation": "softplus",
          "latent_dim": "50", "lr": "0.003", "epochs_planned": "150", "epochs_run": 150, "best_val_loss": 91.5,
          "best_epoch": 149, "paper_m1": True}
    results["m1m2-100@paper-m1"] = {**smaller, "protocol": "m1m2-100@paper-m1", "value": smaller["value"] + 0.5, "m1": m1}
    (tmp_path / "anchors.json").write_text(json.dumps(results))
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    text = render_docs.block_anchors_m1m2()
    assert (f"**On the paper's M1.** The same recipe on M1 784-600-600-50 softplus (the paper's), 150 of 150 epochs, "
            f"best validation loss 91.50 nats (run a173b3fc) measured **{smaller['value'] + 0.5:.2f} %**") in text
    assert "0.50 points higher than on aetrack's smaller M1 above" in text
    table = anchors.body(results)
    assert "| m1m2-100@paper-m1 (aetrack's recipe) |" in table and "| m1m2-100 (aetrack's recipe) |" in table


def test_resume_finds_a_stopped_run_on_the_papers_m1_under_its_own_key(tmp_path, monkeypatch):
    monkeypatch.setattr(anchors, "PROGRESS", tmp_path / "anchors-progress.json")
    refused = CliRunner().invoke(anchors_main, ["m1m2-100", "--resume"])
    assert refused.exit_code == 2 and "m1m2-100: no stopped run to resume" in refused.output
    anchors.PROGRESS.write_text(json.dumps({"m1m2-100@paper-m1": {"run_id": "0" * 32, "legs": 1}}))
    opened = []
    monkeypatch.setattr(anchors, "open_checkpoint", lambda run_id, folder: opened.append(run_id) or 1 / 0)
    CliRunner().invoke(anchors_main, ["m1m2-100", "--resume"])
    assert opened == ["0" * 32]


def test_the_two_layer_paragraph_reads_each_row_from_its_record_or_says_how_to_run_it(tmp_path, monkeypatch):
    import types

    import render_docs

    results = json.loads((anchors.DEFAULT_RESULTS / "anchors.json").read_text())
    results.pop("burda-hvae", None), results.pop("hvae-iwae-5", None)
    losses = [90 + 20 * t ** -0.5 for t in range(1, 1001)]  # still falling at its end
    history = types.SimpleNamespace(epochs=[{"val_loss": v} for v in losses])
    results["burda-hvae"] = {**results["burda-vae"], "protocol": "burda-hvae", "row": "burda-hvae", "value": 86.10,
                             "epochs_run": 1000, "best_epoch": 1000, "train_seconds": 6000.0, "kl_warmup": 100,
                             "curve": anchors.learning_curve(history, "nll_iw", 100)}
    (tmp_path / "anchors.json").write_text(json.dumps(results))
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    text = render_docs.block_anchors_hvae()
    assert ("`burda-hvae` measured **86.10 nats** (all 10000 test images, K = 5000) after 1000 of the protocol's 3280 "
            "epochs, its cosine schedule and 100-epoch KL warm-up planned for those 1000") in text
    assert "6.0 s an epoch on 2 CPU cores, 1.7 h of training; target < 85.33: missed by 0.77)" in text
    assert f"fell {losses[-100] - losses[-1]:.2f} nats over the last 100 epochs, to {losses[-1]:.2f}" in text
    assert f"points to about {anchors.projected(results['burda-hvae']):.2f}, a projection only and an optimistic" in text
    gap = results["burda-vae"]["value"] - 86.10
    assert (f"`burda-vae` (aetrack's recipe), measured {results['burda-vae']['value']:.2f} after 3280 epochs: two "
            f"layers are {abs(gap):.2f} nats {'lower' if gap > 0 else 'higher'} after 1000.") in text
    assert "about 5 h of training at this pace" in text
    assert "`hvae-iwae-5` (IWAE k=5 83.89 nats; VAE 85.33) has no record yet" in text
