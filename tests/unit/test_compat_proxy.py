"""The compatibility proxy's rewrite of ApiVersions responses."""

from __future__ import annotations

import struct

from loopline.compat_proxy import _uvarint, strip_default_tags


def api_versions_body(tags: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack(">ih", 7, 0) + _uvarint(3)  # correlation id, no error, 2 api keys
    body += struct.pack(">hhh", 0, 0, 9) + b"\x00" + struct.pack(">hhh", 18, 0, 3) + b"\x00"
    body += struct.pack(">i", 0) + _uvarint(len(tags))
    for tag, value in tags:
        body += _uvarint(tag) + _uvarint(len(value)) + value
    return body


def old_librdkafka_parses(body: bytes) -> bool:
    """librdkafka < 2.2 skip_tags: skips (length - 1)
    bytes per tag (confluentinc/librdkafka#4278)."""
    pos = 6
    count, pos = body[pos] - 1, pos + 1
    pos += count * 7
    pos += 4
    tags, pos = body[pos], pos + 1
    for _ in range(tags):
        if pos + 2 > len(body):
            return False  # "Read underflow"
        size, pos = body[pos + 1], pos + 2
        if size > 1:
            pos += size - 1
    return pos == len(body)


TANSU_TAGS = [(0, b"\x01"), (1, b"\xff" * 8), (2, b"\x01"), (3, b"\x00")]


def test_default_tags_are_dropped_so_old_clients_parse() -> None:
    original = api_versions_body(TANSU_TAGS)
    assert not old_librdkafka_parses(original)
    fixed = strip_default_tags(original)
    assert fixed == api_versions_body([])
    assert old_librdkafka_parses(fixed)


def test_non_default_tags_are_kept() -> None:
    epoch = (1, struct.pack(">q", 5))
    assert strip_default_tags(api_versions_body([epoch,
                                                 (3, b"\x00")])) == api_versions_body([epoch])


def test_unexpected_shapes_pass_unchanged() -> None:
    error = struct.pack(">ih", 7, 35) + b"\x00\x00\x00\x00"
    assert strip_default_tags(error) == error
    truncated = api_versions_body(TANSU_TAGS)[:-3]
    assert strip_default_tags(truncated) == truncated
