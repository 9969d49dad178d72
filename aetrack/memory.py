"""How much memory training a config needs, estimated from its sizes before torch allocates anything, and how much
this machine has: `config.validate` refuses a model that cannot fit in one line, not mid-run. Imports nothing of
aetrack (config, the lowest room, reads it)."""

from __future__ import annotations

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
