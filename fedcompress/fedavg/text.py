"""Text datasets for next-word prediction: ``fortunes`` (Debian package) and LEAF ``reddit`` (JSON).

Both come back as a ``Dataset`` whose inputs are token ids ``int64 [N, T]`` and whose labels are the
next token ids ``int64 [N, T]``; ``info.input_shape == (T,)`` and ``info.num_classes`` is the
vocabulary size V. Label positions that must not count are ``IGNORE`` (-100, the default
``ignore_index`` of ``torch.nn.functional.cross_entropy``, so the driver's and FedSynth's unchanged
cross-entropy calls skip them):

- train labels: PAD and BOS targets are IGNORE (nothing to learn); UNK and EOS are trained on, as
  LEAF does;
- test labels: PAD, UNK, BOS and EOS targets are IGNORE, so top-1 accuracy (and test loss) are over
  real words only, LEAF's metric.

Vocabulary: the 4 special tokens (PAD=0, UNK=1, BOS=2, EOS=3), then the training split's words by
decreasing count (ties alphabetical), capped at ``vocab_size`` entries in all. Deterministic.

``fortunes``: one category file per client (``writers`` = category, so ``--partition natural``
gives one client per file). Entries (separated by lines holding ``%``) of each file are split
train/test by a fixed seed (every 10th entry on average, none from files with < 10 entries); each
file's entries become one token stream ``BOS w.. EOS BOS w.. EOS ..`` cut into windows of T + 1
tokens (x = window[:-1], y = window[1:], stride T); the tail shorter than a window is dropped. A
category file whose training stream has no full window is an error naming it.

``reddit``: LEAF's Reddit JSON (``train/*.json``, ``test/*.json``; ``user_data[u] = {"x": [comment
[sequence [token]]], "y": [{"target_tokens": [sequence [token]]}]}``). Users are clients; LEAF's
train/test split is kept; sequences are used as they are (LEAF pads them to T=10 with ``<PAD>``).
LEAF ships its vocabulary as a pickle, which we never load; a ``vocab.json`` (a list of words, most
frequent first) or ``vocab.txt`` (one word a line) in the folder is used when present, otherwise the
vocabulary is built from the training split.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch

from ..errors import FormatError
from .data import leaf_split_files

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
IGNORE = -100  # F.cross_entropy's default ignore_index

DEFAULT_SEQ_LEN = 10  # LEAF Reddit's sequence length
DEFAULT_VOCAB = 10_000  # LEAF Reddit's vocabulary size (its 10k most frequent words)
FORTUNES_DIR = "/usr/share/games/fortunes"
TEXT_DATASETS = ("fortunes", "reddit")

# Fixed seed of the fortunes train/test entry split (independent of the experiment seed, so every
# run and compressor is evaluated on the same held-out text).
SPLIT_SEED = 20240602
TEST_EVERY = 10  # about one entry in 10 is held out
MAX_TEXT_BYTES = 256 << 20  # a single fortune/JSON file larger than this is refused

_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_LEAF_SPECIAL = {"<PAD>": PAD, "<UNK>": UNK, "<BOS>": BOS, "<EOS>": EOS}


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters/digits (with inner apostrophes: ``don't``), and
    every other non-space character as a token of its own (punctuation carries next-word signal)."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Word <-> id. Ids 0..3 are PAD, UNK, BOS, EOS; unknown words map to UNK."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words: list[str] = list(SPECIALS)
        for w in words:
            if w not in SPECIALS:
                self.words.append(w)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be distinct")

    @classmethod
    def build(cls, token_lists: Iterable[Iterable[str]], max_size: int = DEFAULT_VOCAB) -> Vocabulary:
        """The ``max_size - 4`` most frequent tokens (ties alphabetical) after the 4 specials."""
        if not isinstance(max_size, int) or max_size < len(SPECIALS) + 1:
            raise ValueError(f"vocab_size must be an integer >= {len(SPECIALS) + 1}, got {max_size!r}")
        counts: Counter[str] = Counter()
        for toks in token_lists:
            counts.update(toks)
        for s in SPECIALS:
            counts.pop(s, None)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls(w for w, _ in ranked[: max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        get = self.index.get
        return [get(t, UNK) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] if 0 <= i < len(self.words) else SPECIALS[UNK] for i in ids]


def windows(stream: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into (x, y) windows of ``seq_len``: x = s[i:i+T], y = s[i+1:i+T+1],
    i = 0, T, 2T, ...; only full windows (the tail is dropped)."""
    n = (len(stream) - 1) // seq_len if len(stream) > seq_len else 0
    if n == 0:
        return np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64)
    s = np.asarray(stream[: n * seq_len + 1], dtype=np.int64)
    x = s[:-1].reshape(n, seq_len)
    y = s[1:].reshape(n, seq_len)
    return x, y


def mask_targets(y: np.ndarray, test: bool) -> np.ndarray:
    """Labels with the positions that do not count set to IGNORE (see the module docstring)."""
    y = y.copy()
    drop = (y == PAD) | (y == BOS)
    if test:
        drop |= (y == UNK) | (y == EOS)
    y[drop] = IGNORE
    return y


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise FormatError(f"{path}: larger than {MAX_TEXT_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def split_fortunes(text: str) -> list[str]:
    """Entries of one fortune file: the text between lines that hold only ``%`` (empty dropped)."""
    entries, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur))
    return [e for e in entries if e.strip()]


def fortune_files(folder: str) -> list[str]:
    """Category files of a fortune folder: regular files (not links, not ``.dat`` indexes)."""
    out = []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if name.startswith(".") or name.endswith((".dat", ".u8")) or os.path.islink(p) or not os.path.isfile(p):
            continue
        out.append(name)
    return out


def load_fortunes(
    folder: str | os.PathLike | None = None, seq_len: int = DEFAULT_SEQ_LEN, vocab_size: int = DEFAULT_VOCAB
):
    """The ``fortunes`` dataset (see the module docstring). ``folder``: a folder of fortune files
    (default: the Debian package's ``/usr/share/games/fortunes``)."""
    from .data import Dataset, DatasetInfo

    _check_sizes(seq_len, vocab_size)
    if folder is None:
        folder = FORTUNES_DIR
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"dataset 'fortunes' reads the Debian package 'fortunes' ({FORTUNES_DIR}), which is not "
                "installed: apt-get install fortunes, or pass data_dir (--data-dir) = a folder of "
                "fortune files (entries separated by lines holding '%')"
            )
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset 'fortunes': folder {folder!r} does not exist")
    names = fortune_files(folder)
    if not names:
        raise FileNotFoundError(f"dataset 'fortunes': folder {folder!r} holds no fortune files")
    rng = np.random.default_rng(SPLIT_SEED)
    train_tok: list[list[list[str]]] = []
    test_tok: list[list[list[str]]] = []
    for name in names:
        entries = [tokenize(e) for e in split_fortunes(_read_text(os.path.join(folder, name)))]
        entries = [e for e in entries if e]
        is_test = np.zeros(len(entries), dtype=bool)
        if len(entries) >= TEST_EVERY:
            is_test[rng.permutation(len(entries))[: len(entries) // TEST_EVERY]] = True
        train_tok.append([e for e, t in zip(entries, is_test, strict=True) if not t])
        test_tok.append([e for e, t in zip(entries, is_test, strict=True) if t])
    if not any(train_tok):
        raise ValueError(f"dataset 'fortunes': the corpus in {folder!r} is empty (no words in any entry)")
    vocab = Vocabulary.build((e for cat in train_tok for e in cat), vocab_size)

    def streams(cats):
        out = []
        for cat in cats:
            s: list[int] = []
            for e in cat:
                s.append(BOS)
                s.extend(vocab.encode(e))
                s.append(EOS)
            out.append(s)
        return out

    xs, ys, ws, names_kept = [], [], [], []
    for name, s in zip(names, streams(train_tok), strict=True):
        if not s:
            continue  # a file with no words at all contributes nothing (not a client)
        x, y = windows(s, seq_len)
        if len(x) == 0:
            raise ValueError(
                f"dataset 'fortunes': category file {name!r} has {len(s)} training tokens, no full "
                f"sequence of seq_len + 1 = {seq_len + 1}; remove the file or use a smaller seq_len"
            )
        xs.append(x)
        ys.append(mask_targets(y, test=False))
        ws.append(np.full(len(x), len(names_kept), dtype=np.int64))
        names_kept.append(name)
    tx, ty = [], []
    for s in streams(test_tok):
        x, y = windows(s, seq_len)
        tx.append(x)
        ty.append(mask_targets(y, test=True))
    ds = Dataset(
        DatasetInfo("fortunes", (seq_len,), len(vocab)),
        torch.from_numpy(np.concatenate(xs)),
        torch.from_numpy(np.concatenate(ys)),
        torch.from_numpy(np.concatenate(tx)),
        torch.from_numpy(np.concatenate(ty)),
        writers=torch.from_numpy(np.concatenate(ws)),
        writer_names=names_kept,
    )
    ds.vocab = vocab  # plain attribute: the words behind the ids (examples, docs)
    return ds


# -- LEAF Reddit ---------------------------------------------------------------------------------


def _token_seqs(obj, path: str, user: str, what: str) -> list[list[str]]:
    """LEAF nests sequences in comments: [comment [sequence [token]]]; flatten to sequences."""
    if not isinstance(obj, list):
        raise FormatError(f"{path}: user {user!r}: {what} must be a list of comments")
    out = []
    for c in obj:
        if isinstance(c, dict):  # y entries: {"target_tokens": [...], "count_tokens": ..}
            c = c.get("target_tokens")
        if not isinstance(c, list):
            raise FormatError(f"{path}: user {user!r}: {what}: a comment must be a list of sequences")
        for s in c:
            if not isinstance(s, list) or not all(isinstance(t, str) for t in s):
                raise FormatError(f"{path}: user {user!r}: {what}: a sequence must be a list of strings")
            out.append(s)
    return out


def read_reddit_split(folder: str, split: str):
    """(users, [(x sequences, y sequences)]) of one LEAF split; every sequence checked."""
    users, data = [], []
    for path in leaf_split_files(folder, split, "LEAF Reddit"):
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
        if len(raw) > MAX_TEXT_BYTES:
            raise FormatError(f"{path}: larger than {MAX_TEXT_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("users"), list):
            raise FormatError(f"{path}: expected an object with 'users', 'num_samples', 'user_data'")
        udata = doc.get("user_data")
        if not isinstance(udata, dict):
            raise FormatError(f"{path}: 'user_data' must be an object")
        for u in doc["users"]:
            rec = udata.get(u) if isinstance(u, str) else None
            if not isinstance(rec, dict) or "x" not in rec or "y" not in rec:
                raise FormatError(f"{path}: user {u!r} listed but has no user_data x/y")
            xs = _token_seqs(rec["x"], path, u, "x")
            ys = _token_seqs(rec["y"], path, u, "y")
            if len(xs) != len(ys) or any(len(a) != len(b) for a, b in zip(xs, ys, strict=True)):
                raise FormatError(f"{path}: user {u!r}: x and y sequences differ in number or length")
            users.append(u)
            data.append((xs, ys))
    return users, data


def _leaf_vocab(folder: str, train_data, vocab_size: int) -> Vocabulary:
    jp, tp = os.path.join(folder, "vocab.json"), os.path.join(folder, "vocab.txt")
    words = None
    if os.path.isfile(jp):
        try:
            words = json.loads(_read_text(jp))
        except json.JSONDecodeError as e:
            raise FormatError(f"{jp}: not valid JSON ({e})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise FormatError(f"{jp}: must be a JSON list of words")
    elif os.path.isfile(tp):
        words = [w for w in _read_text(tp).splitlines() if w]
    if words is not None:
        words = [w for w in words if w not in _LEAF_SPECIAL]
        return Vocabulary(list(dict.fromkeys(words))[: vocab_size - len(SPECIALS)])
    seqs = (s for xs, _ in train_data for s in xs)
    return Vocabulary.build(([t for t in s if t not in _LEAF_SPECIAL] for s in seqs), vocab_size)


def _leaf_ids(seqs: list[list[str]], vocab: Vocabulary, seq_len: int, path: str, user: str) -> np.ndarray:
    out = np.full((len(seqs), seq_len), PAD, dtype=np.int64)
    for i, s in enumerate(seqs):
        if len(s) != seq_len:
            raise FormatError(f"{path}: user {user!r}: a sequence has {len(s)} tokens, expected {seq_len}")
        out[i] = [_LEAF_SPECIAL[t] if t in _LEAF_SPECIAL else vocab.index.get(t, UNK) for t in s]
    return out


def load_reddit_leaf(folder: str, seq_len: int = DEFAULT_SEQ_LEN, vocab_size: int = DEFAULT_VOCAB):
    """LEAF Reddit (see the module docstring); ``writers`` = user, for the natural partition."""
    from .data import Dataset, DatasetInfo

    _check_sizes(seq_len, vocab_size)
    tr_users, tr_data = read_reddit_split(folder, "train")
    _, te_data = read_reddit_split(folder, "test")
    if not any(xs for xs, _ in tr_data):
        raise ValueError(f"dataset 'reddit': the training split in {folder!r} is empty (no sequences)")
    vocab = _leaf_vocab(folder, tr_data, vocab_size)
    names = sorted(set(tr_users))
    index = {u: i for i, u in enumerate(names)}
    xs, ys, ws = [], [], []
    for u, (sx, sy) in zip(tr_users, tr_data, strict=True):
        if not sx:
            raise ValueError(f"dataset 'reddit': user {u!r} has no full sequence in the training split")
        xs.append(_leaf_ids(sx, vocab, seq_len, folder, u))
        ys.append(mask_targets(_leaf_ids(sy, vocab, seq_len, folder, u), test=False))
        ws.append(np.full(len(sx), index[u], dtype=np.int64))
    tx = [_leaf_ids(sx, vocab, seq_len, folder, "test") for sx, _ in te_data]
    ty = [mask_targets(_leaf_ids(sy, vocab, seq_len, folder, "test"), test=True) for _, sy in te_data]
    empty = np.zeros((0, seq_len), np.int64)
    ds = Dataset(
        DatasetInfo("reddit", (seq_len,), len(vocab)),
        torch.from_numpy(np.concatenate(xs)),
        torch.from_numpy(np.concatenate(ys)),
        torch.from_numpy(np.concatenate(tx or [empty])),
        torch.from_numpy(np.concatenate(ty or [empty])),
        writers=torch.from_numpy(np.concatenate(ws)),
        writer_names=names,
    )
    ds.vocab = vocab
    return ds


def write_reddit_json(path: str, users: dict[str, list[list[str]]], seq_len: int = DEFAULT_SEQ_LEN) -> None:
    """Write ``{user: [comment token lists]}`` as one LEAF Reddit JSON file, sequences built as LEAF
    does (x = <BOS> + tokens, y = tokens + <EOS>, cut and padded to ``seq_len``); tests, exports."""
    doc = {"users": list(users), "num_samples": [], "user_data": {}}
    for u, comments in users.items():
        cx, cy = [], []
        for toks in comments:
            x, y = ["<BOS>"] + list(toks), list(toks) + ["<EOS>"]
            sx, sy = [], []
            for i in range(0, len(x), seq_len):
                pad = ["<PAD>"] * (seq_len - len(x[i : i + seq_len]))
                sx.append(x[i : i + seq_len] + pad)
                sy.append(y[i : i + seq_len] + pad)
            cx.append(sx)
            cy.append({"target_tokens": sy, "count_tokens": len(toks)})
        doc["num_samples"].append(len(comments))
        doc["user_data"][u] = {"x": cx, "y": cy}
    with open(path, "w") as f:
        json.dump(doc, f)


def _check_sizes(seq_len: int, vocab_size: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= 4096:
        raise ValueError(f"seq_len must be an integer in [1, 4096], got {seq_len!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 5 <= vocab_size <= 1 << 20:
        raise ValueError(f"vocab_size must be an integer in [5, 2^20], got {vocab_size!r}")
