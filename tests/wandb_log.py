"""Read a W&B offline `.wandb` file back, to check what was logged.

The file is a LevelDB-style log (what wandb's own datastore wrote until it moved to its Go
core): a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each
with a 7-byte header (crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and a
payload; joined payloads are serialized `wandb_internal_pb2.Record` messages.
"""

import struct

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B log file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # too small for a chunk header: padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def key(item) -> str:
    """An item's name: W&B fills either `key` or the path `nested_key`."""
    return item.key or "/".join(item.nested_key)
