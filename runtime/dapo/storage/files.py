"""Small durable-file helpers shared by the staging cache and the checkpoint store: JSON written
atomically (rename) or exclusively (hard link that fails when the name exists), with fsync."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


log = logging.getLogger("dapo.storage")

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_durably(path: Path, payload: dict, publish) -> None:
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
    fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON durably, replacing ``path`` if it exists (rename)."""
    write_json_durably(path, payload, os.replace)


def write_json_exclusive(path: Path, payload: dict) -> None:
    """Create ``path`` holding JSON, complete and durable, only if it does not exist yet: a hard
    link publishes the temp file (link(2) fails with EEXIST instead of replacing). Raises
    FileExistsError when ``path`` exists."""
    write_json_durably(path, payload, os.link)


def fsync_dir(folder: Path) -> None:
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
