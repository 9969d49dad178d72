"""What the importance-weighted test NLL costs, against the bare decoder passes it needs.

Trains an MNIST VAE with aetrack's own `fit` (the default architecture, a few epochs: the weights do not
change the cost), then times `nll_iw` at K=5000 (the published protocol) on the whole test set, in 100
parts, alternating with the reference: the same number of decoder forward passes with the same batch
shapes (recorded from the estimate itself with a forward hook), nothing else. The ratio is the median over
parts of (estimate / reference); the totals are the sums. The formula it replaced (the model's own
`log_weights` on 50,000-row chunks) is timed on the first `--before-images` images, and with `--whole`
the whole of `evaluate_model` (every measure of `aetrack evaluate`, without MLflow and the reference
classifier) is timed once.

    python benchmarks/evaluation.py --data-dir ../shared/data             # over an hour on 2 busy cores
    python benchmarks/evaluation.py --data-dir ../shared/data --minutes 25  # the parts done in 25 minutes
    python benchmarks/evaluation.py --data-dir ../shared/data --images 2000 --no-whole   # a quicker look
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

from aetrack import data as datasets
from aetrack.config import TrainConfig
from aetrack.evaluation import Settings, evaluate_model, iwae_nll, nll_iw
from aetrack.evaluation.measures import batches
from aetrack.training import fit

RESULTS = Path(__file__).parent / "results"
TARGET = 2.0  # the estimate's time, at most this many times the bare decoder passes'


@torch.no_grad()
def old_nll_iw(model, x, samples: int, seed: int, rows: int = 50_000) -> torch.Tensor:
    """The estimate before issue 10: the model's own log_weights on images x samples <= 50,000 rows at once."""
    images = max(1, rows // samples)
    chunk = max(1, min(samples, rows // min(images, len(x))))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index in batches(len(x), images):
            weights = [model.log_weights(x[index], None, min(chunk, samples - done)) for done in range(0, samples, chunk)]
            out.append(iwae_nll(torch.cat(weights)))
    return torch.cat(out)


class DecoderShapes:
    """Records the input shape of every decoder call (a forward hook), to replay the same calls bare."""

    def __init__(self, decoder: torch.nn.Module):
        self.decoder, self.shapes = decoder, []

    def __enter__(self):
        self.handle = self.decoder.register_forward_hook(lambda module, args, output: self.shapes.append(tuple(args[0].shape)))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def bare_decoder(decoder: torch.nn.Module, shapes: list[tuple[int, ...]]) -> float:
    """Seconds for the same decoder calls on fixed random codes (one tensor per distinct shape, made beforehand)."""
    inputs = {shape: torch.randn(shape) for shape in set(shapes)}
    started = time.perf_counter()
    for shape in shapes:
        decoder(inputs[shape])
    return time.perf_counter() - started


@click.command()
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR", help="Where MNIST's files are.")
@click.option("--epochs", default=3, show_default=True, help="Training epochs of the VAE.")
@click.option("--samples", "k", default=5000, show_default=True, help="Importance samples K.")
@click.option("--images", default=None, type=int, help="Test images [default: all 10,000].")
@click.option("--parts", default=100, show_default=True,
              help="Alternating parts (estimate, then reference, each part): short, so that others' load hits both alike.")
@click.option("--minutes", default=None, type=float,
              help="Start no part after this many minutes: the figures then cover the parts done (a busy machine).")
@click.option("--before-images", default=200, show_default=True, help="Images for the old formula's time (0: skip).")
@click.option("--whole/--no-whole", default=True, show_default=True, help="Also time evaluate_model once.")
@click.option("--output", default=str(RESULTS / "evaluation"), show_default=True, help="Writes OUTPUT.json and OUTPUT.md.")
def main(data_dir, epochs, k, images, parts, minutes, before_images, whole, output):
    load_before = os.getloadavg()
    data = datasets.load("mnist", data_dir=data_dir)
    config = TrainConfig(model="vae", dataset="mnist", epochs=epochs)
    started = time.perf_counter()
    model, _ = fit(config, data, progress=False)
    model.eval()
    print(f"trained {config.model} {config.hidden} latent {config.latent_dim} for {epochs} epochs in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    x = data.test_x[:images] if images else data.test_x
    decoder = model.body.decoder

    rows = []
    began = time.perf_counter()
    for part, index in enumerate(batches(len(x), -(-len(x) // parts))):
        if minutes is not None and time.perf_counter() - began > 60 * minutes:
            print(f"stopped after {part} of {parts} parts (--minutes {minutes:g})", flush=True)
            break
        with DecoderShapes(decoder) as recorded:
            started = time.perf_counter()
            nll = nll_iw(model, x[index], None, k, seed=part)
            estimate = time.perf_counter() - started
        reference = bare_decoder(decoder, recorded.shapes)
        rows.append({"images": index.stop - index.start, "estimate_s": round(estimate, 3), "reference_s": round(reference, 3),
                     "ratio": round(estimate / reference, 3), "decoder_calls": len(recorded.shapes),
                     "decoder_rows": sum(shape[0] for shape in recorded.shapes), "nll_sum": float(nll.sum())})
        if part % 10 == 9 or part + 1 == parts:
            print(f"part {part + 1}/{parts}: {rows[-1]['images']} images  estimate {estimate:.1f} s  bare decoder "
                  f"{reference:.1f} s  ratio {estimate / reference:.2f}  median so far "
                  f"{statistics.median(r['ratio'] for r in rows):.2f}  load {os.getloadavg()[0]:.1f}", flush=True)

    estimate_s, reference_s = sum(r["estimate_s"] for r in rows), sum(r["reference_s"] for r in rows)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python benchmarks/evaluation.py", *sys.argv[1:]]),
        "model": {"model": config.model, "hidden": list(config.hidden), "latent_dim": config.latent_dim, "epochs": epochs},
        "samples": k, "images": sum(r["images"] for r in rows), "test_images": len(x), "parts": rows,
        "estimate_s": round(estimate_s, 1), "reference_s": round(reference_s, 1),
        "ratio_median": round(statistics.median(r["ratio"] for r in rows), 3),
        "ratio_of_totals": round(estimate_s / reference_s, 3),
        "nll_iw": round(sum(r["nll_sum"] for r in rows) / sum(r["images"] for r in rows), 3),
        "decoder_calls": sum(r["decoder_calls"] for r in rows), "decoder_rows": sum(r["decoder_rows"] for r in rows),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "load_average_before": [round(v, 2) for v in load_before],
    }
    report["target_met"] = report["ratio_median"] <= TARGET
    print(f"K={k} on {report['images']} of {len(x)} images: {estimate_s:.0f} s, bare decoder passes {reference_s:.0f} s, "
          f"median ratio {report['ratio_median']:.2f} (target <= {TARGET:g}); nll_iw {report['nll_iw']:.2f}", flush=True)

    if before_images:
        few = x[:before_images]
        started = time.perf_counter()
        old = old_nll_iw(model, few, k, seed=0)
        old_s = time.perf_counter() - started
        started = time.perf_counter()
        new = nll_iw(model, few, None, k, seed=0)
        new_s = time.perf_counter() - started
        report["before"] = {"images": len(few), "old_s": round(old_s, 1), "new_s": round(new_s, 1),
                            "speedup": round(old_s / new_s, 2), "old_nll_iw": round(float(old.mean()), 3),
                            "new_nll_iw": round(float(new.mean()), 3),
                            "old_s_extrapolated_to_all": round(old_s * len(x) / len(few))}
        print(f"the old formula on {len(few)} images: {old_s:.1f} s, the new {new_s:.1f} s ({old_s / new_s:.1f}x); "
              f"nll_iw {report['before']['old_nll_iw']} vs {report['before']['new_nll_iw']} (same draws)", flush=True)

    if whole:
        started = time.perf_counter()
        evaluation = evaluate_model(model, config, data, settings=Settings(iw_samples=k, nll_images=images))
        report["evaluate_model_s"] = round(time.perf_counter() - started, 1)
        report["evaluate_model_nll_iw"] = round(evaluation.metrics["nll_iw"], 3)
        print(f"evaluate_model (every measure but the reference classifier's) {report['evaluate_model_s']:.0f} s", flush=True)

    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{output}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{output}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    covered = (f"{report['images']} MNIST test images" if report["images"] == report["test_images"] else
               f"the first {report['images']} of {report['test_images']} MNIST test images (stopped by --minutes)")
    lines = [f"IWAE estimate of -log p(x), K={report['samples']}, {covered}, VAE "
             f"{report['model']['hidden']} latent {report['model']['latent_dim']} ({report['date']}; {report['machine']}, "
             f"{report['torch_threads']} torch threads; load average {report['load_average_before'][0]} before, "
             f"{report['load_average_after'][0]} after).", "",
             f"`{report['command']}`", "",
             "| what | seconds | decoder calls | decoder rows |", "| --- | ---: | ---: | ---: |",
             f"| `nll_iw` (the estimate) | {report['estimate_s']} | {report['decoder_calls']} | {report['decoder_rows']} |",
             f"| bare decoder passes, same shapes | {report['reference_s']} | {report['decoder_calls']} | {report['decoder_rows']} |",
             f"| `nll_iw`, per 10,000 images | {round(report['estimate_s'] * 10_000 / report['images'])} | | |",
             "", f"Ratio (median of {len(report['parts'])} alternating parts): **{report['ratio_median']:.2f}** "
                 f"(ratio of totals {report['ratio_of_totals']:.2f}; target <= {TARGET:g}: "
                 f"{'met' if report['target_met'] else 'missed'}). Test nll_iw {report['nll_iw']:.2f} nats."]
    if "before" in report:
        b = report["before"]
        lines += ["", f"The formula it replaced, on the first {b['images']} images: {b['old_s']} s against {b['new_s']} s "
                      f"(**{b['speedup']:.1f}x**; about {b['old_s_extrapolated_to_all']} s for all {report['images']}); "
                      f"nll_iw {b['old_nll_iw']} vs {b['new_nll_iw']} from the same draws."]
    if "evaluate_model_s" in report:
        lines += ["", f"`evaluate_model` with every measure but the reference classifier's: {report['evaluate_model_s']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
