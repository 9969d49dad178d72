"""The supervised-only baseline of the semi-supervised rows (issue 28): M2's q(y|x) network (Kingma et al.'s m2-100
protocol: 784-500-10, softplus) trained on the same 100 labelled MNIST images alone, with cross-entropy, Adam at the
protocol's rate, kept at its best validation error (`aetrack.evaluation.measures.supervised_only_error`, the
`supervised_error` measure of the conditional study). Its test error, on all 10,000 test images, against the m2-100
and m1m2-100 rows is what the unlabelled images add. The 100 labelled images depend on the seed: one run per seed.

    python benchmarks/supervised.py --data-dir /work/shared/data --seeds 3

Record: benchmarks/results/supervised.json; rendered on docs/anchors.md (`anchors-supervised`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Kingma et al. 2014, table 1, N = 100: "NN", a neural network trained on the labelled images only.
PUBLISHED = {"error": 25.81, "source": "Kingma et al. 2014, table 1 (NN, 100 labels)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("AETRACK_DATA_DIR"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import anchors
    import torch

    from aetrack import data as datasets
    from aetrack.evaluation.measures import supervised_only_error
    from aetrack.tracking.run import git_commit

    errors, started = [], time.perf_counter()
    for seed in range(args.seeds):
        config = replace(anchors.KINGMA_M2, seed=seed)
        data = datasets.load_for(config, data_dir=args.data_dir)
        torch.manual_seed(seed)
        errors.append(round(100 * supervised_only_error(config, data), 2))
        print(f"seed {seed}: {errors[-1]:.2f} % test error", flush=True)
    record = {"protocol": "m2-100", "published": PUBLISHED, "labeled": anchors.KINGMA_M2.labeled, "hidden": list(anchors.KINGMA_M2.hidden),
              "activation": anchors.KINGMA_M2.activation, "lr": anchors.KINGMA_M2.lr, "test_images": len(data.test_y),
              "validation_images": len(data.val_y), "errors": errors, "mean": round(statistics.fmean(errors), 2),
              "sd": round(statistics.stdev(errors), 2) if len(errors) > 1 else 0.0,
              "seconds": round(time.perf_counter() - started, 1), "git_commit": git_commit(),
              "command": f"python benchmarks/supervised.py --data-dir DATA --seeds {args.seeds}",
              "machine": {"cores": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}}
    (RESULTS / "supervised.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
