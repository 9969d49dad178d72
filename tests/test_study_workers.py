"""`aetrack study --workers N` and workers on several hosts: leases on the grid's runs (SQLite and a real PostgreSQL),
no setting trained twice, a killed worker's setting retrained by another, across network namespaces."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter

import pytest
from mlflow import MlflowClient

from aetrack.tracking.workflows.study_claims import Claims
from conftest import aetrack_command, free_port, stop
from test_stack import CLIENT_ENV, hosts, wait_for_line  # noqa: F401 (hosts: the namespaces fixture, as tuning uses it)

TINY = "epochs=2,latent_dim=4,batch_size=256,patience=0"
# The mlp ae and the three daes at noise level 0.3: four settings, the ae first (each dae's baseline).
FOUR = ["denoising", "--only", "arch=mlp,noise_level=0.3"]


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/claims.db"
    return request.getfixturevalue("postgres_url")


def test_a_task_has_one_holder_until_its_lease_runs_out(storage):
    first, second = Claims(storage, "s", lease=1.0), Claims(storage, "s", lease=1.0)
    assert first.claim("a") and not second.claim("a")
    assert second.claim("b")                      # another task is free
    assert Claims(storage, "other study", lease=1.0).claim("a")  # and the same task of another study
    time.sleep(1.2)                               # first died without renewing: its lease ran out
    assert second.claim("a") and not first.renew("a")
    second.release("a")
    assert first.claim("a")


def test_a_held_task_stays_held_while_its_holder_works(storage):
    holder, other = Claims(storage, "s", lease=0.6), Claims(storage, "s", lease=0.6)
    assert holder.claim("a")
    with holder.holding("a"):
        for _ in range(4):                        # 2 s: three leases long, renewed every 0.2 s
            time.sleep(0.5)
            assert not other.claim("a")
    assert other.claim("a")                       # released at once after the work


def test_racing_workers_claim_each_task_once(storage):
    tasks = [f"t{i}" for i in range(30)]
    won: list[tuple[str, str]] = []
    start = threading.Barrier(6)

    def worker(number: int) -> None:
        claims = Claims(storage, "race", lease=60, owner=f"w{number}")
        start.wait()
        won.extend((task, claims.owner) for task in tasks if claims.claim(task))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(task for task, _ in won) == sorted(tasks)


def study_runs(experiment: str) -> list:
    # The environment's URI, where the workers' processes logged: an in-process command of an earlier test may have
    # set another one in this process (`mlflow.set_tracking_uri`), which MlflowClient() would take first.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([found.experiment_id]) if r.data.tags.get("aetrack.kind") != "comparison"]


def trained_once(runs: list) -> Counter:
    """Finished runs per (setting, seed); asserts that none was finished twice."""
    finished = Counter((r.data.tags["aetrack.setting"], r.data.params.get("seed", "0")) for r in runs
                       if r.info.status == "FINISHED")
    assert max(finished.values()) == 1, finished
    return finished


def study_process(args: list[str], log, env=None, prefix=()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *aetrack_command(), "study", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


@pytest.mark.timeout(600)
def test_two_local_workers_share_the_grid_and_train_each_setting_once(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    done = subprocess.run([*aetrack_command(), "study", *FOUR, "--set", TINY, "--seeds", "2", "--workers", "2",
                           "--experiment", "workers-local"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = study_runs("workers-local")
    assert len(trained_once(runs)) == 8 and len(runs) == 8
    assert all("test/psnr" in r.data.metrics for r in runs)
    # both workers trained, and every dae was scored against the ae of its seed
    trainers = {line.split("]")[0] for line in done.stderr.splitlines() if "training" in line}
    assert trainers == {"[worker 1", "[worker 2"}
    assert all("test/psnr_baseline_masking_at_0.3" in r.data.metrics for r in runs if r.data.params["model"] == "dae")


@pytest.mark.timeout(600)
def test_a_killed_workers_setting_is_retrained_by_another(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    storage = f"sqlite:///{tmp_path}/claims.db"
    common = [*FOUR, "--seeds", "1", "--experiment", "workers-killed", "--storage", storage, "--lease", "20"]
    # The first worker trains the ae for long; it is killed mid-run, holding its lease.
    slow = study_process([*common, "--set", "epochs=5000,patience=0,batch_size=256"], tmp_path / "slow.log")
    try:
        deadline = time.monotonic() + 180
        while "training model=ae" not in (tmp_path / "slow.log").read_text():
            assert slow.poll() is None and time.monotonic() < deadline, (tmp_path / "slow.log").read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(3)  # its run is open in MLflow
        slow.kill()
        slow.wait()
        killed_at = time.time() * 1000
    finally:
        stop(slow)
    done = subprocess.run([*aetrack_command(), "study", *common, "--set", TINY], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training model=ae" in done.stderr
    runs = study_runs("workers-killed")
    assert len(trained_once(runs)) == 4
    killed = [r for r in runs if r.info.status != "FINISHED"]
    assert [r.info.status for r in killed] in (["RUNNING"], ["FAILED"], ["KILLED"])
    assert killed[0].data.tags["aetrack.setting"].startswith("model=ae")
    # The ae was retrained only once the dead worker's lease ran out: 20 s after its last renewal, at most 6.7 s before
    # the kill; meanwhile the other settings wait for it, their baseline.
    retrained = next(r for r in runs if r.info.status == "FINISHED" and r.data.params["model"] == "ae")
    assert retrained.info.start_time - killed_at > 12_000


# ---------------------------------------------------------------------------------------------- hosts

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_workers_on_two_hosts_share_one_grid_through_postgresql(hosts, postgres_url, tmp_path):
    """An MLflow server on PostgreSQL on the server host; one `aetrack study` worker on each worker host, leasing the
    grid's runs in the same PostgreSQL (reached only through the server's address when the hosts are namespaces)."""
    pg_host, pg_port = hosts.publish_postgres()
    database = postgres_url.rsplit("/", 1)[1]
    remote_pg = f"postgresql://postgres@{pg_host}:{pg_port}/{database}"
    port, log = free_port(), tmp_path / "server.log"
    server = subprocess.Popen([*hosts.prefix("server"), *aetrack_command(), "server", "--backend", remote_pg,
                               "--artifacts", str(tmp_path / "artifacts"), "--root", str(tmp_path / "server"),
                               "--host", hosts.address, "--port", str(port), "--workers", "1"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **CLIENT_ENV})
    try:
        wait_for_line(log, r"^export MLFLOW_TRACKING_URI=", server, 180)
        env = {**CLIENT_ENV, "MLFLOW_TRACKING_URI": f"http://{hosts.address}:{port}", "AETRACK_STUDY_STORAGE": remote_pg}
        args = [*FOUR, "--set", TINY, "--seeds", "2", "--experiment", "workers-hosts"]
        logs = [tmp_path / f"{host}.log" for host in ("worker-1", "worker-2")]
        workers = [study_process(args, log, env, hosts.prefix(host)) for host, log in zip(("worker-1", "worker-2"), logs)]
        try:
            for process in workers:
                process.wait(timeout=600)
        finally:
            for process in workers:
                stop(process)
        assert [p.returncode for p in workers] == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
        trained = [len(re.findall(r"training model=", log.read_text())) for log in logs]
        assert sum(trained) == 8 and min(trained) >= 1, trained  # each setting once, both hosts working
        os.environ["MLFLOW_TRACKING_URI"] = hosts.reach(port)
        runs = study_runs("workers-hosts")
        assert len(trained_once(runs)) == 8 and len(runs) == 8
    finally:
        stop(server)
