"""The artifact store: ONNX files addressed by their sha256, verified on every read.

Default: a local folder, ``$LOOPLINE_HOME/artifacts/<sha256>.onnx``, recorded in the registry
as a ``file://`` URI. With ``LOOPLINE_ARTIFACT_URI=s3://bucket/prefix`` artifacts go to any
S3-compatible store through boto3 (an optional dependency; endpoint and credentials come from
boto3's usual environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

Reading is defensive because the registry is untrusted input (any Kafka client can write it):
:meth:`ArtifactStore.read` takes only a sha256 and reads ``<root>/<sha256>.onnx`` of the
configured store, never a path or URL from a record. Only regular files are read (opened with
``O_NOFOLLOW | O_NONBLOCK``, so neither a symlink nor a FIFO can redirect or block the read),
at most ``max_bytes`` of them, streamed in chunks through the sha256 before anything parses them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from loopline.errors import ArtifactError
from loopline.settings import ARTIFACT_MAX_BYTES, LooplineSettings

#: Largest artifact read or stored unless configured otherwise (``LOOPLINE_ARTIFACT_MAX_BYTES``).
DEFAULT_MAX_BYTES = ARTIFACT_MAX_BYTES
CHUNK_BYTES = 1024 * 1024
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def check_sha256(value: object) -> str:
    """Return ``value`` if it is 64 lowercase hex digits, else raise :class:`ArtifactError`."""
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise ArtifactError(f"sha256 {_short(repr(value))} is not 64 lowercase hex digits "
                            "(rule: sha256_format)", "sha256_format")
    return value


def _s3_client() -> Any:
    try:
        import boto3  # optional dependency, only for s3:// stores
    except ImportError as e:
        raise ArtifactError("s3:// artifact stores need boto3: pip install boto3") from e
    return boto3.client("s3")


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ArtifactError(f"artifact URI {uri!r} names no bucket (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


def _too_large(where: str, size: int, max_bytes: int) -> ArtifactError:
    return ArtifactError(f"artifact {where} is {size} bytes, more than the limit of {max_bytes} "
                         "(LOOPLINE_ARTIFACT_MAX_BYTES) (rule: size_limit)", "size_limit")


def _checked(chunks: Iterator[bytes], where: str, sha256: str, max_bytes: int) -> bytes:
    """Join ``chunks`` while hashing them; refuse past ``max_bytes`` or on a sha256 mismatch."""
    digest = hashlib.sha256()
    parts: list[bytes] = []
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:  # the size checked before reading can grow while we read
            raise _too_large(where, total, max_bytes)
        digest.update(chunk)
        parts.append(chunk)
    actual = digest.hexdigest()
    if actual != sha256:
        raise ArtifactError(f"artifact {where} has sha256 {actual[:16]}..., the registry expects "
                            f"{sha256[:16]}... (rule: sha256_match)", "sha256_match")
    return b"".join(parts)


def _read_local(path: Path, sha256: str, max_bytes: int,
                missing: Callable[[], ArtifactError]) -> bytes:
    """Read the regular file at ``path`` (no symlink, FIFO or device), size-limited, checksummed."""
    where = str(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise missing() from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"artifact {where} is a symbolic link; only regular files are read "
                                "(rule: regular_file)", "regular_file") from None
        raise ArtifactError(f"could not read artifact {where}: {e.strerror} "
                            "(rule: readable)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            mode = st.st_mode
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise ArtifactError(f"artifact {where} is {kind}; only regular files are read "
                                "(rule: regular_file)", "regular_file")
        if st.st_size > max_bytes:
            raise _too_large(where, st.st_size, max_bytes)

        def chunks() -> Iterator[bytes]:
            while chunk := os.read(fd, CHUNK_BYTES):
                yield chunk

        try:
            return _checked(chunks(), where, sha256, max_bytes)
        except OSError as e:
            raise ArtifactError(f"could not read artifact {where}: {e.strerror} "
                                "(rule: readable)") from e
    finally:
        os.close(fd)


def _read_s3(bucket: str, key: str, sha256: str, max_bytes: int) -> bytes:
    """Stream ``s3://bucket/key`` through the sha256, refusing objects over ``max_bytes``."""
    where = f"s3://{bucket}/{key}"
    client = _s3_client()
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except Exception as e:  # botocore raises many kinds
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise ArtifactError(f"artifact {sha256[:16]}... is not in the artifact store "
                                f"({where} does not exist) (rule: in_store)", "in_store") from e
        raise ArtifactError(f"could not read artifact {where}: {type(e).__name__}: {e} "
                            "(rule: readable)") from e
    body = obj["Body"]
    try:
        size = obj.get("ContentLength")
        if not isinstance(size, int):
            raise ArtifactError(f"artifact {where} has no ContentLength, so its size cannot be "
                                "checked before reading (rule: size_limit)", "size_limit")
        if size > max_bytes:
            raise _too_large(where, size, max_bytes)

        def chunks() -> Iterator[bytes]:
            while chunk := body.read(CHUNK_BYTES):
                yield chunk

        try:
            return _checked(chunks(), where, sha256, max_bytes)
        except ArtifactError:
            raise
        except Exception as e:  # botocore streaming errors
            raise ArtifactError(f"could not read artifact {where}: {type(e).__name__}: {e} "
                                "(rule: readable)") from e
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


class ArtifactStore:
    """Put and get artifacts by sha256 under one root (a folder or an s3:// prefix)."""

    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root.rstrip("/")
        self.max_bytes = max_bytes
        self.scheme = urlparse(self.root).scheme if "://" in self.root else "file"
        if self.scheme not in ("file", "s3"):
            raise ArtifactError(f"unsupported artifact store {root!r}: use a folder, file:// "
                                "or s3://")

    @classmethod
    def from_settings(cls, settings: LooplineSettings,
                      artifact_uri: str | None = None) -> ArtifactStore:
        """The store named by ``artifact_uri`` or the settings, else $LOOPLINE_HOME/artifacts."""
        uri = artifact_uri or getattr(settings, "artifact_uri", None)
        max_bytes = getattr(settings, "artifact_max_bytes", DEFAULT_MAX_BYTES)
        if uri:
            return cls(uri, max_bytes)
        return cls(str((settings.home / "artifacts").resolve()), max_bytes)

    def _folder(self) -> Path:
        if self.root.startswith("file://"):
            return Path(unquote(urlparse(self.root).path))
        return Path(self.root)

    def _s3_key(self, name: str) -> tuple[str, str]:
        bucket, prefix = _split_s3(self.root)
        return bucket, f"{prefix}/{name}" if prefix else name

    def uri_of(self, sha256: str) -> str:
        """The URI this store records for an artifact (informational: reads go by sha256)."""
        name = f"{check_sha256(sha256)}.onnx"
        if self.scheme == "s3":
            bucket, key = self._s3_key(name)
            return f"s3://{bucket}/{key}"
        return (self._folder().resolve() / name).as_uri()

    def put(self, data: bytes) -> tuple[str, str]:
        """Store ``data`` (idempotent); return its sha256 and URI."""
        if len(data) > self.max_bytes:
            raise _too_large(f"of {len(data)} bytes", len(data), self.max_bytes)
        digest = sha256_hex(data)
        name = f"{digest}.onnx"
        if self.scheme == "s3":
            bucket, key = self._s3_key(name)
            try:
                _s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            except ArtifactError:
                raise
            except Exception as e:  # botocore raises many kinds
                raise ArtifactError(f"could not write s3://{bucket}/{key}: {e}") from e
            return digest, f"s3://{bucket}/{key}"
        folder = self._folder().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if os.path.lexists(path):
            try:
                self.read(digest)
                return digest, path.as_uri()
            except ArtifactError:
                pass  # a tampered file, a FIFO or a symlink took its name: replaced below
        # Write then rename, so a reader never sees a half-written artifact (and rename replaces
        # whatever entry had the name, without opening it).
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return digest, path.as_uri()

    def read(self, sha256: str) -> bytes:
        """The artifact with this sha256 from this store, verified; raise :class:`ArtifactError`."""
        name = f"{check_sha256(sha256)}.onnx"
        if self.scheme == "s3":
            bucket, key = self._s3_key(name)
            return _read_s3(bucket, key, sha256, self.max_bytes)
        path = self._folder() / name
        return _read_local(path, sha256, self.max_bytes, lambda: ArtifactError(
            f"artifact {sha256[:16]}... is not in the artifact store {self.root} (rule: in_store)",
            "in_store"))


def read_artifact(uri: str, sha256: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read the artifact at ``uri`` with the store's checks (regular file, size limit, sha256).

    Prefer :meth:`ArtifactStore.read`: this follows a URI, which a registry record may have set.
    """
    check_sha256(sha256)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        bucket, key = _split_s3(uri)
        return _read_s3(bucket, key, sha256, max_bytes)
    if parsed.scheme not in ("file", ""):
        raise ArtifactError(f"unsupported artifact URI {_short(uri)!r} (rule: uri_scheme)",
                            "uri_scheme")
    path = Path(unquote(parsed.path) if parsed.scheme else uri)
    return _read_local(path, sha256, max_bytes, lambda: ArtifactError(
        f"could not read artifact {_short(uri)}: no such file (rule: readable)"))
