"""`aetrack compare`: the report holds every selected run, its plots group runs the right way, and it is
logged, self-contained, to a comparison run (against a real MLflow server)."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from PIL import Image

from aetrack.tracking.reports import compare, figures
from aetrack.cli import main
from aetrack.config import TrainConfig


@pytest.fixture(autouse=True)
def _tracking_uri_from_env():
    """In-process commands set MLflow's tracking URI globally: start from conftest's isolated one, leave none behind."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield
    mlflow.set_tracking_uri(None)


def picture(level: int) -> Image.Image:
    return Image.fromarray(np.full((20, 20, 3), level, dtype=np.uint8))


def log_run(client, experiment_id: str, name: str, *, model: str, latent_dim: int, seed: int = 0, metrics=None,
            status: str = "FINISHED", kind: str | None = None, training_samples=(), evaluation_samples=None) -> str:
    """A run as `aetrack train` (+ `evaluate`) leaves it: params, test metrics, sample images."""
    run_id = client.create_run(experiment_id, run_name=name, tags={"aetrack.kind": kind} if kind else {}).info.run_id
    params = TrainConfig(model=model, latent_dim=latent_dim, seed=seed).to_params()
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()])
    for step, level in training_samples:
        client.log_image(run_id, picture(level), key="progress/samples", step=step)
    if evaluation_samples is not None:
        client.log_image(run_id, picture(evaluation_samples), artifact_file="evaluation/samples.png")
    client.set_terminated(run_id, status)
    return run_id


def grid_of_runs(client, experiment: str, seeds=(0,)) -> dict[str, str]:
    """ae and vae at latent sizes 2, 4 and 16 (for each seed), plus runs compare must leave out."""
    experiment_id = client.create_experiment(experiment)
    ids = {}
    for model in ("ae", "vae"):
        for latent in (2, 4, 16):
            for seed in seeds:
                metrics = {"test/mse": 0.1 / latent + (0.01 if model == "ae" else 0.0) + 0.001 * seed, "test/fcd": 10.0 * latent}
                ids[f"{model}-{latent}-{seed}"] = log_run(client, experiment_id, f"{model}-{latent}-{seed}", model=model,
                                                          latent_dim=latent, seed=seed, metrics=metrics,
                                                          training_samples=[(1, 0), (2, 255)])
    log_run(client, experiment_id, "crashed", model="vae", latent_dim=8, status="FAILED")
    log_run(client, experiment_id, "old-report", model="vae", latent_dim=8, kind="comparison")
    return ids


def table_run_ids(html_text: str) -> list[str]:
    return re.findall(r"<td class='text id'>([0-9a-f]{32})</td>", html_text)


def test_report_holds_every_selected_run_and_is_logged_self_contained(mlflow_server, tmp_path):
    client = mlflow.MlflowClient(mlflow_server)
    ids = grid_of_runs(client, "compare-e2e")
    result = CliRunner().invoke(main, ["compare", "--experiment", "compare-e2e", "--by", "latent_dim",
                                       "--tracking-uri", mlflow_server, "--output", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    experiment_id = client.get_experiment_by_name("compare-e2e").experiment_id
    # The report goes to its own experiment: the training runs' table and charts stay free of it.
    assert not client.search_runs([experiment_id], "attributes.run_name = 'comparison'")
    home = client.get_experiment_by_name("compare-e2e-comparisons")
    assert "compare-e2e" in home.tags["mlflow.note.content"]
    reports = client.search_runs([home.experiment_id], "tags.`aetrack.kind` = 'comparison' and attributes.run_name = 'comparison'")
    assert len(reports) == 1 and reports[0].data.tags["compared_experiment"] == experiment_id
    report_run = reports[0].info.run_id
    assert set(reports[0].data.tags["compared_runs"].split(",")) == set(ids.values())

    logged = {a.path for a in client.list_artifacts(report_run, "comparison")}
    assert {"comparison/report.html", "comparison/report.md", "comparison/images"} <= logged
    html_text = Path(client.download_artifacts(report_run, "comparison/report.html", str(tmp_path / "dl"))).read_text()
    assert sorted(table_run_ids(html_text)) == sorted(ids.values())  # every run once; the failed and the old report left out
    assert "<td class='text'>mse</td><td class='text'>lower is better</td>" in html_text and "<td class='text'>fcd</td>" in html_text
    assert "latent_dim" in html_text and "max-width:1100px" in html_text
    # Self-contained: every picture is inline and decodes; one figure per group of metrics (mse: reconstruction,
    # fcd: generation) against latent_dim, and a sample grid per run (these runs logged no loss curves).
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html_text)
    assert len(sources) == 2 + len(ids) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert html_text.index("Reconstruction metrics against latent_dim") < html_text.index("<h2>Samples")
    for source in sources:
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()

    markdown = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if re.match(r"^\| \d+ \| \S+ \| [0-9a-f]{32} \|", line)]
    assert len(rows) == len(ids)
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (tmp_path / "report" / link).is_file()


@pytest.mark.slow
def test_runs_and_metric_options_narrow_the_report(tmp_path):
    client = mlflow.MlflowClient()
    ids = grid_of_runs(client, "narrow")
    chosen = [ids["ae-2-0"], ids["vae-16-0"], ids["vae-4-0"]]
    result = CliRunner().invoke(main, ["compare", "--experiment", "narrow", "--runs", ",".join(chosen[:2]), "--runs", chosen[2],
                                       "--metric", "fcd", "--no-log", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    html_text = (tmp_path / "report.html").read_text()
    assert table_run_ids(html_text) == chosen
    assert "<td class='text'>fcd</td>" in html_text and "<td class='text'>mse</td>" not in html_text
    assert client.get_experiment_by_name("narrow-comparisons") is None  # --no-log added no report


def test_series_has_one_line_per_other_setting_in_numeric_order_with_seeds_averaged():
    rows = [compare.Row(f"r{i}", f"r{i}", {"model": model, "latent_dim": str(latent), "seed": str(seed)},
                        {"test/mse": latent + (100 if model == "vae" else 0) + seed})
            for i, (model, latent, seed) in enumerate((m, d, s) for m in ("ae", "vae") for d in (16, 2, 4) for s in (0, 1))]
    lines = compare.series(rows, "test/mse", "latent_dim", ["model", "seed"])
    assert set(lines) == {"model=ae", "model=vae"}
    assert [(x, mean, n) for x, mean, _, n in lines["model=ae"]] == [("2", 2.5, 2), ("4", 4.5, 2), ("16", 16.5, 2)]
    assert [mean for _, mean, _, _ in lines["model=vae"]] == [102.5, 104.5, 116.5]
    assert all(spread == 0.5 for _, _, spread, _ in lines["model=vae"])


@pytest.mark.slow
def test_sample_grid_prefers_the_evaluation_grid_then_the_last_training_one():
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("grids")
    trained = log_run(client, experiment_id, "t", model="vae", latent_dim=2, training_samples=[(3, 255), (1, 0), (2, 60)])
    evaluated = log_run(client, experiment_id, "e", model="vae", latent_dim=2, training_samples=[(1, 0)], evaluation_samples=128)
    bare = log_run(client, experiment_id, "b", model="ae", latent_dim=2)
    assert compare.sample_grid(client, trained).getpixel((5, 5)) == (255, 255, 255)
    assert compare.sample_grid(client, evaluated).getpixel((5, 5)) == (128, 128, 128)
    assert compare.sample_grid(client, bare) is None


@pytest.mark.slow
def test_bad_options_are_one_line_usage_errors(tmp_path):
    client = mlflow.MlflowClient()
    grid_of_runs(client, "bad")
    runner = CliRunner()
    for args, message in ((["--by", "colour"], "--by colour: not a param"), (["--metric", "nope"], "--metric test/nope"),
                          (["--runs", "f" * 32], "not found")):
        result = runner.invoke(main, ["compare", "--experiment", "bad", "--no-log", "--output", str(tmp_path), *args])
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
        assert message in result.output
    result = runner.invoke(main, ["compare", "--experiment", "missing"])
    assert result.exit_code == 2 and "no experiment named 'missing'" in result.output


@pytest.mark.slow
def test_a_tuning_studys_parent_run_is_not_compared_as_a_training_run(tmp_path):
    """`aetrack tune` leaves a parent run with a `model` param beside its trials' runs: only the trials are
    training runs. (The parent was tagged aetrack_role=study while compare skipped by aetrack.kind.)"""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tuned = CliRunner().invoke(main, ["tune", "--model", "ae", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                                      "--n-trials", "1", "--param", "lr=float:1e-3:1e-2:log", "--no-register", "--quiet",
                                      "--threads", "1", "--storage", f"sqlite:///{tmp_path}/optuna.db",
                                      "--tracking-uri", uri, "--experiment", "tuned"])
    assert tuned.exit_code == 0, tuned.output
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("tuned").experiment_id
    [parent] = client.search_runs([experiment_id], "tags.aetrack_role = 'study'")
    [trial] = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and "model" in parent.data.params  # what made compare take it

    result = CliRunner().invoke(main, ["compare", "--experiment", "tuned", "--tracking-uri", uri, "--no-log",
                                       "--output", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert table_run_ids((tmp_path / "report" / "report.html").read_text()) == [trial.info.run_id]


@pytest.mark.slow
def test_unevaluated_runs_are_named_bars_only_compare_several_runs_and_each_metric_says_which_way_is_better(tmp_path):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("mixed")
    evaluated = [log_run(client, experiment_id, f"vae-{i}", model="vae", latent_dim=2 + i,
                         metrics={"test/fcd": 10.0 + i, "test/probe_accuracy": 0.5 + i / 10}) for i in range(2)]
    log_run(client, experiment_id, "lonely", model="ae", latent_dim=2, metrics={"test/fraction_near_zero": 0.3})
    log_run(client, experiment_id, "never-evaluated", model="ae", latent_dim=4)
    report = compare.build_report(client.search_runs([experiment_id]), client=client)
    assert [row.evaluated for row in report.rows].count(False) == 1
    # fcd and probe accuracy have two runs each: bars; fraction_near_zero only one: in the table, no bar chart.
    assert set(report.plots) == {"generation", "representation"}
    header, body, best = compare.metrics_table(report)
    row = {cells[0]: (cells, marks) for cells, marks in zip(body, best)}
    assert row["fcd"][0][1] == "lower is better" and row["probe_accuracy"][0][1] == "higher is better"
    assert row["fraction_near_zero"][0][1] == ""
    fcd_cells, fcd_best = row["fcd"]
    assert [c for c, b in zip(fcd_cells, fcd_best) if b] == ["10"]  # the lower FCD is the better one
    compare.write_html(report, "mixed", tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert "1 not evaluated" in text and "never-evaluated" in text and "<td class='missing'>not evaluated</td>" in text
    assert len(evaluated) == 2


def log_history(client, run_id: str, histories: dict[str, list[float]]) -> None:
    client.log_batch(run_id, metrics=[Metric(key, value, 0, epoch) for key, values in histories.items()
                                      for epoch, value in enumerate(values, 1)])


@pytest.mark.slow
def test_the_runs_table_keeps_five_columns_however_many_settings_differ(tmp_path):
    """One column per differing param made the table wider than a laptop screen, which cut off the red "not
    evaluated" column; the summary showed Markdown's backticks in the HTML."""
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("wide")
    settings = [dict(model="vae", hidden=(512, 256), latent_dim=16, epochs=546, prior="vamp", beta=4.0),
                dict(model="cvae", latent_dim=8, epochs=30, lr=3e-4, batch_size=64),
                dict(model="ae", epochs=30, hidden=(1024, 512, 256), likelihood="gaussian")]
    for i, values in enumerate(settings):
        run_id = client.create_run(experiment_id, run_name=f"run-{i}").info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in TrainConfig(**values).to_params().items()],
                         metrics=[Metric("test/fcd", 10.0 + i, 0, 0)] if i != 1 else [])
        client.set_terminated(run_id)
    report = compare.build_report(client.search_runs([experiment_id], order_by=["attributes.start_time ASC"]))
    assert len(report.varying) >= 6
    header, body = compare.runs_table(report)
    assert header == ["#", "run", "run id", "settings that differ", "test metrics"]
    vae, cvae, ae = (cells[3].split(", ") for cells in body)
    assert vae[0] == "model=vae" and {"beta=4.0", "prior=vamp", "hidden=512,256", "epochs=546"} <= set(vae)
    assert "lr=0.0003" in cvae and "batch_size=64" in cvae
    assert "likelihood=gaussian" in ae and not any(item.startswith(("beta=", "prior=")) for item in ae)  # not an ae's
    assert [cells[-1] for cells in body] == ["1", "not evaluated", "1"]

    text = compare.write_html(report, "wide", tmp_path).read_text()
    assert "<code>aetrack evaluate RUN_ID</code>" in text and "`" not in text
    assert text.count("<span class='setting'>beta=4.0</span>") == 1  # each name=value whole; the cell wraps between


@pytest.mark.slow
def test_loss_curves_draw_only_comparable_losses_together():
    """A VAE's -ELBO, a CVAE's -log p(x|y) bound and an AE's reconstruction loss (each run's loss/val) shared one
    "lower is better" axis, where the AE looked best. Now: the reconstruction term of every model on one panel, and
    each kind of bound on its own."""
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("curves")
    ids = {}
    for model in ("vae", "cvae", "ae"):
        ids[model] = log_run(client, experiment_id, model, model=model, latent_dim=2)
        parts = {"val/recon_loss": [30.0, 28.0, 27.0]}
        if model != "ae":
            parts.update({"val/neg_elbo": [33.0, 31.0, 30.0], "val/kl": [3.0, 3.0, 3.0]})
        log_history(client, ids[model], {"loss/val": parts.get("val/neg_elbo", parts["val/recon_loss"]), **parts})
    report = compare.build_report(client.search_runs([experiment_id], order_by=["attributes.start_time ASC"]))
    panels = figures.loss_panels(client, report.rows)
    drawn = {(metric, title.splitlines()[0]): sorted(row.name for row, _ in lines)
             for (metric, title), lines in panels.items()}
    assert drawn == {("val/recon_loss", "reconstruction term −log p(x|z)"): ["ae", "cvae", "vae"],
                     ("val/neg_elbo", "−ELBO, a bound on −log p(x)"): ["vae"],
                     ("val/neg_elbo", "conditional −ELBO, a bound on −log p(x|y)"): ["cvae"]}
    assert all(history == [(1, 30.0), (2, 28.0), (3, 27.0)] for _, history in panels[next(iter(panels))])
    picture = figures.loss_curves(client, report.rows)
    assert picture.width > 2.5 * picture.height  # the three panels side by side, one row


def test_the_comparisons_experiment_made_by_another_process_in_between_is_found_not_an_error(tmp_path):
    """Workers on several hosts finish a study together: each looks for `<experiment>-comparisons`, finds none, and
    all but one then lose the race to create it."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("race")
    theirs = client.create_experiment("race-comparisons")  # the other host's, made after this one looked

    class LookedTooEarly:
        def __init__(self, client):
            self.client, self.looked = client, False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return self.client.get_experiment_by_name(name)

        def __getattr__(self, name):
            return getattr(self.client, name)

    assert compare.comparison_experiment(LookedTooEarly(client), experiment_id) == theirs
    assert compare.comparison_experiment(client, experiment_id) == theirs
