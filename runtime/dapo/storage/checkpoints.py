"""Committed checkpoints (`CheckpointStore`), the same for a local folder and an S3 prefix.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dapo.contracts import cache_dir as default_cache_dir

log = logging.getLogger(__name__)

from dapo.storage.files import fsync_dir, read_json, write_json_exclusive
from dapo.storage.s3 import (
    CheckpointCorruptError,
    CheckpointExistsError,
    MiB,
    S3Object,
    StorageError,
    describe_client_error,
    download_objects,
    is_s3,
    join_uri,
    list_objects,
    local_path,
    log_rate,
    run_transfers,
    s3_client,
    s3_errors,
    split_s3,
    transfer_config,
    walk_files,
)

log = logging.getLogger("dapo.storage")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dapo-checkpoint/2"  # /2: data files under the attempt folder
_STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
EVALS_DIR = "evals"
_EVAL_FILE_RE = re.compile(r"^step-(\d{8,})\.json$")


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
        self.root_uri = root_uri.rstrip("/") if is_s3(root_uri) else str(local_path(root_uri))
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
        files = [f for f in walk_files(local_dir) if f.as_posix() != MANIFEST_NAME]
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
        log_rate("committed checkpoint", self.step_uri(step), nbytes, time.perf_counter() - start, len(files))
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
            write_json_exclusive(target.parent / MANIFEST_NAME, manifest)
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
            run_transfers(manager, futures, self.step_uri(step), "uploading checkpoint to")
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
            raise describe_client_error(exc, self.step_uri(step), "committing manifest of") from exc
        except s3_errors() as exc:
            raise describe_client_error(exc, self.step_uri(step), "committing manifest of") from exc
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
            except s3_errors() as exc:
                raise describe_client_error(exc, self.root_uri, "listing checkpoints in") from exc
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
            return read_json(Path(self.step_uri(step)) / MANIFEST_NAME)
        bucket, prefix = split_s3(self.step_uri(step))
        try:
            body = self.client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_NAME}")["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise describe_client_error(exc, self.step_uri(step), "reading manifest of") from exc
        except s3_errors() as exc:
            raise describe_client_error(exc, self.step_uri(step), "reading manifest of") from exc
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
        total = download_objects(objects, bucket, prefix + "/", dest, self.client, None, info.uri)
        log_rate("fetched checkpoint", info.uri, total, time.perf_counter() - start, len(objects))
        verify_files(dest, info.manifest, verify=verify, checkpoint=where)
        return dest

    # -- evaluation results (spec.eval.separatePod: evaluation pods write them next to the checkpoints)

    def evaluation_uri(self, step: int) -> str:
        """Where the evaluation of checkpoint ``step`` goes: ``{root}/evals/step-XXXXXXXX.json``."""
        return join_uri(self.root_uri, EVALS_DIR, f"{step_dir_name(step)}.json")

    def evaluated_steps(self) -> list[int]:
        """Steps whose evaluation results exist, ascending."""
        if self.is_s3:
            objects = list_objects(join_uri(self.root_uri, EVALS_DIR) + "/", client=self.client)
            names = [obj.key.rsplit("/", 1)[-1] for obj in objects]
        else:
            folder = Path(self.root_uri) / EVALS_DIR
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        return sorted(int(m.group(1)) for name in names if (m := _EVAL_FILE_RE.match(name)))

    def write_evaluation(self, step: int, result: dict) -> str:
        """Store the evaluation of checkpoint ``step`` (JSON); returns its URI."""
        uri = self.evaluation_uri(step)
        body = (json.dumps(result, indent=1) + "\n").encode()
        if self.is_s3:
            bucket, key = split_s3(uri)
            self.client.put_object(Bucket=bucket, Key=key, Body=body)
        else:
            path = Path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.partial")
            tmp.write_bytes(body)
            os.replace(tmp, path)  # readers see the whole result or none
        return uri

    def read_evaluation(self, step: int) -> dict:
        uri = self.evaluation_uri(step)
        if self.is_s3:
            bucket, key = split_s3(uri)
            return json.loads(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())
        return json.loads(Path(uri).read_text())

    def read_file(self, info: CheckpointInfo, rel: str) -> bytes:
        """One file of a committed checkpoint (``rel`` as the manifest names it, e.g. "run.yaml"),
        without fetching the rest (the weights); its sha256 is checked against the manifest.
        FileNotFoundError when the checkpoint has no such file."""
        entry = info.manifest.get("files", {}).get(rel)
        if entry is None:
            raise FileNotFoundError(f"checkpoint step {info.step} ({info.uri}) has no file {rel}")
        files_uri = self.files_uri(info)
        if self.is_s3:
            from botocore.exceptions import ClientError

            bucket, prefix = split_s3(files_uri)
            try:
                body = self.client.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read()
            except ClientError as exc:
                raise describe_client_error(exc, join_uri(files_uri, rel), "reading") from exc
        else:
            body = (Path(files_uri) / rel).read_bytes()
        if hashlib.sha256(body).hexdigest() != entry["sha256"]:
            raise CheckpointCorruptError(f"checkpoint step {info.step} ({info.uri}): file {rel} differs from its "
                                         "manifest's sha256 (the file was changed after the commit)")
        return body

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
            fsync_dir(manifest.parent)

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
