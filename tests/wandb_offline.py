"""Read the history rows of an offline wandb run (``run-*.wandb``) without network or wandb's service.

The file is wandb's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-log
framing -- 32 KiB blocks of records (crc32c: 4 bytes, length: 2, type: 1 = full, 2 = first,
3 = middle, 4 = last) -- whose payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = 7


def _payloads(raw: bytes) -> list[bytes]:
    assert raw[:4] == b":W&B", "not a wandb transaction log"
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer too short for a record header: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + _HEADER])
        pos += _HEADER
        if kind == 0:  # zero padding to the end of the block
            pos += left - _HEADER
            continue
        data, pos = raw[pos:pos + length], pos + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        else:
            out.append(pending + data)
    return out


def history_rows(run_dir: Path) -> list[dict[str, object]]:
    """Every history row logged to the offline wandb run(s) under ``run_dir/wandb``."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for data in _payloads(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
