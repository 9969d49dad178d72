"""Model folders: a trained network as plain files, the same for a generator and the reference classifier.

A folder holds `config.json` (what rebuilds the network) and `weights.pt`, a state dict loaded with
`weights_only=True` (no arbitrary unpickling). MLflow logs such a folder as a pyfunc model's artifact
(aetrack.tracking.artifacts); serving loads it back from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from aetrack.config import TrainConfig
from aetrack.models import BuiltOn, build_model

CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.pt"


def write_folder(directory: Path, meta: dict, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    torch.save(state, directory / WEIGHTS_FILE)
    return directory


def read_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def read_folder(directory: Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    state = torch.load(Path(directory) / WEIGHTS_FILE, map_location=device, weights_only=True)
    return read_meta(directory), state


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class ModelInfo:
    config: TrainConfig
    shape: tuple[int, int, int]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def save(model: torch.nn.Module, info: ModelInfo, directory: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A generator's folder; `extra` tensors (say a fitted latent sampler) ride along in the weights file."""
    meta = {"params": info.config.to_params(), "shape": list(info.shape), "classes": list(info.classes)}
    if isinstance(model, BuiltOn):  # what rebuilds the logged model it is built on (its weights are in the state dict)
        meta["built_on"] = model.built_on()
    return write_folder(directory, meta, {"model": cpu_state(model), "extra": extra or {}})


def load(directory: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelInfo, dict[str, torch.Tensor]]:
    meta, state = read_folder(directory, device)
    info = ModelInfo(TrainConfig.from_params(meta["params"]), tuple(meta["shape"]), tuple(meta["classes"]))
    saved = meta.get("built_on", meta.get("features"))  # "features": M1+M2 folders written before it was a variant
    model = build_model(info.config, info.shape, info.num_classes, saved=saved)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), info, state.get("extra", {})
