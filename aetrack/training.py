"""The training loop. It knows nothing of MLflow or Optuna: it takes a config,
data and callbacks, and returns a history. Tracking and tuning wrap it."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from aetrack import checkpoints, memory
from aetrack.config import TrainConfig, resolve_device  # noqa: F401 (resolve_device: re-exported)
from aetrack.data import Splits
from aetrack.models import OwnBatches, build_model
from aetrack.nets import Decoder


class Diverged(FloatingPointError):
    """The training loss stopped being finite. `model` holds the weights of the best epoch before that (if any
    finished), `history` what was trained: the caller can still keep them."""

    def __init__(self, message: str, model: torch.nn.Module, history: "History"):
        super().__init__(message)
        self.model, self.history = model, history


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, model: torch.nn.Module, metrics: dict[str, float]) -> None: ...


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    stopped_early: bool = False
    config: TrainConfig | None = None  # the config as trained, every `auto` setting resolved


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


MIN_LR_FRACTION = 0.01  # where cosine ends
# Burda et al. 2015, section 5: stage i in 0..7 lasts 3^i epochs (3280 in all) at a rate of 10^(-i/7) times the first.
BURDA_STAGES = [3 ** i for i in range(8)]
BURDA_ENDS = [sum(BURDA_STAGES[:i + 1]) / sum(BURDA_STAGES) for i in range(8)]


class LearningRate:
    """The multiplier of --lr at each optimiser step: linear warm-up, then the schedule's shape. For `plateau` the
    multiplier halves whenever the validation loss has not improved for a quarter of --patience epochs (at least 2)."""

    def __init__(self, config: TrainConfig, total_steps: int):
        self.config, self.total_steps = config, total_steps
        self.plateau_scale, self.best, self.bad_epochs = 1.0, math.inf, 0
        self.plateau_patience = max(2, (config.patience or 8) // 4)

    def __call__(self, step: int) -> float:
        config = self.config
        warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        progress = min(1.0, step / max(1, self.total_steps - 1))
        if config.lr_schedule == "cosine":
            shape = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
        elif config.lr_schedule == "step":
            shape = 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        elif config.lr_schedule == "burda":
            stage = next(i for i, end in enumerate(BURDA_ENDS) if step / max(1, self.total_steps) < end or i == 7)
            shape = 10 ** (-stage / 7)
        else:
            shape = self.plateau_scale  # 1 for constant
        return warmup * shape

    def state_dict(self) -> dict[str, float]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale, self.best, self.bad_epochs = state["plateau_scale"], state["best"], int(state["bad_epochs"])

    def epoch_end(self, val_loss: float) -> None:
        if self.config.lr_schedule != "plateau":
            return
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.plateau_patience:
            self.plateau_scale, self.bad_epochs = self.plateau_scale * 0.5, 0


def pack(epochs: list[dict[str, float]]) -> dict:
    """The history as one tensor for a checkpoint: pickling hundreds of small dicts every epoch costs milliseconds."""
    keys = list(epochs[0]) if epochs else []
    return {"keys": keys, "values": torch.tensor([[e[k] for k in keys] for e in epochs], dtype=torch.float64)}


def unpack(packed: dict) -> list[dict[str, float]]:
    keys = packed["keys"]
    return [{k: int(v) if k == "epoch" else v for k, v in zip(keys, row)} for row in packed["values"].tolist()]


CHECKPOINT_SECONDS = 5.0  # between two checkpoints at least (a digits epoch is ~50 ms, a save ~20 ms); always the
# first epoch (a run killed after it can be resumed) and the last


def frozen(tree):
    """`tree` with every tensor copied: a state_dict() hands out the live tensors, which the next step changes."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: frozen(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(frozen(value) for value in tree)
    return tree


def save_checkpoint(path: Path, state: dict) -> None:
    checkpoints.save(path, {**state, "history": pack(state["history"])})


def kl_scale(config: TrainConfig, epoch: float) -> float:
    """The KL warm-up factor in [0, 1] at a (fractional) epoch: linear over --kl-warmup epochs (Bowman et al. 2016)."""
    return min(1.0, epoch / config.kl_warmup) if config.kl_warmup else 1.0


def bar_size() -> dict[str, int]:
    """tqdm's size arguments: none (tqdm measures the terminal) unless the terminal says it has no size, as a pty
    without a window size does (`script` started outside a terminal, `docker exec -t`, CI runners): tqdm then draws
    nothing at all. There, $COLUMNS x $LINES, else 80 x 24."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # not a terminal (or no file at all): tqdm decides, or draws none
        return {}
    if size.columns and size.lines:
        return {}
    return {"ncols": size.columns or _number(os.environ.get("COLUMNS"), 80),
            "nrows": size.lines or _number(os.environ.get("LINES"), 24)}


def _number(text: str | None, default: int) -> int:
    return int(text) if text and text.isdigit() and int(text) > 0 else default


@torch.no_grad()
def init_output_biases(model: torch.nn.Module, train_x: torch.Tensor) -> None:
    mean_image = train_x.float().mean(0)
    for module in model.modules():
        # Pixel decoders that train: not M1+M2's frozen VAE, nor its M2, whose decoder gives codes.
        if isinstance(module, Decoder) and module.shape == tuple(mean_image.shape) and next(module.parameters()).requires_grad:
            module.init_output_bias(mean_image)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingState:
    """What training changes as it goes, and the parts that change it. `state_dict()` is what a checkpoint holds;
    `load_state_dict` goes on from one and, with the same data, ends with the weights of a run never stopped."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, n_train: int, device: torch.device):
        self.config, self.model, self.device = config, model, device
        # fused: one kernel for the whole update instead of a dozen per parameter (about a fifth of a CPU step).
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.learning_rate = LearningRate(config, config.epochs * config.steps_per_epoch(n_train))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.learning_rate)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.history = History(config=config)
        self.best_model: dict | None = None  # the weights at the best validation loss so far
        self.stale = 0  # epochs since the validation loss last improved
        self.step, self.epoch = 0, 0  # optimiser steps and epochs finished

    @property
    def patience_spent(self) -> bool:
        return bool(self.config.patience) and self.stale >= self.config.patience

    def state_dict(self) -> dict:
        """A copy of this epoch's state (the next epoch changes the live tensors) and the random state it goes on from."""
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        history = self.history
        return {"epoch": self.epoch, "step": self.step, "stale": self.stale,
                "model": frozen(self.model.state_dict()), "optimizer": frozen(self.optimizer.state_dict()),
                "best_model": None if history.best_epoch == self.epoch else self.best_model,  # else the same weights twice
                "best_val_loss": history.best_val_loss, "best_epoch": history.best_epoch, "history": list(history.epochs),
                "learning_rate": self.learning_rate.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.last_epoch = state["step"]  # LambdaLR's next step() sets the rate of the step after it
        self.learning_rate.load_state_dict(state["learning_rate"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        history = self.history
        history.epochs, history.best_val_loss, history.best_epoch = unpack(state["history"]), state["best_val_loss"], state["best_epoch"]
        self.best_model, self.stale, self.step, self.epoch = state["best_model"], state["stale"], state["step"], state["epoch"]
        if self.best_model is None and history.best_epoch == self.epoch:  # saved as "the model itself"
            self.best_model = copy.deepcopy(self.model.state_dict())
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def diverged(self, loss: float) -> Diverged:
        """Diverged, with the model back at its best epoch's weights (if one finished)."""
        if self.best_model is not None:
            self.model.load_state_dict(self.best_model)
        self.model.eval()
        return Diverged(f"training loss became {loss} at step {self.step} (epoch {self.epoch + 1}); try a lower --lr",
                        self.model, self.history)


class Checkpoints:
    """Writes a finished epoch's state to `path` (when there is one): the first, then one whenever CHECKPOINT_SECONDS
    have passed since the last save; `flush` writes the last one kept back, whenever fit ends."""

    def __init__(self, path: Path | None, identity: dict):
        self.path, self.identity = path, identity
        self.unsaved: dict | None = None
        self.saved_at = -math.inf  # the first epoch is saved: a kill can resume

    def epoch_end(self, state: TrainingState) -> None:
        if self.path is None:
            return
        self.unsaved = {**self.identity, **state.state_dict()}
        if time.monotonic() - self.saved_at >= CHECKPOINT_SECONDS:
            self.flush()
            self.saved_at = time.monotonic()

    def flush(self) -> None:
        if self.unsaved is not None:
            save_checkpoint(self.path, self.unsaved)
            self.unsaved = None


def train_one_epoch(state: TrainingState, data: Splits, forward: Callable, draw: Callable,
                    log: Callable[[dict[str, float], int], None] | None, progress: bool) -> float:
    """One pass over the training set in shuffled batches; returns the mean training loss. The running means of the
    loss and its parts go to `log` every --log-every steps; a loss that is no longer finite raises Diverged."""
    config, model, device = state.config, state.model, state.device
    model.train()
    n_train = len(data.train_y)
    per_epoch = config.steps_per_epoch(n_train)
    autocast_dtype = AUTOCAST.get(config.precision)
    order = torch.randperm(n_train, generator=state.generator, device=device)
    running: dict[str, torch.Tensor] = {}
    count, epoch_loss = 0, torch.zeros((), device=device)
    bar = tqdm(range(per_epoch), desc=f"epoch {state.epoch + 1}/{config.epochs}", disable=True if not progress else None,
               leave=False, **bar_size())  # disable=None: no bar off a terminal
    for i in bar:
        x, y = draw(order[i * config.batch_size:(i + 1) * config.batch_size], state.generator)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = forward(x, y, kl_scale=kl_scale(config, state.epoch + i / per_epoch))
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(out.loss).backward()
        if config.grad_clip:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.schedule.step()
        state.step += 1
        epoch_loss += out.loss.detach()
        for name, value in {"loss": out.loss, **out.parts}.items():
            running[name] = running.get(name, 0.0) + value.detach()
        count += 1
        # Only every log_every steps do values leave the device: no sync on the hot path.
        if state.step % config.log_every == 0 or i == per_epoch - 1:
            metrics = {f"train_{k}": float(v) / count for k, v in running.items()}
            running, count = {}, 0
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
            if not math.isfinite(metrics["train_loss"]):
                raise state.diverged(metrics["train_loss"])
            if log:
                log(metrics, state.step)
    bar.close()
    return float(epoch_loss) / per_epoch


def evaluate(state: TrainingState, data: Splits) -> dict[str, float]:
    """The validation loss and its parts after an epoch, kept as the best weights when it is the lowest so far."""
    config, history = state.config, state.history
    val = evaluate_loss(state.model, data.val_x, data.val_y, max(config.batch_size, 512))
    warming_up = state.epoch < config.kl_warmup  # the objective still changes: a worse loss is no reason to stop
    if val["loss"] < history.best_val_loss:
        history.best_val_loss, history.best_epoch, state.stale = val["loss"], state.epoch, 0
        state.best_model = copy.deepcopy(state.model.state_dict())
    elif not warming_up:
        state.stale += 1
    if not warming_up:
        state.learning_rate.epoch_end(val["loss"])
    return {f"val_{k}": v for k, v in val.items()}


def fit(config: TrainConfig, data: Splits, *, model: torch.nn.Module | None = None,
        log: Callable[[dict[str, float], int], None] | None = None,
        callbacks: tuple[Callback, ...] = (), checkpoint: Path | None = None, run_id: str | None = None,
        resume: dict | None = None, progress: bool = True) -> tuple[torch.nn.Module, History]:
    """Train `config.model` on `data`; returns the model at its best validation loss and the history.
    `auto` settings are resolved first (`TrainConfig.resolve`); callbacks see the resolved config through `history.config`.

    With `checkpoint`, a finished epoch is saved there (after the callbacks, so that the random state is the one the
    next epoch starts from): the first, then one whenever CHECKPOINT_SECONDS have passed since the last save, and the
    last finished one whenever fit ends, however it ends (a signal's KeyboardInterrupt too). `resume` is such a
    checkpoint (`checkpoints.load`): training goes on from its epoch and, with the same data, ends with the same
    weights as a run that was never stopped."""
    memory.settle()
    torch.manual_seed(config.seed)
    device = data.train_images.device
    n_train = len(data.train_y)
    config = config.resolve(n_train)
    if model is None:
        model = build_model(config, data.shape, data.num_classes, data=data)
        if config.decoder_bias == "mean" and resume is None:
            init_output_biases(model, data.mean_image()[None])  # no float copy of the whole training set
    model = model.to(device)
    state = TrainingState(config, model, n_train, device)
    forward = torch.compile(model) if config.compile else model  # `model` keeps its own parameter names
    draw = model.training_batches(data, config.seed) if isinstance(model, OwnBatches) else data.train_batch
    if resume is not None:
        state.load_state_dict(resume)
    history = state.history
    saver = Checkpoints(checkpoint, {"run_id": run_id, "config": config.to_params()})
    try:
        # A run resumed from a checkpoint written after its patience ran out ends at once.
        while state.epoch < config.epochs and not state.patience_spent:
            started = time.perf_counter()
            train_loss = train_one_epoch(state, data, forward, draw, log, progress)
            elapsed = time.perf_counter() - started
            state.epoch += 1
            metrics = evaluate(state, data)
            metrics.update(epoch=state.epoch, train_epoch_loss=train_loss, epoch_time=elapsed,
                           samples_per_sec=n_train / elapsed, kl_scale=kl_scale(config, state.epoch))
            if config.lr_schedule != "constant" or config.warmup_steps:  # a constant rate is the setting itself
                metrics["lr"] = state.optimizer.param_groups[0]["lr"]
            history.epochs.append(metrics)
            if log:
                log(metrics, state.step)
            for callback in callbacks:
                callback.on_epoch_end(state.epoch, model, metrics)
            saver.epoch_end(state)
            # About 50 lines for a whole run, however many epochs the budget has (546 on digits).
            if progress and (state.epoch == 1 or state.epoch % max(1, config.epochs // 50) == 0 or state.patience_spent):
                tqdm.write(f"epoch {state.epoch}: val_loss {metrics['val_loss']:.4f}  best {history.best_val_loss:.4f} "
                           f"(epoch {history.best_epoch})  ({elapsed:.1f}s, {n_train / elapsed:.0f} samples/s)")
    except BaseException:
        with contextlib.suppress(Exception):  # the error that ended training is the one to report
            saver.flush()  # the last finished epoch: a stopped run resumes from it
        raise
    saver.flush()
    history.stopped_early = state.patience_spent

    if config.keep == "last" and history.epochs:  # the weights as trained: the last epoch is the one kept
        history.best_epoch, history.best_val_loss = len(history.epochs), history.epochs[-1]["val_loss"]
    elif state.best_model is not None:
        model.load_state_dict(state.best_model)
    model.eval()
    return model, history
