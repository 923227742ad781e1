"""The compressor API: Compressor base class, RoundContext, registry and spec strings.

A spec is ``name`` or ``name:key=value,key=value`` (e.g. ``"sz:rel=1e-2"``, ``"mask:keep=0.125"``).
Each compressor declares its keys once in ``PARAMS``; parsing, validation and error messages (which
always name the valid choices) come from that declaration.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .wire import U64_MASK

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


@dataclass
class RoundContext:
    """Who is compressing what: the round, the client, the experiment seed, and local-training knobs.

    ``seed``, ``round`` and ``client`` make every random choice reproducible (masks, shuffling,
    FedSynth initialisation); the server uses the same context to decode.
    """

    round: int = 0
    client: int = 0
    seed: int = 0
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def subseed(self, salt: int = 0) -> int:
        """A 63-bit seed derived from (seed, round, client, salt) by a fixed mix (splitmix64)."""
        return mix_seed(self.seed, self.round, self.client, salt)

    def generator(self, salt: int = 0) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.subseed(salt))
        return g


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & U64_MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64_MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64_MASK
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Stable (across runs and platforms) 63-bit hash of integers; Python's hash() is salted."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h = _splitmix64(h ^ (int(p) & U64_MASK))
    return h >> 1


# ---------------------------------------------------------------------------------------------
# Spec parameters


@dataclass(frozen=True)
class Param:
    """One spec key: its type, default, and a validity check described in words."""

    type: Callable[[str], Any]
    default: Any
    check: Callable[[Any], bool] | None = None
    valid: str = ""  # e.g. "in (0, 1]" or "one of fp32, fp16"

    def parse(self, key: str, raw: Any) -> Any:
        try:
            v = self.type(raw) if isinstance(raw, str) else raw
            if self.type is float:
                v = float(v)
            elif self.type is int:
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError
                v = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={raw!r} is not a valid {self.type.__name__}; expected {self.valid}") from None
        if self.check is not None and not self.check(v):
            raise ValueError(f"{key}={raw!r} out of range; expected {self.valid}")
        return v


def boolean(s: str | bool | int) -> bool:
    if isinstance(s, bool):
        return s
    m = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    k = str(s).lower()
    if k not in m:
        raise ValueError(s)
    return m[k]


def choice(*options: str) -> Param:
    return Param(str, options[0], lambda v: v in options, "one of " + ", ".join(options))


def positive_float(default: float) -> Param:
    return Param(float, default, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def positive_int(default: int) -> Param:
    return Param(int, default, lambda v: v > 0, "an integer > 0")


# ---------------------------------------------------------------------------------------------
# Compressor base


class Compressor:
    """Base class of every state-dict compressor.

    Subclasses set ``name`` and ``PARAMS`` and implement ``compress``/``decompress``. The default
    ``client_update`` trains locally with SGD and compresses the delta (local − global);
    ``server_update`` decodes it. Compressors that send something other than a delta (FedSynth,
    SZ on weights) override those two.

    Every subclass's ``compress``/``decompress`` is wrapped (``__init_subclass__``) by a type check
    of its first argument, so a tensor, a model or a payload passed to the wrong one raises a
    ValueError saying what to call instead, rather than a KeyError or AttributeError from deep
    inside a codec; compressors registered by users get the same messages.
    """

    name: str = ""
    PARAMS: dict[str, Param] = {}
    # Bumped when the same spec starts to send something else (a changed rule or default): the
    # FedAvg driver writes it to summary.json and the results' run cache re-runs older runs.
    REVISION: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for meth, check in (("compress", check_update), ("decompress", check_payload)):
            fn = cls.__dict__.get(meth)
            if fn is not None and not getattr(fn, "_fc_checked", False):
                setattr(cls, meth, _checked(fn, check))
        fn = cls.__dict__.get("client_update")
        if fn is not None and not getattr(fn, "_fc_checked", False):
            # overrides unpack ``x, y = data``: give them a TensorDataset's tensors, the same data
            # (a DataLoader stays a DataLoader: its batches are the caller's choice)
            cls.client_update = _tensordataset_as_pair(fn)

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.PARAMS)
        if unknown:
            raise ValueError(
                f"unknown key(s) {sorted(unknown)} for compressor {self.name!r}; "
                f"valid keys: {sorted(self.PARAMS) or 'none'}"
            )
        self.params = {k: p.parse(k, kwargs[k]) if k in kwargs else p.default for k, p in self.PARAMS.items()}

    @property
    def spec(self) -> str:
        """A spec string that rebuilds this compressor."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"

    # -- codec ---------------------------------------------------------------------------------
    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        raise NotImplementedError

    def decompress(self, payload: bytes, ctx: RoundContext) -> StateDict:
        raise NotImplementedError

    # -- federated round -----------------------------------------------------------------------
    def client_update(self, model: torch.nn.Module, global_state: StateDict, data, ctx: RoundContext) -> bytes:
        """Local SGD from ``global_state`` on ``data`` (an (x, y) pair, a TensorDataset or a
        DataLoader: ``CLIENT_DATA_FORMS``), then compress the delta (local − global)."""
        local = local_sgd(model, global_state, data, ctx)
        return self.compress(state_delta(local, global_state), ctx)

    def server_update(self, payload: bytes, global_state: StateDict, ctx: RoundContext) -> StateDict:
        """The client's delta, decoded from ``payload``."""
        return self.decompress(payload, ctx)

    # -- what a client carries from one of its rounds to the next --------------------------------
    def client_state(self, client: int) -> StateDict:
        """What this compressor keeps for ``client`` between rounds (error feedback's residual, a
        search's warm start) as named tensors; empty when nothing. The in-process driver keeps the
        compressor object; a runtime that builds a new one per message (Flower: a fresh ClientApp
        for every message) saves this after ``compress``/``client_update`` and hands it back with
        ``load_client_state`` before the next (fedcompress.flower stores it in the node's
        ``Context.state``)."""
        return {}

    def load_client_state(self, client: int, state: StateDict) -> None:
        """Restore what ``client_state(client)`` returned, possibly in another process."""


def _checked(fn, check):
    import inspect

    first = list(inspect.signature(fn).parameters)[1]  # after self: update / payload

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if args:
            check(self, args[0])
        elif first in kwargs:
            check(self, kwargs[first])
        return fn(self, *args, **kwargs)

    wrapper._fc_checked = True
    return wrapper


def _tensordataset_as_pair(fn):
    @functools.wraps(fn)
    def wrapper(self, model, global_state, data, *args, **kwargs):
        from torch.utils.data import TensorDataset

        if isinstance(data, TensorDataset):
            data = client_tensors(data)
        return fn(self, model, global_state, data, *args, **kwargs)

    wrapper._fc_checked = True
    return wrapper


def check_update(comp: Compressor, update: Any) -> None:
    """ValueError unless ``update`` is a state dict {str: Tensor}; the message says what to call instead."""
    if isinstance(update, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in update.items()):
        return
    if isinstance(update, Tensor):
        hint = (
            "for one tensor pass {'name': t}, or use the tensor codecs fc.SZ(...).encode(t) / "
            "fc.RandomMask(...).encode(t, seed=...)"
        )
    elif isinstance(update, torch.nn.Module):
        hint = (
            "for a model, send its update: compress(fc.api.state_delta(model.state_dict(), global_state), ctx), "
            "or let client_update(model, global_state, data, ctx) train and compress"
        )
    elif isinstance(update, (bytes, bytearray, memoryview)):
        hint = "bytes are a payload: decode them with decompress(payload, ctx)"
    elif isinstance(update, Mapping):
        bad = next(
            f"{k!r}: {type(v).__name__}"
            for k, v in update.items()
            if not (isinstance(k, str) and isinstance(v, Tensor))
        )
        hint = f"every key must be a str and every value a torch.Tensor (found {bad})"
    else:
        hint = "e.g. {name: local - global} from fc.api.state_delta(local_state, global_state)"
    raise ValueError(
        f"{type(comp).__name__}.compress takes a state dict {{name: Tensor}} (the update), got "
        f"{type(update).__name__}: {hint}"
    )


def check_payload(comp: Compressor, payload: Any) -> None:
    """ValueError unless ``payload`` is bytes-like (what ``compress`` returned)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return
    if isinstance(payload, Mapping):
        hint = "that is a state dict: compress(update, ctx) turns it into a payload"
    elif isinstance(payload, Tensor):
        hint = (
            "a tensor is not a payload; a blob from fc.SZ/fc.RandomMask.encode decodes with that codec's "
            ".decode(blob)"
        )
    else:
        try:  # numpy uint8 arrays and other buffers are fine
            memoryview(payload)
            return
        except TypeError:
            hint = "pass the bytes that compress() (or client_update()) returned"
    raise ValueError(
        f"{type(comp).__name__}.decompress takes the payload bytes from compress(), got "
        f"{type(payload).__name__}: {hint}"
    )


def check_device(device) -> torch.device:
    """``device`` as a torch.device (None: CPU); a bad value is a ValueError naming the argument."""
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from e


def state_device(state: StateDict) -> torch.device:
    """Where a state dict lives: its first float tensor's device (else its first tensor's; else CPU)."""
    tensors = list(state.values())
    for t in tensors:
        if t.is_floating_point():
            return t.device
    return tensors[0].device if tensors else torch.device("cpu")


def state_delta(new: StateDict, old: StateDict) -> StateDict:
    """new − old per tensor, in each tensor's own dtype (bool: xor)."""
    out = {}
    for k, v in new.items():
        o = old[k]
        out[k] = (v ^ o) if v.dtype == torch.bool else (v - o)
    return out


RESIDUAL_PREFIX = "residual/"  # error feedback's residual in Compressor.client_state


def residual_state(residuals: dict[int, StateDict], client: int) -> StateDict:
    """``client``'s error-feedback residual as ``client_state`` entries (``residual/<name>``)."""
    return {RESIDUAL_PREFIX + k: v for k, v in residuals.get(client, {}).items()}


def load_residual(residuals: dict[int, StateDict], client: int, state: StateDict) -> None:
    """Set ``residuals[client]`` from ``client_state`` entries (none there: the client has none)."""
    res = {k.removeprefix(RESIDUAL_PREFIX): v for k, v in state.items() if k.startswith(RESIDUAL_PREFIX)}
    if res:
        residuals[client] = res
    else:
        residuals.pop(client, None)


def apply_delta(state: StateDict, delta: StateDict) -> StateDict:
    """state + delta per tensor, cast back to each tensor's dtype (ints rounded, bool: xor)."""
    out = {}
    for k, v in state.items():
        d = delta[k].to(v.device)
        if v.dtype == torch.bool:
            out[k] = v ^ d.to(torch.bool)
        elif v.is_floating_point():
            out[k] = (v + d.to(v.dtype)).to(v.dtype)
        else:
            out[k] = v + torch.round(d.double()).to(v.dtype) if d.is_floating_point() else v + d.to(v.dtype)
    return out


def all_finite(state: StateDict) -> bool:
    """True when every floating-point tensor of ``state`` is finite (no NaN or inf)."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


CLIENT_DATA_FORMS = (
    "an (x, y) pair of tensors (y: int64 class labels), a torch.utils.data.TensorDataset(x, y), "
    "or a torch.utils.data.DataLoader yielding (x, y) batches"
)


def client_tensors(data) -> tuple[Tensor, Tensor]:
    """A client's data as one (x, y) pair of tensors, from any of ``CLIENT_DATA_FORMS``.

    A DataLoader is read once and its batches concatenated (for code that needs all the data at
    once, such as FedSynth's real-data loss); ``local_sgd`` iterates a DataLoader instead.
    """
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(data, TensorDataset):
        data = data.tensors
    elif isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            x, y = _pair(batch, "a DataLoader batch")
            xs.append(x)
            ys.append(y)
        if not xs:
            raise ValueError("client data: the DataLoader yielded no batches")
        return torch.cat(xs), torch.cat(ys)
    x, y = _pair(data, "client data")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"client data: x has {x.shape[0]} samples but y has {y.shape[0]}")
    return x, y


def _pair(data, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1]
    got = type(data).__name__
    if isinstance(data, (tuple, list)):
        got += f" of {len(data)} ({', '.join(type(t).__name__ for t in data[:4])})"
    raise ValueError(f"{what} must be {CLIENT_DATA_FORMS}; got {got}")


def local_sgd(model: torch.nn.Module, global_state: StateDict, data, ctx: RoundContext) -> StateDict:
    """Plain minibatch SGD for ``ctx.epochs`` epochs from ``global_state``; returns the new state.

    ``data``: any of ``CLIENT_DATA_FORMS``. Tensors and a TensorDataset are shuffled with
    ``ctx.generator()`` in batches of ``ctx.batch_size``, so the same (seed, round, client) gives the
    same result; a DataLoader is iterated as it is (its own batch size, order and sampler).
    """
    from torch.utils.data import DataLoader

    model.load_state_dict(global_state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=ctx.lr)
    if isinstance(data, DataLoader):
        for _ in range(ctx.epochs):
            for batch in data:
                xb, yb = _pair(batch, "a DataLoader batch")
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = client_tensors(data)
    g = ctx.generator(salt=1)
    n = x.shape[0]
    for _ in range(ctx.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, ctx.batch_size):
            idx = order[i : i + ctx.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Registry

# name -> "module:Class" (imported on first use) or the class itself
_REGISTRY: dict[str, str | type[Compressor]] = {
    "none": "fedcompress.codecs.identity:NoneCompressor",
    "fp16": "fedcompress.codecs.identity:FP16Compressor",
    "sz": "fedcompress.codecs.sz.statedict:SZCompressor",
    "mask": "fedcompress.codecs.mask:MaskCompressor",
    "fedsynth": "fedcompress.codecs.fedsynth:FedSynthCompressor",
}


def register(name: str):
    """Class decorator: make a Compressor subclass available to ``get_compressor(name...)``."""

    def deco(cls: type[Compressor]) -> type[Compressor]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_compressors() -> list[str]:
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:k=v,k=v"`` -> (name, {k: v}); raises ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compressor spec must be a non-empty string; valid names: {available_compressors()}")
    name, colon, rest = spec.strip().partition(":")
    if colon and not rest.strip():
        raise ValueError(f"spec {spec!r} ends with ':'; expected name:key=value,...")
    kwargs: dict[str, str] = {}
    if rest:
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"bad item {item!r} in spec {spec!r}; expected key=value")
            kwargs[k.strip()] = v.strip()
    return name.strip(), kwargs


def compressor_class(name: str) -> type[Compressor]:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown compressor {name!r}; valid choices: {', '.join(available_compressors())}")
    if isinstance(entry, str):
        mod, cls = entry.split(":")
        entry = getattr(importlib.import_module(mod), cls)
        _REGISTRY[name] = entry
    return entry


def get_compressor(spec: str) -> Compressor:
    """Build a compressor from a spec string such as ``"sz:rel=1e-2"`` or ``"mask:keep=0.125"``."""
    name, kwargs = parse_spec(spec)
    return compressor_class(name)(**kwargs)
