"""The project's own promises: the README's commands are the ones CI runs, CI builds the docs, and
docker-compose.yml names the stack's services (tests/test_stack.py runs them natively: CI has no Docker engine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"^python3 -m venv .venv && .*$", text, flags=re.MULTILINE)


def test_readme_starts_with_the_two_set_up_commands_and_ci_runs_the_second():
    setup, tests = readme_commands()[:2]
    assert setup.endswith(".venv/bin/aetrack train")
    assert tests.endswith(".venv/bin/python -m pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_ci_builds_the_docs_strictly_and_stops_at_the_first_failure():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in ci
    install = '.venv/bin/pip install -q -c constraints.txt -e ".[docs]"'
    build = next(line for line in ci if line.startswith(".venv/bin/mkdocs build"))
    assert install in ci and ci.index(install) < ci.index(build) and "--strict" in build
    assert "site/" in (REPO / ".gitignore").read_text()


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_describes_the_stack():
    services = compose()["services"]
    assert {"postgres", "mlflow", "train", "tune-worker", "serve", "optuna-dashboard"} <= set(services)
    assert services["mlflow"]["command"].startswith("mlflow server --backend-store-uri postgresql://")
    assert services["serve"]["command"].startswith("aetrack serve ${SERVE_MODEL:-models:/aetrack-digits-vae@champion}")
    assert services["train"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for name in ("mlflow", "train", "optuna-dashboard"):
        build = services[name]["build"]
        assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).exists(), name
    # tests/test_stack.py checks the file in depth and runs its programs natively.


def test_mlproject_defaults_are_train_configs_own():
    """MLflow logs each entry-point parameter on the run, where aetrack logs the same names: a default that
    drifted from TrainConfig's would log a param that the run's own config contradicts."""
    from aetrack.config import TrainConfig, from_strings

    parameters = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["main"]["parameters"]
    defaults = {name: str(spec["default"]) for name, spec in parameters.items() if name in TrainConfig.__dataclass_fields__}
    from_strings(TrainConfig, defaults).validate()
    budget = {"epochs", "patience"}  # `auto` resolves per data set; MLproject fixes a short, concrete budget
    assert {k: v for k, v in defaults.items() if k not in budget} == \
        {k: v for k, v in TrainConfig().to_params().items() if k in defaults and k not in budget}


def test_the_recorded_commit_says_when_the_code_is_not_heads(tmp_path, monkeypatch):
    import subprocess

    import aetrack
    from aetrack.tracking.run import git_commit

    package = tmp_path / "aetrack"
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    package.mkdir()
    for path in (package / "__init__.py", tmp_path / "benchmarks" / "results" / "x.json", tmp_path / "README.md"):
        path.write_text("1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(aetrack, "__file__", str(package / "__init__.py"))
    assert git_commit() == head
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("2\n")  # a benchmark's result: not code
    (tmp_path / "notes.txt").write_text("untracked\n")
    (tmp_path / "README.md").write_text("rebuilt table\n")
    assert git_commit() == head
    (package / "__init__.py").write_text("2\n")
    assert git_commit() == head + "-dirty"


def test_python_m_aetrack_is_the_cli(monkeypatch, capsys):
    from conftest import run_entry_file

    monkeypatch.setattr("sys.argv", ["aetrack", "--help"])
    with pytest.raises(SystemExit) as done:
        run_entry_file(REPO / "aetrack" / "__main__.py")
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("Usage: aetrack ")
