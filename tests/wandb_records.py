"""Read back what an offline W&B run wrote, from its `.wandb` file, so tests check the real output.

The file is a LevelDB-style log (32 KiB blocks, 7-byte record headers) after a 7-byte W&B header, each
record a `wandb_internal_pb2.Record`. wandb no longer ships a Python reader for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_FULL, _FIRST, _LAST = 1, 2, 4


def records(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # block trailer
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def history_and_summary(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every history row, and the final summary, of the offline run in ``run_dir``."""
    (path,) = run_dir.glob("run-*.wandb")
    history, summary = [], {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    return history, summary
