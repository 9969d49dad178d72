"""What a user sees in MLflow, without a browser: run names, descriptions, params that apply, metric names that
readers and the trainer agree on, and pictures large and labelled enough to read (tests/test_browser.py looks at
the same in a real browser)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from mlflow import MlflowClient

from aetrack import data as datasets
from aetrack import images
from aetrack.config import TrainConfig
from aetrack.evaluation import Settings
from aetrack.models import REGISTRY
from aetrack.tracking import artifacts, describe, registry
from aetrack.tracking import metric_names as names
from aetrack.tracking.workflows.evaluate import evaluate_run
from aetrack.tracking.run import resolved_tags, TrackingOptions, run_params, train_tracked
from aetrack.tracking.workflows.studies import STUDIES
from aetrack.tuning.space import available_metrics, default_metric
from conftest import STAND_IN_M1, stand_in_m1

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden=(16,), latent_dim=2, batch_size=256, epochs=2, patience=0)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


# ------------------------------------------------------------------------------------------------ run names

def test_run_names_say_what_the_run_is():
    assert describe.base_run_name(TrainConfig()) == "vae-normal-z8-digits"
    assert describe.base_run_name(TrainConfig(model="vae", prior="mog", beta=4.0)) == "vae-mog-b4-z8-digits"
    assert describe.base_run_name(TrainConfig(model="dae", noise="masking", noise_level=0.5)) == "dae-masking0.5-z8-digits"
    assert describe.base_run_name(TrainConfig(model="ae", arch="conv", latent_dim=16, dataset="mnist", seed=2)) == \
        "ae-conv-z16-mnist-s2"
    assert describe.base_run_name(TrainConfig(model="m2", labeled=100)) == "m2-normal-100labels-z8-digits"


@pytest.mark.slow
def test_a_second_run_of_the_same_setting_gets_a_suffix_and_run_name_overrides(tmp_path, digits):
    uri = f"sqlite:///{tmp_path}/names.db"
    import mlflow

    mlflow.set_tracking_uri(uri)
    config = TrainConfig(model="ae", **TINY)
    options = TrackingOptions(experiment="names", checkpoint_dir=str(tmp_path / "ck"), register=False)
    first = train_tracked(config, digits, options, progress=False)
    second = train_tracked(config, digits, options, progress=False)
    named = train_tracked(config, digits, dataclasses.replace(options, run_name="mine"), progress=False)
    client = MlflowClient(uri)
    assert [client.get_run(r.run_id).info.run_name for r in (first, second, named)] == \
        ["ae-z2-digits", "ae-z2-digits-2", "mine"]
    experiment = client.get_experiment(first.experiment_id)
    assert "aetrack compare --experiment names" in experiment.tags[describe.NOTE]


# --------------------------------------------------------------------------------------------------- params

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_params_are_the_settings_that_differ_from_the_defaults_and_rebuild_the_config(name):
    """MLflow prints every param above each image card: a run logs its identity and what it changed, no more."""
    config = TrainConfig(model=name, latent_dim=3)
    params = run_params(config)
    assert params == {"model": name, "dataset": "digits", "latent_dim": "3"}
    assert TrainConfig.from_params(params) == config  # the settings left out are the defaults
    assert resolved_tags(config, config.resolve(1000)).keys() == (
        {"aetrack.resolved.epochs", "aetrack.resolved.patience"}
        | ({"aetrack.resolved.kl_warmup"} if "variational" in REGISTRY[name].scopes else set()))
    explicit = TrainConfig(model=name, epochs=5, patience=2)
    assert "aetrack.resolved.epochs" not in resolved_tags(explicit, explicit.resolve(1000))  # epochs=5 says it all


@pytest.mark.parametrize(("changed", "logged"), [
    (dict(model="vae", prior_components=5), {}),                           # idle under the normal prior
    (dict(model="vae", prior="mog", prior_components=5), {"prior": "mog", "prior_components": "5"}),
    (dict(model="vae", train_samples=5), {}),                              # idle under the ELBO
    (dict(model="vae", objective="iwae", train_samples=5), {"objective": "iwae", "train_samples": "5"}),
    (dict(model="sae", sparsity_target=0.1), {}),                          # idle under L1
    (dict(model="ae", beta=4.0), {}),                                      # not an ae's setting at all
])
def test_a_setting_its_other_settings_leave_idle_is_not_logged(changed, logged):
    assert run_params(TrainConfig(**changed)) == {"model": changed["model"], "dataset": "digits", **logged}


def test_mlproject_parameters_are_settings_every_variant_logs():
    """`mlflow run` logs every entry-point parameter; those must be params aetrack logs for any variant too."""
    import yaml

    parameters = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["main"]["parameters"]
    fields = TrainConfig.__dataclass_fields__
    for name in parameters:
        assert name not in fields or fields[name].metadata["scope"] is None, name


# ---------------------------------------------------------------------------------------------- pictures

def test_grids_are_at_least_512_pixels_wide_sharp_and_labelled():
    digits8 = torch.rand(16, 1, 8, 8)
    picture = images.grid(digits8, 8)
    assert picture.width >= images.MIN_GRID_WIDTH
    # Nearest neighbour: every tile is made of blocks of one value (8 -> 64 pixels: blocks of 8x8).
    tile = torch.tensor(list(picture.convert("L").getdata()), dtype=torch.float32).view(picture.height, picture.width)
    block = tile[images.PADDING:images.PADDING + 8, images.PADDING:images.PADDING + 8]
    assert (block == block[0, 0]).all()
    mnist = images.grid(torch.rand(8, 1, 28, 28), 8)
    assert mnist.width >= images.MIN_GRID_WIDTH
    labelled = images.rows(digits8[:8], digits8[8:], labels=images.RECONSTRUCTION_ROWS)
    assert labelled.width > images.grid(digits8, 8).width  # a margin for the row names
    square = images.rows(torch.rand(32, 1, 8, 8), torch.rand(32, 1, 8, 8), labels=images.RECONSTRUCTION_ROWS)
    assert 0.6 < square.height / square.width < 1.2  # 8 rows of 8: MLflow's thumbnails show it large
    assert labelled.convert("L").getpixel((2, labelled.height // 4)) == 255  # the margin is white, with dark text in it
    assert min(labelled.convert("L").crop((0, 0, labelled.width - picture.width, labelled.height)).getdata()) < 100


# ------------------------------------------------------------------------------- metric names: readers vs writer

# A metric read from MLflow by a literal name of the training loop's (or an older aetrack's) flat naming.
OLD_READ = re.compile(r"""(data\.metrics\[|data\.metrics\.get\(|get_metric_history\([^)]*?,\s*|metric_key=)"""
                      r"""["']((train|val|test|best)_\w+|epoch_time|samples_per_sec|lr|epoch|kl_scale)["']""")


def test_no_code_reads_a_metric_by_a_name_spelt_out():
    """Metric names come from aetrack.tracking.metric_names: a reader that spells `val_loss` out asks MLflow for
    a metric that no run has (train logs `loss/val`)."""
    offenders = []
    for path in [*(REPO / "aetrack").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if OLD_READ.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def reader_names(digits) -> set[str]:
    """Every metric name a reader asks MLflow for: the registry's listing and version tags, descriptions, tuning's
    objectives, the studies' tables, the benchmarks."""
    wanted = {*registry.KEY_METRICS, names.BEST_VAL_LOSS, names.BEST_EPOCH, names.EPOCH_TIME, names.TRAIN_LOSS,
              names.VAL_LOSS, *(names.test(m) for m in describe.KEY_TEST_METRICS)}
    for name, variant in REGISTRY.items():
        config = TrainConfig(model=name, **TINY, features=STAND_IN_M1 if variant.stacked else "")
        with mock.patch.object(artifacts, "load_model", stand_in_m1(digits)):  # a stacked variant's VAE: a stand-in
            wanted |= {names.logged(m) for m in [default_metric(variant), *available_metrics(config, digits)]}
    for study in STUDIES.values():
        wanted |= {names.test(m) for m in study.metrics}
    benchmarks = (REPO / "benchmarks" / "defaults.py").read_text()
    wanted |= {names.test(m) for m in re.findall(r"names\.test\([\"'](\w+)[\"']\)", benchmarks)}
    return wanted


@pytest.mark.slow
def test_every_metric_a_reader_asks_for_is_one_the_trainer_or_evaluate_writes(tmp_path, digits):
    import mlflow

    uri = f"sqlite:///{tmp_path}/readers.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    options = TrackingOptions(experiment="readers", checkpoint_dir=str(tmp_path / "ck"), register=False)
    settings = Settings(iw_samples=4, nll_images=16, samples=200, noise_levels=(0.3, 0.5))
    written: set[str] = set()
    runs = {}
    for name in ("ae", "dae", "sae", "cae", "vae", "cvae", "m2"):
        config = TrainConfig(model=name, **TINY, labeled=50)
        runs[name] = train_tracked(config, digits, options, progress=False).run_id
        evaluate_run(runs[name], settings, baseline=runs["ae"] if name == "dae" else None, echo=lambda _: None)
        written |= set(client.get_run(runs[name]).data.metrics)
    missing = sorted(reader_names(digits) - written)
    assert not missing, f"read but never written: {missing}"
    # And the run's description carries the key test figures after evaluate; its versions' tags would too.
    note = client.get_run(runs["vae"]).data.tags[describe.NOTE]
    assert "Best validation loss" in note and "Test set (aetrack evaluate):" in note and "nll_iw" in note


@pytest.mark.parametrize("shape, nrow", [((16, 1, 8, 8), 8), ((10, 3, 5, 7), 4), ((3, 1, 4, 4), 8)])
def test_tiles_are_torchvisions_grid_without_importing_torchvision(shape, nrow):
    from torchvision.utils import make_grid

    from aetrack.images import tile

    x = torch.rand(shape)
    assert torch.equal(tile(x, nrow, 2, 0.5), make_grid(x, nrow=nrow, padding=2, pad_value=0.5))


def test_the_tsne_picture_embeds_at_most_its_share_of_codes_with_every_label_and_says_so(monkeypatch):
    """t-SNE's cost grows with the codes it embeds (2000 MNIST codes took 14 s): it sees a sample per label."""
    import numpy as np
    import sklearn.manifold

    fed, drawn = [], {}

    class Recorded:  # t-SNE itself is scikit-learn's concern; what it is fed is aetrack's
        def __init__(self, *args, **kwargs):
            self.kwargs = kwargs

        def fit_transform(self, codes):
            fed.append((codes, self.kwargs))
            return codes[:, :2]

    def scatter(points, labels, title):
        drawn[title] = labels
        return title

    monkeypatch.setattr(sklearn.manifold, "TSNE", Recorded)
    monkeypatch.setattr(images, "latent_scatter", scatter)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), [1800, 900, 300, 200, 100, 60, 30, 6, 3, 1])  # one label with a single code
    codes = rng.normal(size=(len(labels), 64)) + labels[:, None]
    plots = images.latent_plots(codes, labels, seed=1)
    (embedded, settings), = fed
    assert len(embedded) <= 1000 and embedded.shape[1] <= 50
    title = plots["latent_tsne"]
    assert f"t-SNE of {len(embedded)} of {len(codes)} codes" in title
    assert set(drawn[title]) == set(range(10))  # every label, the rarest too
    counts = np.bincount(drawn[title], minlength=10)
    assert abs(counts[0] / len(embedded) - 1800 / len(codes)) < 0.01  # shares kept
    again = images.stratified(labels, images.TSNE_POINTS, 1)
    assert np.array_equal(again, images.stratified(labels, images.TSNE_POINTS, 1))  # the same codes for the same seed
    assert settings["max_iter"] == images.TSNE_ITERATIONS
