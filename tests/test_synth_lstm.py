"""FedSynth on the next-word LSTM: hypergradient against create_graph, replay, payloads, bad bytes."""

import struct

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fedcompress as fc
from fedcompress import wire
from fedcompress.api import RoundContext, local_sgd
from fedcompress.fedavg.models import NextWordLSTM
from fedcompress.synth import lstm as synth_lstm

torch.set_num_threads(min(2, torch.get_num_threads()))

V, D, H, T = 40, 6, 10, 5


def _model(dtype=torch.float32, seed=0, vocab=V, d=D, seq_len=T, layers=2):
    torch.manual_seed(seed)
    return NextWordLSTM(vocab, d, H, layers=layers, seq_len=seq_len).to(dtype)


def _problem(dtype, k, m=3, b=2, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(m, b, T, D, generator=g, dtype=dtype)
    if k == V:
        idx = torch.arange(V).expand(m, b, T, V).contiguous()
    else:
        idx = torch.randint(0, V, (m, b, T, k), generator=g)
    val = torch.rand(m, b, T, k, generator=g, dtype=dtype)
    rx = torch.randint(0, V, (n, T), generator=g)
    ry = torch.randint(0, V, (n, T), generator=g)
    ry[0, 1] = ry[3, 4] = -100  # ignored positions
    return e, idx, val, rx, ry


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("k", [1, 3, V])
@pytest.mark.parametrize("layers", [1, 2])
def test_hypergradient_matches_create_graph_float64(k, layers):
    model = _model(torch.float64, layers=layers)
    P = _params(model)
    e, idx, val, rx, ry = _problem(torch.float64, k)
    got = synth_lstm.hypergradient_text(model, P, e, idx, val, 0.4, rx, ry, real_chunk=3)
    ref = synth_lstm.hypergradient_text_ref(model, P, e, idx, val, 0.4, rx, ry)
    for a, r in zip(got, ref, strict=True):
        assert a.shape == r.shape
        assert float((a - r).abs().max()) <= 1e-5 * max(1e-3, float(r.abs().max()))
    assert float(ref[1].abs().max()) > 0 and float(ref[2].abs().max()) > 0  # not a trivial zero


def test_public_hypergradient_takes_the_lstm_with_dense_labels():
    # fc.synth.hypergradient / unroll (the generic entry points) route the text model here;
    # dense soft labels [m, b, T, V] equal the sparse form with idx = arange(V)
    model = _model(torch.float64)
    P = _params(model)
    e, idx, val, rx, ry = _problem(torch.float64, V)
    got = fc.synth.hypergradient(model, P, e, val, 0.4, rx, ry)
    ref = synth_lstm.hypergradient_text_ref(model, P, e, idx, val, 0.4, rx, ry)
    for a, r in zip(got, ref, strict=True):
        assert float((a - r).abs().max()) <= 1e-5 * max(1e-3, float(r.abs().max()))
    w = fc.synth.unroll(model, P, e, val, 0.4)
    w_sparse = synth_lstm.unroll_text(model, P, e, idx, val, 0.4)
    for k in P:
        torch.testing.assert_close(w[k], w_sparse[k], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dense"):
        fc.synth.hypergradient(model, P, e, val[..., :3], 0.4, rx, ry)


def test_hypergradient_float32_close_to_float64_reference():
    m64 = _model(torch.float64)
    m32 = _model(torch.float32)
    e, idx, val, rx, ry = _problem(torch.float64, 2)
    ref = synth_lstm.hypergradient_text_ref(m64, _params(m64), e, idx, val, 0.4, rx, ry)
    got = synth_lstm.hypergradient_text(m32, _params(m32), e.float(), idx, val.float(), 0.4, rx, ry)
    for a, r in zip(got, ref, strict=True):
        assert float((a.double() - r).abs().max()) <= 1e-4 * float(r.abs().max())


def test_unroll_equals_autograd_sgd_on_nn_lstm():
    model = _model(torch.float64)
    P = _params(model)
    e, idx, val, _, _ = _problem(torch.float64, 3)
    w = synth_lstm.unroll_text(model, P, e, idx, val, 0.3)
    # independent: plain autograd on the nn.LSTM module, dense soft labels built by scatter
    ref = {k: v.clone().requires_grad_(k != "embedding.weight") for k, v in P.items()}
    for j in range(e.shape[0]):
        z = functional_call(model, ref, (e[j],)).transpose(1, 2)  # [b, T, V]
        y = torch.zeros(z.shape, dtype=z.dtype).scatter_add_(-1, idx[j], val[j])
        loss = -(y * torch.log_softmax(z, -1)).sum(-1).mean()
        names = [k for k in ref if k != "embedding.weight"]
        g = torch.autograd.grad(loss, [ref[k] for k in names])
        ref = {**ref, **{k: (ref[k] - 0.3 * gk).detach().requires_grad_(True) for k, gk in zip(names, g, strict=True)}}
    for k in P:
        torch.testing.assert_close(w[k], ref[k].detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(w["embedding.weight"], P["embedding.weight"])  # never touched
    logits = functional_call(model, w, (torch.randint(0, V, (4, T)),))
    want = F.cross_entropy(logits, torch.zeros(4, T, dtype=torch.long))
    assert torch.isfinite(want)


def test_bad_arguments_name_the_argument():
    model = _model()
    P = _params(model)
    e, idx, val, rx, ry = _problem(torch.float32, 1)
    with pytest.raises(ValueError, match="syn_e"):
        synth_lstm.hypergradient_text(model, P, e[..., :3], idx, val, 0.1, rx, ry)
    with pytest.raises(ValueError, match="syn_idx"):
        synth_lstm.hypergradient_text(model, P, e, idx + V, val, 0.1, rx, ry)
    with pytest.raises(ValueError, match="syn_val"):
        synth_lstm.hypergradient_text(model, P, e, idx, val.double(), 0.1, rx, ry)
    with pytest.raises(ValueError, match="inner_lr"):
        synth_lstm.hypergradient_text(model, P, e, idx, val, 0.0, rx, ry)
    with pytest.raises(ValueError, match="real_y"):
        synth_lstm.hypergradient_text(model, P, e, idx, val, 0.1, rx, ry[:, :2])
    with pytest.raises(ValueError, match="params"):
        synth_lstm.hypergradient_text(model, {}, e, idx, val, 0.1, rx, ry)
    with pytest.raises(ValueError, match="NextWordLSTM"):
        synth_lstm.hypergradient_text(torch.nn.Linear(2, 2), P, e, idx, val, 0.1, rx, ry)


# -- the compressor ------------------------------------------------------------------------------


def _client_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, V, (n, T), generator=g)
    y = torch.roll(x, -1, dims=1)  # a learnable rule: the next token is the input shifted
    y[:, 0] = -100
    return x, y


SPECS = [
    "fedsynth:batches=2,batch=3,outer_steps=4,labels=fixed,dtype=fp32",
    "fedsynth:batches=2,batch=3,outer_steps=4,labels=fixed,dtype=fp16,embedding=rows",
    "fedsynth:batches=2,batch=2,outer_steps=4,labels=trainable,topk=4,dtype=fp16",
    "fedsynth:batches=2,batch=2,outer_steps=3,labels=trainable,topk=0,dtype=fp32,init=noise",
]


def _ctx():
    return RoundContext(round=2, client=3, seed=11, epochs=1, batch_size=6, lr=0.5)


@pytest.mark.parametrize("spec", SPECS)
def test_text_replay_exact_and_payload_size(spec):
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    comp = fc.get_compressor(spec)
    x, y = _client_data()
    payload = comp.client_update(model, state, (x, y), _ctx())
    server = fc.get_compressor(spec)
    server.set_model(_model(seed=5))  # another init: only the architecture matters
    w = server.replay(payload, state, _ctx())
    for k in state:
        assert torch.equal(w[k], comp.last_w_syn[k]), k
    delta = server.server_update(payload, state, _ctx())
    assert set(delta) == set(state)
    # payload bytes: x + labels (+ logits) (+ rows), each counted
    p = comp.params
    m, b = p["batches"], p["batch"]
    item = 2 if p["dtype"] == "fp16" else 4
    k = 1 if p["labels"] == "fixed" else (V if p["topk"] == 0 else p["topk"])
    body = m * b * T * D * item
    if not (p["labels"] == "trainable" and p["topk"] == 0):
        body += m * b * T * k  # uint8 ids (V <= 256)
    if p["labels"] == "trainable":
        body += m * b * T * k * item
    if p["embedding"] == "rows":
        r = int(torch.unique(x).numel())
        body += r * 4 + r * D * item
    assert body < len(payload) < body + 400  # framing and meta only beyond the data
    if p["embedding"] == "rows":
        # the embedding's update = local SGD's rows (the words the client saw), zeros elsewhere
        local = local_sgd(_model(), state, (x, y), _ctx())
        want = local["embedding.weight"] - state["embedding.weight"]
        seen = torch.zeros(V, dtype=torch.bool)
        seen[torch.unique(x)] = True
        assert float(delta["embedding.weight"][~seen].abs().max()) == 0.0
        torch.testing.assert_close(delta["embedding.weight"][seen], want[seen], atol=2e-3, rtol=1e-2)  # fp16
    else:
        assert float(delta["embedding.weight"].abs().max()) == 0.0  # frozen


def test_text_client_lowers_the_real_loss():
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    comp = fc.get_compressor("fedsynth:batches=3,batch=4,outer_steps=15,labels=fixed,dtype=fp32,lr_x=0.1,inner_lr=0.5")
    x, y = _client_data()
    before = synth_lstm.real_loss_text(model, {k: state[k] for k, _ in model.named_parameters()}, x, y)
    comp.client_update(model, state, (x, y), _ctx())
    after = synth_lstm.real_loss_text(model, comp.last_w_syn, x, y)
    assert after < before


def _payload(spec="fedsynth:batches=2,batch=2,outer_steps=2,labels=trainable,topk=3,embedding=rows,dtype=fp32"):
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    comp = fc.get_compressor(spec)
    return comp.client_update(model, state, _client_data(), _ctx()), state, spec


def _server(spec, **kw):
    s = fc.get_compressor(spec)
    s.set_model(_model(**kw))
    return s


@pytest.mark.parametrize(
    "kw, what",
    [({"vocab": V + 1}, "vocabulary"), ({"d": D + 1}, "embedding width"), ({"seq_len": T + 1}, "sequence length")],
)
def test_payload_that_does_not_fit_the_model(kw, what):
    payload, state, spec = _payload()
    server = _server(spec, **kw)
    st = {k: v.detach().clone() for k, v in server.model.state_dict().items()}
    with pytest.raises(fc.FormatError, match=what):
        server.server_update(payload, st, _ctx())


def test_payload_spec_mismatch_and_garbage():
    payload, state, spec = _payload()
    for other in (
        spec.replace("topk=3", "topk=4"),
        spec.replace("embedding=rows", "embedding=freeze"),
        spec.replace("batches=2", "batches=3"),
        "fedsynth:batches=2,batch=2,labels=fixed,embedding=rows,dtype=fp32",
    ):
        with pytest.raises(fc.FormatError):
            _server(other).server_update(payload, state, _ctx())
    server = _server(spec)
    for bad in (payload[:-5], payload[:40], b"", bytes(len(payload))):
        with pytest.raises(fc.FormatError):
            server.server_update(bad, state, _ctx())
    flipped = bytearray(payload)
    flipped[len(payload) // 2] ^= 0xFF
    with pytest.raises(fc.FormatError):
        server.server_update(bytes(flipped), state, _ctx())


def _repack(payload, spec, edit):
    """Decode the records, apply ``edit`` to them, and frame again with a valid checksum."""
    meta, recs = wire.unpack(payload, wire.CODEC_FEDSYNTH)
    recs = [wire.Record(r.name, r.dtype, r.shape, bytes(r.data)) for r in recs]
    meta = bytearray(meta)
    edit(meta, recs)
    return wire.pack(wire.CODEC_FEDSYNTH, recs, bytes(meta))


def _set(recs, name, tensor):
    for i, r in enumerate(recs):
        if r.name == name:
            recs[i] = wire.lossless_record(name, tensor)


def test_hostile_payloads():
    payload, state, spec = _payload()
    server = _server(spec)
    d = server.decompress(payload)
    cases = {
        "label ids out of range": lambda m, r: _set(
            r, "y", torch.full(tuple(d["idx"].shape), V + 3, dtype=torch.uint8)
        ),
        "strictly increasing": lambda m, r: _set(r, "rows", torch.flip(d["rows"].to(torch.int32), [0])),
        "non-finite": lambda m, r: _set(r, "x", torch.full(tuple(d["x"].shape), float("nan"))),
        "expected int32": lambda m, r: _set(r, "rows", torch.arange(V + 5, dtype=torch.int32)),
        "inner_lr": lambda m, r: m.__setitem__(slice(len(m) - 8, len(m)), struct.pack("<d", -1.0)),
        "not a text payload": lambda m, r: m.__setitem__(0, 2),
    }
    for what, edit in cases.items():
        with pytest.raises(fc.FormatError, match=what):
            server.server_update(_repack(payload, spec, edit), state, _ctx())


def test_image_and_text_payloads_do_not_cross():
    payload, state, spec = _payload()
    image = fc.get_compressor(spec)
    image.set_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
    with pytest.raises(fc.FormatError):
        image.decompress(payload)


def test_text_spec_limits():
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="labels='raw'"):
        fc.get_compressor("fedsynth:labels=raw").client_update(model, state, _client_data(), _ctx())
    with pytest.raises(ValueError, match="topk"):
        fc.get_compressor("fedsynth:topk=-1")
    with pytest.raises(ValueError, match="embedding"):
        fc.get_compressor("fedsynth:embedding=sz")


def test_text_keeps_its_own_defaults_and_refuses_image_only_keys(monkeypatch):
    """The image defaults (objective=match, fewer outer steps) were measured on images only: a text
    client gets the defaults it was measured with, unless the spec names the key."""
    from fedcompress.codecs import fedsynth_text
    from fedcompress.codecs.fedsynth import TEXT_DEFAULTS

    seen = {}

    def spy(comp, *args):
        seen.clear()
        seen.update(comp.params)
        return b""

    monkeypatch.setattr(fedsynth_text, "client_update", spy)
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    comp = fc.get_compressor("fedsynth")
    image = dict(comp.params)
    comp.client_update(model, state, _client_data(), _ctx())
    assert {k: seen[k] for k in TEXT_DEFAULTS} == TEXT_DEFAULTS
    assert comp.params == image  # restored for the next (maybe image) call
    fc.get_compressor("fedsynth:outer_steps=3,lr_x=0.2").client_update(model, state, _client_data(), _ctx())
    assert seen["outer_steps"] == 3 and seen["lr_x"] == 0.2
    for bad in ("objective=match", "server_scale=0.5", "ef=1"):  # ef alone: the image default objective
        with pytest.raises(ValueError, match=bad.split("=")[0] + "="):
            fc.get_compressor("fedsynth:" + bad).client_update(model, state, _client_data(), _ctx())


@pytest.mark.parametrize(
    "spec",
    ["fedsynth:ratio=4,outer_steps=2", "fedsynth:ratio=2,outer_steps=2,labels=trainable,dtype=fp16",
     "fedsynth:ratio=8,batch=2,outer_steps=2"],
)
def test_text_ratio_fits_the_budget_and_replays_exactly(spec):
    """ratio=R on a text model: the payload is <= dense / R, as full as the shape rule allows (one
    more sequence per batch would not fit), and the server takes the client's shape from it."""
    from fedcompress.codecs.budget import dense_payload_bytes

    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    comp = fc.get_compressor(spec)
    payload = comp.client_update(model, state, _client_data(), _ctx())
    budget = int(dense_payload_bytes(state) // comp.params["ratio"])
    m, b = comp.last_choice["batches"], comp.last_choice["batch"]
    assert len(payload) == comp.last_choice["bytes"] <= budget
    if "batch=2" in spec:
        assert b == 2
    else:  # batches: the client's SGD step count (1 epoch of 24 sequences in batches of 6), or up
        # to 20 % fewer where that fills the budget better
        assert m in (3, 4)
    # a payload with one more sequence per batch, packed by a compressor of that fixed shape
    labels = "trainable" if "trainable" in spec else "fixed"
    dtype = "fp16" if "fp16" in spec else "fp32"
    bigger = fc.get_compressor(f"fedsynth:batches={m},batch={b + 1},labels={labels},dtype={dtype}")
    bigger.set_model(model)
    k = 8 if labels == "trainable" else 1
    blob = bigger.compress({"x": torch.zeros(m, b + 1, T, D), "idx": torch.zeros(m, b + 1, T, k, dtype=torch.long),
                            "v": torch.zeros(m, b + 1, T, k)}, RoundContext())
    assert len(blob) > budget
    server = fc.get_compressor(comp.spec)
    server.set_model(model)
    delta = server.server_update(payload, state, _ctx())
    for name, w in comp.last_w_syn.items():
        assert torch.equal(delta[name], w - state[name])
    # and refuses a payload above the budget
    with pytest.raises(fc.FormatError, match="exceeds the ratio budget"):
        server.server_update(blob, state, _ctx())


def test_text_ratio_bad_settings():
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"ratio=500 is unreachable.*smallest payload gives ratio"):
        fc.get_compressor("fedsynth:ratio=500").client_update(model, state, _client_data(), _ctx())
    with pytest.raises(ValueError, match="embedding=freeze"):
        fc.get_compressor("fedsynth:ratio=2,embedding=rows").client_update(model, state, _client_data(), _ctx())
