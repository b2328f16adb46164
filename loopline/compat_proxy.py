"""A pass-through TCP proxy in front of the embedded broker that keeps older Kafka clients working.

Tansu writes every tagged field of its ApiVersions v3+ response, default values included.
librdkafka before 2.2 (Debian 12's kcat links 2.0.2) mis-skips tagged fields (confluentinc/
librdkafka#4278) and then fails every connection with "Read underflow". A tagged field that is
absent means its default (KIP-482), so dropping the default-valued ones is lossless; the proxy
does that to the first response of each connection and copies every other byte unchanged.

Run as its own process: ``python -m loopline.compat_proxy LISTEN_PORT UPSTREAM_PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import sys

API_VERSIONS = 18
_CHUNK = 1 << 16
# ApiVersionsResponse top-level tags and the encoding of their default values.
_DEFAULT_TAGS = {
    0: b"\x01",  # SupportedFeatures: empty compact array
    1: b"\xff" * 8,  # FinalizedFeaturesEpoch: -1
    2: b"\x01",  # FinalizedFeatures: empty compact array
    3: b"\x00",  # ZkMigrationReady: false
}


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        if value < 0x80:
            out.append(value)
            return bytes(out)
        out.append((value & 0x7F) | 0x80)
        value >>= 7


def strip_default_tags(body: bytes) -> bytes:
    """Rewrite an ApiVersions v3+ response body (after the size) without default-valued tags.

    Returns ``body`` unchanged when it is not in the expected shape (an error answer, say).
    """
    try:
        pos = 4 + 2  # correlation id, error code
        if struct.unpack_from(">h", body, 4)[0] != 0:
            return body
        count, pos = _read_uvarint(body, pos)
        for _ in range(max(count - 1, 0)):
            pos += 6  # api key, min version, max version
            tags, pos = _read_uvarint(body, pos)
            for _ in range(tags):
                _, pos = _read_uvarint(body, pos)
                size, pos = _read_uvarint(body, pos)
                pos += size
        pos += 4  # throttle time
        head = body[:pos]
        tags, pos = _read_uvarint(body, pos)
        kept = []
        for _ in range(tags):
            start = pos
            tag, pos = _read_uvarint(body, pos)
            size, pos = _read_uvarint(body, pos)
            value = body[pos:pos + size]
            pos += size
            if _DEFAULT_TAGS.get(tag) != value:
                kept.append(body[start:pos])
        if pos != len(body):
            return body
        return head + _uvarint(len(kept)) + b"".join(kept)
    except (IndexError, struct.error):
        return body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = await reader.readexactly(4)
    return size + await reader.readexactly(int.from_bytes(size, "big"))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve_connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                            host: str, upstream_port: int) -> None:
    try:
        upstream_r, upstream_w = await asyncio.open_connection(host, upstream_port)
    except OSError:
        client_w.close()
        return
    try:
        request = await _read_frame(client_r)
        api_key, api_version = struct.unpack_from(">hh", request, 4)
        upstream_w.write(request)
        to_broker = asyncio.create_task(_pipe(client_r, upstream_w))
        if api_key == API_VERSIONS and api_version >= 3:
            response = await _read_frame(upstream_r)
            body = strip_default_tags(response[4:])
            client_w.write(len(body).to_bytes(4, "big") + body)
        await asyncio.gather(to_broker, _pipe(upstream_r, client_w))
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        for w in (client_w, upstream_w):
            with contextlib.suppress(Exception):
                w.close()


async def serve(listen_port: int, upstream_port: int, host: str = "127.0.0.1") -> None:
    """Proxy ``host:listen_port`` to ``host:upstream_port`` until SIGTERM/SIGINT."""
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, host, upstream_port), host, listen_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    """Entry point of the proxy process."""
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
