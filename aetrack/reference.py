"""The reference classifier: one small CNN per data set, trained once on its training split and
registered in MLflow as `aetrack-<dataset>-reference-classifier` (its test accuracy logged with it).

Its penultimate layer is the feature space in which FCD and KID compare generated with real
images, so every run on a data set is scored by the same network: later evaluations load the
registered version instead of training again. Weights load as a state dict (weights_only).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Bump when the network or its training changes: versions trained by another recipe are not reused.
RECIPE = "cnn-32-64-128-v1"
EPOCHS = {"digits": 40, "mnist": 3, "fashion-mnist": 5, "cifar10": 10}
EXPERIMENT = "aetrack-reference-classifiers"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.pt"

# Entry file of the logged pyfunc model ("models from code"): nothing is unpickled when it loads.
_ENTRY = """import mlflow
from aetrack.reference import ReferencePyfunc
mlflow.models.set_model(ReferencePyfunc())
"""


def registered_name(dataset: str) -> str:
    return f"aetrack-{dataset}-reference-classifier"


class ReferenceNet(nn.Module):
    """Two conv-ReLU-maxpool blocks, a 128-unit ReLU layer (the features) and a linear head; any (C, H, W) >= 4x4."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, channels: tuple[int, int] = (32, 64), width: int = 128):
        super().__init__()
        c, h, w = shape
        self.body = nn.Sequential(
            nn.Conv2d(c, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(channels[1] * (h // 4) * (w // 4), width), nn.ReLU(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Classifier:
    net: ReferenceNet
    name: str = "classifier"
    version: str | None = None
    test_accuracy: float | None = None

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Penultimate-layer activations, (N, 128)."""
        self.net.eval()
        device = next(self.net.parameters()).device
        return torch.cat([self.net.body(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]).to(x.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        self.net.eval()
        device = next(self.net.parameters()).device
        return torch.cat([self.net(x[i:i + batch_size].to(device)).argmax(-1) for i in range(0, len(x), batch_size)]).to(x.device)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).float().mean())


def train_classifier(x: torch.Tensor, y: torch.Tensor, shape, num_classes: int, dataset: str, seed: int = 0,
                     epochs: int | None = None, batch_size: int = 128, lr: float = 1e-3) -> Classifier:
    """The reference recipe (Adam, a few epochs) on any labelled images: the reference itself, or CAS on generated ones."""
    torch.manual_seed(seed)
    net = ReferenceNet(tuple(shape), num_classes).to(x.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator(x.device).manual_seed(seed)
    net.train()
    for _ in range(epochs or EPOCHS.get(dataset, 5)):
        order = torch.randperm(len(x), generator=generator, device=x.device)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(net(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    return Classifier(net)


def find_version(client: mlflow.MlflowClient, name: str) -> str | None:
    """The newest registered version trained by the current recipe, if any."""
    versions = client.search_model_versions(f"name = '{name}'")
    usable = [int(v.version) for v in versions if v.tags.get("recipe") == RECIPE]
    return str(max(usable)) if usable else None


def reference_classifier(dataset: str, *, data_dir: str | None = None, download: bool = False, device="cpu",
                         log=None) -> Classifier:
    """The registered reference classifier of `dataset`, trained and registered on first use.

    It is trained on the data set's canonical training split (grey levels, seed 0, 10 % held out), whichever
    run asked first, so that it does not depend on that run's settings.
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
    classifier.name, classifier.version = name, register(classifier, data, client)
    return classifier


def register(classifier: Classifier, data, client: mlflow.MlflowClient) -> str:
    from aetrack.serving import requirements

    name = registered_name(data.name)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=nested), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({"dataset": data.name, "recipe": RECIPE, "epochs": EPOCHS.get(data.name, 5),
                           "train_images": len(data.train_x)})
        mlflow.set_tags({"aetrack.kind": "reference-classifier", "dataset": data.name})
        mlflow.log_metric("test_accuracy", classifier.test_accuracy)
        folder = Path(tmp) / "reference"
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(json.dumps({"shape": list(data.shape), "classes": list(data.classes), "recipe": RECIPE}))
        torch.save({k: v.detach().cpu() for k, v in classifier.net.state_dict().items()}, folder / WEIGHTS_FILE)
        entry = Path(tmp) / "reference_model.py"
        entry.write_text(_ENTRY)
        logged = mlflow.pyfunc.log_model(name="model", python_model=str(entry), artifacts={"reference": str(folder)},
                                         code_paths=[str(Path(__file__).parent)], signature=_signature(),
                                         registered_model_name=name, pip_requirements=requirements())
    version = str(logged.registered_model_version)
    client.set_model_version_tag(name, version, "recipe", RECIPE)
    client.set_model_version_tag(name, version, "test_accuracy", f"{classifier.test_accuracy:.4f}")
    return version


def load(name: str, version: str, device="cpu") -> Classifier:
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        net = load_folder(pyfunc_artifact(local, "reference"), device)
    accuracy = client.get_model_version(name, version).tags.get("test_accuracy")
    return Classifier(net, name, version, None if accuracy is None else float(accuracy))


def load_folder(folder: Path, device="cpu") -> ReferenceNet:
    meta = json.loads((folder / CONFIG_FILE).read_text())
    net = ReferenceNet(tuple(meta["shape"]), len(meta["classes"]))
    net.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location=device, weights_only=True))
    return net.to(device).eval()


def pyfunc_artifact(model_dir: Path, key: str) -> Path:
    """The local folder of artifact `key` inside a downloaded pyfunc model (as its MLmodel file names it)."""
    import yaml

    meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    return Path(model_dir) / meta["flavors"]["python_function"]["artifacts"][key]["path"]


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(Array("double"), "pixels")]),
                          outputs=Schema([ColSpec("long", "label")]))


class ReferencePyfunc(mlflow.pyfunc.PythonModel):
    """Serves the classifier: each row's `pixels` (C*H*W values in [0, 1]) -> its predicted `label`."""

    def load_context(self, context):
        self.net = load_folder(Path(context.artifacts["reference"]))
        self.shape = json.loads((Path(context.artifacts["reference"]) / CONFIG_FILE).read_text())["shape"]

    def predict(self, context, model_input, params=None):
        import pandas as pd

        x = torch.tensor(np.stack(model_input["pixels"].to_list()), dtype=torch.float32).view(-1, *self.shape)
        return pd.DataFrame({"label": Classifier(self.net).predict(x).numpy()})
