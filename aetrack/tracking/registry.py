"""The MLflow model registry: aliases (not stages), a listing of aetrack's registered models, and offline
generation through the same pyfunc model that a server runs."""

from __future__ import annotations

from datetime import datetime

import mlflow

from aetrack.tracking import metric_names as names

KEY_METRICS = (names.BEST_VAL_LOSS, *(names.test(m) for m in ("recon_loss", "neg_elbo", "nll_iw", "fcd",
                                                               "label_accuracy", "error")))


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
        from aetrack.config import TrainConfig
        from aetrack.tracking.describe import registered_model_description

        client.update_registered_model(name, registered_model_description(name, TrainConfig.from_params(run.data.params)))


def tag_versions_of_run(client, run_id: str, metrics: dict[str, float], description: str | None = None) -> None:
    """After evaluation: every registered version of `run_id`'s model gains the run's key test figures (and the
    run's description with them)."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        for key, value in version_tags(metrics).items():
            client.set_model_version_tag(version.name, version.version, key, value)
        if description:
            client.update_model_version(version.name, version.version, description=description)


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
