"""Tracing a model into a chain of layers (``layers.py``) for the chain engine (``chain.py``).

``compile_chain(model)`` traces the model with torch.fx; when its forward is a plain chain of the
supported modules and functions (Conv2d, Linear, ReLU, MaxPool2d, flatten/view, Identity, Dropout(0))
it returns the list of layer objects (fused where ``layers.fuse`` can), else None and the engine
uses its generic path. The list holds configuration only, so it is cached per model and shared by
every call.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .layer import Unsupported
from .layers import Conv2d, Flatten, Identity, Linear, MaxPool2d, ReLU, fuse


def compile_chain(model: nn.Module) -> list | None:
    """The model as a list of layers, or None when it is not a plain chain of supported layers."""
    try:
        return _compile(model)
    except Unsupported:
        return None
    except Exception:  # tracing failed (data-dependent control flow, ...): generic engine
        return None


def _compile(model: nn.Module) -> list:
    import torch.fx as fx

    if any(True for _ in model.buffers()):
        raise Unsupported("buffers")
    gm = fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    layers: list = []
    prev = None  # the node holding the current activation
    sizes = set()  # nodes that are x.size(0) / x.shape[0] of the current activation
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if prev is not None:
                raise Unsupported("more than one input")
            prev = n
            continue
        if n.op == "output":
            if n.args[0] is not prev:
                raise Unsupported("output is not the last activation")
            break
        if n.op == "get_attr":
            raise Unsupported("get_attr")
        tensor_args = [a for a in n.args if isinstance(a, fx.Node)]
        if n.op == "call_method" and n.target == "size" and n.args[0] is prev:
            sizes.add(n)
            continue
        if n.op == "call_function" and n.target is getattr and n.args[0] is prev and n.args[1] == "shape":
            sizes.add(n)
            continue
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in sizes and n.args[1] == 0:
            sizes.add(n)
            continue
        if not tensor_args or tensor_args[0] is not prev or any(a is not prev and a not in sizes for a in tensor_args):
            raise Unsupported(f"node {n} is not a chain step")
        layers.append(_layer_for(n, mods, sizes))
        prev = n
    layers = fuse(layers)
    if not layers or not any(layer.has_params for layer in layers):
        raise Unsupported("no parameter layers")
    names = [p for layer in layers for p in layer.dense + layer.lowrank]
    if len(names) != len(set(names)) or set(names) != {k for k, _ in model.named_parameters()}:
        raise Unsupported("parameters shared or unused")
    return layers


def _layer_for(n, mods, sizes):
    if n.op == "call_module":
        mod = mods[n.target]
        prefix = n.target + "."
        if type(mod) is nn.Conv2d:
            return Conv2d(mod, prefix)
        if type(mod) is nn.Linear:
            return Linear(mod, prefix)
        if type(mod) is nn.ReLU:
            return ReLU()
        if type(mod) is nn.MaxPool2d and not mod.return_indices:
            return MaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
        if type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1:
            return Flatten()
        if type(mod) is nn.Identity or (type(mod) is nn.Dropout and mod.p == 0):
            return Identity()
        raise Unsupported(f"module {type(mod).__name__}")
    if n.op == "call_function":
        if n.target in (F.relu, torch.relu) and not n.kwargs.get("inplace", False) and len(n.args) == 1:
            return ReLU()
        if n.target in (F.max_pool2d, torch.max_pool2d):
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            kw = dict(zip(names, n.args, strict=False))
            kw.update(n.kwargs)
            if kw.get("return_indices"):
                raise Unsupported("return_indices")
            kw.pop("input")
            kw.pop("return_indices", None)
            return MaxPool2d(**kw)
        if n.target is torch.flatten and _flatten_args(n.args[1:], n.kwargs):
            return Flatten()
        raise Unsupported(f"function {n.target}")
    if n.op == "call_method":
        if n.target == "relu" and len(n.args) == 1:
            return ReLU()
        if n.target == "flatten" and _flatten_args(n.args[1:], n.kwargs):
            return Flatten()
        if n.target in ("view", "reshape"):
            shape = n.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if len(shape) == 2 and shape[1] == -1 and (shape[0] in sizes or shape[0] == -1):
                return Flatten()
        raise Unsupported(f"method {n.target}")
    raise Unsupported(n.op)


def _flatten_args(args, kwargs) -> bool:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1
