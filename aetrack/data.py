"""Data sets held whole as tensors on one device, split into train / validation / test.

Batches are drawn by index (`Splits.train_batch`); nothing goes through PIL or a DataLoader.
"""

from __future__ import annotations

import importlib
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

# torchvision is imported only where a torchvision data set is read: it adds about a second to every start.
if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10, MNIST

from aetrack.config import (BINARIZE, DATASETS, MIN_VAL_EXAMPLES, POOL_SIZES,  # noqa: F401 (POOL_SIZES: re-exported)
                            ConfigError, UserError, resolve_device)


# Fixed seeds, independent of the run's seed, so that the digits test split and every binarized
# validation / test image are the same in all runs and their losses can be compared.
DIGITS_TEST_SEED = 0
BINARIZE_SEED = 0

_DEFAULT_DIR = "~/.cache/aetrack/data"


class DataError(UserError):
    """A data set that cannot be loaded; str(err) is ONE line saying which file was expected where and how to get it."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class Splits:
    """Images are held as the source stores them: uint8 grey levels 0..`levels` (a quarter of float32's memory;
    a binarized image holds 0 or `levels`). `train_x`, `val_x` and `test_x` are float32 in [0, 1], converted on each
    access: the hot paths use `train_batch`, which converts only the rows it draws, and `len(train_y)`."""

    name: str
    train_images: torch.Tensor  # uint8 grey levels (or float32 in [0, 1]), (N, C, H, W)
    train_y: torch.Tensor       # int64, (N,)
    val_images: torch.Tensor
    val_y: torch.Tensor
    test_images: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    binarize: str = "none"
    levels: int = 255           # the stored value of white

    def as_float(self, images: torch.Tensor) -> torch.Tensor:
        """Stored images as float32 in [0, 1], on their device."""
        if images.is_floating_point():
            return images
        return images.to(torch.float32).div_(self.levels)

    @property
    def train_x(self) -> torch.Tensor:
        return self.as_float(self.train_images)

    @property
    def val_x(self) -> torch.Tensor:
        return self.as_float(self.val_images)

    @property
    def test_x(self) -> torch.Tensor:
        return self.as_float(self.test_images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_batch(self, index: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y for these training indices, x as float32 in [0, 1]; with binarize == "dynamic" x is a fresh Bernoulli
        draw of the grey levels each call (generator on the same device as the data), else the stored rows."""
        x = self.as_float(self.train_images[index])
        if self.binarize == "dynamic":
            x = binary_draw(x, generator=generator)
        return x, self.train_y[index]

    def mean_image(self, chunk: int = 1024) -> torch.Tensor:
        """The training images' mean, float32 (C, H, W), summed a chunk at a time (no float copy of the set)."""
        stored = self.train_images
        total = torch.zeros(self.shape, dtype=torch.float64, device=stored.device)
        for start in range(0, len(stored), chunk):  # float32 sums of a chunk of 8-bit levels are exact (< 2^24)
            total += stored[start:start + chunk].to(torch.float32).sum(0)
        scale = 1.0 if stored.is_floating_point() else self.levels
        return (total / (len(stored) * scale)).float()

    def to(self, device: str | torch.device) -> Splits:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def __repr__(self) -> str:
        return (f"Splits({self.name!r}, train={len(self.train_y)}, val={len(self.val_y)}, test={len(self.test_y)}, "
                f"shape={self.shape}, binarize={self.binarize!r}, device={self.train_images.device})")


def binary_draw(p: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Bernoulli(p) draw of each pixel, as float: u < p with u uniform on [0, 1). The same law as `torch.bernoulli(p)`
    (0 stays 0, 1 stays 1), and cheaper on CPU, where torch.bernoulli's sampler costs more the greyer the pixels:
    1.2 to 1.3 times faster on MNIST's batches (benchmarks/training.py --part binarize), more on greyer images."""
    return (torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) < p).to(p.dtype)


def resolve_data_dir(data_dir: str | None) -> Path:
    """--data-dir, else $AETRACK_DATA_DIR, else ~/.cache/aetrack/data."""
    return Path(data_dir or os.environ.get("AETRACK_DATA_DIR") or _DEFAULT_DIR).expanduser()


def cache_dir() -> Path:
    """Where .gz files from a read-only folder get unpacked: $AETRACK_CACHE_DIR, else ~/.cache/aetrack/data."""
    return Path(os.environ.get("AETRACK_CACHE_DIR") or _DEFAULT_DIR).expanduser()


def load(name: str, *, data_dir: str | None = None, download: bool = False, binarize: str = "none",
         val_fraction: float = 0.1, seed: int = 0, device: str | torch.device = "cpu") -> Splits:
    """Load a data set whole, split off `val_fraction` of the training pool with `seed`, move it to `device`."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    if binarize not in BINARIZE:
        raise DataError(f"unknown binarize mode {binarize!r}; choose one of: {', '.join(BINARIZE)}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")

    pool_x, pool_y, test_x, test_y, classes, levels = _read(name, resolve_data_dir(data_dir), download)

    fixed_pool = pool_x
    if binarize != "none":
        # Drawn over the whole pool before the split, so an image's binary version does not depend on `seed`;
        # stored as 0 or `levels`, like the grey levels.
        fixed = torch.Generator().manual_seed(BINARIZE_SEED)
        fixed_pool = torch.bernoulli(pool_x.float() / levels, generator=fixed).to(torch.uint8) * levels
        test_x = torch.bernoulli(test_x.float() / levels, generator=fixed).to(torch.uint8) * levels

    order = torch.randperm(len(pool_y), generator=torch.Generator().manual_seed(seed))
    n_val = min(max(round(val_fraction * len(order)), 1), len(order) - 1)
    val, train = order[:n_val], order[n_val:]
    # "dynamic" keeps grey levels for training and draws at each batch (Burda et al. 2015);
    # "static" trains on one fixed draw (Larochelle & Murray 2011).
    train_x = pool_x[train] if binarize == "dynamic" else fixed_pool[train]
    splits = Splits(name, train_x, pool_y[train], fixed_pool[val], pool_y[val], test_x, test_y, classes, binarize, levels)
    return splits.to(device)


def load_for(config, *, data_dir: str | None = None, download: bool = False, binarize: str | None = None,
             device=None) -> Splits:
    """The data set and split a config trains on (its binarization unless `binarize` is given), on `device`
    (default: the config's)."""
    return load(config.dataset, data_dir=data_dir, download=download,
                binarize=config.binarize if binarize is None else binarize, val_fraction=config.val_fraction,
                seed=config.seed, device=resolve_device(config.device) if device is None else device)


def check_fits(config, splits: Splits) -> None:
    """What a config asks of its data that only the loaded data can answer (train and tune ask it here, once):
    a ConfigError naming the option if the data cannot give it."""
    from aetrack.models import REGISTRY

    if REGISTRY[config.model].semi_supervised and config.labeled > len(splits.train_y):
        raise ConfigError(f"--labeled {config.labeled} is larger than the training set ({len(splits.train_y)} examples)")
    if len(splits.val_y) < MIN_VAL_EXAMPLES:
        raise ConfigError(f"--val-fraction {config.val_fraction} leaves {len(splits.val_y)} validation examples; "
                          f"at least {MIN_VAL_EXAMPLES} are needed")


def labeled_indices(y: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """`count` training indices balanced over classes (as in Kingma et al. 2014), fixed by the seed."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    y_cpu = y.cpu()[order]
    per_class = [order[y_cpu == c] for c in range(num_classes)]
    quota = [count // num_classes + (1 if c < count % num_classes else 0) for c in range(num_classes)]
    chosen = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    if len(chosen) < count:  # a class too small for its quota: fill from the rest
        rest = order[~torch.isin(order, chosen)]
        chosen = torch.cat([chosen, rest[: count - len(chosen)]])
    return chosen.to(y.device)


class _Pool(NamedTuple):
    """A data set as read: the training pool (not yet split into train / val) and the test set, as uint8 grey
    levels 0..`levels`."""
    pool_x: torch.Tensor
    pool_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    levels: int


def _read(name: str, root: Path, download: bool) -> _Pool:
    reader, source_name = _READERS[name]
    if source_name in IDX_CLASSES and (pool := _read_unpacked(name, source_name, root)) is not None:
        return pool
    source = getattr(importlib.import_module("torchvision.datasets"), source_name) if source_name else None
    try:
        return reader(name, source, root)
    except DataError:
        if not (download and source):
            raise
    try:  # only once a reader failed: torchvision would unpack into a read-only folder even when nothing is missing
        source(str(root), train=True, download=True)
    except (RuntimeError, OSError) as err:
        raise DataError(f"{name}: download into {root} failed: {_one_line(err)}") from None
    return reader(name, source, root)


def _read_digits(name: str, source: None, root: Path) -> _Pool:
    """scikit-learn's digits and their fixed test split, read through scikit-learn once (importing it takes over a
    second) and from a copy in cache_dir() after that."""
    cached = cache_dir() / "digits.npz"
    try:
        with np.load(cached) as saved:
            images, target, pool, test = (saved[key] for key in ("images", "target", "pool", "test"))
    except (OSError, KeyError, ValueError):  # not there yet, or unreadable: read it again
        images, target, pool, test = _split_digits()
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npz", delete=False) as tmp:
                np.savez(tmp, images=images, target=target, pool=pool, test=test)
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, cached)  # whole or not at all, also with two runs starting at once
        except OSError:
            pass  # a read-only cache: read through scikit-learn each time
    x = torch.from_numpy(images).unsqueeze(1)  # grey levels are 0..16
    y = torch.from_numpy(target).long()
    return _Pool(x[pool], y[pool], x[test], y[test], tuple(str(c) for c in range(10)), 16)


def _split_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pool, test = train_test_split(np.arange(len(digits.target)), test_size=0.2, stratify=digits.target,
                                  random_state=DIGITS_TEST_SEED)
    return digits.images.astype(np.uint8), digits.target.astype(np.int64), pool, test


def _check_labels(name: str, labels: torch.Tensor, classes: int, where: Path) -> None:
    """Labels outside 0..classes-1 are a corrupt file: said here, naming it, not as an indexing error mid-training."""
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise DataError(f"{name}: {where} holds {len(bad)} labels outside 0..{classes - 1} (the first: {int(bad[0])}); "
                        "the file is corrupt: copy it again")


def _read_mnist(name: str, source: type[MNIST], root: Path) -> _Pool:
    unpacked = _unpacked_root(name, source, root)
    train, test = source(str(unpacked), train=True), source(str(unpacked), train=False)
    raw = unpacked / source.__name__ / "raw"
    _check_labels(name, train.targets, len(train.classes), raw / "train-labels-idx1-ubyte")
    _check_labels(name, test.targets, len(test.classes), raw / "t10k-labels-idx1-ubyte")
    return _Pool(train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long(),
                 tuple(train.classes), 255)


# The class names torchvision gives these sets (a test checks that they agree), so that reading their unpacked files
# needs no torchvision: importing it took longer than reading MNIST (benchmarks/surroundings.py).
IDX_CLASSES = {
    "MNIST": ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
              "8 - eight", "9 - nine"),
    "FashionMNIST": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_unpacked(name: str, source_name: str, root: Path) -> _Pool | None:
    """MNIST or Fashion-MNIST from its four unpacked IDX files (where torchvision reads them, or where they were
    unpacked into cache_dir()), as torchvision reads them; None when they are not all there and whole: torchvision's
    path then unpacks, checks and says what is missing."""
    for folder in (root / source_name / "raw", cache_dir() / source_name / "raw"):
        paths = [folder / file for file in IDX_FILES]
        if all(path.is_file() and _idx_complete(path) for path in paths):
            train_x, train_y, test_x, test_y = (_idx_array(path) for path in paths)
            if train_x is None or train_y is None or test_x is None or test_y is None:
                return None
            classes = IDX_CLASSES[source_name]
            train_y, test_y = torch.from_numpy(train_y).long(), torch.from_numpy(test_y).long()
            _check_labels(name, train_y, len(classes), paths[1])
            _check_labels(name, test_y, len(classes), paths[3])
            return _Pool(torch.from_numpy(train_x).unsqueeze(1), train_y, torch.from_numpy(test_x).unsqueeze(1), test_y,
                         classes, 255)
    return None


def _idx_array(path: Path) -> np.ndarray | None:
    """An IDX file of unsigned bytes as an array of its shape (a copy: writable); None for another item type."""
    data = path.read_bytes()
    if data[2] != 0x08:
        return None
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _unpacked_root(name: str, cls: type[MNIST], root: Path) -> Path:
    """A root whose <cls>/raw holds the unpacked IDX files torchvision reads, unpacking the .gz files if needed.

    torchvision only reads the unpacked files, while the published .gz files may be all there is;
    they are unpacked beside themselves, or into cache_dir() when their folder is read-only.
    """
    from torchvision.datasets.utils import check_integrity

    raw = root / cls.__name__ / "raw"
    files = [(gz.removesuffix(".gz"), gz, md5) for gz, md5 in cls.resources]
    for idx, gz, _ in files:
        if not (raw / idx).is_file() and not (raw / gz).is_file():
            raise DataError(f"{name}: expected {idx}(.gz) in {raw}; copy the {cls.__name__} files there, point "
                            f"--data-dir or AETRACK_DATA_DIR at the folder that holds {cls.__name__}/, or pass --download")

    if all((raw / idx).is_file() for idx, _, _ in files) or _writable(raw):
        target = root
    else:
        target = cache_dir()
    dest = target / cls.__name__ / "raw"
    todo = [(idx, gz, md5) for idx, gz, md5 in files if not (dest / idx).is_file()]
    for idx, gz, md5 in todo:  # all checked before any is unpacked
        if not (raw / gz).is_file():
            raise DataError(f"{name}: expected {gz} in {raw} to unpack into {dest}; copy it there or pass --download")
        if not check_integrity(raw / gz, md5):
            raise DataError(f"{name}: {raw / gz} fails its md5 check (corrupt or incomplete); re-download it (delete it and pass --download)")
    for idx, gz, _ in todo:
        _unpack(name, raw / gz, dest / idx)
    for idx, _, _ in files:
        if not _idx_complete(dest / idx):
            raise DataError(f"{name}: {dest / idx} is truncated or not an IDX file; re-download it (delete it and pass --download)")
    return target


def _writable(folder: Path) -> bool:
    # root may write anywhere, so also honour the permission bits: a folder marked read-only stays untouched.
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _unpack(name: str, gz: Path, out: Path) -> None:
    from torchvision.datasets.utils import extract_archive

    out.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target, then rename: an interrupted run leaves no half-written file behind.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        try:
            unpacked = extract_archive(str(gz), tmp)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{name}: cannot unpack {gz} ({_one_line(err)}); re-download it (delete it and pass --download)") from None
        os.replace(unpacked, out)


_IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def _idx_complete(path: Path) -> bool:
    """Whether the file's size matches its IDX header: magic 0, 0, type, ndim, then ndim big-endian sizes."""
    with path.open("rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_ITEM_BYTES:
            return False
        sizes = f.read(4 * magic[3])
    if len(sizes) < 4 * magic[3]:
        return False
    count = math.prod(struct.unpack(f">{magic[3]}I", sizes))
    return path.stat().st_size == 4 + len(sizes) + count * _IDX_ITEM_BYTES[magic[2]]


def _read_cifar(name: str, source: type[CIFAR10], root: Path) -> _Pool:
    try:
        train, test = source(str(root), train=True), source(str(root), train=False)
    except RuntimeError:  # torchvision says only "not found or corrupted"; find out which file
        raise _cifar_problem(name, source, root) from None

    def images(data: np.ndarray) -> torch.Tensor:  # NHWC -> NCHW, uint8 kept
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()

    folder = root / source.base_folder
    train_y, test_y = torch.tensor(train.targets, dtype=torch.int64), torch.tensor(test.targets, dtype=torch.int64)
    _check_labels(name, train_y, len(train.classes), folder / "data_batch_*")
    _check_labels(name, test_y, len(test.classes), folder / "test_batch")
    return _Pool(images(train.data), train_y, images(test.data), test_y, tuple(train.classes), 255)


def _cifar_problem(name: str, cls: type[CIFAR10], root: Path) -> DataError:
    from torchvision.datasets.utils import check_integrity

    folder = root / cls.base_folder
    for file, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        if not (folder / file).is_file():
            return DataError(f"{name}: expected {file} in {folder}; unpack cifar-10-python.tar.gz there, point --data-dir "
                             f"or AETRACK_DATA_DIR at the folder that holds {cls.base_folder}/, or pass --download")
        if not check_integrity(folder / file, md5):
            return DataError(f"{name}: {folder / file} fails its md5 check (corrupt or incomplete); re-download it (delete it and pass --download)")
    return DataError(f"{name}: cannot read the files in {folder}; re-download them (delete them and pass --download)")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# name -> (reader, the torchvision.datasets class that reads and downloads it)
_READERS = {
    "digits": (_read_digits, None),
    "mnist": (_read_mnist, "MNIST"),
    "fashion-mnist": (_read_mnist, "FashionMNIST"),
    "cifar10": (_read_cifar, "CIFAR10"),
}
