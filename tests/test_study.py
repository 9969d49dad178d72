"""`aetrack study`: a lesson's question trained over seeds, evaluated, compared, resumable; and the image cadence
that keeps long runs' step sliders usable."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from aetrack import data as datasets
from aetrack.cli import main
from aetrack.config import TrackingOptions, TrainConfig
from aetrack.tracking.workflows.studies import STUDIES
from aetrack.tracking.run import IMAGE_STEPS, image_epochs, train_tracked

TINY = "epochs=2,hidden=32,latent_dim=4,batch_size=256"
ONE_DAE = "arch=mlp,noise=gaussian,noise_level=0.3"  # and the ae of the same architecture, its baseline


def study(*args: str):
    return CliRunner().invoke(main, ["study", *args])


def test_list_shows_every_study_and_its_grid():
    result = study("--list", "--seeds", "2")
    assert result.exit_code == 0
    for name, entry in STUDIES.items():
        assert f"{name}: {entry.question}" in result.output
        assert f"trains {len(entry.grid)} settings x 2 seeds = {2 * len(entry.grid)} runs" in result.output
    assert "model=vae;prior=vamp;latent_dim=2" in result.output
    assert re.search(r"last measured: digits \d+ min", result.output)  # from benchmarks/results/questions/


@pytest.mark.parametrize("args,message", [
    (["nonsense"], "unknown study 'nonsense'"),
    (["priors", "--set", "model=ae"], "a study chooses these itself"),
    (["priors", "--set", "noise_level=0.5"], "no model of study priors takes it"),
    (["priors", "--set", "latent_dim=0"], "--latent-dim must be at least 1"),
    (["priors", "--set", "epochs=many"], "--set"),
    (["denoising", "--only", "arch=rnn"], "--only arch=rnn: no setting of study denoising matches"),
    (["denoising", "--only", "colour=red"], "--only: expects NAME=VALUE with NAME a training option, got 'colour=red'"),
    (["denoising", "--workers", "0"], "--workers"),
    (["denoising", "--storage", "redis://host/0"], "--storage 'redis://host/0': give an SQLAlchemy URL"),
])
def test_bad_study_options_are_one_line_errors(args, message):
    result = study(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_latent_size_pairs_architectures_of_matching_size_on_digits():
    from aetrack.models import build_model

    sizes = {}
    for setting in STUDIES["latent-size"].grid:
        model = build_model(TrainConfig(**setting), (1, 8, 8), 10)
        sizes[(setting["model"], setting["latent_dim"], setting["arch"])] = sum(p.numel() for p in model.parameters())
    for (model, latent, arch), count in sizes.items():
        if arch == "mlp":
            assert abs(count / sizes[(model, latent, "conv")] - 1) < 0.1, sizes


def test_every_dae_is_scored_against_the_ae_of_its_architecture_and_trained_after_it():
    denoising = STUDIES["denoising"]
    daes = [s for s in denoising.grid if s["model"] == "dae"]
    assert {(s["noise"], s["noise_level"]) for s in daes} == {(k, v) for k in ("gaussian", "masking", "salt-pepper")
                                                             for v in (0.1, 0.3, 0.5)}
    order = [denoising.grid[i] for i in denoising.order()]
    for setting in daes:
        baseline = denoising.baseline_of(setting)
        assert baseline["model"] == "ae" and baseline["arch"] == setting["arch"] and baseline["hidden"] == setting["hidden"]
        assert order.index(baseline) < order.index(setting)
    part = denoising.restricted({"arch": "conv", "noise": "masking"})
    assert [s["model"] for s in part.grid] == ["ae", "dae", "dae", "dae"] and part.grid[0]["arch"] == "conv"
    # M1+M2 names the vae run of its seed, which comes first
    conditional = STUDIES["conditional"]
    assert conditional.needs(conditional.grid[-1]) == [{"model": "vae"}]


def test_the_strengths_table_ranks_each_setting_by_the_studys_directions():
    from aetrack.tracking.workflows.studies import Cell, StudyResult

    regularised = STUDIES["regularised"]
    cells = [Cell(s, ["run"], [{"recon_loss": float(i), "probe_accuracy": float(i)}]) for i, s in enumerate(regularised.grid)]
    table = StudyResult(regularised, "digits", "x", cells).as_dict()["strengths"]
    assert table[0]["strengths"] == ["recon_loss"] and table[0]["weaknesses"] == ["probe_accuracy"]
    assert table[-1]["strengths"] == ["probe_accuracy"] and table[-1]["weaknesses"] == ["recon_loss"]
    assert table[len(table) // 2] == {"setting": table[len(table) // 2]["setting"], "strengths": [], "weaknesses": []}


def training_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([found.experiment_id]) if r.data.tags.get("aetrack.kind") != "comparison"]


@pytest.mark.slow
def test_study_trains_evaluates_compares_and_resumes(tmp_path):
    result = study("denoising", "--seeds", "2", "--set", TINY, "--only", ONE_DAE, "--output", str(tmp_path / "report"))
    assert result.exit_code == 0, result.stderr
    # The table: one line per setting, mean ± spread over the two seeds, the dae scored against the ae baseline.
    dae_line = next(line for line in result.output.splitlines() if line.strip().startswith("dae"))
    assert dae_line.count("±") == 6 and dae_line.split()[-1] == "2"
    assert (tmp_path / "report" / "report.html").exists()

    client = MlflowClient()
    runs = training_runs(client, "study-denoising-digits")
    assert len(runs) == 4
    seeds = {(r.data.params["model"], TrainConfig.from_params(r.data.params).seed) for r in runs}  # seed 0: a default
    assert seeds == {("ae", 0), ("ae", 1), ("dae", 0), ("dae", 1)}
    for run in runs:
        assert run.info.status == "FINISHED" and "test/psnr" in run.data.metrics
        assert run.data.tags["aetrack.study"] == "denoising"
        if run.data.params["model"] == "dae":
            assert "test/psnr_baseline_at_0.3" in run.data.metrics
    report_id = re.search(r"report: run (\w+)", result.output).group(1)
    assert client.get_run(report_id).data.tags["aetrack.kind"] == "comparison"

    # Again, with a third seed: the four finished runs are reused, only seed 2 trains.
    again = study("denoising", "--seeds", "3", "--set", TINY, "--only", ONE_DAE)
    assert again.exit_code == 0, again.stderr
    assert again.stderr.count("training") == 2
    assert len(training_runs(client, "study-denoising-digits")) == 6


@pytest.mark.parametrize("epochs", [1, 10, 48, 49, 546, 5000])
def test_image_epochs_stay_within_the_cap(epochs):
    chosen = image_epochs(epochs)
    assert 1 in chosen and len(chosen) <= IMAGE_STEPS - 1
    assert max(chosen) <= epochs
    assert len(chosen) >= min(epochs, IMAGE_STEPS // 2)  # spread over the run, not bunched at its start


@pytest.mark.slow
def test_a_long_run_logs_each_image_key_at_most_fifty_times(tmp_path):
    data = datasets.load("digits")
    config = TrainConfig(model="vae", hidden=(16,), latent_dim=2, batch_size=1024, epochs=150, patience=0)
    result = train_tracked(config, data, TrackingOptions(checkpoint_dir=str(tmp_path / "ckpt"), register=False),
                           progress=False)
    steps: dict[str, set[int]] = {}
    for artifact in MlflowClient().list_artifacts(result.run_id, "images"):
        parts = re.split("[%+]", artifact.path.rsplit("/", 1)[-1].replace("~", "/"))
        if artifact.path.endswith(".png") and "compressed" not in artifact.path:
            steps.setdefault(parts[0], set()).add(int(parts[2]))
    for key in ("progress/reconstructions", "progress/samples"):
        assert {0, 1, result.history.best_epoch} <= steps[key]
        assert 30 <= len(steps[key]) <= IMAGE_STEPS
