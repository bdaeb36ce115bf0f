"""Local / S3 storage, the staging cache, committed checkpoints and the checkpointer."""
