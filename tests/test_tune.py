"""`aetrack tune`: search spaces and usage errors, the exact trial budget and the parent-run claim under
racing workers (real PostgreSQL), worker processes sharing a study, a SIGKILLed worker's trial retried,
pruning, child runs in a real `mlflow server`, and the champion alias."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState

from aetrack.cli import main
from aetrack.tracking.registry import crown
from aetrack.tuning.objective import HOST, WORKER, shared_threads
from aetrack.tuning.space import config_value, parse_param
from aetrack.tuning.storage import StudyStorage, TrialBudgetSpent, open_storage, used_trials
from conftest import aetrack_command, stop

# One searched setting (lr) on a tiny VAE; latent_dim 2 keeps the final latent plot free of t-SNE.
TINY = ["--model", "vae", "--hidden", "32", "--latent-dim", "2", "--prior", "normal", "--beta", "1",
        "--batch-size", "64", "--log-every", "10", "--param", "lr=float:1e-3:1e-2:log", "--threads", "1"]

PROGRESS = re.compile(r"trial +\d+ +(complete|pruned|failed) ")  # one line per finished trial


def tune(args: list[str]):
    return CliRunner().invoke(main, ["tune", *args], catch_exceptions=False)


def worker(args: list[str], log_path) -> subprocess.Popen:
    """`aetrack tune` as a real process (the console script), its output in a file."""
    return subprocess.Popen([*aetrack_command(), "tune", *args], stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_until(condition, timeout: float, what: str, processes=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if any(p.poll() is not None for p in processes):
            raise AssertionError(f"a worker exited while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def child_runs(client: MlflowClient, parent) -> list:
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


# ---------------------------------------------------------------------------------------------- spaces and errors

def test_show_space_defaults_follow_the_model_and_overrides_replace_them(tmp_path):
    vae = tune(["--show-space"]).output
    for name in ("lr:", "latent_dim:", "hidden:", "beta:", "prior: cat:normal,mog,vamp", "prior_components:"):
        assert name in vae, name
    ae = tune(["--model", "ae", "--show-space"]).output
    assert "lr:" in ae and "prior" not in ae and "beta" not in ae
    assert "noise_level:" in tune(["--model", "dae", "--show-space"]).output

    custom = tune(["--show-space", "--param", "latent_dim=int:2:64:log", "--param", "prior=cat:normal,mog",
                   "--lr", "0.003"]).output
    assert "latent_dim: int:2:64:log" in custom and "prior: cat:normal,mog\n" in custom
    assert "lr:" not in custom  # an option given on the command line is fixed, not searched
    assert "prior_components" not in tune(["--show-space", "--prior", "normal"]).output  # its condition cannot hold

    # The printed space is a --space file; YAML lists are choices and null drops a default.
    (tmp_path / "space.yaml").write_text(vae + "\nhidden: [[64], [128, 64]]\nbeta: null\n")
    from_file = tune(["--show-space", "--space", str(tmp_path / "space.yaml")]).output
    assert "hidden: cat:64,128-64" in from_file and "beta" not in from_file and "lr: float:0.0001:0.01:log" in from_file
    assert "latent_dim: cat:2,4,8,16,32" in tune(["--show-space", "--sampler", "grid"]).output


def test_a_sampled_value_reaches_the_config_with_its_type():
    assert parse_param("hidden", "cat:128,256-128").choices == ("128", "256-128")
    assert config_value("hidden", "256-128") == (256, 128)
    assert config_value("latent_dim", 4) == 4 and config_value("prior", "mog") == "mog"
    assert parse_param("latent-dim", "int:2:64:log").log


@pytest.mark.parametrize("args, message", [
    (["--param", "latent_dim=int:a:b"], "expected int:LOW:HIGH"),
    (["--param", "latent_dim"], "NAME=SPEC"),
    (["--param", "nonsense=int:1:2"], "unknown parameter 'nonsense'"),
    (["--param", "epochs=int:1:5"], "epochs cannot be searched"),
    (["--param", "prior=cat:normal,gauss"], "'gauss' is not one of"),
    (["--param", "hidden=cat:128,big"], "'big' is not a valid hidden"),
    (["--param", "lr=float:0:1:log"], "needs LOW > 0"),
    (["--param", "lr=float:0:1"], "impossible (--lr must be positive)"),
    (["--param", "latent_dim=float:1:4"], "latent_dim takes int; use int:LOW:HIGH"),
    (["--model", "ae", "--param", "prior=cat:normal,mog"], "prior does not apply to --model ae"),
    (["--latent-dim", "4", "--param", "latent_dim=int:2:8"], "both fixed by --latent-dim and searched"),
    (["--sampler", "grid", "--param", "lr=float:1e-4:1e-2"], "grid needs cat:A,B,... for every parameter, got lr"),
])
def test_bad_search_specs_are_one_line_usage_errors(args, message):
    result = tune([*args, "--show-space"])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and message in error[0], result.output


def test_a_metric_the_model_does_not_report_is_named_before_any_trial(tmp_path):
    result = tune([*TINY, "--metric", "val_accuracy", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert result.exit_code == 1 and "--metric val_accuracy: --model vae reports val_loss" in result.output
    assert "val_neg_elbo" in result.output and not (tmp_path / "optuna.db").exists()


# ---------------------------------------------------------------------------------------------- the storage protocols

def test_racing_workers_create_exactly_the_budget_and_agree_on_one_parent(postgres_url):
    budget, workers = 5, 6
    open_storage(postgres_url, budget=budget, heartbeat=5, grace_period=10, max_retry=1)  # tables, once
    optuna.create_study(study_name="race", storage=postgres_url)
    barrier = threading.Barrier(workers)
    created, parents, errors = [], [], []

    def work(index: int) -> None:
        try:
            storage = StudyStorage(postgres_url)  # one engine each, as separate machines would have
            storage.budget = budget
            study = optuna.load_study(study_name="race", storage=storage)
            barrier.wait()
            parents.append(storage.claim_study_user_attr(study._study_id, "parent", f"run-{index}"))
            for _ in range(budget):  # bounded, so that a broken guard shows as too many trials, not a hang
                try:
                    trial = study.ask()
                except TrialBudgetSpent:
                    return
                created.append(trial.number)
                study.tell(trial, float(index))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    study = optuna.load_study(study_name="race", storage=postgres_url)
    assert sorted(created) == list(range(budget)) and len(study.trials) == budget
    assert len(set(parents)) == 1 and len(parents) == workers
    assert study.user_attrs["parent"] == parents[0]

    # A retry of a dead worker's trial replaces the failure: it is created past the budget and counts once.
    storage = StudyStorage(postgres_url)
    storage.budget = budget
    study = optuna.load_study(study_name="race", storage=storage)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": 0}))
    assert used_trials(study.get_trials()) == budget
    with pytest.raises(TrialBudgetSpent):
        study.ask(), study.ask()  # the first pops the retry, the second would be one too many


# ---------------------------------------------------------------------------------------------- workers

def test_two_worker_processes_share_one_study_tracked_in_mlflow(postgres_url, mlflow_server, tmp_path):
    n_trials, experiment, model = 4, f"tune-{uuid.uuid4().hex[:8]}", f"tune-{uuid.uuid4().hex[:8]}"
    args = [*TINY, "--epochs", "2", "--n-trials", str(n_trials), "--study-name", "shared", "--storage", postgres_url,
            "--tracking-uri", mlflow_server, "--experiment", experiment, "--registered-model", model, "--heartbeat", "2"]
    workers = [worker(args, tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        for process in workers:
            process.wait(timeout=150)
    finally:
        for process in workers:
            stop(process)
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)

    # Exactly n trials between them (not n each), both contributing, one progress line per trial.
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert len(study.trials) == n_trials and all(t.state == TrialState.COMPLETE for t in study.trials)
    pids = {str(p.pid) for p in workers}
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in study.trials} == pids
    assert sum(bool(PROGRESS.match(line)) for log in logs for line in log.splitlines()) == n_trials
    assert all("best trial:" in log and "val_neg_elbo" in log for log in logs)

    # One parent run, one child per trial with params, metric histories, images and its Optuna tags.
    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.aetrack_role = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna_study"] == "shared"
    assert parent.data.metrics["n_complete"] == n_trials and parent.data.params["n_trials"] == str(n_trials)
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    children = child_runs(client, parent)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == list(range(n_trials))
    for run in children:
        trial = study.trials[int(run.data.tags["optuna_trial"])]
        assert run.data.tags["optuna_state"] == "complete" and run.info.status == "FINISHED"
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert len(client.get_metric_history(run.info.run_id, "val/neg_elbo")) == 2
        assert any(a.path.startswith("images/progress~reconstructions") for a in client.list_artifacts(run.info.run_id, "images"))

    # The champion is the best trial's registered version, and the parent says so.
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    assert champion.version == study.best_trial.user_attrs["registered_version"]
    assert client.get_run(parent.info.run_id).data.tags["champion_version"] == champion.version


def test_a_killed_workers_trial_is_failed_and_retried(postgres_url, mlflow_server, tmp_path):
    common = [*TINY, "--n-trials", "2", "--study-name", "killed", "--storage", postgres_url, "--pruner", "none",
              "--tracking-uri", mlflow_server, "--experiment", f"kill-{uuid.uuid4().hex[:8]}", "--no-register",
              "--heartbeat", "1", "--grace-period", "4"]
    doomed = worker([*common, "--epochs", "500"], tmp_path / "doomed.log")  # its trial would take minutes
    survivor = None
    # One storage for all the polling below: a URL per call would open a new connection pool every 0.1 s.
    storage = optuna.storages.RDBStorage(postgres_url)
    try:
        def reported(pid: int):
            try:
                study = optuna.load_study(study_name="killed", storage=storage)
            except KeyError:
                return None
            return [t for t in study.get_trials(states=(TrialState.RUNNING,))
                    if t.user_attrs.get("worker", "").endswith(f":{pid}") and t.intermediate_values]

        doomed_trial = wait_until(lambda: reported(doomed.pid), 90, "the first worker's first epoch", [doomed])[0]
        survivor = worker([*common, "--epochs", "2"], tmp_path / "survivor.log")
        wait_until(lambda: reported(survivor.pid) or survivor.poll() is not None, 90, "the second worker's trial")
        doomed.send_signal(signal.SIGKILL)  # mid-trial: no chance to tell Optuna or MLflow anything
        doomed.wait(10)
        survivor.wait(timeout=120)
    finally:
        stop(doomed)
        if survivor is not None:
            stop(survivor)
    log = (tmp_path / "survivor.log").read_text()
    assert survivor.returncode == 0, log[-3000:]

    study = optuna.load_study(study_name="killed", storage=postgres_url)
    states = {t.number: t.state for t in study.trials}
    assert states[doomed_trial.number] == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == doomed_trial.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == doomed_trial.params
    assert used_trials(study.trials) == 2 and sum(s == TrialState.COMPLETE for s in states.values()) == 2

    # The dead worker's child run no longer claims to be running.
    client = MlflowClient(mlflow_server)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    dead = [r for r in child_runs(client, parent) if r.data.tags["optuna_trial"] == str(doomed_trial.number)]
    assert len(dead) == 1 and dead[0].info.status == "FAILED" and dead[0].data.tags["optuna_state"] == "failed"


def test_sigterm_stops_a_worker_with_its_trial_run_killed_and_one_line(mlflow_server, tmp_path):
    storage = f"sqlite:///{tmp_path}/sigterm.db"
    experiment = f"sigterm-{uuid.uuid4().hex[:8]}"
    doomed = worker([*TINY, "--n-trials", "2", "--epochs", "500", "--study-name", "sigterm", "--storage", storage,
                     "--pruner", "none", "--tracking-uri", mlflow_server, "--experiment", experiment, "--no-register"],
                    tmp_path / "sigterm.log")
    optuna_storage = optuna.storages.RDBStorage(storage)
    try:
        def running():
            try:
                study = optuna.load_study(study_name="sigterm", storage=optuna_storage)
            except KeyError:
                return None
            return [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.intermediate_values]

        wait_until(running, 120, "the first trial's first epoch", [doomed])
        doomed.send_signal(signal.SIGTERM)
        doomed.wait(60)
    finally:
        stop(doomed)
    log = (tmp_path / "sigterm.log").read_text()
    assert doomed.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "this worker stopped" in log and "Traceback" not in log and "Aborted" not in log, log[-3000:]
    client = MlflowClient(mlflow_server)
    children = [r for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
                if r.data.tags.get("optuna_trial") is not None]
    assert [r.info.status for r in children] == ["KILLED"]
    study = optuna.load_study(study_name="sigterm", storage=storage)
    stopped, retry = study.trials  # the stopped trial is failed, and queued again with the same parameters
    assert stopped.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == stopped.number and retry.params == stopped.params
    assert used_trials(study.trials) == 1


@pytest.mark.slow
def test_the_median_pruner_stops_hopeless_trials_early(tmp_path):
    # Two learning rates a thousand times apart: once a fast one has finished, slow ones are pruned at epoch 1.
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    result = tune([*TINY, "--param", "lr=cat:0.01,0.00001", "--epochs", "3", "--n-trials", "4", "--sampler", "random",
                   "--sampler-seed", "0", "--pruner", "median", "--pruner-startup-trials", "1",
                   "--pruner-warmup-epochs", "0", "--no-register", "--tracking-uri", tracking])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="aetrack-digits-vae", storage="sqlite:///optuna.db")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned and complete, [(t.state, t.params) for t in study.trials]
    assert all(t.params["lr"] == 0.00001 and len(t.intermediate_values) < 3 for t in pruned)
    assert all(len(t.intermediate_values) == 3 for t in complete)
    lines = [line for line in result.output.splitlines() if PROGRESS.match(line)]
    assert len(lines) == 4 and sum(" pruned " in line for line in lines) == len(pruned)

    client = MlflowClient(tracking)
    for trial in pruned:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna_state"] == "pruned" and run.info.status == "KILLED"
    assert not any(Path("checkpoints").glob("*/last.pt"))  # no trial leaves its checkpoint behind


# ---------------------------------------------------------------------------------------------- the champion

def champion_of(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


@pytest.mark.slow
def test_the_champion_alias_moves_only_to_a_version_better_than_every_other(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/registry.db")
    experiment_id = client.create_experiment("champion")
    client.create_registered_model("champ")

    def version(value: float) -> str:
        """A registered version whose run logged val/neg_elbo per epoch (step = epoch), best at epoch 2 (as
        `aetrack train` does)."""
        run_id = client.create_run(experiment_id).info.run_id
        for epoch, metric in [(1, value + 5), (2, value), (3, value + 1)]:
            client.log_metric(run_id, "val/neg_elbo", metric, step=epoch)
        client.log_metric(run_id, "val/best_epoch", 2)
        return str(client.create_model_version("champ", f"runs:/{run_id}/model", run_id).version)

    first, worse = version(30.0), version(31.0)
    # No champion yet (a store from before `train` crowned): the best of every version takes it, not the newcomer.
    outcome = crown(client, "champ", "val_neg_elbo", candidate=worse)
    assert champion_of(client, "champ") == first and not outcome.crowned and outcome.version == first
    kept = crown(client, "champ", "val_neg_elbo", candidate=worse)
    assert not kept.crowned and kept.version == first and kept.previous_value == 30.0
    better = version(29.0)
    moved = crown(client, "champ", "val_neg_elbo", candidate=better)
    assert moved.crowned and moved.previous == first and champion_of(client, "champ") == better
    # Chosen by hand: it stays until a newcomer beats every version, not merely the one chosen.
    client.set_registered_model_alias("champ", "champion", worse)
    middling = version(29.5)
    assert not crown(client, "champ", "val_neg_elbo", candidate=middling).crowned
    assert champion_of(client, "champ") == worse
    best = version(28.0)
    assert crown(client, "champ", "val_neg_elbo", candidate=best).crowned and champion_of(client, "champ") == best
    # A figure where higher is better ranks the other way round: the highest of all takes the alias.
    assert crown(client, "champ", "val_neg_elbo", candidate=worse, minimize=False).crowned
    assert champion_of(client, "champ") == worse


@pytest.mark.slow
def test_a_short_tune_after_the_default_train_leaves_the_champion_on_the_best_version(tmp_path):
    """Issue 22's sequence: `aetrack train` registers a converged version, then a 2-epoch `aetrack tune` registers
    its best trial. The trial's version is worse on val/neg_elbo, so @champion stays on train's version, also when
    the store predates crowning at train (no alias at all); both versions carry the same tag names."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = ["--model", "vae", "--hidden", "32", "--latent-dim", "2", "--batch-size", "64", "--log-every", "10"]
    trained = CliRunner().invoke(main, ["train", *model, "--epochs", "40", "--patience", "0", "--quiet",
                                        "--tracking-uri", uri], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    assert "champion:         models:/aetrack-digits-vae@champion -> version 1" in trained.output
    client = MlflowClient(uri)
    client.delete_registered_model_alias("aetrack-digits-vae", "champion")  # as the issue found it: no alias
    result = tune(["--model", "vae", "--hidden", "32", "--latent-dim", "2", "--batch-size", "64", "--log-every", "10",
                   "--param", "lr=float:1e-4:2e-4:log", "--threads", "1", "--n-trials", "1", "--epochs", "2",
                   "--tracking-uri", uri, "--storage", f"sqlite:///{tmp_path}/optuna.db"])
    assert result.exit_code == 0, result.output
    versions = {str(v.version): v for v in client.search_model_versions("name = 'aetrack-digits-vae'")}
    assert sorted(versions) == ["1", "2"]
    assert champion_of(client, "aetrack-digits-vae") == "1", result.output
    assert "version 1 is better on val_neg_elbo" in result.output
    assert versions["1"].tags.keys() & versions["2"].tags.keys() >= {"val/best_loss"}
    assert not any("_" in key and "/" not in key and key.startswith("val") for v in versions.values() for key in v.tags)
    # The trials are in the study's own experiment, named by what they try; the training runs' charts stay clean.
    trials = client.search_runs([client.get_experiment_by_name("aetrack-tuning").experiment_id],
                                "tags.mlflow.parentRunId != ''")
    assert [r.info.run_name.split(": ")[0] for r in trials] == ["trial 0"] and "lr=" in trials[0].info.run_name
    assert len(client.search_runs([client.get_experiment_by_name("aetrack").experiment_id])) == 1


# --- threads: workers on one host share its cores ---

def test_a_lone_worker_takes_every_core_and_workers_on_one_host_share_them():
    """Without --threads each trial takes the cores divided among the workers of this host running a trial."""
    cores = len(os.sched_getaffinity(0))
    study = optuna.create_study()
    mine = study.ask()
    mine.set_user_attr("worker", WORKER)
    assert shared_threads(study) == cores
    elsewhere = study.ask()
    elsewhere.set_user_attr("worker", "another-host:17")  # another machine's worker takes none of these cores
    assert shared_threads(study) == cores
    neighbour = study.ask()
    neighbour.set_user_attr("worker", f"{HOST}:{os.getpid() + 1}")
    assert shared_threads(study) == max(1, cores // 2)
    study.tell(neighbour, 1.0)  # a finished trial's worker is not counted
    assert shared_threads(study) == cores
    for pid in range(3 * cores):
        study.ask().set_user_attr("worker", f"{HOST}:{pid + 10**6}")
    assert shared_threads(study) == 1  # never fewer than one thread
