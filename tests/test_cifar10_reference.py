"""The CIFAR-10 reference batch is built from the python archive (a tiny fake one here: the layout of the real
archive, random pixels): pixel order, labels, the OpenAI npz layout; and every bad archive is one line."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest

from conftest import error_line, run_main
from evaluation import cifar10_reference as C


def fake_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    raw = pickle.dumps({b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"x"] * n},
                       protocol=2)
    return raw, data, np.asarray(labels)


def fake_archive(path, split_sizes=(3, 2, 2, 2, 2), test=4):
    truth = {}
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for k, (name, n) in enumerate(zip(names, (*split_sizes, test), strict=True)):
            raw, data, labels = fake_batch(n, k)
            truth[name] = (data, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return truth


def test_archive_to_openai_layout(tmp_path):
    truth = fake_archive(tmp_path / "c.tar.gz")
    out = tmp_path / "ref.npz"
    info = C.build_reference(tmp_path / "c.tar.gz", out, "train", check_md5=False)
    with np.load(out) as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert info["n"] == 11 and arr.shape == (11, 32, 32, 3) and arr.dtype == np.uint8 and labels.dtype == np.int64
    data, lab = truth["data_batch_1"]
    # row layout R(1024) G(1024) B(1024), each 32x32 row-major -> pixel (y, x, c)
    for y, x, c in ((0, 0, 0), (5, 7, 1), (31, 31, 2)):
        assert arr[0, y, x, c] == data[0, c * 1024 + y * 32 + x]
    assert labels[:3].tolist() == lab.tolist() and labels[3:5].tolist() == truth["data_batch_2"][1].tolist()


def test_unpacked_folder_and_test_split(tmp_path):
    truth = fake_archive(tmp_path / "c.tar.gz")
    with tarfile.open(tmp_path / "c.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    info = C.build_reference(tmp_path, tmp_path / "t.npz", "test")
    assert info["n"] == 4
    with np.load(tmp_path / "t.npz") as f:
        assert f["arr_1"].tolist() == truth["test_batch"][1].tolist()


class Evil:
    def __reduce__(self):
        return (print, ("owned",))


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes(b"not a tar at all"), "is not a readable tar archive"),
    (lambda p: tarfile.open(p, "w:gz").close(), "holds no data_batch_1"),
    (lambda p: None, "not found; download cifar-10-python.tar.gz"),
])
def test_bad_archives_are_one_line(tmp_path, capsys, make, fragment):
    make(tmp_path / "c.tar.gz")
    line = error_line(run_main(C.main, [str(tmp_path / "c.tar.gz"), "--skip_md5", "--out",
                                        str(tmp_path / "o.npz")], capsys))
    assert fragment in line and not (tmp_path / "o.npz").exists()


def test_md5_is_checked_unless_skipped(tmp_path, capsys):
    fake_archive(tmp_path / "c.tar.gz")
    line = error_line(run_main(C.main, [str(tmp_path / "c.tar.gz"), "--out", str(tmp_path / "o.npz")], capsys))
    assert f"the published archive {C.ARCHIVE_MD5}: a corrupt or different download" in line


def test_a_pickle_that_asks_for_code_is_refused_not_run(capsys):
    raw = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
    with pytest.raises(C.ArchiveError, match="asks to load __builtin__.print"):
        C.parse_batch(raw, "data_batch_1")
    assert "owned" not in capsys.readouterr().out
    with pytest.raises(C.ArchiveError, match="not a CIFAR-10 python batch"):
        C.parse_batch(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}), "x")
