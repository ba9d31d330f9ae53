"""The Fashion-MNIST loader on tiny generated IDX files: parsing, verification, search order, download."""
from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import torch

import ldm.data.fashion as fm
from conftest import idx_bytes


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    """A directory with 12 'train' and 6 'test' images in IDX format (gzipped) and a matching hash table."""
    rng = np.random.default_rng(0)
    hashes = {}
    for split, n in (("train", 12), ("test", 6)):
        img_name, lbl_name = fm.FILES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for name, arr in ((img_name, images), (lbl_name, labels)):
            data = idx_bytes(arr)
            hashes[name] = hashlib.sha256(data).hexdigest()
            (tmp_path / name).write_bytes(gzip.compress(data))
    monkeypatch.setattr(fm, "SHA256", hashes)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no_debian")
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "no_cache")
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    return tmp_path


def test_parse_idx_round_trip_and_errors():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fm.parse_idx(idx_bytes(arr)), arr)
    with pytest.raises(fm.DatasetNotFound, match="bad magic"):
        fm.parse_idx(b"\x01\x02\x08\x03" + b"\x00" * 20)
    with pytest.raises(fm.DatasetNotFound, match="truncated"):
        fm.parse_idx(idx_bytes(arr)[:-3])


def test_load_from_given_dir_and_env_var(tiny_dir, monkeypatch):
    images, labels = fm.load_fashion_mnist("train", root=tiny_dir)
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(12)] and labels.dtype == np.int64
    monkeypatch.setenv(fm.ENV_VAR, str(tiny_dir))
    assert fm.load_fashion_mnist("test")[0].shape == (6, 28, 28)


def test_raw_idx_files_work_too(tiny_dir):
    name = fm.FILES["test"][0]
    (tiny_dir / name[:-3]).write_bytes(gzip.decompress((tiny_dir / name).read_bytes()))
    (tiny_dir / name).unlink()
    assert fm.load_fashion_mnist("test", root=tiny_dir)[0].shape == (6, 28, 28)


def test_corrupted_content_is_refused(tiny_dir):
    name = fm.FILES["test"][1]
    data = bytearray(gzip.decompress((tiny_dir / name).read_bytes()))
    data[-1] ^= 1
    (tiny_dir / name).write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(fm.DatasetNotFound, match="SHA-256 mismatch"):
        fm.load_fashion_mnist("test", root=tiny_dir)


def test_not_found_names_all_three_options(tiny_dir):
    with pytest.raises(fm.DatasetNotFound) as e:
        fm.find_fashion_mnist()
    msg = str(e.value)
    assert "--data_dir" in msg and fm.ENV_VAR in msg and "apt-get install dataset-fashion-mnist" in msg
    assert fm.URL in msg and "\n" not in msg
    with pytest.raises(fm.DatasetNotFound, match="not found in"):
        fm.find_fashion_mnist(tiny_dir / "elsewhere")


def test_debian_dir_is_searched(tiny_dir, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tiny_dir)
    assert fm.find_fashion_mnist(split="test") == tiny_dir


def test_download_from_a_url_with_verification(tiny_dir, monkeypatch):
    cache = tiny_dir / "cache"
    monkeypatch.setattr(fm, "CACHE_DIR", cache)
    url = tiny_dir.as_uri() + "/"
    assert fm.find_fashion_mnist(split="train", download_ok=True, url=url) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(n for pair in fm.FILES.values() for n in pair)
    # a server that returns the wrong bytes: no file is left behind
    bad = tiny_dir / "bad"
    bad.mkdir()
    for name in fm.FILES["test"]:
        (bad / name).write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05"))
    with pytest.raises(fm.DatasetNotFound, match="download of .* failed"):
        fm.download(tiny_dir / "dl", url=bad.as_uri() + "/", names=fm.FILES["test"])
    assert not list((tiny_dir / "dl").iterdir())


def test_dataset_items_are_padded_compvis_dicts(tiny_dir, monkeypatch):
    ds = fm.FashionMNIST("test", root=tiny_dir)
    item = ds[3]
    assert item["image"].shape == (32, 32, 1) and int(item["class_label"]) == 3
    raw, _ = fm.load_fashion_mnist("test", root=tiny_dir)
    torch.testing.assert_close(item["image"][2:30, 2:30, 0], torch.from_numpy(raw[3]).float() / 127.5 - 1)
    assert (item["image"][:2] == -1).all() and item["image"].max() <= 1
    monkeypatch.setattr(fm, "HELDOUT", 4)  # the last HELDOUT training images are held out
    train, held = fm.FashionMNIST("train", root=tiny_dir), fm.FashionMNIST("heldout", root=tiny_dir)
    assert (len(train), len(held)) == (8, 4)
    assert held.labels.tolist() == [8, 9, 0, 1]
