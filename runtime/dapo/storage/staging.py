"""Staging: make a dataset file or a model folder local, cached by size + ETag, safe against
concurrent stagers (a lock per target) and interrupted downloads (a marker written last)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator

from dapo.contracts import cache_dir as default_cache_dir

log = logging.getLogger(__name__)

from dapo.storage.files import read_json, write_json_atomic
from dapo.storage.s3 import (
    S3Object,
    describe_client_error,
    download_file,
    download_objects,
    is_s3,
    list_objects,
    local_path,
    log_rate,
    s3_client,
    s3_errors,
    split_s3,
    walk_files,
)

log = logging.getLogger("dapo.storage")

STAGE_MARKER_SUFFIX = ".dapo-staged.json"


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
                raise describe_client_error(exc, uri, "staging") from exc
        except s3_errors() as exc:
            raise describe_client_error(exc, uri, "staging") from exc
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
        path = local_path(uri)
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
        if read_json(marker) == want and _staged_files_present(local, kind, objects, key):
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
        total = download_objects(objects, bucket, key.rstrip("/") + "/", local, client, None, uri)
    write_json_atomic(marker, want)
    log_rate("staged", uri, total, time.perf_counter() - start, len(objects))


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
    for rel in walk_files(local_dir):
        if rel.as_posix() not in keep_rel:
            (local_dir / rel).unlink()
