"""The MLflow model registry: aliases (not stages), a listing of aetrack's registered models, and offline
generation through the same pyfunc model that a server runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import mlflow

from aetrack.config import TrainConfig
from aetrack.tracking import metric_names as names
from aetrack.tracking import tags
from aetrack.tracking.describe import registered_model_description
from aetrack.tracking.metric_names import champion_metric  # noqa: F401 (re-exported)

KEY_METRICS = (names.BEST_VAL_LOSS, *(names.test(m) for m in names.KEY_TEST_METRICS))


def version_tags(metrics: dict[str, float]) -> dict[str, str]:
    """A model version's tags: its run's key figures (`val/best_loss`, `test/fcd`, ...), as the registry shows them."""
    return {key: f"{metrics[key]:.4g}" for key in KEY_METRICS if key in metrics}


def describe_version(client, name: str, version: str, run, description: str) -> None:
    """Tag a new model version with its run's key metrics, describe it, and describe the registered model
    where nobody has."""
    for key, value in version_tags(run.data.metrics).items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, registered_model_description(name, TrainConfig.from_params(run.data.params)))


def tag_versions_of_run(client, run_id: str, metrics: dict[str, float], description: str | None = None) -> None:
    """After evaluation: every registered version of `run_id`'s model gains the run's key test figures (and the
    run's description with them)."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        for key, value in version_tags(metrics).items():
            client.set_model_version_tag(version.name, version.version, key, value)
        if description:
            client.update_model_version(version.name, version.version, description=description)


CHAMPION = "champion"


def run_score(client, run_id: str, metric: str) -> float | None:
    """A run's `metric` (the training loop's key) at its kept epoch, the one its model was saved from: what a
    tuning trial's objective is, and what ranks versions for the champion. None when the run did not log it."""
    run = client.get_run(run_id)
    if run.data.tags.get(tags.OPTUNA_METRIC) == metric and "objective" in run.data.metrics:
        return run.data.metrics["objective"]
    best_epoch = run.data.metrics.get(names.BEST_EPOCH)
    for m in client.get_metric_history(run_id, names.logged(metric)):  # epoch metrics: step = epoch
        if m.step == best_epoch:
            return m.value
    return None


@dataclass(frozen=True)
class Crowning:
    model: str
    version: str | None       # the champion after the decision
    crowned: bool             # whether the candidate took (or already held) the alias
    candidate: str | None     # the version the command registered
    value: float | None       # the candidate's score
    previous: str | None = None
    previous_value: float | None = None
    note: str = ""


def crown(client, model: str, metric: str, *, candidate: str | None = None, minimize: bool = True) -> Crowning:
    """Point `@champion` of `model` at its best version on `metric` (`run_score`: each version's run, at its kept
    epoch), never at a worse one. With no champion, the best of all versions takes the alias. With one, the alias
    moves only to `candidate` (the version this command registered), and only when it beats every version on
    `metric`, the champion included: a champion chosen by hand (`aetrack promote`) stays until something better
    than everything comes."""
    from mlflow.exceptions import MlflowException

    scores = {}
    for version in client.search_model_versions(f"name = '{model}'"):
        if version.run_id and (score := run_score(client, version.run_id, metric)) is not None:
            scores[str(version.version)] = score
    try:
        holder = str(client.get_model_version_by_alias(model, CHAMPION).version)
    except MlflowException:
        holder = None
    sign = 1 if minimize else -1
    # The best score; among equals the champion, else the oldest version: an equal newcomer takes nothing.
    best = min(scores, key=lambda v: (sign * scores[v], v != holder, int(v)), default=None)
    value, held = scores.get(candidate), scores.get(holder)
    if holder is not None and holder == best:
        return Crowning(model, holder, candidate == holder, candidate, value, holder, held,
                        "already champion" if candidate == holder else "the champion is at least as good; it stays")
    if holder is None and best is not None:
        client.set_registered_model_alias(model, CHAMPION, best)
        return Crowning(model, best, candidate == best, candidate, value, None, None,
                        "" if candidate == best else f"version {best} is better on {metric}")
    if holder is not None and best == candidate and held is not None:
        client.set_registered_model_alias(model, CHAMPION, best)
        return Crowning(model, best, True, candidate, value, holder, held)
    why = (f"the champion logged no {metric} to compare with; it stays" if holder is not None and held is None
           else f"version {best} is better on {metric}; the champion stays" if best is not None else f"no version logged {metric}")
    return Crowning(model, holder, False, candidate, value, holder, held, why)


def promote(client, name: str, version: str, alias: str) -> None:
    """Point `alias` of registered model `name` at `version`."""
    client.get_model_version(name, version)  # fails in one line when there is no such version
    client.set_registered_model_alias(name, alias, version)


def registered_versions(client, pattern: str) -> list[dict]:
    """Every version of the registered models whose name matches `pattern` (SQL LIKE), newest first."""
    rows = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{pattern}'", order_by=["name ASC"]):
        versions = client.search_model_versions(f"name = '{model.name}'")
        for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
            metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
            rows.append({
                "name": model.name,
                "version": int(version.version),
                "aliases": sorted(alias for alias, number in model.aliases.items() if str(number) == str(version.version)),
                "run_id": version.run_id,
                "created": datetime.fromtimestamp(version.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M"),
                "metrics": {key: metrics[key] for key in KEY_METRICS if key in metrics},
            })
    return rows


def generate_grid(model_uri: str, count: int, *, label: int | None, seed: int, temperature: float, nrow: int):
    """`count` images from the pyfunc model at `model_uri`, as one grid picture."""
    import torch

    from aetrack import images
    from aetrack.serving.generator import decode_png

    pyfunc = mlflow.pyfunc.load_model(model_uri)
    row = {"n": count} if label is None else {"n": count, "label": label}
    answer = pyfunc.predict([row], params={"seed": seed, "temperature": temperature, "output": "png"})
    pictures = [torch.from_numpy(decode_png(text)).float() / 255 for text in answer["image"]]
    batch = torch.stack([p.unsqueeze(0) if p.dim() == 2 else p.permute(2, 0, 1) for p in pictures])
    return images.grid(batch, nrow), len(batch)
