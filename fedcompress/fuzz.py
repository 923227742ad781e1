"""Fuzz harness for every decoder: structure-aware mutations of valid payloads, and random bytes.

    python -m fedcompress.fuzz --cases 1000000            # the long pass (all targets, all backends)
    python -m fedcompress.fuzz --cases 20000 --seconds 90 # what CI runs (tests/test_fuzz.py)

Targets share each worker's time equally (so slow interpreted-Triton decoders get fewer cases). Each
case feeds one (possibly mutated) payload to one decoder and classifies the outcome:

- ``ok``: decoded. Allowed only when the bytes still carry a valid checksum (unmutated, or mutated and
  re-checksummed on purpose to reach the codec's own parsing); a payload corrupted *without* fixing the
  CRC that decodes anyway is an ``undetected`` corruption.
- ``format_error``: fc.FormatError — the only acceptable error.
- ``other_error``: any other exception (a bug).
- ``hang``: one decode took longer than ``--hang-seconds`` (checked after the fact; a true infinite
  loop is caught by the per-chunk subprocess timeout).
- crashes kill the worker process: the driver runs chunks in subprocesses and counts those.

The decoded-size limit is lowered to ``--limit-mb`` for the run, and each worker's peak RSS growth is
checked against it, so "allocates more than the limit" is counted too (``over_limit``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import wire
from .errors import FormatError

# ---------------------------------------------------------------------------------------------
# Targets: a way to make valid payloads and a decoder to attack. Registered by name.


@dataclass
class Target:
    name: str
    make: Callable[[random.Random], bytes]  # a valid payload
    decode: Callable[[bytes], object]


# name -> factory returning (make, decode); built on first use so a target's imports stay lazy
_FACTORIES: dict[str, Callable[[], tuple[Callable, Callable]]] = {}
_BUILT: dict[str, Target] = {}


class _Targets(dict):
    """TARGETS[name] builds the target on first access."""

    def __getitem__(self, name: str) -> Target:
        if name not in _BUILT:
            make, decode = _FACTORIES[name]()
            _BUILT[name] = Target(name, make, decode)
        return _BUILT[name]

    def __contains__(self, name) -> bool:
        return name in _FACTORIES

    def __iter__(self):
        return iter(_FACTORIES)

    def __len__(self) -> int:
        return len(_FACTORIES)

    def keys(self):
        return _FACTORIES.keys()

    def values(self):
        return [self[n] for n in _FACTORIES]


TARGETS = _Targets()


def target(name: str):
    def deco(factory):
        _FACTORIES[name] = factory
        return factory

    return deco


def _rand_tensor(rng: random.Random) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    n = rng.choice([0, 1, 7, 300, 5000])
    t = torch.randn(n, generator=g) * rng.choice([1e-3, 1.0, 1e3])
    if n > 8 and rng.random() < 0.3:
        t[: n // 3] = 0.0  # runs of exact zeros, as in real updates
        t[3] = float("nan")
        t[5] = float("inf")
    return t.to(rng.choice([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]))


def _rand_state(rng: random.Random) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    n = rng.choice([0, 1, 5, 300, 2000])
    return {
        "w": torch.randn(n, generator=g),
        "b": torch.randn(rng.choice([1, 3]), generator=g).double(),
        "n": torch.tensor(rng.randrange(1000)),
        "h": torch.randn(4, generator=g).to(torch.bfloat16),
    }


def _statedict_target(spec: str):
    def factory():
        from .api import RoundContext, get_compressor

        comp = get_compressor(spec)
        ctx = RoundContext(round=1, client=2, seed=3)
        return (lambda rng: comp.compress(_rand_state(rng), ctx)), (lambda b: comp.decompress(b, ctx))

    return factory


for _spec in ("none", "fp16", "sz:rel=1e-2,min_lossy=256", "mask:keep=0.25"):
    target(_spec.split(":")[0])(_statedict_target(_spec))


def _backend_targets(prefix: str, op: str, factory_for_backend) -> None:
    from ._ops import implementations

    for b in ("torch", "cpp", "triton"):
        if b in implementations(op):
            target(f"{prefix}:{b}")(factory_for_backend(b))


def _sz_tensor(backend: str):
    def factory():
        from .codecs.sz.codec import SZ

        enc = SZ(1e-2, "rel")
        dec = SZ(1e-2, "rel", backend=backend)
        lossy = SZ(1e-3, "abs", lossless="zstd")
        return (lambda rng: (lossy if rng.random() < 0.3 else enc).encode(_rand_tensor(rng))), dec.decode

    return factory


def _mask_tensor(backend: str):
    def factory():
        from .codecs.mask import RandomMask

        enc = RandomMask(keep=0.3)
        dec = RandomMask(keep=0.3, backend=backend)
        return (lambda rng: enc.encode(_rand_tensor(rng), seed=rng.randrange(2**64))), dec.decode

    return factory


def _mask_mean(backend: str):
    def factory():
        from .codecs.mask import RandomMask

        enc = RandomMask(keep=0.3, unbiased=True)
        dec = RandomMask(keep=0.3, backend=backend)
        good = enc.encode(torch.ones(300), seed=5)
        return (lambda rng: enc.encode(torch.randn(300), seed=rng.randrange(2**64))), (
            lambda b: dec.decode_mean([good, b])
        )

    return factory


_backend_targets("sz-tensor", "sz_decode", _sz_tensor)
_backend_targets("mask-tensor", "mask_decode", _mask_tensor)
_backend_targets("mask-mean", "mask_decode", _mask_mean)


def _fedsynth_server(model, spec: str):
    """(global state, compressor with the model set, context): a FedSynth server for ``model``."""
    from .api import RoundContext, get_compressor

    comp = get_compressor(spec)
    comp.set_model(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, comp, RoundContext()


@target("fedsynth")
def _fedsynth():
    # The server decodes AND replays SGD on the payload: both must reject hostile bytes cleanly.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    state, comp, ctx = _fedsynth_server(model, "fedsynth:batches=2,batch=3,labels=trainable")

    def make(rng):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        return comp.compress({"x": torch.randn(2, 3, 3, 4, generator=g),
                              "y": torch.softmax(torch.randn(2, 3, 3, generator=g), -1)}, ctx)

    return make, (lambda b: comp.server_update(b, state, ctx))


@target("fedsynth-text")
def _fedsynth_text():
    # text payloads under ratio=R: each client's shape comes from the payload, bounded by the budget
    from .fedavg.models import NextWordLSTM

    torch.manual_seed(0)
    model = NextWordLSTM(40, 6, 10, layers=2, seq_len=5)
    state, comp, ctx = _fedsynth_server(model, "fedsynth:ratio=2,labels=trainable,dtype=fp16")

    def make(rng):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        m, b = rng.randrange(1, 4), rng.randrange(1, 4)
        return comp.compress({"x": torch.randn(m, b, 5, 6, generator=g),
                              "idx": torch.randint(0, 40, (m, b, 5, 8), generator=g),
                              "v": torch.randn(m, b, 5, 8, generator=g)}, ctx)

    return make, (lambda b: comp.server_update(b, state, ctx))


# ---------------------------------------------------------------------------------------------
# Mutations


def _fix_crc(b: bytearray) -> bytes:
    if len(b) >= 4:
        b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def _crc_ok(b: bytes) -> bool:
    return len(b) >= 4 and zlib.crc32(b[:-4]) == struct.unpack("<I", b[-4:])[0]


def _header_offsets(b: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every header field of the frame, found by walking it (best effort)."""
    out = [(4, 2), (6, 2), (8, 4)]
    try:
        r = wire.Reader(b[:-4])
        r.take(8)
        meta_len = r.u32()
        meta_at = r.pos
        r.take(meta_len)
        # the first fields of codec meta are usually counts and sizes: attack them too
        out += [(meta_at + i, 4) for i in range(0, min(meta_len, 32), 4)]
        out.append((r.pos, 4))
        n = r.u32()
        for _ in range(min(n, 16)):
            out.append((r.pos, 2))
            r.str()
            out.append((r.pos, 1))
            r.u8()
            out.append((r.pos, 1))
            ndim = r.u8()
            for _ in range(ndim):
                out.append((r.pos, 8))
                r.u64()
            out.append((r.pos, 8))
            data_at = r.pos + 8
            data = r.blob()
            # codec-specific record headers: attack the first words of each record's data
            out += [(data_at + i, 4) for i in range(0, min(len(data), 48), 4)]
    except FormatError:
        pass
    return out


_EDGE_VALUES = {1: [0, 1, 0x7F, 0x80, 0xFF], 2: [0, 1, 0x7FFF, 0x8000, 0xFFFF],
                4: [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF],
                8: [0, 1, 2**63 - 1, 2**63, 2**64 - 1]}


def mutate(rng: random.Random, good: bytes, other: bytes) -> tuple[bytes, bool]:
    """One mutated payload and whether its checksum is valid (so decoding it may legitimately succeed)."""
    b = bytearray(good)
    kind = rng.randrange(9)
    if kind == 0 and b:  # bit flips
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), False
    if kind == 1:  # truncation
        return bytes(b[: rng.randrange(len(b) + 1 if b else 1)]), False
    if kind == 2:  # appended bytes
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 100]))), False
    if kind == 3:  # splice two payloads
        i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
        return bytes(b[:i]) + other[j:], False
    if kind == 4:  # random bytes, sometimes behind a valid magic
        n = rng.choice([0, 3, 16, 64, 1000])
        head = good[:8] if rng.random() < 0.5 else b""
        return _fix_crc(bytearray(head + bytes(rng.randrange(256) for _ in range(n)))), True
    # structure-aware: a header field set to an edge value, then the CRC fixed so the codec sees it
    offs = _header_offsets(good)
    if not offs:
        return bytes(b), False
    at, width = rng.choice(offs)
    if at + width > len(b) - 4:
        return bytes(b), False
    v = rng.choice(_EDGE_VALUES[width] + [rng.randrange(2 ** (8 * width))])
    if kind == 5:
        v = (int.from_bytes(b[at : at + width], "little") + rng.choice([-1, 1])) % 2 ** (8 * width)
    b[at : at + width] = v.to_bytes(width, "little")
    if kind == 8 and len(b) > 12:  # plus random bytes inside the body, re-checksummed
        for _ in range(rng.choice([1, 4])):
            i = rng.randrange(8, len(b) - 4)
            b[i] = rng.randrange(256)
    return _fix_crc(b), True


# ---------------------------------------------------------------------------------------------
# Worker: runs cases in this process


def run_cases(names: list[str], cases: int, seed: int, limit_mb: int, hang_seconds: float,
              deadline: float | None = None) -> dict:
    wire.set_max_decoded_bytes(limit_mb << 20)
    rng = random.Random(seed)
    counts: Counter = Counter()
    examples: dict[str, str] = {}
    pools = {n: [TARGETS[n].make(rng) for _ in range(4)] for n in names}
    for n in names:  # warm-up (imports, Triton's first compile) is not a hang
        TARGETS[n].decode(pools[n][0])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = 0
    spent = dict.fromkeys(names, 0.0)
    for done in range(1, cases + 1):  # noqa: B007 (read after the loop: how many cases ran)
        # equal time per target rather than equal cases: interpreted Triton decoders are far slower
        name = min(names, key=spent.__getitem__)
        t = TARGETS[name]
        pool = pools[name]
        good = rng.choice(pool)
        payload, crc_valid = mutate(rng, good, rng.choice(pool))
        if not crc_valid and _crc_ok(payload):
            crc_valid = True  # e.g. a splice that rebuilt a whole valid payload: nothing to detect
        t0 = time.perf_counter()
        try:
            t.decode(payload)
            outcome = "ok" if crc_valid else "undetected"
        except FormatError:
            outcome = "format_error"
        except Exception as e:  # noqa: BLE001 - classifying every failure is the point
            outcome = "other_error"
            examples.setdefault(f"{name}:other_error", f"{type(e).__name__}: {e}"[:300])
        took = time.perf_counter() - t0
        spent[name] += took
        if took > hang_seconds:
            counts[f"{name}:hang"] += 1
        counts[f"{name}:{outcome}"] += 1
        if outcome == "undetected":
            examples.setdefault(f"{name}:undetected", payload[:64].hex())
        if deadline is not None and time.time() > deadline:
            break
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"cases": done, "counts": dict(counts), "examples": examples, "rss_growth_mb": grew_mb}


BAD = ("other_error", "undetected", "hang")


def summarize(results: list[dict], limit_mb: int, crashes: int) -> dict:
    total = Counter()
    for r in results:
        total.update(r["counts"])
    by_outcome = Counter()
    for k, v in total.items():
        by_outcome[k.rsplit(":", 1)[1]] += v
    over = sum(1 for r in results if r["rss_growth_mb"] > 2 * limit_mb + 256)
    return {
        "cases": sum(r["cases"] for r in results),
        "crashes": crashes,
        "hangs": by_outcome["hang"],
        "other_errors": by_outcome["other_error"],
        "undetected": by_outcome["undetected"],
        "over_limit_workers": over,
        "format_errors": by_outcome["format_error"],
        "decoded_ok": by_outcome["ok"],
        "per_target": dict(sorted(total.items())),
        "examples": {k: v for r in results for k, v in r["examples"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedcompress.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=100_000, help="total cases across targets")
    p.add_argument("--targets", default="all", help=f"comma list of: {','.join(sorted(TARGETS))}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    p.add_argument("--chunk", type=int, default=20_000, help="cases per worker process")
    p.add_argument("--limit-mb", type=int, default=64, help="decoded-size limit during the run")
    p.add_argument("--hang-seconds", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=None, help="stop after this wall time")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    names = sorted(TARGETS) if a.targets == "all" else a.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; valid: {sorted(TARGETS)}")
    if a.worker:
        deadline = time.time() + a.seconds if a.seconds else None
        print(json.dumps(run_cases(names, a.cases, a.seed, a.limit_mb, a.hang_seconds, deadline)))
        return 0
    t_end = time.time() + a.seconds if a.seconds else None
    jobs = [(i, min(a.chunk, a.cases - i * a.chunk)) for i in range((a.cases + a.chunk - 1) // a.chunk)]
    results, crashes, running = [], 0, []
    while jobs or running:
        while jobs and len(running) < a.workers:
            i, n = jobs.pop(0)
            left = None if t_end is None else max(1.0, t_end - time.time())
            cmd = [sys.executable, "-m", "fedcompress.fuzz", "--worker", "--cases", str(n), "--seed",
                   str(a.seed * 1_000_003 + i), "--targets", ",".join(names), "--limit-mb", str(a.limit_mb),
                   "--hang-seconds", str(a.hang_seconds)] + (["--seconds", str(left)] if left else [])
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if not torch.cuda.is_available():
                env.setdefault("TRITON_INTERPRET", "1")  # so Triton decoders can be attacked on CPU
            running.append((i, n, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)))
        i, n, proc = running.pop(0)
        try:
            out, err = proc.communicate(timeout=(n * 5 + 120) if t_end is None else (t_end - time.time() + 120))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results.append({"cases": 0, "counts": {"all:hang": 1}, "examples": {f"chunk{i}": "timeout"},
                            "rss_growth_mb": 0})
            continue
        if proc.returncode != 0:
            crashes += 1
            results.append({"cases": 0, "counts": {}, "examples": {f"crash{i}": err.decode()[-500:]},
                            "rss_growth_mb": 0})
        else:
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        if t_end is not None and time.time() > t_end:
            for _, _, pr in running:
                pr.wait()
                o, _ = pr.communicate()
                if pr.returncode == 0:
                    results.append(json.loads(o.decode().strip().splitlines()[-1]))
            running, jobs = [], []
    s = summarize(results, a.limit_mb, crashes)
    if a.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"cases {s['cases']}: crashes {s['crashes']}, hangs {s['hangs']}, other errors {s['other_errors']}, "
              f"undetected corruptions {s['undetected']}, workers over the memory limit {s['over_limit_workers']}; "
              f"FormatError {s['format_errors']}, decoded {s['decoded_ok']}")
        for k, v in s["examples"].items():
            print(f"  {k}: {v}")
    bad = s["crashes"] + s["hangs"] + s["other_errors"] + s["undetected"] + s["over_limit_workers"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
