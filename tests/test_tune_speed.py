"""Tuning workers share a machine's cores: without --threads each trial takes the cores divided among the
workers of this host that are running a trial."""

from __future__ import annotations

import os

import optuna

from aetrack.tuning.objective import HOST, WORKER, shared_threads


def test_a_lone_worker_takes_every_core_and_workers_on_one_host_share_them():
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
