"""Event ids of raw messages that carry none: uuid5 of where they were read, computed fast."""

from __future__ import annotations

import hashlib

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
