"""How `aetrack evaluate` measures: one frozen dataclass, whose `option()` fields are the command's options (as
TrainConfig's are train's). Light, like config.py: `aetrack evaluate --help` reads it without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aetrack.config import DEFAULT_NOISE_LEVELS, TrainConfig, check_finite, check_ranges, option

NOISE_KINDS = TrainConfig.__dataclass_fields__["noise"].metadata["choices"]


@dataclass(frozen=True)
class Settings:
    """A field made with `option()` is an option of `aetrack evaluate`; the others are settings of the library only."""

    iw_samples: int | None = option(None, "Importance samples K for test/nll_iw (auto: about 1e6 / test images, "
                                    "50..5000; 5000 is the published protocol).")
    nll_images: int | None = option(None, "Estimate test/nll_iw on the first N test images only (auto: all).")
    samples: int | None = option(None, "Generated images scored by FCD and KID (auto: the test set's size, 1000 to 10000).")
    cas_samples: int = 20_000  # at most this many generated training images for the CAS classifier
    noise_levels: tuple[float, ...] = option(DEFAULT_NOISE_LEVELS, "dae: noise levels of the PSNR table (comma separated).")
    robustness_kinds: tuple[str, ...] = NOISE_KINDS        # a dae is also scored on every kind of noise ...
    robustness_levels: tuple[float, ...] = (0.1, 0.3, 0.5)  # ... at these levels: the robustness matrix
    perturbation: float = 0.05          # std of the small Gaussian input perturbation of perturbed_mse
    supervised_baseline: bool = True    # semi-supervised models: also train the supervised-only classifier (seconds)
    seed: int = option(0, "Seed of every random draw of the evaluation.")

    def validate(self) -> Settings:
        check_finite(self)
        check_ranges(self, {"iw_samples": (1, math.inf), "nll_images": (1, math.inf), "samples": (2, math.inf)})
        return self
