"""What a VampPrior costs the importance-weighted test NLL, before and after `priors.log_normal_components`.

The model is benchmarks/anchors.py's VampPrior row (300-300 gated MLP, 40 latent units, 500 pseudo-inputs),
untrained: the cost does not depend on the weights. `nll_iw` at K=5000 (the published protocol) is timed on
`--images` MNIST test images, alternating, `--repeats` times, with the prior's log-density as it was (a
(draws, 500, 40) tensor; kept here as the reference) and as it is (two matrix products). The ratio is the
median of the paired repeats; the two estimates must agree.

    python benchmarks/priors.py --data-dir ../shared/data
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent))
from anchors import VAMPPRIOR, portable  # noqa: E402

from aetrack import data as datasets  # noqa: E402
from aetrack import priors  # noqa: E402
from aetrack.evaluation import nll_iw  # noqa: E402
from aetrack.models import build_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def direct_log_prob(self, z: torch.Tensor) -> torch.Tensor:
    """VampPrior.log_prob as it was: every draw against every component, elementwise."""
    q = self.components()
    z = z.unsqueeze(-2)
    log_normal = -0.5 * (priors.LOG_2PI + q.logvar + (z - q.mu) ** 2 / q.logvar.exp()).sum(-1)
    return torch.logsumexp(log_normal, dim=-1) - math.log(q.mu.shape[0])


@click.command()
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR", help="Where MNIST's files are.")
@click.option("--images", default=20, show_default=True, help="Test images per measurement.")
@click.option("--samples", "k", default=5000, show_default=True, help="Importance samples K.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch.set_num_threads (0: torch's default).")
def main(data_dir, images, k, repeats, threads):
    if threads:
        torch.set_num_threads(threads)
    data = datasets.load("mnist", data_dir=data_dir, binarize="dynamic")
    torch.manual_seed(0)
    model = build_model(replace(VAMPPRIOR, epochs=1), data.shape, data.num_classes).eval()
    x = data.test_x[:images]
    fast = priors.VampPrior.log_prob
    times, values = {"direct": [], "matmul": []}, {}
    with torch.no_grad():
        for _ in range(repeats):
            for name, log_prob in (("direct", direct_log_prob), ("matmul", fast)):
                priors.VampPrior.log_prob = log_prob
                try:
                    started = time.perf_counter()
                    values[name] = nll_iw(model, x, None, k, seed=0)
                    times[name].append((time.perf_counter() - started) / images)
                finally:
                    priors.VampPrior.log_prob = fast
    ratios = [a / b for a, b in zip(times["direct"], times["matmul"])]
    record = {
        "seconds_per_image": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "speed-up": {"median": round(statistics.median(ratios), 2), "each": [round(r, 2) for r in ratios]},
        "largest_difference_nats": float((values["direct"] - values["matmul"]).abs().max()),
        "mean_nll": float(values["matmul"].mean()), "images": images, "samples": k,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(), "torch": torch.__version__,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/priors.py " + shlex.join(portable(sys.argv[1:])),
    }
    print(json.dumps(record, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "priors.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
