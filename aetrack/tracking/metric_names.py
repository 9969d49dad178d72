"""Every metric name aetrack logs to MLflow, once. Names are grouped with MLflow's `/` convention: the UI's chart
view makes one section per group, in alphabetical order, so the names put the losses first:

- `loss/train`, `loss/val`: the training loss (mean over the epoch's batches) and the validation loss, per epoch
  (step = epoch, the same steps as the per-epoch pictures), so runs with different batch sizes line up;
- `optim/lr`, `optim/kl_scale`: per epoch (the learning rate only where a schedule or warm-up moves it: a
  constant one is the param `lr`, and MLflow draws a constant series on a -0.5 ... 0.5 axis that reads as 0);
- `per_step/<part>`: the training loss and its parts averaged over the last `--log-every` batches, step = the
  optimiser step (the one section whose x axis is not the epoch, and its name says so);
- `test/<name>`: written by `aetrack evaluate`;
- `val/<part>`: the validation loss's parts per epoch; `val/best_loss` and `val/best_epoch` once at the end;
- `system/epoch_time`, `system/samples_per_sec`: per epoch, in the run page's "System metrics" tab.

Pictures (`aetrack.tracking.run`) follow the same rule: `progress/*` per epoch, `result/*` at the end.

The training loop knows nothing of MLflow and keeps its own flat keys (`val_loss`, `train_recon_loss`,
`train_epoch_loss`, ...: what `aetrack tune --metric` names); `logged()` maps them here, at the boundary.
Readers (compare, tune, models, studies, benchmarks) take names from this module only."""

from __future__ import annotations

TRAIN_LOSS, VAL_LOSS = "loss/train", "loss/val"
# The training loop's epoch keys that are not parts of a loss: where they go.
EPOCH_KEYS = {
    "train_epoch_loss": TRAIN_LOSS,
    "val_loss": VAL_LOSS,
    "lr": "optim/lr",
    "kl_scale": "optim/kl_scale",
    "epoch_time": "system/epoch_time",
    "samples_per_sec": "system/samples_per_sec",
}
EPOCH = "epoch"                      # the training loop's epoch number: the step of every epoch-level metric
BEST_VAL_LOSS, BEST_EPOCH = "val/best_loss", "val/best_epoch"
EPOCH_TIME = "system/epoch_time"
TEST_PREFIX = "test/"
# The test figures a run's description and its model versions' tags show, in this order, where the run has them.
KEY_TEST_METRICS = ("recon_loss", "psnr", "nll_iw", "neg_elbo", "fcd", "label_accuracy", "error", "probe_accuracy")
GROUPS = {"train": "per_step", "val": "val", "test": "test"}  # the loop's key prefix -> its MLflow group


def logged(key: str) -> str:
    """The MLflow name of the training loop's key `key` (`val_neg_elbo` -> `val/neg_elbo`, `val_loss` ->
    `loss/val`, `train_kl` -> `per_step/kl`, `train_epoch_loss` -> `loss/train`); a name with a `/` is already one."""
    if "/" in key:
        return key
    if key in EPOCH_KEYS:
        return EPOCH_KEYS[key]
    group, _, rest = key.partition("_")
    if rest and group in GROUPS:
        return f"{GROUPS[group]}/{rest}"
    return key


def champion_metric(variant) -> str:
    """The validation figure that ranks a variant's models (the training loop's key): classifier error for M2, the
    negative ELBO (beta = 1, whatever beta trained with) for VAEs, else the reconstruction loss. Not the validation
    loss, which beta and the IWAE objective change. `aetrack tune` optimises it unless told otherwise."""
    if variant.semi_supervised:
        return "val_error"
    return "val_neg_elbo" if variant.generative else "val_recon_loss"


def test(name: str) -> str:
    """`recon_loss` (an evaluation figure) -> `test/recon_loss`; a full name is returned as it is."""
    if name.startswith(TEST_PREFIX):
        return name
    if name.startswith("test_"):  # the name the user may still type (--metric test_fcd)
        name = name[len("test_"):]
    return TEST_PREFIX + name


def is_test(name: str) -> bool:
    return name.startswith(TEST_PREFIX)


def short(name: str) -> str:
    """`test/recon_loss` -> `recon_loss`."""
    return name.split("/", 1)[-1]


# Which way is better, for labels ("lower is better") in reports; a figure that describes rather than scores
# (the KL, a code's sparsity or contraction) has no better direction.
HIGHER = ("accuracy", "psnr", "active_units", "cas", "confidence")
LOWER = ("loss", "nll", "elbo", "fcd", "kid", "error", "mse")
# What describes a setting rather than measures its outcome: shown in a study's table, never tested as a verdict.
DESCRIBES = ("parameters",)


def better(name: str) -> str | None:
    """"higher", "lower" or None for metric `name`."""
    base = short(name)
    if any(word in base for word in HIGHER):
        return "higher"
    if any(word in base for word in LOWER):
        return "lower"
    return None
