"""Prompt datasets: loading, templating, de-duplication, the resumable sampler."""
