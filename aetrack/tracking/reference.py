"""The reference classifier of each data set, registered in MLflow as `aetrack-<dataset>-reference-classifier`
(its test accuracy logged with it) and trained once: later evaluations load the registered version."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from aetrack.evaluation.reference import EPOCHS, RECIPE, Classifier, load_folder, save_folder, train_classifier
from aetrack.serving.reference import ARTIFACT
from aetrack.tracking import describe, tags
from aetrack.tracking import metric_names as names
from aetrack.tracking.artifacts import log_reference, with_model_folder

EXPERIMENT = "aetrack-reference-classifiers"


def registered_name(dataset: str) -> str:
    return f"aetrack-{dataset}-reference-classifier"


def find_version(client: mlflow.MlflowClient, name: str) -> str | None:
    """The newest registered version trained by the current recipe, if any."""
    versions = client.search_model_versions(f"name = '{name}'")
    usable = [int(v.version) for v in versions if v.tags.get(tags.RECIPE) == RECIPE]
    return str(max(usable)) if usable else None


def reference_classifier(dataset: str, *, data_dir: str | None = None, download: bool = False, device="cpu",
                         log=None, nested: bool = False) -> Classifier:
    """The registered reference classifier of `dataset`, trained and registered on first use.

    It is trained on the data set's canonical training split (grey levels, seed 0, 10 % held out), whichever
    run asked first, so that it does not depend on that run's settings. `nested`: the caller has a run open, in
    which the classifier's training run is then nested.
    """
    client = mlflow.MlflowClient()
    name = registered_name(dataset)
    version = find_version(client, name)
    if version is not None:
        return load(name, version, device)
    from aetrack import data as datasets

    data = datasets.load(dataset, data_dir=data_dir, download=download, device=device)
    if log:
        log(f"training the reference classifier for {dataset} (once; it is registered as {name})")
    classifier = train_classifier(data.train_x, data.train_y, data.shape, data.num_classes, data.name)
    classifier.test_accuracy = classifier.accuracy(data.test_x, data.test_y)
    classifier.name, classifier.version = name, register(classifier, data, client, nested=nested)
    return classifier


def register(classifier: Classifier, data, client: mlflow.MlflowClient, *, nested: bool = False) -> str:
    name = registered_name(data.name)
    experiment_id = describe.open_experiment(client, EXPERIMENT, "Reference classifiers that score generated samples "
                                             "(FCD, KID, label accuracy), one registered model per data set.")
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=nested), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({"dataset": data.name, "recipe": RECIPE, "epochs": EPOCHS.get(data.name, 5),
                           "train_images": len(data.train_y)})
        mlflow.set_tags({tags.KIND: tags.KIND_REFERENCE, tags.DATASET: data.name})
        mlflow.log_metric(names.test("accuracy"), classifier.test_accuracy)
        folder = save_folder(classifier, data, Path(tmp) / ARTIFACT)
        logged = log_reference(folder, name)
    version = str(logged.registered_model_version)
    client.set_model_version_tag(name, version, tags.RECIPE, RECIPE)
    client.set_model_version_tag(name, version, tags.TEST_ACCURACY, f"{classifier.test_accuracy:.4f}")
    return version


def load(name: str, version: str, device="cpu") -> Classifier:
    client = mlflow.MlflowClient()
    net = with_model_folder(f"models:/{name}/{version}", ARTIFACT, lambda folder: load_folder(folder, device))
    accuracy = client.get_model_version(name, version).tags.get(tags.TEST_ACCURACY)
    return Classifier(net, name, version, None if accuracy is None else float(accuracy))
