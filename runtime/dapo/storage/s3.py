"""Storage for local paths and ``s3://`` URIs: URI helpers, the S3 client (retries, timeouts,
tuned transfers) and file / folder transfers, with errors that name the URI and the fix.

Credentials never come from arguments or run files: boto3's standard chain (env vars,
``~/.aws`` files, IRSA web identity in pods) supplies them.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dapo.contracts import Env, EnvVar
from dapo.errors import DapoError

log = logging.getLogger(__name__)


log = logging.getLogger("dapo.storage")

MiB = 1024 * 1024

class StorageError(DapoError, RuntimeError):
    """A storage operation failed; the message names the URI and what to check."""


class CheckpointExistsError(StorageError, FileExistsError):
    """``commit`` was asked to write a step that is already committed."""


class CheckpointCorruptError(StorageError):
    """A fetched checkpoint does not match its manifest (size or sha256)."""


# --------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------


def is_s3(uri: str | os.PathLike) -> bool:
    """True when ``uri`` is an ``s3://bucket/key`` URI (anything else is a local path)."""
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty (whole bucket)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r} (expected s3://BUCKET/KEY)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r} (expected s3://BUCKET/KEY)")
    return bucket, key


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI with exactly one '/' between them."""
    if is_s3(base):
        out = base.rstrip("/")
        for part in parts:
            out += "/" + part.strip("/")
        return out
    return str(Path(base, *parts))


def local_path(uri: str | os.PathLike) -> Path:
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser()


# --------------------------------------------------------------------------------------
# Client and transfer configuration
# --------------------------------------------------------------------------------------


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client tuned for large transfers and flaky stores.

    Endpoint and region fall back to ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` (then
    ``AWS_DEFAULT_REGION``) so pods work unchanged; credentials come only from the AWS chain
    (env, config files, IRSA web identity). Retries: botocore "standard" mode,
    ``DAPO_S3_MAX_ATTEMPTS`` (default 8) attempts with jittered exponential backoff
    (throttling: rand * min(2**i s, 20 s); other errors: rand * 50 ms * 2**i), so a store
    answering 500 / 503 SlowDown for a while is survived. Checksums only "when required" so
    non-AWS stores (MinIO, Ceph) that reject the newer CRC trailers work.

    Clients are thread-safe and cached per resolved settings (building one costs ~0.25 s).
    """
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return cached_client(
        endpoint_url,
        region,
        Env().int(EnvVar.S3_MAX_ATTEMPTS, 8),
        Env().int(EnvVar.S3_CONNECT_TIMEOUT, 10),
        Env().int(EnvVar.S3_READ_TIMEOUT, 120),
        transfer_config().max_concurrency,
    )


_client_lock = threading.Lock()


@functools.lru_cache(maxsize=32)
def cached_client(endpoint_url, region, max_attempts, connect_timeout, read_timeout, concurrency):
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        retries={"mode": "standard", "total_max_attempts": max_attempts},  # first try included
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # one pooled connection per transfer thread, plus headroom for listings
        max_pool_connections=concurrency + 8,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
        # custom endpoints (MinIO, moto) rarely have wildcard DNS for virtual-host buckets
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    with _client_lock:  # boto3 sessions are not thread-safe to create clients from
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def transfer_config():
    """The tuned ``TransferConfig``: 32 MiB parts from 32 MiB up, 16 threads, 1 MiB IO chunks.

    Larger parts than boto3's 8 MiB cut per-request overhead (signing, HTTP round trips) on
    multi-GiB checkpoint shards; ``DAPO_S3_MAX_CONCURRENCY`` / ``DAPO_S3_CHUNK_MB`` override.
    """
    from boto3.s3.transfer import TransferConfig

    chunk = Env().int(EnvVar.S3_CHUNK_MB, 32) * MiB
    return TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=Env().int(EnvVar.S3_MAX_CONCURRENCY, 16),
        io_chunksize=1 * MiB,
        max_io_queue=1000,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def describe_client_error(exc: Exception, uri: str, action: str) -> StorageError:
    """Turn a botocore exception into a StorageError naming the URI, endpoint and a fix."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"{action} {uri}: cannot reach S3 at {exc.kwargs.get('endpoint_url', endpoint)} "
            f"({exc}); check spec.storage.endpointUrl / AWS_ENDPOINT_URL and the network"
        )
    if isinstance(exc, (ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)):
        # the store answered nothing (reset, closed, silent) on every one of the client's attempts
        return StorageError(
            f"{action} {uri}: S3 at {endpoint} did not answer ({type(exc).__name__}: {exc}) after "
            f"{EnvVar.S3_MAX_ATTEMPTS}={Env().int(EnvVar.S3_MAX_ATTEMPTS, 8)} attempts; check the store's health, "
            f"spec.storage.endpointUrl / AWS_ENDPOINT_URL and the network, then resume the run"
        )
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{action} {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "an AWS profile, or IRSA (spec.storage.credentialsSecret in a cluster)"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode", "?")
        attempts = int(meta.get("RetryAttempts", 0)) + 1
        hint = {
            "NoSuchBucket": "the bucket does not exist; create it or fix the URI",
            "NoSuchKey": "the object does not exist; fix the URI",
            "404": "the object does not exist; fix the URI",
            "AccessDenied": "the credentials lack permission for this bucket/key",
            "403": "the credentials lack permission for this bucket/key",
        }.get(code, "the store kept failing; check its health and retry" if str(status).startswith("5")
              else "see the S3 error code")
        return StorageError(f"{action} {uri}: S3 error {code} (HTTP {status}, {attempts} attempt(s)): {hint}")
    return StorageError(f"{action} {uri}: {type(exc).__name__}: {exc}")


def s3_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def log_rate(action: str, uri: str, nbytes: int, seconds: float, nfiles: int = 1) -> None:
    """INFO line with throughput: MB/s = bytes / 1e6 / seconds."""
    rate = nbytes / 1e6 / max(seconds, 1e-9)
    log.info("%s %s: %d file(s), %.1f MB in %.2f s (%.1f MB/s)", action, uri, nfiles, nbytes / 1e6, seconds, rate)


# --------------------------------------------------------------------------------------
# Single objects and folders
# --------------------------------------------------------------------------------------


def upload_file(local_path: str | Path, uri: str, *, client=None, config=None) -> None:
    """Upload one local file to ``s3://bucket/key`` (multipart above the threshold)."""
    bucket, key = split_s3(uri)
    client = client or s3_client()
    size = Path(local_path).stat().st_size
    start = time.perf_counter()
    try:
        client.upload_file(str(local_path), bucket, key, Config=config or transfer_config())
    except s3_errors() as exc:
        raise describe_client_error(exc, uri, "uploading to") from exc
    log_rate("uploaded", uri, size, time.perf_counter() - start)


def download_file(uri: str, local_path: str | Path, *, client=None, config=None) -> Path:
    """Download ``s3://bucket/key`` to ``local_path`` (via a temp file; never half-written)."""
    bucket, key = split_s3(uri)
    client = client or s3_client()
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        # s3transfer writes to a temporary name and renames on success
        client.download_file(bucket, key, str(local_path), Config=config or transfer_config())
    except s3_errors() as exc:
        raise describe_client_error(exc, uri, "downloading") from exc
    log_rate("downloaded", uri, local_path.stat().st_size, time.perf_counter() - start)
    return local_path


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


def list_objects(uri: str, *, client=None) -> list[S3Object]:
    """Every object under the prefix ``uri`` (recursive), sorted by key."""
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    out: list[S3Object] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(S3Object(o["Key"], int(o["Size"]), o["ETag"]) for o in page.get("Contents", []))
    except s3_errors() as exc:
        raise describe_client_error(exc, uri, "listing") from exc
    return sorted(out, key=lambda o: o.key)


def walk_files(local_dir: Path) -> list[Path]:
    """All regular files under ``local_dir``, relative, sorted (stable manifests)."""
    return sorted(p.relative_to(local_dir) for p in local_dir.rglob("*") if p.is_file())


def run_transfers(manager, submit: Iterable[tuple[Any, int]], uri: str, action: str) -> None:
    """Wait for a batch of s3transfer futures, cancelling the rest on the first failure."""
    futures = list(submit)
    try:
        for future, _ in futures:
            future.result()
    except BaseException as exc:
        for future, _ in futures:
            future.cancel()
        if isinstance(exc, s3_errors()):
            raise describe_client_error(exc, uri, action) from exc
        raise


def upload_dir(local_dir: str | Path, uri: str, *, client=None, config=None) -> int:
    """Upload every file under ``local_dir`` to the prefix ``uri`` (keys keep relative paths).

    All files share one transfer manager, so many small files upload in parallel as well as
    the parts of large ones. Returns the bytes uploaded.
    """
    from boto3.s3.transfer import create_transfer_manager

    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"upload_dir: local folder {local_dir} does not exist")
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    files = walk_files(local_dir)
    total = sum((local_dir / f).stat().st_size for f in files)
    start = time.perf_counter()
    with create_transfer_manager(client, config or transfer_config()) as manager:
        run_transfers(
            manager,
            (
                (manager.upload(str(local_dir / f), bucket, join_key(prefix, f.as_posix())), 0)
                for f in files
            ),
            uri,
            "uploading to",
        )
    log_rate("uploaded", uri, total, time.perf_counter() - start, len(files))
    return total


def join_key(prefix: str, rel: str) -> str:
    return f"{prefix.rstrip('/')}/{rel}" if prefix else rel


def download_objects(
    objects: list[S3Object], bucket: str, prefix: str, local_dir: Path, client, config, uri: str
) -> int:
    """Download ``objects`` (keys under ``prefix``) into ``local_dir``; returns bytes."""
    from boto3.s3.transfer import create_transfer_manager

    base = prefix.rstrip("/") + "/" if prefix else ""
    targets = []
    for obj in objects:
        rel = obj.key[len(base):]
        target = (local_dir / rel).resolve()
        if not rel or not target.is_relative_to(local_dir.resolve()):
            raise StorageError(f"refusing to download {obj.key!r} from {uri}: it escapes {local_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        targets.append((obj, target))
    with create_transfer_manager(client, config or transfer_config()) as manager:
        run_transfers(
            manager,
            ((manager.download(bucket, obj.key, str(target)), obj.size) for obj, target in targets),
            uri,
            "downloading",
        )
    return sum(obj.size for obj in objects)


def download_dir(uri: str, local_dir: str | Path, *, client=None, config=None) -> Path:
    """Download every object under the prefix ``uri`` into ``local_dir`` (relative keys kept)."""
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    folder_prefix = prefix.rstrip("/") + "/" if prefix else ""
    objects = [o for o in list_objects(uri.rstrip("/") + "/" if prefix else uri, client=client)
               if not o.key.endswith("/")]  # zero-byte "folder" placeholders made by consoles
    if not objects:
        raise FileNotFoundError(f"download_dir: no objects under {uri}; check the URI")
    start = time.perf_counter()
    total = download_objects(objects, bucket, folder_prefix, local_dir, client, config, uri)
    log_rate("downloaded", uri, total, time.perf_counter() - start, len(objects))
    return local_dir


# --------------------------------------------------------------------------------------
# Staging: make a dataset file or model folder local, cached by size + ETag
# --------------------------------------------------------------------------------------
