"""The fedsynth compressor: spec, payload round trip, exact server replay, bad payloads."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedcompress as fc
from fedcompress import wire
from fedcompress.api import RoundContext
from fedcompress.codecs.fedsynth import FedSynthCompressor

torch.set_num_threads(min(2, torch.get_num_threads()))


class TinyCNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(3 * 3 * 3, 12)
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _data(n=24, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[:, 0, 2, :] += y[:, None].float()  # a learnable signal
    return x, y


def _setup(spec, seed=0):
    torch.manual_seed(seed)
    model = TinyCNN()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    comp = fc.get_compressor(spec)
    return model, state, comp, RoundContext(round=2, client=3, seed=11)


SPECS = [
    "fedsynth:batches=3,batch=2,outer_steps=4,labels=fixed",
    "fedsynth:batches=3,batch=2,outer_steps=4,labels=trainable,dtype=fp16",
    "fedsynth:batches=2,batch=1,outer_steps=3,labels=trainable,init=noise",
]


@pytest.mark.parametrize("spec", SPECS)
def test_server_replay_equals_client_w_syn_exactly(spec):
    model, state, comp, ctx = _setup(spec)
    payload = comp.client_update(model, state, _data(), ctx)
    assert isinstance(payload, bytes)
    w_client = comp.last_w_syn
    # a separate server-side instance that only knows the architecture
    server = fc.get_compressor(spec)
    server.set_model(TinyCNN())
    w_server = server.replay(payload, state, ctx)
    assert set(w_server) == {k for k, _ in model.named_parameters()}
    for k in w_server:
        assert torch.equal(w_server[k], w_client[k]), k
    delta = server.server_update(payload, state, ctx)
    for k in state:
        assert torch.equal(delta[k], w_client[k] - state[k])
    # and the replay is ClientUpdate: m plain SGD steps on the decoded set (independent code)
    d = server.decompress(payload, ctx)
    ref = TinyCNN()
    ref.load_state_dict(state)
    opt = torch.optim.SGD(ref.parameters(), lr=float(d["inner_lr"]))
    for j in range(d["x"].shape[0]):
        opt.zero_grad()
        (-(d["y"][j] * torch.log_softmax(ref(d["x"][j]), -1)).sum(-1).mean()).backward()
        opt.step()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(w_client[k], v.detach(), rtol=1e-5, atol=1e-6)


def test_learning_lowers_real_loss_and_payload_size():
    model, state, comp, ctx = _setup(
        "fedsynth:batches=4,batch=2,outer_steps=25,labels=trainable,lr_x=0.05,lr_y=0.05"
    )
    x, y = _data()
    payload = comp.client_update(model, state, (x, y), ctx)
    # the initial set's loss (outer_steps=0 is not allowed, so: the same init, unrolled)
    init_x, init_y = comp._init(x, y, 4, 4, 2, ctx)
    params = {k: state[k] for k, _ in model.named_parameters()}
    w0 = fc.synth.unroll(model, params, init_x, init_y, comp.params["inner_lr"])
    assert comp.last_real_loss < fc.synth.real_loss(model, w0, x, y) - 0.05
    # every byte counted: x (fp32) + y (fp32) + framing
    assert len(payload) >= 4 * 2 * 64 * 4 + 4 * 2 * 4 * 4
    assert len(payload) <= 4 * 2 * 64 * 4 + 4 * 2 * 4 * 4 + 200


@pytest.mark.parametrize(
    "labels,dtype", [("fixed", "fp32"), ("fixed", "fp16"), ("trainable", "fp32"), ("trainable", "fp16")]
)
def test_compress_decompress_roundtrip(labels, dtype):
    comp = fc.get_compressor(f"fedsynth:batches=2,batch=3,labels={labels},dtype={dtype},inner_lr=0.125")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 1, 5, 5, generator=g)
    y = (
        F.one_hot(torch.randint(0, 7, (2, 3), generator=g), 7).float()
        if labels == "fixed"
        else torch.randn(2, 3, 7, generator=g)
    )
    d = comp.decompress(comp.compress({"x": x, "y": y}, RoundContext()), RoundContext())
    tdt = torch.float16 if dtype == "fp16" else torch.float32
    assert torch.equal(d["x"], x.to(tdt).float())
    assert torch.equal(d["y"], y if labels == "fixed" else y.to(tdt).float())
    assert float(d["inner_lr"]) == 0.125


def test_spec_validation():
    for bad in (
        "fedsynth:batches=0",
        "fedsynth:batch=-1",
        "fedsynth:labels=soft",
        "fedsynth:dtype=int8",
        "fedsynth:lr_x=0",
        "fedsynth:inner_lr=nan",
        "fedsynth:init=zeros",
        "fedsynth:outer_steps=1.5",
        "fedsynth:colour=red",
    ):
        name = bad.split(":")[1].split("=")[0]
        with pytest.raises(ValueError, match=name):
            fc.get_compressor(bad)
    c = fc.get_compressor("fedsynth:batches=10,batch=5,labels=trainable")
    assert (
        isinstance(c, FedSynthCompressor) and c.params["batches"] == 10 and c.params["labels"] == "trainable"
    )


def test_replay_without_model_says_what_to_do():
    comp = fc.get_compressor("fedsynth:batches=1,batch=1")
    blob = comp.compress({"x": torch.zeros(1, 1, 1, 8, 8), "y": torch.ones(1, 1, 4)}, RoundContext())
    with pytest.raises(ValueError, match="set_model"):
        comp.server_update(blob, {}, RoundContext())


# ---------------------------------------------------------------------------------------------
# Bad payloads: FormatError, never a crash


def _server(spec="fedsynth:batches=2,batch=2,labels=trainable"):
    torch.manual_seed(0)
    model = TinyCNN()
    comp = fc.get_compressor(spec)
    comp.set_model(model)
    return comp, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _blob(comp, x, y, C=None):
    return comp.compress({"x": x, "y": y}, RoundContext())


def test_bad_payloads():
    comp, state = _server()
    ctx = RoundContext()
    good = _blob(comp, torch.randn(2, 2, 1, 8, 8), torch.rand(2, 2, 4))
    comp.server_update(good, state, ctx)  # fine
    x_nan = torch.randn(2, 2, 1, 8, 8)
    x_nan[1, 0, 0, 3, 3] = math.nan
    y_inf = torch.rand(2, 2, 4)
    y_inf[0, 1, 2] = math.inf
    cases = {
        "non-finite x": _blob(comp, x_nan, torch.rand(2, 2, 4)),
        "non-finite y": _blob(comp, torch.randn(2, 2, 1, 8, 8), y_inf),
        "wrong input shape for the model": _blob(comp, torch.randn(2, 2, 3, 8, 8), torch.rand(2, 2, 4)),
        "wrong class count for the model": _blob(comp, torch.randn(2, 2, 1, 8, 8), torch.rand(2, 2, 5)),
        "more batches than declared": _blob(comp, torch.randn(5, 2, 1, 8, 8), torch.rand(5, 2, 4)),
        "bigger batches than declared": _blob(comp, torch.randn(2, 3, 1, 8, 8), torch.rand(2, 3, 4)),
        "truncated": good[:-9],
        "flipped byte": good[:40] + bytes([good[40] ^ 0xFF]) + good[41:],
        "empty": b"",
        "other codec": fc.get_compressor("none").compress({"a": torch.zeros(3)}, ctx),
        "fixed-label payload to a trainable server": fc.get_compressor("fedsynth:batches=2,batch=2").compress(
            {"x": torch.randn(2, 2, 1, 8, 8), "y": F.one_hot(torch.zeros(2, 2, dtype=torch.long), 4).float()},
            ctx,
        ),
        "fp16 payload to an fp32 server": fc.get_compressor(
            "fedsynth:batches=2,batch=2,labels=trainable,dtype=fp16"
        ).compress({"x": torch.randn(2, 2, 1, 8, 8), "y": torch.rand(2, 2, 4)}, ctx),
    }
    for what, blob in cases.items():
        with pytest.raises(fc.FormatError):
            comp.server_update(blob, state, ctx)
            pytest.fail(what)


def test_hostile_headers():
    """Well-framed (valid CRC) payloads whose records lie: sizes, dtypes, labels out of range."""
    comp, state = _server("fedsynth:batches=1,batch=2")
    ctx = RoundContext()

    def frame(x_rec, y_rec, C=4, lr=0.05, mode=0):
        w = wire.Writer()
        w.u8(1), w.u8(mode), w.u32(C), w.f64(lr)
        return wire.pack(wire.CODEC_FEDSYNTH, [x_rec, y_rec], w.getvalue())

    x = torch.randn(1, 2, 1, 8, 8)
    xr = wire.lossless_record("x", x)
    yr = wire.lossless_record("y", torch.tensor([[1, 3]], dtype=torch.uint8))
    comp.server_update(frame(xr, yr), state, ctx)  # the honest one works
    hostile = [
        frame(xr, wire.lossless_record("y", torch.tensor([[1, 4]], dtype=torch.uint8))),  # class 4 of 4
        frame(xr, yr, C=0),
        frame(xr, yr, C=2**31),
        frame(xr, yr, lr=math.nan),
        frame(xr, yr, lr=-1.0),
        frame(xr, yr, mode=7),
        frame(wire.Record("x", torch.float32, (1, 2, 1, 8, 8), b"\0" * 12), yr),  # data shorter than shape
        frame(wire.Record("x", torch.float32, (1, 2, 1, 2**40, 2**20), b""), yr),  # absurd shape
        frame(wire.lossless_record("x", x.double()), yr),  # dtype
        frame(wire.lossless_record("x", x[0]), yr),  # missing batch axis
        frame(yr, xr),  # records swapped
        frame(xr, wire.lossless_record("y", torch.tensor([[1, 3]], dtype=torch.int32))),
    ]
    for blob in hostile:
        with pytest.raises(fc.FormatError):
            comp.server_update(blob, state, ctx)
    garbage = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 64, 300):
        blob = torch.randint(0, 256, (n,), generator=garbage, dtype=torch.uint8).numpy().tobytes()
        with pytest.raises(fc.FormatError):
            comp.decompress(blob, ctx)


def test_driver_runs_fedsynth():
    """One short FedAvg run with fedsynth through the driver (if the driver is there)."""
    driver = pytest.importorskip("fedcompress.fedavg.driver")
    cfg = driver.ExperimentConfig(
        dataset="digits",
        clients=4,
        rounds=1,
        clients_per_round=2,
        model="mlp",
        compressor="fedsynth:batches=2,batch=2,outer_steps=2,labels=trainable",
    )
    s = driver.run_experiment(cfg)
    assert s["rounds"] == 1 and math.isfinite(s["final_accuracy"])
    assert s["compression_ratio"] > 1
