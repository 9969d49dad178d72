"""The training loop. It knows nothing of MLflow or Optuna: it takes a config,
data and callbacks, and returns a history. Tracking and tuning wrap it."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from aetrack.config import TrainConfig
from aetrack.data import Splits
from aetrack.models import REGISTRY, build_model


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, model: torch.nn.Module, metrics: dict[str, float]) -> None: ...


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device auto or cpu)")
    return torch.device(name)


def labeled_indices(y: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """`count` training indices balanced over classes (as in Kingma et al. 2014), fixed by the seed."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    y_cpu = y.cpu()[order]
    per_class = [order[y_cpu == c] for c in range(num_classes)]
    quota = [count // num_classes + (1 if c < count % num_classes else 0) for c in range(num_classes)]
    chosen = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    if len(chosen) < count:  # a class too small for its quota: fill from the rest
        rest = order[~torch.isin(order, chosen)]
        chosen = torch.cat([chosen, rest[: count - len(chosen)]])
    return chosen.to(y.device)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean of the loss and each of its parts over a whole split."""
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        out = model(xb, yb)
        for name, value in {"loss": out.loss, **out.parts}.items():
            totals[name] = totals.get(name, 0.0) + value.detach() * len(xb)
    model.train()
    return {name: float(total) / len(x) for name, total in totals.items()}


def fit(config: TrainConfig, data: Splits, *, model: torch.nn.Module | None = None,
        log: Callable[[dict[str, float], int], None] | None = None,
        callbacks: tuple[Callback, ...] = (), checkpoint_dir: Path | None = None,
        progress: bool = True) -> tuple[torch.nn.Module, History]:
    """Train `config.model` on `data`; returns the model at its best validation loss and the history."""
    torch.manual_seed(config.seed)
    device = data.train_x.device
    variant = REGISTRY[config.model]
    model = (model or build_model(config, data.shape, data.num_classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    n_train = len(data.train_x)
    labeled = labeled_indices(data.train_y, config.labeled, data.num_classes, config.seed) if variant.semi_supervised else None
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    history, best_state, stale, step = History(), None, 0, 0

    for epoch in range(config.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(n_train, generator=generator, device=device)
        running: dict[str, torch.Tensor] = {}
        count, epoch_loss = 0, torch.zeros((), device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for i in bar:
            x, y = data.train_batch(order[i * config.batch_size:(i + 1) * config.batch_size], generator)
            if labeled is not None:
                # M2: the drawn batch is unlabelled; a labelled batch of the same size joins it.
                pick = labeled[torch.randint(len(labeled), (min(config.batch_size, len(labeled)),), generator=generator, device=device)]
                xl, yl = data.train_batch(pick, generator)
                x, y = torch.cat([x, xl]), torch.cat([torch.full_like(y, -1), yl])
            out = model(x, y, epoch=epoch + i / steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            epoch_loss += out.loss.detach()
            for name, value in {"loss": out.loss, **out.parts}.items():
                running[name] = running.get(name, 0.0) + value.detach()
            count += 1
            # Only every log_every steps do values leave the device: no sync on the hot path.
            if step % config.log_every == 0 or i == steps_per_epoch - 1:
                metrics = {f"train_{k}": float(v) / count for k, v in running.items()}
                running, count = {}, 0
                bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
                if not math.isfinite(metrics["train_loss"]):
                    raise FloatingPointError(f"training loss became {metrics['train_loss']} at step {step}; try a lower --lr")
                if log:
                    log(metrics, step)
        bar.close()
        elapsed = time.perf_counter() - started
        val = evaluate_loss(model, data.val_x, data.val_y, max(config.batch_size, 512))
        metrics = {f"val_{k}": v for k, v in val.items()}
        metrics.update(epoch=epoch + 1, train_epoch_loss=float(epoch_loss) / steps_per_epoch, epoch_time=elapsed, samples_per_sec=n_train / elapsed)
        history.epochs.append(metrics)
        if log:
            log(metrics, step)
        if val["loss"] < history.best_val_loss:
            history.best_val_loss, history.best_epoch, stale = val["loss"], epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if checkpoint_dir is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "config": config.to_params()}, checkpoint_dir / "last.pt")
        for callback in callbacks:
            callback.on_epoch_end(epoch + 1, model, metrics)
        if progress:
            tqdm.write(f"epoch {epoch + 1}: val_loss {val['loss']:.4f}  ({elapsed:.1f}s, {n_train / elapsed:.0f} samples/s)")
        if config.patience and stale >= config.patience:
            history.stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history
