"""A worker extension for tests/test_vllm_gpu_path.py: dapo's `WeightSyncWorkerExtension` plus
methods the tests call through ``collective_rpc`` to look inside each vLLM worker and to force the
GPU worker's per-bucket load path on a CPU worker. Never used outside the tests."""

from __future__ import annotations

from dapo.rollout.vllm import WeightSyncWorkerExtension, bucket_load_refusal

WORKER_EXTENSION = "_vllm_test_worker.TestWorkerExtension"


class TestWorkerExtension(WeightSyncWorkerExtension):
    __test__ = False  # not a pytest test class

    def _dapo_loads_per_bucket(self) -> bool:
        forced = getattr(self, "_test_per_bucket", None)
        return super()._dapo_loads_per_bucket() if forced is None else forced

    def test_tp_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()

    def test_embedding_shard(self) -> tuple[int, int, list]:
        """This worker's rows of the (vocab-parallel) embedding: (first vocab id, end, rows)."""
        embed = self.model_runner.model.model.embed_tokens
        start, end = embed.shard_indices.org_vocab_start_index, embed.shard_indices.org_vocab_end_index
        return start, end, embed.weight.detach()[:end - start].float().tolist()

    def test_refusal_of_own_model(self):
        return bucket_load_refusal(getattr(self.model_config, "quantization", None),
                                   self.model_runner.model.named_modules())

    def test_force_bucket_path(self, fail_at_call: int) -> None:
        """Route loads through the per-bucket branch; the model's ``load_weights`` is replaced by
        one that records the tensor names of each call and raises on call ``fail_at_call`` (a
        CPU worker's linear weights are repacked for oneDNN, so the GPU loader cannot write into
        them: this drives dapo's per-bucket bookkeeping, not vLLM's loader)."""
        self._test_per_bucket = True
        self._test_calls = []

        def load_weights(weights):
            names = [name for name, _ in weights]
            self._test_calls.append(names)
            if len(self._test_calls) == fail_at_call:
                raise RuntimeError(f"bucket {fail_at_call} failed to load")
            return set(names)

        self.model_runner.model.load_weights = load_weights

    def test_bucket_calls(self) -> list:
        return list(getattr(self, "_test_calls", []))

    def test_set_quantization(self, value) -> None:
        self.model_config.quantization = value

    def test_restore(self) -> None:
        self._test_per_bucket = None
        self.model_runner.model.__dict__.pop("load_weights", None)
