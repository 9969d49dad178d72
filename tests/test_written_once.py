"""Rules written once (issue 27): each list or check lives in one module and the others read it, so changing it in
one place cannot leave a second copy behind. Fast: no training, no server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aetrack import config, priors
from aetrack.tracking import describe, registry
from aetrack.tracking import metric_names as names
from aetrack.tuning import space

PACKAGE = Path(__file__).resolve().parents[1] / "aetrack"
SOURCES = {path.relative_to(PACKAGE.parent).as_posix(): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def modules_saying(pattern: str) -> list[str]:
    return [name for name, text in SOURCES.items() if re.search(pattern, text)]


def test_the_prior_names_are_one_list_that_priors_build_and_the_cli_and_the_search_offer():
    assert set(priors.BUILDERS) == set(config.PRIORS)
    assert config.TrainConfig.__dataclass_fields__["prior"].metadata["choices"] is config.PRIORS
    searched = space.SCOPE_SPACES["variational"]["prior"].removeprefix("cat:").split(",")
    assert set(searched) <= set(config.PRIORS)
    assert space.CONDITIONS["prior_components"] == ("prior", config.MIXTURE_PRIORS)
    assert set(config.MIXTURE_PRIORS) <= set(config.PRIORS)
    # tracking/workflows/studies.py: the prior study's grid, what it compares (today every prior); left to the studies' owners.
    assert modules_saying(r"""["']vamp["']""") == ["aetrack/config.py", "aetrack/priors.py", "aetrack/tracking/workflows/studies.py"]


def test_the_registered_model_name_is_built_in_one_place():
    assert modules_saying(r"aetrack-\{[^}]*dataset[^}]*\}-\{[^}]*model") == ["aetrack/tracking/run.py"]


def test_a_config_is_checked_against_its_loaded_data_in_one_place():
    assert modules_saying(r"is larger than the training set") == ["aetrack/data.py"]
    assert modules_saying(r"validation examples;") == ["aetrack/data.py"]


@pytest.mark.parametrize("labeled, val, message", [(2000, 100, "--labeled 2000 is larger"), (100, 10, "leaves 10 validation")])
def test_check_fits_names_the_option_the_data_cannot_satisfy(labeled, val, message):
    class Splits:
        train_y, val_y = [0] * 1000, [0] * val

    with pytest.raises(config.ConfigError, match=message):
        from aetrack.data import check_fits

        check_fits(config.TrainConfig(model="m2", labeled=labeled), Splits())


def test_a_versions_key_metrics_are_the_descriptions():
    assert registry.KEY_METRICS == (names.BEST_VAL_LOSS, *(names.test(m) for m in names.KEY_TEST_METRICS))
    assert describe.KEY_TEST_METRICS is names.KEY_TEST_METRICS


def test_no_process_wide_state_as_plumbing():
    """MLFLOW_RUN_ID is read at the CLI's edge and passed on; whether a run nests is the caller's parameter."""
    assert modules_saying(r"MLFLOW_RUN_ID\"") == ["aetrack/cli/options.py"]
    assert modules_saying(r"active_run\(\)") == []


def test_train_under_mlflow_run_reuses_its_run(tmp_path):
    import mlflow
    from click.testing import CliRunner

    from aetrack.cli.main import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("made-by-mlflow-run")
    made = client.create_run(experiment_id).info.run_id
    result = CliRunner().invoke(main, ["train", "--model", "ae", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                                       "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"), "--quiet",
                                       "--no-register"], env={"MLFLOW_RUN_ID": made})
    assert result.exit_code == 0, result.output
    assert f"run id:           {made}" in result.output
    runs = client.search_runs([experiment_id])
    assert [run.info.run_id for run in runs] == [made] and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model"] == "ae"
