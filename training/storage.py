"""Local directories and S3 prefixes behind one small interface (checkpoints and output)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

S3_URI = re.compile(r"s3://(?P<bucket>[^/]+)/?(?P<prefix>.*)")


class StorageError(ValueError):
    """A location that cannot be used; the message names it and what to change."""


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/") (prefix "" for the bucket root)."""
    m = S3_URI.fullmatch(uri)
    if not m or not m["bucket"]:
        raise StorageError(f"{uri!r} is not an S3 URI like s3://bucket/prefix")
    prefix = m["prefix"]
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return m["bucket"], prefix


def s3_client() -> Any:
    """A boto3 S3 client; credentials and endpoint come from the usual chain (Pod Identity,
    the SageMaker execution role, AWS_ENDPOINT_URL_S3 for tests)."""
    import boto3  # imported here: local-only runs do not need boto3

    return boto3.client("s3")


class Store(Protocol):
    """A flat namespace of objects under one root ("dir/file" names use '/')."""

    def describe(self, name: str = "") -> str: ...
    def read_bytes(self, name: str) -> bytes: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def put_file(self, local: Path, name: str) -> None: ...
    def get_file(self, name: str, local: Path) -> None: ...
    def exists(self, name: str) -> bool: ...
    def list_dirs(self) -> list[str]: ...
    def list_files(self, name: str) -> list[str]: ...
    def delete_dir(self, name: str) -> None: ...


class LocalStore:
    """A directory; every write lands under a temporary name and is renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)  # atomic on POSIX: readers see the old file or the new one

    def put_file(self, local: Path, name: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)

    def get_file(self, name: str, local: Path) -> None:
        shutil.copyfile(self.root / name, local)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def list_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def list_files(self, name: str) -> list[str]:
        """Every file under directory `name`, relative to it."""
        top = self.root / name
        return sorted(p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file())

    def delete_dir(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


class S3Store:
    """An S3 prefix. Single PUTs are atomic, so a reader sees whole objects or none."""

    def __init__(self, uri: str, client: Any | None = None) -> None:
        self.bucket, self.prefix = parse_s3(uri)
        self.client = client or s3_client()

    def describe(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def read_bytes(self, name: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
        return bytes(body.read())

    def write_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def put_file(self, local: Path, name: str) -> None:
        # upload_file switches to multipart for large files; the object appears only when whole.
        self.client.upload_file(str(local), self.bucket, self.prefix + name)

    def get_file(self, name: str, local: Path) -> None:
        self.client.download_file(self.bucket, self.prefix + name, str(local))

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list_dirs(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
        )
        return sorted(
            p["Prefix"][len(self.prefix) :].rstrip("/")
            for page in pages
            for p in page.get("CommonPrefixes", [])
        )

    def list_files(self, name: str) -> list[str]:
        """Every object under `name/`, relative to it."""
        top = f"{self.prefix}{name}/" if name else self.prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=top
        )
        return sorted(
            o["Key"][len(top) :]
            for page in pages
            for o in page.get("Contents", [])
            if not o["Key"].endswith("/")
        )

    def delete_dir(self, name: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}{name}/"
        )
        keys = [{"Key": o["Key"]} for page in pages for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})


def open_store(location: str) -> Store:
    """A Store for an S3 URI or a local path."""
    if is_s3(location):
        return S3Store(location)
    if "://" in location:
        raise StorageError(f"{location!r}: only s3:// URIs and local paths are supported")
    return LocalStore(location)


def download_dir(store: Store, name: str, local: Path) -> Path:
    """Copies every file under `name` of a store into the local directory `local`."""
    for rel in store.list_files(name):
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(f"{name}/{rel}" if name else rel, path)
    return local
