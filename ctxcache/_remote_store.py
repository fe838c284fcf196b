"""Where a remote tier's objects live: S3-compatible storage through boto3 (one attempt, short timeouts)
or any fsspec URL, behind one small interface (get, stream, put, exists, children, names). Names are
relative (``v1/<key>/record.json``); each backend maps them to its objects. What the objects mean, and
whether to trust them, is ``tiers/remote.py``'s business.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import IO, Any, Protocol


class Settings(Protocol):
    """What a backend reads from its tier."""

    url: str
    endpoint_url: str | None
    timeout: float
    anonymous: bool
    region: str | None
    storage_options: dict[str, Any]


class RemoteUnavailable(ImportError):
    """The client library for this URL (boto3 for s3://, fsspec otherwise) is not installed."""


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise RemoteUnavailable(
            "the remote tier needs boto3 for s3:// URLs: pip install 'ctxcache[remote]'"
        ) from None
    return boto3


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``."""
    if not url.startswith("s3://"):
        raise ValueError(f"an S3 URL looks like s3://bucket/prefix, not {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


class S3Store:
    """boto3, with one attempt and short timeouts."""

    def __init__(self, tier: Settings, client: Any) -> None:
        self.tier = tier
        self.bucket, self.prefix = parse_url(tier.url)
        self._client = client
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                boto3 = _boto3()
                from botocore.config import Config

                kw: dict[str, Any] = {}
                if self.tier.anonymous:
                    from botocore import UNSIGNED

                    kw["signature_version"] = UNSIGNED
                config = Config(
                    connect_timeout=self.tier.timeout,
                    read_timeout=self.tier.timeout,
                    # One attempt: the fallback (a local compile) is always there, and boto3's default
                    # retries with backoff would turn a dead server into many seconds of waiting.
                    # (botocore's max_attempts counts retries only; total_max_attempts counts all.)
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    **kw,
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.tier.endpoint_url, config=config, region_name=self.tier.region or "us-east-1"
                )
            return self._client

    def _key(self, name: str) -> str:
        return self.prefix + name

    @staticmethod
    def _missing(e: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")

    def get(self, name: str, limit: int | None = None) -> bytes | None:
        try:
            resp = self.client().get_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as e:
            if self._missing(e):
                return None
            raise
        with contextlib.closing(resp["Body"]) as body:
            return body.read() if limit is None else body.read(limit + 1)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[IO[bytes]]:
        try:
            resp = self.client().get_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as e:
            if self._missing(e):
                raise FileNotFoundError(name) from None
            raise
        with contextlib.closing(resp["Body"]) as body:
            yield body

    def put(self, name: str, data: bytes | IO[bytes]) -> None:
        self.client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def exists(self, name: str) -> bool:
        try:
            self.client().head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except Exception as e:
            if self._missing(e):
                return False
            raise

    def children(self, name: str) -> list[str]:
        base = self._key(name)
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            out += [cp["Prefix"][len(base):].strip("/") for cp in page.get("CommonPrefixes", [])]
        return out

    def names(self, name: str) -> list[str]:
        """Object names directly under ``name`` (a folder-like prefix)."""
        base = self._key(name)
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            out += [obj["Key"][len(base):] for obj in page.get("Contents", [])]
        return out

    def transport_error(self, e: Exception) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        return isinstance(e, (BotoCoreError, ClientError))


class FsspecStore:
    """Any fsspec URL (file://, gcs://, az://, https:// read-only, ...): the same object layout."""

    def __init__(self, tier: Settings) -> None:
        self.tier = tier
        self._fs: Any = None
        self._root = ""

    def fs(self) -> Any:
        if self._fs is None:
            try:
                import fsspec
            except ImportError:
                raise RemoteUnavailable(
                    f"the remote tier needs fsspec for {self.tier.url}: pip install 'ctxcache[remote]'") from None
            self._fs, root = fsspec.core.url_to_fs(self.tier.url, **self.tier.storage_options)
            self._root = str(root).rstrip("/")
        return self._fs

    def _path(self, name: str) -> str:
        self.fs()  # sets _root
        return f"{self._root}/{name}" if self._root else name

    def get(self, name: str, limit: int | None = None) -> bytes | None:
        try:
            with self.fs().open(self._path(name), "rb") as f:
                return f.read() if limit is None else f.read(limit + 1)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[IO[bytes]]:
        with self.fs().open(self._path(name), "rb") as f:
            yield f

    def put(self, name: str, data: bytes | IO[bytes]) -> None:
        fs = self.fs()
        path = self._path(name)
        parent = path.rsplit("/", 1)[0]
        try:
            fs.makedirs(parent, exist_ok=True)
        except (NotImplementedError, OSError):
            pass  # object stores have no folders
        fs.pipe_file(path, data if isinstance(data, bytes) else data.read())

    def exists(self, name: str) -> bool:
        return bool(self.fs().exists(self._path(name)))

    def children(self, name: str) -> list[str]:
        try:
            items = self.fs().ls(self._path(name).rstrip("/"), detail=False)
        except FileNotFoundError:
            return []
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in items]

    def names(self, name: str) -> list[str]:
        return self.children(name)

    def transport_error(self, e: Exception) -> bool:
        return isinstance(e, (OSError, TimeoutError)) and not isinstance(e, FileNotFoundError)
