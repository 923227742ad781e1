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

import math
import re

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

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
# the node's Context.state: the compressor's client state (Compressor.client_state) between rounds
STATE_KEY = "fedcompress-client-state"


def restore_client_state(comp, client: int, state: RecordDict) -> None:
    """Give ``comp`` what it kept for ``client`` last round, from the node's ``Context.state``:
    Flower builds a new ClientApp (and compressor) for every message, so error feedback's residual
    and the ``sz:ratio`` search's start live there between rounds."""
    rec = state.array_records.get(STATE_KEY)
    if rec is not None:
        comp.load_client_state(client, state_from_record(rec))


def keep_client_state(comp, client: int, state: RecordDict) -> None:
    """Store ``comp.client_state(client)`` in the node's ``Context.state`` (after compressing)."""
    kept = comp.client_state(client)
    if kept or STATE_KEY in state.array_records:
        state[STATE_KEY] = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in kept.items()})


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


# The header numpy's writer produces for a C-order array (np.save, and so Flower's Array(ndarray)):
# a dict literal in a fixed order, then space padding and a newline. Only headers in exactly this
# form take array_view's fast path; any other (valid or not) goes to np.load.
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|][a-z]\d{1,2})', 'fortran_order': False, 'shape': \(((?:\d{1,19}, )*(?:\d{1,19},?)?)\), \} *\n"
)


def array_view(arr: Array) -> np.ndarray:
    """A read-only numpy view of a numpy-stype Array's bytes (no copy), else ``arr.numpy()``.

    The Mod reads the received global model and the ClientApp's local weights only to subtract
    them: viewing the data in place spares ``state_from_record``'s np.load copy of both records.
    The .npy header is matched against the one form numpy writes (``_NPY_HEADER``) instead of
    np.lib.format's reader, whose ``ast.literal_eval`` of the header cost ~15 us per tensor: on the
    FedAvg CNN's 8 tensors 0.12 ms per record warm, and ~0.3-0.7 ms in a Flower client right after
    local training, where the Mod's whole work is ~3 ms (``python bench/fl_overhead.py``).
    Anything else (another .npy version or header layout, Fortran order, a size that does not match
    the data) takes ``arr.numpy()``'s path, which raises what np.load raises.
    """
    data = arr.data
    if arr.stype == "numpy.ndarray" and isinstance(data, bytes) and data[:8] == b"\x93NUMPY\x01\x00":
        start = 10 + int.from_bytes(data[8:10], "little")
        m = _NPY_HEADER.fullmatch(data, 10, start)
        if m is not None:
            try:
                dtype = np.dtype(m[1].decode())
            except TypeError:  # a well-formed descr numpy does not know: np.load says why
                return arr.numpy()
            shape = tuple(int(d) for d in m[2].split(b",") if d.strip())
            n = math.prod(shape)
            if not dtype.hasobject and start + n * dtype.itemsize == len(data):
                return np.frombuffer(data, dtype=dtype, count=n, offset=start).reshape(shape)
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
