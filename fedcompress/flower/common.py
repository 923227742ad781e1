"""What the Mod and the Strategy agree on: record keys, the payload Array, the RoundContext.

Why the payload travels as an ``Array`` with its own ``stype`` inside the reply's ArrayRecord (and
not as a bytes value in a ConfigRecord):

- Flower ships every Array's data in chunks of at most 5 MB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``)
  and streams them; a ConfigRecord value travels inside one protobuf message, so a large payload
  (``none`` on a big model) would run into gRPC's message-size limit.
- The reply keeps exactly one ArrayRecord, the shape Flower's strategies, mods and
  ``arrays_size_mod``/``message_size_mod`` expect; those size mods then report the compressed bytes.
- The stype ``fedcompress.payload`` is not ``numpy.ndarray``: ``Array.numpy()`` refuses it with a
  TypeError, so a plain FedAvg server fails loudly instead of averaging payload bytes as uint8.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from ..api import RoundContext, get_compressor
from ..errors import FormatError

PAYLOAD_KEY = "fedcompress"  # the single Array inside the reply's ArrayRecord
PAYLOAD_STYPE = "fedcompress.payload"
SPEC_KEY = "fedcompress-spec"  # train ConfigRecord: the server's compressor spec (canonical)
SEED_KEY = "fedcompress-seed"  # train ConfigRecord: experiment seed for RoundContext
CLIENT_KEY = "fedcompress-client"  # reply MetricRecord: client id used in the RoundContext
PARTITION_KEY = "partition-id"  # node_config key giving the client id (flwr's simulation sets it)
# reply MetricRecord: the client's seconds in the Mod's own work (reading the received model, the
# update, compress, wrapping the payload) and in the wrapped ClientApp (call_next: local training)
ENCODE_KEY = "fedcompress-encode-seconds"
TRAIN_KEY = "fedcompress-train-seconds"
# the same two in CPU seconds of the client's process (time.process_time): the work without the
# waits for a core, which dominate a wall clock when several clients share a machine
ENCODE_CPU_KEY = "fedcompress-encode-cpu-seconds"
TRAIN_CPU_KEY = "fedcompress-train-cpu-seconds"


def canonical_spec(spec: str) -> str:
    """The spec string that ``get_compressor`` rebuilds (``"sz:rel=0.01"`` == ``"sz:rel=1e-2"``)."""
    return get_compressor(spec).spec


def payload_array(payload: bytes) -> Array:
    """Wrap fedcompress payload bytes as a Flower Array (dtype uint8, 1-D, stype fedcompress.payload)."""
    return Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=bytes(payload))


def is_payload_record(record: ArrayRecord) -> bool:
    """True if ``record`` is a compressed reply (one Array ``fedcompress`` of stype fedcompress.payload)."""
    return list(record.keys()) == [PAYLOAD_KEY] and record[PAYLOAD_KEY].stype == PAYLOAD_STYPE


def payload_bytes(record: ArrayRecord) -> bytes:
    """The payload inside a compressed reply's ArrayRecord; FormatError if it is not one."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [PAYLOAD_KEY]:
        keys = list(record.keys()) if isinstance(record, ArrayRecord) else type(record).__name__
        raise FormatError(f"reply ArrayRecord must hold exactly one Array {PAYLOAD_KEY!r}, got {keys}")
    arr = record[PAYLOAD_KEY]
    if arr.stype != PAYLOAD_STYPE:
        raise FormatError(f"reply Array has stype {arr.stype!r}, expected {PAYLOAD_STYPE!r}")
    if not isinstance(arr.data, (bytes, bytearray, memoryview)):
        raise FormatError(f"reply Array data is {type(arr.data).__name__}, expected bytes")
    return bytes(arr.data)


def state_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord of numpy Arrays as a torch state dict (copies, writable, in record order)."""
    # Array.numpy() is np.load of the bytes: already a fresh writable array, so no second copy.
    out = {}
    for k, v in record.items():
        a = v.numpy()
        out[k] = torch.from_numpy(a if a.flags.writeable else a.copy())
    return out


def array_view(arr: Array) -> np.ndarray:
    """A read-only numpy view of a numpy-stype Array's bytes (no copy), else ``arr.numpy()``.

    The Mod reads the received global model and the ClientApp's local weights only to subtract
    them: parsing each .npy header and viewing the data in place spares ``state_from_record``'s
    np.load copy of both records (the copy it made after np.load went too): on the FedAvg CNN
    (582K values) 0.22 instead of 0.76 ms of thread CPU per reply, against ~2 ms for sz:rel=1e-2's
    ``compress`` (``python bench/fl_overhead.py --breakdown``, 2026-11-29 21:51 UTC, shared
    machine, load average 2.8).
    Anything unusual (another .npy version, Fortran order, object dtype, short data) takes
    ``arr.numpy()``'s path, which raises what np.load raises.
    """
    data = arr.data
    if arr.stype == "numpy.ndarray" and isinstance(data, bytes):
        try:
            f = io.BytesIO(data)
            major, _ = np.lib.format.read_magic(f)
            read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
            if read is not None:
                shape, fortran, dtype = read(f)
                n = math.prod(shape)
                if not fortran and not dtype.hasobject and f.tell() + n * dtype.itemsize == len(data):
                    return np.frombuffer(data, dtype=dtype, count=n, offset=f.tell()).reshape(shape)
        except ValueError:
            pass
    return arr.numpy()


def update_from_records(local: ArrayRecord, global_views: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``local − global`` per tensor as ``api.state_delta`` computes it (each tensor's own dtype;
    bool: xor), in one pass over views of both records' bytes; the result tensors are writable.
    ValueError if the names or shapes differ."""
    if list(local) != list(global_views):
        raise ValueError("the reply's arrays do not match the received model (names)")
    views = {k: array_view(local[k]) for k in global_views}
    if any(views[k].shape != g.shape for k, g in global_views.items()):
        raise ValueError("the reply's arrays do not match the received model (shapes)")
    out = {}
    for k, g in global_views.items():
        v = views[k]
        if v.dtype != g.dtype:  # a ClientApp replying in another dtype: torch's type promotion
            out[k] = torch.from_numpy(v.copy()) - torch.from_numpy(g.copy())
            continue
        res = np.empty_like(v)
        if v.dtype == np.bool_:
            np.logical_xor(v, g, out=res)
        else:
            np.subtract(v, g, out=res)
        out[k] = torch.from_numpy(res)
    return out


def round_context(server_round: int, client: int, seed: int) -> RoundContext:
    """The RoundContext both sides use to (de)compress: what random choices (masks) depend on."""
    return RoundContext(round=int(server_round), client=int(client), seed=int(seed))
