"""Reading what a W&B run wrote offline (``<run>/wandb/offline-run-*/run-<id>.wandb``), for tests.

W&B >= 0.18 has no Python reader of its own: the file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks
of records, each ``crc32 (4) | length (2) | type (1) | data``; a record may be split over blocks as FIRST, MIDDLE,
LAST parts) whose records are W&B's protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """The protobuf records of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        if kind == 0:  # zero padding up to the end of the block
            pos += left - HEADER
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            records.append(parts + chunk)
    return [wandb_internal_pb2.Record.FromString(raw) for raw in records]


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row W&B recorded for the run(s) in ``<run_dir>/wandb``: ``{key: value}`` (JSON-decoded)."""
    rows = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "history":
                row = {}
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return rows
