"""The artifact store reads by sha256 only: regular files, size-limited, streamed, checksummed."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from loopline import artifacts
from loopline.artifacts import ArtifactError, ArtifactStore, read_artifact, sha256_hex

DATA = b"onnx-model-bytes" * 100


def stored(tmp_path: Path, max_bytes: int = 10_000) -> tuple[ArtifactStore, str, Path]:
    store = ArtifactStore(str(tmp_path / "store"), max_bytes=max_bytes)
    digest, uri = store.put(DATA)
    return store, digest, Path(uri.removeprefix("file://"))


def refused(rule: str, read: Any, *args: Any) -> ArtifactError:
    with pytest.raises(ArtifactError, match=f"rule: {rule}") as info:
        read(*args)
    assert info.value.rule == rule
    return info.value


def test_read_by_sha256_round_trip_and_uri_is_informational(tmp_path: Path) -> None:
    store, digest, path = stored(tmp_path)
    assert store.read(digest) == DATA
    assert store.uri_of(digest) == path.as_uri()
    path.write_bytes(DATA + b"tampered")
    refused("sha256_match", store.read, digest)
    refused("in_store", store.read, "cd" * 32)


@pytest.mark.parametrize("sha", ["../../etc/passwd", "AB" * 32, "ab" * 31, "ab" * 32 + "\n", ""])
def test_only_a_sha256_names_a_file(tmp_path: Path, sha: str) -> None:
    store, _, _ = stored(tmp_path)
    refused("sha256_format", store.read, sha)


def test_a_fifo_in_the_store_is_refused_without_blocking(tmp_path: Path) -> None:
    store, digest, path = stored(tmp_path)
    path.unlink()
    os.mkfifo(path)  # no writer: a blocking open() would wait forever
    error = refused("regular_file", store.read, digest)
    assert "a FIFO" in str(error)


def test_put_replaces_a_tampered_or_foreign_entry(tmp_path: Path) -> None:
    store, digest, path = stored(tmp_path)
    path.write_bytes(b"tampered")
    assert store.put(DATA) == (digest, path.as_uri()) and store.read(digest) == DATA
    path.unlink()
    os.mkfifo(path)
    store.put(DATA)
    assert path.is_file() and store.read(digest) == DATA


def test_a_symlink_in_the_store_is_refused_even_to_the_right_bytes(tmp_path: Path) -> None:
    store, digest, path = stored(tmp_path)
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(DATA)
    path.unlink()
    path.symlink_to(elsewhere)
    refused("regular_file", store.read, digest)


def test_size_limit_before_reading_and_at_put(tmp_path: Path) -> None:
    store, digest, _ = stored(tmp_path)
    small = ArtifactStore(store.root, max_bytes=len(DATA) - 1)
    error = refused("size_limit", small.read, digest)
    assert str(len(DATA)) in str(error)
    refused("size_limit", small.put, DATA)


def test_devices_and_fifos_behind_a_uri_are_refused(tmp_path: Path) -> None:
    refused("regular_file", read_artifact, "/dev/zero", "ab" * 32)  # would never end
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused("regular_file", read_artifact, fifo.as_uri(), "ab" * 32)
    refused("uri_scheme", read_artifact, "http://example.com/m.onnx", "ab" * 32)


class FakeBody:
    """A botocore StreamingBody stand-in that counts what was read."""

    def __init__(self, data: bytes) -> None:
        self._io = io.BytesIO(data)
        self.read_bytes = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        chunk = self._io.read(n)
        self.read_bytes += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


class FakeS3:
    """get_object/put_object over a dict; ``lengths`` can lie about ContentLength."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.lengths: dict[tuple[str, str], int] = {}
        self.bodies: list[FakeBody] = []

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:  # noqa: N803 - boto3's names
        self.objects[(Bucket, Key)] = Body

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        if (Bucket, Key) not in self.objects:
            error = Exception("NoSuchKey")
            error.response = {"Error": {"Code": "NoSuchKey"}}  # type: ignore[attr-defined]  # set by the code under test
            raise error
        data = self.objects[(Bucket, Key)]
        body = FakeBody(data)
        self.bodies.append(body)
        return {"ContentLength": self.lengths.get((Bucket, Key), len(data)), "Body": body}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> FakeS3:
    fake = FakeS3()
    monkeypatch.setattr(artifacts, "_s3_client", lambda: fake)
    return fake


def test_s3_store_streams_with_the_same_checks(s3: FakeS3) -> None:
    store = ArtifactStore("s3://bucket/models", max_bytes=len(DATA))
    digest, uri = store.put(DATA)
    assert uri == f"s3://bucket/models/{digest}.onnx" == store.uri_of(digest)
    assert store.read(digest) == DATA and s3.bodies[-1].closed
    refused("in_store", store.read, "cd" * 32)
    key = ("bucket", f"models/{digest}.onnx")
    s3.objects[key] = DATA + b"!"
    refused("size_limit", store.read, digest)
    assert s3.bodies[-1].read_bytes == 0, "an object over the limit was read"
    s3.lengths[key] = 10  # a ContentLength that lies: the stream is still cut at the limit
    refused("size_limit", store.read, digest)
    assert s3.bodies[-1].read_bytes <= len(DATA) + artifacts.CHUNK_BYTES
    s3.objects[key], s3.lengths[key] = b"x" * len(DATA), len(DATA)
    refused("sha256_match", store.read, digest)
    assert sha256_hex(DATA) == digest
