"""The artifact store: ONNX files addressed by their sha256, verified on every read.

Default: a local folder, ``$LOOPLINE_HOME/artifacts/<sha256>.onnx``, recorded in the registry
as a ``file://`` URI. With ``LOOPLINE_ARTIFACT_URI=s3://bucket/prefix`` artifacts go to any
S3-compatible store through boto3 (an optional dependency; endpoint and credentials come from
boto3's usual environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import Field

from loopline.errors import LooplineError
from loopline.settings import LooplineSettings


class ArtifactError(LooplineError):
    """An artifact is missing, unreadable, or its content does not match its sha256."""


class ArtifactSettings(LooplineSettings):
    """Settings of commands that read or write artifacts."""

    artifact_uri: str | None = Field(
        None, description="Where artifacts are stored: a folder path, file:// or s3://bucket/prefix "
        "URI (unset: $LOOPLINE_HOME/artifacts).")


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def _s3_client() -> Any:
    try:
        import boto3  # noqa: PLC0415 - optional dependency, only for s3:// stores
    except ImportError as e:
        raise ArtifactError("s3:// artifact stores need boto3: pip install boto3") from e
    return boto3.client("s3")


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ArtifactError(f"artifact URI {uri!r} names no bucket (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


class ArtifactStore:
    """Put and get artifacts by sha256 under one root (a folder or an s3:// prefix)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.scheme = urlparse(self.root).scheme if "://" in self.root else "file"
        if self.scheme not in ("file", "s3"):
            raise ArtifactError(f"unsupported artifact store {root!r}: use a folder, file:// or s3://")

    @classmethod
    def from_settings(cls, settings: LooplineSettings, artifact_uri: str | None = None) -> ArtifactStore:
        """The store named by ``artifact_uri`` (or the settings' ``artifact_uri``), else the local default."""
        uri = artifact_uri or getattr(settings, "artifact_uri", None)
        if uri:
            return cls(uri)
        return cls(str((settings.home / "artifacts").resolve()))

    def _folder(self) -> Path:
        if self.root.startswith("file://"):
            return Path(unquote(urlparse(self.root).path))
        return Path(self.root)

    def put(self, data: bytes) -> tuple[str, str]:
        """Store ``data`` (idempotent); return its sha256 and URI."""
        digest = sha256_hex(data)
        name = f"{digest}.onnx"
        if self.scheme == "s3":
            bucket, prefix = _split_s3(self.root)
            key = f"{prefix}/{name}" if prefix else name
            try:
                _s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            except ArtifactError:
                raise
            except Exception as e:  # noqa: BLE001 - botocore raises many kinds
                raise ArtifactError(f"could not write s3://{bucket}/{key}: {e}") from e
            return digest, f"s3://{bucket}/{key}"
        folder = self._folder().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if not path.exists():
            # Write then rename, so a reader never sees a half-written artifact.
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return digest, path.as_uri()


def read_artifact(uri: str, sha256: str) -> bytes:
    """Read the artifact at ``uri`` and check its sha256; raise :class:`ArtifactError` otherwise."""
    parsed = urlparse(uri)
    try:
        if parsed.scheme == "s3":
            bucket, key = _split_s3(uri)
            data = _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        elif parsed.scheme in ("file", ""):
            data = Path(unquote(parsed.path) if parsed.scheme else uri).read_bytes()
        else:
            raise ArtifactError(f"unsupported artifact URI {uri!r}")
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, botocore errors
        raise ArtifactError(f"could not read artifact {uri}: {type(e).__name__}: {e}") from e
    actual = sha256_hex(data)
    if actual != sha256:
        raise ArtifactError(f"artifact {uri} has sha256 {actual[:16]}..., the registry expects "
                            f"{sha256[:16]}... (rule: sha256_match)")
    return data
