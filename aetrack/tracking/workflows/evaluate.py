"""`aetrack evaluate`'s work: load a logged model and its data set, evaluate it (aetrack.evaluation), and log
the result to its run as `test/<name>` metrics and `evaluation/*` artifacts."""

from __future__ import annotations

import math
from typing import Callable

import mlflow
from mlflow.entities import Metric
from mlflow.utils.time import get_current_time_millis

from aetrack import data as datasets
from aetrack.config import ConfigError
from aetrack.evaluation import Evaluation, Settings, evaluate_model
from aetrack.models import REGISTRY
from aetrack.tracking import lifecycle
from aetrack.tracking import metric_names as names
from aetrack.tracking.artifacts import LoggedModel, load_logged
from aetrack.tracking.describe import NOTE, with_test_figures
from aetrack.tracking.reference import reference_classifier
from aetrack.tracking.registry import tag_versions_of_run


def log_evaluation(run_id: str, evaluation: Evaluation) -> None:
    """Metrics as test/<name>; pictures, tables and notes under evaluation/ in the run's artifacts; the key test
    figures join the run's description and its model versions' tags."""
    client, now = mlflow.MlflowClient(), get_current_time_millis()
    metrics = [Metric(names.test(k), float(v), now, 0) for k, v in evaluation.metrics.items() if math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    note_evaluation(client, run_id)
    for name, picture in evaluation.pictures.items():
        client.log_image(run_id, picture, artifact_file=f"evaluation/{name}.png")
    client.log_dict(run_id, {"metrics": evaluation.metrics, "notes": evaluation.notes, "tables": evaluation.tables},
                    "evaluation/evaluation.json")


def note_evaluation(client, run_id: str) -> None:
    """After `aetrack evaluate`: the run's description and its model versions' tags gain the key test figures."""
    run = client.get_run(run_id)
    note = with_test_figures(run.data.tags.get(NOTE, ""), run.data.metrics)
    client.set_tag(run_id, NOTE, note)
    tag_versions_of_run(client, run_id, run.data.metrics, description=note)


def evaluate_run(target: str, settings: Settings = Settings(), *, use_reference: bool = True, baseline: str | None = None,
                 data_dir: str | None = None, download: bool = False, device="cpu", log: bool = True,
                 echo: Callable[[str], None] = print) -> tuple[LoggedModel, Evaluation]:
    """Load a logged model and its data set, evaluate it, and (with `log`) log the result to its run."""
    logged = load_logged(target, device)
    lifecycle.close_dead_runs(mlflow.MlflowClient().get_run(logged.run_id).info.experiment_id, echo)
    config = logged.info.config
    variant = REGISTRY[config.model]
    data = datasets.load_for(config, data_dir=data_dir, download=download, device=device)
    # The reference classifier reads grey levels: the same split before binarization.
    grey = data if config.binarize == "none" else datasets.load_for(config, data_dir=data_dir, download=download,
                                                                    binarize="none", device=device)
    other = None
    if baseline:
        if not variant.denoising:
            raise ConfigError("--baseline applies to a denoising autoencoder (dae) only")
        other = load_logged(baseline, device)
        if other.info.config.dataset != config.dataset:
            raise ConfigError(f"--baseline was trained on {other.info.config.dataset}, not {config.dataset}")
    classifier = None
    if use_reference and (variant.generative or logged.sampler is not None):
        classifier = reference_classifier(config.dataset, data_dir=data_dir, download=download, device=device, log=echo)
    result = evaluate_model(logged.model, config, data, settings=settings, reference=classifier, sampler=logged.sampler,
                            baseline=None if other is None else other.model, grey_data=grey)
    if classifier is not None and classifier.test_accuracy is not None:
        result.notes["reference"] = f"{classifier.name} v{classifier.version}, test accuracy {classifier.test_accuracy:.4f}"
    if log:
        log_evaluation(logged.run_id, result)
    return logged, result
