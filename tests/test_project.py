"""The project's own promises: the README's commands are the ones CI runs, and the services
that docker-compose.yml describes work when started natively (CI has no Docker engine)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import requests
import yaml
from mlflow import MlflowClient

from conftest import VENV_BIN, free_port, start_mlflow_server, stop, wait_http

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


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_describes_the_stack():
    services = compose()["services"]
    assert {"postgres", "mlflow", "train", "serve"} <= set(services)
    assert "postgresql://" in services["mlflow"]["command"]
    assert services["serve"]["command"].startswith("mlflow models serve -m models:/aetrack-digits-vae@champion")
    assert services["train"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert (REPO / services["mlflow"]["build"] / "Dockerfile").exists()


def native(command: str, replacements: dict[str, str]) -> list[str]:
    """A compose command with its container hosts, ports and paths swapped for local ones."""
    for old, new in replacements.items():
        command = command.replace(old, new)
    words = shlex.split(command)
    return [str(VENV_BIN / words[0]), *words[1:]]


def test_compose_services_run_natively(tmp_path, postgres_url):
    services = compose()["services"]
    port, serve_port = free_port(), free_port()
    mlflow_command = native(services["mlflow"]["command"], {
        "postgresql://postgres:aetrack@postgres:5432/mlflow": postgres_url,
        "/mlartifacts": str(tmp_path / "artifacts"), "0.0.0.0": "127.0.0.1", "5000": str(port)})
    log = open(tmp_path / "mlflow.log", "w")
    server = subprocess.Popen(mlflow_command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    serve = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", server)
        # mlflow models serve execs uvicorn from PATH, as in an activated environment.
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        train = native(services["train"]["command"], {"--epochs 10": "--epochs 2"})
        done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        promote = [str(VENV_BIN / "aetrack"), "promote", "aetrack-digits-vae", "1", "--alias", "champion"]
        done = subprocess.run(promote, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert MlflowClient(url).get_model_version_by_alias("aetrack-digits-vae", "champion").version == "1"
        serve_command = native(services["serve"]["command"], {"0.0.0.0": "127.0.0.1", "5001": str(serve_port)})
        serve = subprocess.Popen(serve_command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        wait_http(f"http://127.0.0.1:{serve_port}/ping", serve, timeout=120)
        answer = requests.post(f"http://127.0.0.1:{serve_port}/invocations",
                               json={"dataframe_records": [{"n": 2}], "params": {"seed": 0}}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 2
    finally:
        if serve is not None:
            stop(serve)
        stop(server)


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
