"""How `aetrack evaluate` measures: one frozen dataclass, whose `option()` fields are the command's options (as
TrainConfig's are train's). Light, like config.py: `aetrack evaluate --help` reads it without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aetrack.config import DEFAULT_NOISE_LEVELS, check_finite, check_ranges, option


@dataclass(frozen=True)
class Settings:
    """A field made with `option()` is an option of `aetrack evaluate`; the others are settings of the library only."""

    iw_samples: int | None = option(None, "Importance samples K for test/nll_iw (auto: about 1e6 / test images, "
                                    "50..5000; 5000 is the published protocol).")
    nll_images: int | None = option(None, "Estimate test/nll_iw on the first N test images only (auto: all).")
    samples: int | None = option(None, "Generated images scored by FCD and KID (auto: test set size, at most 10000).")
    cas_samples: int = 20_000  # at most this many generated training images for the CAS classifier
    noise_levels: tuple[float, ...] = option(DEFAULT_NOISE_LEVELS, "dae: noise levels of the PSNR table (comma separated).")
    seed: int = option(0, "Seed of every random draw of the evaluation.")

    def validate(self) -> Settings:
        check_finite(self)
        check_ranges(self, {"iw_samples": (1, math.inf), "nll_images": (1, math.inf), "samples": (2, math.inf)})
        return self
