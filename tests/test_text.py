"""Text data (fortunes, LEAF reddit), the lstm model and top-1 over real tokens, on fixtures."""

import json
import os

import numpy as np
import pytest
import torch

from fedcompress.fedavg import ExperimentConfig, build_model, evaluate, load_dataset, run_experiment, text
from fedcompress.fedavg.text import BOS, EOS, IGNORE, PAD, UNK


def write_fortunes(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, entries in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n%\n".join(entries) + "\n%\n")


@pytest.fixture
def fortunes_dir(tmp_path):
    d = tmp_path / "fortunes"
    # "big": 20 entries (2 go to test); "small": 2 entries (all train)
    big = [f"the cat sat on mat number {i} ." for i in range(20)]
    small = ["a dog barks", "the dog runs, the cat sleeps"]
    write_fortunes(d, {"big": big, "small": small})
    # not category files: the .dat index and the .u8 link of the Debian layout
    (d / "big.dat").write_bytes(b"\x00\x01")
    os.symlink(d / "big", d / "big.u8")
    return str(d)


def test_tokenize():
    assert text.tokenize("Don't PANIC!  It's 42, ok?") == ["don't", "panic", "!", "it's", "42", ",", "ok", "?"]
    assert text.tokenize("") == []


def test_vocabulary_frequency_cap_and_ties():
    v = text.Vocabulary.build([["b", "a", "c", "b"], ["a", "d", "b"]], max_size=6)
    # counts b3 a2 c1 d1: ties alphabetical, capped at 6 entries including the 4 specials
    assert v.words == ["<pad>", "<unk>", "<bos>", "<eos>", "b", "a"]
    assert v.encode(["a", "zzz", "b"]) == [5, UNK, 4]
    assert v.decode([4, 99]) == ["b", "<unk>"]
    with pytest.raises(ValueError, match="vocab_size"):
        text.Vocabulary.build([["a"]], max_size=2)


def test_windows_full_only():
    x, y = text.windows([10, 11, 12, 13, 14, 15, 16, 17], 3)
    assert x.tolist() == [[10, 11, 12], [13, 14, 15]]
    assert y.tolist() == [[11, 12, 13], [14, 15, 16]]
    x, y = text.windows([1, 2, 3], 3)  # 3 tokens: no window of 4
    assert x.shape == (0, 3)


def test_split_fortunes():
    assert text.split_fortunes("one\n%\n\n%\ntwo\nlines\n%\n") == ["one", "two\nlines"]


def test_fortunes_fixture(fortunes_dir):
    ds = text.load_fortunes(fortunes_dir, seq_len=4, vocab_size=50)
    assert ds.writer_names == ["big", "small"]  # .dat and .u8 skipped
    assert ds.info.input_shape == (4,) and ds.info.num_classes == len(ds.vocab)
    v = ds.vocab
    # the small file's stream, by hand: BOS a dog barks EOS BOS the dog runs , the cat sleeps EOS
    small = ds.x_train[ds.writers == 1]
    words = ["a", "dog", "barks"]
    stream = [BOS] + v.encode(words) + [EOS, BOS] + v.encode("the dog runs , the cat sleeps".split()) + [EOS]
    n = (len(stream) - 1) // 4
    assert small.tolist() == [stream[4 * i : 4 * i + 4] for i in range(n)]
    y_small = ds.y_train[ds.writers == 1]
    want = np.array([stream[4 * i + 1 : 4 * i + 5] for i in range(n)])
    want[want == BOS] = IGNORE  # BOS is never a training target
    assert y_small.tolist() == want.tolist()
    # 20 "big" entries: 2 held out, 18 in train -> 18 * 10 tokens (BOS + 8 words + EOS)
    assert int((ds.writers == 0).sum()) == (18 * 10 - 1) // 4
    assert ds.x_test.shape == ((2 * 10 - 1) // 4, 4)
    yt = ds.y_test
    assert not bool(((yt == EOS) | (yt == UNK) | (yt == BOS) | (yt == PAD)).any())
    assert bool((yt == IGNORE).any())  # the EOS targets
    again = text.load_fortunes(fortunes_dir, seq_len=4, vocab_size=50)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_fortunes_unknown_words_in_test(tmp_path):
    d = tmp_path / "f"
    entries = [f"w{i} common" for i in range(10)]  # one is held out: its w{i} is unknown
    write_fortunes(d, {"c": entries})
    ds = text.load_fortunes(str(d), seq_len=2, vocab_size=100)
    assert int((ds.x_test == UNK).sum()) == 1
    assert int((ds.y_test == UNK).sum()) == 0  # an unknown word is no target in the test metric


def test_fortunes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text.load_fortunes(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no fortune files"):
        text.load_fortunes(str(tmp_path / "empty"))
    write_fortunes(tmp_path / "blank", {"a": ["  ", "\n"]})
    with pytest.raises(ValueError, match="empty"):
        text.load_fortunes(str(tmp_path / "blank"))
    write_fortunes(tmp_path / "short", {"long": ["one two three four five six"], "tiny": ["hi"]})
    with pytest.raises(ValueError, match="'tiny' has 3 training tokens, no full sequence"):
        text.load_fortunes(str(tmp_path / "short"), seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        text.load_fortunes(str(tmp_path / "short"), seq_len=0)


def test_fortunes_partitions(fortunes_dir):
    nat = load_dataset("fortunes", clients=2, partition="natural", data_dir=fortunes_dir)
    assert [int(nat.writers[p].unique().numel()) for p in nat.partitions] == [1, 1]
    iid = load_dataset("fortunes", clients=3, partition="iid", data_dir=fortunes_dir)
    assert sorted(torch.cat(iid.partitions).tolist()) == list(range(iid.x_train.shape[0]))
    with pytest.raises(ValueError, match="dirichlet"):
        load_dataset("fortunes", clients=2, partition="dirichlet", data_dir=fortunes_dir)
    with pytest.raises(ValueError, match="only 2 writers"):
        load_dataset("fortunes", clients=3, partition="natural", data_dir=fortunes_dir)


@pytest.mark.skipif(not os.path.isdir(text.FORTUNES_DIR), reason="Debian package 'fortunes' not installed")
def test_fortunes_package():
    ds = text.load_fortunes()
    files = text.fortune_files(text.FORTUNES_DIR)
    assert ds.writer_names == files  # every category file is a client
    assert ds.info.num_classes == text.DEFAULT_VOCAB and ds.info.input_shape == (10,)
    assert ds.x_train.shape[0] > 10_000 and ds.x_test.shape[0] > 1_000
    assert int(ds.x_train.max()) < text.DEFAULT_VOCAB


# -- LEAF reddit ---------------------------------------------------------------------------------

# Two users written by hand in LEAF's layout (nothing from write_reddit_json), sequences of 4.
_U1_X = [[["<BOS>", "i", "like", "cats"], ["cats", "a", "lot", "<PAD>"]]]
_U1_Y = [{"target_tokens": [["i", "like", "cats", "cats"], ["a", "lot", "<EOS>", "<PAD>"]], "count_tokens": 6}]
_U2_X = [[["<BOS>", "dogs", "like", "me"]]]
_U2_Y = [{"target_tokens": [["dogs", "like", "me", "<EOS>"]], "count_tokens": 3}]


def _leaf(folder, split, users):
    os.makedirs(folder / split, exist_ok=True)
    doc = {"users": list(users), "num_samples": [1] * len(users), "user_data": users}
    (folder / split / "data.json").write_text(json.dumps(doc))


def test_reddit_leaf_reader(tmp_path):
    _leaf(tmp_path, "train", {"u1": {"x": _U1_X, "y": _U1_Y}, "u2": {"x": _U2_X, "y": _U2_Y}})
    test_u1 = {"x": [[["<BOS>", "i", "like", "birds"]]], "y": [{"target_tokens": [["i", "like", "birds", "<EOS>"]]}]}
    _leaf(tmp_path, "test", {"u1": test_u1})
    ds = text.load_reddit_leaf(str(tmp_path), seq_len=4, vocab_size=100)
    # vocabulary from train: cats 3, like 3, ... ties alphabetical
    assert ds.vocab.words[4:] == ["cats", "like", "a", "dogs", "i", "lot", "me"]
    w = ds.vocab.index
    assert ds.x_train.tolist() == [
        [BOS, w["i"], w["like"], w["cats"]],
        [w["cats"], w["a"], w["lot"], PAD],
        [BOS, w["dogs"], w["like"], w["me"]],
    ]
    assert ds.y_train.tolist()[1] == [w["a"], w["lot"], EOS, IGNORE]
    assert ds.writers.tolist() == [0, 0, 1] and ds.writer_names == ["u1", "u2"]
    # test: "birds" is unknown -> not counted, EOS not counted
    assert ds.y_test.tolist() == [[w["i"], w["like"], IGNORE, IGNORE]]
    # a plain-text vocabulary in the folder wins over the one built from train
    (tmp_path / "vocab.txt").write_text("me\nbirds\n<PAD>\n")
    ds2 = text.load_reddit_leaf(str(tmp_path), seq_len=4)
    assert ds2.vocab.words == ["<pad>", "<unk>", "<bos>", "<eos>", "me", "birds"]
    assert ds2.y_test.tolist() == [[IGNORE, IGNORE, 5, IGNORE]]


def test_reddit_writer_round_trip(tmp_path):
    from fedcompress import FormatError

    os.makedirs(tmp_path / "train")
    os.makedirs(tmp_path / "test")
    text.write_reddit_json(str(tmp_path / "train" / "a.json"), {"u": [["x", "y", "z", "w", "v"]]}, seq_len=4)
    text.write_reddit_json(str(tmp_path / "test" / "a.json"), {"u": [["x"]]}, seq_len=4)
    ds = text.load_reddit_leaf(str(tmp_path), seq_len=4)
    w = ds.vocab.index
    assert ds.x_train.tolist() == [[BOS, w["x"], w["y"], w["z"]], [w["w"], w["v"], PAD, PAD]]
    assert ds.y_train.tolist() == [[w["x"], w["y"], w["z"], w["w"]], [w["v"], EOS, IGNORE, IGNORE]]
    with pytest.raises(FormatError, match="expected 10"):  # the default T=10 does not fit
        load_dataset("reddit", clients=1, partition="natural", data_dir=str(tmp_path))


def test_reddit_errors(tmp_path):
    from fedcompress import FormatError

    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_dataset("reddit", clients=1)
    with pytest.raises(FileNotFoundError, match="train/\\*.json"):
        text.load_reddit_leaf(str(tmp_path))
    _leaf(tmp_path, "test", {})
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        text.load_reddit_leaf(str(tmp_path))
    _leaf(tmp_path, "train", {"u": {"x": [[["a", "b"]]], "y": [{"target_tokens": [["b"]]}]}})
    (tmp_path / "train" / "a.json").unlink()
    with pytest.raises(FormatError, match="differ"):
        text.load_reddit_leaf(str(tmp_path), seq_len=2)
    _leaf(tmp_path, "train", {"u": {"x": [], "y": []}})
    with pytest.raises(ValueError, match="empty"):
        text.load_reddit_leaf(str(tmp_path), seq_len=2)
    one = {"x": [[["a", "b"]]], "y": [{"target_tokens": [["b", "c"]]}]}
    _leaf(tmp_path, "train", {"u": one, "v": {"x": [], "y": []}})
    with pytest.raises(ValueError, match="'v' has no full sequence"):
        text.load_reddit_leaf(str(tmp_path), seq_len=2)
    _leaf(tmp_path, "train", {"u": {"x": [[["a", "b", "c"]]], "y": [{"target_tokens": [["b", "c", "d"]]}]}})
    with pytest.raises(FormatError, match="expected 2"):
        text.load_reddit_leaf(str(tmp_path), seq_len=2)


# -- model and metric ----------------------------------------------------------------------------


def test_lstm_model_shapes_and_embedding_bypass():
    torch.manual_seed(0)
    m = build_model("lstm", {"input_shape": (6,), "num_classes": 50})
    d, h, V = 64, 128, 50
    lstm = 4 * h * (d + h) + 8 * h + 4 * h * (h + h) + 8 * h
    assert sum(p.numel() for p in m.parameters()) == V * d + lstm + h * V + V
    x = torch.randint(0, V, (3, 6))
    out = m(x)
    assert out.shape == (3, V, 6)
    assert torch.equal(m(m.embedding(x)), out)  # float input = already embedded
    with pytest.raises(ValueError, match="text dataset"):
        build_model("lstm", "mnist5k")


def test_evaluate_counts_only_real_tokens():
    class Fixed(torch.nn.Module):  # predicts token t+1 at position t of every sequence
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.arange(1, 4).expand(x.shape[0], 3), 5).float().transpose(1, 2) * 9

    y = torch.tensor([[1, 2, IGNORE], [1, 0, 3]])  # 5 counted positions, 4 right
    acc, loss = evaluate(Fixed(), torch.zeros(2, 3, dtype=torch.int64), y, batch_size=1)
    assert acc == pytest.approx(4 / 5)
    logits = Fixed()(torch.zeros(2, 3)).transpose(1, 2).reshape(-1, 5)
    flat = y.reshape(-1)
    keep = flat != IGNORE
    want = torch.nn.functional.cross_entropy(logits[keep], flat[keep])
    assert loss == pytest.approx(float(want))


def test_run_fortunes_lstm_end_to_end(fortunes_dir, tmp_path):
    cfg = ExperimentConfig(
        dataset="fortunes", model="lstm", clients=2, partition="natural", rounds=2, compressor="none",
        data_dir=fortunes_dir, lr=1.0, epochs=1, batch_size=8,
    )
    s = run_experiment(cfg, out_dir=str(tmp_path / "out"))
    assert s["rounds"] == 2 and s["compression_ratio"] == 1.0
    assert 0.0 <= s["final_accuracy"] <= 1.0 and s["final_loss"] < s["initial_loss"]
    assert os.path.isfile(tmp_path / "out" / "summary.json")


def test_fortunes_package_absent_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(text, "FORTUNES_DIR", str(tmp_path / "not-installed"))
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes.*--data-dir"):
        load_dataset("fortunes", clients=2)
