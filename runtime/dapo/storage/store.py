"""One storage layer for local paths and ``s3://`` URIs, and the checkpoint commit protocol.

Everything the runtime reads or writes outside its own working folder goes through here:
datasets and base models are *staged* (made local, cached), checkpoints are *committed*.

Checkpoint protocol (the same for a local folder and an S3 prefix)::

    {root}/step-00000010/{attempt}/<files...>   data files, written first, under a folder of
                                                their own per commit attempt
    {root}/step-00000010/manifest.json          written LAST and only if absent: its presence
                                                means "committed"; it names the attempt folder
                                                and every file's size and sha256

A checkpoint is committed exactly when its ``manifest.json`` exists. Readers list only
committed checkpoints, so an upload killed half-way leaves a folder that is never loaded.
The manifest is created exclusively (S3: a conditional ``If-None-Match: *`` PUT; local: a hard
link that fails when the name exists), and every writer puts its data files under its own
attempt folder, so a second writer of the same step can neither replace the manifest nor touch
the committed files: it fails with `CheckpointExistsError`. Fetching verifies every file's
size and sha256 against the manifest by default. Pruning deletes the manifest first, so a
half-deleted checkpoint is never seen as committed.

Credentials never come from arguments or run files: boto3's standard chain (env vars,
``~/.aws`` files, IRSA web identity in pods) supplies them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from dapo.contracts import cache_dir as default_cache_dir
from dapo.errors import DapoError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dapo-checkpoint/2"  # /2: data files under the attempt folder
STAGE_MARKER_SUFFIX = ".dapo-staged.json"
_STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")


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


def _local_path(uri: str | os.PathLike) -> Path:
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser()


# --------------------------------------------------------------------------------------
# Client and transfer configuration
# --------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise StorageError(f"environment variable {name}={raw!r} must be an integer") from None


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
    return _cached_client(
        endpoint_url,
        region,
        _env_int("DAPO_S3_MAX_ATTEMPTS", 8),
        _env_int("DAPO_S3_CONNECT_TIMEOUT", 10),
        _env_int("DAPO_S3_READ_TIMEOUT", 120),
        transfer_config().max_concurrency,
    )


_client_lock = threading.Lock()


@functools.lru_cache(maxsize=32)
def _cached_client(endpoint_url, region, max_attempts, connect_timeout, read_timeout, concurrency):
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

    chunk = _env_int("DAPO_S3_CHUNK_MB", 32) * MiB
    return TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=_env_int("DAPO_S3_MAX_CONCURRENCY", 16),
        io_chunksize=1 * MiB,
        max_io_queue=1000,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def _describe_client_error(exc: Exception, uri: str, action: str) -> StorageError:
    """Turn a botocore exception into a StorageError naming the URI, endpoint and a fix."""
    from botocore.exceptions import (
        ClientError, ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
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
            f"DAPO_S3_MAX_ATTEMPTS={_env_int('DAPO_S3_MAX_ATTEMPTS', 8)} attempts; check the store's health, "
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


def _s3_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _log_rate(action: str, uri: str, nbytes: int, seconds: float, nfiles: int = 1) -> None:
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
    except _s3_errors() as exc:
        raise _describe_client_error(exc, uri, "uploading to") from exc
    _log_rate("uploaded", uri, size, time.perf_counter() - start)


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
    except _s3_errors() as exc:
        raise _describe_client_error(exc, uri, "downloading") from exc
    _log_rate("downloaded", uri, local_path.stat().st_size, time.perf_counter() - start)
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
    except _s3_errors() as exc:
        raise _describe_client_error(exc, uri, "listing") from exc
    return sorted(out, key=lambda o: o.key)


def _walk_files(local_dir: Path) -> list[Path]:
    """All regular files under ``local_dir``, relative, sorted (stable manifests)."""
    return sorted(p.relative_to(local_dir) for p in local_dir.rglob("*") if p.is_file())


def _run_transfers(manager, submit: Iterable[tuple[Any, int]], uri: str, action: str) -> None:
    """Wait for a batch of s3transfer futures, cancelling the rest on the first failure."""
    futures = list(submit)
    try:
        for future, _ in futures:
            future.result()
    except BaseException as exc:
        for future, _ in futures:
            future.cancel()
        if isinstance(exc, _s3_errors()):
            raise _describe_client_error(exc, uri, action) from exc
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
    files = _walk_files(local_dir)
    total = sum((local_dir / f).stat().st_size for f in files)
    start = time.perf_counter()
    with create_transfer_manager(client, config or transfer_config()) as manager:
        _run_transfers(
            manager,
            (
                (manager.upload(str(local_dir / f), bucket, _join_key(prefix, f.as_posix())), 0)
                for f in files
            ),
            uri,
            "uploading to",
        )
    _log_rate("uploaded", uri, total, time.perf_counter() - start, len(files))
    return total


def _join_key(prefix: str, rel: str) -> str:
    return f"{prefix.rstrip('/')}/{rel}" if prefix else rel


def _download_objects(
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
        _run_transfers(
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
    total = _download_objects(objects, bucket, folder_prefix, local_dir, client, config, uri)
    _log_rate("downloaded", uri, total, time.perf_counter() - start, len(objects))
    return local_dir


# --------------------------------------------------------------------------------------
# Staging: make a dataset file or model folder local, cached by size + ETag
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_durably(path: Path, payload: dict, publish) -> None:
    """Write JSON to a temp file in ``path``'s folder, fsync it, ``publish(tmp, path)``, then
    fsync the folder: readers see either no file or the complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # after a rename it is gone; after a link the name is spare
    _fsync_dir(path.parent)


def _write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON durably, replacing ``path`` if it exists (rename)."""
    _write_json_durably(path, payload, os.replace)


def _write_json_exclusive(path: Path, payload: dict) -> None:
    """Create ``path`` holding JSON, complete and durable, only if it does not exist yet: a hard
    link publishes the temp file (link(2) fails with EEXIST instead of replacing). Raises
    FileExistsError when ``path`` exists."""
    _write_json_durably(path, payload, os.link)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remote_listing(uri: str, client) -> tuple[str, list[S3Object]]:
    """("file", [obj]) when ``uri`` is one object, ("dir", objects) when it is a prefix."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    if key and not key.endswith("/"):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            return "file", [S3Object(key, int(head["ContentLength"]), head["ETag"])]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise _describe_client_error(exc, uri, "staging") from exc
        except _s3_errors() as exc:
            raise _describe_client_error(exc, uri, "staging") from exc
    folder = key.rstrip("/") + "/" if key else ""
    objects = [o for o in list_objects(f"s3://{bucket}/{folder}", client=client) if not o.key.endswith("/")]
    if not objects:
        raise FileNotFoundError(f"stage: nothing at {uri} (neither an object nor a prefix with objects); fix the URI")
    return "dir", objects


def stage(uri: str, cache_dir: str | Path | None = None, *, client=None) -> Path:
    """A local path for a file or folder named by ``uri``.

    Local paths come back unchanged (``FileNotFoundError`` naming the path if missing). An
    s3:// object becomes ``{cache}/s3/{bucket}/{key}``; an s3:// prefix (e.g. a Hugging Face
    model folder) becomes that folder. A marker ``{path}.dapo-staged.json`` holding every
    object's size and ETag is written *after* the download, so a later call with the same
    remote contents skips the download, and an interrupted one (no marker) is redone.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.exists():
            raise FileNotFoundError(f"stage: local path {path} does not exist; fix the path or use an s3:// URI")
        return path
    client = client or s3_client()
    bucket, key = split_s3(uri)
    kind, objects = _remote_listing(uri, client)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    local = cache_root / "s3" / bucket / key.strip("/")
    marker = local.with_name(local.name + STAGE_MARKER_SUFFIX)
    want = {"uri": uri, "kind": kind, "objects": {o.key: [o.size, o.etag] for o in objects}}
    # several local processes (learner, rollout) may stage the same URI at once: one downloads
    with _exclusive_lock(local.with_name(local.name + ".dapo-lock")):
        if _read_json(marker) == want and _staged_files_present(local, kind, objects, key):
            log.info("stage %s: cache hit at %s", uri, local)
            return local
        _download_staged(uri, local, marker, want, kind, objects, bucket, key, client)
    return local


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An advisory ``flock`` on ``lock_path`` held for the block (released if the process dies)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _download_staged(uri, local: Path, marker: Path, want: dict, kind: str, objects, bucket, key, client) -> None:
    """Download a file or prefix into the cache, then write its completion marker."""
    marker.unlink(missing_ok=True)  # from here on the cached copy is incomplete
    start = time.perf_counter()
    if kind == "file":
        if local.is_dir():
            shutil.rmtree(local)
        download_file(uri, local, client=client)
        total = objects[0].size
    else:
        if local.is_file():
            local.unlink()
        _remove_stale(local, {o.key[len(key.rstrip('/') + '/'):] for o in objects})
        total = _download_objects(objects, bucket, key.rstrip("/") + "/", local, client, None, uri)
    _write_json_atomic(marker, want)
    _log_rate("staged", uri, total, time.perf_counter() - start, len(objects))


def _staged_files_present(local: Path, kind: str, objects: list[S3Object], key: str) -> bool:
    """Every expected file exists locally with the recorded size (a cheap integrity check)."""
    if kind == "file":
        return local.is_file() and local.stat().st_size == objects[0].size
    base = key.rstrip("/") + "/"
    for obj in objects:
        path = local / obj.key[len(base):]
        if not path.is_file() or path.stat().st_size != obj.size:
            return False
    return True


def _remove_stale(local_dir: Path, keep_rel: set[str]) -> None:
    """Delete files in a cached folder that the remote prefix no longer holds."""
    if not local_dir.is_dir():
        return
    for rel in _walk_files(local_dir):
        if rel.as_posix() not in keep_rel:
            (local_dir / rel).unlink()


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """One committed checkpoint: its step, its folder URI and its parsed manifest."""

    step: int
    uri: str
    manifest: dict = field(repr=False)


def step_dir_name(step: int) -> str:
    """``step-00000010``: zero-padded so lexical order equals numeric order."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:08d}"


def sha256_file(path: Path, chunk: int = 4 * MiB) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hash_files(local_dir: Path, files: list[Path]) -> dict[str, dict]:
    """``{relpath: {"size", "sha256"}}`` for the manifest, hashing 2 files at a time."""
    def entry(rel: Path) -> tuple[str, dict]:
        path = local_dir / rel
        return rel.as_posix(), {"size": path.stat().st_size, "sha256": sha256_file(path)}

    with ThreadPoolExecutor(max_workers=2) as pool:  # hashlib releases the GIL on big buffers
        return dict(pool.map(entry, files))


def new_attempt() -> str:
    """A commit attempt's folder name: UTC time (sorts by age) plus 8 random hex digits (two
    writers never share one)."""
    return f"attempt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def build_manifest(step: int, files: dict[str, dict], meta: dict | None, attempt: str) -> dict:
    """The manifest body: format tag, step, the attempt folder holding the files, files (size,
    sha256, relative to that folder), user meta and commit time."""
    now = time.time()
    return {
        "format": MANIFEST_FORMAT,
        "step": step,
        "attempt": attempt,
        "files": files,
        "meta": dict(meta or {}),
        "time": now,
        "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }


def verify_files(folder: Path, manifest: dict, *, verify: bool = True, checkpoint: str = "") -> None:
    """Check every manifest file exists in ``folder`` with its size and (``verify``) sha256.

    Raises `CheckpointCorruptError` naming the checkpoint (``checkpoint``) and the file."""
    where = checkpoint or str(folder)
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointCorruptError(f"{where}: file {rel} listed in the manifest is missing ({path})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointCorruptError(f"{where}: file {rel} has {size} bytes, the manifest says {want['size']}")
        if verify:
            got = sha256_file(path)
            if got != want["sha256"]:
                raise CheckpointCorruptError(f"{where}: file {rel} has sha256 {got[:16]}..., the manifest says "
                                             f"{want['sha256'][:16]}... (the file was changed after the commit)")


class CheckpointStore:
    """Commit, list, fetch and prune checkpoints under a local folder or an s3:// prefix.

    ``commit`` writes the files under a fresh attempt folder, then ``manifest.json`` last and
    only if absent (a hard link locally; a conditional ``If-None-Match: *`` PUT on S3), so two
    writers cannot both commit one step and neither touches the other's files; then it keeps the
    last ``keep`` committed checkpoints.
    """

    def __init__(self, root_uri: str, keep: int = 3, *, endpoint_url: str | None = None, region: str | None = None):
        if keep < 1:
            raise ValueError(f"CheckpointStore keep must be >= 1 (checkpoint.keep), got {keep}")
        self.root_uri = root_uri.rstrip("/") if is_s3(root_uri) else str(_local_path(root_uri))
        self.keep = keep
        self._endpoint_url = endpoint_url
        self._region = region
        self._client = None

    def __repr__(self) -> str:
        return f"CheckpointStore({self.root_uri!r}, keep={self.keep})"

    @property
    def is_s3(self) -> bool:
        return is_s3(self.root_uri)

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self._endpoint_url, self._region)
        return self._client

    def step_uri(self, step: int) -> str:
        return join_uri(self.root_uri, step_dir_name(step))

    @staticmethod
    def files_uri(info: "CheckpointInfo") -> str:
        """Where a committed checkpoint's files are: its attempt folder (format 1 manifests, which
        name none, kept the files in the step folder itself)."""
        attempt = info.manifest.get("attempt")
        return join_uri(info.uri, attempt) if attempt else info.uri

    # -- commit -----------------------------------------------------------------------

    def commit(self, step: int, local_dir: Path, meta: dict | None = None, *, overwrite: bool = False) -> CheckpointInfo:
        """Copy/upload every file under ``local_dir`` to ``{root}/step-{step:08d}/``, then
        write ``manifest.json`` last, then prune to the last ``keep`` committed checkpoints.

        Raises ``CheckpointExistsError`` when ``step`` is already committed (also when another
        writer commits it while this one uploads), unless ``overwrite``: that un-commits it first
        by deleting its manifest; its files stay untouched in their attempt folder until pruned.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"commit: checkpoint folder {local_dir} does not exist")
        files = [f for f in _walk_files(local_dir) if f.as_posix() != MANIFEST_NAME]
        if not files:
            raise StorageError(f"commit: checkpoint folder {local_dir} holds no files; nothing to commit for step {step}")
        if self._read_manifest(step) is not None:
            if not overwrite:
                raise CheckpointExistsError(
                    f"checkpoint step {step} is already committed at {self.step_uri(step)}; "
                    "pass overwrite=True to replace it or commit another step"
                )
            self._delete_manifest(step)
        start = time.perf_counter()
        attempt = new_attempt()
        if self.is_s3:
            manifest = self._commit_s3(step, local_dir, files, meta, attempt)
        else:
            manifest = self._commit_local(step, local_dir, files, meta, attempt)
        nbytes = sum(f["size"] for f in manifest["files"].values())
        _log_rate("committed checkpoint", self.step_uri(step), nbytes, time.perf_counter() - start, len(files))
        info = CheckpointInfo(step=step, uri=self.step_uri(step), manifest=manifest)
        try:
            self.prune(newest_step=step)
        except (StorageError, OSError) as exc:
            # the checkpoint is committed (its manifest is written): failing here would stop a
            # training over housekeeping; the next commit prunes again
            log.warning("checkpoint step %d is committed but pruning older ones failed (retried at the next "
                        "commit): %s", step, exc)
        return info

    def _commit_local(self, step: int, local_dir: Path, files: list[Path], meta: dict | None, attempt: str) -> dict:
        target = Path(self.step_uri(step)) / attempt
        target.mkdir(parents=True, exist_ok=False)  # a fresh name: exist_ok=False is a second guard
        for rel in files:
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local_dir / rel, dst)
        for rel in files:  # data must be durable before the manifest says it is there
            with open(target / rel, "rb") as fh:
                os.fsync(fh.fileno())
        manifest = build_manifest(step, _hash_files(target, files), meta, attempt)
        try:
            _write_json_exclusive(target.parent / MANIFEST_NAME, manifest)
        except FileExistsError as exc:
            raise CheckpointExistsError(
                f"checkpoint step {step} was committed by another writer at {self.step_uri(step)} while this one "
                "copied its files; is a second trainer running with the same checkpoint.uri?") from exc
        return manifest

    def _commit_s3(self, step: int, local_dir: Path, files: list[Path], meta: dict | None, attempt: str) -> dict:
        from boto3.s3.transfer import create_transfer_manager
        from botocore.exceptions import ClientError

        bucket, prefix = split_s3(self.step_uri(step))
        with create_transfer_manager(self.client, transfer_config()) as manager:
            futures = [(manager.upload(str(local_dir / rel), bucket, f"{prefix}/{attempt}/{rel.as_posix()}"), 0)
                       for rel in files]
            # hash while the transfer threads upload: the manifest is ready when they finish
            try:
                hashes = _hash_files(local_dir, files)
            except BaseException:
                for future, _ in futures:
                    future.cancel()
                raise
            _run_transfers(manager, futures, self.step_uri(step), "uploading checkpoint to")
        manifest = build_manifest(step, hashes, meta, attempt)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        try:
            self.client.put_object(
                Bucket=bucket, Key=f"{prefix}/{MANIFEST_NAME}", Body=body,
                ContentType="application/json", IfNoneMatch="*",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise CheckpointExistsError(
                    f"checkpoint step {step} was committed by another writer at {self.step_uri(step)} "
                    "while this one uploaded; is a second trainer running with the same checkpoint.uri?"
                ) from exc
            raise _describe_client_error(exc, self.step_uri(step), "committing manifest of") from exc
        except _s3_errors() as exc:
            raise _describe_client_error(exc, self.step_uri(step), "committing manifest of") from exc
        return manifest

    # -- listing ----------------------------------------------------------------------

    def _step_dirs(self) -> list[int]:
        """Steps that have a ``step-XXXXXXXX`` folder, committed or not, ascending."""
        names: list[str] = []
        if self.is_s3:
            bucket, prefix = split_s3(self.root_uri + "/")
            try:
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix, Delimiter="/"
                )
                for page in pages:
                    names.extend(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
            except _s3_errors() as exc:
                raise _describe_client_error(exc, self.root_uri, "listing checkpoints in") from exc
        else:
            root = Path(self.root_uri)
            if root.is_dir():
                names = [p.name for p in root.iterdir() if p.is_dir()]
        steps = [int(m.group(1)) for m in map(_STEP_DIR_RE.match, names) if m]
        return sorted(steps)

    def _read_manifest(self, step: int) -> dict | None:
        """The parsed manifest of ``step``, or None when it is not committed."""
        from botocore.exceptions import ClientError

        if not self.is_s3:
            return _read_json(Path(self.step_uri(step)) / MANIFEST_NAME)
        bucket, prefix = split_s3(self.step_uri(step))
        try:
            body = self.client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_NAME}")["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise _describe_client_error(exc, self.step_uri(step), "reading manifest of") from exc
        except _s3_errors() as exc:
            raise _describe_client_error(exc, self.step_uri(step), "reading manifest of") from exc
        try:
            return json.loads(body)
        except ValueError:
            log.warning("checkpoint %s has an unreadable manifest; ignoring it", self.step_uri(step))
            return None

    def list_committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints (those with a manifest), sorted by step ascending."""
        out = []
        for step in self._step_dirs():
            manifest = self._read_manifest(step)
            if manifest is not None and manifest.get("step") == step:
                out.append(CheckpointInfo(step=step, uri=self.step_uri(step), manifest=manifest))
        return out

    def latest(self) -> CheckpointInfo | None:
        """The committed checkpoint with the highest step, or None."""
        for step in reversed(self._step_dirs()):
            manifest = self._read_manifest(step)
            if manifest is not None and manifest.get("step") == step:
                return CheckpointInfo(step=step, uri=self.step_uri(step), manifest=manifest)
        return None

    # -- fetch ------------------------------------------------------------------------

    def fetch(self, info: CheckpointInfo, dest_dir: Path | None = None, *, verify: bool = True) -> Path:
        """A local folder holding the checkpoint's files, checked against the manifest.

        Local store: the checkpoint's attempt folder itself. S3: downloaded into ``dest_dir``
        (default ``{cache}/checkpoints/{bucket}/{key}``). Every file's size and sha256 are
        checked (``verify=False``: sizes only); a mismatch raises `CheckpointCorruptError` naming
        the checkpoint and the file.
        """
        where = f"checkpoint step {info.step} ({info.uri})"
        files_uri = self.files_uri(info)
        if not self.is_s3:
            folder = Path(files_uri)
            verify_files(folder, info.manifest, verify=verify, checkpoint=where)
            return folder
        bucket, prefix = split_s3(files_uri)
        dest = Path(dest_dir) if dest_dir is not None else default_cache_dir() / "checkpoints" / bucket / prefix
        dest.mkdir(parents=True, exist_ok=True)
        objects = [
            S3Object(f"{prefix}/{rel}", int(entry["size"]), "") for rel, entry in info.manifest["files"].items()
        ]
        start = time.perf_counter()
        total = _download_objects(objects, bucket, prefix + "/", dest, self.client, None, info.uri)
        _log_rate("fetched checkpoint", info.uri, total, time.perf_counter() - start, len(objects))
        verify_files(dest, info.manifest, verify=verify, checkpoint=where)
        return dest

    def uncommit(self, step: int) -> None:
        """Delete ``step``'s manifest: the checkpoint is no longer listed (its files are pruned
        later as an abandoned folder), and the step can be committed again."""
        self._delete_manifest(step)
        log.warning("checkpoint step %d at %s un-committed", step, self.step_uri(step))

    # -- pruning ----------------------------------------------------------------------

    def prune(self, newest_step: int | None = None) -> list[int]:
        """Keep the last ``keep`` committed checkpoints; also drop abandoned (manifest-less)
        step folders older than ``newest_step``. Returns the steps deleted.
        """
        committed = [info.step for info in self.list_committed()]
        doomed = committed[: max(0, len(committed) - self.keep)]
        if newest_step is not None:
            abandoned = [s for s in self._step_dirs() if s < newest_step and s not in committed]
            doomed = sorted(set(doomed) | set(abandoned))
        for step in doomed:
            self._delete_step(step)
        if doomed:
            log.info("pruned checkpoints %s under %s (keep=%d)", doomed, self.root_uri, self.keep)
        return doomed

    def _delete_manifest(self, step: int) -> None:
        if self.is_s3:
            bucket, prefix = split_s3(self.step_uri(step))
            self.client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_NAME}")
        else:
            manifest = Path(self.step_uri(step)) / MANIFEST_NAME
            manifest.unlink(missing_ok=True)
            _fsync_dir(manifest.parent)

    def _delete_step(self, step: int) -> None:
        """Manifest first (un-commit), then the data files."""
        self._delete_manifest(step)
        if not self.is_s3:
            shutil.rmtree(self.step_uri(step), ignore_errors=True)
            return
        bucket, prefix = split_s3(self.step_uri(step) + "/")
        keys = [o.key for o in list_objects(f"s3://{bucket}/{prefix}", client=self.client)]
        for batch in _chunks(keys, 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
