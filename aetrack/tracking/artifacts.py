"""Models as MLflow artifacts: a model folder (aetrack.modelio) logged as a "models from code" pyfunc
model, for a generator and for the reference classifier alike, and read back from a model URI."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

import aetrack
from aetrack import modelio
from aetrack.config import UserError
from aetrack.samplers import LatentMixture
from aetrack.serving import generator as served
from aetrack.serving import reference as served_reference

GENERATOR_ARTIFACT = "model"
PACKAGE = Path(aetrack.__file__).parent  # shipped with every model: loading it imports aetrack, never unpickles


def log_pyfunc(entry: Path, folder: Path, artifact: str, *, signature, registered_model_name: str | None = None,
               input_example=None, metadata: dict | None = None, name: str = "model"):
    """Log `folder` as the active run's pyfunc model `name` (runs:/RUN_ID/NAME), loaded by the entry file `entry`."""
    with pinned_here():
        return mlflow.pyfunc.log_model(name=name, python_model=str(entry), artifacts={artifact: str(folder)},
                                       code_paths=[str(PACKAGE)], signature=signature, input_example=input_example,
                                       registered_model_name=registered_model_name,
                                       pip_requirements=served.requirements(), metadata=metadata)


@contextlib.contextmanager
def pinned_here():
    """MLflow checks a model's requirements against this environment (`warn_dependency_requirement_mismatches`, when
    it writes the model and again when it loads it to check the input example) by mapping every installed distribution
    to its modules: 6 s of a 38 s digits run (profiled, quiet machine). aetrack's requirements are pinned from this
    very environment (`served.requirements`), so the check cannot find a mismatch: it is skipped while the model is
    logged. Where MLflow has no such function, nothing changes."""
    from mlflow import pyfunc
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    checks = {module: getattr(module, name) for module in (environment, pyfunc) if hasattr(module, name)}
    for module in checks:
        setattr(module, name, lambda requirements: None)
    try:
        yield
    finally:
        for module, check in checks.items():
            setattr(module, name, check)


def log_generator(model_dir: Path, registered_model_name: str | None = None):
    """Log a saved generator folder as the run's pyfunc model, named after its variant (`vae`: the Models tab and
    runs:/RUN_ID/vae), and register it when a name is given."""
    _, info, _ = modelio.load(model_dir)
    return log_pyfunc(served.PYFUNC_FILE, model_dir, GENERATOR_ARTIFACT, signature=served.SIGNATURE,
                      registered_model_name=registered_model_name, name=info.config.model,
                      input_example=(served.input_example(info), {"seed": 0}), metadata=served.metadata(info))


def log_reference(folder: Path, registered_model_name: str):
    return log_pyfunc(served_reference.PYFUNC_FILE, folder, served_reference.ARTIFACT,
                      signature=served_reference.SIGNATURE, registered_model_name=registered_model_name)


def pyfunc_artifact(model_dir: Path, key: str) -> Path:
    """The local folder of artifact `key` inside a downloaded pyfunc model (as its MLmodel file names it)."""
    import yaml

    meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    return Path(model_dir) / meta["flavors"]["python_function"]["artifacts"][key]["path"]


def with_model_folder(model_uri: str, key: str, read):
    """`read(folder)` on the model folder inside the pyfunc model at `model_uri`, downloaded to a temporary place."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        return read(pyfunc_artifact(local, key))


@dataclass
class LoggedModel:
    run_id: str
    model_uri: str
    model: object                       # the torch module
    info: modelio.ModelInfo
    sampler: LatentMixture | None       # the autoencoder's fitted latent mixture, if any
    params: dict[str, str]


class NotFromARun(UserError):
    """A model URI that no run logged."""


def model_uri_of(target: str) -> str:
    """A run id (its logged model: runs:/RUN_ID/<variant>, or runs:/RUN_ID/model as older runs named it), or any
    MLflow model URI (runs:/, models:/, m-...)."""
    if ":/" in target:
        return target
    outputs = mlflow.MlflowClient().get_run(target).outputs
    logged = outputs.model_outputs if outputs else []
    name = mlflow.MlflowClient().get_logged_model(logged[-1].model_id).name if logged else GENERATOR_ARTIFACT
    return f"runs:/{target}/{name}"


def load_logged(target: str, device="cpu") -> LoggedModel:
    """The model as logged (the model folder inside the pyfunc model) and its run's params."""
    uri = model_uri_of(target)
    run_id = mlflow.models.get_model_info(uri).run_id
    if not run_id:
        raise NotFromARun(f"{uri} was not logged by a run; evaluate needs the run to log the metrics to")
    model, info, extra = with_model_folder(uri, GENERATOR_ARTIFACT, lambda folder: modelio.load(folder, device))
    params = mlflow.MlflowClient().get_run(run_id).data.params
    return LoggedModel(run_id, uri, model, info, LatentMixture.from_state(extra), params)


_LOADED: dict[str, tuple[object, dict]] = {}  # the models `names_one_model` URIs name, read once per process


def load_model(target: str) -> tuple[object, dict]:
    """A logged model (run id or model URI) on the CPU and its model folder's meta, with `source`, its URI: what a
    stacked variant is built on (M1+M2's VAE). One that cannot be loaded is a one-line UserError.

    A URI that always names the same model is downloaded once per process and each call gets its own copy: a tuning
    worker's trials on one M1 read it once (a run id is its last logged model's runs:/ URI, looked up each time). An
    alias (models:/NAME@ALIAS) and `latest` are read each time."""
    try:
        uri = model_uri_of(target)
        if uri in _LOADED:
            model, meta = _LOADED[uri]
            return copy.deepcopy(model), dict(meta)
        logged = load_logged(uri)
    except Exception as err:  # noqa: BLE001 - a wrong id or URI, an unreachable server: one line either way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load a logged model from it ({first})") from None
    info = logged.info
    meta = {"params": info.config.to_params(), "shape": list(info.shape), "classes": list(info.classes),
            "source": logged.model_uri}
    model = logged.model.cpu()
    if names_one_model(uri):
        _LOADED[uri] = (copy.deepcopy(model), dict(meta))
    return model, meta


def names_one_model(target: str) -> bool:
    """Whether the URI `target` names the same model whenever it is read: runs:/RUN/PATH, models:/NAME/VERSION and
    models:/m-ID do; an alias and `latest` may name another later."""
    if target.startswith("runs:/"):
        return True
    parts = target.removeprefix("models:/").split("/") if target.startswith("models:/") else []
    return (len(parts) == 2 and parts[1].isdigit()) or (len(parts) == 1 and parts[0].startswith("m-"))
