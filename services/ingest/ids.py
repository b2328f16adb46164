"""Event ids of raw messages that carry none: uuid5 of where they were read, computed fast."""

from __future__ import annotations

import hashlib

import numpy as np

_VARIANT = {c: "89ab"[int(c, 16) & 0x3] for c in "0123456789abcdef"}
_sha1 = hashlib.sha1


def fast_uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects."""
    return uuid5_of(namespace + name.encode())


def uuid5_of(data: bytes) -> str:
    """The uuid5 whose namespace's 16 bytes and UTF-8 name are ``data``, as a string."""
    x = _sha1(data).hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


class DerivedIds(dict[int, bytes]):
    """What the ids of one topic's messages hash, by partition: namespace, ``topic:partition:``.

    ``uuid5_of(ids[partition] + str(offset).encode())`` is ``fast_uuid5(namespace,
    f"{topic}:{partition}:{offset}")``, with the common part built once per partition.
    """

    def __init__(self, namespace: bytes, topic: str) -> None:
        super().__init__()
        self.head = namespace + f"{topic}:".encode()

    def __missing__(self, partition: int) -> bytes:
        prefix = self[partition] = self.head + f"{partition}:".encode()
        return prefix


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_DASH = ord("-")


def uuid5_many(digests: list[bytes]) -> list[bytes]:
    """The uuid5 strings, as ASCII bytes, of SHA-1 digests (``sha1(namespace + name).digest()``).

    Formatting is most of the cost of an id in Python (slices, a look-up, an f-string): for a
    batch, numpy sets the version and variant bits and writes the hex digits of all at once.
    """
    n = len(digests)
    if not n:
        return []
    raw = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 20)[:, :16].copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # variant RFC 4122
    digits = np.empty((n, 32), dtype=np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 0x0F]
    text = np.full((n, 36), _DASH, dtype=np.uint8)  # 8-4-4-4-12 digits, dashes between
    text[:, 0:8], text[:, 9:13], text[:, 14:18] = digits[:, 0:8], digits[:, 8:12], digits[:, 12:16]
    text[:, 19:23], text[:, 24:36] = digits[:, 16:20], digits[:, 20:32]
    return text.view("S36").ravel().tolist()
