"""Models of the FedAvg paper (McMahan et al. 2017), sized from the dataset.

- ``cnn``: conv 5x5 32 -> ReLU -> maxpool 2 -> conv 5x5 64 -> ReLU -> maxpool 2 -> fc 512 -> ReLU
  -> fc C. On 28x28 input we use padding 0, which gives 582,026 parameters for 10 classes (the
  count FedSynth quotes; padding 2 would give 1,663,370, the FedAvg paper's number). Inputs
  smaller than 28 (digits, 8x8) use padding 2 so the feature map does not vanish.
- ``mlp``: the paper's "2NN": flatten -> fc 200 -> ReLU -> fc 200 -> ReLU -> fc C
  (199,210 parameters on 28x28, 10 classes).

No BatchNorm and no dropout: every state entry is a float parameter, and a forward pass is a pure
function of the weights (FedSynth replays training on the server).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .data import KNOWN_SHAPES, DatasetInfo

MODELS = ("cnn", "mlp")
MODELS += ("lstm",)  # next-word prediction on token ids (text datasets)


class FedAvgCNN(nn.Module):
    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, padding: int | None = None):
        super().__init__()
        c, h, w = input_shape
        if padding is None:
            padding = 0 if min(h, w) >= 28 else 2
        self.conv1 = nn.Conv2d(c, 32, 5, padding=padding)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=padding)
        for _ in range(2):  # conv (size + 2p - 4), then pool /2
            h, w = (h + 2 * padding - 4) // 2, (w + 2 * padding - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"input_shape {tuple(input_shape)} is too small for the cnn with padding={padding}"
            )
        self.fc1 = nn.Linear(64 * h * w, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2)
        x = nn.functional.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class MLP(nn.Module):
    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, hidden: int = 200):
        super().__init__()
        d = 1
        for s in input_shape:
            d *= int(s)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.fc1(x.flatten(1)))
        x = nn.functional.relu(self.fc2(x))
        return self.fc3(x)


class NextWordLSTM(nn.Module):
    """Embedding d -> 2-layer LSTM (hidden h) -> linear over the vocabulary, at every position.

    Sizes: LEAF's baselines use a 2-layer LSTM with 256 hidden units (Shakespeare: embedding 8 for
    80 characters, sequences of 80; Reddit: sequences of 10 over a 10k-word vocabulary). We keep
    2 layers and T = 10, and default to d = 64, h = 128 so a FedAvg round on ``fortunes`` trains on
    2 CPU threads (the output layer h*V is most of the work at V = 10k; h = 256 doubles it); pass
    ``embed_dim``/``hidden`` for LEAF's 256. No dropout: FedSynth replays training on the server.

    ``forward(x)``: token ids int64 [N, T] -> logits [N, V, T] (classes on dim 1, the layout
    ``F.cross_entropy`` takes with [N, T] targets, so the driver's loss needs no change). A floating
    input [N, T, d] is taken as already embedded (FedSynth's synthetic data bypass the embedding).
    """

    def __init__(
        self, vocab_size: int, embed_dim: int = 64, hidden: int = 128, layers: int = 2, seq_len: int | None = None
    ):
        super().__init__()
        self.seq_len = seq_len  # the data's T (FedSynth checks payloads against it); None: any
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = x if x.is_floating_point() else self.embedding(x)
        out, _ = self.lstm(e)
        return self.fc(out).transpose(1, 2)


def _info(dataset_info) -> tuple[tuple[int, ...], int]:
    if isinstance(dataset_info, DatasetInfo):
        return tuple(dataset_info.input_shape), int(dataset_info.num_classes)
    if isinstance(dataset_info, str):
        if dataset_info not in KNOWN_SHAPES:
            raise ValueError(f"unknown dataset {dataset_info!r}; valid choices: {', '.join(KNOWN_SHAPES)}")
        shape, classes = KNOWN_SHAPES[dataset_info]
        return shape, classes
    if isinstance(dataset_info, Mapping):
        return tuple(dataset_info["input_shape"]), int(dataset_info["num_classes"])
    raise TypeError(
        "dataset_info must be a DatasetInfo, a dataset name or a mapping with input_shape, num_classes"
    )


def build_model(name: str, dataset_info="mnist5k") -> nn.Module:
    """Build model ``name`` (``cnn`` or ``mlp``) for ``dataset_info``.

    ``dataset_info``: a DatasetInfo (from ``load_dataset(...).info``), a dataset name
    (``"mnist5k"``, ``"mnist"``, ``"femnist"``, ``"digits"``) or ``{"input_shape", "num_classes"}``.
    Initialisation uses torch's global RNG: call ``torch.manual_seed`` first for a fixed model.
    """
    shape, classes = _info(dataset_info)
    if name == "lstm":  # text: input_shape (T,), num_classes = vocabulary size
        if len(shape) != 1 or classes < 5:
            raise ValueError(f"model 'lstm' needs a text dataset (input (T,), vocabulary >= 5), got {shape}")
        return NextWordLSTM(classes, seq_len=int(shape[0]))
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {shape}")
    if classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {classes}")
    if name == "cnn":
        return FedAvgCNN(shape, classes)
    if name == "mlp":
        return MLP(shape, classes)
    raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
