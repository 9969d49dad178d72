"""`aetrack promote`, `aetrack models` and `aetrack generate` against a temporary SQLite store
holding a plain autoencoder, trained by `aetrack train` and registered because a name was given."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from aetrack.cli import main
from test_serving import new_store, tracking

NAME = "aetrack-digits-ae"


def aetrack(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = new_store(root)
    with tracking(uri):
        result = aetrack("train", "--model", "ae", "--epochs", 1, "--quiet", "--tracking-uri", uri,
                         "--registered-model", NAME, "--checkpoint-dir", root / "checkpoints")
        assert result.exit_code == 0, result.output
        yield uri


def listing(uri: str, *args: str) -> list[dict]:
    result = aetrack("models", "--json", "--tracking-uri", uri, *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow
def test_a_plain_autoencoder_is_registered_when_a_name_is_given(store):
    [row] = listing(store)
    assert (row["name"], row["version"]) == (NAME, 1)
    assert set(row["metrics"]) == {"val/best_loss"}


@pytest.mark.slow
def test_models_shows_aliases_and_test_metrics(store):
    run_id = listing(store)[0]["run_id"]
    MlflowClient(store).log_metric(run_id, "test/recon_loss", 12.5)  # as `aetrack evaluate` would
    MlflowClient(store).create_registered_model("someone-elses-model")
    assert aetrack("promote", NAME, 1, "--alias", "candidate", "--tracking-uri", store).exit_code == 0
    [row] = listing(store)
    assert "candidate" in row["aliases"] and row["metrics"]["test/recon_loss"] == 12.5
    table = aetrack("models", "--tracking-uri", store).output.splitlines()
    assert table[0].split() == ["NAME", "VERSION", "ALIASES", "RUN", "CREATED", "METRICS"]
    assert len(table) == 2 and table[1].split()[:2] == [NAME, "1"]
    assert "candidate" in table[1].split()[2] and "test/recon_loss=12.5" in table[1]
    assert listing(store, "--name", "someone-%") == []  # a registered model without versions lists no rows


@pytest.mark.slow
def test_promote_points_the_alias_at_the_version(store):
    result = aetrack("promote", NAME, 1, "--tracking-uri", store)
    assert result.exit_code == 0 and result.output.strip() == f"models:/{NAME}@champion -> version 1"
    assert MlflowClient(store).get_model_version_by_alias(NAME, "champion").version in (1, "1")


@pytest.mark.slow
def test_promote_an_unknown_version_fails_in_one_line(store):
    result = aetrack("promote", NAME, 9, "--tracking-uri", store)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "version=9" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_generate_draws_a_grid_offline_through_the_pyfunc_model(store, tmp_path):
    aetrack("promote", NAME, 1, "--tracking-uri", store)
    paths = [tmp_path / "a.png", tmp_path / "again.png", tmp_path / "other.png"]
    for path, seed in zip(paths, (3, 3, 4)):
        result = aetrack("generate", f"models:/{NAME}@champion", "-n", 16, "--seed", seed, "-o", path,
                         "--tracking-uri", store)
        assert result.exit_code == 0, result.output
    grid = Image.open(paths[0])
    # 16 digits of 8x8, drawn 8x larger (a grid at least 512 pixels wide), 8 to a row with 2-pixel gaps:
    # 8 * 64 + 9 * 2 by 2 * 64 + 3 * 2.
    assert grid.size == (530, 134)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


@pytest.mark.slow
def test_generate_refuses_a_label_for_an_unconditional_model(store, tmp_path):
    result = aetrack("generate", f"models:/{NAME}/1", "--label", 3, "-o", tmp_path / "x.png", "--tracking-uri", store)
    assert result.exit_code == 1
    assert "label: this ae model is not conditional" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
