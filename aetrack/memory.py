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
    gate = 2 if config.activation == "gated" else 1
    if config.arch == "conv":  # 3x3 kernels between channel counts, then the flattened map to the code
        channels = [3 if config.dataset == "cifar10" else 1, *config.hidden]
        cells = max(1, inputs // channels[0] // 4 ** len(config.hidden))  # each layer halves height and width
        weights = sum(9 * a * b for a, b in zip(channels, channels[1:])) + config.hidden[-1] * cells * 2 * config.latent_dim
    else:
        weights = sum(gate * a * b for a, b in zip(widths, widths[1:]))
    parameters = 2 * weights + config.prior_components * (inputs + config.latent_dim)  # encoder and decoder
    activations = 4 * config.batch_size * config.train_samples * sum(widths)
    return 4 * (6 * parameters + activations)


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
