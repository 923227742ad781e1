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
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


def round_context(server_round: int, client: int, seed: int) -> RoundContext:
    """The RoundContext both sides use to (de)compress: what random choices (masks) depend on."""
    return RoundContext(round=int(server_round), client=int(client), seed=int(seed))
