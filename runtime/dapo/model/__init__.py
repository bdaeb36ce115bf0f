"""Model loading (local, S3, GGUF, package:) and the built-in tiny models."""
