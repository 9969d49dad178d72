"""Training speed, each figure a ratio against a reference measured in the same run (issue 10).

Parts (`--part`, repeatable; default: all but `logging`):

- `mlp`: aetrack's MLP VAE (784-400-20, batch 128) against the canonical PyTorch-example loop (torchvision
  `MNIST` + `ToTensor` + `DataLoader`, the example's model and loss), and against the bare-matrix-product limit
  (the same layer shapes' forward and backward products, nothing else); test loss of both after the same epochs.
- `conv`: aetrack's conv VAE against a conv loop in the same canonical style, on MNIST (1x28x28) and on
  synthetic 3x32x32 uint8 images served the way torchvision's CIFAR10 serves them (PIL image + `ToTensor`).
- `variants`: `cae` (exact and Hutchinson penalty) against `ae`; `m2` against its loss as it was before
  (`old_m2_forward` of tests/test_models.py: the body once per label and an extra pass for logging).
- `memory`: peak resident memory of one MNIST training epoch, aetrack's `fit` against the canonical loop, each in
  a fresh process.
- `precision`: the MLP VAE with `--precision bf16` / `fp16` and with `--compile`, against fp32, with test losses.
- `binarize`: dynamic binarization's draw (`data.binary_draw`, u < p) against `torch.bernoulli`, alone and in an epoch
  of the 784-200-200-50 tanh VAE of Burda et al. (benchmarks/anchors.py's burda-vae) at batches of 20 and 100.
- `logging`: what MLflow tracking costs `fit` (a real `mlflow server` over HTTP), against the bare loop.

Reference and aetrack alternate, `--repeats` times; each figure is the median. Throughput is training samples per
second of training time (the validation / test passes are not counted on either side).

    python benchmarks/training.py --dataset mnist --data-dir /work/shared/data --repeats 3

Results: benchmarks/results/training-<dataset>.json and .md, with the machine's load average.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from aetrack import data as datasets  # noqa: E402
from aetrack.config import TrainConfig  # noqa: E402
from aetrack.training import evaluate_loss, fit  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PARTS = ("mlp", "conv", "variants", "memory", "precision", "binarize", "logging")
MLP = dict(hidden=(400,), latent_dim=20, batch_size=128, lr=1e-3, patience=0, kl_warmup=0, log_every=20)
median = statistics.median


def paired(numerators: list[float], denominators: list[float]) -> dict:
    """The median of per-repeat ratios (each pair measured back to back, so a change of load between repeats
    cancels), and each ratio."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": round(median(ratios), 3), "each": [round(r, 3) for r in ratios]}


# ----- the canonical loop: pytorch/examples vae/main.py, and a conv loop in its style -----------------------

class ExampleVAE(nn.Module):
    """pytorch/examples vae/main.py's model, as published."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x):
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


class ConvVAE(nn.Module):
    """The same layers as aetrack's `--arch conv --hidden 32,64`, written as the example writes its MLP."""

    def __init__(self, channels: int, size: int, latent: int = 20):
        super().__init__()
        side = (size + 3) // 4
        self.enc = nn.Sequential(nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(64 * side * side, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 64 * side * side), nn.ReLU(), nn.Unflatten(1, (64, side, side)),
                                 nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(32, channels, 3, 2, 1, output_padding=1))  # 7->14->28, 8->16->32

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.dec(z)), mu, logvar


def example_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x.flatten(1), x.flatten(1), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


class UInt8Images(torch.utils.data.Dataset):
    """NHWC uint8 images served as torchvision's CIFAR10 serves them: a PIL image through the transform."""

    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), 0


def reference_epochs(model, dataset, epochs: int, batch_size: int = 128) -> list[float]:
    """The example's `train(epoch)`, timed per epoch; returns samples per second of each epoch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    for _ in range(epochs):
        model.train()
        started, train_loss = time.perf_counter(), 0.0
        for data, _ in loader:
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            loss = example_loss(recon, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        rates.append(len(dataset) / (time.perf_counter() - started))
    return rates


@torch.no_grad()
def reference_test_loss(model, dataset) -> float:
    model.eval()
    total = 0.0
    for data, _ in torch.utils.data.DataLoader(dataset, batch_size=128):
        recon, mu, logvar = model(data)
        total += example_loss(recon, data, mu, logvar).item()
    return total / len(dataset)


def mnist_sets(data_dir: str, train_images: int | None = None):
    from torchvision import transforms
    from torchvision.datasets import MNIST

    root = datasets._unpacked_root("mnist", MNIST, datasets.resolve_data_dir(data_dir))
    train = MNIST(str(root), train=True, transform=transforms.ToTensor())
    test = MNIST(str(root), train=False, transform=transforms.ToTensor())
    if train_images:
        train = torch.utils.data.Subset(train, range(train_images))
    return train, test


# ----- aetrack's side --------------------------------------------------------------------------------------

def aetrack_epochs(config: TrainConfig, splits, model=None) -> tuple[list[float], torch.nn.Module]:
    model, history = fit(config, splits, model=model, progress=False)
    return [epoch["samples_per_sec"] for epoch in history.epochs], model


def subset(splits, train_images: int | None):
    if not train_images:
        return splits
    return replace(splits, train_images=splits.train_images[:train_images], train_y=splits.train_y[:train_images])


def matmul_limit(steps: int, batch: int = 128, sizes=((784, 400), (400, 40), (20, 400), (400, 784))) -> float:
    """Samples per second if a step cost only its matrix products: per layer the forward product, the weight
    gradient, and the input gradient (not for the first layer, whose input needs none)."""
    weights = [torch.randn(n_out, n_in) for n_in, n_out in sizes]
    biases = [torch.randn(n_out) for _, n_out in sizes]
    inputs = [torch.randn(batch, n_in) for n_in, _ in sizes]
    grads = [torch.randn(batch, n_out) for _, n_out in sizes]
    started = time.perf_counter()
    for _ in range(steps):
        for i, (w, b, x, g) in enumerate(zip(weights, biases, inputs, grads)):
            torch.addmm(b, x, w.t())
            g.t().mm(x)
            if i:
                g.mm(w)
    return steps * batch / (time.perf_counter() - started)


# ----- parts -----------------------------------------------------------------------------------------------

def part_mlp(splits, data_dir, epochs, repeats) -> dict:
    reference_train, reference_test = mnist_sets(data_dir)
    config = TrainConfig(model="vae", dataset="mnist", epochs=epochs, **MLP)
    steps = math.ceil(len(splits.train_y) / 128)
    runs = {"reference": [], "aetrack": [], "matmul_limit": []}
    losses = {"reference": [], "aetrack": []}
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        reference = ExampleVAE()
        runs["reference"].append(median(reference_epochs(reference, reference_train, epochs)))
        losses["reference"].append(reference_test_loss(reference, reference_test))
        rates, model = aetrack_epochs(replace(config, seed=repeat), splits)
        runs["aetrack"].append(median(rates))
        losses["aetrack"].append(evaluate_loss(model, splits.test_x, splits.test_y, 512)["neg_elbo"])
        runs["matmul_limit"].append(matmul_limit(steps))
        print(f"mlp repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in runs.items()), flush=True)
    result = {name: round(median(rates)) for name, rates in runs.items()}
    result.update(speedup=paired(runs["aetrack"], runs["reference"]),
                  fraction_of_matmul_limit=paired(runs["aetrack"], runs["matmul_limit"]),
                  test_loss_reference=round(median(losses["reference"]), 2),
                  test_loss_aetrack=round(median(losses["aetrack"]), 2), epochs=epochs, repeats=repeats,
                  targets="speedup >= 3, fraction >= 0.7, test loss <= reference + 1")
    return result


def synthetic_images(count: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images (a blurred noise field), NHWC."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, channels, size // 4, size // 4, generator=generator)
    images = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def part_conv(splits, data_dir, epochs, repeats, train_images) -> dict:
    from torchvision import transforms

    reference_mnist, _ = mnist_sets(data_dir, train_images)
    cifar_like = synthetic_images(train_images + 256, 3, 32)
    as_nchw = torch.from_numpy(cifar_like).permute(0, 3, 1, 2).contiguous()
    labels = torch.zeros(len(as_nchw), dtype=torch.int64)
    synthetic = datasets.Splits("synthetic-3x32x32", as_nchw[:train_images], labels[:train_images],
                                as_nchw[train_images:], labels[train_images:], as_nchw[train_images:],
                                labels[train_images:], ("none",))
    cases = {
        "mnist 1x28x28": (subset(splits, train_images), reference_mnist, 1, 28),
        "synthetic 3x32x32": (synthetic, UInt8Images(cifar_like[:train_images], transforms.ToTensor()), 3, 32),
    }
    results = {}
    for name, (ours, theirs, channels, size) in cases.items():
        config = TrainConfig(model="vae", arch="conv", epochs=epochs, **{**MLP, "hidden": (32, 64)})
        runs = {"reference": [], "aetrack": []}
        for repeat in range(repeats):
            torch.manual_seed(repeat)
            runs["reference"].append(median(reference_epochs(ConvVAE(channels, size), theirs, epochs)))
            runs["aetrack"].append(median(aetrack_epochs(replace(config, seed=repeat), ours)[0]))
            print(f"conv {name} repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in runs.items()), flush=True)
        row = {k: round(median(v)) for k, v in runs.items()}
        row.update(speedup=paired(runs["aetrack"], runs["reference"]), train_images=train_images, target="speedup >= 2")
        results[name] = row
    return results


def part_variants(splits, epochs, repeats, train_images) -> dict:
    from test_models import old_m2_forward

    from aetrack.models.variational import M2

    class M2Before(M2):
        """M2 with the loss as it was before issue 10 (the logged parts reduced to what that loss computes)."""

        def forward(self, x, y=None, kl_scale=1.0):
            from aetrack.models import Output

            loss, parts = old_m2_forward(self, x, y, kl_scale)
            # The old forward's extra pass for logging: recon_loss, kl and neg_elbo at the used label.
            labeled = y >= 0
            y_used = torch.where(labeled, y, self.classifier(x).argmax(-1))
            recon, kl, q, logits = self.body.terms(x, self.cond(y_used))
            parts.update(recon_loss=recon.mean().detach(), kl=kl.mean().detach(), neg_elbo=(recon + kl).mean().detach())
            return Output(loss, parts, torch.sigmoid(logits), q.mean)

    data = subset(splits, train_images)
    base = TrainConfig(dataset=splits.name, epochs=epochs, **MLP)
    setups = {
        "ae": replace(base, model="ae"),
        "cae exact": replace(base, model="cae"),
        "cae hutchinson": replace(base, model="cae", contractive_estimator="hutchinson"),
        "m2": replace(base, model="m2", labeled=100),
        "m2 before": replace(base, model="m2", labeled=100),
    }
    runs = {name: [] for name in setups}
    for repeat in range(repeats):
        for name, config in setups.items():
            model = None
            if name == "m2 before":
                torch.manual_seed(config.seed)
                model = M2Before(config, data.shape, data.num_classes)
            runs[name].append(median(aetrack_epochs(config, data, model)[0]))
        print(f"variants repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in runs.items()), flush=True)
    rates = {name: round(median(values)) for name, values in runs.items()}
    return {"samples_per_sec": rates, "train_images": train_images,
            "cae_exact_over_ae": paired(runs["cae exact"], runs["ae"]),
            "cae_hutchinson_over_ae": paired(runs["cae hutchinson"], runs["ae"]),
            "m2_over_before": paired(runs["m2"], runs["m2 before"]),
            "targets": "cae >= 0.5 of ae; m2 >= 3x before"}


def part_memory(dataset, data_dir) -> dict:
    rows = {}
    for which in ("reference", "aetrack", "reference", "aetrack"):
        command = [sys.executable, __file__, "--memory-child", which, "--dataset", dataset,
                   "--threads", str(torch.get_num_threads())]
        if data_dir:
            command += ["--data-dir", data_dir]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.setdefault(which, []).append(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])
        print(f"memory {which}: {rows[which][-1]} MB", flush=True)
    result = {which: round(median(values)) for which, values in rows.items()}
    result.update(ratio=round(result["aetrack"] / result["reference"], 3), target="aetrack <= reference",
                  what="peak resident memory (VmHWM) of a fresh process training one MNIST epoch")
    return result


def memory_child_of(which: str, dataset: str, data_dir: str | None) -> None:
    if which == "reference":
        train, _ = mnist_sets(data_dir)
        torch.manual_seed(0)
        reference_epochs(ExampleVAE(), train, 1)
    else:
        splits = datasets.load(dataset, data_dir=data_dir)
        fit(TrainConfig(model="vae", dataset=dataset, epochs=1, **MLP), splits, progress=False)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> int:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss does not: on Linux a
    child inherits the high-water mark of the process that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def part_precision(splits, epochs, repeats, train_images) -> dict:
    data = subset(splits, train_images)
    base = TrainConfig(model="vae", dataset=splits.name, epochs=epochs, **MLP)
    setups = {"fp32": base, "bf16": replace(base, precision="bf16"), "fp16": replace(base, precision="fp16"),
              "fp32 + compile": replace(base, compile=True)}
    runs, losses = {name: [] for name in setups}, {name: [] for name in setups}
    for repeat in range(repeats):
        for name, config in setups.items():
            rates, model = aetrack_epochs(replace(config, seed=repeat), data)
            runs[name].append(median(rates[1:] if "compile" in name and len(rates) > 1 else rates))  # compiling: epoch 1
            losses[name].append(evaluate_loss(model, data.test_x, data.test_y, 512)["neg_elbo"])
        print(f"precision repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in runs.items()), flush=True)
    return {name: {"samples_per_sec": round(median(runs[name])),
                   "over_fp32": paired(runs[name], runs["fp32"]),
                   "test_neg_elbo": round(median(losses[name]), 2)} for name in setups} | {"train_images": train_images}


class BernoulliDraws(datasets.Splits):
    """The training batches as drawn before `binary_draw`: torch.bernoulli of the grey levels."""

    def train_batch(self, index, generator=None):
        x = self.as_float(self.train_images[index])
        return torch.bernoulli(x, generator=generator), self.train_y[index]


def part_binarize(splits, epochs, repeats, train_images) -> dict:
    dynamic = subset(replace(splits, binarize="dynamic"), train_images)
    before = BernoulliDraws(**{f.name: getattr(dynamic, f.name) for f in fields(dynamic)})
    generator, result = torch.Generator().manual_seed(0), {}
    for batch in (20, 100):
        rows = dynamic.as_float(dynamic.train_images[:batch])
        draws = {"bernoulli": [], "u < p": []}
        for _ in range(repeats):
            for name, draw in (("bernoulli", torch.bernoulli), ("u < p", datasets.binary_draw)):
                started = time.perf_counter()
                for _ in range(2000):
                    draw(rows, generator=generator)
                draws[name].append((time.perf_counter() - started) / 2000)
        config = TrainConfig(model="vae", dataset=splits.name, binarize="dynamic", hidden=(200, 200), latent_dim=50,
                             activation="tanh", batch_size=batch, epochs=epochs, patience=0, kl_warmup=0)
        epoch = {"bernoulli": [], "u < p": []}
        for repeat in range(repeats):
            for name, data in (("bernoulli", before), ("u < p", dynamic)):
                epoch[name].append(median(aetrack_epochs(replace(config, seed=repeat), data)[0]))
        result[f"batch {batch}"] = {
            "draw_ms": {name: round(median(times) * 1e3, 3) for name, times in draws.items()},
            "draw_speed-up": paired(draws["bernoulli"], draws["u < p"]),
            "epoch_samples_per_sec": {name: round(median(rates)) for name, rates in epoch.items()},
            "epoch_speed-up": paired(epoch["u < p"], epoch["bernoulli"])}
        print(f"binarize batch {batch}: {json.dumps(result[f'batch {batch}'])}", flush=True)
    return result | {"train_images": train_images}


def part_logging(splits, epochs, repeats) -> dict:
    import mlflow

    from conftest import start_mlflow_server, stop

    from aetrack.tracking import MetricBuffer

    def timed_fit(config, log=None) -> float:
        started = time.perf_counter()
        fit(config, splits, log=log, progress=False)
        return time.perf_counter() - started

    root = Path(tempfile.mkdtemp())
    url, server = start_mlflow_server(root)
    try:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("benchmark-logging")
        config = TrainConfig(model="vae", dataset=splits.name, epochs=epochs, **MLP)
        bare, tracked, flushes = [], [], []
        timed_fit(config)  # warm-up: the first fit of a process pays for allocator and kernel set-up
        for _ in range(repeats):
            bare.append(timed_fit(config))
            with mlflow.start_run() as run:
                buffer = MetricBuffer(run.info.run_id)  # exactly what `aetrack train` logs with
                tracked.append(timed_fit(config, log=buffer))
                flush_started = time.perf_counter()
                buffer.flush()
                mlflow.flush_async_logging()
                flushes.append(time.perf_counter() - flush_started)
    finally:
        stop(server)
    return {"bare_seconds": round(median(bare), 2), "tracked_seconds": round(median(tracked), 2),
            "ratio": round(median(tracked) / median(bare), 3), "final_flush_seconds": round(median(flushes), 2)}


# ----- the command -----------------------------------------------------------------------------------------

@click.command()
@click.option("--dataset", default="mnist", show_default=True)
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR")
@click.option("--part", "parts", multiple=True, type=click.Choice(PARTS), help="Repeatable; default: all but logging.")
@click.option("--epochs", default=1, show_default=True, help="Epochs per measurement.")
@click.option("--repeats", default=3, show_default=True, help="Alternating reference/aetrack repeats; the median is kept.")
@click.option("--train-images", default=12800, show_default=True,
              help="Training images for the conv, variants and precision parts (throughput does not depend on it).")
@click.option("--threads", default=1, show_default=True,
              help="torch.set_num_threads for both sides (0: torch's default). On a shared machine more threads than "
                   "free cores make every small op wait for a descheduled thread: measured 10x slower at load 6 on 2 cores.")
@click.option("--memory-child", type=click.Choice(["reference", "aetrack"]), default=None, hidden=True)
def main(dataset, data_dir, parts, epochs, repeats, train_images, threads, memory_child):
    if threads:
        torch.set_num_threads(threads)
    if memory_child:
        return memory_child_of(memory_child, dataset, data_dir)
    parts = parts or tuple(p for p in PARTS if p != "logging")
    splits = datasets.load(dataset, data_dir=data_dir)
    path = RESULTS / f"training-{dataset}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.pop("throughput", None)  # the per-variant table of the former benchmark
    for part in parts:
        load_before = os.getloadavg()
        started = time.perf_counter()
        if part == "mlp":
            result = part_mlp(splits, data_dir, epochs, repeats)
        elif part == "conv":
            result = part_conv(splits, data_dir, epochs, repeats, train_images)
        elif part == "variants":
            result = part_variants(splits, epochs, repeats, train_images)
        elif part == "memory":
            result = part_memory(dataset, data_dir)
        elif part == "precision":
            result = part_precision(splits, max(epochs, 2), repeats, train_images)
        elif part == "binarize":
            result = part_binarize(splits, epochs, repeats, train_images)
        else:
            result = part_logging(splits, epochs, repeats)
        record[part] = {**result, "seconds": round(time.perf_counter() - started),
                        "load_average_before": [round(v, 2) for v in load_before],
                        "load_average_after": [round(v, 2) for v in os.getloadavg()],
                        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "command": "python benchmarks/training.py " + shlex.join(sys.argv[1:])}
        print(part, json.dumps(record[part]), flush=True)
        RESULTS.mkdir(exist_ok=True)
        record["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                             "threads": torch.get_num_threads()}
        path.write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / f"training-{dataset}.md").write_text(markdown(record, dataset))


def markdown(record: dict, dataset: str) -> str:
    lines = [f"# Training speed ({dataset})", "",
             f"{record['machine']['cpus']} CPUs, torch {record['machine']['torch']}, {record['machine']['threads']} threads. "
             "Each figure is a median over alternating repeats; the reference ran in the same process, just before.", ""]
    for part, result in record.items():
        if part == "machine":
            continue
        how = (f"`{result['command']}` (load average {result['load_average_before']} before, "
               f"{result['load_average_after']} after, {result['seconds']} s)" if "command" in result
               else "from an earlier run of this benchmark, before load averages were recorded")
        lines += [f"## {part}", "", how, "", "```json",
                  json.dumps({k: v for k, v in result.items() if k not in ("command", "when", "seconds",
                              "load_average_before", "load_average_after")}, indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
