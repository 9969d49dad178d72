"""aetrack.data: splits, binarization, and loading files the way torchvision lays them out.

MNIST and CIFAR-10 are exercised on tiny fake files whose md5s torchvision is told to expect;
the real MNIST / Fashion-MNIST files are used only when AETRACK_TEST_DATA_DIR points at them.
"""

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from aetrack import data
from aetrack.data import DataError, load


def samples(x, y):
    """Each example as a hashable (pixels, label) pair, to compare splits by content."""
    return Counter(zip(map(bytes, (x * 255).round().to(torch.uint8).flatten(1).numpy()), y.tolist()))


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def flip_byte(path, offset=-1):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def assert_one_line(err, *parts):
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


# --- digits and splitting ---

def test_digits_sizes_shape_and_range(digits):
    assert len(digits.train_y) + len(digits.val_y) + len(digits.test_y) == 1797
    assert len(digits.test_y) == 360  # 20 %
    assert len(digits.val_y) == round(0.1 * (1797 - 360))
    assert digits.shape == (1, 8, 8) and digits.train_x.shape[1:] == (1, 8, 8)
    assert digits.num_classes == 10 and digits.classes == tuple("0123456789")
    for x, y in [(digits.train_x, digits.train_y), (digits.val_x, digits.val_y), (digits.test_x, digits.test_y)]:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() == 0 and x.max() == 1  # 0..16 scaled by 1/16, both ends occur
        assert set(y.tolist()) == set(range(10))


def test_digits_splits_are_disjoint_and_use_every_example(digits):
    from sklearn.datasets import load_digits

    everything = load_digits()
    full = samples(torch.tensor(everything.images / 16).unsqueeze(1), torch.tensor(everything.target))
    train, val, test = (samples(digits.train_x, digits.train_y), samples(digits.val_x, digits.val_y),
                        samples(digits.test_x, digits.test_y))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train + val + test == full


def test_digits_test_split_is_stratified(digits):
    from sklearn.datasets import load_digits

    totals = np.bincount(load_digits().target)
    in_test = np.bincount(digits.test_y.numpy(), minlength=10)
    assert np.all(np.abs(in_test - 0.2 * totals) <= 1)


def test_test_split_ignores_seed_and_val_split_follows_it(digits):
    again, other = load("digits", seed=0), load("digits", seed=1)
    assert torch.equal(other.test_x, digits.test_x) and torch.equal(other.test_y, digits.test_y)
    assert torch.equal(again.val_x, digits.val_x) and torch.equal(again.train_y, digits.train_y)
    assert samples(other.val_x, other.val_y) != samples(digits.val_x, digits.val_y)
    # a different carve of the same pool
    assert samples(other.train_x, other.train_y) + samples(other.val_x, other.val_y) == \
        samples(digits.train_x, digits.train_y) + samples(digits.val_x, digits.val_y)


def test_val_fraction_sets_the_val_size():
    assert len(load("digits", val_fraction=0.5).val_y) == round(0.5 * 1437)


# --- binarization ---

def is_binary(x):
    return bool(((x == 0) | (x == 1)).all())


def test_none_keeps_grey_levels_and_batches_are_stored_rows(digits):
    index = torch.tensor([3, 1, 4, 1, 5])
    x, y = digits.train_batch(index)
    assert torch.equal(x, digits.train_x[index]) and torch.equal(y, digits.train_y[index])
    assert not is_binary(digits.train_x)


def test_static_is_one_fixed_draw_of_every_split(digits):
    static = load("digits", binarize="static")
    assert all(is_binary(x) for x in (static.train_x, static.val_x, static.test_x))
    index = torch.arange(64)
    first, second = static.train_batch(index, torch.Generator().manual_seed(1)), static.train_batch(index)
    assert torch.equal(first[0], second[0]) and torch.equal(first[0], static.train_x[index])
    # a Bernoulli draw of the grey levels: the mean is kept, the values are not
    assert abs(static.train_x.mean() - digits.train_x.mean()) < 0.01
    assert not torch.equal(static.train_x, digits.train_x.round())
    assert torch.equal(static.train_y, digits.train_y)
    # the draw does not depend on the split's seed
    other = load("digits", binarize="static", seed=5)
    assert torch.equal(other.test_x, static.test_x)
    assert samples(other.train_x, other.train_y) + samples(other.val_x, other.val_y) == \
        samples(static.train_x, static.train_y) + samples(static.val_x, static.val_y)


def test_dynamic_redraws_training_batches_but_fixes_val_and_test(digits):
    dynamic, static = load("digits", binarize="dynamic"), load("digits", binarize="static")
    assert torch.equal(dynamic.train_x, digits.train_x)  # grey levels kept for drawing
    index = torch.arange(256)
    first, again = dynamic.train_batch(index)[0], dynamic.train_batch(index)[0]
    assert is_binary(first) and is_binary(again) and not torch.equal(first, again)
    seeded = [dynamic.train_batch(index, torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(*seeded)
    assert torch.equal(dynamic.val_x, static.val_x) and torch.equal(dynamic.test_x, static.test_x)
    assert torch.equal(load("digits", binarize="dynamic", seed=3).test_x, dynamic.test_x)


def test_to_moves_every_tensor(digits):
    moved = digits.to("meta")
    assert all(t.device.type == "meta" for t in (moved.train_x, moved.train_y, moved.val_x, moved.val_y, moved.test_x, moved.test_y))
    assert moved.classes == digits.classes and moved.shape == digits.shape
    assert digits.train_x.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dynamic_batches_on_cuda():
    splits = load("digits", binarize="dynamic", device="cuda")
    assert splits.test_x.is_cuda
    x, y = splits.train_batch(torch.arange(10, device="cuda"), torch.Generator(device="cuda").manual_seed(0))
    assert x.is_cuda and y.is_cuda and is_binary(x)


# --- bad requests ---

@pytest.mark.parametrize("kwargs, choices", [
    ({"name": "imagenet"}, data.DATASETS),
    ({"name": "digits", "binarize": "sometimes"}, data.BINARIZE),
])
def test_unknown_choices_list_the_valid_ones(kwargs, choices):
    with pytest.raises(DataError) as err:
        load(**kwargs)
    assert_one_line(err, *choices)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_val_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        load("digits", val_fraction=fraction)


def test_resolve_data_dir_prefers_flag_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("AETRACK_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir("/somewhere") == Path("/somewhere")
    assert data.resolve_data_dir(None) == tmp_path
    monkeypatch.delenv("AETRACK_DATA_DIR")
    assert data.resolve_data_dir(None) == Path.home() / ".cache" / "aetrack" / "data"


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_missing_files_say_what_was_expected_where(name, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("AETRACK_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AETRACK_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        load(name)
    assert_one_line(err, "train-images-idx3-ubyte", tmp_path / folder / "raw", "--download", "AETRACK_DATA_DIR")


# --- MNIST layout, on tiny fake files ---

def write_idx(path, array):
    """An IDX file of uint8 (gzipped when the name ends in .gz): magic 0 0 8 ndim, big-endian sizes, bytes."""
    body = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """<root>/MNIST/raw with .gz files only: 30 training and 12 test images; image i is all i, label i % 10."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, first, count in [("train", 0, 30), ("t10k", 100, 12)]:
        values = np.arange(first, first + count, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", np.repeat(values, 28 * 28).reshape(count, 28, 28))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", values % 10)
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", [(f.name, md5(f)) for f in sorted(raw.iterdir())])
    monkeypatch.setenv("AETRACK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "data"


def check_fake_mnist(splits):
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (27, 3, 12)
    assert splits.shape == (1, 28, 28) and splits.num_classes == 10
    for x, y in [(splits.train_x, splits.train_y), (splits.val_x, splits.val_y), (splits.test_x, splits.test_y)]:
        pixels = (x * 255).round().long()
        assert torch.equal(pixels, pixels[:, :1, :1, :1].expand_as(pixels))  # every pixel of an image alike
        assert torch.equal(pixels[:, 0, 0, 0] % 10, y)
    assert sorted((splits.train_x[:, 0, 0, 0] * 255).round().long().tolist() +
                  (splits.val_x[:, 0, 0, 0] * 255).round().long().tolist()) == list(range(30))
    assert torch.equal((splits.test_x[:, 0, 0, 0] * 255).round().long(), torch.arange(100, 112))


def unpacked(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".gz")) if folder.exists() else []


IDX_NAMES = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def test_gz_only_folder_is_unpacked_in_place(fake_mnist, tmp_path):
    check_fake_mnist(load("mnist", data_dir=str(fake_mnist)))
    assert unpacked(fake_mnist / "MNIST" / "raw") == IDX_NAMES
    assert not (tmp_path / "cache").exists()
    check_fake_mnist(load("mnist", data_dir=str(fake_mnist)))  # and read as they are the second time


def test_unpacked_files_are_read_as_torchvision_reads_them_without_importing_it(fake_mnist, tmp_path):
    from aetrack import data

    load("mnist", data_dir=str(fake_mnist))  # unpacks
    theirs = data._read_mnist("mnist", torchvision.datasets.MNIST, fake_mnist)
    script = ("import sys, torch; from aetrack import data; from pathlib import Path; "
              f"pool = data._read('mnist', Path({str(fake_mnist)!r}), False); "
              f"torch.save(tuple(pool), {str(tmp_path / 'ours.pt')!r}); print('torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    ours = torch.load(tmp_path / "ours.pt")
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ours[:4], theirs[:4]))
    assert tuple(ours[4:]) == tuple(theirs[4:])


def test_the_class_names_are_torchvisions():
    from aetrack.data import IDX_CLASSES

    assert IDX_CLASSES == {"MNIST": tuple(torchvision.datasets.MNIST.classes),
                           "FashionMNIST": tuple(torchvision.datasets.FashionMNIST.classes)}


def test_read_only_folder_is_unpacked_into_the_cache(fake_mnist, tmp_path):
    raw = fake_mnist / "MNIST" / "raw"
    raw.chmod(0o555)
    try:
        check_fake_mnist(load("mnist", data_dir=str(fake_mnist)))
        assert unpacked(raw) == []
        assert unpacked(tmp_path / "cache" / "MNIST" / "raw") == IDX_NAMES
    finally:
        raw.chmod(0o755)


def test_md5_mismatch_names_the_file_and_unpacks_nothing(fake_mnist):
    bad = fake_mnist / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    flip_byte(bad)
    with pytest.raises(DataError) as err:
        load("mnist", data_dir=str(fake_mnist))
    assert_one_line(err, bad, "md5", "re-download")
    assert unpacked(fake_mnist / "MNIST" / "raw") == []


def test_unreadable_archive_names_the_file(fake_mnist, monkeypatch):
    raw = fake_mnist / "MNIST" / "raw"
    bad = raw / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", [(f.name, md5(f)) for f in sorted(raw.iterdir())])
    with pytest.raises(DataError) as err:
        load("mnist", data_dir=str(fake_mnist))
    assert_one_line(err, bad, "cannot unpack", "re-download")


def test_labels_out_of_range_name_the_label_file(fake_mnist, monkeypatch):
    # A label file whose checksum matches the files listed but whose labels cannot be classes (issue: "Class values
    # must be smaller than num_classes" in the middle of training, naming nothing).
    raw = fake_mnist / "MNIST" / "raw"
    labels = np.arange(30, dtype=np.uint8) % 10
    labels[3] = 200
    write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", [(f.name, md5(f)) for f in sorted(raw.iterdir())])
    with pytest.raises(DataError) as err:
        load("mnist", data_dir=str(fake_mnist))
    assert_one_line(err, "train-labels-idx1-ubyte", "outside 0..9", "200")


def test_truncated_unpacked_file_names_the_file(fake_mnist):
    load("mnist", data_dir=str(fake_mnist))
    bad = fake_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        load("mnist", data_dir=str(fake_mnist))
    assert_one_line(err, bad, "truncated", "re-download")


def test_download_fetches_through_torchvision_only_when_files_are_missing(fake_mnist, tmp_path, monkeypatch):
    calls = []

    def fake_download(dataset):  # what torchvision does: fetch the .gz files and unpack them
        calls.append(dataset.raw_folder)
        shutil.copytree(fake_mnist / "MNIST" / "raw", dataset.raw_folder)
        for gz in Path(dataset.raw_folder).glob("*.gz"):
            Path(str(gz)[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    empty = tmp_path / "empty"
    with pytest.raises(DataError):
        load("mnist", data_dir=str(empty))
    assert calls == []
    check_fake_mnist(load("mnist", data_dir=str(empty), download=True))
    assert calls == [str(empty / "MNIST" / "raw")]
    load("mnist", data_dir=str(empty), download=True)
    assert len(calls) == 1


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(dataset):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/, got:\nno network\n")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError) as err:
        load("mnist", data_dir=str(tmp_path), download=True)
    assert_one_line(err, "download", tmp_path, "no network")


# --- CIFAR-10 layout, on tiny fake files ---

@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """<root>/cifar-10-batches-py with 5 training batches of 4 images and a test batch of 6.

    The real batches are Python 2 pickles; read with encoding="latin1" their keys come out as
    str, so that is what these are written with.
    """
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name, count in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 6)]:
        batches[name] = {"batch_label": name, "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, count).tolist(), "filenames": [f"{i}.png" for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5(folder / "batches.meta")})
    return tmp_path, batches, tuple(names)


def test_cifar10_batches_become_nchw_tensors(fake_cifar):
    root, batches, names = fake_cifar
    splits = load("cifar10", data_dir=str(root))
    assert splits.shape == (3, 32, 32) and splits.classes == names
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (18, 2, 6)
    # each row is 1024 red, then 1024 green, then 1024 blue values, row-major
    test = batches["test_batch"]
    assert torch.equal(splits.test_x, torch.tensor(test["data"]).reshape(6, 3, 32, 32).float() / 255)
    assert splits.test_y.tolist() == test["labels"]
    pool = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    expected = samples(torch.tensor(np.concatenate([b["data"] for b in pool])).reshape(20, 3, 32, 32) / 255,
                       torch.tensor(sum((b["labels"] for b in pool), [])))
    assert samples(splits.train_x, splits.train_y) + samples(splits.val_x, splits.val_y) == expected


def test_cifar10_corrupt_batch_names_the_file(fake_cifar):
    root, _, _ = fake_cifar
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    flip_byte(bad, offset=len(bad.read_bytes()) // 2)
    with pytest.raises(DataError) as err:
        load("cifar10", data_dir=str(root))
    assert_one_line(err, bad, "md5", "re-download")


def test_cifar10_missing_batch_says_where(fake_cifar):
    root, _, _ = fake_cifar
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as err:
        load("cifar10", data_dir=str(root))
    assert_one_line(err, "test_batch", root / "cifar-10-batches-py", "--download")


# --- the real MNIST / Fashion-MNIST files (read-only; copied before anything is written) ---

REAL_DATA = os.environ.get("AETRACK_TEST_DATA_DIR")
REAL = pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])


def copy_real(folder, tmp_path):
    if not REAL_DATA:
        pytest.skip("set AETRACK_TEST_DATA_DIR to the folder that holds MNIST/ and FashionMNIST/")
    raw = tmp_path / "data" / folder / "raw"
    raw.mkdir(parents=True)
    for gz in sorted((Path(REAL_DATA) / folder / "raw").glob("*.gz")):
        shutil.copyfile(gz, raw / gz.name)
    return raw


@pytest.mark.slow
@REAL
def test_real_gz_files_load_from_a_read_only_folder(name, folder, tmp_path, monkeypatch):
    raw = copy_real(folder, tmp_path)
    monkeypatch.setenv("AETRACK_CACHE_DIR", str(tmp_path / "cache"))
    raw.chmod(0o555)
    try:
        splits = load(name, data_dir=str(tmp_path / "data"))
    finally:
        raw.chmod(0o755)
    assert len(splits.train_y) + len(splits.val_y) == 60000 and len(splits.val_y) == 6000
    assert len(splits.test_y) == 10000
    assert splits.shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.train_x.min() == 0 and splits.train_x.max() == 1
    assert set(splits.test_y.tolist()) == set(range(10))
    assert unpacked(raw) == [] and unpacked(tmp_path / "cache" / folder / "raw") == IDX_NAMES


@REAL
def test_real_gz_file_with_wrong_md5_is_refused(name, folder, tmp_path, monkeypatch):
    raw = copy_real(folder, tmp_path)
    monkeypatch.setenv("AETRACK_CACHE_DIR", str(tmp_path / "cache"))
    bad = raw / "train-labels-idx1-ubyte.gz"
    flip_byte(bad, offset=1000)
    with pytest.raises(DataError) as err:
        load(name, data_dir=str(tmp_path / "data"))
    assert_one_line(err, bad, "md5", "re-download")


# --- compact storage and binarization draws (issue 10) ---

def test_images_are_held_as_uint8_and_batches_are_float(digits):
    assert digits.train_images.dtype == torch.uint8 and digits.levels == 16
    assert 4 * digits.train_images.nbytes == digits.train_x.nbytes  # a quarter of float32
    x, y = digits.train_batch(torch.tensor([0, 5, 7]))
    assert x.dtype == torch.float32 and torch.equal(x, digits.train_images[[0, 5, 7]].float() / 16)
    assert torch.allclose(digits.mean_image(chunk=100), digits.train_x.mean(0), atol=1e-6)


def test_static_binarization_is_stored_compactly_and_reads_as_zero_or_one():
    binary = load("digits", binarize="static")
    assert binary.train_images.dtype == torch.uint8
    assert set(binary.train_x.unique().tolist()) == {0.0, 1.0}
    assert set(binary.test_x.unique().tolist()) == {0.0, 1.0}


def test_dynamic_binarization_draws_per_batch_from_the_grey_levels():
    dynamic = load("digits", binarize="dynamic")
    generator = torch.Generator().manual_seed(0)
    index = torch.arange(64)
    first, _ = dynamic.train_batch(index, generator)
    second, _ = dynamic.train_batch(index, generator)
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    assert torch.all(first <= (dynamic.train_x[index] > 0).float())  # a black pixel is never drawn white


def test_dynamic_binarization_draws_each_pixel_with_its_grey_level_as_probability():
    grey = torch.linspace(0, 1, 17)  # 0 and 1 included: they must stay black and white
    draws = torch.stack([data.binary_draw(grey, generator=torch.Generator().manual_seed(seed)) for seed in range(4000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws[:, 0].sum() == 0 and draws[:, -1].sum() == len(draws)
    frequency = draws.mean(0)
    bound = 4 * torch.sqrt(grey * (1 - grey) / len(draws)) + 1e-6  # four standard errors of each frequency
    assert torch.all((frequency - grey).abs() <= bound), (frequency - grey).abs().max()
    bernoulli = torch.stack([torch.bernoulli(grey, generator=torch.Generator().manual_seed(seed)) for seed in range(4000)])
    assert torch.allclose(frequency, bernoulli.mean(0), atol=0.05)  # the same law as the sampler it replaces
