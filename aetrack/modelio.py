"""Saving and rebuilding a trained model from plain files: the config as JSON and
the weights as a state dict loaded with `weights_only=True` (no arbitrary unpickling)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from aetrack.config import TrainConfig
from aetrack.models import build_model

CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.pt"


@dataclass(frozen=True)
class ModelInfo:
    config: TrainConfig
    shape: tuple[int, int, int]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def save(model: torch.nn.Module, info: ModelInfo, directory: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json and weights.pt; `extra` tensors (say a fitted latent sampler) ride along in the weights file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"params": info.config.to_params(), "shape": list(info.shape), "classes": list(info.classes)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": extra or {}}
    torch.save(state, directory / WEIGHTS_FILE)
    return directory


def load(directory: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelInfo, dict[str, torch.Tensor]]:
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    info = ModelInfo(TrainConfig.from_params(meta["params"]), tuple(meta["shape"]), tuple(meta["classes"]))
    model = build_model(info.config, info.shape, info.num_classes)
    state = torch.load(directory / WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), info, state.get("extra", {})
