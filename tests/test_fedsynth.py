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
    # local SGD of 6 steps at lr 0.05 on the 24 images of _data(): the guard's reference update
    return model, state, comp, RoundContext(round=2, client=3, seed=11, batch_size=4)


SPECS = [
    "fedsynth:batches=3,batch=2,outer_steps=4,labels=fixed",
    "fedsynth:batches=3,batch=2,outer_steps=4,labels=fixed,dtype=fp32",
    "fedsynth:batches=3,batch=2,outer_steps=4,labels=trainable,dtype=fp16",
    "fedsynth:batches=3,batch=2,outer_steps=4,labels=trainable,label_scale=true,dtype=fp32",
    "fedsynth:batches=2,batch=1,outer_steps=3,labels=trainable,init=noise",
    "fedsynth:batches=2,batch=2,outer_steps=3,labels=raw",
    "fedsynth:ratio=2,outer_steps=3,labels=trainable",
    "fedsynth:batches=3,batch=2,outer_steps=4,res=2",
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
    r = server.params["res"]  # res=r: the sent images are upsampled (nearest) to the model's input
    for j in range(d["x"].shape[0]):
        opt.zero_grad()
        xj = F.interpolate(d["x"][j], scale_factor=r, mode="nearest") if r > 1 else d["x"][j]
        (-(d["y"][j] * torch.log_softmax(ref(xj), -1)).sum(-1).mean()).backward()
        opt.step()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(w_client[k], v.detach(), rtol=1e-5, atol=1e-6)


def test_learning_lowers_real_loss_and_payload_size():
    model, state, comp, ctx = _setup(
        "fedsynth:batches=4,batch=2,outer_steps=25,labels=trainable,lr_x=0.05,lr_y=0.05,objective=loss,lr_search=0"
    )  # the outer loop at one inner_lr (lr_search would pick the init's step by its own measure)
    x, y = _data()
    payload = comp.client_update(model, state, (x, y), ctx)
    # the initial set's loss: the same init, unrolled
    init_x, init_y = comp._init(x, y, 4, 4, 2, ctx)
    params = {k: state[k] for k, _ in model.named_parameters()}
    w0 = fc.synth.unroll(model, params, init_x, init_y, comp.params["inner_lr"])
    assert comp.last_fallback == ""  # the lowest-loss set passed the guard
    assert comp.last_real_loss < fc.synth.real_loss(model, w0, x, y) - 0.05
    # every byte counted: x (fp16, the default) + softmax labels (fp16) + framing
    assert len(payload) >= 4 * 2 * 64 * 2 + 4 * 2 * 4 * 2
    assert len(payload) <= 4 * 2 * 64 * 2 + 4 * 2 * 4 * 2 + 200


def test_outer_steps_zero_sends_the_real_subset_unoptimised():
    """The results' "real subset" control: the payload holds the client's own samples, as drawn."""
    model, state, comp, ctx = _setup("fedsynth:batches=4,batch=2,outer_steps=0,dtype=fp32")
    x, y = _data()
    payload = comp.client_update(model, state, (x, y), ctx)
    init_x, init_y = comp._init(x, y, 4, 4, 2, ctx)
    d = comp.decompress(payload, ctx)
    assert torch.equal(d["x"].float(), init_x)
    assert torch.equal(d["y"].float(), init_y)
    # every sent image is one of the client's images
    assert all(any(torch.equal(s, r) for r in x) for s in d["x"].reshape(-1, *x.shape[1:]))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("labels", ["fixed", "trainable", "trainable,label_scale=true", "raw"])
def test_compress_decompress_roundtrip(labels, dtype):
    comp = fc.get_compressor(f"fedsynth:batches=2,batch=3,labels={labels},dtype={dtype},inner_lr=0.125")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 1, 5, 5, generator=g)
    v = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 3
    y = {
        "fixed": F.one_hot(torch.randint(0, 7, (2, 3), generator=g), 7).float(),
        "trainable": torch.softmax(v, -1).float(),
        "trainable,label_scale=true": (torch.softmax(v, -1) * torch.rand(2, 3, 1, generator=g) * 2).float(),
        "raw": torch.randn(2, 3, 7, generator=g),
    }[labels]
    ref = torch.tensor(0.75, dtype=torch.float64)
    d = comp.decompress(comp.compress({"x": x, "y": y, "ref_norm": ref}, RoundContext()), RoundContext())
    tdt = torch.float16 if dtype == "fp16" else torch.float32
    assert torch.equal(d["x"], x.to(tdt).float())
    assert torch.equal(d["y"], y if labels == "fixed" else y.to(tdt).float())
    assert float(d["inner_lr"]) == 0.125 and float(d["ref_norm"]) == 0.75


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
        "fedsynth:outer_steps=-1",
        "fedsynth:outer_steps=0,init=noise",
        "fedsynth:colour=red",
        "fedsynth:ratio=1",
        "fedsynth:ratio=0.5",
        "fedsynth:ratio=inf",
        "fedsynth:ratio=nan",
        "fedsynth:guard=0.5",
        "fedsynth:label_scale=maybe",
        "fedsynth:labels=fixed,label_scale=true",
        "fedsynth:objective=mse",
        "fedsynth:server_scale=0",
        "fedsynth:real_batch=-1",
    ):
        name = bad.split(":")[1].split(",")[-1].split("=")[0]
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
    with pytest.raises(ValueError, match="set_model"):
        comp.replay(blob, {}, RoundContext())


def test_compress_of_a_model_update_says_what_to_call():
    """fedsynth learns its payload from data: compress(state_dict) names client_update/server_update."""
    comp = fc.get_compressor("fedsynth")
    update = {k: torch.zeros_like(v) for k, v in TinyCNN().state_dict().items()}
    with pytest.raises(ValueError, match="client_update.*server_update") as e:
        comp.compress(update, RoundContext())
    assert not isinstance(e.value, KeyError)


# ---------------------------------------------------------------------------------------------
# Bad payloads: FormatError, never a crash


def _server(spec="fedsynth:batches=2,batch=2,labels=trainable,dtype=fp32"):
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
    def sm(*shape):  # valid softmax labels
        return torch.softmax(torch.randn(*shape), -1)

    good = _blob(comp, torch.randn(2, 2, 1, 8, 8), sm(2, 2, 4))
    comp.server_update(good, state, ctx)  # fine
    x_nan = torch.randn(2, 2, 1, 8, 8)
    x_nan[1, 0, 0, 3, 3] = math.nan
    y_inf = sm(2, 2, 4)
    y_inf[0, 1, 2] = math.inf
    y_neg = sm(2, 2, 4)
    y_neg[1, 1] = torch.tensor([1.2, -0.2, 0.0, 0.0])  # sums to 1, one entry below zero
    y_sum = sm(2, 2, 4)
    y_sum[0, 0] *= 1.01  # a row summing to 1.01
    cases = {
        "non-finite x": _blob(comp, x_nan, sm(2, 2, 4)),
        "non-finite y": _blob(comp, torch.randn(2, 2, 1, 8, 8), y_inf),
        "negative softmax label": _blob(comp, torch.randn(2, 2, 1, 8, 8), y_neg),
        "softmax row not summing to 1": _blob(comp, torch.randn(2, 2, 1, 8, 8), y_sum),
        "wrong input shape for the model": _blob(comp, torch.randn(2, 2, 3, 8, 8), sm(2, 2, 4)),
        "wrong class count for the model": _blob(comp, torch.randn(2, 2, 1, 8, 8), sm(2, 2, 5)),
        "more batches than declared": _blob(comp, torch.randn(5, 2, 1, 8, 8), sm(5, 2, 4)),
        "bigger batches than declared": _blob(comp, torch.randn(2, 3, 1, 8, 8), sm(2, 3, 4)),
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
        ).compress({"x": torch.randn(2, 2, 1, 8, 8), "y": sm(2, 2, 4)}, ctx),
        "raw-label payload to a softmax server": fc.get_compressor(
            "fedsynth:batches=2,batch=2,labels=raw,dtype=fp32"
        ).compress({"x": torch.randn(2, 2, 1, 8, 8), "y": sm(2, 2, 4)}, ctx),
    }
    for what, blob in cases.items():
        with pytest.raises(fc.FormatError):
            comp.server_update(blob, state, ctx)
            pytest.fail(what)


def test_hostile_headers():
    """Well-framed (valid CRC) payloads whose records lie: sizes, dtypes, labels out of range."""
    comp, state = _server("fedsynth:batches=1,batch=2,dtype=fp32")
    ctx = RoundContext()

    def frame(x_rec, y_rec, C=4, lr=0.05, mode=0, steps=None, ref=0.0, fmt=2):
        w = wire.Writer()
        w.u8(fmt), w.u8(mode), w.u32(C)
        steps = [lr] if steps is None else steps
        w.u16(len(steps))
        for s in steps:
            w.f64(s)
        w.f32(ref)
        return wire.pack(wire.CODEC_FEDSYNTH, [x_rec, y_rec], w.getvalue())

    def frame_count_lies(x_rec, y_rec, count, nvalues):  # declares `count` step sizes, holds `nvalues`
        w = wire.Writer()
        w.u8(2), w.u8(0), w.u32(4), w.u16(count)
        for _ in range(nvalues):
            w.f64(0.05)
        w.f32(0.0)
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
        frame(xr, yr, lr=math.inf),
        frame(xr, yr, lr=-1.0),
        frame(xr, yr, lr=0.0),
        frame(xr, yr, steps=[]),  # no step size
        frame(xr, yr, steps=[0.05, 0.05]),  # more step sizes than this version replays
        frame_count_lies(xr, yr, 1, 0),  # declares 1, holds none
        frame_count_lies(xr, yr, 1, 2),  # declares 1, holds 2
        frame_count_lies(xr, yr, 65535, 1),  # declares 65535, holds 1
        frame(xr, yr, ref=math.nan),  # the declared SGD update norm
        frame(xr, yr, ref=-1.0),
        frame(xr, yr, ref=math.inf),
        frame(xr, yr, fmt=1),  # the old format (no step-size count)
        frame(xr, yr, mode=7),
        frame(xr, yr, mode=1),  # softmax labels to a fixed-label server
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


# ---------------------------------------------------------------------------------------------
# ratio=R: the shape rule and the byte budget


def _fedavg_model(name, shape):
    models = pytest.importorskip("fedcompress.fedavg.models")
    torch.manual_seed(0)
    return models.FedAvgCNN(shape, 10) if name == "cnn" else models.MLP(shape, 10)


@pytest.mark.parametrize("labels", ["fixed", "trainable"])
@pytest.mark.parametrize(
    "model_name,shape", [("cnn", (1, 28, 28)), ("mlp", (1, 28, 28)), ("cnn", (1, 8, 8)), ("mlp", (1, 8, 8))]
)
def test_shape_rule_respects_the_budget_to_the_byte(model_name, shape, labels):
    from fedcompress.codecs.fedsynth import payload_bytes, shape_for_budget
    from fedcompress.fedavg.driver import dense_payload_bytes

    state = _fedavg_model(model_name, shape).state_dict()
    dense = dense_payload_bytes(state)
    for ratio in (2.0, 8.0, 16.0, 16.5, 64.0, 200.0):
        budget = int(dense // ratio)
        one = payload_bytes(1, 1, shape, 10, labels)
        if budget < one:
            with pytest.raises(ValueError, match=r"ratio=.*smallest payload gives ratio") as e:
                shape_for_budget(budget, shape, 10, labels=labels, local_steps=40, ratio=ratio, dense=dense)
            assert f"{dense / one:.4g}" in str(e.value)
            continue
        # how many inputs fit, by bisection on real payload lengths (independent of the rule's arithmetic)
        lo, hi = 1, budget // math.prod(shape)  # an fp16 input is 2 bytes per value
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if payload_bytes(1, mid, shape, 10, labels) <= budget else (lo, mid - 1)
        k = lo
        for steps in (1, 8, 40, None):
            s = shape_for_budget(budget, shape, 10, labels=labels, local_steps=steps, local_lr=0.05)
            # an actual payload of that shape, every byte: within dense / ratio
            comp = fc.get_compressor(f"fedsynth:batches={s.batches},batch={s.batch},labels={labels}")
            y = torch.softmax(torch.randn(s.batches, s.batch, 10), -1)
            n = len(comp.compress({"x": torch.randn((s.batches, s.batch) + shape), "y": y}, RoundContext()))
            assert n == s.nbytes and n <= budget and dense / n >= ratio
            # and as full as the rule allows: one more input per batch no longer fits
            assert payload_bytes(s.batches, s.batch + 1, shape, 10, labels) > budget
            # batches: the SGD step count, unless that leaves batches under 5 inputs (or up to 20 %
            # fewer where that fills the budget better); batch: the rest
            target = max(1, min(k // 5, steps if steps is not None else k))
            window = range(max(1, (4 * target) // 5), target + 1)
            assert s.batches in window and s.batch == k // s.batches
            assert s.batches * s.batch == max(m * (k // m) for m in window)
            if steps is not None:  # m synthetic steps travel as far as the client's SGD steps,
                # with no step longer than MAX_INNER_LR (2) times the client's lr
                assert math.isclose(s.inner_lr, min(steps * 0.05 / s.batches, 2 * 0.05))


def test_shape_rule_default_and_explicit_keys():
    from fedcompress.codecs.fedsynth import shape_for_budget
    from fedcompress.fedavg.driver import dense_payload_bytes

    shape = (1, 28, 28)
    dense = dense_payload_bytes(_fedavg_model("cnn", shape).state_dict())
    # the best 16x setting (10 clients of ~400 images, 2 epochs of batch 20 -> 40 steps at
    # lr 0.05): the rule gives 18 x 5 in fp16 at inner_lr min(40 * 0.05 / 18, 2 * 0.05) = 0.1
    s = shape_for_budget(int(dense // 16), shape, 10, local_steps=40, local_lr=0.05)
    assert (s.batches, s.batch) == (18, 5) and math.isclose(s.inner_lr, 0.1)
    # with fewer local steps the distance rule is below the cap: 30 steps -> 30 * 0.05 / 18
    s = shape_for_budget(int(dense // 16), shape, 10, local_steps=30, local_lr=0.05)
    assert (s.batches, s.batch) == (18, 5) and math.isclose(s.inner_lr, 1.5 / 18)
    # 64x (the diverging case: 3 x 7 at 2.0 / 3 = 0.67): capped at 0.1
    s = shape_for_budget(int(dense // 64), shape, 10, local_steps=40, local_lr=0.05)
    assert (s.batches, s.batch) == (3, 7) and math.isclose(s.inner_lr, 0.1)
    # and `fedsynth` with no keys is that config: 18 x 5, fp16, inner_lr 0.1, fixed labels, ~16.5x
    p = fc.get_compressor("fedsynth").params
    assert (p["batches"], p["batch"], p["dtype"], p["inner_lr"], p["labels"]) == (18, 5, "fp16", 0.1, "fixed")
    # explicit keys win
    s = shape_for_budget(int(dense // 16), shape, 10, local_steps=40, batches=9)
    assert (s.batches, s.batch) == (9, 10)
    s = shape_for_budget(int(dense // 16), shape, 10, local_steps=40, batch=3, inner_lr=0.2)
    assert (s.batches, s.batch, s.inner_lr) == (30, 3, 0.2)
    with pytest.raises(ValueError, match="batches=10, batch=10"):
        shape_for_budget(int(dense // 16), shape, 10, batches=10, batch=10)


@pytest.mark.parametrize("ratio", [2.0, 3.5])
def test_client_update_with_ratio_keeps_the_budget(ratio):
    from fedcompress.fedavg.driver import dense_payload_bytes

    model, state, comp, ctx = _setup(f"fedsynth:ratio={ratio},outer_steps=2,labels=trainable")
    payload = comp.client_update(model, state, _data(), ctx)
    dense = dense_payload_bytes(state)
    assert len(payload) <= dense // ratio and dense / len(payload) >= ratio
    assert comp.last_choice["bytes"] == len(payload)
    # the server takes the per-client shape from the payload
    server = fc.get_compressor(comp.spec)
    server.set_model(TinyCNN())
    server.server_update(payload, state, ctx)
    # a ratio no synthetic input can meet: ValueError naming the largest reachable ratio
    model, state, comp, ctx = _setup("fedsynth:ratio=50,outer_steps=2")
    with pytest.raises(ValueError, match=r"ratio=50 is unreachable.*smallest payload gives ratio"):
        comp.client_update(model, state, _data(), ctx)


# ---------------------------------------------------------------------------------------------
# Trainable labels: the softmax parameterisation


@pytest.mark.parametrize("scaled", [False, True])
def test_softmax_label_gradients_match_autograd_float64(scaled):
    from fedcompress.codecs.fedsynth import MAX_LABEL_SCALE, softmax_labels, softmax_labels_grad

    g = torch.Generator().manual_seed(5)
    v = (torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True) if scaled else None
    gy = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    # autograd through an independent write-out of y = S sigmoid(t) * exp(v) / sum exp(v)
    e = torch.exp(v - v.max(-1, keepdim=True).values)
    y_ref = e / e.sum(-1, keepdim=True)
    if scaled:
        y_ref = (MAX_LABEL_SCALE / (1 + torch.exp(-t))).unsqueeze(-1) * y_ref
    torch.testing.assert_close(softmax_labels(v, t), y_ref, rtol=1e-12, atol=1e-14)
    want = torch.autograd.grad((y_ref * gy).sum(), [v] + ([t] if scaled else []))
    gv, gt = softmax_labels_grad(v.detach(), None if t is None else t.detach(), gy)
    torch.testing.assert_close(gv, want[0], rtol=1e-12, atol=1e-14)
    if scaled:
        torch.testing.assert_close(gt, want[1], rtol=1e-12, atol=1e-14)
    else:
        assert gt is None
    # the labels it produces satisfy what the decoder checks (>= 0, rows sum to 1 / at most 2)
    y = softmax_labels(v.detach() * 40, None if t is None else t.detach() * 40).float()
    assert bool((y >= 0).all())
    rows = y.double().sum(-1)
    assert bool((rows <= MAX_LABEL_SCALE + 1e-6).all()) if scaled else torch.allclose(rows, torch.ones_like(rows))


# ---------------------------------------------------------------------------------------------
# The guard against synthetic updates far larger than the client's SGD update


def _one_class_client():
    """8 images of one class: where the paper's raw trainable labels blew up (issue 14)."""
    x, y = _data(n=32)
    keep = y == 1
    return x[keep][:8], y[keep][:8]


def _update_norm(w, state):
    return math.sqrt(sum(float((w[k] - state[k]).double().pow(2).sum()) for k in w))


def test_guard_on_a_non_iid_client_that_used_to_blow_up():
    from fedcompress.api import local_sgd

    data = _one_class_client()
    spec = "fedsynth:batches=4,batch=2,outer_steps=30,labels=raw,lr_y=0.1,dtype=fp32,objective=loss,lr_x=0.03"
    # without the guard: raw labels drive the client's loss to ~0 and the update far past SGD's
    model, state, comp, ctx = _setup(spec + ",guard=0")
    ctx.epochs, ctx.batch_size = 1, 4
    comp.client_update(model, state, data, ctx)
    sgd = local_sgd(model, state, data, ctx)
    ref = _update_norm({k: sgd[k] for k in comp.last_w_syn}, state)
    blown = _update_norm(comp.last_w_syn, state) / ref
    assert comp.last_real_loss < 1e-3 and blown > 10
    # with it (guard=10, the default): the client sends a set within 10x, the server applies it
    model, state, comp, ctx = _setup(spec)
    ctx.epochs, ctx.batch_size = 1, 4
    payload = comp.client_update(model, state, data, ctx)
    sent = _update_norm(comp.last_w_syn, state) / ref
    assert sent <= 10 and comp.last_fallback in ("candidate", "init", "lr")
    assert math.isclose(comp.last_update_ratio, sent, rel_tol=1e-4)
    server = fc.get_compressor(spec)
    server.set_model(TinyCNN())
    delta = server.server_update(payload, state, ctx)
    sent_norm = _update_norm({k: delta[k] + state[k] for k in comp.last_w_syn}, state)
    assert math.isclose(sent_norm / ref, sent, rel_tol=1e-4)
    # the server refuses the blown-up set when its declared SGD norm shows it is > 10x
    d = server.decompress(payload, ctx)
    bad = server.compress({"x": d["x"], "y": d["y"], "ref_norm": torch.tensor(ref / 50, dtype=torch.float64)}, ctx)
    with pytest.raises(fc.FormatError, match="guard"):
        server.server_update(bad, state, ctx)
    # softmax labels on the same client stay near the SGD update without any fallback
    model, state, comp, ctx = _setup(
        "fedsynth:batches=4,batch=2,outer_steps=30,labels=trainable,lr_y=0.1,objective=loss,lr_x=0.03"
    )
    ctx.epochs, ctx.batch_size = 1, 4
    comp.client_update(model, state, data, ctx)
    assert comp.last_fallback == "" and comp.last_update_ratio < 10


def test_client_update_takes_a_dataloader_or_tensordataset_like_a_pair():
    # issue 16: client_update(model, state, data, ctx) accepts the three forms local SGD accepts;
    # FedSynth needs all the client's data at once, so a DataLoader is read whole, in its order
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data()
    spec = "fedsynth:batches=2,batch=2,outer_steps=2,labels=fixed"
    blobs = []
    for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)):
        model, state, comp, ctx = _setup(spec)
        blobs.append(comp.client_update(model, state, data, ctx))
    assert blobs[0] == blobs[1] == blobs[2]


def test_real_batch_draws_a_fresh_subset_each_outer_step(monkeypatch):
    """real_batch=k: each outer step's real loss is on its own random k of the client's images."""
    seen = []
    hg = fc.synth.hypergradient

    def spy(model, params, sx, sy, lr, rx, ry, **kw):
        seen.append(rx.clone())
        return hg(model, params, sx, sy, lr, rx, ry, **kw)

    monkeypatch.setattr(fc.synth, "hypergradient", spy)
    x, y = _data()
    model, state, comp, ctx = _setup("fedsynth:batches=2,batch=2,outer_steps=4,real_batch=6,objective=loss")
    payload = comp.client_update(model, state, (x, y), ctx)
    assert len(seen) == 4 and all(r.shape == (6, 1, 8, 8) for r in seen)
    assert all(any(torch.equal(s, r) for r in x) for b in seen for s in b)  # real images
    assert len({tuple(b.flatten().tolist()) for b in seen}) == 4  # a different subset each step
    # the final set is measured on all the data (the per-step subset losses are not comparable)
    d = comp.decompress(payload, ctx)
    w = fc.synth.unroll(model, {k: state[k] for k, _ in model.named_parameters()}, d["x"], d["y"],
                        float(d["inner_lr"]))
    assert math.isclose(comp.last_real_loss, fc.synth.real_loss(model, w, x, y), rel_tol=1e-5)


def test_objective_match_reproduces_the_sgd_update_without_real_batches(monkeypatch):
    """objective=match: the outer loss is ||w_m - w_sgd||^2 / ||w_sgd - w||^2, no real batch per step,
    and the sent set's replay is closer to the client's own SGD weights than the real-sample init's."""
    from fedcompress.api import local_sgd

    calls = []
    hg = fc.synth.hypergradient

    def spy(model, params, sx, sy, lr, rx, ry, **kw):
        calls.append((rx, kw.get("target") is not None))
        return hg(model, params, sx, sy, lr, rx, ry, **kw)

    monkeypatch.setattr(fc.synth, "hypergradient", spy)
    x, y = _data()
    model, state, comp, ctx = _setup("fedsynth:batches=3,batch=2,outer_steps=15,objective=match,lr_x=0.03,dtype=fp32")
    payload = comp.client_update(model, state, (x, y), ctx)
    assert len(calls) == 15 and all(rx is None and has_t for rx, has_t in calls)
    lr = float(comp.decompress(payload, ctx)["inner_lr"])  # the step lr_search chose for both sets
    names = [k for k, _ in model.named_parameters()]
    params = {k: state[k] for k in names}
    sgd = local_sgd(model, state, (x, y), ctx)
    init_x, init_y = comp._init(x, y, 4, 3, 2, ctx)
    w0 = fc.synth.unroll(model, params, init_x, init_y, lr)
    before = _update_norm({k: w0[k] - sgd[k] + state[k] for k in names}, state)
    after = _update_norm({k: comp.last_w_syn[k] - sgd[k] + state[k] for k in names}, state)
    # at the step lr_search chose, 15 steps close ~3 % of the gap here (0.0584 vs 0.0603); a sign
    # error would widen it, and the client would then send the init (after == before)
    assert after < 0.99 * before, (after, before)


def test_objective_match_never_sends_a_set_farther_than_the_init():
    """With the match term alone every outer step measures the same objective, so the set sent is the
    nearest seen: when the Adam steps overshoot (lr_x far too large), that is the real-sample init."""
    x, y = _data()
    model, state, comp, ctx = _setup("fedsynth:batches=3,batch=2,outer_steps=6,objective=match,lr_x=50,dtype=fp32")
    payload = comp.client_update(model, state, (x, y), ctx)
    init_x, _ = comp._init(x, y, 4, 3, 2, ctx)
    assert torch.equal(comp.decompress(payload, ctx)["x"], init_x)
    assert comp.last_fallback == ""  # the first candidate: it ranked best, not a guard fallback


def test_server_scale_multiplies_the_replayed_update():
    x, y = _data()
    deltas = []
    for scale in ("1", "0.5"):
        spec = f"fedsynth:batches=2,batch=2,outer_steps=2,server_scale={scale}"
        model, state, comp, ctx = _setup(spec)
        payload = comp.client_update(model, state, (x, y), ctx)
        deltas.append(comp.server_update(payload, state, ctx))
    for k, v in deltas[0].items():
        torch.testing.assert_close(deltas[1][k], 0.5 * v, rtol=0, atol=0)


def test_spec_leaves_model_dependent_defaults_to_the_model():
    """outer_steps, lr_x and objective default differently for text models (TEXT_DEFAULTS): a spec
    rebuilt from .spec must not pin the image values, and keys the user gave stay."""
    from fedcompress.codecs.fedsynth import TEXT_DEFAULTS

    comp = fc.get_compressor("fedsynth")
    assert not any(f"{k}=" in comp.spec for k in TEXT_DEFAULTS)
    assert fc.get_compressor(comp.spec).params == comp.params
    given = fc.get_compressor("fedsynth:outer_steps=30,objective=loss")
    assert "outer_steps=30" in given.spec and "objective=loss" in given.spec
    assert fc.get_compressor(given.spec).spec == given.spec


@pytest.mark.parametrize("guard", ["10", "0"])
def test_non_finite_global_model_is_refused_on_both_sides(guard):
    # a diverged run (issue 14: a 256x run stopped on a nan target weight): the client says so
    # instead of failing deep inside the outer loop, and the server never applies a NaN update,
    # whatever the guard (guard=0 skips the norm check that a NaN would fail by accident)
    x, y = _data()
    model, state, comp, ctx = _setup(f"fedsynth:batches=2,batch=2,outer_steps=2,guard={guard}")
    payload = comp.client_update(model, state, (x, y), ctx)
    bad = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in bad.items() if v.is_floating_point())
    bad[first].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        comp.client_update(model, bad, (x, y), ctx)
    with pytest.raises(fc.FormatError, match="non-finite"):
        comp.server_update(payload, bad, ctx)
    assert all(torch.isfinite(v).all() for v in comp.server_update(payload, state, ctx).values())


def _sgd_replay_ref(state, x, y, lr):
    """ClientUpdate in plain torch (independent of fedcompress.synth): m SGD steps, soft-label CE."""
    ref = TinyCNN()
    ref.load_state_dict(state)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for j in range(x.shape[0]):
        opt.zero_grad()
        (-(y[j] * torch.log_softmax(ref(x[j]), -1)).sum(-1).mean()).backward()
        opt.step()
    return {k: v.detach() for k, v in ref.named_parameters()}


@pytest.mark.parametrize("lr_search", [4, 2])
def test_lr_search_sends_the_step_whose_replay_is_nearest_the_sgd_weights(lr_search):
    from fedcompress.api import local_sgd

    x, y = _data()
    model, state, comp, ctx = _setup(f"fedsynth:batches=3,batch=2,outer_steps=0,dtype=fp32,lr_search={lr_search}")
    payload = comp.client_update(model, state, (x, y), ctx)
    d = comp.decompress(payload, ctx)
    sgd = local_sgd(model, state, (x, y), ctx)
    dist = {}
    for k in range(lr_search + 1):
        lr = 0.1 / 2**k  # the default inner_lr and its halvings
        w = _sgd_replay_ref(state, d["x"], d["y"], lr)
        dist[lr] = sum(float((w[n].double() - sgd[n].double()).pow(2).sum()) for n in w)
    assert float(d["inner_lr"]) == min(dist, key=dist.get), dist
    assert len(set(dist.values())) == len(dist)  # the test can tell the steps apart


def test_lr_search_leaves_an_explicit_inner_lr_alone():
    x, y = _data()
    for spec, want in [("inner_lr=0.07", 0.07), ("lr_search=0", 0.1)]:
        model, state, comp, ctx = _setup(f"fedsynth:batches=3,batch=2,outer_steps=0,{spec}")
        payload = comp.client_update(model, state, (x, y), ctx)
        assert float(comp.decompress(payload, ctx)["inner_lr"]) == want


def test_lr_search_rejects_out_of_range_values():
    for bad in ("-1", "11", "1.5", "x"):
        with pytest.raises(ValueError, match="lr_search"):
            fc.get_compressor(f"fedsynth:lr_search={bad}")


def test_lr_search_skips_a_noise_init():
    """init=noise: the initial set's replay says nothing about the step, so the default is sent."""
    x, y = _data()
    model, state, comp, ctx = _setup("fedsynth:batches=3,batch=2,outer_steps=1,init=noise,guard=0")
    payload = comp.client_update(model, state, (x, y), ctx)
    assert float(comp.decompress(payload, ctx)["inner_lr"]) == 0.1


@pytest.mark.parametrize("share", ["1", "0.5"])
@pytest.mark.parametrize("scale", ["1", "2"])
def test_error_feedback_carries_what_the_replay_missed(share, scale):
    """ef=a: after each update the client keeps a * (target - applied), where target = its SGD update
    plus the kept residual and applied = the server's own server_update of the payload; the next
    target (declared in the payload as the guard's reference norm) includes it. Reference: local_sgd
    and server_update, called separately."""
    from fedcompress.api import local_sgd

    x, y = _data()
    spec = f"fedsynth:batches=3,batch=2,outer_steps=3,objective=match,ef={share},server_scale={scale},dtype=fp32"
    model, state, comp, ctx = _setup(spec)
    names = [k for k, _ in model.named_parameters()]
    a = float(share)
    res = {k: torch.zeros_like(state[k]) for k in names}
    for rnd in range(3):  # the global model moves between the client's rounds, as in FedAvg
        ctx = RoundContext(round=rnd, client=3, seed=11, batch_size=4)
        sgd = local_sgd(model, state, (x, y), ctx)
        target = {k: sgd[k] - state[k] + res[k] for k in names}
        payload = comp.client_update(model, state, (x, y), ctx)
        declared = float(comp.decompress(payload, ctx)["ref_norm"])
        assert declared == pytest.approx(_update_norm({k: state[k] + target[k] for k in names}, state), rel=1e-6)
        applied = comp.server_update(payload, state, ctx)
        res = {k: a * (target[k] - applied[k]) for k in names}
        for k in names:
            torch.testing.assert_close(comp._residual[3][k], res[k], rtol=1e-5, atol=1e-7)
        assert max(float(r.abs().max()) for r in res.values()) > 0  # the replay is not exact here
        state = {k: state[k] + applied[k] if k in applied else state[k] for k in state}


def test_error_feedback_is_per_client_and_off_by_default():
    x, y = _data()
    model, state, comp, ctx = _setup("fedsynth:batches=3,batch=2,outer_steps=2,ef=1")
    comp.client_update(model, state, (x, y), ctx)
    other = RoundContext(round=2, client=4, seed=11, batch_size=4)
    comp.client_update(model, state, (x, y), other)
    assert sorted(comp._residual) == [3, 4]
    model, state, plain, ctx = _setup("fedsynth:batches=3,batch=2,outer_steps=2")
    plain.client_update(model, state, (x, y), ctx)
    assert plain.params["ef"] == 0 and plain._residual == {}


def test_error_feedback_survives_a_new_compressor():
    """client_state / load_client_state (how fedcompress.flower carries the residual between a node's
    messages): a fresh compressor given the state sends what the one that kept it sends."""
    x, y = _data()
    spec = "fedsynth:batches=3,batch=2,outer_steps=2,objective=match,ef=1,dtype=fp32"
    model, state, kept, ctx = _setup(spec)
    kept.client_update(model, state, (x, y), ctx)
    saved = kept.client_state(3)
    assert sorted(saved) == sorted(f"residual/{k}" for k in kept._residual[3]) and kept.client_state(4) == {}
    ctx2 = RoundContext(round=2, client=3, seed=11, batch_size=4)
    fresh = fc.get_compressor(spec)
    fresh.load_client_state(3, {k: v.clone() for k, v in saved.items()})
    stateless = fc.get_compressor(spec)
    want = kept.client_update(model, state, (x, y), ctx2)
    assert fresh.client_update(model, state, (x, y), ctx2) == want
    assert stateless.client_update(model, state, (x, y), ctx2) != want  # the state is what made them equal


@pytest.mark.parametrize(
    "spec", ["fedsynth:ef=1,objective=loss", "fedsynth:ef=2", "fedsynth:ef=-0.5", "fedsynth:ef=nan"]
)
def test_error_feedback_bad_specs(spec):
    with pytest.raises(ValueError):
        fc.get_compressor(spec)


# ---------------------------------------------------------------------------------------------
# res=r: synthetic images sent at 1/r of the input's height and width


@pytest.mark.parametrize("r", [1, 2, 4])
def test_res_resampling_against_torch(r):
    from fedcompress.codecs.fedsynth import downsample, upsample

    g = torch.Generator().manual_seed(r)
    low = torch.randn(3, 2, 1, 16 // r, 8 // r, generator=g)
    up = upsample(low, r)
    assert torch.equal(up, F.interpolate(low.reshape(6, 1, 16 // r, 8 // r), scale_factor=r).reshape(up.shape))
    full = torch.randn(3, 2, 1, 16, 8, generator=g, dtype=torch.float64)
    pooled = F.avg_pool2d(full.reshape(6, 1, 16, 8), r).reshape(3, 2, 1, 16 // r, 8 // r)
    torch.testing.assert_close(downsample(full, r), pooled)
    # "sum" is the adjoint of upsample: <up(a), b> = <a, down_sum(b)>
    a = torch.randn(low.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close((upsample(a, r) * full).sum(), (a * downsample(full, r, "sum")).sum())


def test_res_gradient_on_the_sent_pixels_against_finite_differences():
    """What the outer loop steps: the objective's gradient in the sent (low-resolution) pixels."""
    from fedcompress.codecs.fedsynth import downsample, upsample

    torch.manual_seed(6)
    model = TinyCNN().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    xl = torch.randn(3, 2, 1, 4, 4, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.arange(6) % 4, 4).double().reshape(3, 2, 4)
    t = {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    _, gx, _ = fc.synth.hypergradient(model, params, upsample(xl, 2), y, 0.5, None, None, target=t, target_weight=3.0)
    an_grad = downsample(gx, 2, "sum")

    def L(x):  # the model sees torch's own nearest upsampling of the sent pixels
        full = F.interpolate(x.reshape(6, 1, 4, 4), scale_factor=2).reshape(3, 2, 1, 8, 8)
        w = fc.synth.unroll(model, params, full, y, 0.5)
        return 3.0 * sum(float(((w[k] - t[k]) ** 2).sum()) for k in t)

    d = torch.randn(xl.shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    fd = (L(xl + eps * d) - L(xl - eps * d)) / (2 * eps)
    an = float((an_grad * d).sum())
    assert abs(fd - an) <= 1e-6 * max(1.0, abs(an))


def test_res_sends_res_squared_times_the_inputs_within_the_budget():
    from fedcompress.fedavg.driver import dense_payload_bytes

    counts = {}
    for r in (1, 2, 4):
        model, state, comp, ctx = _setup(f"fedsynth:ratio=2,outer_steps=2,res={r}")
        payload = comp.client_update(model, state, _data(), ctx)
        assert len(payload) <= dense_payload_bytes(state) // 2
        d = comp.decompress(payload, ctx)
        assert d["x"].shape[-2:] == (8 // r, 8 // r)
        counts[r] = d["x"].shape[0] * d["x"].shape[1]
    # 8x8 fp16 images are 128 bytes, 4x4 ones 32, 2x2 ones 8: the framing and labels take the rest
    assert counts[2] >= 3 * counts[1] and counts[4] >= 2 * counts[2]


def test_res_bad_specs_inputs_and_payloads():
    for spec in ("fedsynth:res=0", f"fedsynth:res={9}", "fedsynth:res=1.5"):
        with pytest.raises(ValueError, match="res"):
            fc.get_compressor(spec)
    model, state, comp, ctx = _setup("fedsynth:batches=2,batch=2,outer_steps=1,res=3")  # 8 % 3 != 0
    with pytest.raises(ValueError, match=r"res=3 needs image inputs"):
        comp.client_update(model, state, _data(), ctx)
    model, state, comp, ctx = _setup("fedsynth:batches=2,batch=2,outer_steps=1,res=2")
    payload = comp.client_update(model, state, _data(), ctx)
    server = fc.get_compressor("fedsynth:batches=2,batch=2")  # res=1: takes 4x4 inputs as they are
    server.set_model(TinyCNN())
    with pytest.raises(fc.FormatError, match="does not fit the model"):
        server.server_update(payload, state, ctx)
