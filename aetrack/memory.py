"""How much memory training a config needs, estimated from its sizes before torch allocates anything, and how much
this machine has: `config.validate` refuses a model that cannot fit in one line, not mid-run; and when Python's cyclic
collector runs in a command (`start_up`, `settle`). Imports nothing of aetrack (config, the lowest room, reads it)."""

from __future__ import annotations

import atexit
import gc

# Values per example the networks see: what the model-size check counts before anything is allocated.
INPUT_SIZES = {"digits": 64, "mnist": 784, "fashion-mnist": 784, "cifar10": 3072}


def model_bytes(config) -> int:
    """About how many bytes training `config` holds: parameters four times (weights, gradients, Adam's two moments)
    and twice more (the best epoch's copy, the checkpoint), plus a batch's activations (about four copies of each
    layer's outputs for the backward pass), in float32. An estimate from the layer sizes, made before torch allocates
    anything: a model that cannot fit fails in one line, not mid-run. The host's memory is what is compared: on a
    GPU, torch's own out-of-memory error remains the check."""
    inputs = INPUT_SIZES.get(config.dataset, 3072)
    widths = [inputs, *config.hidden, config.latent_dim]
    parameters = 2 * encoder_weights(config) + config.prior_components * (inputs + config.latent_dim)  # and decoder
    activations = 4 * config.batch_size * config.train_samples * sum(widths)
    return 4 * (6 * parameters + activations)


def encoder_weights(config) -> int:
    """About how many weights the encoder has (the decoder mirrors it), from the layer sizes."""
    inputs = INPUT_SIZES.get(config.dataset, 3072)
    if config.arch == "conv":  # 3x3 kernels between channel counts, then the flattened map to the code
        channels = [3 if config.dataset == "cifar10" else 1, *config.hidden]
        cells = max(1, inputs // channels[0] // 4 ** len(config.hidden))  # each layer halves height and width
        return sum(9 * a * b for a, b in zip(channels, channels[1:])) + config.hidden[-1] * cells * 2 * config.latent_dim
    widths = [inputs, *config.hidden, config.latent_dim]
    gate = 2 if config.activation == "gated" else 1
    return sum(gate * a * b for a, b in zip(widths, widths[1:]))


# Below this many multiply-adds per step (a batch through the encoder and the decoder), an MLP's matrix products are
# too small to share between threads: on digits (6.4 M) one thread steps 1.3x as fast as two on a quiet 2-core machine
# and many times as fast on a loaded one, with the same weights to the bit; MNIST's canonical VAE (41 M) gains from two
# (benchmarks/surroundings.py, part threads).
SMALL_STEP = 16_000_000


def step_multiply_adds(config) -> int:
    """About how many multiply-adds one training step's forward pass makes, from the layer sizes."""
    return config.batch_size * config.train_samples * 2 * encoder_weights(config)


def cpu_threads(config, cores: int) -> int:
    """Torch's CPU threads for training `config` with `cores` available: one for an MLP whose step is too small to
    share; every core otherwise (convolutions were not measured)."""
    return 1 if config.arch == "mlp" and step_multiply_adds(config) < SMALL_STEP else cores


def available_bytes() -> int | None:
    """Memory the kernel could give now (MemAvailable); None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Importing torch, MLflow and scikit-learn leaves about a million objects that live as long as the process. At Python's
# default thresholds the cyclic collector walks all of them again each time they grow by a quarter, and once more at
# exit: 1.3 s in the collector and 2.2 s of exit in a 23 s digits job (gc.callbacks, this machine). During start-up
# only the young objects are collected, every START_UP_ALLOCATIONS allocations; what start-up leaves is then set
# aside for good (gc.freeze), so collections during training walk only what training allocates.
START_UP_ALLOCATIONS = 100_000
DEFAULT_THRESHOLDS = gc.get_threshold()
_frozen = _registered = False


def start_up() -> None:
    """A command starts: until `settle`, collect only young objects, and rarely. At exit, skip the final walk over
    everything: `gc.freeze` is registered once, at the first command, before any library's atexit handler, so it
    runs after all of them (a later command in the same process leaves it where it is)."""
    global _registered
    gc.set_threshold(START_UP_ALLOCATIONS, *DEFAULT_THRESHOLDS[1:])
    if not _registered:
        _registered = True
        atexit.register(gc.freeze)


def settle() -> None:
    """Start-up is over (training starts): the collector runs at its default thresholds, and what start-up left is
    frozen, once per process (a tuning worker's later trials collect as usual)."""
    global _frozen
    gc.set_threshold(*DEFAULT_THRESHOLDS)
    if not _frozen:
        _frozen = True
        gc.freeze()
