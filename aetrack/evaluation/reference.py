"""The reference classifier: one small CNN per data set, whose penultimate layer is the feature space in
which FCD and KID compare generated with real images, and whose recipe trains CAS classifiers.

Training it here needs no MLflow; tracking/reference.py registers it once per data set and reuses it,
so that every run on a data set is scored by the same network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aetrack import modelio
from aetrack.evaluation.measures import batches

# Bump when the network or its training changes: versions trained by another recipe are not reused.
RECIPE = "cnn-32-64-128-v1"
EPOCHS = {"digits": 40, "mnist": 3, "fashion-mnist": 5, "cifar10": 10}


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
    def _apply(self, layer, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        self.net.eval()
        device = next(self.net.parameters()).device
        return torch.cat([layer(x[index].to(device)) for index in batches(len(x), batch_size)]).to(x.device)

    def features(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Penultimate-layer activations, (N, 128)."""
        return self._apply(self.net.body, x, batch_size)

    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        return self._apply(lambda xb: self.net(xb).argmax(-1), x, batch_size)

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


def save_folder(classifier: Classifier, data, directory: Path) -> Path:
    meta = {"shape": list(data.shape), "classes": list(data.classes), "recipe": RECIPE}
    return modelio.write_folder(directory, meta, modelio.cpu_state(classifier.net))


def load_folder(directory: Path, device="cpu") -> ReferenceNet:
    meta, state = modelio.read_folder(directory, device)
    net = ReferenceNet(tuple(meta["shape"]), len(meta["classes"]))
    net.load_state_dict(state)
    return net.to(device).eval()
