"""Storage: local paths and ``s3://`` URIs (`s3`), the staging cache for datasets and models
(`staging`), committed checkpoints (`checkpoints`: files first, manifest last) and the
checkpointer that saves / restores a training (`checkpointer`)."""

from __future__ import annotations

from dapo.storage.s3 import (  # noqa: F401
    CheckpointCorruptError,
    CheckpointExistsError,
    S3Object,
    StorageError,
    download_dir,
    download_file,
    is_s3,
    join_uri,
    list_objects,
    s3_client,
    split_s3,
    transfer_config,
    upload_dir,
    upload_file,
)
from dapo.storage.staging import (  # noqa: F401
    STAGE_MARKER_SUFFIX,
    stage,
)
from dapo.storage.checkpoints import (  # noqa: F401
    CheckpointInfo,
    CheckpointStore,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    build_manifest,
    new_attempt,
    sha256_file,
    step_dir_name,
    verify_files,
)

__all__ = [
    'CheckpointCorruptError',
    'CheckpointExistsError',
    'CheckpointInfo',
    'CheckpointStore',
    'MANIFEST_FORMAT',
    'MANIFEST_NAME',
    'S3Object',
    'STAGE_MARKER_SUFFIX',
    'StorageError',
    'build_manifest',
    'download_dir',
    'download_file',
    'is_s3',
    'join_uri',
    'list_objects',
    'new_attempt',
    's3_client',
    'sha256_file',
    'split_s3',
    'stage',
    'step_dir_name',
    'transfer_config',
    'upload_dir',
    'upload_file',
    'verify_files',
]
